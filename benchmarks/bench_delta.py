"""The delta-rule layers side by side with linear attention (d_model 768, 12 heads, batch 1, float32).

    python benchmarks/bench_delta.py [--quick] [--threads N] [--cpu-time] [--json results.json]

Goals (measured in one run, every layer called in turn each repeat, medians after warm-up):
- forward at T = 4096: ``deltanet`` and ``gated_deltanet`` ≤ 1.5× ``linear_attention``'s chunked
  forward (``gated_deltanet`` also at its default ``expand_v=2``, twice the value width, reported);
- time per token at T = 16384 over T = 1024 ≤ 1.3 (the chunked form's cost does not grow with T);
- decode: time per token at position 8192 over position 64 ≤ 1.3 (O(1) in the position).
``mesanet`` (an exact K×K solve per token and head, or 30 conjugate-gradient steps), ``longhorn`` and ``mamba`` (its Mamba-shaped
neighbour, at the same d_state 16 and expand 2) are reported beside them, without a goal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import seqzoo

sys.path.insert(0, str(Path(__file__).parent))
from bench_ttt import progress, set_clock, time_in_turn  # noqa: E402

FULL = dict(d_model=768, num_heads=12, T=4096, lengths=[1024, 16384], positions=[64, 8192], repeats=5, decode_tokens=32)
QUICK = dict(d_model=64, num_heads=4, T=256, lengths=[128, 512], positions=[8, 256], repeats=3, decode_tokens=8)
GOALS = {"forward_ratio": 1.5, "per_token_growth": 1.3, "decode_growth": 1.3}
#: the rows the goals are for (the layers at linear attention's widths)
GOAL_LAYERS = ["deltanet", "gated_deltanet (expand_v=1)"]
LAYERS = {
    "linear_attention": ("linear_attention", {}),
    "deltanet": ("deltanet", {}),
    "gated_deltanet (expand_v=1)": ("gated_deltanet", {"expand_v": 1.0}),
    "gated_deltanet (default, expand_v=2)": ("gated_deltanet", {}),
    "mesanet": ("mesanet", {}),
    "mesanet (solver=cg, 30 steps)": ("mesanet", {"solver": "cg"}),
    "longhorn": ("longhorn", {}),
    "mamba": ("mamba", {}),
}


def build(name: str, cfg: dict, extra: dict):
    torch.manual_seed(0)
    fields = seqzoo.layer_spec(name).field_names()
    heads = {"num_heads": cfg["num_heads"]} if "num_heads" in fields else {}
    return seqzoo.create_layer(name, cfg["d_model"], **heads, **extra).eval()


@torch.no_grad()
def bench(cfg: dict, rows: dict | None = None) -> dict:
    """Forward, per-token and decode times of ``rows`` (label -> (layer, options); default ``LAYERS``),
    which must include ``linear_attention``, the reference of the ratios."""
    C, out = cfg["d_model"], {"config": cfg, "forward": {}, "per_token": {}, "decode": {}}
    layers = {label: build(name, cfg, extra) for label, (name, extra) in (rows or LAYERS).items()}
    x = torch.randn(1, cfg["T"], C)
    progress(f"forward at T={cfg['T']}")
    t = time_in_turn({label: (lambda lay=lay: lay(x)) for label, lay in layers.items()}, repeats=cfg["repeats"])
    base = t["linear_attention"]["median"]
    for label in layers:
        out["forward"][label] = {"ms": 1e3 * t[label]["median"], "ratio_to_linear_attention": t[label]["median"] / base}

    progress(f"per-token time at T in {cfg['lengths']}")
    short, long = cfg["lengths"]
    xs = {T: torch.randn(1, T, C) for T in (short, long)}
    fns = {(label, T): (lambda lay=lay, T=T: lay(xs[T])) for label, lay in layers.items() for T in (short, long)}
    t = time_in_turn(fns, repeats=max(2, cfg["repeats"] // 2))
    for label in layers:
        per = {T: t[(label, T)]["median"] / T for T in (short, long)}
        out["per_token"][label] = {"us_per_token": {T: 1e6 * p for T, p in per.items()}, "growth": per[long] / per[short]}

    progress(f"decode at positions {cfg['positions']}")
    n = cfg["decode_tokens"]
    tokens = torch.randn(n, 1, C)
    states = {}
    for label, lay in layers.items():
        for p in cfg["positions"]:
            _, states[(label, p)] = lay(torch.randn(1, p, C))

    def decode(lay, state):
        for i in range(n):
            _, state = lay.step(tokens[i], state)

    fns = {(label, p): (lambda lay=layers[label], s=states[(label, p)]: decode(lay, s))
           for label in layers for p in cfg["positions"]}
    t = time_in_turn(fns, repeats=cfg["repeats"])
    lo, hi = cfg["positions"]
    for label in layers:
        per = {p: t[(label, p)]["median"] / n for p in (lo, hi)}
        out["decode"][label] = {"ms_per_token": {p: 1e3 * v for p, v in per.items()}, "growth": per[hi] / per[lo]}
    return out


def report(res: dict, goal_layers: list[str] | None = None) -> None:
    cfg = res["config"]
    print(f"\nd_model {cfg['d_model']}, {cfg['num_heads']} heads, batch 1, float32, threads {torch.get_num_threads()}")
    print(f"\n{'layer':40s} {'fwd ms @T=' + str(cfg['T']):>16s} {'/ lin.attn':>11s} "
          f"{'µs/tok ' + '/'.join(str(T) for T in cfg['lengths']):>22s} {'growth':>7s} "
          f"{'decode ms ' + '/'.join(str(p) for p in cfg['positions']):>20s} {'growth':>7s}")
    for label in res["forward"]:
        f, p, d = res["forward"][label], res["per_token"][label], res["decode"][label]
        pt = "/".join(f"{v:.1f}" for v in p["us_per_token"].values())
        dc = "/".join(f"{v:.3f}" for v in d["ms_per_token"].values())
        print(f"{label:40s} {f['ms']:16.1f} {f['ratio_to_linear_attention']:11.2f} {pt:>22s} {p['growth']:7.2f} "
              f"{dc:>20s} {d['growth']:7.2f}")
    print()
    for label in GOAL_LAYERS if goal_layers is None else goal_layers:
        f, p, d = res["forward"][label], res["per_token"][label], res["decode"][label]
        for goal, value, limit in (("forward / linear_attention", f["ratio_to_linear_attention"], GOALS["forward_ratio"]),
                                   ("per-token growth", p["growth"], GOALS["per_token_growth"]),
                                   ("decode growth", d["growth"], GOALS["decode_growth"])):
            print(f"goal {label}: {goal} {value:.2f} ≤ {limit}: {'met' if value <= limit else 'NOT met'}")


def main(argv=None, rows: dict | None = None, goal_layers: list[str] | None = None, doc: str = __doc__) -> None:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-time", action="store_true", help="time with process CPU time instead of wall time")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        set_clock("cpu")
    res = bench(QUICK if args.quick else FULL, rows)
    report(res, goal_layers)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
