"""Backbones and the language model: structure, state, generation."""

import pytest
import torch

import seqzoo
from seqzoo.backbones import default_intermediate_size
from seqzoo.nn import RMSNorm, apply_rope, causal_conv, causal_conv_step


def test_rmsnorm_formula():
    norm = RMSNorm(8, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8, dtype=torch.float64)
    want = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), want, rtol=1e-14, atol=0)


def test_rope_adjacent_pairs():
    x = torch.randn(5, 4, dtype=torch.float64)
    pos = torch.arange(5)
    y = apply_rope(x, pos, theta=100.0)
    for t in range(5):
        for i in range(2):
            a = t * 100.0 ** (-2 * i / 4)
            c, s = torch.cos(torch.tensor(a, dtype=torch.float64)), torch.sin(torch.tensor(a, dtype=torch.float64))
            x0, x1 = x[t, 2 * i], x[t, 2 * i + 1]
            torch.testing.assert_close(y[t, 2 * i], x0 * c - x1 * s)
            torch.testing.assert_close(y[t, 2 * i + 1], x0 * s + x1 * c)
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(2, 3), torch.arange(2))


def test_apply_rope_in_place_equals_out_of_place():
    pos = torch.arange(7) % 4
    base = torch.randn(2, 7, 3, 8, dtype=torch.float64)
    x = base.transpose(1, 2)  # (B, H, T, d), a view with the pairs adjacent
    want = apply_rope(x.clone(), pos)
    got = apply_rope(x, pos, inplace=True)
    assert got is x and torch.equal(got, want)
    odd = torch.randn(2, 3, 7, 9, dtype=torch.float64)[..., 1:]  # pairs straddle storage: falls back
    before = odd.clone()
    out = apply_rope(odd, pos, inplace=True)
    assert out is not odd and torch.equal(odd, before) and torch.equal(out, apply_rope(before, pos))


def test_causal_conv_equals_padded_conv_and_steps():
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, bias=True, padding=3).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    want = conv(x.transpose(1, 2))[..., :11].transpose(1, 2)
    y, st = causal_conv(conv, x)
    torch.testing.assert_close(y, want, rtol=1e-13, atol=1e-13)
    y1, s1 = causal_conv(conv, x[:, :5])
    y2, s2 = causal_conv(conv, x[:, 5:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), want, rtol=1e-13, atol=1e-13)
    state = torch.zeros(2, 6, 3, dtype=torch.float64)
    for t in range(11):
        yt, state = causal_conv_step(conv, x[:, t], state)
        torch.testing.assert_close(yt, want[:, t], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(state, st)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_causal_conv_wider_state_and_no_bias(K):
    """A state wider than K − 1 (Mamba keeps K inputs) carries the same conv; K = 1 and no bias work."""
    conv = torch.nn.Conv1d(5, 5, K, groups=5, bias=False, padding=K - 1).double()
    x = torch.randn(3, 9, 5, dtype=torch.float64)
    want = conv(x.transpose(1, 2))[..., :9].transpose(1, 2)
    wide = torch.zeros(3, 5, K + 2, dtype=torch.float64)
    y1, s1 = causal_conv(conv, x[:, :4], wide)
    y2, s2 = causal_conv(conv, x[:, 4:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), want, rtol=1e-13, atol=1e-13)
    assert s2.shape == wide.shape and torch.equal(s2, x[:, -(K + 2):].transpose(1, 2))
    state = wide  # the step carries the same wide state
    for t in range(9):
        yt, state = causal_conv_step(conv, x[:, t], state)
        torch.testing.assert_close(yt, want[:, t], rtol=1e-13, atol=1e-13)
    assert torch.equal(state, s2)
    if K >= 2:  # a state narrower than K − 1 is refused
        with pytest.raises(ValueError, match="at least"):
            causal_conv(conv, x, torch.zeros(3, 5, K - 2, dtype=torch.float64))
        with pytest.raises(ValueError, match="at least"):
            causal_conv_step(conv, x[:, 0], torch.zeros(3, 5, K - 2, dtype=torch.float64))


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
def test_block_structure_matches_official_names(backbone):
    lm = seqzoo.create_model("rnn", backbone, vocab_size=11, d_model=16, n_layers=2)
    names = set(lm.state_dict())
    assert "embed_tokens.weight" in names and "norm.weight" in names
    for part in ("seq_norm.weight", "ffn_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight"):
        assert f"layers.1.{part}" in names
    has_conv = "layers.0.conv.conv.weight" in names and "layers.0.conv.norm.weight" in names
    assert has_conv == (backbone == "mamba")
    assert lm.layers[0].mlp.gate_proj.weight.shape == (default_intermediate_size(16), 16)


def test_mlp_false_drops_the_swiglu():
    lm = seqzoo.create_model("rnn", vocab_size=11, d_model=16, n_layers=1, mlp=False)
    assert not any("mlp" in n or "ffn_norm" in n for n in lm.state_dict())


def _manual_block(block, h):
    """The official Block, written out: h += conv(norm(h)); h += layer(norm(h)); h += mlp(norm(h))."""
    if block.conv is not None:
        c = block.conv.conv(block.conv.norm(h).transpose(1, 2))[..., : h.shape[1]].transpose(1, 2)
        h = h + c
    h = h + block.seq_modeling_block(block.seq_norm(h))[0]
    return h + block.mlp(block.ffn_norm(h))


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
def test_model_forward_is_the_block_recipe(backbone):
    lm = seqzoo.create_model("rnn", backbone, vocab_size=13, d_model=16, n_layers=2).double()
    ids = torch.randint(0, 13, (2, 9))
    h = lm.embed_tokens(ids)
    for block in lm.layers:
        h = _manual_block(block, h)
    want = lm.norm(h) @ lm.embed_tokens.weight.T
    got, _ = lm(ids)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
def test_step_and_chunks_equal_forward(backbone):
    lm = seqzoo.create_model("rnn", backbone, vocab_size=13, d_model=16, n_layers=2).double()
    ids = torch.randint(0, 13, (2, 12))
    with torch.no_grad():
        want, final = lm(ids)
        a, st = lm(ids[:, :5])
        b, st = lm(ids[:, 5:], st)
        torch.testing.assert_close(torch.cat([a, b], 1), want, rtol=1e-12, atol=1e-12)
        st = lm.init_state(2)
        for t in range(12):
            logit, st = lm.step(ids[:, t], st)
            torch.testing.assert_close(logit, want[:, t], rtol=1e-12, atol=1e-12)
    assert set(st) == set(final)
    assert all(k.split(".")[0] in ("0", "1") for k in final)


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
def test_generate_equals_rerunning_the_sequence(backbone):
    lm = seqzoo.create_model("rnn", backbone, vocab_size=17, d_model=16, n_layers=2).double()
    prompt = torch.randint(0, 17, (2, 6))
    out = lm.generate(prompt, 8, temperature=0)
    assert out.shape == (2, 14) and torch.equal(out[:, :6], prompt)
    # greedy: each new token is the argmax of a full re-run on everything before it
    for t in range(6, 14):
        with torch.no_grad():
            logits, _ = lm(out[:, :t])
        assert torch.equal(out[:, t], logits[:, -1].argmax(-1))


def test_generate_sampling_is_seeded():
    lm = seqzoo.create_model("rnn", vocab_size=17, d_model=16, n_layers=1)
    prompt = torch.randint(0, 17, (1, 4))
    a = lm.generate(prompt, 10, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    b = lm.generate(prompt, 10, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_bad_model_input():
    lm = seqzoo.create_model("rnn", vocab_size=17, d_model=16, n_layers=1)
    with pytest.raises(TypeError, match="integer"):
        lm(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        lm(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="backbone"):
        seqzoo.create_model("rnn", "lstm", d_model=16)
    with pytest.raises(ValueError, match="prompt"):
        lm.generate(torch.zeros(1, 0, dtype=torch.long), 3)
