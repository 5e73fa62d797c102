"""Writes the golden vectors in this folder from flash-linear-attention 0.5.2 (not run by the tests).

Needs an environment with ``flash-linear-attention==0.5.2`` and ``fla-core==0.5.2`` (and a Triton
that fla imports with, 3.5 here; nothing of it runs). Run: ``python tests/data/fla/generate.py DIR``
with DIR the installed package's parent (site-packages).

- ``op_*``: fla's pure-torch references, loaded by path from the installed files:
  ``fla/ops/delta_rule/naive.py::delta_rule_recurrence`` (layout (B, H, T, ·), stored here as
  (B, T, H, ·)), ``fla/ops/gated_delta_rule/naive.py::naive_recurrent_gated_delta_rule`` and
  ``fla/ops/mesa_net/naive.py::naive_mesa_net_exact``; ``op_mesa_net_cg_*`` from
  ``fla/ops/mesa_net/naive.py::naive_mesa_net_CG`` (the chunked conjugate gradient fla's kernels
  compute; T a multiple of its chunk). All compute in float32 whatever their input; the inputs are float32.
- ``layer_*``: fla's layers (``fla.layers.DeltaNet``, ``fla.layers.GatedDeltaNet``, ``fla.layers.MesaNet``) built with fla's
  own initialisation, parameters then moved away from it, run through their own ``forward`` in eval
  mode with the GPU-only pieces swapped for fla's torch references: the chunk / fused-recurrent ops
  for the naive recurrences above (with the L2 norm x·rsqrt(Σx² + 1e−6) and, for the gated layer,
  ``naive_gdn_gate`` and σ(β) as the kernels apply them; MesaNet's CG kernel for the exact solve of
  ``naive_mesa_net_exact``), ``ShortConvolution`` for ``nn.Conv1d``'s
  own forward plus its activation (the gated layer's fused q/k/v conv as the three
  convs it fuses), and the output norms for ``fla.modules.layernorm.rms_norm_ref`` /
  ``fla.modules.layernorm_gated.rms_norm_ref``. Computed in float32.
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


def l2norm(x):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def op_cases(site: Path) -> None:
    naive = load(site / "fla/ops/delta_rule/naive.py")
    gnaive = load(site / "fla/ops/gated_delta_rule/naive.py")
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g)
    for B, T, H, K, V, init, vector in [(2, 37, 3, 16, 8, False, False), (1, 65, 2, 32, 32, True, False),
                                        (2, 19, 2, 8, 12, True, True), (1, 1, 1, 4, 4, True, False)]:
        q, k, v = rand(B, T, H, K), l2norm(rand(B, T, H, K)), rand(B, T, H, V)
        beta = torch.sigmoid(rand(B, T, H, V) if vector else rand(B, T, H))
        S0 = rand(B, H, K, V) if init else None
        hm = lambda t: t.transpose(1, 2).contiguous()
        o, S = naive.delta_rule_recurrence(hm(q), hm(k), hm(v), hm(beta), initial_state=S0, output_final_state=True)
        tensors = {"q": q, "k": k, "v": v, "beta": beta, "o": o.transpose(1, 2), "final_state": S}
        if init:
            tensors["initial_state"] = S0
        save(f"op_delta_rule_B{B}_T{T}_H{H}_K{K}_V{V}{'_init' if init else ''}{'_vecbeta' if vector else ''}",
             tensors, {"source": "fla 0.5.2 fla/ops/delta_rule/naive.py::delta_rule_recurrence",
                       "scale": K ** -0.5, "computed_in": "float32"})
    for B, T, H, K, V, init in [(2, 37, 3, 16, 8, False), (1, 65, 2, 32, 32, True), (2, 3, 1, 8, 4, True)]:
        q, k, v = rand(B, T, H, K), l2norm(rand(B, T, H, K)), rand(B, T, H, V)
        beta = torch.sigmoid(rand(B, T, H))
        gate = F.logsigmoid(rand(B, T, H) + 2.0)  # log-decays near 0, as trained layers have them
        S0 = rand(B, H, K, V) if init else None
        o, S = gnaive.naive_recurrent_gated_delta_rule(q, k, v, beta, gate, initial_state=S0, output_final_state=True)
        tensors = {"q": q, "k": k, "v": v, "beta": beta, "g": gate, "o": o, "final_state": S}
        if init:
            tensors["initial_state"] = S0
        save(f"op_gated_delta_rule_B{B}_T{T}_H{H}_K{K}_V{V}{'_init' if init else ''}", tensors,
             {"source": "fla 0.5.2 fla/ops/gated_delta_rule/naive.py::naive_recurrent_gated_delta_rule",
              "scale": K ** -0.5, "computed_in": "float32"})


def mesa_cases(site: Path) -> None:
    mesa = load(site / "fla/ops/mesa_net/naive.py")
    g = torch.Generator().manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=g)
    for B, T, H, d, init in [(2, 37, 3, 16, False), (1, 33, 2, 8, True)]:
        q, k, v = l2norm(rand(B, T, H, d)), l2norm(rand(B, T, H, d)), rand(B, T, H, d)
        beta, gate = torch.sigmoid(rand(B, T, H)), F.logsigmoid(rand(B, T, H) + 2.0)
        lamb = F.softplus(rand(H, d)) + 0.25
        tensors = {"q": q, "k": k, "v": v, "beta": beta, "g": gate, "lamb": lamb}
        h_kk0 = h_kv0 = None
        if init:
            a = rand(B, H, d, d)
            h_kk0, h_kv0 = a @ a.transpose(-1, -2) / d, rand(B, H, d, d)
            tensors.update(h_kk_init=h_kk0, h_kv_init=h_kv0)
        o, h_kk, h_kv = mesa.naive_mesa_net_exact(q, k, v, gate, lamb, beta, h_kk0, h_kv0)
        tensors.update(o=o, h_kk=h_kk, h_kv=h_kv)
        save(f"op_mesa_net_B{B}_T{T}_H{H}_d{d}{'_init' if init else ''}", tensors,
             {"source": "fla 0.5.2 fla/ops/mesa_net/naive.py::naive_mesa_net_exact", "computed_in": "float32"})


def mesa_cg_cases(site: Path) -> None:
    mesa = load(site / "fla/ops/mesa_net/naive.py")
    g = torch.Generator().manual_seed(2)
    rand = lambda *s: torch.randn(*s, generator=g)
    for B, T, H, d, chunk, steps, init in [(2, 48, 3, 16, 16, 30, False), (1, 32, 2, 8, 8, 5, True)]:
        q, k, v = l2norm(rand(B, T, H, d)), l2norm(rand(B, T, H, d)), rand(B, T, H, d)
        beta, gate = torch.sigmoid(rand(B, T, H)), F.logsigmoid(rand(B, T, H) + 2.0)
        lamb = F.softplus(rand(H, d)) + 0.25
        tensors = {"q": q, "k": k, "v": v, "beta": beta, "g": gate, "lamb": lamb}
        h_kk0 = h_kv0 = None
        if init:
            a = rand(B, H, d, d)
            h_kk0, h_kv0 = a @ a.transpose(-1, -2) / d, rand(B, H, d, d)
            tensors.update(h_kk_init=h_kk0, h_kv_init=h_kv0)
        o, h_kk, h_kv = mesa.naive_mesa_net_CG(q, k, v, gate, lamb, beta, chunk, steps, h_kk0, h_kv0)
        tensors.update(o=o, h_kk=h_kk, h_kv=h_kv)
        save(f"op_mesa_net_cg_B{B}_T{T}_H{H}_d{d}_steps{steps}{'_init' if init else ''}", tensors,
             {"source": "fla 0.5.2 fla/ops/mesa_net/naive.py::naive_mesa_net_CG", "chunk_size": chunk,
              "max_CG_iteration": steps, "computed_in": "float32"})


def layer_cases(site: Path) -> None:
    import fla.layers.delta_net as dn
    import fla.layers.gated_deltanet as gdn
    import fla.layers.mesa_net as mn
    from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution
    from fla.modules.layernorm import rms_norm_ref
    from fla.modules.layernorm_gated import rms_norm_ref as gated_rms_norm_ref
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate

    naive = load(site / "fla/ops/delta_rule/naive.py")
    gnaive = load(site / "fla/ops/gated_delta_rule/naive.py")
    mesa = load(site / "fla/ops/mesa_net/naive.py")

    def mesa_op(q, k, v, g, beta, lamb, output_final_state=False, use_qk_l2norm_in_kernel=False, **_):
        assert use_qk_l2norm_in_kernel
        return mesa.naive_mesa_net_exact(l2norm(q), l2norm(k), v, g, lamb, beta)

    def delta_op(q, k, v, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False, **_):
        if use_qk_l2norm_in_kernel:
            q, k = l2norm(q), l2norm(k)
        hm = lambda t: t.transpose(1, 2).contiguous()
        o, S = naive.delta_rule_recurrence(hm(q), hm(k), hm(v), hm(beta), initial_state, output_final_state)
        return o.transpose(1, 2), S

    def gated_op(q, k, v, g, beta, A_log, dt_bias, initial_state=None, output_final_state=False,
                 use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                 allow_neg_eigval=False, **_):
        assert use_qk_l2norm_in_kernel and use_gate_in_kernel and use_beta_sigmoid_in_kernel
        q, k = l2norm(q), l2norm(k)
        repeat = v.shape[2] // q.shape[2]  # grouped value heads: value head i reads key head i // repeat
        q, k = q.repeat_interleave(repeat, dim=2), k.repeat_interleave(repeat, dim=2)
        g = naive_gdn_gate(g, A_log, dt_bias)
        beta = beta.sigmoid() * (2.0 if allow_neg_eigval else 1.0)
        return gnaive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=initial_state,
                                                       output_final_state=output_final_state)

    def conv_forward(self, x, cache=None, output_final_state=False, **_):
        T = x.shape[1]
        y = torch.nn.Conv1d.forward(self, x.transpose(1, 2))[..., :T].transpose(1, 2)
        return (F.silu(y) if self.activation in ("silu", "swish") else y), None

    dn.chunk_delta_rule = dn.fused_recurrent_delta_rule = delta_op
    gdn.chunk_gated_delta_rule = gdn.fused_recurrent_gated_delta_rule = gated_op
    ShortConvolution.forward = conv_forward
    mn.chunk_mesa_net = mesa_op
    gdn.GatedDeltaNet._use_fused_qkv_conv = lambda self, *args: False  # the three convs one by one (same math)
    RMSNorm.forward = lambda self, x: rms_norm_ref(x, self.weight, None, eps=self.eps, upcast=True)
    FusedRMSNormGated.forward = lambda self, x, g: gated_rms_norm_ref(x, self.weight, None, z=g, eps=self.eps)

    def perturb(layer, gen):
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if name.endswith("conv1d.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
                elif name == "o_norm.weight":
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
                elif name in ("A_log", "dt_bias", "lambda_params") or name.endswith("proj.bias"):
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))

    cases = [
        ("layer_deltanet_d64_h4_T37", dn.DeltaNet, dict(hidden_size=64, num_heads=4)),
        ("layer_deltanet_gate_negeig_d48_h2_T29", dn.DeltaNet,
         dict(hidden_size=48, num_heads=2, use_gate=True, allow_neg_eigval=True)),
        ("layer_deltanet_relu_sum_noconv_d32_h2_T20", dn.DeltaNet,
         dict(hidden_size=32, num_heads=2, qk_activation="relu", qk_norm="sum", use_short_conv=False)),
        ("layer_gated_deltanet_d64_h2_hd16_T37", gdn.GatedDeltaNet, dict(hidden_size=64, num_heads=2, head_dim=16)),
        ("layer_gated_deltanet_gva_negeig_d32_h2_hd8_T25", gdn.GatedDeltaNet,
         dict(hidden_size=32, num_heads=2, head_dim=8, num_v_heads=4, expand_v=1, allow_neg_eigval=True)),
        ("layer_gated_deltanet_nogate_d32_h2_hd16_T20", gdn.GatedDeltaNet,
         dict(hidden_size=32, num_heads=2, head_dim=16, use_gate=False)),
        ("layer_mesanet_d64_h4_hd16_T37", mn.MesaNet, dict(hidden_size=64, num_heads=4, head_dim=16)),
        ("layer_mesanet_gate_d32_h2_hd8_T21", mn.MesaNet,
         dict(hidden_size=32, num_heads=2, head_dim=8, use_output_gate=True)),
    ]
    for i, (name, cls, config) in enumerate(cases):
        torch.manual_seed(100 + i)
        layer = cls(**config).eval()
        perturb(layer, torch.Generator().manual_seed(200 + i))
        T = int(name.rsplit("_T", 1)[1])
        x = torch.randn(2, T, config["hidden_size"], generator=torch.Generator().manual_seed(300 + i))
        with torch.no_grad():
            y = layer(x)[0]
        tensors = {"input": x, "output": y}
        tensors.update({f"param.{k}": v for k, v in layer.state_dict().items()})
        save(name, tensors, {"source": f"fla 0.5.2 fla.layers.{cls.__name__}", "layer_config": config,
                             "computed_in": "float32",
                             "ops": "naive recurrences of fla/ops/*/naive.py, rms_norm_ref, Conv1d.forward"})


if __name__ == "__main__":
    site = Path(sys.argv[1])
    op_cases(site)
    mesa_cases(site)
    mesa_cg_cases(site)
    layer_cases(site)
