"""Decayed linear attention side by side with linear attention (d_model 768, 12 heads, batch 1, float32).

    python benchmarks/bench_decay.py [--quick] [--threads N] [--cpu-time] [--json results.json]

The method and the goals are ``bench_delta``'s (one run, every layer called in turn each repeat, medians
after warm-up): forward at T = 4096 ≤ 1.5× ``linear_attention``'s chunked forward; time per token at
T = 16384 over T = 1024 ≤ 1.3; decode time per token at position 8192 over 64 ≤ 1.3. The layers run at
fla's defaults (``retnet``: key width d_model, value width 2·d_model; ``gla``: key width d_model/2;
``hgrn2``: d_model/12 = 64 forget features per head), each with its output gate where it has one; the
rows at linear attention's widths (key and value width d_model) are the ones the goals are for.
``mamba2`` runs at its 125M configuration (d_state 128, headdim 64: 24 heads, expand 2, one group); it is
also timed against Hugging Face transformers' ``Mamba2Mixer`` (its pure-torch path, the same weights) at
T = 2048, goal ≤ 0.5× (when transformers is installed). ``sliding_window_attention`` runs with its
default window of 64 keys and with 512: its forward costs O(T·W), its decode O(min(t, W)), so its decode
is also timed past the window (positions 2W and 16W).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_delta import main  # noqa: E402
from bench_ttt import time_in_turn  # noqa: E402

import seqzoo  # noqa: E402

ROWS = {
    "linear_attention": ("linear_attention", {}),
    "retnet (expand_v=1)": ("retnet", {"expand_v": 1.0}),
    "retnet (default, expand_v=2)": ("retnet", {}),
    "gla (expand_k=1)": ("gla", {"expand_k": 1.0}),
    "gla (default, expand_k=0.5)": ("gla", {}),
    "hgrn2": ("hgrn2", {}),
    "mamba2": ("mamba2", {}),
    "sliding_window_attention (default, W=64)": ("sliding_window_attention", {}),
    "sliding_window_attention (W=512)": ("sliding_window_attention", {"window_size": 512}),
}
GOAL_ROWS = ["retnet (expand_v=1)", "gla (expand_k=1)", "gla (default, expand_k=0.5)", "hgrn2", "mamba2",
             "sliding_window_attention (default, W=64)", "sliding_window_attention (W=512)"]


@torch.no_grad()
def against_hf(quick: bool) -> None:
    """``mamba2`` and HF's ``Mamba2Mixer`` (torch path) with the same weights, timed in turn."""
    try:
        from transformers import Mamba2Config
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
    except ImportError:
        print("transformers not installed: mamba2 against HF's Mamba2Mixer not measured")
        return
    C, T, reps = (64, 256, 3) if quick else (768, 2048, 5)
    torch.manual_seed(0)
    ours = seqzoo.create_layer("mamba2", C).eval()
    hf = Mamba2Mixer(Mamba2Config(hidden_size=C, state_size=128, head_dim=ours.headdim, num_heads=ours.nheads,
                                  expand=2, n_groups=1, chunk_size=256), layer_idx=0).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, T, C)
    err = (ours(x)[0] - hf(x)).abs().max().item()
    t = time_in_turn({"mamba2": lambda: ours(x), "hf": lambda: hf(x)}, repeats=reps)
    ratio = t["mamba2"]["median"] / t["hf"]["median"]
    print(f"\nmamba2 against HF Mamba2Mixer (torch path), d_model {C}, T = {T}: {1e3 * t['mamba2']['median']:.1f} ms "
          f"against {1e3 * t['hf']['median']:.1f} ms, ratio {ratio:.2f} (max |difference| {err:.1e})")
    print(f"goal mamba2: forward / HF Mamba2Mixer {ratio:.2f} ≤ 0.5: {'met' if ratio <= 0.5 else 'NOT met'}")


@torch.no_grad()
def window_decode(quick: bool) -> None:
    """``sliding_window_attention``'s decode per token once its window is full: at positions 2W and 16W
    (the table's positions 64 and 8192 straddle the window's filling, where the cost grows by design)."""
    C, W, n = (64, 16, 8) if quick else (768, 512, 32)
    layer = seqzoo.create_layer("sliding_window_attention", C, num_heads=4 if quick else 12, window_size=W).eval()
    tokens = torch.randn(n, 1, C)

    def decode(state):
        for i in range(n):
            _, state = layer.step(tokens[i], state)

    states = {p: layer(torch.randn(1, p, C))[1] for p in (2 * W, 16 * W)}
    t = time_in_turn({p: (lambda s=s: decode(s)) for p, s in states.items()}, repeats=3 if quick else 5)
    per = {p: t[p]["median"] / n for p in states}
    growth = per[16 * W] / per[2 * W]
    print(f"\nsliding_window_attention (W={W}) decode ms/token at {2 * W} / {16 * W}: "
          f"{1e3 * per[2 * W]:.3f} / {1e3 * per[16 * W]:.3f}, growth {growth:.2f}")
    print(f"goal sliding_window_attention: decode growth past the window {growth:.2f} ≤ 1.3: "
          f"{'met' if growth <= 1.3 else 'NOT met'}")


def run(argv: list[str] | None = None) -> None:
    main(argv, rows=ROWS, goal_layers=GOAL_ROWS, doc=__doc__)
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    window_decode(quick)
    against_hf(quick)


if __name__ == "__main__":
    run()
