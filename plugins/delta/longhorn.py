"""Longhorn (Liu et al. 2024): a Mamba-shaped layer whose state update is the closed form of an
implicit online regression step (the math: ``reference.longhorn_reference``; the scan:
``ops.longhorn_scan``). Names and structure as the official code (github.com/Cranial-XIX/longhorn,
``models/longhorn.py``):

    x, z = in_proj(h).chunk(2);   x = SiLU(conv1d(x))   (depthwise, causal, with bias)
    Δ, k, q = split(x_proj(x), [dt_rank, d_state, d_state]);   β = σ(dt_head(Δ))   (per channel)
    s_t = s_{t−1} ⊙ (1 − ε_t k_t²) + ε_t x_t k_t,   ε_t = β_t / (1 + β_t ‖k_t‖²)   (per channel)
    y = (s_t · q_t + D x_t) ⊙ SiLU(z_t);   out = out_proj(y)

| path | tested against |
|---|---|
| ``step`` (the recurrence, one token) | the official ``Longhorn.step`` (golden vectors, float64); ``forward`` (conformance suite) |
| ``forward``: the chunked scan | the token loop; the golden vectors |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqzoo import SequenceLayer, State
from seqzoo.learner import positive_int
from seqzoo.nn import by_segments, causal_conv, causal_conv_step, conv_state_shape

from .ops import longhorn_scan
from .reference import longhorn_reference

__all__ = ["Longhorn", "LonghornConfig", "SEGMENT_ELEMENTS"]

#: elements of in_proj's output per segment of ``forward`` on the CPU (4 MiB in float32)
SEGMENT_ELEMENTS = 2**20


@dataclass
class LonghornConfig:
    """Options of ``longhorn`` (names and defaults as the official ``Longhorn``)."""

    d_state: int = field(default=16, metadata={"help": "N: features of k and q (the state per channel)"})
    d_conv: int = field(default=4, metadata={"help": "width of the depthwise causal conv"})
    expand: int = field(default=2, metadata={"help": "d_inner = expand·d_model channels"})
    dt_rank: int | str = field(default="auto", metadata={"help": "rank of Δ ('auto' = ceil(d_model / 16))"})
    conv_bias: bool = field(default=True, metadata={"help": "bias in conv1d"})
    bias: bool = field(default=False, metadata={"help": "bias in in_proj and out_proj"})
    chunk_size: int = field(default=16, metadata={"help": "tokens per chunk of the scan in forward"})


class Longhorn(SequenceLayer):
    """Longhorn. Parameters: ``in_proj`` (2·d_inner × C), ``conv1d`` (d_inner, 1, d_conv), ``x_proj``
    (dt_rank + 2N × d_inner), ``dt_head`` (d_inner × dt_rank, with bias), ``out_proj``, ``D`` (d_inner,),
    initialised as the official layer (PyTorch's defaults, D = 1). State: ``conv_state`` (B, d_inner,
    d_conv − 1), the last inputs of the conv; ``ssm_state`` (B, d_inner, N)."""

    Config = LonghornConfig

    def __init__(self, d_model: int, **config):
        super().__init__(d_model)
        self.config = cfg = LonghornConfig(**config)
        for name in ("d_state", "d_conv", "expand", "chunk_size"):
            positive_int(name, getattr(cfg, name))
        rank = math.ceil(d_model / 16) if cfg.dt_rank == "auto" else cfg.dt_rank
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"expected dt_rank to be 'auto' or a positive int, got {cfg.dt_rank!r}")
        self.d_inner, self.d_state, self.dt_rank = cfg.expand * d_model, cfg.d_state, rank
        E, N = self.d_inner, cfg.d_state
        self.in_proj = nn.Linear(d_model, 2 * E, bias=cfg.bias)
        self.conv1d = nn.Conv1d(E, E, cfg.d_conv, groups=E, padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(E, rank + 2 * N, bias=False)
        self.dt_head = nn.Linear(rank, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=cfg.bias)
        self.D = nn.Parameter(torch.ones(E))
        self.D._no_weight_decay = True

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        return {"conv_state": torch.zeros(conv_state_shape(self.conv1d, batch_size), device=device, dtype=dtype),
                "ssm_state": torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=dtype)}

    def state_size(self, seq_len: int) -> int:
        return self.d_inner * (self.d_state + self.config.d_conv - 1)

    def flops(self, seq_len: int) -> float:
        """2T·Σ(projection weights) + T·d_inner·(2·d_conv + 8N) (the conv; per channel and state the
        update's decay, its product with s, the input and the read-out s·q)."""
        return super().flops(seq_len) + seq_len * self.d_inner * (2 * self.config.d_conv + 8 * self.d_state)

    def _inputs(self, x: Tensor, conv_state: Tensor, step: bool):
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs, conv_state = (causal_conv_step if step else causal_conv)(self.conv1d, xs, conv_state)
        xs = F.silu(xs)
        dt, k, q = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return xs, z, k, q, torch.sigmoid(self.dt_head(dt)), conv_state

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """By segments on the CPU (about ``SEGMENT_ELEMENTS`` of in_proj's output each, whole chunks), each
        through the projections, conv, scan and out_proj from the state the last one ends in, so the
        activations stay in cache and the time per token does not grow with T; elsewhere one segment."""
        state = self.check_input(x, state)
        B, T = x.shape[:2]
        L = self.config.chunk_size
        segment = max(T, 1) if x.device.type != "cpu" else L * max(1, SEGMENT_ELEMENTS // (B * 2 * self.d_inner * L))
        return by_segments(self._forward_segment, x, state, segment)

    def _forward_segment(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        xs, z, k, q, beta, conv_state = self._inputs(x, state["conv_state"], step=False)
        y, S = longhorn_scan(xs, k, q, beta, initial_state=state["ssm_state"], output_final_state=True,
                             chunk_size=self.config.chunk_size)
        y = torch.addcmul(y, xs, self.D.to(y.dtype)) * F.silu(z)
        return self.out_proj(y), {"conv_state": conv_state, "ssm_state": S.to(state["ssm_state"].dtype)}

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        state = self.check_input(x, state, step=True)
        xs, z, k, q, beta, conv_state = self._inputs(x, state["conv_state"], step=True)
        dt = torch.promote_types(x.dtype, torch.float32)  # half precision computes in float32, as forward
        one = lambda t: t.to(dt).unsqueeze(1)  # a sequence of one token
        y, S = longhorn_reference(one(xs), one(k), one(q), one(beta), initial_state=state["ssm_state"].to(dt))
        y = y[:, 0].to(x.dtype)
        y = torch.addcmul(y, xs, self.D.to(y.dtype)) * F.silu(z)
        return self.out_proj(y), {"conv_state": conv_state, "ssm_state": S.to(state["ssm_state"].dtype)}

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, {self.config}"
