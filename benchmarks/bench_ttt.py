"""TTT-Linear / TTT-MLP speed and memory, seqzoo against the official algorithm on the same weights.

    python benchmarks/bench_ttt.py [--quick] [--json results.json]

At 125M widths (d_model 768, 12 heads, mini-batch 16, batch 1, fp32) it measures, in one run:

- prefill: seqzoo ``ttt_linear`` / ``ttt_mlp`` ``forward`` vs ``official_ttt`` (a port of ttt-lm-pytorch's
  algorithm: Python loop over mini-batches, dual form inside) for T in {1024, 4096, 16384}; µs/token,
  the ratio seqzoo / official, and the per-token time at the longest T over the shortest;
- decode: seqzoo ``step`` per token at positions 64 and 8192 (over one whole mini-batch of steps, the two
  positions in turn, 21 repeats);
- achieved GFLOP/s of the TTT-Linear forward from the layer's ``flops(T)`` (analytic, the official algorithm's) as a
  fraction of the fp32 matmul peak measured in the same run (2048² @ 2048², median of repeats);
- a training step (forward then ``y.sum().backward()``) at T = 2048: seqzoo through its written backward,
  seqzoo through autograd's record of the mini-batch loop (the path before it), the official algorithm
  under autograd, seqzoo's no-grad forward and the four projections alone, in turn;
- peak memory of prefill (RSS high-water mark above the after-setup baseline, one fresh subprocess per
  measurement) for each T, and of training (forward + backward) at T = 8192 with and without
  ``scan_checkpoint_group_size``.

Timings are medians of repeats after warm-up, with quartiles; everything a ratio compares is called in
turn within each repeat (both implementations at every length; the decode positions), so load from
other processes and the machine's drift hit both sides alike. ``--quick`` runs tiny sizes
in seconds (a smoke run; its ratios mean little).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from official_ttt import make_official  # noqa: E402

from seqzoo.bench import speed  # noqa: E402

HERE = Path(__file__).resolve()

FULL = dict(
    d_model=768,
    num_heads=12,
    mini_batch_size=16,
    lengths=[1024, 4096, 16384],
    ratio_T=4096,
    decode_positions=[64, 8192],
    decode_repeats=21,
    train_T=8192,
    train_group=4,
    step_T=2048,
    repeats=3,
    memory_lengths=[1024, 4096, 16384],
    peak_n=2048,
)
QUICK = dict(
    d_model=64,
    num_heads=4,
    mini_batch_size=16,
    lengths=[128, 512],
    ratio_T=512,
    decode_positions=[16, 256],
    decode_repeats=3,
    train_T=512,
    train_group=4,
    step_T=256,
    repeats=3,
    memory_lengths=[256, 1024],
    peak_n=512,
)

GOALS = {
    "prefill_ratio": 0.5,  # seqzoo ttt_linear forward / official at ratio_T
    "per_token_growth": 1.3,  # per-token time at the longest T / shortest T
    "decode_growth": 1.3,  # decode per token at the last position / the first
    "decode_ms": 0.5,  # ttt_linear decode, ms per token
    "fraction_of_peak": 0.40,  # TTT-Linear forward GFLOP/s / fp32 matmul peak
    "train_memory_mb": 4096.0,  # forward + backward at train_T with checkpointing
    "train_ratio_linear": 0.25,  # ttt_linear forward + backward / official's, at step_T
    "train_ratio_mlp": 0.5,  # ttt_mlp forward + backward / official's, at step_T
    "train_over_forward": 4.0,  # forward + backward / the layer's own no-grad forward
}


# --- measuring ---------------------------------------------------------------------------------------


#: the clock of every timing: wall time, or this process's CPU time (``--clock cpu``), which other
#: processes' load hardly changes; with one thread the two agree on an idle machine
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def set_clock(name: str) -> None:
    """Use the ``"wall"`` or ``"cpu"`` clock for every later timing."""
    global clock
    clock = CLOCKS[name]


def time_in_turn(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Time each function ``repeats`` times after ``warmup`` calls, calling them in turn every round, on
    this run's clock."""
    return speed.time_in_turn(fns, repeats=repeats, warmup=warmup, clock=clock)


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """fp32 GFLOP/s of an n×n @ n×n matmul: median and best of ``repeats`` after warm-up, on this run's clock."""
    return speed.matmul_peak_stats(n=n, repeats=repeats, clock=clock)


def flops_per_token(kind: str, cfg: dict) -> tuple[float, str]:
    """FLOPs per token of ``ttt_<kind>``'s forward at the benchmark's widths, and the formula: the layer's
    own count (``flops(T)``: the official algorithm's matmuls, checked against torch's FLOP counter in
    test_bench_speed_smoke.py), from a whole number of mini-batches."""
    import seqzoo
    from seqzoo.bench.speed import layer_flops

    with torch.device("meta"):
        layer = seqzoo.create_layer(f"ttt_{kind}", cfg["d_model"], num_heads=cfg["num_heads"],
                                    mini_batch_size=cfg["mini_batch_size"])
    T = cfg["mini_batch_size"]
    flops, formula = layer_flops(layer, T)
    return flops / T, formula


#: the inner learning rate of each layer (seqzoo's defaults), passed explicitly to both implementations
BASE_LR = {"linear": 1.0, "mlp": 0.1}


def seqzoo_layer(kind: str, cfg: dict, **extra):
    """seqzoo's ``ttt_<kind>`` at the benchmark's widths, or None with the reason when it is unavailable."""
    import seqzoo

    name = f"ttt_{kind}"
    if name not in seqzoo.list_layers():
        return None, f"{name} is not registered"
    try:
        layer = seqzoo.create_layer(
            name,
            cfg["d_model"],
            num_heads=cfg["num_heads"],
            mini_batch_size=cfg["mini_batch_size"],
            ttt_base_lr=BASE_LR[kind],
            **extra,
        )
    except Exception as exc:  # noqa: BLE001 - reported in the results, the run goes on
        return None, f"create_layer({name!r}) failed: {type(exc).__name__}: {exc}"
    return layer, None


def build_pair(kind: str, cfg: dict, seed: int = 0):
    """(official, seqzoo layer or None, reason) with seqzoo's layer holding the official one's weights."""
    torch.manual_seed(seed)
    official = make_official(
        kind,
        hidden_size=cfg["d_model"],
        num_heads=cfg["num_heads"],
        mini_batch_size=cfg["mini_batch_size"],
        ttt_base_lr=BASE_LR[kind],
    ).eval()
    ours, why = seqzoo_layer(kind, cfg)
    if ours is not None:
        try:
            ours.load_state_dict(official.state_dict(), strict=True)
        except Exception as exc:  # noqa: BLE001
            return official, None, f"official state_dict does not load into ttt_{kind}: {exc}"
        ours.eval()
    return official, ours, why


def _forward(module) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> y for either interface (the anchor returns y, seqzoo layers return (y, state))."""

    def run(x):
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    return run


# --- the sections ------------------------------------------------------------------------------------


def progress(message: str) -> None:
    """One line of progress on stderr (the results go to stdout and --json)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_prefill(kind: str, cfg: dict, official, ours, peak: float | None) -> list[dict]:
    """Prefill time per T for both implementations: every (T, implementation) called in turn within each
    repeat, so that both ratios — seqzoo / official and the per-token time at the longest T / the
    shortest — hold when the machine's speed drifts during the run."""
    rows = []
    per_token = flops_per_token(kind, cfg)[0]
    impls = {"official": official} if ours is None else {"official": official, "seqzoo": ours}
    fns = {}
    for T in cfg["lengths"]:
        x = torch.randn(1, T, cfg["d_model"], generator=torch.Generator().manual_seed(T))
        for impl, module in impls.items():
            fns[(T, impl)] = lambda x=x, module=module: _forward(module)(x)
    err = None
    with torch.no_grad():
        if ours is not None:  # same weights, same function: checked once, at the shortest T
            T0 = cfg["lengths"][0]
            x = torch.randn(1, T0, cfg["d_model"], generator=torch.Generator().manual_seed(T0))
            want = _forward(official)(x)
            err = ((_forward(ours)(x) - want).abs().max() / want.abs().max()).item()
        progress(f"prefill ttt_{kind} T={cfg['lengths']}: {cfg['repeats']} rounds after a warm-up, in turn")
        res = time_in_turn(fns, repeats=cfg["repeats"], warmup=1)
    for T in cfg["lengths"]:
        for impl in impls:
            t = res[(T, impl)]
            row = {
                "layer": f"ttt_{kind}",
                "impl": impl,
                "T": T,
                "seconds": t,
                "us_per_token": 1e6 * t["median"] / T,
                "gflops": per_token * T / t["median"] / 1e9,
            }
            if peak:
                row["fraction_of_peak"] = row["gflops"] / peak
            rows.append(row)
        if ours is not None:
            rows[-1]["ratio_vs_official"] = res[(T, "seqzoo")]["median"] / res[(T, "official")]["median"]
            if T == cfg["lengths"][0]:
                rows[-1]["rel_err_vs_official"] = err
    return rows


def bench_train(kind: str, cfg: dict, official, ours) -> list[dict]:
    """A training step's layer work at step_T: forward then ``y.sum().backward()``, called in turn within
    each repeat — seqzoo through its written backward, seqzoo through autograd's record of the mini-batch
    loop (the path before the written backward), the official algorithm under autograd, seqzoo's no-grad
    forward, and the four C×C projections alone (q, k, v, o forward + backward: a floor every
    implementation pays)."""
    from seqzoo_plugins.ttt import scan_grad

    T, C = cfg["step_T"], cfg["d_model"]
    x = torch.randn(1, T, C, generator=torch.Generator().manual_seed(T))
    official.train()
    ours.train()

    def step(module):
        def run():
            xx = x.clone().requires_grad_()
            _forward(module)(xx).sum().backward()
        return run

    def autograd_loop():
        written = scan_grad.applies
        scan_grad.applies = lambda *tensors: False
        try:
            step(ours)()
        finally:
            scan_grad.applies = written

    def forward():
        with torch.no_grad():
            _forward(ours)(x)

    weights = [getattr(ours, n).weight.detach().clone().requires_grad_() for n in ("q_proj", "k_proj", "v_proj", "o_proj")]

    def projections():
        xx = x.clone().requires_grad_()
        sum(torch.nn.functional.linear(xx, w).sum() for w in weights).backward()

    fns = {"seqzoo": step(ours), "seqzoo_autograd_loop": autograd_loop, "official": step(official),
           "seqzoo_forward_no_grad": forward, "projections": projections}
    progress(f"train step ttt_{kind} T={T}: {cfg['repeats']} rounds after a warm-up, in turn")
    res = time_in_turn(fns, repeats=cfg["repeats"], warmup=1)
    official.eval()
    ours.eval()
    med = {k: v["median"] for k, v in res.items()}
    return [{"layer": f"ttt_{kind}", "T": T, "seconds": res,
             "ratio_vs_official": med["seqzoo"] / med["official"],
             "autograd_loop_ratio_vs_official": med["seqzoo_autograd_loop"] / med["official"],
             "over_forward": med["seqzoo"] / med["seqzoo_forward_no_grad"],
             "projections_ratio_vs_official": med["projections"] / med["official"]}]


def bench_decode(kind: str, cfg: dict, ours) -> list[dict]:
    """seqzoo ``step`` per token from the state after P tokens, over one whole mini-batch of steps (one
    commit of W̄ each); the positions are timed in turn within each repeat, so a slow phase of the
    machine hits them alike and their ratio holds."""
    steps = cfg["mini_batch_size"]
    runs = {}
    for P in cfg["decode_positions"]:
        progress(f"decode ttt_{kind} position {P}: prefill")
        x = torch.randn(1, P + steps, cfg["d_model"], generator=torch.Generator().manual_seed(P))
        with torch.no_grad():
            _, state0 = ours(x[:, :P])

        def run(state=state0, tokens=x[:, P:], decoder=ours.decoder(x.shape[0])):
            with torch.no_grad():
                for t in range(steps):
                    _, state = decoder.step(tokens[:, t], state)

        runs[P] = run
    # the floor beside them: the step's weight mat-vecs alone (q, k, v, o of one token), which read
    # 4·C² floats per token (9.4 MB at 768: from L3, as in the step) whatever the layer does between them
    weights = [ours.get_submodule(n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    row = torch.randn(1, cfg["d_model"])

    def matvecs():
        with torch.no_grad():
            for _ in range(steps):
                for w in weights:
                    torch.nn.functional.linear(row, w)

    runs["matvecs"] = matvecs
    progress(f"decode ttt_{kind}: {cfg['decode_repeats']} repeats of {steps} steps at each position, in turn")
    times = time_in_turn(runs, repeats=cfg["decode_repeats"], warmup=2)
    floor = 1e3 * times.pop("matvecs")["median"] / steps
    return [
        {
            "layer": f"ttt_{kind}",
            "position": P,
            "steps": steps,
            "seconds": t,
            "ms_per_token": 1e3 * t["median"] / steps,
            "matvecs_ms_per_token": floor,
        }
        for P, t in times.items()
    ]


def memory_probe(spec: dict) -> dict:
    """Run one memory measurement in a fresh subprocess; returns its JSON (or an error)."""
    progress(
        f"memory {spec['impl']} ttt_{spec['kind']} {spec['mode']} T={spec['T']} group={spec.get('group', 0)}"
    )
    cmd = [sys.executable, str(HERE), "--memory-probe", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {**spec, "error": tail[0][:300]}
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _probe_main(spec: dict) -> dict:
    """Inside the subprocess: build, set up, record the RSS high-water mark, run, record it again."""
    cfg = spec["cfg"]
    torch.manual_seed(0)
    if spec["impl"] == "official":
        layer = make_official(
            spec["kind"],
            hidden_size=cfg["d_model"],
            num_heads=cfg["num_heads"],
            mini_batch_size=cfg["mini_batch_size"],
            scan_checkpoint_group_size=spec.get("group", 0),
            ttt_base_lr=BASE_LR[spec["kind"]],
        )
    else:
        extra = {"scan_checkpoint_group_size": spec["group"]} if spec.get("group") else {}
        layer, why = seqzoo_layer(spec["kind"], cfg, **extra)
        if layer is None:
            raise RuntimeError(why)
    train = spec["mode"] == "train"
    layer.train(train)
    x = torch.randn(1, spec["T"], cfg["d_model"], requires_grad=train)
    # warm-up on one mini-batch so that one-off allocations are part of the baseline
    with torch.no_grad():
        _forward(layer)(x[:, : cfg["mini_batch_size"]].detach())
    t0 = time.perf_counter()
    with speed.PeakRSS() as m:
        if train:
            y = _forward(layer)(x)
            y.square().mean().backward()
        else:
            with torch.no_grad():
                _forward(layer)(x)
    seconds = time.perf_counter() - t0
    return {"peak_mb": m.peak_mb, "baseline_mb": m.baseline_mb, "seconds": seconds, "peak_source": m.source}


def bench_memory(cfg: dict, have: dict[str, bool]) -> list[dict]:
    """Peak prefill memory per T (both implementations), and training memory at train_T."""
    rows = []
    for kind in ("linear", "mlp"):
        for T in cfg["memory_lengths"]:
            for impl in ("official", "seqzoo"):
                if impl == "seqzoo" and not have[kind]:
                    continue
                r = memory_probe({"cfg": cfg, "kind": kind, "impl": impl, "mode": "prefill", "T": T})
                if "peak_mb" in r:
                    r["bytes_per_token"] = r["peak_mb"] * 2**20 / T
                rows.append(r)
    for impl, group in (("seqzoo", cfg["train_group"]), ("seqzoo", 0), ("official", 0)):
        if impl == "seqzoo" and not have["linear"]:
            continue
        rows.append(
            memory_probe(
                {
                    "cfg": cfg,
                    "kind": "linear",
                    "impl": impl,
                    "mode": "train",
                    "T": cfg["train_T"],
                    "group": group,
                }
            )
        )
    return rows


# --- report ------------------------------------------------------------------------------------------


def _pick(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def evaluate(cfg: dict, prefill: list[dict], decode: list[dict], memory: list[dict],
             train: list[dict] | None = None) -> list[dict]:
    """Each goal: measured value, target, met (None when it could not be measured)."""
    goals = []

    def goal(name, value, target, better, note=""):
        met = None if value is None else (value <= target if better == "lower" else value >= target)
        goals.append(
            {"goal": name, "value": value, "target": target, "better": better, "met": met, "note": note}
        )

    T0, T1, Tr = cfg["lengths"][0], cfg["lengths"][-1], cfg["ratio_T"]
    for kind in ("linear", "mlp"):
        r = _pick(prefill, layer=f"ttt_{kind}", impl="seqzoo", T=Tr)
        goal(
            f"ttt_{kind} prefill time / official at T={Tr}",
            r[0].get("ratio_vs_official") if r else None,
            GOALS["prefill_ratio"],
            "lower",
        )
        a, b = (
            _pick(prefill, layer=f"ttt_{kind}", impl="seqzoo", T=T0),
            _pick(prefill, layer=f"ttt_{kind}", impl="seqzoo", T=T1),
        )
        goal(
            f"ttt_{kind} per-token time T={T1} / T={T0}",
            b[0]["us_per_token"] / a[0]["us_per_token"] if a and b else None,
            GOALS["per_token_growth"],
            "lower",
        )
        P0, P1 = cfg["decode_positions"][0], cfg["decode_positions"][-1]
        a, b = (
            _pick(decode, layer=f"ttt_{kind}", position=P0),
            _pick(decode, layer=f"ttt_{kind}", position=P1),
        )
        goal(
            f"ttt_{kind} decode per token at {P1} / at {P0}",
            b[0]["ms_per_token"] / a[0]["ms_per_token"] if a and b else None,
            GOALS["decode_growth"],
            "lower",
        )
    d = _pick(decode, layer="ttt_linear")
    goal(
        "ttt_linear decode ms/token (worst position)",
        max(r["ms_per_token"] for r in d) if d else None,
        GOALS["decode_ms"],
        "lower",
    )
    r = _pick(prefill, layer="ttt_linear", impl="seqzoo", T=Tr)
    goal(
        f"ttt_linear prefill GFLOP/s / fp32 matmul peak at T={Tr}",
        r[0].get("fraction_of_peak") if r else None,
        GOALS["fraction_of_peak"],
        "higher",
    )
    r = [m for m in _pick(memory, mode="train", impl="seqzoo") if m.get("group")]
    goal(
        f"ttt_linear forward+backward peak MB at T={cfg['train_T']}, checkpointed",
        r[0].get("peak_mb") if r else None,
        GOALS["train_memory_mb"],
        "lower",
        r[0].get("error", "") if r else "",
    )
    for kind in ("linear", "mlp"):
        r = _pick(train or [], layer=f"ttt_{kind}")
        goal(f"ttt_{kind} forward+backward / official's at T={cfg['step_T']}",
             r[0]["ratio_vs_official"] if r else None, GOALS[f"train_ratio_{kind}"], "lower",
             f"the projections alone: {r[0]['projections_ratio_vs_official']:.2f}" if r else "")
        goal(f"ttt_{kind} forward+backward / its no-grad forward at T={cfg['step_T']}",
             r[0]["over_forward"] if r else None, GOALS["train_over_forward"], "lower")
    for kind in ("linear", "mlp"):
        m = sorted(_pick(memory, mode="prefill", impl="seqzoo", kind=kind), key=lambda r: r["T"])
        m = [r for r in m if "peak_mb" in r]
        if len(m) >= 2:
            growth = (
                (m[-1]["peak_mb"] / m[0]["peak_mb"]) / (m[-1]["T"] / m[0]["T"])
                if m[0]["peak_mb"] > 0
                else None
            )
            goal(
                f"ttt_{kind} prefill memory growth vs linear in T (≤ 1.3 means at most linear)",
                growth,
                1.3,
                "lower",
            )
    return goals


def _fmt_t(t: dict) -> str:
    return f"{t['median'] * 1e3:9.1f} ms [{t['q1'] * 1e3:.1f}–{t['q3'] * 1e3:.1f}]"


def report(result: dict) -> str:
    """The tables as plain text."""
    lines = []
    peak = result["matmul_peak"]
    lines.append(
        f"fp32 matmul peak ({peak['n']}²): {result['peak_gflops']:.1f} GFLOP/s "
        f"(start {peak['gflops_median']:.1f}, end {result['matmul_peak_end']['gflops_median']:.1f}); "
        f"threads {result['machine']['threads']}, clock {result['config'].get('clock', 'wall')}"
    )
    lines.append("")
    lines.append(
        f"{'prefill':<12}{'impl':<10}{'T':>7}  {'median [q1–q3]':<28}{'µs/tok':>8}{'GFLOP/s':>9}"
        f"{'%peak':>7}{'ratio':>7}"
    )
    for r in result["prefill"]:
        ratio = f"{r['ratio_vs_official']:.2f}" if "ratio_vs_official" in r else ""
        note = f"  (max rel. difference {r['rel_err_vs_official']:.1e})" if "rel_err_vs_official" in r else ""
        frac = f"{100 * r['fraction_of_peak']:.0f}" if "fraction_of_peak" in r else ""
        lines.append(
            f"{r['layer']:<12}{r['impl']:<10}{r['T']:>7}  {_fmt_t(r['seconds']):<28}"
            f"{r['us_per_token']:>8.1f}{r['gflops']:>9.1f}{frac:>7}{ratio:>7}{note}"
        )
    if result["decode"]:
        lines.append("")
        lines.append(f"{'decode':<12}{'position':>9}  {'ms/token':>9}  {'q/k/v/o mat-vecs alone':>23}")
        for r in result["decode"]:
            floor = f"{r['matvecs_ms_per_token']:.3f}" if "matvecs_ms_per_token" in r else ""
            lines.append(f"{r['layer']:<12}{r['position']:>9}  {r['ms_per_token']:>9.3f}  {floor:>23}")
    if result.get("train"):
        lines.append("")
        lines.append(f"{'train step':<12}{'T':>6}  {'seqzoo':>9}{'autograd loop':>15}{'official':>10}{'no-grad fwd':>13}"
                     f"{'projections':>13}{'ratio':>7}{'/fwd':>6}")
        for r in result["train"]:
            t = {k: v["median"] * 1e3 for k, v in r["seconds"].items()}
            lines.append(f"{r['layer']:<12}{r['T']:>6}  {t['seqzoo']:>9.1f}{t['seqzoo_autograd_loop']:>15.1f}"
                         f"{t['official']:>10.1f}{t['seqzoo_forward_no_grad']:>13.1f}{t['projections']:>13.1f}"
                         f"{r['ratio_vs_official']:>7.2f}{r['over_forward']:>6.2f}")
    if result["memory"]:
        lines.append("")
        lines.append(
            f"{'memory':<12}{'impl':<10}{'mode':<9}{'T':>7}{'group':>6}{'peak MB':>10}{'B/token':>10}"
        )
        for r in result["memory"]:
            peak_mb = f"{r['peak_mb']:.1f}" if "peak_mb" in r else "error"
            bpt = f"{r['bytes_per_token']:.0f}" if "bytes_per_token" in r else ""
            lines.append(
                f"ttt_{r['kind']:<8}{r['impl']:<10}{r['mode']:<9}{r['T']:>7}{r.get('group', 0):>6}"
                f"{peak_mb:>10}{bpt:>10}" + (f"  {r['error']}" if "error" in r else "")
            )
    lines.append("")
    for g in result["goals"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        value = "—" if g["value"] is None else f"{g['value']:.3g}"
        sign = "≤" if g["better"] == "lower" else "≥"
        lines.append(f"  [{mark:>12}] {g['goal']}: {value} (goal {sign} {g['target']:g})")
    for kind, why in result["unavailable"].items():
        lines.append(f"  seqzoo ttt_{kind}: {why}")
    return "\n".join(lines)


def run(cfg: dict, *, sections: set[str]) -> dict:
    """Every section of the benchmark; returns the result dict (also what ``--json`` writes)."""
    result: dict[str, Any] = {
        "benchmark": "bench_ttt",
        "config": cfg,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor(),
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
        },
        "goals_targets": GOALS,
        "prefill": [],
        "decode": [],
        "train": [],
        "memory": [],
        "unavailable": {},
        "flops_formula": {f"ttt_{kind}": flops_per_token(kind, cfg)[1] for kind in ("linear", "mlp")},
    }
    result["matmul_peak"] = matmul_peak(cfg["peak_n"])
    pairs = {}
    for kind in ("linear", "mlp"):
        official, ours, why = build_pair(kind, cfg)
        pairs[kind] = (official, ours)
        if why:
            result["unavailable"][kind] = why
    peak_now = result["matmul_peak"]["gflops_median"]
    for kind in ("linear", "mlp"):
        official, ours = pairs[kind]
        if "prefill" in sections:
            result["prefill"] += bench_prefill(kind, cfg, official, ours, peak_now)
        if "decode" in sections and ours is not None:
            result["decode"] += bench_decode(kind, cfg, ours)
        if "train" in sections and ours is not None:
            result["train"] += bench_train(kind, cfg, official, ours)
    result["matmul_peak_end"] = matmul_peak(cfg["peak_n"])
    # the larger of the two peak measurements: the fraction of peak is then a lower bound
    result["peak_gflops"] = max(
        result["matmul_peak"]["gflops_median"], result["matmul_peak_end"]["gflops_median"]
    )
    for r in result["prefill"]:
        r["fraction_of_peak"] = r["gflops"] / result["peak_gflops"]
    if "memory" in sections:
        result["memory"] = bench_memory(cfg, {k: pairs[k][1] is not None for k in pairs})
    result["goals"] = evaluate(cfg, result["prefill"], result["decode"], result["memory"], result["train"])
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--repeats", type=int, help="timed repeats per prefill measurement (default 3)")
    parser.add_argument(
        "--decode-repeats", type=int, help="timed runs of one mini-batch of steps per decode position (default 21)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", help="prefill lengths (default 1024 4096 16384)")
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads (default: torch's choice; 1 with --quick)"
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["prefill", "decode", "train", "memory"],
        choices=["prefill", "decode", "train", "memory"],
        help="what to measure",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (steadier on a shared machine; use with --threads 1)",
    )
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    if args.memory_probe:
        print(json.dumps(_probe_main(json.loads(args.memory_probe))))
        return {}
    set_clock(args.clock)
    cfg = dict(QUICK if args.quick else FULL)
    cfg["clock"] = args.clock
    if args.repeats:
        cfg["repeats"] = args.repeats
    if args.decode_repeats:
        cfg["decode_repeats"] = args.decode_repeats
    if args.lengths:
        cfg["lengths"] = sorted(args.lengths)
        cfg["ratio_T"] = (
            cfg["ratio_T"] if cfg["ratio_T"] in cfg["lengths"] else cfg["lengths"][len(cfg["lengths"]) // 2]
        )
    result = run(cfg, sections=set(args.sections))
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
