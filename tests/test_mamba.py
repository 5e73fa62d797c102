"""Mamba: the chunked scan against the token loop, golden vectors and live Hugging Face ``MambaMixer``,
the language model against ``MambaForCausalLM``, and the conformance suite.

Hugging Face's pure-torch path computes a few terms in float32 even for float64 inputs (see
``hf_mixer_reference``); that, not our scan, is why comparisons with it stop near 1e-8 instead of 1e-15.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from seqzoo_plugins.mamba import Mamba, selective_scan_chunked, selective_scan_ref
from seqzoo_plugins.mamba import layer as mamba_plugin

import seqzoo
from seqzoo.interop import from_mamba_ssm
from seqzoo.nn import RMSNorm
from seqzoo.testing import assert_close, check_layer, scan_steps

DATA = Path(__file__).parent / "data" / "hf_mamba"
F64 = torch.float64
HF_TOL = 1e-7  # float32 roundings inside Hugging Face's float64 path, see hf_mixer_reference


def _golden(name: str) -> tuple[dict, dict, dict]:
    path = DATA / f"{name}.safetensors"
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()["config"])
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    return tensors, params, config


def _layer_from_hf_config(cfg: dict) -> Mamba:
    return seqzoo.create_layer("mamba", cfg["hidden_size"], d_state=cfg["state_size"],
                               d_conv=cfg.get("conv_kernel", 4), expand=cfg["expand"],
                               dt_rank=cfg.get("time_step_rank", "auto")).to(F64)


def hf_mixer_reference(layer: Mamba, u: torch.Tensor, *, d_float32: bool = False,
                       dt_bias_float32: bool = False) -> torch.Tensor:
    """Hugging Face's ``MambaMixer.slow_forward`` for float64 input, written out with its float32 casts:
    A = −exp(A_log.float()) and the term Δ·B·x takes ``B.float()`` and ``x.float()``; the rest is float64.
    The golden files (transformers 5.24) are matched exactly when D is read in float32 too (``d_float32``);
    4.57 reads D in float64. transformers 5.25 reads both D and ``dt_proj.bias`` in float32
    (``dt_bias_float32``)."""
    T = u.shape[1]
    x, z = layer.in_proj(u).transpose(1, 2).chunk(2, dim=1)  # (b, d, t)
    x = F.silu(layer.conv1d(x)[..., :T])
    dt, B, C = torch.split(layer.x_proj(x.transpose(1, 2)), [layer.dt_rank, layer.d_state, layer.d_state], -1)
    bias = layer.dt_proj.bias.float().to(u.dtype) if dt_bias_float32 else layer.dt_proj.bias
    dt = F.softplus(F.linear(dt, layer.dt_proj.weight) + bias).transpose(1, 2)  # (b, d, t)
    A = -torch.exp(layer.A_log.float())
    h = u.new_zeros(u.shape[0], layer.d_inner, layer.d_state)
    ys = []
    for t in range(T):
        h = torch.exp(A * dt[:, :, t, None]) * h + dt[:, :, t, None] * B[:, None, t].float() * x[:, :, t, None].float()
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    D = layer.D.float().to(u.dtype) if d_float32 else layer.D
    y = (torch.stack(ys, -1) + x * D[:, None]) * F.silu(z)
    return layer.out_proj(y.transpose(1, 2))


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def hf_mixer_forward(mixer, u: torch.Tensor, cache=None, position=None) -> torch.Tensor:
    """Hugging Face's pure-torch ``MambaMixer``: ``slow_forward`` in transformers 4.x; in 5.x ``forward``
    itself, whose path without mamba-ssm's kernels is the torch scan (the cache is passed as ``cache``)."""
    if hasattr(mixer, "slow_forward"):
        return mixer.slow_forward(u, cache_params=cache, cache_position=position)
    return mixer(u, cache=cache)


def hf_mamba_cache(cfg, batch_size: int):
    """An empty Hugging Face cache for one Mamba layer, and a function reading its (conv, ssm) states:
    4.x's ``MambaCache``; 5.x's ``DynamicCache``, whose linear-attention layers hold the same two."""
    if _transformers_major() < 5:
        from transformers.models.mamba.modeling_mamba import MambaCache

        cache = MambaCache(cfg, max_batch_size=batch_size, dtype=F64)
        return cache, lambda: (cache.conv_states[0], cache.ssm_states[0])
    from transformers import DynamicCache

    cache = DynamicCache(config=cfg)
    return cache, lambda: (cache.get_conv_state(0), cache.get_recurrent_state(0))


def _random_scan_inputs(b, t, d, n, *, dt_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    x, B, C, D = r(b, t, d), r(b, t, n), r(b, t, n), r(d)
    dt = F.softplus(r(b, t, d)) * dt_scale
    A = -torch.exp(r(d, n))
    h0 = r(b, d, n)
    return x, dt, A, B, C, D, h0


# --- the scan ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("chunk_size", "blocks"), [(1, 1), (3, 4), (16, 2), (16, None), (64, 4), (200, None)])
def test_chunked_scan_equals_token_loop(chunk_size, blocks):
    x, dt, A, B, C, D, h0 = _random_scan_inputs(2, 77, 5, 4)
    y_ref, h_ref = selective_scan_ref(x, dt, A, B, C, D, h0)
    y, h = selective_scan_chunked(x, dt, A, B, C, D, h0, chunk_size, blocks)
    assert_close(y, y_ref, 1e-12, f"chunk {chunk_size}, blocks {blocks}: y")
    assert_close(h, h_ref, 1e-12, f"chunk {chunk_size}, blocks {blocks}: last state")


def test_chunked_scan_is_stable_for_strong_decay_and_long_chunks():
    # Δ·A down to about −1e4 within a chunk of 256: cumulative log-decays far below exp's range
    x, dt, A, B, C, D, h0 = _random_scan_inputs(1, 300, 3, 4, dt_scale=50.0, seed=1)
    A = A * 20
    for dtype in (F64, torch.float32):
        args = [v.to(dtype) for v in (x, dt, A, B, C, D, h0)]
        y, h = selective_scan_chunked(*args, chunk_size=256, blocks=2)
        y_ref, h_ref = selective_scan_ref(*args)
        assert torch.isfinite(y).all() and torch.isfinite(h).all()
        assert_close(y, y_ref, 1e-12 if dtype == F64 else 1e-5, f"{dtype}: y")


def test_chunked_scan_memory_is_per_group(monkeypatch):
    """The scan works on groups of chunk_size · blocks tokens; (b, t, d, n) is never formed."""
    seen = []
    inner = mamba_plugin._scan_group

    def spy(dt, dtx, A, B, C, h, chunk_size, **kw):
        seen.append((tuple(dt.shape), chunk_size))
        return inner(dt, dtx, A, B, C, h, chunk_size, **kw)

    monkeypatch.setattr(mamba_plugin, "_scan_group", spy)
    layer = Mamba(32, chunk_size=8).to(F64)
    blocks = mamba_plugin.SCAN_STEP_ELEMENTS // (2 * 64 * 16)
    layer(torch.randn(2, 8 * blocks + 5, 32, dtype=F64))
    assert seen == [((2, 8 * blocks, 64), 8), ((2, 5, 64), 8)]
    x, dt, A, B, C, D, h0 = _random_scan_inputs(1, 50, 3, 2)
    seen.clear()
    selective_scan_chunked(x, dt, A, B, C, D, h0, chunk_size=4, blocks=4)
    assert [s[0][1] for s in seen] == [16, 16, 16, 2]


def _scan_and_grads(args, with_state_grad: bool, **kw):
    args = [a.detach().clone().requires_grad_() for a in args]
    y, h = selective_scan_chunked(*args, **kw)
    g = torch.Generator().manual_seed(5)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    if with_state_grad:
        loss = loss + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
    loss.backward()
    return [y.detach(), h.detach()] + [a.grad for a in args]


@pytest.mark.parametrize("with_state_grad", [False, True])
@pytest.mark.parametrize(("chunk_size", "blocks"), [(8, None), (4, 2)])
def test_native_scan_equals_autograd_through_the_torch_scan(monkeypatch, with_state_grad, chunk_size, blocks):
    """The native scan and its written-out backward (float32 training on the CPU) against autograd through
    the torch scan (itself checked against the token loop above): outputs, last state and every input's
    gradient, over several groups."""
    assert mamba_plugin.NATIVE.available(), "the native kernels did not build (a C compiler is part of the install)"
    calls = []
    real = mamba_plugin._NativeScanGroup.apply
    monkeypatch.setattr(mamba_plugin._NativeScanGroup, "apply", lambda *a: calls.append(1) or real(*a))
    args = [t.float() for t in _random_scan_inputs(3, 37, 6, 5, seed=3)]
    want = _scan_and_grads(args, with_state_grad, chunk_size=chunk_size, blocks=blocks)
    assert not calls
    got = _scan_and_grads(args, with_state_grad, chunk_size=chunk_size, blocks=blocks, kernels=True)
    assert len(calls) == (1 if blocks is None else -(-37 // (chunk_size * blocks)))  # one per group
    for name, g, w in zip(("y", "h", "x", "dt", "A", "B", "C", "D", "h0"), got, want):
        assert_close(g, w, 2e-6, f"native scan vs torch scan: {name}")


def test_native_scan_second_derivative_equals_the_torch_scans(monkeypatch):
    """create_graph=True through the native scan: its backward recomputes autograd's record of the torch
    scan, so a second derivative (with respect to A, which only the scan reads) equals the torch scan's in
    float64, to float32 rounding."""
    calls = []
    real = mamba_plugin._NativeScanGroup.apply
    monkeypatch.setattr(mamba_plugin._NativeScanGroup, "apply", lambda *a: calls.append(1) or real(*a))
    args64 = [t.requires_grad_() for t in _random_scan_inputs(2, 13, 4, 3, seed=7)]
    args32 = [t.detach().float().requires_grad_() for t in args64]

    def second(args, kernels):
        y, _ = selective_scan_chunked(*args, chunk_size=4, kernels=kernels)
        (g,) = torch.autograd.grad(y.square().sum(), args[0], create_graph=True)  # with respect to x
        return torch.autograd.grad(g.square().sum(), args[2])[0]  # then A

    got = second(args32, True)
    assert calls
    want = second(args64, False)
    assert (got.double() - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_native_scan_only_where_it_applies(monkeypatch):
    calls = []
    real = mamba_plugin._NativeScanGroup.apply
    monkeypatch.setattr(mamba_plugin._NativeScanGroup, "apply", lambda *a: calls.append(1) or real(*a))
    args = _random_scan_inputs(2, 9, 4, 3)
    _scan_and_grads(args, True, kernels=True)  # float64: the torch scan
    with torch.no_grad():
        selective_scan_chunked(*[a.float() for a in args], kernels=True)  # no autograd: the no-grad torch scan
    assert not calls
    layer = Mamba(16).float()
    layer(torch.randn(2, 5, 16)).__getitem__(0).sum().backward()
    assert len(calls) == 1
    Mamba(16, use_kernels=False)(torch.randn(2, 5, 16))[0].sum().backward()
    assert len(calls) == 1


def test_layer_trains_alike_with_and_without_the_native_scan():
    """A float32 training step of the layer: the same loss and gradients (to float32 rounding) with the
    native scan as with the torch scan."""
    torch.manual_seed(0)
    fast, plain = Mamba(24, d_state=8), Mamba(24, d_state=8, use_kernels=False)
    plain.load_state_dict(fast.state_dict())
    u = torch.randn(3, 40, 24)
    for m in (fast, plain):
        (m(u)[0] ** 2).mean().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        assert_close(a.grad, b.grad, 2e-5, f"gradient of {name}")


# --- golden vectors and live Hugging Face ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["mamba_layer_d64_T50", "mamba_layer_d48_N8_k3_T33"])
def test_layer_matches_hf_golden(name):
    tensors, params, cfg = _golden(name)
    layer = _layer_from_hf_config(cfg)
    layer.load_state_dict(params, strict=True)
    with torch.no_grad():
        y, _ = layer(tensors["input"])
        assert_close(y, tensors["output"], HF_TOL, f"{name}: output")
        # The gap to the golden output is Hugging Face's float32 casts: with them, agreement is float64's.
        assert_close(hf_mixer_reference(layer, tensors["input"], d_float32=True), tensors["output"], 1e-12,
                     f"{name}: HF's float32 casts reproduce the golden output")
        # and the step scan gives the same
        assert_close(scan_steps(layer, tensors["input"])[0], y, 1e-12, f"{name}: step scan")


def _hf_mixer(d_model, *, state_size, conv_kernel, expand, time_step_rank, use_bias, use_conv_bias, seed):
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    cfg = MambaConfig(hidden_size=d_model, state_size=state_size, conv_kernel=conv_kernel, expand=expand,
                      time_step_rank=time_step_rank, use_bias=use_bias, use_conv_bias=use_conv_bias)
    torch.manual_seed(seed)
    mixer = MambaMixer(cfg, layer_idx=0).to(F64)
    with torch.no_grad():  # move every parameter off its initial constants
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p) * (p.abs().mean() + 0.1))
        mixer.A_log.copy_(mixer.A_log.float())  # HF reads A_log as float32; keep it representable
    return cfg, mixer


HF_CASES = [  # d_model, d_state, d_conv, expand, dt_rank, bias, conv_bias, T
    (32, 16, 4, 2, "auto", False, True, 1),
    (40, 5, 3, 1, 7, True, False, 29),
    (24, 8, 2, 3, 2, False, True, 130),
]


@pytest.mark.parametrize(("d", "n", "k", "e", "r", "bias", "cbias", "T"), HF_CASES)
def test_layer_matches_live_hf_mixer(d, n, k, e, r, bias, cbias, T):
    cfg, mixer = _hf_mixer(d, state_size=n, conv_kernel=k, expand=e, time_step_rank=r, use_bias=bias,
                           use_conv_bias=cbias, seed=T)
    layer = seqzoo.create_layer("mamba", d, d_state=n, d_conv=k, expand=e, dt_rank=r, bias=bias,
                                conv_bias=cbias, chunk_size=16).to(F64)
    layer.load_state_dict(mixer.state_dict(), strict=True)
    assert layer.state_dict().keys() == mixer.state_dict().keys()
    u = torch.randn(2, T, d, dtype=F64)
    with torch.no_grad():
        want = hf_mixer_forward(mixer, u)
        y, _ = layer(u)
        assert_close(y, want, HF_TOL, "vs HF MambaMixer")
        hf5 = _transformers_major() >= 5  # 5.x reads D and the dt bias in float32 too
        assert_close(hf_mixer_reference(layer, u, d_float32=hf5, dt_bias_float32=hf5), want, 1e-12,
                     "HF's float32 casts explain the gap")


def test_state_convention_matches_hf_cache():
    """conv_state holds the last d_conv conv inputs and ssm_state h, exactly as HF's cache."""
    cfg, mixer = _hf_mixer(32, state_size=6, conv_kernel=4, expand=2, time_step_rank="auto", use_bias=False,
                           use_conv_bias=True, seed=3)
    layer = seqzoo.create_layer("mamba", 32, d_state=6).to(F64)
    layer.load_state_dict(mixer.state_dict(), strict=True)
    u = torch.randn(2, 11, 32, dtype=F64)
    cache, hf_states = hf_mamba_cache(cfg, 2)
    with torch.no_grad():
        hf_mixer_forward(mixer, u[:, :9], cache, torch.arange(cfg.conv_kernel))
        _, state = layer(u[:, :9])
        conv, ssm = hf_states()
        assert_close(state["conv_state"], conv, 0.0, "prefill conv_state")
        assert_close(state["ssm_state"], ssm, HF_TOL, "prefill ssm_state")
        for t in (9, 10):
            want = hf_mixer_forward(mixer, u[:, t:t + 1], cache, torch.tensor([t]))
            y, state = layer.step(u[:, t], state)
            conv, ssm = hf_states()
            assert_close(y, want[:, 0], HF_TOL, f"decode step {t}: output")
            assert_close(state["conv_state"], conv, 0.0, f"decode step {t}: conv_state")
            assert_close(state["ssm_state"], ssm, HF_TOL, f"decode step {t}: ssm_state")


# --- initialisation and config ---------------------------------------------------------------------
def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    layer = Mamba(64, dt_min=0.002, dt_max=0.05, dt_scale=2.0)
    assert layer.dt_rank == 4 and layer.d_inner == 128
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4), "conv1d.bias": (128,),
                      "x_proj.weight": (36, 128), "dt_proj.weight": (128, 4), "dt_proj.bias": (128,),
                      "A_log": (128, 16), "D": (128,), "out_proj.weight": (64, 128)}
    assert torch.equal(layer.A_log, torch.log(torch.arange(1.0, 17.0)).repeat(128, 1))  # S4D-real
    assert torch.equal(layer.D, torch.ones(128))
    assert layer.dt_proj.weight.abs().max() <= 2.0 * 4 ** -0.5
    dt = F.softplus(layer.dt_proj.bias.double())  # the bias is softplus⁻¹ of Δ ~ log-uniform
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert 0.3 < (dt.log().mean() - math.log(0.002)) / (math.log(0.05) - math.log(0.002)) < 0.7
    floored = Mamba(16, dt_min=1e-6, dt_max=2e-6, dt_init="constant", dt_init_floor=1e-3)
    assert torch.allclose(F.softplus(floored.dt_proj.bias.double()), torch.full((32,), 1e-3, dtype=F64), rtol=1e-5)
    assert torch.all(floored.dt_proj.weight == 1.0)
    gated = Mamba(16, use_gate=True)
    assert tuple(gated.g_proj.weight.shape) == (32, 16)


def test_bad_config_is_rejected():
    with pytest.raises(TypeError):
        seqzoo.create_layer("mamba", 16, d_sate=4)
    for bad in ({"dt_rank": 0}, {"dt_rank": "half"}, {"d_state": 0}, {"dt_init": "zeros"},
                {"dt_min": 0.2, "dt_max": 0.1}, {"chunk_size": 0}, {"scan_blocks": 0}):
        with pytest.raises(ValueError):
            Mamba(16, **bad)


# --- the contract ------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    {"chunk_size": 4, "use_gate": True},
    {"d_state": 3, "d_conv": 1, "expand": 1, "dt_rank": 2, "bias": True, "conv_bias": False, "chunk_size": 5,
     "scan_blocks": 2},
], ids=["small-chunks-gate", "odd-shapes"])
def test_conformance_on_other_configs(config):
    check_layer("mamba", d_model=24, **config)


def test_gate_multiplies_before_out_proj():
    torch.manual_seed(1)
    plain = Mamba(16).to(F64)
    gated = Mamba(16, use_gate=True).to(F64)
    gated.load_state_dict({**plain.state_dict(), "g_proj.weight": gated.g_proj.weight}, strict=True)
    u = torch.randn(2, 9, 16, dtype=F64)
    with torch.no_grad():
        captured = {}
        handle = plain.out_proj.register_forward_hook(lambda m, i, o: captured.setdefault("y", i[0]))
        plain(u)
        handle.remove()
        want = plain.out_proj(captured["y"] * F.gelu(gated.g_proj(u), approximate="tanh"))
        assert_close(gated(u)[0], want, 1e-13, "out_proj(gelu_tanh(g_proj(u)) ⊙ y)")


def test_float32_state_and_bfloat16_run():
    layer = Mamba(16)
    y, st = layer(torch.randn(1, 5, 16))
    assert st["ssm_state"].dtype == torch.float32
    yb, stb = layer.to(torch.bfloat16)(torch.randn(1, 5, 16, dtype=torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and stb["ssm_state"].dtype == torch.bfloat16


def test_cpu_never_touches_mamba_ssm(monkeypatch):
    def boom():
        raise AssertionError("mamba-ssm kernels were looked up for a CPU tensor")

    monkeypatch.setattr(mamba_plugin, "_cuda_kernels", boom)
    layer = Mamba(16)
    _, st = layer(torch.randn(1, 4, 16))
    layer.step(torch.randn(1, 16), st)
    assert "mamba_ssm" not in sys.modules


# --- language models -------------------------------------------------------------------------------
def _hf_style(tensors):  # mamba-ssm's names: backbone.embedding (HF: backbone.embeddings)
    return {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in tensors.items()}


def test_model_matches_hf_golden():
    """MambaForCausalLM logits. Beyond the mixer's casts, HF's float64 model rounds to float32 in
    every RMSNorm and casts the residual stream to float32 before each block (residual_in_fp32),
    and returns float32 logits: a handful of roundings of 2^-24 ≈ 6e-8, which reach 1.3e-7 relative
    here (hence 2e-7). With those casts replayed, the logits agree to the last float32 bit."""
    tensors, params, cfg = _golden("mamba_model_2layers_T40")
    ids, want = tensors["input_ids"], tensors["logits"]
    for sd in (params, _hf_style(params)):
        model = from_mamba_ssm(sd, cfg)
        assert model.embed_tokens.weight.dtype == F64 and model.lm_head is None
        with torch.no_grad():
            logits, _ = model(ids)
        assert_close(logits, want, 2e-7, "from_mamba_ssm vs MambaForCausalLM")
    with torch.no_grad():
        replayed = _hf_casts_forward(model, ids, d_float32=True)
    # rounded to float32 as HF returns logits, the replay is the golden logits (measured: identical)
    assert_close(replayed.float(), want, 2.0**-24, "with HF's float32 casts replayed")
    # create_model("mamba", transformer backbone, no MLP, eps 1e-5) is that model
    same = seqzoo.create_model("mamba", backbone="transformer", mlp=False, norm_eps=1e-5, vocab_size=83,
                               d_model=64, n_layers=2).to(F64)
    same.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(same(ids)[0], model(ids)[0])


def _hf_casts_forward(model, ids, *, d_float32: bool = False):
    """Our model's forward with HF's float32 casts: residual to float32, RMSNorm in float32, the mixer's."""
    def norm(m: RMSNorm, h):
        h32 = h.float()
        return m.weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + m.eps)).to(h.dtype)

    h = model.embed_tokens(ids)
    for block in model.layers:
        h = h.float().to(F64) + hf_mixer_reference(block.seq_modeling_block, norm(block.seq_norm, h),
                                                   d_float32=d_float32)
    return F.linear(norm(model.norm, h), model.head_weight)


def test_model_matches_live_hf_causal_lm():
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, state_size=8, expand=2,
                      conv_kernel=3, time_step_rank=3, residual_in_fp32=True)
    torch.manual_seed(7)
    hf = MambaForCausalLM(cfg).to(F64).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("A_log"):
                p.copy_((p + 0.1 * torch.randn_like(p)).float())
    ids = torch.randint(0, 50, (2, 23))
    model = from_mamba_ssm(hf.state_dict(), cfg)
    with torch.no_grad():
        want = hf(ids).logits
        assert_close(model(ids)[0], want, 2e-7, "vs MambaForCausalLM (HF's float32 casts, see above)")
        assert_close(_hf_casts_forward(model, ids).float(), want, 2.0**-24, "with HF's float32 casts replayed")
        # decoding: the prompt by forward then tokens by step equals forward over everything
        logits, state = model(ids[:, :20])
        for t in range(20, 23):
            step_logits, state = model.step(ids[:, t], state)
            assert_close(step_logits, model(ids[:, :t + 1])[0][:, -1], 1e-12, f"step at {t}")


def test_from_mamba_ssm_config_names_and_errors():
    tensors, params, cfg = _golden("mamba_model_2layers_T40")
    ssm_style = {"d_model": 64, "n_layer": 2, "vocab_size": 83, "ssm_cfg": {"d_state": 16, "layer": "Mamba1"},
                 "rms_norm": True, "residual_in_fp32": True, "tie_embeddings": True, "d_intermediate": 0}
    model = from_mamba_ssm(_hf_style(params), ssm_style)
    with torch.no_grad():
        assert_close(model(tensors["input_ids"])[0], tensors["logits"], 2e-7, "mamba-ssm config names")
    with pytest.raises(ValueError, match="Mamba1 or Mamba2"):
        from_mamba_ssm(params, {**ssm_style, "ssm_cfg": {"layer": "Mamba3"}})
    with pytest.raises(RuntimeError, match="in_proj"):  # a Mamba (v1) checkpoint under a Mamba-2 config
        from_mamba_ssm(params, {**ssm_style, "ssm_cfg": {"layer": "Mamba2", "headdim": 32}})
    with pytest.raises(ValueError, match="rms_norm"):
        from_mamba_ssm(params, {**ssm_style, "rms_norm": False})
    with pytest.raises(ValueError, match="lm_head"):
        from_mamba_ssm({**params, "lm_head.weight": params["lm_head.weight"] + 1}, cfg)
    with pytest.raises(ValueError, match="embedding"):
        from_mamba_ssm({k: v for k, v in params.items() if "embeddings" not in k}, cfg)
    untied = {**params, "lm_head.weight": params["lm_head.weight"] * 2}
    model = from_mamba_ssm(untied, {**cfg, "tie_word_embeddings": False})
    assert model.lm_head is not None and torch.equal(model.lm_head.weight, untied["lm_head.weight"])


def test_mamba_in_the_mamba_backbone_gets_the_gate():
    model = seqzoo.create_model("mamba", backbone="mamba", d_model=32, n_layers=2, vocab_size=40).to(F64)
    assert all(block.seq_modeling_block.g_proj is not None for block in model.layers)
    ids = torch.randint(0, 40, (2, 13))
    with torch.no_grad():
        full, _ = model(ids)
        _, state = model(ids[:, :6])
        outs = []
        for t in range(6, 13):
            logits, state = model.step(ids[:, t], state)
            outs.append(logits)
    assert_close(torch.stack(outs, 1), full[:, 6:], 1e-11, "mamba backbone: step after forward")


# --- CUDA: mamba-ssm's kernels against the torch path ------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_equal_torch_path():
    if mamba_plugin._cuda_kernels() is None:
        pytest.skip("mamba-ssm / causal-conv1d CUDA kernels not installed")
    torch.manual_seed(0)
    fast = Mamba(64, use_gate=True).cuda()
    slow = Mamba(64, use_gate=True, use_kernels=False).cuda()
    slow.load_state_dict(fast.state_dict())
    u = torch.randn(2, 300, 64, device="cuda")
    y, st = fast(u)
    y_ref, st_ref = slow(u)
    assert_close(y, y_ref, 1e-4, "kernel forward vs torch forward")
    assert_close(st["conv_state"], st_ref["conv_state"], 1e-6, "conv_state")
    assert_close(st["ssm_state"], st_ref["ssm_state"], 1e-4, "ssm_state")
    with torch.no_grad():
        y1, s1 = fast.step(u[:, 0], st)
        y1_ref, s1_ref = slow.step(u[:, 0], st_ref)
    assert_close(y1, y1_ref, 1e-4, "selective_state_update vs torch step")
    assert_close(s1["ssm_state"], s1_ref["ssm_state"], 1e-4, "ssm_state after a step")
    y.sum().backward()  # the kernels' backward runs
    assert all(p.grad is not None for p in fast.parameters())


@pytest.mark.parametrize("grad", [False, True])
def test_forward_in_many_segments_equals_steps_and_hf(monkeypatch, grad):
    """Long sequences go through the layer segment by segment and the scan group by group; force many
    of both at a small width and check the no-grad and autograd paths against token-by-token steps,
    Hugging Face's mixer, and each other's gradients."""
    monkeypatch.setattr(mamba_plugin, "SCAN_STEP_ELEMENTS", 1)
    monkeypatch.setattr(mamba_plugin, "SEGMENT_ELEMENTS", 1)
    cfg, mixer = _hf_mixer(24, state_size=8, conv_kernel=4, expand=2, time_step_rank="auto", use_bias=False,
                           use_conv_bias=True, seed=7)
    layer = seqzoo.create_layer("mamba", 24, d_state=8, chunk_size=4).to(F64)
    layer.load_state_dict(mixer.state_dict(), strict=True)
    assert layer._segment_tokens(2) < 100  # many segments over T = 301
    u = torch.randn(2, 301, 24, dtype=F64, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y, st = layer(u)
    with torch.no_grad():
        y_steps, st_steps = scan_steps(layer, u.detach())
        want = hf_mixer_forward(mixer, u.detach())
    assert_close(y.detach(), y_steps, 1e-12, "segmented forward vs step scan")
    for k in st:
        assert_close(st[k].detach(), st_steps[k], 1e-12, f"segmented forward vs step scan, state {k}")
    assert_close(y.detach(), want, HF_TOL, "segmented forward vs HF MambaMixer")
    if grad:
        y.pow(2).sum().backward()
        g_seg = u.grad.clone()
        u2 = u.detach().clone().requires_grad_(True)
        y_ref, _ = scan_steps(layer, u2)
        y_ref.pow(2).sum().backward()
        assert_close(g_seg, u2.grad, 1e-10, "input gradient: segmented forward vs step scan")


def _mamba_ssm_mixer_model(model, ids=None, token=None, state=None):
    """mamba-ssm's MixerModel + tied head (fused_add_norm=False, residual_in_fp32=True) written out on
    seqzoo's modules: the residual stream is float32, each block's norm reads it rounded to the block's
    dtype. With ``token`` it runs the mixers' ``step``."""
    hidden = model.embed_tokens(ids if token is None else token)
    residual, new = None, {}
    for i, block in enumerate(model.layers):
        residual = hidden + residual if residual is not None else hidden
        hidden = block.seq_norm(residual.to(block.seq_norm.weight.dtype))
        residual = residual.to(torch.float32)
        if token is None:
            hidden = block.seq_modeling_block(hidden)[0]
        else:
            inner = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"{i}.layer.")}
            hidden, s = block.seq_modeling_block.step(hidden, inner)
            new.update({f"{i}.layer.{k}": v for k, v in s.items()})
    residual = hidden + residual
    hidden = model.norm(residual.to(model.norm.weight.dtype))
    return F.linear(hidden, model.embed_tokens.weight), new


def test_residual_in_fp32_is_mamba_ssm_block_loop():
    torch.manual_seed(0)
    kw = dict(backbone="transformer", mlp=False, vocab_size=50, d_model=32, n_layers=3, norm_eps=1e-5)
    model = seqzoo.create_model("mamba", residual_in_fp32=True, **kw).to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        got, state = model(ids)
        want, _ = _mamba_ssm_mixer_model(model, ids)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
        token = torch.randint(0, 50, (2,))
        got_step, got_state = model.step(token, state)
        want_step, want_state = _mamba_ssm_mixer_model(model, token=token, state=state)
        assert torch.equal(got_step, want_step)
        assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
        # the flag matters in bfloat16 and changes nothing in float32
        plain = seqzoo.create_model("mamba", **kw).to(torch.bfloat16)
        plain.load_state_dict(model.state_dict())
        assert not torch.equal(plain(ids)[0], got)
        model32, plain32 = model.float(), plain.float()
        assert torch.equal(model32(ids)[0], plain32(ids)[0])


def test_from_mamba_ssm_keeps_the_residual_in_fp32():
    torch.manual_seed(0)
    src = seqzoo.create_model("mamba", backbone="transformer", mlp=False, vocab_size=40, d_model=16, n_layers=1)
    sd = {"backbone.embedding.weight": src.embed_tokens.weight, "backbone.norm_f.weight": src.norm.weight}
    for k, v in src.layers[0].state_dict().items():
        part, _, rest = k.partition(".")
        sd[f"backbone.layers.0.{'mixer' if part == 'seq_modeling_block' else 'norm'}.{rest}"] = v
    assert from_mamba_ssm(sd, {"d_model": 16, "n_layer": 1}).config.residual_in_fp32
    assert not from_mamba_ssm(sd, {"d_model": 16, "n_layer": 1, "residual_in_fp32": False}).config.residual_in_fp32
