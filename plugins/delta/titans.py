"""Titans' neural memory (Behrouz et al. 2025) as a learner: an MLP memory trained online with momentum
and weight decay, in the configuration of titans-pytorch's ``NeuralMemory`` that updates the memory at
every token (``chunk_size=1, batch_size=1``, no input RMSNorm). Per head and token,

    S_t = μ_t S_{t−1} − θ_t ∇ℓ_t(M_{t−1}),   M_t = (1 − a_t) M_{t−1} + S_t,   o_t = f(q_t; M_t),
    ℓ_t(M) = mean((f(k_t; M) − v_t)²),   θ_t = max_lr·σ(·), μ_t = σ(·), a_t = σ(·) of linear maps of x_t,

with the memory f(x) = x + LN(MLP(x))·(γ + 1) (MLP: ``memory_depth`` matrices, GELU between, no
biases; LN without affine parameters, eps 1e-5; W and γ all trained by the inner loop), each head's
output times σ(head_gate_proj x) and ``o_proj`` over the heads. This is the generic TTT layer with the
online options ``momentum``, ``decay="sigmoid"``, ``decay_position="after"``, ``head_gate`` and
ℓ = ½‖f(k) − v‖² with η = 2θ/d (``ttt_base_lr`` = 2·max_lr, ``lr_per_dim``): the same gradient.

``from_titans_pytorch`` maps a ``NeuralMemory`` state dict onto the layer; tests/test_delta.py checks
the layer against titans-pytorch 0.5.5 on golden vectors (tests/data/titans).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import seqzoo
from seqzoo.learner import TTTConfig, positive_int

__all__ = ["TitansConfig", "TitansMemory", "titans", "from_titans_pytorch"]


@dataclass
class TitansConfig(TTTConfig):
    """The TTT options with Titans' defaults (titans-pytorch's: max_lr 0.01, so ttt_base_lr 0.02), and the
    memory's shape."""

    mini_batch_size: int = field(default=1, metadata={"help": "tokens per weight update (Titans: 1)"})
    ttt_base_lr: float = field(default=0.02, metadata={"help": "2·max_lr: η = 2θ/d for the mean-square loss"})
    rope: bool = field(default=False, metadata={"help": "RoPE on q and k"})
    token_idx: bool = field(default=False, metadata={"help": "TTT's 1/i row scale of η"})
    post_norm: bool = field(default=False, metadata={"help": "a norm on the memory's output"})
    momentum: bool = field(default=True, metadata={"help": "S_t = μ_t S_{t−1} − η_t∇ℓ (μ = σ(momentum_proj x))"})
    decay: str = field(default="sigmoid", metadata={"help": "weight decay a_t = σ(decay_proj x): M_t = (1 − a_t)M + S_t"})
    decay_position: str = field(default="after", metadata={"help": "the gradient at M_{t−1}, before the decay"})
    head_gate: bool = field(default=True, metadata={"help": "each head's output times σ(head_gate_proj x)"})
    memory_depth: int = field(default=2, metadata={"help": "matrices of the memory MLP (1: a linear memory)"})
    memory_expansion: float = field(default=4.0, metadata={"help": "the MLP's hidden width / head_dim"})
    memory_hidden: int | None = field(default=None, metadata={
        "help": "the MLP's hidden width (default int(head_dim·memory_expansion), as titans-pytorch)"})
    memory_residual_norm: bool = field(default=True, metadata={"help": "f(x) = x + LN(MLP(x))·(γ + 1)"})


class TitansMemory(seqzoo.GradientLearner):
    """titans-pytorch's memory for one head: f(x) = x + LN(MLP(x))·(γ + 1), MLP(x) = gelu(x W_0) W_1 …"""

    Config = TitansConfig

    def __init__(self, head_dim: int, **config):
        super().__init__(head_dim, **config)
        self.depth = positive_int("memory_depth", config.get("memory_depth", 2))
        hidden = config.get("memory_hidden")
        self.hidden = int(head_dim * config.get("memory_expansion", 4.0)) if hidden is None else hidden
        if self.hidden < 1:
            raise ValueError(f"expected memory_expansion·head_dim >= 1, got {self.hidden}")
        self.residual_norm = config.get("memory_residual_norm", True)

    def init_params(self) -> dict[str, Tensor]:
        d, h = self.head_dim, self.hidden
        dims = (d, *([h] * (self.depth - 1)), d)
        params = {f"w{i}": torch.empty(a, b) for i, (a, b) in enumerate(zip(dims, dims[1:]))}
        for w in params.values():  # in place: a loader that stubs torch's init functions returns None
            nn.init.xavier_uniform_(w)
        if self.residual_norm:
            params["gamma"] = torch.zeros(d)
        return params

    def token_flops(self) -> float:
        """8·|W| + 6·|W| per token and head (|W| the memory's matrices): the MLP's forward at k and its
        backward (≈ 3 forwards) and its forward at q, 2|W| each; the momentum, decay and step, 2|W| each."""
        d, h = self.head_dim, self.hidden
        dims = (d, *([h] * (self.depth - 1)), d)
        weights = sum(a * b for a, b in zip(dims, dims[1:]))
        return 14.0 * weights

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        h = x
        for i in range(self.depth):
            h = (F.gelu(h) if i else h) @ params[f"w{i}"]
        if not self.residual_norm:
            return h
        return x + F.layer_norm(h, h.shape[-1:], eps=1e-5) * (params["gamma"] + 1)


def titans(d_model: int, **config) -> seqzoo.SequenceLayer:
    """Titans' neural memory: per head an MLP memory f(x) = x + LN(MLP(x))·(γ + 1) trained online at every
    token with momentum and weight decay, S_t = μ_t S_{t−1} − θ_t∇ℓ_t(M_{t−1}), M_t = (1 − a_t)M_{t−1} + S_t,
    read out at the query and gated per head (titans-pytorch's NeuralMemory, chunk_size=1, batch_size=1).

    The generic TTT layer around ``TitansMemory`` with Titans' defaults (``TitansConfig``)."""
    return TitansMemory.make_layer(d_model, **config)


def from_titans_pytorch(state_dict: dict[str, Tensor], *, max_lr: float = 0.01, **config) -> seqzoo.SequenceLayer:
    """A ``titans`` layer holding the weights of a titans-pytorch ``NeuralMemory`` (``state_dict()``) built
    with chunk_size=1, batch_size=1, pre_rmsnorm=False, momentum and several heads; ``max_lr`` is its
    ``default_step_transform_max_lr``. The widths and depth are read off the weights."""
    sd = dict(state_dict)
    need = ["to_queries.weight", "to_adaptive_step.0.weight", "to_momentum.0.weight", "to_decay_factor.0.weight",
            "retrieve_gate.0.weight", "combine_heads.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"from_titans_pytorch: expected a NeuralMemory state dict with momentum and several heads; "
                         f"missing {missing}")
    if any(k.startswith(("retrieve_norm", "store_norm", "q_norm", "k_norm")) for k in sd):
        raise ValueError("from_titans_pytorch: expected pre_rmsnorm=False and qk_rmsnorm=False")
    mem = sorted((k for k in sd if k.startswith("memory_model_parameters.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    weights = [sd[k] for k in mem]
    gamma = [w for w in weights if w.ndim == 2]
    matrices = [w for w in weights if w.ndim == 3]
    H, C = sd["to_adaptive_step.0.weight"].shape
    d = matrices[0].shape[1]
    if d * H != C:
        raise ValueError(f"from_titans_pytorch: expected dim_head·heads = dim (the layer's heads split d_model), got "
                         f"dim_head {d}, heads {H}, dim {C}")
    layer = seqzoo.create_layer("titans", C, num_heads=H, ttt_base_lr=2.0 * max_lr, memory_depth=len(matrices),
                                memory_hidden=matrices[0].shape[2] if len(matrices) > 1 else None,
                                memory_residual_norm=bool(gamma), **config).to(sd["to_queries.weight"].dtype)
    ours = {"q_proj.weight": sd["to_queries.weight"], "k_proj.weight": sd["to_keys.weight"],
            "v_proj.weight": sd["to_values.weight"], "o_proj.weight": sd["combine_heads.weight"],
            "learnable_ttt_lr_weight": sd["to_adaptive_step.0.weight"].unsqueeze(1),
            "learnable_ttt_lr_bias": sd["to_adaptive_step.0.bias"].unsqueeze(1),
            "momentum_proj.weight": sd["to_momentum.0.weight"], "momentum_proj.bias": sd["to_momentum.0.bias"],
            "decay_proj.weight": sd["to_decay_factor.0.weight"], "decay_proj.bias": sd["to_decay_factor.0.bias"],
            "head_gate_proj.weight": sd["retrieve_gate.0.weight"]}
    ours.update({f"w{i}": w for i, w in enumerate(matrices)})
    if gamma:
        ours["gamma"] = gamma[0]
    layer.load_state_dict(ours, strict=True)
    return layer
