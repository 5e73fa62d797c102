"""The delta-rule family: the ops and the layers against flash-linear-attention's references (golden
vectors in tests/data/fla), the chunked form against the token loop, and the equivalences (gated with
g ≡ 0 = DeltaNet; DeltaNet = TTT-Linear with b = 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from seqzoo_plugins.delta import (
    DeltaNet,
    GatedDeltaNet,
    delta_rule,
    gated_delta_rule,
    gated_delta_rule_reference,
    mesa_net,
    mesa_net_cg,
    mesa_net_cg_reference,
    mesa_net_reference,
)

import seqzoo
from seqzoo.nn import l2_normalize
from seqzoo.testing import CHECKS, check_language_model, check_layer

DATA = Path(__file__).parent / "data" / "fla"
OP_CASES = sorted(p for p in DATA.glob("op_*.safetensors") if "mesa" not in p.name)
MESA_CASES = sorted(p for p in DATA.glob("op_mesa_net_*.safetensors") if "_cg_" not in p.name)
MESA_CG_CASES = sorted(DATA.glob("op_mesa_net_cg_*.safetensors"))
LAYER_CASES = sorted(DATA.glob("layer_*.safetensors"))


def _inputs(B, T, H, K, V, *, vector=False, gated=False, init=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    out = {"q": rand(B, T, H, K), "k": l2_normalize(rand(B, T, H, K)), "v": rand(B, T, H, V),
           "beta": torch.sigmoid(rand(B, T, H, V) if vector else rand(B, T, H))}
    if gated:
        out["g"] = F.logsigmoid(rand(B, T, H) + 1.0)
    if init:
        out["initial_state"] = rand(B, H, K, V)
    return out


def _op(t: dict, **kw):
    if "g" in t:
        return gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t.get("initial_state"),
                                output_final_state=True, **kw)
    return delta_rule(t["q"], t["k"], t["v"], t["beta"], initial_state=t.get("initial_state"),
                      output_final_state=True, **kw)


def test_golden_files_present():
    assert len(OP_CASES) == 7 and len(MESA_CASES) == 2 and len(LAYER_CASES) == 8, "tests/data/fla is incomplete"


# --- the ops against fla's naive recurrences ---------------------------------------------------------
@pytest.mark.parametrize("path", OP_CASES, ids=lambda p: p.stem)
@pytest.mark.parametrize("chunk_size", [None, 1, 16, 64])
def test_ops_equal_fla_reference(path, chunk_size):
    """fla's naive recurrences compute in float32: ours in float64 on the same inputs agree to float32
    rounding (relative to the outputs' size), for the token loop and the chunked form alike."""
    golden = load_file(path)
    t = {k: v.double() for k, v in golden.items() if k not in ("o", "final_state")}
    o, S = _op(t, chunk_size=chunk_size)
    assert o.dtype == torch.float64 and S.dtype == torch.float64
    meta = json.loads(safe_open(path, "pt").metadata()["config"])
    assert meta["source"].startswith("fla 0.5.2 ")
    for ours, ref in ((o, golden["o"]), (S, golden["final_state"])):
        torch.testing.assert_close(ours, ref.double(), rtol=0, atol=2e-6 * ref.abs().max().item())


# --- the chunked form against the token loop (float64, exact) ---------------------------------------
@pytest.mark.parametrize(("shape", "chunk"), [((2, 37, 3, 16, 8), 8), ((1, 64, 2, 8, 12), 16), ((2, 5, 1, 4, 6), 64),
                                              ((1, 33, 2, 8, 8), 32), ((1, 40, 1, 8, 4), 7)])
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("vector", [False, True], ids=["scalar_beta", "vector_beta"])
@pytest.mark.parametrize("init", [False, True], ids=["zero_state", "initial_state"])
def test_chunked_equals_token_loop(shape, chunk, gated, vector, init):
    t = _inputs(*shape, vector=vector, gated=gated, init=init)
    o_ref, S_ref = gated_delta_rule_reference(t["q"], t["k"], t["v"], t.get("g"), t["beta"],
                                              initial_state=t.get("initial_state"))
    o, S = _op(t, chunk_size=chunk)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-12)


def test_long_sequence_goes_in_groups_and_stays_exact(monkeypatch):
    """More chunks than one group holds: the groups hand the state on exactly."""
    from seqzoo_plugins.delta import ops

    monkeypatch.setattr(ops, "GROUP_ELEMENTS", 2 * 8 * 8)  # one chunk of 8 tokens per group
    t = _inputs(1, 50, 2, 4, 4, gated=True, init=True)
    o_ref, S_ref = gated_delta_rule_reference(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["initial_state"])
    o, S = _op(t, chunk_size=8)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-12)


def test_final_state_only_when_asked_and_empty_sequence():
    t = _inputs(2, 9, 2, 4, 4)
    o, S = delta_rule(t["q"], t["k"], t["v"], t["beta"])
    assert S is None and o.shape == (2, 9, 2, 4)
    e = _inputs(2, 0, 2, 4, 4, init=True)
    o, S = _op(e)
    assert o.shape == (2, 0, 2, 4)
    torch.testing.assert_close(S, e["initial_state"], rtol=0, atol=0)


def test_half_precision_is_computed_in_float32():
    t = _inputs(1, 20, 2, 8, 8, gated=True)
    half = {k: v.bfloat16() for k, v in t.items()}
    o, S = _op(half)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    o32, _ = _op({k: v.float() for k, v in half.items()})
    torch.testing.assert_close(o, o32.bfloat16(), rtol=0, atol=0)


def test_scale_is_applied_to_q():
    t = _inputs(1, 10, 1, 4, 4)
    o1, _ = delta_rule(t["q"], t["k"], t["v"], t["beta"], scale=1.0)
    o2, _ = delta_rule(t["q"], t["k"], t["v"], t["beta"])
    torch.testing.assert_close(o1 * 0.5, o2, rtol=0, atol=1e-14)  # K = 4: K^-1/2 = 0.5


@pytest.mark.parametrize(("bad", "match"), [
    (dict(k=torch.zeros(1, 5, 2, 3)), "expected k of q's shape"),
    (dict(v=torch.zeros(1, 5, 3, 4)), "expected v of shape"),
    (dict(beta=torch.zeros(1, 5, 2, 3)), "expected beta of shape"),
    (dict(initial_state=torch.zeros(1, 2, 4, 5)), "expected initial_state of shape"),
    (dict(q=torch.zeros(5, 2, 4)), "expected q of shape"),
    (dict(beta=torch.zeros(1, 5, 2, dtype=torch.int64)), "floating-point beta"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_input_is_refused_clearly(bad, match):
    args = dict(q=torch.zeros(1, 5, 2, 4), k=torch.zeros(1, 5, 2, 4), v=torch.zeros(1, 5, 2, 4),
                beta=torch.zeros(1, 5, 2), initial_state=None, chunk_size=16)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        delta_rule(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("beta"), **args)
    with pytest.raises(ValueError, match="expected g of shape"):
        gated_delta_rule(torch.zeros(1, 5, 2, 4), torch.zeros(1, 5, 2, 4), torch.zeros(1, 5, 2, 4),
                         torch.zeros(1, 5, 3), torch.zeros(1, 5, 2))


# --- training through the chunked form ---------------------------------------------------------------
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_gradcheck_chunked(gated):
    t = _inputs(1, 7, 1, 3, 2, gated=gated, init=True)
    names = list(t)
    leaves = [t[n].clone().requires_grad_(True) for n in names]

    def f(*xs):
        o, S = _op(dict(zip(names, xs)), chunk_size=3)
        return o, S

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar_beta", "vector_beta"])
def test_chunked_gradients_equal_token_loop(vector):
    t = _inputs(2, 29, 2, 8, 6, gated=True, init=True, vector=vector)
    w = torch.randn(2, 29, 2, 6, dtype=torch.float64)

    def grads(chunk):
        leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
        o, S = _op(leaves, chunk_size=chunk)
        ((o * w).sum() + S.square().sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    ref, chunked = grads(None), grads(8)
    for name in t:
        torch.testing.assert_close(chunked[name], ref[name], rtol=1e-10, atol=1e-11)


# --- MesaNet: the exact ridge regression -------------------------------------------------------------
def _mesa_inputs(B, T, H, K, V, *, init=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    t = {"q": l2_normalize(rand(B, T, H, K)), "k": l2_normalize(rand(B, T, H, K)), "v": rand(B, T, H, V),
         "g": F.logsigmoid(rand(B, T, H) + 1.0), "beta": torch.sigmoid(rand(B, T, H)),
         "lamb": F.softplus(rand(H, K)) + 0.25}
    if init:
        a = rand(B, H, K, K)
        t["initial_state"] = (a @ a.transpose(-1, -2) / K, rand(B, H, K, V))
    return t


def _mesa(t, **kw):
    return mesa_net(t["q"], t["k"], t["v"], t["g"], t["beta"], t["lamb"], initial_state=t.get("initial_state"),
                    output_final_state=True, **kw)


@pytest.mark.parametrize("path", MESA_CASES, ids=lambda p: p.stem)
@pytest.mark.parametrize("chunk_size", [None, 5, 16])
def test_mesa_net_equals_fla_reference(path, chunk_size):
    golden = load_file(path)
    t = {k: v.double() for k, v in golden.items()}
    if "h_kk_init" in t:
        t["initial_state"] = (t["h_kk_init"], t["h_kv_init"])
    o, (h_kk, h_kv) = _mesa(t, chunk_size=chunk_size)
    for ours, name in ((o, "o"), (h_kk, "h_kk"), (h_kv, "h_kv")):
        ref = golden[name].double()
        torch.testing.assert_close(ours, ref, rtol=0, atol=5e-6 * ref.abs().max().item())


@pytest.mark.parametrize(("shape", "chunk"), [((2, 37, 3, 8, 5), 8), ((1, 40, 2, 4, 4), 16), ((2, 3, 1, 4, 6), 16)])
@pytest.mark.parametrize("init", [False, True], ids=["zero_state", "initial_state"])
def test_mesa_chunked_equals_token_loop(shape, chunk, init, monkeypatch):
    from seqzoo_plugins.delta import ops

    t = _mesa_inputs(*shape, init=init)
    o_ref, (kk_ref, kv_ref) = mesa_net_reference(t["q"], t["k"], t["v"], t["g"], t["beta"], t["lamb"],
                                                 initial_state=t.get("initial_state"))
    for group_elements in (ops.GROUP_ELEMENTS, 1):  # one group, or a group per chunk
        monkeypatch.setattr(ops, "GROUP_ELEMENTS", group_elements)
        o, (kk, kv) = _mesa(t, chunk_size=chunk)
        torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(kk, kk_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(kv, kv_ref, rtol=0, atol=1e-12)


def test_mesa_net_is_the_ridge_regression_it_claims():
    """o_t is the prediction at q_t of the W minimising Σ_s w_ts ‖Wᵀk_s − v_s‖² + Σ_i λ_i ‖W_i‖², with
    w_ts = β_s Π_{s<r≤t} α_r: solved here with lstsq on the stacked, weighted system."""
    t = _mesa_inputs(1, 9, 1, 4, 3)
    o, _ = _mesa(t, chunk_size=4)
    alpha = t["g"][0, :, 0].exp()
    for step in (0, 4, 8):
        w = torch.stack([t["beta"][0, s, 0] * alpha[s + 1:step + 1].prod() for s in range(step + 1)])
        A = torch.cat([w.sqrt()[:, None] * t["k"][0, :step + 1, 0], torch.diag(t["lamb"][0].sqrt())])
        b = torch.cat([w.sqrt()[:, None] * t["v"][0, :step + 1, 0], torch.zeros(4, 3, dtype=torch.float64)])
        W = torch.linalg.lstsq(A, b).solution
        torch.testing.assert_close(o[0, step, 0], t["q"][0, step, 0] @ W, rtol=0, atol=1e-12)


def test_mesa_net_gradcheck_and_bad_input():
    t = _mesa_inputs(1, 6, 1, 3, 2, init=True)
    names = ["q", "k", "v", "g", "beta", "lamb"]

    def f(*xs):
        return mesa_net(*xs, initial_state=t["initial_state"], chunk_size=4)[0]

    assert torch.autograd.gradcheck(f, [t[n].clone().requires_grad_(True) for n in names])
    with pytest.raises(ValueError, match="expected lamb"):
        mesa_net(t["q"], t["k"], t["v"], t["g"], t["beta"], torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected initial_state"):
        mesa_net(t["q"], t["k"], t["v"], t["g"], t["beta"], t["lamb"], initial_state=t["initial_state"][0])


# --- MesaNet's conjugate-gradient form (fla's kernels) -------------------------------------------------
def _mesa_cg(t, **kw):
    return mesa_net_cg(t["q"], t["k"], t["v"], t["g"], t["beta"], t["lamb"], initial_state=t.get("initial_state"),
                       output_final_state=True, **kw)


@pytest.mark.parametrize("path", MESA_CG_CASES, ids=lambda p: p.stem)
@pytest.mark.parametrize("chunk_size", [None, 5, 16])
def test_mesa_net_cg_equals_fla_reference(path, chunk_size):
    """fla's chunked CG (float32) against ours in float64, in any chunking: CG's steps from the same
    start are the same per token however the statistics are chunked."""
    golden = load_file(path)
    meta = json.loads(safe_open(str(path), "pt").metadata()["config"])
    t = {k: v.double() for k, v in golden.items()}
    if "h_kk_init" in t:
        t["initial_state"] = (t["h_kk_init"], t["h_kv_init"])
    o, (h_kk, h_kv) = _mesa_cg(t, iterations=meta["max_CG_iteration"], chunk_size=chunk_size)
    for ours, name in ((o, "o"), (h_kk, "h_kk"), (h_kv, "h_kv")):
        ref = golden[name].double()
        torch.testing.assert_close(ours, ref, rtol=0, atol=5e-6 * ref.abs().max().item())
    exact, _ = _mesa(t, chunk_size=16)  # fla's guard ε = 1e-5 leaves CG short of the exact solve
    assert (o - exact).abs().max() > 1e-5


@pytest.mark.parametrize(("shape", "chunk"), [((2, 37, 3, 8, 5), 8), ((1, 40, 2, 4, 4), 16), ((2, 3, 1, 4, 6), 16)])
@pytest.mark.parametrize("init", [False, True], ids=["zero_state", "initial_state"])
def test_mesa_cg_chunked_equals_token_loop(shape, chunk, init, monkeypatch):
    from seqzoo_plugins.delta import ops

    t = _mesa_inputs(*shape, init=init)
    o_ref, (kk_ref, kv_ref) = mesa_net_cg_reference(t["q"], t["k"], t["v"], t["g"], t["beta"], t["lamb"],
                                                    iterations=7, initial_state=t.get("initial_state"))
    for group_elements in (ops.GROUP_ELEMENTS, 1):
        monkeypatch.setattr(ops, "GROUP_ELEMENTS", group_elements)
        o, (kk, kv) = _mesa_cg(t, iterations=7, chunk_size=chunk)
        torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(kk, kk_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(kv, kv_ref, rtol=0, atol=1e-12)


def test_mesa_cg_without_its_guard_is_the_exact_solve():
    """With ε = 0 the iteration is textbook CG: K steps solve the K×K system (here to 1e-10 in float64),
    fewer do not, and K² steps stay there (a finished token rests: 0/0 gives α = 0)."""
    t = _mesa_inputs(2, 29, 2, 8, 5, init=True)
    exact, _ = _mesa(t, chunk_size=8)
    for chunk in (None, 8):
        o, _ = _mesa_cg(t, iterations=8, eps=0.0, chunk_size=chunk)
        torch.testing.assert_close(o, exact, rtol=0, atol=1e-10)
        o, _ = _mesa_cg(t, iterations=64, eps=0.0, chunk_size=chunk)
        torch.testing.assert_close(o, exact, rtol=0, atol=1e-10)
    assert (_mesa_cg(t, iterations=3, eps=0.0, chunk_size=8)[0] - exact).abs().max() > 1e-4


def test_mesa_cg_gradcheck_and_bad_input():
    t = _mesa_inputs(1, 6, 1, 3, 2, init=True)
    names = ["q", "k", "v", "g", "beta", "lamb"]

    def f(*xs):
        return mesa_net_cg(*xs, iterations=4, initial_state=t["initial_state"], chunk_size=4)[0]

    assert torch.autograd.gradcheck(f, [t[n].clone().requires_grad_(True) for n in names])
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="iterations to be a non-negative int"):
            mesa_net_cg(t["q"], t["k"], t["v"], t["g"], t["beta"], t["lamb"], iterations=bad)
    with pytest.raises(ValueError, match="eps >= 0"):
        mesa_net_cg(t["q"], t["k"], t["v"], t["g"], t["beta"], t["lamb"], eps=-1.0)


def test_mesanet_cg_solver_layer():
    """``solver='cg'``: forward = step token by token (both CG from 0), = the op on the layer's features,
    and close to the exact solver (fla's ε keeps them ~1e-3 apart); bad options are named."""
    torch.manual_seed(0)
    exact = seqzoo.create_layer("mesanet", 16, num_heads=2).double()
    cg = seqzoo.create_layer("mesanet", 16, num_heads=2, solver="cg", max_cg_step_training=12,
                             max_cg_step_decoding=12).double()
    cg.load_state_dict(exact.state_dict())
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    y, state = cg(x)
    s, ys = cg.init_state(2, dtype=torch.float64), []
    for t in range(x.shape[1]):
        out, s = cg.step(x[:, t], s)
        ys.append(out)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(s["h_kk"], state["h_kk"], rtol=0, atol=1e-12)
    y_exact, _ = exact(x)
    assert 0 < (y - y_exact).abs().max() < 0.05 * y_exact.abs().max()
    for bad in ({"solver": "lu"}, {"max_cg_step_training": -1}, {"max_cg_step_decoding": -2},
                {"backend": "cuda"}):
        with pytest.raises(ValueError, match="expected"):
            seqzoo.create_layer("mesanet", 16, num_heads=2, **bad)


def test_mesanet_rule_as_a_general_learner():
    """MesaLearner (a seqzoo.Learner: statistics, rates a and b from projections, λ an outer parameter),
    run token by token by the learner layer, equals ``mesa_net`` on the same features: the layer's q and
    k L2-normalised per head by forward hooks, o_proj the identity."""
    from seqzoo_plugins.delta import MesaLearner

    from seqzoo.ttt_layers import LearnerLayer

    torch.manual_seed(0)
    C, H = 16, 2
    d = C // H
    layer = MesaLearner.make_layer(C, num_heads=H).double()
    assert type(layer) is LearnerLayer and layer.lambda_params.shape == (H, d)
    with torch.no_grad():
        layer.o_proj.weight.copy_(torch.eye(C))
        layer.lambda_params.add_(0.3 * torch.randn_like(layer.lambda_params))
        layer.a_proj.bias.add_(2.0)
    per_head = lambda m, args, out: l2_normalize(out.unflatten(-1, (H, d))).flatten(-2)
    layer.q_proj.register_forward_hook(per_head)
    layer.k_proj.register_forward_hook(per_head)
    x = torch.randn(2, 13, C, dtype=torch.float64)
    y, state = layer(x)
    with torch.no_grad():
        q = l2_normalize(layer.q_proj.weight.matmul(x.unsqueeze(-1)).squeeze(-1).unflatten(-1, (H, d)))
        k = l2_normalize(layer.k_proj.weight.matmul(x.unsqueeze(-1)).squeeze(-1).unflatten(-1, (H, d)))
        v = layer.v_proj(x).unflatten(-1, (H, d))
        lamb = F.softplus(layer.lambda_params) + 0.25
        o, (h_kk, _) = mesa_net(q, k, v, F.logsigmoid(layer.a_proj(x)), torch.sigmoid(layer.b_proj(x)), lamb,
                                output_final_state=True, chunk_size=4)
    torch.testing.assert_close(y, o.flatten(-2), rtol=0, atol=1e-12)
    torch.testing.assert_close(state["h_kk"], h_kk, rtol=0, atol=1e-12)
    assert set(check_layer(lambda dm, **c: MesaLearner.make_layer(dm, **c), num_heads=2)) == set(CHECKS)


# --- Longhorn -------------------------------------------------------------------------------------------
LONGHORN_CASES = sorted((Path(__file__).parent / "data" / "longhorn").glob("layer_*.safetensors"))


@pytest.mark.parametrize("path", LONGHORN_CASES, ids=lambda p: p.stem)
def test_longhorn_equals_official_step(path):
    """The official Longhorn.step run token by token in float64 (tests/data/longhorn/generate.py)."""
    t = load_file(path)
    meta = json.loads(safe_open(path, "pt").metadata()["config"])
    config = dict(meta["layer_config"])
    layer = seqzoo.create_layer("longhorn", config.pop("d_model"), **config).double()
    layer.load_state_dict({k.removeprefix("param."): v for k, v in t.items() if k.startswith("param.")}, strict=True)
    y, state = layer(t["input"])
    torch.testing.assert_close(y, t["output"], rtol=0, atol=1e-12)
    torch.testing.assert_close(state["ssm_state"], t["ssm_state"], rtol=0, atol=1e-12)
    state, ys = layer.init_state(2, dtype=torch.float64), []
    for i in range(t["input"].shape[1]):
        y_t, state = layer.step(t["input"][:, i], state)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), t["output"], rtol=0, atol=1e-12)


def test_longhorn_forward_in_segments_equals_official_step(monkeypatch):
    from seqzoo_plugins.delta import longhorn

    monkeypatch.setattr(longhorn, "SEGMENT_ELEMENTS", 1)  # one chunk per segment
    path = LONGHORN_CASES[0]
    t = load_file(path)
    config = dict(json.loads(safe_open(path, "pt").metadata()["config"])["layer_config"], chunk_size=4)
    layer = seqzoo.create_layer("longhorn", config.pop("d_model"), **config).double()
    layer.load_state_dict({k.removeprefix("param."): v for k, v in t.items() if k.startswith("param.")})
    seen = []
    layer.in_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    y, state = layer(t["input"])
    T = t["input"].shape[1]
    assert seen == [4] * (T // 4) + [T % 4] and T % 4
    torch.testing.assert_close(y, t["output"], rtol=0, atol=1e-12)
    torch.testing.assert_close(state["ssm_state"], t["ssm_state"], rtol=0, atol=1e-12)


def test_longhorn_golden_files_present():
    assert len(LONGHORN_CASES) == 2, "tests/data/longhorn is incomplete"


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_longhorn_chunked_scan_equals_token_loop(chunk, grad):
    from seqzoo_plugins.delta import longhorn_reference, longhorn_scan

    g = torch.Generator().manual_seed(0)
    x, beta = torch.randn(2, 37, 6, generator=g, dtype=torch.float64), torch.rand(2, 37, 6, generator=g, dtype=torch.float64)
    k, q = torch.randn(2, 37, 4, generator=g, dtype=torch.float64), torch.randn(2, 37, 4, generator=g, dtype=torch.float64)
    S0 = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    y_ref, S_ref = longhorn_reference(x, k, q, beta, initial_state=S0)
    with torch.set_grad_enabled(grad):
        y, S = longhorn_scan(x.requires_grad_(grad), k, q, beta, initial_state=S0, output_final_state=True,
                             chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-13)
    if grad:
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, k, q, beta, S0)]
        f = lambda *a: longhorn_scan(a[0], a[1], a[2], a[3], initial_state=a[4], output_final_state=True,
                                     chunk_size=chunk)
        small = [t[:1, :7] if t.ndim == 3 and t.shape[1] == 37 else t[:1] for t in leaves]
        assert torch.autograd.gradcheck(f, [t.detach().clone().requires_grad_(True) for t in small])


def test_longhorn_epsilon_is_the_implicit_step():
    """ε = β/(1 + β‖k‖²) makes (I + βkkᵀ)⁻¹ = I − εkkᵀ (Sherman–Morrison): the exact implicit step
    argmin_s ‖s − s₀‖² + β(s·k − x)² is (I − εkkᵀ)s₀ + εxk, whose diagonal part Longhorn keeps."""
    g = torch.Generator().manual_seed(1)
    k, s0 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    beta, x = 0.7, 1.3
    exact = torch.linalg.solve(torch.eye(5, dtype=torch.float64) + beta * torch.outer(k, k), s0 + beta * x * k)
    eps = beta / (1 + beta * k.dot(k))
    torch.testing.assert_close(exact, s0 - eps * k * k.dot(s0) + eps * x * k, rtol=0, atol=1e-14)


# --- Titans ---------------------------------------------------------------------------------------------
TITANS_CASES = sorted((Path(__file__).parent / "data" / "titans").glob("memory_*.safetensors"))


def _titans(path):
    from seqzoo_plugins.delta import from_titans_pytorch

    t = load_file(path)
    config = json.loads(safe_open(path, "pt").metadata()["config"])["neural_memory"]
    sd = {k.removeprefix("param."): v for k, v in t.items() if k.startswith("param.")}
    return from_titans_pytorch(sd, max_lr=config["default_step_transform_max_lr"]), t


def test_titans_golden_files_present():
    assert len(TITANS_CASES) == 2, "tests/data/titans is incomplete"


@pytest.mark.parametrize("path", TITANS_CASES, ids=lambda p: p.stem)
def test_titans_equals_titans_pytorch(path):
    """titans-pytorch 0.5.5 NeuralMemory (chunk_size=1, batch_size=1, momentum, several heads) in float64."""
    layer, t = _titans(path)
    assert next(layer.parameters()).dtype == torch.float64
    y, state = layer(t["input"])
    torch.testing.assert_close(y, t["output"], rtol=0, atol=1e-10)
    state, ys = layer.init_state(2, dtype=torch.float64), []
    for i in range(t["input"].shape[1]):
        y_t, state = layer.step(t["input"][:, i], state)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), t["output"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("path", TITANS_CASES, ids=lambda p: p.stem)
def test_titans_without_momentum_and_decay_is_online_ttt(path):
    """μ ≡ 0 and a ≡ 0 (biases at −∞): Titans' update is the online TTT layer's, W_t = W_{t−1} − η∇ℓ."""
    from seqzoo_plugins.delta import TitansMemory

    from seqzoo.ttt_layers import TTTLayer

    titans, t = _titans(path)
    with torch.no_grad():
        titans.momentum_proj.bias.fill_(float("-inf"))
        titans.decay_proj.bias.fill_(float("-inf"))
    cfg = titans.config
    online = TitansMemory.make_layer(titans.d_model, num_heads=cfg.num_heads, ttt_base_lr=cfg.ttt_base_lr,
                                     memory_depth=cfg.memory_depth, memory_expansion=cfg.memory_expansion,
                                     memory_hidden=cfg.memory_hidden,
                                     momentum=False, decay="none").double()
    assert type(online) is TTTLayer and not hasattr(online, "momentum_proj")
    sd = {k: v for k, v in titans.state_dict().items() if not k.startswith(("momentum_proj", "decay_proj"))}
    online.load_state_dict(sd, strict=True)
    torch.testing.assert_close(titans(t["input"])[0], online(t["input"])[0], rtol=0, atol=1e-12)


def test_from_titans_pytorch_refuses_other_configurations():
    from seqzoo_plugins.delta import from_titans_pytorch

    with pytest.raises(ValueError, match="missing"):
        from_titans_pytorch({"to_queries.weight": torch.zeros(4, 4)})


# --- the layers against fla's layers ------------------------------------------------------------------
def _fla_layer(path: Path, **extra):
    tensors = load_file(path)
    meta = json.loads(safe_open(path, "pt").metadata()["config"])
    config = dict(meta["layer_config"], **extra)
    d = config.pop("hidden_size")
    name = {"DeltaNet": "deltanet", "GatedDeltaNet": "gated_deltanet", "MesaNet": "mesanet"}[meta["source"].split(".")[-1]]
    layer = seqzoo.create_layer(name, d, **config)
    params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    layer.load_state_dict(params, strict=True)  # fla's names and shapes
    return layer, tensors


@pytest.mark.parametrize("path", LAYER_CASES, ids=lambda p: p.stem)
def test_layer_equals_fla_layer(path):
    layer, t = _fla_layer(path)
    layer = layer.double()
    x, ref = t["input"].double(), t["output"].double()
    y, _ = layer(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-6 * ref.abs().max().item())
    state, ys = layer.init_state(x.shape[0], dtype=torch.float64), []
    for i in range(x.shape[1]):
        y_t, state = layer.step(x[:, i], state)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", LAYER_CASES[:1] + LAYER_CASES[3:4], ids=lambda p: p.stem)
def test_layer_forward_in_segments_equals_fla_layer(monkeypatch, path):
    """Segments of one chunk of 8 tokens (a group per segment), each from the state the last ends in."""
    from seqzoo_plugins.delta import ops

    monkeypatch.setattr(ops, "GROUP_ELEMENTS", 1)
    layer, t = _fla_layer(path, chunk_size=8)
    seen = []
    layer.q_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    y, _ = layer.double()(t["input"].double())
    assert seen == [8, 8, 8, 8, 5]
    ref = t["output"].double()
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-6 * ref.abs().max().item())


def test_fla_defaults_and_parameter_shapes():
    d = DeltaNet(64)
    assert {k: tuple(v.shape) for k, v in d.state_dict().items()} == {
        "q_proj.weight": (64, 64), "k_proj.weight": (64, 64), "v_proj.weight": (64, 64), "b_proj.weight": (4, 64),
        "q_conv1d.weight": (64, 1, 4), "k_conv1d.weight": (64, 1, 4), "v_conv1d.weight": (64, 1, 4),
        "o_norm.weight": (16,), "o_proj.weight": (64, 64)}
    g = GatedDeltaNet(64, num_heads=2)  # head_dim 32, values 2·32 per head
    shapes = {k: tuple(v.shape) for k, v in g.state_dict().items()}
    assert shapes["v_proj.weight"] == (128, 64) and shapes["g_proj.weight"] == (128, 64)
    assert shapes["A_log"] == (2,) and shapes["dt_bias"] == (2,) and shapes["o_norm.weight"] == (64,)
    A = g.A_log.exp()
    assert torch.all((A > 0) & (A <= 16))
    dt = F.softplus(g.dt_bias)
    assert torch.all((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-6))


# --- equivalences ---------------------------------------------------------------------------------------
def test_gated_with_no_decay_is_delta_rule():
    t = _inputs(2, 21, 2, 8, 4, init=True)
    zero = torch.zeros(2, 21, 2, dtype=torch.float64)
    for chunk in (None, 8):
        o1, S1 = delta_rule(t["q"], t["k"], t["v"], t["beta"], initial_state=t["initial_state"],
                            output_final_state=True, chunk_size=chunk)
        o2, S2 = gated_delta_rule(t["q"], t["k"], t["v"], zero, t["beta"], initial_state=t["initial_state"],
                                  output_final_state=True, chunk_size=chunk)
        torch.testing.assert_close(o2, o1, rtol=0, atol=1e-13)
        torch.testing.assert_close(S2, S1, rtol=0, atol=1e-13)


def test_gated_deltanet_layer_with_no_decay_is_deltanet():
    """exp(A_log) = 0 makes g ≡ 0: Gated DeltaNet (value heads as wide as the keys) is DeltaNet."""
    torch.manual_seed(0)
    delta = DeltaNet(32, num_heads=2).double()
    gated = GatedDeltaNet(32, num_heads=2, expand_v=1.0, use_gate=False).double()
    missing = gated.load_state_dict(delta.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["A_log", "a_proj.weight", "dt_bias"]
    with torch.no_grad():
        gated.A_log.fill_(float("-inf"))
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    torch.testing.assert_close(gated(x)[0], delta(x)[0], rtol=0, atol=1e-13)


def test_deltanet_is_ttt_linear_with_online_gd():
    """DeltaNet's rule is TTT-Linear's inner loop with b = 1, f(x) = xW (no inner LayerNorm or
    residual), W0 = 0, no token_idx, no RoPE and η_t = ttt_base_lr·σ(θ_lr x_t)/d with ttt_base_lr = d,
    on L2-normalised q (times K^−½) and k: W̄_t = W_{t−1} − η_t ∇½‖k_tW − v_t‖² is S_t with β_t = η_t.
    Both layers run their public forward on the same x and projections; forward hooks give TTT the
    features DeltaNet makes, and read each layer's output before its norm and o_proj."""
    torch.manual_seed(0)
    C, H = 32, 4
    d = C // H
    delta = DeltaNet(C, num_heads=H, use_short_conv=False, qk_activation="identity").double()
    ttt = seqzoo.create_layer("ttt_linear", C, num_heads=H, mini_batch_size=1, inner_norm=False, learnable_w0=False,
                              token_idx=False, rope=False, post_norm=False, ttt_base_lr=float(d),
                              backend="torch").double()
    with torch.no_grad():
        for n in ("q_proj", "k_proj", "v_proj"):
            getattr(ttt, n).weight.copy_(getattr(delta, n).weight)
        ttt.learnable_ttt_lr_weight.copy_(delta.b_proj.weight.unsqueeze(1))
        ttt.learnable_ttt_lr_bias.zero_()
    heads = lambda f: (lambda m, args, out: f(out.unflatten(-1, (H, d))).flatten(-2))
    ttt.q_proj.register_forward_hook(heads(lambda q: l2_normalize(q) * d ** -0.5))
    ttt.k_proj.register_forward_hook(heads(l2_normalize))
    ttt.v_proj.register_forward_hook(lambda m, args, out: F.silu(out))
    seen = {}
    delta.o_norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("delta", args[0].flatten(-2)))
    ttt.o_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("ttt", args[0]))
    x = torch.randn(2, 23, C, dtype=torch.float64)
    delta(x), ttt(x)
    torch.testing.assert_close(seen["ttt"], seen["delta"], rtol=0, atol=1e-12)


# --- where the layers run -------------------------------------------------------------------------------
def test_the_layers_are_registered_by_the_delta_plugin():
    for name in ("deltanet", "gated_deltanet", "mesanet", "longhorn", "titans"):
        assert seqzoo.layer_spec(name).plugin == "delta"


def test_cpu_run_imports_nothing_of_fla():
    code = ("import sys, torch, seqzoo\n"
            "for n, kw in [('deltanet', {}), ('gated_deltanet', {}), ('mesanet', {}), ('mesanet', {'solver': 'cg'}),\n"
            "              ('longhorn', {}), ('titans', {})]:\n"
            "    layer = seqzoo.create_layer(n, 32, **kw)\n"
            "    layer(torch.randn(1, 70, 32))\n"
            "assert not [m for m in sys.modules if m == 'fla' or m.startswith('fla.')], 'fla was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (and flash-linear-attention)")
@pytest.mark.parametrize(("name", "options", "state"), [("deltanet", {}, "S"), ("gated_deltanet", {}, "S"),
                                                       ("mesanet", {"solver": "cg"}, "h_kk")])
def test_cuda_fla_kernels_equal_torch_path(name, options, state):
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = seqzoo.create_layer(name, 256, num_heads=4, **options).cuda()
    x = torch.randn(2, 300, 256, device="cuda")
    y_fla, s_fla = layer(x)
    layer.config.backend = "torch"
    y_torch, s_torch = layer(x)
    torch.testing.assert_close(y_fla, y_torch, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(s_fla[state], s_torch[state], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "mesanet", "longhorn", "titans"])
def test_language_model_in_both_backbones(name, backbone):
    """The layers drop into both backbones (the Mamba one turns use_gate on); a model's step and a
    forward cut in two equal its forward; a training step's gradients reach every parameter."""
    options = {"d_state": 4} if name == "longhorn" else {"num_heads": 2}
    lm = check_language_model(name, backbone, **options)
    if backbone == "mamba" and name in ("deltanet", "gated_deltanet"):  # mesanet's: use_output_gate (fla's name)
        assert all(block_layer.config.use_gate for block_layer in (b.seq_modeling_block for b in lm.layers))


def test_default_comparison_keeps_its_layers_and_delta_has_a_preset():
    """The new family joins `seqzoo compare` through --layers or the `delta` preset, not the default set."""
    from seqzoo.bench.presets import DELTA_LAYERS, PAPER_LAYERS, preset

    for name in ("quick", "default", "paper"):
        assert preset(name)["layers"] == PAPER_LAYERS
    assert preset("delta")["layers"] == DELTA_LAYERS and preset("delta")["tasks"] == preset("default")["tasks"]
    assert all(name in seqzoo.list_layers() for name in PAPER_LAYERS + DELTA_LAYERS)
    assert not set(PAPER_LAYERS) & {"deltanet", "gated_deltanet", "mesanet", "longhorn", "titans"}


NEW_LAYERS = ["deltanet", "gated_deltanet", "mesanet", "longhorn", "titans"]


@pytest.mark.parametrize("name", NEW_LAYERS)
def test_half_precision_layers_carry_their_state(name):
    """bf16 weights and input: forward, forward from its state, then step; the state keeps its dtype
    (the recurrences compute in float32) and the numbers follow the float32 layer."""
    torch.manual_seed(0)
    layer = seqzoo.create_layer(name, 32)
    x = torch.randn(2, 10, 32)
    want, _ = layer(x)
    half = layer.bfloat16()
    y, state = half(x.bfloat16())
    assert all(t.dtype == torch.bfloat16 for t in state.values() if t.is_floating_point())
    y2, state = half(x.bfloat16(), state)
    y3, state = half.step(x[:, 0].bfloat16(), state)
    assert all(t.dtype == torch.bfloat16 for t in state.values() if t.is_floating_point())
    assert torch.isfinite(y2).all() and torch.isfinite(y3).all()
    assert (y.float() - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "longhorn"])
def test_empty_sequence_off_the_cpu(name):
    """Off the CPU the forward is one segment: T = 0 must still run (the meta device stands in)."""
    layer = seqzoo.create_layer(name, 32).to("meta")
    y, state = layer(torch.empty(2, 0, 32, device="meta"))
    assert y.shape == (2, 0, 32)


@pytest.mark.parametrize("value", [float("-inf"), -1e30, -1e4])
def test_strong_decay_is_exact(value):
    """A log-decay of −inf (or −1e30) resets the state: the chunked forms stay equal to the token loops
    (no −inf − (−inf), no cancellation of large cumulative sums)."""
    t = _inputs(1, 37, 2, 8, 4, gated=True, init=True)
    t["g"][0, 10, 0] = value
    t["g"][0, 20, 1] = value
    o_ref, S_ref = gated_delta_rule_reference(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["initial_state"])
    o, S = _op(t, chunk_size=16)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-12)
    o32, _ = _op({k: v.float() for k, v in t.items()}, chunk_size=16)
    assert (o32.double() - o_ref).abs().max() <= 1e-5 * o_ref.abs().max()
    m = _mesa_inputs(1, 37, 2, 8, 4)
    m["g"][0, 10, 0] = value
    o_ref, _ = mesa_net_reference(m["q"], m["k"], m["v"], m["g"], m["beta"], m["lamb"])
    torch.testing.assert_close(_mesa(m, chunk_size=16)[0], o_ref, rtol=0, atol=1e-12)


def test_states_are_never_the_callers_tensors():
    t = _inputs(1, 0, 2, 4, 4, init=True)
    for chunk in (None, 16):
        _, S = _op(t, chunk_size=chunk)
        assert S is not t["initial_state"] and S.data_ptr() != t["initial_state"].data_ptr()
    from seqzoo_plugins.delta import longhorn_scan

    S0 = torch.randn(1, 3, 2, requires_grad=True)
    for chunk in (None, 4):
        _, S = longhorn_scan(torch.zeros(1, 0, 3), torch.zeros(1, 0, 2), torch.zeros(1, 0, 2), torch.zeros(1, 0, 3),
                             initial_state=S0, output_final_state=True, chunk_size=chunk)
        assert S is not S0 and S.data_ptr() != S0.data_ptr()


def test_from_titans_pytorch_reads_the_hidden_width_off_the_weights():
    from seqzoo_plugins.delta import TitansMemory

    layer = seqzoo.create_layer("titans", 14, num_heads=2, memory_hidden=61)  # head_dim 7: 61/7 is not whole
    assert layer.w0.shape == (2, 7, 61) and isinstance(layer.learner, TitansMemory)
