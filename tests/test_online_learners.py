"""The TTT machinery's online-learner options: DeltaNet and Gated DeltaNet written as learners equal the
delta-rule layers; momentum and a decay after the step equal a plain loop (Titans' update)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import seqzoo
from seqzoo.testing import CHECKS, check_layer
from seqzoo.ttt_layers import TTTLayer

TUTORIAL = Path(__file__).parents[1] / "docs" / "learner-tutorial.md"


def _tutorial_namespace() -> dict:
    """Run the tutorial's DeltaNet block (the one under its 'tested' marker)."""
    text = TUTORIAL.read_text()
    block = re.search(r"<!-- tested: tests/test_online_learners.py runs this block -->\n```python\n(.*?)```",
                      text, re.S)
    assert block, "the tested block of docs/learner-tutorial.md is missing"
    namespace: dict = {}
    exec(compile(block.group(1), str(TUTORIAL), "exec"), namespace)  # noqa: S102 - the project's own docs
    return namespace


@pytest.fixture(scope="module")
def tutorial():
    return _tutorial_namespace()


def _from_delta(learner_layer, delta_layer):
    """Copy a delta-rule layer's weights into the learner's layer (b_proj is the η gate's weight)."""
    state = delta_layer.state_dict()
    state["learnable_ttt_lr_weight"] = state.pop("b_proj.weight").unsqueeze(1)
    state["learnable_ttt_lr_bias"] = torch.zeros_like(learner_layer.learnable_ttt_lr_bias)
    state.update({name: buf for name, buf in learner_layer.named_buffers()})  # W0 = 0 (learnable_w0=False)
    learner_layer.load_state_dict(state, strict=True)


def _same_layer(a, b, C, T=23):
    x = torch.randn(2, T, C, dtype=torch.float64)
    y_a, s_a = a(x)
    y_b, s_b = b(x)
    torch.testing.assert_close(y_a, y_b, rtol=0, atol=1e-12)
    # carried state: a second call, then token by token
    y_a2, s_a = a(x[:, :7], s_a)
    y_b2, s_b = b(x[:, :7], s_b)
    torch.testing.assert_close(y_a2, y_b2, rtol=0, atol=1e-12)
    for t in range(3):
        y_a3, s_a = a.step(x[:, t], s_a)
        y_b3, s_b = b.step(x[:, t], s_b)
        torch.testing.assert_close(y_a3, y_b3, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", [{}, {"allow_neg_eigval": True}, {"use_gate": True}],
                         ids=["plain", "neg_eigval", "gated_norm"])
def test_deltanet_as_a_learner_is_deltanet(tutorial, variant):
    torch.manual_seed(0)
    C, H = 32, 4
    options = dict(tutorial["DELTANET"])
    if variant.get("allow_neg_eigval"):
        options["lr_gate"] = "2sigmoid"
    learner_layer = tutorial["DeltaLearner"].make_layer(C, num_heads=H, use_gate=variant.get("use_gate", False),
                                                        **options).double()
    assert type(learner_layer) is TTTLayer
    delta = seqzoo.create_layer("deltanet", C, num_heads=H, **variant).double()
    with torch.no_grad():
        for p in delta.parameters():  # away from the initial values (o_norm weight, convs)
            p.add_(0.1 * torch.randn_like(p))
    _from_delta(learner_layer, delta)
    _same_layer(learner_layer, delta, C)


@pytest.mark.parametrize("use_gate", [False, True])
def test_gated_deltanet_as_a_learner_is_gated_deltanet(tutorial, use_gate):
    torch.manual_seed(1)
    C, H = 32, 4
    learner_layer = tutorial["DeltaLearner"].make_layer(C, num_heads=H, use_gate=use_gate, decay="softplus",
                                                        **tutorial["DELTANET"]).double()
    gated = seqzoo.create_layer("gated_deltanet", C, num_heads=H, expand_v=1.0, use_gate=use_gate).double()
    with torch.no_grad():
        for p in gated.parameters():
            p.add_(0.1 * torch.randn_like(p))
    _from_delta(learner_layer, gated)
    _same_layer(learner_layer, gated, C)


class _Linear(seqzoo.GradientLearner):
    def init_params(self):
        return {"W": 0.1 * torch.randn(self.head_dim, self.head_dim)}

    def predict(self, params, x):
        return x @ params["W"]


def _views_and_rate(layer, x, H, d):
    """q, k, v (T, H, d) and η_t = σ(θ_lr x_t + b)/d (T, H) of one sequence x (T, C), written out."""
    T = x.shape[0]
    q, k, v = (p(x).view(T, H, d) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    eta = torch.sigmoid(torch.einsum("tc,hc->th", x, layer.learnable_ttt_lr_weight[:, 0])
                        + layer.learnable_ttt_lr_bias[:, 0]) / d
    return q, k, v, eta


class _KeyLinear(_Linear):
    key_axes = {"W": 0}  # f(x) = xW: the rows of W are the key features


@pytest.mark.parametrize("kind", ["softplus", "sigmoid"])
@pytest.mark.parametrize("position", ["before", "after"])
def test_key_decay_equals_a_plain_loop(kind, position):
    """decay_shape='key': α_t ∈ R^d per head scales each weight along its key axis, diag(α) W."""
    torch.manual_seed(3)
    C, H, T = 16, 2, 7
    d = C // H
    layer = _KeyLinear.make_layer(C, num_heads=H, mini_batch_size=1, rope=False, token_idx=False, post_norm=False,
                                  decay=kind, decay_shape="key", decay_position=position).double()
    if kind == "softplus":
        with torch.no_grad():
            layer.A_log.fill_(-1.0)
    x = torch.randn(1, T, C, dtype=torch.float64)
    y, _ = layer(x)
    with torch.no_grad():
        q, k, v, eta = _views_and_rate(layer, x[0], H, d)
        if kind == "softplus":
            A = layer.A_log.exp().repeat_interleave(d)
            alpha = torch.exp(-A * F.softplus(layer.a_proj(x[0]) + layer.dt_bias)).view(T, H, d)
        else:
            alpha = (1 - torch.sigmoid(layer.decay_proj(x[0]))).view(T, H, d)
        zs = torch.zeros(T, H, d, dtype=torch.float64)
        for h in range(H):
            W = layer.W[h].clone()
            for t in range(T):
                decayed = alpha[t, h, :, None] * W
                W_in = decayed if position == "before" else W
                grad = torch.outer(k[t, h], k[t, h] @ W_in - v[t, h])  # ∇ ½‖kW − v‖²
                W = decayed - eta[t, h] * grad
                zs[t, h] = q[t, h] @ W
    torch.testing.assert_close(y[0], layer.o_proj(zs.reshape(T, C)), rtol=0, atol=1e-12)


def test_key_decay_needs_the_key_axes():
    with pytest.raises(ValueError, match="key_axes"):
        _Linear.make_layer(16, num_heads=2, mini_batch_size=1, decay="sigmoid", decay_shape="key")
    layer = _KeyMLP.make_layer(16, num_heads=2, mini_batch_size=1, decay="sigmoid", decay_shape="key", momentum=True)
    assert layer.decay_proj.weight.shape == (16, 16)


class _MLP(seqzoo.GradientLearner):
    def init_params(self):
        d = self.head_dim
        return {"W1": 0.3 * torch.randn(d, 2 * d), "W2": 0.3 * torch.randn(2 * d, d)}

    def predict(self, params, x):
        return F.gelu(x @ params["W1"]) @ params["W2"]


class _KeyMLP(_MLP):
    key_axes = {"W1": 0, "W2": 1}  # the key features: W1's rows, W2's columns (its output)


@pytest.mark.parametrize("learner", [_Linear, _MLP], ids=["linear_memory", "mlp_memory"])
@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("momentum", [False, True], ids=["no_momentum", "momentum"])
def test_decay_and_momentum_equal_a_plain_loop(learner, position, momentum):
    """S_t = μ_t S_{t−1} − η_t ∇ℓ_t(W_in), W_t = α_t W_{t−1} + S_t, z_t = f(q_t; W_t), with W_in = α_t W_{t−1}
    ("before") or W_{t−1} ("after"); the gradients by autograd on one head at a time."""
    torch.manual_seed(2)
    C, H, T = 16, 2, 9
    d = C // H
    layer = learner.make_layer(C, num_heads=H, mini_batch_size=1, rope=False, token_idx=False, post_norm=False,
                               decay="softplus", decay_position=position, momentum=momentum).double()
    with torch.no_grad():
        layer.A_log.fill_(-1.0)  # decays well inside (0, 1)
    x = torch.randn(1, T, C, dtype=torch.float64)
    y, state = layer(x)
    with torch.no_grad():
        q, k, v, eta = _views_and_rate(layer, x[0], H, d)
        alpha = torch.exp(-layer.A_log.exp() * F.softplus(layer.a_proj(x[0]) + layer.dt_bias))
        mu = torch.sigmoid(layer.momentum_proj(x[0])) if momentum else torch.zeros(T, H, dtype=torch.float64)
    names = layer.inner_names
    zs = torch.zeros(T, H, d, dtype=torch.float64)
    for h in range(H):
        W = {n: getattr(layer, n)[h].detach().clone() for n in names}
        S = {n: torch.zeros_like(w) for n, w in W.items()}
        for t in range(T):
            W_in = {n: (alpha[t, h] * w if position == "before" else w).requires_grad_(True) for n, w in W.items()}
            loss = 0.5 * (layer.learner.predict(W_in, k[t, h]) - v[t, h]).pow(2).sum()
            grads = torch.autograd.grad(loss, [W_in[n] for n in names])
            S = {n: mu[t, h] * S[n] - eta[t, h] * g for n, g in zip(names, grads)}
            W = {n: alpha[t, h] * W[n] + S[n] for n in names}
            with torch.no_grad():
                zs[t, h] = layer.learner.predict(W, q[t, h])
    torch.testing.assert_close(y[0], layer.o_proj(zs.reshape(T, C)), rtol=0, atol=1e-12)
    if momentum:
        torch.testing.assert_close(state[f"{names[0]}_momentum"][0, -1], S[names[0]], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("learner", "options"), [
    (_Linear, dict(qk_norm="l2", short_conv=3, output_norm="rmsnorm", lr_gate="2sigmoid", lr_per_dim=False,
                   decay="softplus")),
    (_MLP, dict(qk_norm="l2", decay="softplus", decay_position="after", momentum=True, use_gate=True,
                output_norm="rmsnorm")),
    (_KeyMLP, dict(decay="softplus", decay_shape="key", momentum=True, qk_norm="l2")),
], ids=["linear_delta_options", "mlp_titans_options", "mlp_key_decay"])
def test_online_learners_conform(learner, options):
    def factory(d, **config):
        return learner.make_layer(d, **{**dict(mini_batch_size=1, rope=False), **options, **config})

    assert set(check_layer(factory, num_heads=2)) == set(CHECKS)


def test_fast_layers_give_way_to_the_generic_one():
    layer = seqzoo.create_layer("ttt_linear", 32, num_heads=2, qk_norm="l2")
    assert type(layer) is TTTLayer  # ttt_linear's dual form implements none of the online options
    assert type(seqzoo.create_layer("ttt_linear", 32, num_heads=2)) is not TTTLayer
    from seqzoo_plugins.ttt import LinearLearner, TTTLinear

    with pytest.raises(ValueError, match="does not implement"):
        TTTLinear(32, learner=LinearLearner, num_heads=2, qk_norm="l2")


@pytest.mark.parametrize(("options", "match"), [
    ({"decay": "softplus"}, "mini_batch_size=1"),
    ({"momentum": True}, "mini_batch_size=1"),
    ({"lr_gate": "tanh", "mini_batch_size": 1}, "lr_gate"),
    ({"output_norm": "batchnorm"}, "output_norm"),
    ({"short_conv": 4, "share_qk": True}, "short_conv and share_qk"),
    ({"short_conv": -1}, "short_conv"),
    ({"decay_shape": "row", "mini_batch_size": 1, "decay": "sigmoid"}, "decay_shape"),
])
def test_bad_online_options(options, match):
    with pytest.raises(ValueError, match=match):
        _Linear.make_layer(16, num_heads=2, **options)
