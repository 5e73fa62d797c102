"""The TTT dual form's written backward (seqzoo_plugins.ttt.scan_grad and the native backward kernels)
against autograd through the mini-batch loop: the op alone in float64 (the torch form) and float32
(the native kernel), and whole layers, every parameter, with remainders, share_qk and use_gate."""

from __future__ import annotations

import pytest
import torch
from seqzoo_plugins.ttt import native_kernels, scan_grad
from seqzoo_plugins.ttt.linear import ttt_linear_dual
from seqzoo_plugins.ttt.mlp import ttt_mlp_dual
from seqzoo_plugins.ttt.reference import LN_EPS

import seqzoo

needs_native = pytest.mark.skipif(not native_kernels.LIB.available(), reason="no C compiler: the native kernels are off")

DUAL = {"linear": ttt_linear_dual, "mlp": ttt_mlp_dual}
TRAIN = {"linear": scan_grad.ttt_linear_train, "mlp": getattr(scan_grad, "ttt_mlp_train", None)}


def _inputs(kind: str, B=2, H=3, T=64, d=16, b=16, dtype=torch.float64, seed=0):
    """Inputs of ``ttt_<kind>_dual`` away from the initialisation (zeros and ones hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()
    XQ, XK, XV = rand(B, H, T, d), rand(B, H, T, d), rand(B, H, T, d)
    lr = (0.5 * torch.rand(B, H, T, generator=g, dtype=dtype)).requires_grad_()
    tok = (1.0 / torch.arange(1, b + 1, dtype=dtype) + 0.1 * torch.randn(b, generator=g, dtype=dtype)).requires_grad_()
    if kind == "linear":
        weights = [rand(B, H, d, d, scale=0.3), rand(B, H, 1, d, scale=0.3)]
    else:
        weights = [rand(B, H, d, 4 * d, scale=0.3), rand(B, H, 1, 4 * d, scale=0.3), rand(B, H, 4 * d, d, scale=0.3),
                   rand(B, H, 1, d, scale=0.3)]
    ln_w = (1.0 + 0.3 * torch.randn(H, d, generator=g, dtype=dtype)).requires_grad_()
    ln_b = rand(H, d, scale=0.3)
    return [XQ, XK, XV, lr, tok, *weights, ln_w, ln_b]


def _grads(fn, inputs, b, weights, **kw):
    outs = fn(*inputs, b, **kw)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    return outs, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("group", [0, 1, 3])
def test_written_backward_equals_autograd_float64(kind, group):
    """The torch form (float64 takes it): outputs and every input's gradient equal autograd's through
    the loop to float64 rounding, for any grouping of the kept weights."""
    inputs = _inputs(kind, T=80)
    outs_ref = DUAL[kind](*inputs, 16)
    weights = [torch.randn_like(o) for o in outs_ref]
    _, ref = _grads(DUAL[kind], inputs, 16, weights)
    outs, got = _grads(TRAIN[kind], inputs, 16, weights, group=group)
    for o, r in zip(outs, outs_ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


@needs_native
@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("d", [16, 64, 24])
def test_native_backward_equals_autograd(kind, d):
    """The native kernels (float32) against autograd through the loop in float64, to float32 rounding;
    head widths on and off the kernels' 64-column fast paths."""
    inputs = _inputs(kind, B=1, H=2, T=48, d=d)
    outs_ref = DUAL[kind](*inputs, 16)
    weights = [torch.randn_like(o) for o in outs_ref]
    _, ref = _grads(DUAL[kind], inputs, 16, weights)
    single = [t.detach().float().requires_grad_() for t in inputs]
    outs, got = _grads(TRAIN[kind], single, 16, [w.float() for w in weights])
    assert scan_grad.native_applies(*single)
    for o, r in zip(outs, outs_ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-4)
    for a, r in zip(got, ref):
        scale = r.abs().max().item()
        assert (a.double() - r).abs().max().item() <= 2e-5 * scale, (a.shape, scale)


def _layer_grads(name, x, config, *, written: bool, monkeypatch):
    torch.manual_seed(0)
    layer = seqzoo.create_layer(name, x.shape[-1], **config).to(x.dtype).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with monkeypatch.context() as m:
        if not written:
            m.setattr(scan_grad, "applies", lambda *tensors: False)
        xx = x.clone().requires_grad_()
        y, state = layer(xx)
        weights = torch.randn_like(y)
        loss = (y * weights).sum() + sum(v.float().sum() for v in state.values() if v.is_floating_point())
        grads = torch.autograd.grad(loss, [xx, *layer.parameters()])
    return y, dict(zip(["x", *(n for n, _ in layer.named_parameters())], grads))


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp"])
@pytest.mark.parametrize("config", [
    {},
    {"share_qk": True, "use_gate": True},
    {"scan_checkpoint_group_size": 2},
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_gradients_equal_autograd(name, config, dtype, monkeypatch):
    """A whole layer training through the written backward has autograd's gradients for every parameter
    (learnable_token_idx, the η gate, W0/b0, the inner norm, the projections) and its input, over a
    sequence with a trailing partial mini-batch (T = 2·16 + 5) and a loss that reads the final state."""
    x = torch.randn(2, 37, 32, dtype=dtype)
    cfg = dict(num_heads=2, mini_batch_size=16, **config)
    y, got = _layer_grads(name, x, cfg, written=True, monkeypatch=monkeypatch)
    y_ref, ref = _layer_grads(name, x, cfg, written=False, monkeypatch=monkeypatch)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    assert got.keys() == ref.keys()
    for key in ref:
        scale = max(ref[key].abs().max().item(), 1e-3)
        assert (got[key] - ref[key]).abs().max().item() <= tol * scale, key


def test_the_written_backward_runs_when_a_layer_trains(monkeypatch):
    """Training on a CPU takes the written backward (its Function is in the graph), not autograd's record of
    the loop; without autograd nothing of it runs."""
    layer = seqzoo.create_layer("ttt_linear", 32, num_heads=2, mini_batch_size=16).train()
    y, _ = layer(torch.randn(1, 32, 32, requires_grad=True))
    names, seen, stack = set(), set(), [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and id(fn) not in seen:
            seen.add(id(fn))
            names.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
    assert any(n.startswith("_TTTLinear") for n in names), names
    with torch.no_grad():
        assert layer(torch.randn(1, 32, 32))[0].grad_fn is None


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["torch_form", "native"])
def test_second_derivatives_equal_autograds(kind, dtype):
    """A second derivative through the written backward (create_graph=True: the backward recomputes
    autograd's record of a plain loop) equals autograd's through the dual form in float64, with respect to
    inputs and weights that only the scan reads: the torch form to float64 rounding, the native Functions
    (float32) to float32 rounding."""
    inputs64 = _inputs(kind, B=1, H=2, T=32, d=8)
    inputs = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    if dtype == torch.float32 and native_kernels.LIB.available():
        assert scan_grad.native_applies(*inputs)

    def second(fn, xs):
        z = fn(*xs, 16)[0]
        (g,) = torch.autograd.grad(z.square().sum(), xs[0], create_graph=True)
        return torch.autograd.grad(g.square().sum(), [xs[1], xs[3], xs[5], xs[-2]])

    for a, b in zip(second(TRAIN[kind], inputs), second(DUAL[kind], inputs64)):
        scale = b.abs().max().item()
        bound = 1e-10 if dtype == torch.float64 else 1e-4
        assert (a.double() - b).abs().max().item() <= bound * scale, (a.shape, scale)


def test_bad_lengths_are_refused():
    inputs = _inputs("linear", B=1, H=1, T=40, d=8)
    with pytest.raises(ValueError, match="whole number of mini-batches"):
        scan_grad.ttt_linear_train(*inputs, 16)


@needs_native
def test_native_backward_checks_its_inputs():
    inputs = [t.detach().float() for t in _inputs("linear", B=1, H=1, T=32, d=8)]
    dZ, dW, db = torch.zeros(1, 1, 32, 8), torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 1, 8)
    with pytest.raises(ValueError, match="expected"):
        native_kernels.ttt_linear_dual_bwd(*inputs, 16, LN_EPS, dZ[:, :, :16], dW, db)
