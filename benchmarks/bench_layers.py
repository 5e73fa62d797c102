"""Mamba, self-attention and linear attention side by side with their plain references, same weights.

    python benchmarks/bench_layers.py [--quick] [--json results.json]

- ``mamba`` forward vs Hugging Face transformers' CPU path ``MambaMixer.slow_forward`` (a token loop over
  the discretised scan) at d_model 768 for T in {2048, 4096, 8192}; goal: seqzoo / HF ≤ 0.3 at every T;
- ``self_attention`` (rope off, to compare like with like; rope on is reported too) vs the four
  projections around a bare ``F.scaled_dot_product_attention(is_causal=True)`` at 768 wide, 12 heads,
  T in {1024, 4096}; goal: ≤ 1.15;
- ``linear_attention`` chunked forward vs a token loop of its own ``step`` at T = 4096; goal: ≥ 5×.

Each pair is also checked to compute the same output (max relative error reported), so the ratios
compare equal work. Medians of repeats after warm-up, the two sides called in turn every repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_ttt import CLOCKS, progress, set_clock, time_in_turn  # noqa: E402

FULL = dict(
    d_model=768,
    num_heads=12,
    mamba_lengths=[2048, 4096, 8192],
    attn_lengths=[1024, 4096],
    linear_T=4096,
    repeats=3,
)
QUICK = dict(
    d_model=64, num_heads=4, mamba_lengths=[128, 256], attn_lengths=[128, 256], linear_T=256, repeats=3
)
GOALS = {"mamba_ratio": 0.3, "attention_ratio": 1.15, "linear_speedup": 5.0}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _row(name, impl, T, t, **extra) -> dict:
    return {"layer": name, "impl": impl, "T": T, "seconds": t, "us_per_token": 1e6 * t["median"] / T, **extra}


# --- mamba vs Hugging Face --------------------------------------------------------------------------


def hf_mamba_mixer(layer, d_model: int, d_state: int, d_conv: int, expand: int):
    """HF ``MambaMixer`` holding the seqzoo ``mamba`` layer's weights (the parameter names are shared)."""
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "fast path is not available" notice: slow_forward is the point

    config = MambaConfig(
        hidden_size=d_model,
        state_size=d_state,
        conv_kernel=d_conv,
        expand=expand,
        time_step_rank=layer.dt_proj.weight.shape[1],
        use_conv_bias=True,
        use_bias=False,
    )
    mixer = MambaMixer(config, layer_idx=0)
    mixer.load_state_dict(layer.state_dict(), strict=True)
    return mixer.eval()


def hf_torch_forward(mixer):
    """HF's pure-torch mixer forward: ``slow_forward`` in transformers 4.x, ``forward`` itself in 5.x (an
    eval-mode mixer without mamba-ssm's kernels takes its torch scan)."""
    return getattr(mixer, "slow_forward", mixer.forward)


def bench_mamba(cfg: dict) -> tuple[list[dict], str | None]:
    import seqzoo

    if "mamba" not in seqzoo.list_layers():
        return [], "mamba is not registered"
    try:
        import transformers  # noqa: F401
    except ImportError:
        return [], "transformers is not installed (pip install 'seqzoo[dev]')"
    torch.manual_seed(0)
    d = cfg["d_model"]
    ours = seqzoo.create_layer("mamba", d).eval()
    spec = ours.config
    hf = hf_mamba_mixer(ours, d, spec.d_state, spec.d_conv, spec.expand)
    rows = []
    for T in cfg["mamba_lengths"]:
        progress(f"mamba T={T}")
        x = torch.randn(1, T, d, generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            err = rel_err(ours(x)[0], hf_torch_forward(hf)(x))
            res = time_in_turn(
                {"hf_slow_forward": lambda x=x: hf_torch_forward(hf)(x), "seqzoo": lambda x=x: ours(x)},
                repeats=cfg["repeats"],
            )
        rows.append(_row("mamba", "hf_slow_forward", T, res["hf_slow_forward"]))
        rows.append(
            _row(
                "mamba",
                "seqzoo",
                T,
                res["seqzoo"],
                rel_err=err,
                ratio=res["seqzoo"]["median"] / res["hf_slow_forward"]["median"],
            )
        )
    return rows, None


# --- self-attention vs bare SDPA --------------------------------------------------------------------


class BareAttention(nn.Module):
    """q, k, v, o projections around ``F.scaled_dot_product_attention(is_causal=True)``: the floor."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(d_model, d_model, bias=False) for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        heads = lambda t: t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), is_causal=True
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


def bench_attention(cfg: dict) -> tuple[list[dict], str | None]:
    import seqzoo

    if "self_attention" not in seqzoo.list_layers():
        return [], "self_attention is not registered"
    d, H = cfg["d_model"], cfg["num_heads"]
    torch.manual_seed(0)
    bare = BareAttention(d, H).eval()
    variants = {}
    for rope in (False, True):
        layer = seqzoo.create_layer("self_attention", d, num_heads=H, rope=rope).eval()
        layer.load_state_dict(bare.state_dict(), strict=True)
        variants["seqzoo" if not rope else "seqzoo_rope"] = layer
    rows = []
    for T in cfg["attn_lengths"]:
        progress(f"self_attention T={T}")
        x = torch.randn(1, T, d, generator=torch.Generator().manual_seed(T))
        fns = {"sdpa_bare": lambda x=x: bare(x)}
        fns.update({name: (lambda m=m, x=x: m(x)) for name, m in variants.items()})
        with torch.no_grad():
            err = rel_err(variants["seqzoo"](x)[0], bare(x))
            res = time_in_turn(fns, repeats=cfg["repeats"])
        rows.append(_row("self_attention", "sdpa_bare", T, res["sdpa_bare"]))
        for name in variants:
            extra = {"ratio": res[name]["median"] / res["sdpa_bare"]["median"]}
            if name == "seqzoo":
                extra["rel_err"] = err
            rows.append(_row("self_attention", name, T, res[name], **extra))
    return rows, None


# --- linear attention: chunked vs its own step loop ----------------------------------------------------


def bench_linear_attention(cfg: dict) -> tuple[list[dict], str | None]:
    import seqzoo

    if "linear_attention" not in seqzoo.list_layers():
        return [], "linear_attention is not registered"
    d, H, T = cfg["d_model"], cfg["num_heads"], cfg["linear_T"]
    progress(f"linear_attention T={T}")
    torch.manual_seed(0)
    layer = seqzoo.create_layer("linear_attention", d, num_heads=H).eval()
    x = torch.randn(1, T, d, generator=torch.Generator().manual_seed(T))

    def step_loop():
        state = layer.init_state(1)
        ys = []
        for t in range(T):
            y, state = layer.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, dim=1)

    with torch.no_grad():
        err = rel_err(layer(x)[0], step_loop())
        res = time_in_turn(
            {"step_loop": step_loop, "seqzoo_chunked": lambda: layer(x)}, repeats=cfg["repeats"]
        )
    return [
        _row("linear_attention", "step_loop", T, res["step_loop"]),
        _row(
            "linear_attention",
            "seqzoo_chunked",
            T,
            res["seqzoo_chunked"],
            rel_err=err,
            speedup=res["step_loop"]["median"] / res["seqzoo_chunked"]["median"],
        ),
    ], None


# --- report ------------------------------------------------------------------------------------------


def evaluate(rows: list[dict]) -> list[dict]:
    goals = []

    def goal(name, value, target, better):
        met = None if value is None else (value <= target if better == "lower" else value >= target)
        goals.append({"goal": name, "value": value, "target": target, "better": better, "met": met})

    m = [r["ratio"] for r in rows if r["layer"] == "mamba" and "ratio" in r]
    goal(
        "mamba forward / HF MambaMixer.slow_forward (worst T)",
        max(m) if m else None,
        GOALS["mamba_ratio"],
        "lower",
    )
    a = [r["ratio"] for r in rows if r["impl"] == "seqzoo" and r["layer"] == "self_attention"]
    goal(
        "self_attention (rope off) / bare SDPA + projections (worst T)",
        max(a) if a else None,
        GOALS["attention_ratio"],
        "lower",
    )
    s = [r["speedup"] for r in rows if "speedup" in r]
    goal(
        "linear_attention chunked speed-up over its step loop",
        s[0] if s else None,
        GOALS["linear_speedup"],
        "higher",
    )
    return goals


def report(result: dict) -> str:
    lines = [f"threads {result['machine']['threads']}, clock {result['config'].get('clock', 'wall')}", ""]
    lines += [
        f"{'layer':<18}{'impl':<18}{'T':>6}  {'median [q1–q3] ms':<26}{'µs/tok':>9}{'ratio':>8}{'rel err':>10}"
    ]
    for r in result["rows"]:
        t = r["seconds"]
        ratio = r.get("ratio", r.get("speedup"))
        ratio = f"{ratio:.3f}" if ratio is not None else ""
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        lines.append(
            f"{r['layer']:<18}{r['impl']:<18}{r['T']:>6}  "
            f"{t['median'] * 1e3:>9.1f} [{t['q1'] * 1e3:.1f}–{t['q3'] * 1e3:.1f}]".ljust(52)
            + f"{r['us_per_token']:>9.1f}{ratio:>8}{err:>10}"
        )
    lines.append("")
    for g in result["goals"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        value = "—" if g["value"] is None else f"{g['value']:.3g}"
        sign = "≤" if g["better"] == "lower" else "≥"
        lines.append(f"  [{mark:>12}] {g['goal']}: {value} (goal {sign} {g['target']:g})")
    for name, why in result["unavailable"].items():
        lines.append(f"  {name}: {why}")
    return "\n".join(lines)


def run(cfg: dict, sections: set[str]) -> dict:
    result: dict[str, Any] = {
        "benchmark": "bench_layers",
        "config": cfg,
        "goals_targets": GOALS,
        "rows": [],
        "unavailable": {},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
        },
    }
    benches = {"mamba": bench_mamba, "attention": bench_attention, "linear_attention": bench_linear_attention}
    for name, fn in benches.items():
        if name not in sections:
            continue
        try:
            rows, why = fn(cfg)
        except Exception as exc:  # noqa: BLE001 - one failing comparison is reported, the others still run
            rows, why = [], f"failed: {type(exc).__name__}: {exc}"[:300]
        result["rows"] += rows
        if why:
            result["unavailable"][name] = why
    result["goals"] = evaluate(result["rows"])
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (default 3)")
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads (default: torch's choice; 1 with --quick)"
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["mamba", "attention", "linear_attention"],
        choices=["mamba", "attention", "linear_attention"],
        help="what to measure",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (steadier on a shared machine; use with --threads 1)",
    )
    args = parser.parse_args(argv)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    set_clock(args.clock)
    cfg = dict(QUICK if args.quick else FULL)
    cfg["clock"] = args.clock
    if args.repeats:
        cfg["repeats"] = args.repeats
    result = run(cfg, set(args.sections))
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
