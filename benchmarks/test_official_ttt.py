"""The speed anchor is the official algorithm: golden vectors of ttt-lm-pytorch, and equal to seqzoo's layers.

``official_ttt.py`` must compute exactly what ttt-lm-pytorch's ``TTTLinear`` / ``TTTMLP`` compute, or the
benchmark ratios against it mean nothing. Two checks:
1. the golden vectors in ``tests/data/ttt_lm_pytorch/layer_*.safetensors`` (float64, relative error ≤ 1e-6,
   config from each file's metadata; in practice the port agrees to ~1e-16);
2. seqzoo's ``ttt_linear`` / ``ttt_mlp`` (when registered) load the anchor's state_dict strictly and give
   the same output on random weights and inputs (float64), including a trailing partial mini-batch.

Both use the golden tolerance 1e-6: the official code computes the RoPE angles in float32 even for
float64 inputs (the anchor keeps that; it is what makes the port agree with the golden files to ~1e-16),
while seqzoo computes them in the input's dtype, so the two differ by ~5e-8, and by ~1e-16 when the
anchor's angles are computed in float64 (checked by ``test_seqzoo_equals_anchor_with_float64_rope``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from official_ttt import make_official  # noqa: E402

GOLDEN = sorted((Path(__file__).parents[1] / "tests" / "data" / "ttt_lm_pytorch").glob("layer_*.safetensors"))
RTOL = 1e-6


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def official_kwargs(cfg: dict) -> dict:
    """The anchor's config from a golden file's ``config`` metadata (official names and defaults)."""
    return dict(
        hidden_size=cfg["hidden_size"],
        num_heads=cfg["num_attention_heads"],
        mini_batch_size=cfg.get("mini_batch_size", 16),
        ttt_base_lr=cfg.get("ttt_base_lr", 1.0),
        share_qk=cfg.get("share_qk", False),
        use_gate=cfg.get("use_gate", False),
        conv_kernel=cfg.get("conv_kernel", 4),
        rope_theta=cfg.get("rope_theta", 10000.0),
    )


def test_golden_files_present():
    assert len(GOLDEN) >= 6, f"expected the ttt-lm-pytorch layer golden files, found {GOLDEN}"


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_matches_ttt_lm_pytorch(path: Path):
    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    tensors = load_file(str(path))
    assert cfg["dtype"] == "float64"
    layer = make_official(cfg["layer"], **official_kwargs(cfg)).double()
    params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    layer.load_state_dict(params, strict=True)
    with torch.no_grad():
        y = layer(tensors["input"])
    err = rel_err(y, tensors["output"])
    assert err <= RTOL, f"{path.name}: relative error {err:.3e} > {RTOL:.0e}"


def test_anchor_rejects_bad_input():
    layer = make_official("linear", hidden_size=32, num_heads=2)
    with pytest.raises(ValueError, match=r"\(B, T, 32\)"):
        layer(torch.randn(4, 32))
    with pytest.raises(ValueError, match="divisible"):
        make_official("linear", hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="'linear' or 'mlp'"):
        make_official("gru", hidden_size=32, num_heads=2)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter away from its initial value so that every term of the layer matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.3 if name.endswith(("W1", "W2", "proj.weight")) else 0.1
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _seqzoo_with(name: str):
    """seqzoo, with the built-in layer ``name`` registered: a missing one is a broken install, and fails."""
    import seqzoo

    assert name in seqzoo.list_layers(), (
        f"built-in layer {name!r} is not registered (plugin failures: {seqzoo.plugin_failures()})")
    return seqzoo


SEQZOO_CASES = [
    ("linear", {}, 37),
    ("linear", {"mini_batch_size": 8}, 30),
    ("linear", {"share_qk": True, "use_gate": True, "ttt_base_lr": 0.1}, 40),
    ("mlp", {}, 35),
    ("mlp", {"share_qk": True, "use_gate": True}, 33),
]


@pytest.mark.parametrize(
    "kind,extra,T", SEQZOO_CASES, ids=[f"{k}-{'-'.join(e) or 'default'}-T{t}" for k, e, t in SEQZOO_CASES]
)
def test_seqzoo_equals_anchor(kind: str, extra: dict, T: int):
    seqzoo = _seqzoo_with(f"ttt_{kind}")
    d_model, heads = 64, 4
    # every option explicit: seqzoo's defaults may differ from the official ones (ttt_mlp: ttt_base_lr 0.1)
    extra = {"ttt_base_lr": 1.0, "mini_batch_size": 16, "share_qk": False, "use_gate": False, **extra}
    official = make_official(kind, hidden_size=d_model, num_heads=heads, **extra).double()
    _randomise(official, seed=T)
    ours = seqzoo.create_layer(f"ttt_{kind}", d_model, num_heads=heads, **extra).double()
    missing, unexpected = ours.load_state_dict(official.state_dict(), strict=False)
    assert not missing and not unexpected, (
        f"ttt_{kind} does not take the official state_dict: missing {missing}, unexpected {unexpected}"
    )
    x = torch.randn(2, T, d_model, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    with torch.no_grad():
        want = official(x)
        got, _ = ours(x)
    err = rel_err(got, want)
    assert err <= RTOL, f"ttt_{kind} {extra} T={T}: relative error vs the official algorithm {err:.3e}"


def test_seqzoo_equals_anchor_with_float64_rope(monkeypatch):
    """With the anchor's RoPE angles in float64, seqzoo's ttt_linear equals it to rounding (1e-12)."""
    seqzoo = _seqzoo_with("ttt_linear")
    import official_ttt

    def rope_cos_sin_float64(head_dim, positions, theta, dtype):
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = positions.double()[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    monkeypatch.setattr(official_ttt, "_rope_cos_sin", rope_cos_sin_float64)
    official = make_official("linear", hidden_size=64, num_heads=4).double()
    _randomise(official, seed=1)
    ours = seqzoo.create_layer("ttt_linear", 64, num_heads=4, ttt_base_lr=1.0, mini_batch_size=16).double()
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        err = rel_err(ours(x)[0], official(x))
    assert err <= 1e-12, f"ttt_linear vs the official algorithm with float64 RoPE: relative error {err:.3e}"
