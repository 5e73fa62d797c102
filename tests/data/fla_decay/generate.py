"""Writes the golden vectors in this folder from flash-linear-attention 0.5.2 (not run by the tests).

Needs an environment with ``flash-linear-attention==0.5.2`` and ``fla-core==0.5.2`` (and a Triton that
fla imports with, 3.5 here; nothing of it runs). Run: ``python tests/data/fla_decay/generate.py DIR`` with
DIR the installed package's parent (site-packages).

- ``op_*``: fla's pure-torch references, loaded by path from the installed files:
  ``fla/ops/simple_gla/naive.py::naive_recurrent_simple_gla`` and ``::naive_chunk_simple_gla``,
  ``fla/ops/retention/naive.py::naive_retention`` (layout (B, H, T, ·), stored here as (B, T, H, ·); no
  state) and ``fla/ops/gla/naive.py::naive_recurrent_gla``; ``op_window_attn_*`` from
  ``fla/ops/attn/naive.py::naive_parallel_attn`` with ``window_size`` (sliding-window attention). All compute in float32 whatever their input;
  the inputs are float32.
- ``layer_*``: fla's layers (``fla.layers.MultiScaleRetention``, ``GatedLinearAttention``,
  ``HGRN2Attention``) built with fla's own initialisation, parameters then moved away from it, run through
  their own ``forward`` in eval mode with the GPU-only pieces swapped for fla's torch references: the
  retention ops for ``naive_retention``, the GLA ops for ``naive_recurrent_gla``, ``RotaryEmbedding`` for
  its own cos/sin cache and ``rotary_embedding_ref``, ``ShortConvolution`` for ``nn.Conv1d``'s forward plus
  its activation, fla's Triton ``swish`` (HGRN2's, the feature map's, the unfused gate's) for SiLU, the norms for ``fla.modules.layernorm.rms_norm_ref`` /
  ``fla.modules.layernorm_gated.rms_norm_ref`` and HGRN2's ``rms_norm_linear`` for ``rms_norm_ref`` then
  the linear. Computed in float32.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = Path(__file__).parent


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save(name: str, tensors: dict, config: dict) -> None:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(HERE / f"{name}.safetensors"), metadata={"config": json.dumps(config)})
    print(name, {k: tuple(v.shape) for k, v in tensors.items()})


def op_cases(site: Path) -> None:
    sgla = load(site / "fla/ops/simple_gla/naive.py")
    ret = load(site / "fla/ops/retention/naive.py")
    gla = load(site / "fla/ops/gla/naive.py")
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g)
    for B, T, H, K, V, init in [(2, 37, 3, 16, 8, False), (1, 65, 2, 32, 32, True), (2, 3, 1, 8, 4, True)]:
        q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
        decay = F.logsigmoid(rand(B, T, H) + 2.0)
        S0 = rand(B, H, K, V) if init else None
        o, S = sgla.naive_recurrent_simple_gla(q, k, v, decay, initial_state=S0, output_final_state=True)
        tensors = {"q": q, "k": k, "v": v, "g": decay, "o": o, "final_state": S}
        if init:
            tensors["initial_state"] = S0
        tag = f"B{B}_T{T}_H{H}_K{K}_V{V}{'_init' if init else ''}"
        save(f"op_simple_gla_{tag}", tensors, {
            "source": "fla 0.5.2 fla/ops/simple_gla/naive.py::naive_recurrent_simple_gla",
            "scale": K ** -0.5, "computed_in": "float32"})
    # fla's own chunked reference (whole chunks; its initial state is added in place, so it gets a copy)
    B, T, H, K, V, C = 1, 64, 2, 16, 8, 16
    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    decay, S0 = F.logsigmoid(rand(B, T, H) + 2.0), rand(B, H, K, V)
    o, S = sgla.naive_chunk_simple_gla(q, k, v, decay, initial_state=S0.clone(), output_final_state=True, chunk_size=C)
    save(f"op_simple_gla_chunk_B{B}_T{T}_H{H}_K{K}_V{V}_init", {"q": q, "k": k, "v": v, "g": decay, "o": o,
                                                               "final_state": S, "initial_state": S0},
         {"source": "fla 0.5.2 fla/ops/simple_gla/naive.py::naive_chunk_simple_gla", "chunk_size": C,
          "scale": K ** -0.5, "computed_in": "float32"})
    # RetNet's fixed decays γ_h = 1 − 2^(−5−h), the parallel form (no state)
    for B, T, H, K, V in [(2, 33, 4, 16, 8), (1, 70, 3, 8, 16)]:
        q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
        hm = lambda t: t.transpose(1, 2).contiguous()
        o = ret.naive_retention(hm(q), hm(k), hm(v))
        save(f"op_retention_B{B}_T{T}_H{H}_K{K}_V{V}", {"q": q, "k": k, "v": v, "o": o.transpose(1, 2)},
             {"source": "fla 0.5.2 fla/ops/retention/naive.py::naive_retention", "scale": K ** -0.5,
              "decay": "gamma_h = 1 - 2^(-5-h)", "computed_in": "float32"})
    for B, T, H, K, V, init in [(2, 37, 3, 16, 8, False), (1, 65, 2, 32, 32, True), (2, 19, 2, 8, 12, True)]:
        q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
        gk = F.logsigmoid(rand(B, T, H, K)) / 16 if K != 8 else F.logsigmoid(rand(B, T, H, K) - 2.0)
        S0 = rand(B, H, K, V) if init else None
        o, S = gla.naive_recurrent_gla(q, k, v, gk, initial_state=S0, output_final_state=True)
        tensors = {"q": q, "k": k, "v": v, "gk": gk, "o": o, "final_state": S}
        if init:
            tensors["initial_state"] = S0
        save(f"op_gla_B{B}_T{T}_H{H}_K{K}_V{V}{'_init' if init else ''}", tensors, {
            "source": "fla 0.5.2 fla/ops/gla/naive.py::naive_recurrent_gla", "scale": K ** -0.5,
            "computed_in": "float32"})


def window_cases(site: Path) -> None:
    attn = load(site / "fla/ops/attn/naive.py")
    g = torch.Generator().manual_seed(3)
    rand = lambda *s: torch.randn(*s, generator=g)
    for B, T, H, D, W in [(2, 37, 3, 16, 8), (1, 70, 2, 8, 16), (2, 20, 1, 8, 1), (1, 33, 2, 16, 50)]:
        q, k, v = rand(B, T, H, D), rand(B, T, H, D), rand(B, T, H, D)
        o, _ = attn.naive_parallel_attn(q, k, v, window_size=W)
        save(f"op_window_attn_B{B}_T{T}_H{H}_D{D}_W{W}", {"q": q, "k": k, "v": v, "o": o},
             {"source": "fla 0.5.2 fla/ops/attn/naive.py::naive_parallel_attn", "window_size": W,
              "scale": D ** -0.5, "computed_in": "float32"})


def layer_cases(site: Path) -> None:
    import fla.layers.gla as gla_layer
    import fla.layers.hgrn2 as hgrn2_layer
    import fla.layers.multiscale_retention as ret_layer
    from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution
    from fla.modules.layernorm import rms_norm_ref
    from fla.modules.layernorm_gated import rms_norm_ref as gated_rms_norm_ref
    from fla.modules.rotary import RotaryEmbedding, rotary_embedding_ref

    ret = load(site / "fla/ops/retention/naive.py")
    gla = load(site / "fla/ops/gla/naive.py")

    def retention_op(q, k, v, initial_state=None, output_final_state=False, **_):
        assert initial_state is None
        hm = lambda t: t.transpose(1, 2).contiguous()
        return ret.naive_retention(hm(q), hm(k), hm(v)).transpose(1, 2), None

    def gla_op(q, k, v, g=None, gk=None, initial_state=None, output_final_state=False, **_):
        return gla.naive_recurrent_gla(q, k, v, gk if g is None else g, initial_state, output_final_state)

    def rotary_forward(self, q, k, seqlen_offset=0, max_seqlen=None, **_):
        assert seqlen_offset == 0
        T = q.shape[1]
        self._update_cos_sin_cache(T, device=q.device, dtype=q.dtype)
        cos, sin = self._cos_cached[:T], self._sin_cached[:T]
        return rotary_embedding_ref(q, cos, sin), rotary_embedding_ref(k, cos, sin)

    def conv_forward(self, x, cache=None, output_final_state=False, **_):
        T = x.shape[1]
        y = torch.nn.Conv1d.forward(self, x.transpose(1, 2))[..., :T].transpose(1, 2)
        return (F.silu(y) if self.activation in ("silu", "swish") else y), None

    for name in ("chunk_retention", "fused_chunk_retention", "parallel_retention", "fused_recurrent_retention"):
        setattr(ret_layer, name, retention_op)
    for name in ("chunk_gla", "fused_chunk_gla", "fused_recurrent_gla"):
        setattr(gla_layer, name, gla_op)
        setattr(hgrn2_layer, name, gla_op)
    hgrn2_layer.swish = F.silu
    hgrn2_layer.rms_norm_linear = lambda x, w, b, lw, lb: F.linear(rms_norm_ref(x, w, b, eps=1e-5, upcast=True), lw, lb)
    RotaryEmbedding.forward = rotary_forward
    ShortConvolution.forward = conv_forward
    RMSNorm.forward = lambda self, x: rms_norm_ref(x, self.weight, None, eps=self.eps, upcast=True)
    FusedRMSNormGated.forward = lambda self, x, g: gated_rms_norm_ref(x, self.weight, None, z=g, eps=self.eps)

    def perturb(layer, gen):
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if name.endswith("conv1d.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
                elif name.endswith("norm.weight") or name.endswith("swish_gate.weight"):
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
                elif name.endswith("bias"):
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))

    cases = [
        ("layer_retnet_d64_h4_T37", ret_layer.MultiScaleRetention, dict(hidden_size=64, num_heads=4)),
        ("layer_retnet_gqa_conv_nofuse_d32_h4_T70", ret_layer.MultiScaleRetention,
         dict(hidden_size=32, num_heads=4, num_kv_heads=2, use_short_conv=True, fuse_norm=False, expand_v=1.0)),
        ("layer_gla_d64_h4_T37", gla_layer.GatedLinearAttention, dict(hidden_size=64, num_heads=4)),
        ("layer_gla_gqa_conv_swish_clamp_d48_h4_T29", gla_layer.GatedLinearAttention,
         dict(hidden_size=48, num_heads=4, num_kv_heads=2, use_short_conv=True, feature_map="swish",
              clamp_min=-0.05, gate_low_rank_dim=8)),
        ("layer_gla_nogate_d32_h2_T20", gla_layer.GatedLinearAttention,
         dict(hidden_size=32, num_heads=2, use_output_gate=False, expand_k=1.0)),
        ("layer_hgrn2_d64_h4_T37", hgrn2_layer.HGRN2Attention, dict(hidden_size=64, num_heads=4, expand_ratio=None)),
        ("layer_hgrn2_ratio8_conv_d32_T70", hgrn2_layer.HGRN2Attention,
         dict(hidden_size=32, expand_ratio=8, use_short_conv=True)),
    ]
    for i, (name, cls, config) in enumerate(cases):
        torch.manual_seed(100 + i)
        layer = cls(**config).eval()
        perturb(layer, torch.Generator().manual_seed(200 + i))
        torch_fns = {"swish": torch.nn.SiLU()}  # fla's Triton activations, as torch modules
        if getattr(layer, "feature_map_fn", None) is not None:
            layer.feature_map_fn = torch_fns[config["feature_map"]]
        if hasattr(layer, "gate_fn"):
            layer.gate_fn = torch_fns[config.get("gate_fn", "swish")]
        T = int(name.rsplit("_T", 1)[1])
        x = torch.randn(2, T, config["hidden_size"], generator=torch.Generator().manual_seed(300 + i))
        with torch.no_grad():
            y = layer(x)[0]
        tensors = {"input": x, "output": y}
        tensors.update({f"param.{k}": v for k, v in layer.state_dict().items()})
        save(name, tensors, {"source": f"fla 0.5.2 fla.layers.{cls.__name__}", "layer_config": config,
                             "computed_in": "float32",
                             "ops": "fla/ops/*/naive.py, rotary_embedding_ref, rms_norm_ref, Conv1d.forward"})


if __name__ == "__main__":
    site = Path(sys.argv[1])
    op_cases(site)
    window_cases(site)
    layer_cases(site)
