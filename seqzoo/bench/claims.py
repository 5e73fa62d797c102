"""What a comparison reproduces: known claims checked against the run's own numbers, and noise verdicts.

The claims are data, in the preset (``claims``: ``seqzoo.bench.presets.KNOWN_CLAIMS``), each a ``kind``
with the layers and task it is about and its wording; this module evaluates each kind and names no layer:

- ``solves`` (``layer``, ``task``): the layer reaches the task's solve threshold (``stop_at``) in every
  backbone, on the first table column;
- ``grows_with_state`` (``task``): over ≥ 3 widths, the first column grows with state size for the
  layers whose state does not grow with the sequence;
- ``equal`` (``layers``: two): the same results within noise on every task and backbone;
- ``uses_context`` (``layers``, ``task``): the task's ``context_gain`` beyond the seed spread (tasks that
  report ``loss_by_position``, ``context_gain``, ``loss_early``, ``loss_late``: the byte LM);
- ``plateaus`` (``layer``, ``reference``, ``task``): from the window's third quarter to its second half the
  layer gains less than the reference, beyond the seed spread;
- ``ladder`` (``task``, ``metric``, ``paper_perplexity``): for a ``variants`` preset, each row's change
  against the row before moves as the paper's perplexity does.

Every verdict here is computed from ``results.json`` — nothing is written by hand. A claim whose layers,
tasks or seeds are not in the run is "not tested" and says what it lacks.

Noise: a cell's metric over its seeds is an interval [min, max]. Two cells differ only when their
intervals do not overlap; on a task with a solve threshold (``stop_at``, MQAR's 0.99) two cells that both
reach it are equal ("both solved"). One seed gives a point: such a difference is reported, marked as
resting on one seed.
"""

from __future__ import annotations

from typing import Any

from .compare import task_entry
from .runs import cell_name
from .tasks import compared, reaches, task_infos

__all__ = ["evaluate_claims", "difference", "summary", "state_grows", "ladder_steps", "claim_specs"]

REPRODUCED, NOT_REPRODUCED, NOT_TESTED = "reproduced", "not reproduced", "not tested"


def summary(cell: dict, task: str, metric: str, width: str | None = None) -> dict | None:
    """Mean/min/max/std/n of ``metric`` over the seeds of a cell's task at ``width`` (default: largest)."""
    _, entry = task_entry(cell, task, width)
    if not entry or not entry.get("best"):
        return None
    return entry["best"]["metrics"].get(metric)


def difference(a: dict, b: dict, *, sign: float = 1.0, solved_at: float | None = None) -> str:
    """How ``a`` compares with ``b`` (two ``summary`` dicts): "better", "worse", "within noise" or
    "both solved" (``sign`` +1: higher is better)."""
    if solved_at is not None and reaches(a["min"], solved_at, sign) and reaches(b["min"], solved_at, sign):
        return "both solved"
    if a["max"] >= b["min"] and b["max"] >= a["min"]:
        return "within noise"
    return "better" if sign * (a["mean"] - b["mean"]) > 0 else "worse"


def _fmt(s: dict | None, digits: int = 3) -> str:
    if s is None:
        return "—"
    if s["n"] > 1:
        return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"
    return f"{s['mean']:.{digits}f} (1 seed)"


def state_grows(layer: str) -> bool | None:
    """Whether a registered layer's state grows with the sequence (None: the layer cannot tell)."""
    import torch

    import seqzoo

    try:
        with torch.device("meta"):
            m = seqzoo.create_layer(layer, 16)
        return m.state_size(4096) != m.state_size(64)
    except Exception:  # noqa: BLE001 - a layer that cannot be built on meta tensors at width 16
        return None


def _cells(results: dict) -> dict[tuple[str, str], dict]:
    return {(c["layer"], c["backbone"]): c for c in results["cells"].values() if "variant" not in c}


def _task_cfg(results: dict, task: str) -> dict | None:
    if task not in results["run_config"]["tasks"]:
        return None
    return results["run_config"]["preset_config"]["tasks"].get(task)


def _claim(claim: str, verdict: str, evidence: list[str], **numbers: Any) -> dict:
    return {"claim": claim, "verdict": verdict, "evidence": evidence, "numbers": numbers}


def _metric(results: dict, task: str) -> tuple[str, float]:
    """The metric a task's claims read (``compared``: its first table column) and its sign."""
    info = task_infos(results).get(task)
    return compared(info) if info else ("loss", -1.0)


def _solves(results: dict, spec: dict) -> dict:
    claim, layer, task = spec["text"], spec["layer"], spec["task"]
    tcfg = _task_cfg(results, task)
    cells = {b: c for (la, b), c in _cells(results).items() if la == layer}
    if tcfg is None or not cells:
        return _claim(claim, NOT_TESTED, [f"needs the {task} task and the {layer} layer"])
    metric, sign = _metric(results, task)
    thr = tcfg.get("stop_at") or 0.99
    ev, nums, ok = [], {}, True
    for b, c in sorted(cells.items()):
        s = summary(c, task, metric)
        nums[b] = s
        ok = ok and s is not None and reaches(s["min"], thr, sign)
        ev.append(f"{layer}/{b}: {metric} {_fmt(s)} (threshold {thr:g})")
    return _claim(claim, REPRODUCED if ok else NOT_REPRODUCED, ev, threshold=thr, **{metric: nums})


def _grows_with_state(results: dict, spec: dict) -> dict:
    claim, task = spec["text"], spec["task"]
    tcfg = _task_cfg(results, task)
    if tcfg is None:
        return _claim(claim, NOT_TESTED, [f"needs the {task} task"])
    metric, _ = _metric(results, task)
    thr = tcfg.get("stop_at") or 0.99
    ev, nums, grows, falls, open_ = [], {}, [], [], []
    for (layer, b), c in sorted(_cells(results).items()):
        by_width = c.get("tasks", {}).get(task, {})
        if len(by_width) < 3 or state_grows(layer) is not False:
            continue
        pts = []
        for w in sorted(by_width, key=lambda w: int(w[1:])):
            s = summary(c, task, metric, w)
            run = by_width[w].get("runs", {})
            sizes = [r["state_size"] for r in run.values() if r.get("status") == "ok"]
            if s is not None and sizes:
                pts.append((sizes[0], s["mean"]))
        if len(pts) < 3:
            continue
        key = f"{layer}/{b}"
        nums[key] = pts
        first, last = pts[0][1], pts[-1][1]
        curve = ", ".join(f"{acc:.3f} @ {size:,}" for size, acc in pts)
        if first >= thr:
            ev.append(f"{key}: solved at every state size ({curve})")
            continue
        open_.append(key)
        if last - first > 0.02:
            grows.append(key)
            ev.append(f"{key}: grows, {curve}")
        elif first - last > 0.05:
            falls.append(key)
            ev.append(f"{key}: falls, {curve}")
        else:
            ev.append(f"{key}: flat, {curve}")
    if not nums:
        return _claim(claim, NOT_TESTED, ["needs fixed-state layers at ≥ 3 widths"])
    ok = not falls and bool(open_) and 2 * len(grows) >= len(open_)
    ev.append(
        f"{len(grows)} of {len(open_)} unsolved fixed-state layer curves grow by > 0.02 from the smallest to the "
        f"largest state; {len(falls)} fall by > 0.05 (reproduced: at least half grow and none falls)"
    )
    return _claim(claim, REPRODUCED if ok else NOT_REPRODUCED, ev, curves=nums)


def _equal(results: dict, spec: dict) -> dict:
    claim, (la, lb) = spec["text"], spec["layers"]
    cells = _cells(results)
    ev, nums, ok, tested = [], {}, True, False
    for task, info in task_infos(results).items():
        metric, sign = compared(info)
        tcfg = _task_cfg(results, task)
        if tcfg is None:
            continue
        for b in sorted({bb for _, bb in cells}):
            ca, cb = cells.get((la, b)), cells.get((lb, b))
            if ca is None or cb is None:
                continue
            a, s = summary(ca, task, metric), summary(cb, task, metric)
            if a is None or s is None:
                continue
            tested = True
            verdict = difference(a, s, sign=sign, solved_at=tcfg.get("stop_at") if sign > 0 else None)
            nums[f"{task}/{b}"] = {la: a, lb: s, "verdict": verdict}
            ok = ok and verdict in ("within noise", "both solved")
            ev.append(f"{task} {metric}, {b}: {la} {_fmt(a)} vs {lb} {_fmt(s)}: {verdict}")
    if not tested:
        return _claim(claim, NOT_TESTED, [f"needs {la} and {lb} in the same backbone"])
    return _claim(claim, REPRODUCED if ok else NOT_REPRODUCED, ev, comparisons=nums)


def _gains(cell: dict, task: str) -> tuple[list[float], list[float], float] | None:
    """Per seed: context gain (loss 16–31 − second half) and late gain (third quarter − second half),
    and the seed spread of the loss itself (the larger of its early and late ranges)."""
    _, entry = task_entry(cell, task)
    if not entry or not entry.get("best"):
        return None
    best = entry["best"]
    runs = [entry["runs"][k] for k in entry["runs"] if entry["runs"][k].get("lr") == best["lr"]]
    runs = [r for r in runs if r.get("status") == "ok" and "context_gain" in r["metrics"]]
    if not runs:
        return None
    ctx, late = [], []
    for r in runs:
        pos = r["metrics"]["loss_by_position"]
        T = len(pos)
        q3 = sum(pos[T // 4 : T // 2]) / len(pos[T // 4 : T // 2])
        ctx.append(r["metrics"]["context_gain"])
        late.append(q3 - r["metrics"]["loss_late"])
    spreads = [max(v) - min(v) for v in ([r["metrics"][k] for r in runs] for k in ("loss_early", "loss_late"))]
    return ctx, late, max(spreads)


def _uses_context(results: dict, spec: dict) -> dict:
    claim, layers, task = spec["text"], spec["layers"], spec["task"]
    if _task_cfg(results, task) is None:
        return _claim(claim, NOT_TESTED, [f"needs the {task} task"])
    ev, nums, ok, tested = [], {}, True, False
    for (layer, b), c in sorted(_cells(results).items()):
        g = _gains(c, task) if layer in layers else None
        if g is None:
            continue
        ctx, late, noise = g
        if len(ctx) < 2:
            ev.append(f"{layer}/{b}: one seed so far, no spread to judge by")
            continue
        tested = True
        nums[f"{layer}/{b}"] = {"context_gain": ctx, "late_gain": late, "seed_spread": noise}
        mean = sum(ctx) / len(ctx)
        uses = mean > noise
        ok = ok and uses
        ev.append(
            f"{layer}/{b}: context gain {mean:.3f} nats vs seed spread {noise:.3f}: "
            + ("uses context" if uses else "within noise")
        )
    if not tested:
        return _claim(claim, NOT_TESTED, ev or [f"needs {', '.join(layers)} with ≥ 2 {task} seeds"])
    return _claim(claim, REPRODUCED if ok else NOT_REPRODUCED, ev, gains=nums)


def _plateaus(results: dict, spec: dict) -> dict:
    claim, name, reference, task = spec["text"], spec["layer"], spec["reference"], spec["task"]
    if _task_cfg(results, task) is None:
        return _claim(claim, NOT_TESTED, [f"needs the {task} task"])
    cells = _cells(results)
    ev, nums, ok, tested = [], {}, True, False
    for (layer, b), c in sorted(cells.items()):
        if layer != name:
            continue
        ref = cells.get((reference, b))
        g, gr = _gains(c, task), (_gains(ref, task) if ref is not None else None)
        if g is None or gr is None or len(g[1]) < 2 or len(gr[1]) < 2:
            ev.append(f"{name}/{b}: needs {name} and {reference} in this backbone with ≥ 2 {task} seeds each")
            continue
        tested = True
        rnn_late, att_late = sum(g[1]) / len(g[1]), sum(gr[1]) / len(gr[1])
        noise = max(g[2], gr[2])
        flat = att_late - rnn_late > noise
        ok = ok and flat
        nums[f"{name}/{b}"] = {"late_gain": g[1], f"{reference}_late_gain": gr[1], "seed_spread": noise}
        ev.append(
            f"{name}/{b}: late gain {rnn_late:.3f} nats vs {reference}'s {att_late:.3f}, seed spread "
            f"{noise:.3f}: " + ("plateaus first" if flat else "no difference beyond noise")
        )
    if not tested:
        return _claim(claim, NOT_TESTED, ev or [f"needs {name} and {reference} with ≥ 2 {task} seeds"])
    return _claim(claim, REPRODUCED if ok else NOT_REPRODUCED, ev, gains=nums)


#: a change of perplexity in the paper's table smaller than this fraction counts as within noise (the
#: table reports one run per row: 15.23 -> 15.27 for a learnable W0 is not a finding)
PAPER_NOISE = 0.01


def _paper_change(before: float, after: float) -> str:
    if abs(after - before) < PAPER_NOISE * before:
        return "within noise"
    return "improved" if after < before else "worse"


def ladder_steps(results: dict, spec: dict | None = None) -> list[dict]:
    """For a ``variants`` preset (the ablation ladder): each row's ``metric`` (bits/byte) and its change
    from the row before (improved / worse / within noise), beside the paper's perplexity and its
    direction. ``spec``: the preset's ``ladder`` claim (default: the run's)."""
    spec = spec or next((c for c in claim_specs(results) if c["kind"] == "ladder"), None)
    if spec is None:
        return []
    paper_ppl, task, metric = spec["paper_perplexity"], spec["task"], spec["metric"]
    names = [v["name"] for v in results["run_config"]["preset_config"].get("variants") or []]
    cells = {c.get("variant"): c for c in results["cells"].values()}
    rows, prev = [], None
    for i, name in enumerate(names):
        c = cells.get(name)
        s = summary(c, task, metric) if c else None
        paper = paper_ppl[i] if i < len(paper_ppl) else None
        row = {"name": name, "bits_per_byte": s, "paper_perplexity": paper}
        if prev is not None and s is not None and prev[0] is not None:
            row["change"] = {"better": "improved", "worse": "worse"}.get(
                difference(s, prev[0], sign=-1.0), "within noise"
            )
            if paper is not None and prev[1] is not None:
                row["paper_change"] = _paper_change(prev[1], paper)
        rows.append(row)
        prev = (s, paper)
    return rows


def _ladder(results: dict, spec: dict) -> dict:
    rows = ladder_steps(results, spec)
    agree = [r for r in rows if "change" in r and "paper_change" in r]
    same = [r for r in agree if r["change"] == r["paper_change"]]
    ev = [
        f"{r['name']}: {_fmt(r['bits_per_byte'])} bits/byte, {r.get('change', '—')} "
        f"(paper: {r.get('paper_change', '—')}, perplexity {r['paper_perplexity']})"
        for r in rows
    ]
    verdict = NOT_TESTED if not agree else (REPRODUCED if len(same) == len(agree) else NOT_REPRODUCED)
    ev.append(f"{len(same)} of {len(agree)} steps move as in the paper")
    return _claim(spec["text"], verdict, ev, rows=rows)


#: the function that evaluates each kind of claim
KINDS = {"solves": _solves, "grows_with_state": _grows_with_state, "equal": _equal, "uses_context": _uses_context,
         "plateaus": _plateaus, "ladder": _ladder}


def claim_specs(results: dict) -> list[dict]:
    """The claims a run checks: its preset's ``claims`` (a results file from before claims were data:
    the preset of that name today)."""
    from .presets import PRESETS

    cfg = results["run_config"]["preset_config"]
    if "claims" in cfg:
        return cfg["claims"]
    return PRESETS.get(results["run_config"].get("preset"), {}).get("claims", [])


def evaluate_claims(results: dict) -> list[dict]:
    """The verdicts of every claim the run's preset lists (see the module docstring)."""
    out = []
    for spec in claim_specs(results):
        if spec.get("kind") not in KINDS:
            out.append(_claim(spec.get("text", str(spec)), NOT_TESTED, [f"unknown kind of claim {spec.get('kind')!r}; "
                                                                         f"known: {', '.join(KINDS)}"]))
            continue
        out.append(KINDS[spec["kind"]](results, spec))
    return out


def pairwise(results: dict, task: str, metric: str, sign: float) -> dict[str, list[tuple[str, str, str, bool]]]:
    """By backbone: every pair of cells on ``task`` at their largest width, how they differ, and whether
    either rests on one seed."""
    tcfg = _task_cfg(results, task) or {}
    solved = tcfg.get("stop_at") if sign > 0 else None
    out: dict[str, list[tuple[str, str, str, bool]]] = {}
    for b in results["run_config"]["backbones"]:
        cells = [(cell_name(c), summary(c, task, metric)) for c in results["cells"].values() if c["backbone"] == b]
        cells = sorted([(n, s) for n, s in cells if s is not None], key=lambda x: -sign * x[1]["mean"])
        pairs = []
        for i, (na, a) in enumerate(cells):
            for nb, bb in cells[i + 1 :]:
                single = a["n"] < 2 or bb["n"] < 2
                pairs.append((na, nb, difference(a, bb, sign=sign, solved_at=solved), single))
        out[b] = pairs
    return out
