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


@pytest.mark.parametrize("path", SIMPLE_CASES + GLA_CASES, ids=lambda p: p.stem)
@pytest.mark.parametrize("chunk_size", [None, 5, 16, 64])
def test_ops_equal_fla_reference(path, chunk_size):
    """fla's simple_gla (recurrent and chunked) and gla references against ``simple_gla`` / ``gla``."""
    t = {k: v.double() for k, v in load_file(path).items()}
    op, decay = (gla, t["gk"]) if "gk" in t else (simple_gla, t["g"])
    o, S = op(t["q"], t["k"], t["v"], decay, initial_state=t.get("initial_state"), output_final_state=True,
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


def test_gla_sub_chunk_sizes_all_equal_the_loop(monkeypatch):
    """Each intra-chunk path of ``gla`` (factorised over the whole chunk or sub-chunks of 16, 8, 4 or 2
    tokens, or per pair) equals the token loop; which one runs is set by how strong the decays are against
    FACTOR_SAFE (the sums after each sub-chunk's first token)."""
    q, k, v, g, S0 = _inputs(2, 128, 2, 8, 4, vector=True, strength=1.0)
    o_ref, _ = gla_reference(q, k, v, g, initial_state=S0)
    used = []
    factored = decay_ops._factored_blocks
    monkeypatch.setattr(decay_ops, "_factored_blocks", lambda *a: used.append(a[2].shape[2]) or factored(*a))
    deepest = {c: -g.unflatten(1, (-1, c))[:, :, 1:].sum(2).min().item() for c in (16, 8, 4, 2)}
    for safe in (1.01 * deepest[16], 1.01 * deepest[8], 1.01 * deepest[4], 1.01 * deepest[2], -1.0, 1e4):
        monkeypatch.setattr(decay_ops, "FACTOR_SAFE", safe)
        torch.testing.assert_close(gla(q, k, v, g, initial_state=S0)[0], o_ref, rtol=0, atol=1e-12)
    assert used == [16, 8, 4, 2, 64]  # −1.0: the per-pair path; the last: the whole chunk of 64 at once


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


# --- the layers ------------------------------------------------------------------------------------
LAYER_CASES = sorted(DATA.glob("layer_*.safetensors"))
LAYER_NAMES = {"MultiScaleRetention": "retnet", "GatedLinearAttention": "gla", "HGRN2Attention": "hgrn2"}


def test_layers_are_registered_with_their_golden_cases():
    import seqzoo

    assert {"retnet", "gla", "hgrn2", "mamba2", "sliding_window_attention"} <= set(seqzoo.list_layers())
    names = {LAYER_NAMES[_meta(p)["source"].rsplit(".", 1)[1]] for p in LAYER_CASES}
    assert names == {"retnet", "gla", "hgrn2"} and len(LAYER_CASES) == 7


@pytest.mark.parametrize("path", LAYER_CASES, ids=lambda p: p.stem)
def test_layer_equals_fla_layer(path):
    """fla's layer (its own forward, GPU kernels swapped for fla's torch references) against ours with its
    state dict loaded strictly, in float64 within float32 rounding; and ours cut in two equals ours whole."""
    import seqzoo

    meta = _meta(path)
    golden = load_file(path)
    config = dict(meta["layer_config"])
    d = config.pop("hidden_size")
    layer = seqzoo.create_layer(LAYER_NAMES[meta["source"].rsplit(".", 1)[1]], d, **config).double()
    params = {k.removeprefix("param."): v.double() for k, v in golden.items() if k.startswith("param.")}
    layer.load_state_dict(params, strict=True)
    x = golden["input"].double()
    with torch.no_grad():
        y, _ = layer(x)
        _close(y, golden["output"], rel=2e-5)
        a, state = layer(x[:, :13])
        b, _ = layer(x[:, 13:], state)
    torch.testing.assert_close(torch.cat([a, b], 1), y, rtol=0, atol=1e-12)


def test_gla_without_decay_is_the_linear_attention_layers_op():
    """gla with gk ≡ 0 equals ``linear_attention``'s own chunked op (identity feature map, unnormalised)
    on q scaled by K^−½: the same layer family, one decay apart."""
    from seqzoo_plugins.attention import linear_attention_chunked

    q, k, v, _, S0 = _inputs(2, 70, 3, 8, 5, vector=True)
    o, S = gla(q, k, v, torch.zeros_like(q), initial_state=S0, output_final_state=True)
    hm = lambda t: t.transpose(1, 2)
    y, S_la, _ = linear_attention_chunked(hm(q * 8 ** -0.5), hm(k), hm(v), S0, None, 16)
    torch.testing.assert_close(o, hm(y), rtol=0, atol=1e-12)
    torch.testing.assert_close(S, S_la, rtol=0, atol=1e-12)


def test_hgrn2_is_gla_with_the_key_tied_to_the_forget_gate():
    """The hgrn2 layer's output = a token loop written here from its projections: per head
    S_t = diag(α_t) S_{t−1} + (1 − α_t) i_tᵀ, α = σ(f_proj x), o_t = S_tᵀ swish(q_proj x)/√K, then the
    width-wide RMSNorm and o_proj."""
    import seqzoo

    torch.manual_seed(0)
    layer = seqzoo.create_layer("hgrn2", 24, num_heads=3).double()
    x = torch.randn(2, 19, 24, dtype=torch.float64)
    with torch.no_grad():
        y, _ = layer(x)
        heads = lambda t: t.unflatten(-1, (3, -1))
        q, alpha, i = heads(F.silu(layer.q_proj(x))), heads(torch.sigmoid(layer.f_proj(x))), heads(layer.i_proj(x))
        S, outs = torch.zeros(2, 3, 8, 8, dtype=torch.float64), []
        for t in range(19):
            S = alpha[:, t, :, :, None] * S + (1 - alpha[:, t, :, :, None]) * i[:, t, :, None, :]
            outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] / 8 ** 0.5))
        want = layer.o_proj(layer.g_norm(torch.stack(outs, 1).flatten(-2)))
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)


def test_retnet_decays_by_its_fixed_gammas():
    """retnet's state after T tokens of zero keys decays by exactly γ_h^T per head (γ_h = 1 − 2^(−5−h))."""
    import seqzoo

    layer = seqzoo.create_layer("retnet", 16, num_heads=4).double()
    with torch.no_grad():
        layer.k_proj.weight.zero_()
        S0 = torch.randn(1, 4, 4, 8, dtype=torch.float64)
        state = {**layer.init_state(1, dtype=torch.float64), "S": S0}
        _, state = layer(torch.randn(1, 10, 16, dtype=torch.float64), state)
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(4, dtype=torch.float64))
    torch.testing.assert_close(state["S"], S0 * gamma[None, :, None, None] ** 10, rtol=1e-13, atol=0)
    assert int(state["position"]) == 10


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
@pytest.mark.parametrize("name", ["retnet", "gla", "hgrn2", "mamba2", "sliding_window_attention"])
def test_language_model_in_both_backbones(name, backbone):
    """The layers drop into both backbones; a model's step and a forward cut in two equal its forward; a
    training step's gradients reach every parameter."""

    from seqzoo.testing import check_language_model

    options = {"mamba2": {"d_state": 8}, "sliding_window_attention": {"num_heads": 2, "window_size": 9}}.get(
        name, {"num_heads": 2})
    check_language_model(name, backbone, **options)


def test_bad_layer_options_are_named():
    import seqzoo

    for name, bad in [("retnet", {"num_kv_heads": 3}), ("retnet", {"gate_fn": "tanh"}), ("gla", {"feature_map": "x"}),
                      ("gla", {"elementwise_affine": False}), ("gla", {"gate_logit_normalizer": 0}),
                      ("hgrn2", {"num_heads": 5}), ("hgrn2", {"expand_ratio": 64}), ("retnet", {"expand_k": 0.3})]:
        with pytest.raises(ValueError, match="expected"):
            seqzoo.create_layer(name, 32, **bad)


def test_cpu_run_imports_nothing_of_fla():
    import subprocess
    import sys

    code = ("import sys, torch, seqzoo\n"
            "for n in ('retnet', 'gla', 'hgrn2', 'mamba2'):\n"
            "    seqzoo.create_layer(n, 32)(torch.randn(1, 70, 32))\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('fla', 'mamba_ssm')]\n"
            "assert not loaded, f'imported on a CPU run: {loaded}'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (and flash-linear-attention)")
@pytest.mark.parametrize("name", ["retnet", "gla", "hgrn2"])
def test_cuda_fla_kernels_equal_torch_path(name):
    import seqzoo

    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = seqzoo.create_layer(name, 256, num_heads=4).cuda()
    x = torch.randn(2, 300, 256, device="cuda")
    y_fla, s_fla = layer(x)
    layer.config.backend = "torch"
    y_torch, s_torch = layer(x)
    torch.testing.assert_close(y_fla, y_torch, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(s_fla["S"], s_torch["S"], rtol=2e-3, atol=2e-3)


def test_default_comparison_keeps_its_layers_and_decay_has_a_preset():
    import seqzoo
    from seqzoo.bench.presets import DECAY_LAYERS, PAPER_LAYERS, preset

    assert preset("default")["layers"] == PAPER_LAYERS
    assert preset("decay")["layers"] == DECAY_LAYERS and preset("decay")["tasks"] == preset("default")["tasks"]
    assert all(name in seqzoo.list_layers() for name in DECAY_LAYERS)
    assert not set(PAPER_LAYERS) & {"retnet", "gla", "hgrn2"}


# --- Mamba-2 -----------------------------------------------------------------------------------------
MAMBA2 = Path(__file__).parent / "data" / "hf_mamba2"
MIXER_CASES = sorted(MAMBA2.glob("mixer_*.safetensors"))


def test_mamba2_golden_vectors_are_present():
    assert len(MIXER_CASES) == 2 and (MAMBA2 / "model_d32_L2_T29.safetensors").exists()


@pytest.mark.parametrize("path", MIXER_CASES, ids=lambda p: p.stem)
def test_mamba2_equals_hf_mixer(path):
    """HF's ``Mamba2Mixer`` (torch path, float32) against ``mamba2`` with its state dict loaded strictly, in
    float64; whole and cut in two."""
    import seqzoo

    golden = load_file(path)
    hf = _meta(path)["hf_config"]
    layer = seqzoo.create_layer(
        "mamba2", hf["hidden_size"], d_state=hf["state_size"], headdim=hf["head_dim"], expand=hf["expand"],
        ngroups=hf["n_groups"], d_conv=hf["conv_kernel"], bias=hf["use_bias"], conv_bias=hf["use_conv_bias"],
        dt_limit=tuple(hf["time_step_limit"]), rmsnorm_eps=hf["layer_norm_epsilon"]).double()
    layer.load_state_dict({k.removeprefix("param."): v.double() for k, v in golden.items() if k.startswith("param.")},
                          strict=True)
    x = golden["input"].double()
    with torch.no_grad():
        y, _ = layer(x)
        a, state = layer(x[:, :20])
        b, _ = layer(x[:, 20:], state)
    _close(y, golden["output"], rel=2e-5)
    torch.testing.assert_close(torch.cat([a, b], 1), y, rtol=0, atol=1e-12)


def test_hf_mamba2_checkpoint_converts_and_equals_its_logits():
    """``seqzoo.interop.from_mamba_ssm`` on an HF ``Mamba2ForCausalLM`` state dict and config: the same
    logits (float64 against HF's float32), and the converted model's steps equal its forward."""
    import seqzoo.interop

    golden = load_file(MAMBA2 / "model_d32_L2_T29.safetensors")
    hf = _meta(MAMBA2 / "model_d32_L2_T29.safetensors")["hf_config"]
    sd = {k.removeprefix("param."): v.double() for k, v in golden.items() if k.startswith("param.")}
    model = seqzoo.interop.from_mamba_ssm(sd, hf)
    assert type(model.layers[0].seq_modeling_block).__name__ == "Mamba2"
    with torch.no_grad():
        logits, _ = model(golden["input_ids"])
    _close(logits, golden["logits"], rel=2e-5)
    with torch.no_grad():
        state = model.init_state(2)
        for t in range(4):
            step_logits, state = model.step(golden["input_ids"][:, t], state)
            torch.testing.assert_close(step_logits, logits[:, t], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="n_groups"):
        seqzoo.interop.from_mamba_ssm(sd, {**hf, "n_groups": 2})
    # the same weights under mamba-ssm's names and config (its mixer norm's eps is 1e-5, as HF's here)
    ssm_sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in sd.items()}
    ssm_cfg = {"d_model": 32, "n_layer": 2, "vocab_size": 50, "rms_norm": True, "residual_in_fp32": True,
               "tie_embeddings": True, "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 1,
                                                   "chunk_size": 256}}
    with torch.no_grad():
        torch.testing.assert_close(seqzoo.interop.from_mamba_ssm(ssm_sd, ssm_cfg)(golden["input_ids"])[0], logits,
                                   rtol=0, atol=1e-12)


def test_mamba2_scan_is_simple_gla():
    """The layer's state after a forward = ``simple_gla`` run by hand on its inputs: q = C, k = B,
    v = Δ·x, g = Δ·A, scale 1 (state transposed); and ngroups > 1 shares B and C within each group."""
    import seqzoo

    torch.manual_seed(0)
    layer = seqzoo.create_layer("mamba2", 16, d_state=8, headdim=8, ngroups=2).double()
    x = torch.randn(2, 41, 16, dtype=torch.float64)
    with torch.no_grad():
        y, state = layer(x)
        init = layer.init_state(2, dtype=torch.float64)
        z, xs, Bm, Cm, dt, A, _ = layer._inputs(x, init["conv"], step=False)
        Bm, Cm = layer._per_head(Bm), layer._per_head(Cm)
        o, S = simple_gla_reference(Cm, Bm, xs * dt.unsqueeze(-1), dt * A, scale=1.0)
    torch.testing.assert_close(state["ssm"], S.transpose(-1, -2), rtol=0, atol=1e-12)
    torch.testing.assert_close(y, layer._output(o + layer.D[:, None] * xs, z), rtol=0, atol=1e-12)
    assert torch.equal(Bm[:, :, 0], Bm[:, :, 1]) and not torch.equal(Bm[:, :, 0], Bm[:, :, 2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (and mamba-ssm)")
def test_cuda_mamba_ssm_kernel_equals_torch_path():
    import seqzoo

    pytest.importorskip("mamba_ssm")
    torch.manual_seed(0)
    layer = seqzoo.create_layer("mamba2", 256, d_state=64, ngroups=2).cuda()
    x = torch.randn(2, 300, 256, device="cuda")
    y_k, s_k = layer(x)
    layer.config.backend = "torch"
    y_t, s_t = layer(x)
    torch.testing.assert_close(y_k, y_t, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(s_k["ssm"], s_t["ssm"], rtol=2e-3, atol=2e-3)


# --- sliding-window attention ------------------------------------------------------------------------
WINDOW_CASES = sorted(DATA.glob("op_window_attn_*.safetensors"))


@pytest.mark.parametrize("path", WINDOW_CASES, ids=lambda p: p.stem)
@pytest.mark.parametrize("block", [128, 3, 7])
def test_windowed_attention_equals_fla_reference(path, block, monkeypatch):
    """fla's ``naive_parallel_attn(window_size=W)`` against ``windowed_attention`` (blocks of min(W, block)
    queries), whole and continued from the cached last ≤ W keys of a first part."""
    import seqzoo_plugins.attention as attention
    from seqzoo_plugins.attention import windowed_attention

    monkeypatch.setattr(attention, "WINDOW_BLOCK", block)
    t = {k: v.double() for k, v in load_file(path).items()}
    W = _meta(path)["window_size"]
    q, k, v = (t[n].transpose(1, 2) for n in ("q", "k", "v"))
    o = windowed_attention(q, k, v, W)
    _close(o.transpose(1, 2), t["o"])
    cut = 13
    P = min(W, cut)
    rest = windowed_attention(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], W,
                              past_k=k[:, :, cut - P:cut], past_v=v[:, :, cut - P:cut])
    torch.testing.assert_close(rest, o[:, :, cut:], rtol=0, atol=1e-12)
    assert len(WINDOW_CASES) == 4


def test_sliding_window_attention_layer(monkeypatch):
    """With W ≥ T it is ``self_attention`` (the same weights); with W < T its FIFO state holds the last W
    rotated keys, its forward cut anywhere equals the whole, and it differs from full attention."""
    import seqzoo

    torch.manual_seed(0)
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    full = seqzoo.create_layer("self_attention", 32).double()
    for W in (45, 200):
        swa = seqzoo.create_layer("sliding_window_attention", 32, window_size=W).double()
        swa.load_state_dict(full.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(swa(x)[0], full(x)[0], rtol=0, atol=1e-12)
    swa = seqzoo.create_layer("sliding_window_attention", 32, window_size=8).double()
    swa.load_state_dict(full.state_dict(), strict=True)
    with torch.no_grad():
        y, state = swa(x)
        _, full_state = full(x)
        assert state["k"].shape[2] == 8 and int(state["position"][0]) == 45
        torch.testing.assert_close(state["k"], full_state["k"][:, :, -8:], rtol=0, atol=0)
        for cut in (1, 7, 8, 30):
            a, s = swa(x[:, :cut])
            b, _ = swa(x[:, cut:], s)
            torch.testing.assert_close(torch.cat([a, b], 1), y, rtol=0, atol=1e-12)
        assert (y[:, 8:] - full(x)[0][:, 8:]).abs().max() > 1e-3
        torch.testing.assert_close(y[:, :8], full(x)[0][:, :8], rtol=0, atol=1e-12)
        import seqzoo_plugins.attention as attention

        monkeypatch.setattr(attention, "SEGMENT_TOKENS", 10)  # the CPU forward by segments of 10 tokens
        torch.testing.assert_close(swa(x)[0], y, rtol=0, atol=1e-12)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="window_size"):
            seqzoo.create_layer("sliding_window_attention", 32, window_size=bad)


@pytest.mark.parametrize(("shape", "chunk"), [((2, 37, 4, 8, 2, 5), 16), ((1, 130, 6, 4, 1, 16), 64),
                                              ((2, 3, 2, 3, 2, 4), 5)])
def test_ssd_equals_simple_gla_loop(shape, chunk, monkeypatch):
    """``ssd`` (C·Bᵀ once per group, the heads' states side by side) = the token loop of ``simple_gla`` with
    q = C, k = B, v = Δ·x, g = Δ·A, scale 1 per head (state transposed), one group or a group per chunk;
    gradients through it equal the loop's."""
    from seqzoo_plugins.decay.ops import ssd

    b, T, H, P, G, N = shape
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x, dt, A = rand(b, T, H, P), F.softplus(rand(b, T, H)), -torch.rand(H, generator=gen, dtype=torch.float64) * 3
    B, C, S0 = rand(b, T, G, N), rand(b, T, G, N), rand(b, H, P, N)
    per_head = lambda t: t.repeat_interleave(H // G, dim=2)
    y_ref, S_ref = gla_reference(per_head(C), per_head(B), x * dt[..., None], dt * A, scale=1.0,
                                 initial_state=S0.transpose(-1, -2))
    for group_elements in (decay_ops.GROUP_ELEMENTS, 1):
        monkeypatch.setattr(decay_ops, "GROUP_ELEMENTS", group_elements)
        y, S = ssd(x, dt, A, B, C, initial_state=S0, output_final_state=True, chunk_size=chunk)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(S, S_ref.transpose(-1, -2), rtol=0, atol=1e-12)
    leaves = [t.clone().requires_grad_(True) for t in (x, dt, B, C, S0)]
    ssd(*leaves[:2], A, *leaves[2:4], initial_state=leaves[4], chunk_size=chunk)[0].square().sum().backward()
    ref = [t.clone().requires_grad_(True) for t in (x, dt, B, C, S0)]
    gla_reference(per_head(ref[3]), per_head(ref[2]), ref[0] * ref[1][..., None], ref[1] * A, scale=1.0,
                  initial_state=ref[4].transpose(-1, -2))[0].square().sum().backward()
    for a, r in zip(leaves, ref):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="G dividing H"):
        ssd(x, dt, A, B[:, :, :1].expand(b, T, 3, N) if H % 3 else B[..., :2, :].repeat(1, 1, 5, 1), C, chunk_size=chunk)


@pytest.mark.parametrize(("T", "L", "seen"), [(32, 64, 32), (37, 64, 48), (5, 64, 16), (200, 64, 64), (50, 7, 7)])
def test_a_short_sequence_is_one_chunk_of_its_own_length(T, L, seen):
    """seqzoo.nn.scan_chunk_groups shortens the chunk to T rounded up to CHUNK_GRAIN (16) when the sequence is
    shorter than a chunk (no padding of a 32-token training sequence to 64), and the result still equals
    the token loop."""
    from seqzoo.nn import scan_chunk_groups

    lengths = []

    def group(q, S):
        lengths.append(q.shape[3])
        return q, S

    x = torch.randn(1, T, 2, 3)
    y, _ = scan_chunk_groups(group, (x,), L, None, width=8, group_elements=2**20)
    assert set(lengths) == {seen} and torch.equal(y, x)
    q, k, v, g, S0 = _inputs(1, T, 2, 8, 4, vector=True)
    o, S = gla(q, k, v, g, initial_state=S0, output_final_state=True, chunk_size=L)
    o_ref, S_ref = gla_reference(q, k, v, g, initial_state=S0)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-12)
