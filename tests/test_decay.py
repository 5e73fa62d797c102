"""Decayed linear attention (``seqzoo_plugins.decay``): the ops against fla's references (golden vectors),
the chunked forms against the token loop, and the equivalences between the family's members."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from seqzoo_plugins.decay import gla, gla_reference, retention_log_decay, simple_gla, simple_gla_reference
from seqzoo_plugins.decay import ops as decay_ops

DATA = Path(__file__).parent / "data" / "fla_decay"
SIMPLE_CASES = sorted(DATA.glob("op_simple_gla_*.safetensors"))
RETENTION_CASES = sorted(DATA.glob("op_retention_*.safetensors"))
GLA_CASES = sorted(DATA.glob("op_gla_*.safetensors"))


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["config"])


def _close(ours, ref, rel=5e-6):
    """fla's references compute in float32: ours (float64) within float32 rounding of the reference's size."""
    torch.testing.assert_close(ours, ref.double(), rtol=0, atol=rel * max(1.0, ref.abs().max().item()))


def test_golden_vectors_are_present():
    assert len(SIMPLE_CASES) == 4 and len(RETENTION_CASES) == 2 and len(GLA_CASES) == 3


@pytest.mark.parametrize("path", SIMPLE_CASES, ids=lambda p: p.stem)
@pytest.mark.parametrize("chunk_size", [None, 5, 16, 64])
def test_simple_gla_equals_fla_reference(path, chunk_size):
    t = {k: v.double() for k, v in load_file(path).items()}
    o, S = simple_gla(t["q"], t["k"], t["v"], t["g"], initial_state=t.get("initial_state"), output_final_state=True,
                      chunk_size=chunk_size)
    _close(o, t["o"])
    _close(S, t["final_state"])
    assert _meta(path)["scale"] == t["q"].shape[-1] ** -0.5


@pytest.mark.parametrize("path", RETENTION_CASES, ids=lambda p: p.stem)
def test_retention_is_simple_gla_with_fixed_decays(path):
    """fla's parallel retention = ``simple_gla`` with g = log γ_h, γ_h = 1 − 2^(−5−h), in the chunked form."""
    t = {k: v.double() for k, v in load_file(path).items()}
    B, T, H, _ = t["q"].shape
    g = retention_log_decay(H, dtype=torch.float64).expand(B, T, H)
    o, _ = simple_gla(t["q"], t["k"], t["v"], g, chunk_size=16)
    _close(o, t["o"])


@pytest.mark.parametrize("path", GLA_CASES, ids=lambda p: p.stem)
@pytest.mark.parametrize("chunk_size", [None, 5, 16, 64])
def test_gla_equals_fla_reference(path, chunk_size):
    t = {k: v.double() for k, v in load_file(path).items()}
    o, S = gla(t["q"], t["k"], t["v"], t["gk"], initial_state=t.get("initial_state"), output_final_state=True,
               chunk_size=chunk_size)
    _close(o, t["o"])
    _close(S, t["final_state"])


def _inputs(B, T, H, K, V, *, vector, strength=2.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    decay = F.logsigmoid(rand(B, T, H, K) + strength) if vector else F.logsigmoid(rand(B, T, H) + strength)
    return rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V), decay, rand(B, H, K, V)


@pytest.mark.parametrize(("shape", "chunk"), [((2, 37, 3, 8, 5), 16), ((1, 130, 2, 16, 4), 64),
                                              ((2, 3, 1, 4, 6), 64), ((1, 50, 2, 8, 8), 7)])
@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize("strength", [2.0, -6.0], ids=["mild", "strong"])
def test_chunked_equals_token_loop(shape, chunk, vector, strength, monkeypatch):
    """Both of gla's intra-chunk paths (strong decays take the per-pair one), one group or a group per chunk."""
    q, k, v, g, S0 = _inputs(*shape, vector=vector, strength=strength)
    fn = gla if vector else simple_gla
    o_ref, S_ref = gla_reference(q, k, v, g, initial_state=S0)
    for group_elements in (decay_ops.GROUP_ELEMENTS, 1):
        monkeypatch.setattr(decay_ops, "GROUP_ELEMENTS", group_elements)
        o, S = fn(q, k, v, g, initial_state=S0, output_final_state=True, chunk_size=chunk)
        torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-12)


def test_gla_takes_both_paths_and_resets_exactly(monkeypatch):
    """The factorised path and the per-pair path agree; a log-decay of −inf or −1e30 is a reset (no NaN):
    the output after it equals a fresh start from zeros."""
    q, k, v, g, S0 = _inputs(1, 96, 2, 8, 4, vector=True)
    factored, _ = gla(q, k, v, g, initial_state=S0)
    monkeypatch.setattr(decay_ops, "FACTOR_SAFE", -1.0)  # every group takes the per-pair path
    torch.testing.assert_close(gla(q, k, v, g, initial_state=S0)[0], factored, rtol=0, atol=1e-12)
    monkeypatch.undo()
    g = g.clone()
    g[:, 40] = float("-inf")
    g[:, 70, :, 3] = -1e30
    o, S = gla(q, k, v, g, initial_state=S0, output_final_state=True)
    o_ref, S_ref = gla_reference(q, k, v, g, initial_state=S0)
    assert not o.isnan().any()
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    fresh, _ = gla(q[:, 40:], k[:, 40:], v[:, 40:], g[:, 40:].clamp(min=-1e300))
    torch.testing.assert_close(o[:, 40:70], fresh[:, :30], rtol=0, atol=1e-12)


def test_equivalences_between_the_ops():
    """simple_gla = gla with the decay repeated over the key features; gla with gk ≡ 0 = linear attention
    (unnormalised, identity feature map: o_t = Σ_{s≤t} (scale q_t·k_s) v_s)."""
    q, k, v, g, S0 = _inputs(2, 45, 3, 8, 5, vector=False)
    a, Sa = simple_gla(q, k, v, g, initial_state=S0, output_final_state=True)
    b, Sb = gla(q, k, v, g.unsqueeze(-1).expand(*g.shape, 8), initial_state=S0, output_final_state=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(Sa, Sb, rtol=0, atol=1e-12)
    o, _ = gla(q, k, v, torch.zeros_like(q))
    scores = torch.einsum("bthk,bshk->bhts", q * 8 ** -0.5, k).tril()
    torch.testing.assert_close(o, torch.einsum("bhts,bshv->bthv", scores, v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_gradients_through_the_chunked_form(vector):
    q, k, v, g, S0 = _inputs(1, 21, 2, 4, 3, vector=vector)
    fn = gla if vector else simple_gla
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, g, S0)]
    assert torch.autograd.gradcheck(lambda *xs: fn(*xs[:4], initial_state=xs[4], chunk_size=8)[0], leaves)
    ref = [t.clone().requires_grad_(True) for t in (q, k, v, g, S0)]
    simple_gla_reference(*ref[:4], initial_state=ref[4])[0].square().sum().backward()
    fn(*leaves[:4], initial_state=leaves[4], chunk_size=16)[0].square().sum().backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-11)


def test_bad_input_is_named():
    q, k, v, g, S0 = _inputs(1, 5, 2, 4, 3, vector=False)
    with pytest.raises(ValueError, match="log-decays of shape"):
        gla(q, k, v, g)
    with pytest.raises(ValueError, match="log-decays of shape"):
        simple_gla(q, k, v, g.unsqueeze(-1))
    with pytest.raises(ValueError, match="initial_state of shape"):
        simple_gla(q, k, v, g, initial_state=S0[:, :1])
    with pytest.raises(ValueError, match="chunk_size"):
        simple_gla(q, k, v, g, chunk_size=0)
    with pytest.raises(TypeError, match="floating-point"):
        simple_gla(q, k, v.long(), g)
    o, S = simple_gla(q[:, :0], k[:, :0], v[:, :0], g[:, :0], initial_state=S0, output_final_state=True)
    assert o.shape == (1, 0, 2, 3) and torch.equal(S, S0) and S is not S0
