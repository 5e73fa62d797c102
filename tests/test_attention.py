"""linear_attention and self_attention: conformance, naive references, KV cache, inside both backbones."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import seqzoo
from seqzoo.testing import assert_close, check_layer, scan_steps


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small shapes: one thread is faster, and immune to thread-pool stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CONFIGS = {
    "linear_attention": [
        {},
        {"share_qk": True, "use_gate": True},
        {"feature_map": "identity", "normalize": False},
        {"chunk_size": 8, "num_heads": 2},
    ],
    "self_attention": [
        {},
        {"share_qk": True, "use_gate": True},
        {"rope": False, "num_heads": 2},
    ],
}


@pytest.mark.parametrize(
    ("name", "config"),
    [(n, c) for n, cs in CONFIGS.items() for c in cs],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={w}" for k, w in v.items()) or "default",
)
def test_conformance(name, config):
    check_layer(name, **config)


# --- independent references ------------------------------------------------------------------------
def make_layer(name: str, d_model: int = 32, **config):
    """A float64 layer with every parameter moved off its init (so biases and gates matter)."""
    torch.manual_seed(0)
    layer = seqzoo.create_layer(name, d_model, **config).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def ref_qkv(layer, x):
    """q, k, v (B, H, T, d) straight from the weights; share_qk as ttt-lm-pytorch (padded conv, cut)."""
    B, T, C = x.shape
    H = layer.config.num_heads
    xq = x @ layer.q_proj.weight.T
    if layer.config.share_qk:
        K = layer.conv_q.weight.shape[-1]
        conv = lambda m: F.conv1d(xq.transpose(1, 2), m.weight, m.bias, padding=K - 1, groups=C)[..., :T]
        q, k = conv(layer.conv_q).transpose(1, 2), conv(layer.conv_k).transpose(1, 2)
    else:
        q, k = xq, x @ layer.k_proj.weight.T
    v = x @ layer.v_proj.weight.T
    heads = lambda t: t.reshape(B, T, H, C // H).transpose(1, 2)
    return heads(q), heads(k), heads(v)


def ref_output(layer, x, y):
    """y (B, H, T, d) -> merged heads, optional gate, o_proj."""
    B, H, T, d = y.shape
    y = y.transpose(1, 2).reshape(B, T, H * d)
    if layer.config.use_gate:
        y = F.gelu(x @ layer.g_proj.weight.T, approximate="tanh") * y
    return y @ layer.o_proj.weight.T


def ref_linear_attention(layer, x):
    """The quadratic form: A = φ(Q)φ(K)ᵀ masked to s ≤ t; y = A V [/ (A 1 + eps)]."""
    q, k, v = ref_qkv(layer, x)
    if layer.config.feature_map == "elu+1":
        q, k = F.elu(q) + 1, F.elu(k) + 1
    T = x.shape[1]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    A = (q @ k.transpose(-1, -2)) * mask
    y = A @ v
    if layer.config.normalize:
        y = y / (A.sum(-1, keepdim=True) + layer.config.eps)
    return ref_output(layer, x, y)


def ref_rope(t, positions, theta=10000.0):
    """Rotate adjacent pairs (2i, 2i+1) as complex numbers by e^{i·pos·theta^(-2i/d)}."""
    d = t.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(
        torch.ones(len(positions), d // 2, dtype=torch.float64), positions[:, None].double() * freqs
    )
    tc = torch.view_as_complex(t.reshape(*t.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(tc * rot).flatten(-2)


def ref_self_attention(layer, x):
    """Softmax attention with an explicit -inf mask above the diagonal, scale 1/√d, RoPE at 0..T-1."""
    q, k, v = ref_qkv(layer, x)
    T, d = x.shape[1], q.shape[-1]
    if layer.config.rope:
        pos = torch.arange(T)
        q, k = ref_rope(q, pos, layer.config.rope_theta), ref_rope(k, pos, layer.config.rope_theta)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
    return ref_output(layer, x, torch.softmax(scores, dim=-1) @ v)


LA_VARIANTS = [
    {},
    {"feature_map": "identity", "normalize": False},
    {"feature_map": "elu+1", "normalize": False},
    {"share_qk": True, "use_gate": True, "conv_kernel": 3},
]


@pytest.mark.parametrize("config", LA_VARIANTS, ids=str)
@pytest.mark.parametrize("T", [1, 5, 63, 64, 65, 130, 200])
def test_linear_attention_chunked_equals_quadratic(config, T):
    layer = make_layer("linear_attention", **config)
    x = torch.randn(2, T, 32, dtype=torch.float64)
    with torch.no_grad():
        y, _ = layer(x)
        assert_close(y, ref_linear_attention(layer, x), 1e-10, f"chunked vs quadratic, T={T}")


@pytest.mark.parametrize("config", [LA_VARIANTS[0], LA_VARIANTS[1], LA_VARIANTS[3]], ids=str)
@pytest.mark.parametrize(
    ("chunk_size", "scan_blocks", "T"), [(4, 1, 37), (4, 2, 37), (8, 3, 200), (16, 2, 64)]
)
def test_linear_attention_chunk_groups_equal_quadratic(config, chunk_size, scan_blocks, T):
    """The chunks in groups of scan_blocks, each group from the state the previous one ends in (whole and
    partial groups, a partial last chunk), continuing from a given state: the same outputs and state."""
    layer = make_layer("linear_attention", chunk_size=chunk_size, scan_blocks=scan_blocks, **config)
    whole = make_layer("linear_attention", chunk_size=chunk_size, **config)
    whole.load_state_dict(layer.state_dict())
    x = torch.randn(2, T, 32, dtype=torch.float64)
    with torch.no_grad():
        y, state = layer(x)
        assert_close(y, ref_linear_attention(layer, x), 1e-10, f"groups of {scan_blocks} chunks vs quadratic")
        _, prefix = layer(x[:, :5])
        y_rest, state_rest = layer(x[:, 5:], prefix)
        y_whole, state_whole = whole(x[:, 5:], prefix)
    assert_close(y_rest, y[:, 5:], 1e-10, "continued from a state")
    for key in state:
        assert_close(state_rest[key], state[key], 1e-10, f"state {key}")
        assert_close(state_whole[key], state[key], 1e-10, f"state {key}, one group")
    assert_close(y_whole, y_rest, 1e-10, "one group vs groups")


def test_linear_attention_chunked_refuses_empty_groups():
    from seqzoo_plugins.attention import linear_attention_chunked

    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="blocks"):
        linear_attention_chunked(q, q, q, torch.zeros(1, 2, 4, 4), None, 4, blocks=0)


def test_linear_attention_empty_batch():
    layer = make_layer("linear_attention")
    y, state = layer(torch.randn(0, 70, 32, dtype=torch.float64))
    assert y.shape == (0, 70, 32) and state["S"].shape[0] == 0


def test_linear_attention_groups_bound_the_chunk_states(monkeypatch):
    """The per-chunk states are formed one group at a time, (B, H, scan_blocks (+1), d, e), never for all
    of T; forward goes segment by segment, a group each."""
    from seqzoo_plugins import attention

    seen = []
    inner = attention._linear_attention_group

    def spy(q, *args):
        seen.append(q.shape[2])
        return inner(q, *args)

    monkeypatch.setattr(attention, "_linear_attention_group", spy)
    layer = make_layer("linear_attention", chunk_size=8, scan_blocks=4)
    with torch.no_grad():
        layer(torch.randn(1, 100, 32, dtype=torch.float64))
    assert seen == [32, 32, 32, 4]


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 500])
def test_linear_attention_chunk_size_does_not_matter(chunk_size):
    layer = make_layer("linear_attention", chunk_size=chunk_size)
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(layer(x)[0], ref_linear_attention(layer, x), 1e-10, f"chunk_size={chunk_size}")


def test_linear_attention_unnormalized_is_exactly_theorem_1_form():
    """normalize=False, identity: y_t = o_proj(Σ_{s≤t} (q_t·k_s) v_s), no scaling; degree 3 in x."""
    layer = make_layer("linear_attention", d_model=16, num_heads=2, feature_map="identity", normalize=False)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    q, k, v = ref_qkv(layer, x)
    y = torch.zeros_like(v)
    for t in range(9):
        for s in range(t + 1):
            y[:, :, t] += (q[:, :, t] * k[:, :, s]).sum(-1, keepdim=True) * v[:, :, s]
    with torch.no_grad():
        got, state = layer(x)
        assert_close(got, ref_output(layer, x, y), 1e-12, "token loop of Σ (q·k) v")
        assert_close(layer(3.0 * x)[0], 27.0 * got, 1e-12, "homogeneous of degree 3 (no normalisation)")
    # the state is W = Σ_s k_s v_sᵀ per head: one batch-GD step of ½‖W k − v‖² from W = 0 with η = 1
    assert_close(state["S"], torch.einsum("bhtd,bhte->bhde", k, v), 1e-12, "S = Σ k vᵀ")
    assert set(state) == {"S"}


@pytest.mark.parametrize("config", [{}, {"rope": False}, {"share_qk": True, "use_gate": True}], ids=str)
@pytest.mark.parametrize("T", [1, 6, 33])
def test_self_attention_equals_naive_softmax(config, T):
    layer = make_layer("self_attention", **config)
    x = torch.randn(2, T, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(layer(x)[0], ref_self_attention(layer, x), 1e-12, f"SDPA vs naive softmax, T={T}")


@pytest.mark.parametrize("config", [{}, {"share_qk": True, "use_gate": True}], ids=str)
def test_self_attention_kv_cache(config):
    layer = make_layer("self_attention", **config)
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    with torch.no_grad():
        y, state = layer(x)
        assert state["k"].shape == state["v"].shape == (2, 4, 30, 8)
        # the cache holds RoPE-rotated keys at absolute positions, and raw values
        q, k, v = ref_qkv(layer, x)
        assert_close(state["k"], ref_rope(k, torch.arange(30)), 1e-12, "cached keys are post-RoPE")
        assert_close(state["v"], v, 1e-12, "cached values")
        # prefill, then several chunks, then token-by-token decode
        ys, st = [], None
        for lo, hi in ((0, 11), (11, 12), (12, 25)):
            yi, st = layer(x[:, lo:hi], st)
            ys.append(yi)
        y_dec, st = scan_steps(layer, x[:, 25:], st)
        ys.append(y_dec)
    assert_close(torch.cat(ys, 1), y, 1e-12, "prefill + chunks + decode vs one forward")
    assert_close(st["k"], state["k"], 1e-12, "final cache")
    assert layer.state_size(30) == 2 * 4 * 8 * 30 + (3 * 32 if config else 0)


def test_self_attention_rejects_mismatched_cache():
    layer = make_layer("self_attention")
    x = torch.randn(1, 4, 32, dtype=torch.float64)
    _, st = layer(x)
    bad = {**st, "v": st["v"][:, :, :2]}
    with pytest.raises(ValueError, match="same length"):
        layer(x, bad)


def test_state_sizes():
    la = seqzoo.create_layer("linear_attention", 64)
    assert la.state_size(10) == la.state_size(10_000) == 4 * 16 * 16 + 4 * 16
    assert sum(v[0].numel() for v in la.init_state(2).values()) == la.state_size(0)
    la = seqzoo.create_layer("linear_attention", 64, normalize=False, share_qk=True)
    assert la.state_size(5) == 4 * 16 * 16 + 64 * 3 == sum(v[0].numel() for v in la.init_state(1).values())
    sa = seqzoo.create_layer("self_attention", 64)
    assert sa.state_size(100) == 2 * 64 * 100


@pytest.mark.parametrize(
    ("name", "config", "words"),
    [
        ("linear_attention", {"num_heads": 3}, ("divisible", "32", "3")),
        ("self_attention", {"num_heads": 5}, ("divisible", "32", "5")),
        ("linear_attention", {"feature_map": "relu"}, ("feature_map", "relu", "elu+1")),
        ("self_attention", {"num_heads": 32}, ("even head_dim", "1")),
        ("linear_attention", {"chunk_size": 0}, ("chunk_size",)),
        ("linear_attention", {"scan_blocks": 0}, ("scan_blocks", "positive")),
        ("self_attention", {"num_heads": 0}, ("num_heads",)),
    ],
)
def test_bad_config(name, config, words):
    with pytest.raises(ValueError) as info:
        seqzoo.create_layer(name, 32, **config)
    for w in words:
        assert w in str(info.value)


def test_odd_head_dim_without_rope_is_fine():
    layer = seqzoo.create_layer("self_attention", 12, num_heads=4, rope=False)
    y, st = layer(torch.randn(1, 5, 12))
    assert y.shape == (1, 5, 12) and st["k"].shape == (1, 4, 5, 3)


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
@pytest.mark.parametrize("name", ["linear_attention", "self_attention"])
def test_inside_language_model(name, backbone):
    torch.manual_seed(0)
    lm = seqzoo.create_model(name, backbone=backbone, vocab_size=50, d_model=32, n_layers=2).double()
    if backbone == "mamba":  # the Mamba backbone turns on share_qk and use_gate
        layer = lm.layers[0].seq_modeling_block
        assert layer.config.share_qk and layer.config.use_gate and hasattr(layer, "conv_q")
    ids = torch.randint(0, 50, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, state = lm(ids)
        st = lm.init_state(2)
        steps = []
        for t in range(ids.shape[1]):
            out, st = lm.step(ids[:, t], st)
            steps.append(out)
        # prompt by forward, continuation by forward from the state
        half, st2 = lm(ids[:, :13])
        rest, st2 = lm(ids[:, 13:], st2)
    assert_close(torch.stack(steps, 1), logits, 1e-10, f"{name} in {backbone}: forward vs lm.step")
    assert_close(torch.cat([half, rest], 1), logits, 1e-10, f"{name} in {backbone}: split forward")
    assert set(st) == set(state)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("linear_attention", {"share_qk": True}),
        ("self_attention", {"share_qk": True}),
        ("self_attention", {"rope": False}),
    ],
    ids=str,
)
def test_states_own_their_memory(name, config, tmp_path):
    """Every state tensor is contiguous with storage of its own size (no view into a big buffer), so
    states are small to keep and save with safetensors."""
    from safetensors.torch import load_file, save_file

    layer = seqzoo.create_layer(name, 32, **config)
    x = torch.randn(2, 70, 32)
    _, st = layer(x)
    _, st_step = layer.step(x[:, 0], st)
    for which, state in (("forward", st), ("step", st_step)):
        for key, t in state.items():
            assert t.is_contiguous(), f"{which}: state[{key!r}] is not contiguous"
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (
                f"{which}: state[{key!r}] is a view"
            )
    save_file(st, tmp_path / "state.safetensors")
    loaded = load_file(tmp_path / "state.safetensors")
    assert all(torch.equal(loaded[k], st[k]) for k in st)
