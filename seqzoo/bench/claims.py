"""What a comparison reproduces: known claims checked against the run's own numbers, and noise verdicts.

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
from .tasks import reaches, task_infos

__all__ = ["evaluate_claims", "difference", "summary", "state_grows", "ladder_steps", "CONTEXT_LAYERS"]

#: the layers of the claim "attention and TTT layers use context" (those registered and run)
CONTEXT_LAYERS = ("self_attention", "ttt_nw", "ttt_linear", "ttt_mlp")
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


def _attention_solves(results: dict) -> dict:
    claim = "softmax attention solves MQAR (≥ the solve threshold in every backbone)"
    mq = _task_cfg(results, "mqar")
    cells = {b: c for (la, b), c in _cells(results).items() if la == "self_attention"}
    if mq is None or not cells:
        return _claim(claim, NOT_TESTED, ["needs the mqar task and the self_attention layer"])
    thr = mq.get("stop_at") or 0.99
    ev, nums, ok = [], {}, True
    for b, c in sorted(cells.items()):
        s = summary(c, "mqar", "accuracy")
        nums[b] = s
        ok = ok and s is not None and s["min"] >= thr
        ev.append(f"self_attention/{b}: accuracy {_fmt(s)} (threshold {thr:g})")
    return _claim(claim, REPRODUCED if ok else NOT_REPRODUCED, ev, threshold=thr, accuracy=nums)


def _grows_with_state(results: dict) -> dict:
    claim = "MQAR accuracy grows with state size for the fixed-state layers"
    mq = _task_cfg(results, "mqar")
    if mq is None:
        return _claim(claim, NOT_TESTED, ["needs the mqar task"])
    thr = mq.get("stop_at") or 0.99
    ev, nums, grows, falls, open_ = [], {}, [], [], []
    for (layer, b), c in sorted(_cells(results).items()):
        by_width = c.get("tasks", {}).get("mqar", {})
        if len(by_width) < 3 or state_grows(layer) is not False:
            continue
        pts = []
        for w in sorted(by_width, key=lambda w: int(w[1:])):
            s = summary(c, "mqar", "accuracy", w)
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


def _theorem2(results: dict) -> dict:
    claim = "ttt_nw equals self_attention (Theorem 2): the same results within noise"
    cells = _cells(results)
    ev, nums, ok, tested = [], {}, True, False
    for task, info in task_infos(results).items():
        metric, sign = info["columns"][0][0], info["score_sign"]
        tcfg = _task_cfg(results, task)
        if tcfg is None:
            continue
        for b in sorted({bb for _, bb in cells}):
            nw, sa = cells.get(("ttt_nw", b)), cells.get(("self_attention", b))
            if nw is None or sa is None:
                continue
            a, s = summary(nw, task, metric), summary(sa, task, metric)
            if a is None or s is None:
                continue
            tested = True
            verdict = difference(a, s, sign=sign, solved_at=tcfg.get("stop_at") if sign > 0 else None)
            nums[f"{task}/{b}"] = {"ttt_nw": a, "self_attention": s, "verdict": verdict}
            ok = ok and verdict in ("within noise", "both solved")
            ev.append(f"{task} {metric}, {b}: ttt_nw {_fmt(a)} vs self_attention {_fmt(s)}: {verdict}")
    if not tested:
        return _claim(claim, NOT_TESTED, ["needs ttt_nw and self_attention in the same backbone"])
    return _claim(claim, REPRODUCED if ok else NOT_REPRODUCED, ev, comparisons=nums)


def _gains(cell: dict) -> tuple[list[float], list[float], float] | None:
    """Per seed: context gain (loss 16–31 − second half) and late gain (third quarter − second half),
    and the seed spread of the loss itself (the larger of its early and late ranges)."""
    _, entry = task_entry(cell, "lm")
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


def _uses_context(results: dict) -> dict:
    claim = (
        "attention and TTT layers use context: LM loss at positions 16–31 above that over the window's "
        "second half by more than the seed spread"
    )
    if _task_cfg(results, "lm") is None:
        return _claim(claim, NOT_TESTED, ["needs the lm task"])
    ev, nums, ok, tested = [], {}, True, False
    for (layer, b), c in sorted(_cells(results).items()):
        g = _gains(c) if layer in CONTEXT_LAYERS else None
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
        return _claim(claim, NOT_TESTED, ev or [f"needs {', '.join(CONTEXT_LAYERS)} with ≥ 2 LM seeds"])
    return _claim(claim, REPRODUCED if ok else NOT_REPRODUCED, ev, gains=nums)


def _rnn_plateaus(results: dict) -> dict:
    claim = (
        "the naive RNN's loss plateaus where attention's still falls: from the window's third quarter to its "
        "second half the RNN gains less than self_attention in the same backbone, by more than the seed "
        "spread (relative to attention, so that the data's own change of difficulty with position cancels)"
    )
    if _task_cfg(results, "lm") is None:
        return _claim(claim, NOT_TESTED, ["needs the lm task"])
    cells = _cells(results)
    ev, nums, ok, tested = [], {}, True, False
    for (layer, b), c in sorted(cells.items()):
        if layer != "rnn":
            continue
        ref = cells.get(("self_attention", b))
        g, gr = _gains(c), (_gains(ref) if ref is not None else None)
        if g is None or gr is None or len(g[1]) < 2 or len(gr[1]) < 2:
            ev.append(f"rnn/{b}: needs rnn and self_attention in this backbone with ≥ 2 LM seeds each")
            continue
        tested = True
        rnn_late, att_late = sum(g[1]) / len(g[1]), sum(gr[1]) / len(gr[1])
        noise = max(g[2], gr[2])
        flat = att_late - rnn_late > noise
        ok = ok and flat
        nums[f"rnn/{b}"] = {"late_gain": g[1], "self_attention_late_gain": gr[1], "seed_spread": noise}
        ev.append(
            f"rnn/{b}: late gain {rnn_late:.3f} nats vs self_attention's {att_late:.3f}, seed spread "
            f"{noise:.3f}: " + ("plateaus first" if flat else "no difference beyond noise")
        )
    if not tested:
        return _claim(claim, NOT_TESTED, ev or ["needs rnn and self_attention with ≥ 2 LM seeds"])
    return _claim(claim, REPRODUCED if ok else NOT_REPRODUCED, ev, gains=nums)


#: a change of perplexity in the paper's table smaller than this fraction counts as within noise (the
#: table reports one run per row: 15.23 -> 15.27 for a learnable W0 is not a finding)
PAPER_NOISE = 0.01


def _paper_change(before: float, after: float) -> str:
    if abs(after - before) < PAPER_NOISE * before:
        return "within noise"
    return "improved" if after < before else "worse"


def ladder_steps(results: dict) -> list[dict]:
    """For a ``variants`` preset (the ablation ladder): each row's bits/byte and its change from the row
    before (improved / worse / within noise), beside the paper's perplexity and its direction."""
    from .presets import LADDER_PAPER_PERPLEXITY

    names = [v["name"] for v in results["run_config"]["preset_config"].get("variants") or []]
    cells = {c.get("variant"): c for c in results["cells"].values()}
    rows, prev = [], None
    for i, name in enumerate(names):
        c = cells.get(name)
        s = summary(c, "lm", "bits_per_byte") if c else None
        paper = LADDER_PAPER_PERPLEXITY[i] if i < len(LADDER_PAPER_PERPLEXITY) else None
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


def evaluate_claims(results: dict) -> list[dict]:
    """The verdicts of every known claim this run can check (see the module docstring)."""
    if results["run_config"]["preset_config"].get("variants"):
        rows = ladder_steps(results)
        agree = [r for r in rows if "change" in r and "paper_change" in r]
        same = [r for r in agree if r["change"] == r["paper_change"]]
        ev = [
            f"{r['name']}: {_fmt(r['bits_per_byte'])} bits/byte, {r.get('change', '—')} "
            f"(paper: {r.get('paper_change', '—')}, perplexity {r['paper_perplexity']})"
            for r in rows
        ]
        verdict = NOT_TESTED if not agree else (REPRODUCED if len(same) == len(agree) else NOT_REPRODUCED)
        ev.append(f"{len(same)} of {len(agree)} steps move as in the paper")
        return [_claim("each step of the TTT paper's ablation ladder moves perplexity as in Table 1", verdict, ev,
                       rows=rows)]
    return [
        _attention_solves(results),
        _grows_with_state(results),
        _theorem2(results),
        _uses_context(results),
        _rnn_plateaus(results),
    ]


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
