"""The conformance suite on every registered layer, and the suite's own teeth."""

import types

import pytest
import torch

import seqzoo
from seqzoo.testing import CHECKS, check_layer, conformance_params

# Extra configurations per layer that the backbones use (share_qk / use_gate where they exist).
VARIANTS = {"share_qk": True, "use_gate": True}


def _cases():
    cases = []
    for name in seqzoo.list_layers():
        cases.append(pytest.param(name, {}, id=name))
        fields = seqzoo.layer_spec(name).field_names()
        variant = {k: v for k, v in VARIANTS.items() if k in fields}
        if variant:
            cases.append(pytest.param(name, variant, id=f"{name}-" + "-".join(variant)))
    return cases


@pytest.mark.parametrize("check", conformance_params())
@pytest.mark.parametrize(("name", "config"), _cases())
def test_every_registered_layer_conforms(name, config, check):
    check.run(name, **config)


def test_conformance_params_cover_every_check():
    assert [p.values[0].name for p in conformance_params()] == list(CHECKS)


class _Leaky(seqzoo.SequenceLayer):
    """Deliberately wrong in configurable ways, to prove the suite catches each."""

    def __init__(self, d_model, flaw="none"):
        super().__init__(d_model)
        self.flaw = flaw
        self.w = torch.nn.Linear(d_model, d_model)

    def init_state(self, batch_size, *, device=None, dtype=None):
        return {"h": torch.zeros(batch_size, self.d_model, device=device, dtype=dtype)}

    def state_size(self, seq_len):
        return self.d_model

    def step(self, x, state):
        state = self.check_input(x, state, step=True)
        h = 0.5 * state["h"] + x
        if self.flaw == "mutates":
            state["h"].add_(1.0)
        return self.w(h), {"h": h}

    def forward(self, x, state=None):
        state = self.check_input(x, state)
        ys = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        y = torch.stack(ys, 1) if ys else x.new_zeros(x.shape)
        if self.flaw == "peeks" and x.shape[1] > 1:
            y = y + x.flip(1)  # output t sees input T-1-t: not causal
        if self.flaw == "batch_mix" and x.shape[1] > 0:
            y = y + x.mean(0, keepdim=True)
        return y, state


def test_a_correct_layer_passes():
    assert set(check_layer(_Leaky)) == set(CHECKS)


@pytest.mark.parametrize(("flaw", "caught_by"), [
    ("peeks", "causality"),
    ("batch_mix", "batch_independence"),
    ("mutates", "state_not_mutated"),
])
def test_the_suite_catches_flaws(flaw, caught_by):
    with pytest.raises(AssertionError) as info:
        check_layer(lambda d, **c: _Leaky(d, flaw=flaw))
    assert caught_by in str(info.value)


def test_check_language_model_catches_a_parameter_without_gradient():
    """``seqzoo.testing.check_language_model`` passes a correct layer and names a parameter no gradient reaches."""
    from seqzoo.testing import check_language_model

    class _Unused(_Leaky):
        def __init__(self, d_model, flaw="none"):
            super().__init__(d_model, flaw)
            self.unused = torch.nn.Parameter(torch.ones(3))

    for name, cls in (("tmp_ok", _Leaky), ("tmp_unused", _Unused)):
        plugin = types.SimpleNamespace(register_layers=seqzoo.hookimpl(lambda register, n=name, c=cls: register(n, c)))
        seqzoo.register_plugin(plugin, name=f"{name}-plugin")
    try:
        check_language_model("tmp_ok", "transformer", length=12)
        with pytest.raises(AssertionError, match="unused"):
            check_language_model("tmp_unused", "mamba", length=12)
    finally:
        seqzoo.unregister_plugin("tmp_ok-plugin")
        seqzoo.unregister_plugin("tmp_unused-plugin")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rnn_written_backward_equals_autograd_through_the_loop(dtype, monkeypatch):
    """The naive RNN trains through its written backward of the tanh recurrence: outputs, the final state and
    the gradients of the input, the initial state and every parameter equal autograd's through the token loop
    (float64 to rounding; float32 to its rounding), with a loss that reads the final state too; a second
    derivative equals the loop's."""
    from seqzoo_plugins import rnn as rnn_plugin

    torch.manual_seed(0)
    layer = seqzoo.create_layer("rnn", 16, state_dim=12).to(dtype)
    x = torch.randn(3, 11, 16, dtype=dtype, requires_grad=True)
    s0 = torch.randn(3, 12, dtype=dtype, requires_grad=True)
    weights = torch.randn(3, 11, 16, dtype=dtype)

    def run():
        y, state = layer(x, {"s": s0})
        loss = (y * weights).sum() + state["s"].square().sum()
        return y, state["s"], torch.autograd.grad(loss, [x, s0, *layer.parameters()])

    calls = []
    real = rnn_plugin._TanhRecurrence.apply
    monkeypatch.setattr(rnn_plugin._TanhRecurrence, "apply", lambda *a: calls.append(1) or real(*a))
    y, s, grads = run()
    assert calls == [1]
    def second():  # a second derivative, with respect to a weight only the recurrence reads
        (g,) = torch.autograd.grad(layer(x, {"s": s0})[0].square().sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), layer.theta_ss.weight)[0]

    second_written = second()
    calls.clear()
    monkeypatch.setattr(rnn_plugin.native, "trainable", lambda *tensors: False)  # autograd's record of the loop
    y_ref, s_ref, grads_ref = run()
    assert not calls
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(s, s_ref, **tol)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(second_written, second(), **tol)  # exact, not missing the recurrence's part
