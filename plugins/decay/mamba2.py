"""Mamba-2 (Dao and Gu 2024) as mamba-ssm's ``Mamba2`` (its parameter names, shapes and initialisation): a
selective SSM whose state decays by one scalar per head, so its scan is ``simple_gla``.

Per head h (head width P = ``headdim``, state width N = ``d_state``, the B and C of head h those of its
group), with x, B, C from one short causal conv (SiLU) and Δ_t = softplus(dt_t + dt_bias) clamped to
``dt_limit``, A_h = −exp(A_log_h):

    S_t = exp(Δ_t A_h) S_{t−1} + Δ_t x_t B_tᵀ     (S ∈ R^{P×N})
    y_t = S_t C_t + D_h x_t

that is ``simple_gla`` with q = C, k = B, v = Δ·x, g = Δ·A and scale 1 (its state transposed); the
forward runs ``ops.ssd``, its chunked form with C·Bᵀ computed once per group of heads. Then
RMSNorm(y · SiLU(z)) per group of d_inner / ngroups channels (mamba-ssm's ``RMSNormGated`` with
``norm_before_gate=False``) and ``out_proj``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqzoo import SequenceLayer, State, native
from seqzoo.learner import positive_int
from seqzoo.nn import by_segments, causal_conv, causal_conv_step, conv_state_shape

from . import ops
from .ops import ssd

__all__ = ["Mamba2", "Mamba2Config"]

BACKENDS = ("auto", "torch")


@functools.cache
def _mamba_ssm_ops() -> dict | None:
    """mamba-ssm's SSD kernel and causal-conv1d, or None unless they import (only asked for CUDA tensors)."""
    return native.optional_kernels("mamba-ssm's Mamba-2 kernels", "the torch chunked form",
                                   chunk_scan="mamba_ssm.ops.triton.ssd_combined:mamba_chunk_scan_combined")


@dataclass
class Mamba2Config:
    """Options of ``mamba2`` (mamba-ssm's ``Mamba2`` names and defaults, except ``headdim``: 64, or half of
    d_inner when that is smaller, so that narrow models have two heads)."""

    d_state: int = field(default=128, metadata={"help": "state width N per head"})
    d_conv: int = field(default=4, metadata={"help": "width of the short causal conv on x, B, C"})
    expand: int = field(default=2, metadata={"help": "d_inner = expand · d_model"})
    headdim: int | None = field(default=None, metadata={"help": "head width P (default 64, or d_inner // 2 if smaller)"})
    ngroups: int = field(default=1, metadata={"help": "groups of heads sharing B and C"})
    A_init_range: tuple[float, float] = field(default=(1.0, 16.0), metadata={"help": "A = −U(range) at init"})
    dt_min: float = field(default=0.001, metadata={"help": "smallest Δ at init"})
    dt_max: float = field(default=0.1, metadata={"help": "largest Δ at init"})
    dt_init_floor: float = field(default=1e-4, metadata={"help": "floor of Δ at init"})
    dt_limit: tuple[float, float] = field(default=(0.0, math.inf), metadata={"help": "Δ clamped to this range"})
    bias: bool = field(default=False, metadata={"help": "bias in in_proj and out_proj"})
    conv_bias: bool = field(default=True, metadata={"help": "bias in the conv"})
    rmsnorm: bool = field(default=True, metadata={"help": "RMSNorm(y·SiLU(z)) (False: y·SiLU(z))"})
    norm_before_gate: bool = field(default=False, metadata={"help": "RMSNorm(y)·SiLU(z) instead"})
    rmsnorm_eps: float = field(default=1e-5, metadata={"help": "eps of the gated RMSNorm"})
    chunk_size: int = field(default=ops.DEFAULT_CHUNK_SIZE, metadata={"help": "tokens per chunk of the chunked forward"})
    backend: str = field(default="auto", metadata={
        "help": "'auto': mamba-ssm's SSD kernel for CUDA tensors when it imports, else the torch chunked form; "
                "'torch': always the torch chunked form"})


class Mamba2(SequenceLayer):
    """Mamba-2's mixer (module docstring). Parameters as mamba-ssm's ``Mamba2``: ``in_proj``
    (C → 2·d_inner + 2·ngroups·N + H, the order z, x, B, C, Δ), ``conv1d`` (depthwise over x, B, C),
    ``dt_bias``, ``A_log``, ``D`` (H,), ``norm.weight`` (d_inner, with rmsnorm), ``out_proj``. State:
    ``conv`` (B, d_inner + 2·ngroups·N, d_conv − 1) and ``ssm`` (B, H, P, N), mamba-ssm's layout."""

    Config = Mamba2Config

    def __init__(self, d_model: int, **config):
        super().__init__(d_model)
        self.config = cfg = Mamba2Config(**config)
        E = positive_int("expand", cfg.expand)
        self.d_inner = d_inner = E * d_model
        P = positive_int("headdim", min(64, d_inner // 2) if cfg.headdim is None else cfg.headdim)
        N, G = positive_int("d_state", cfg.d_state), positive_int("ngroups", cfg.ngroups)
        positive_int("d_conv", cfg.d_conv)
        positive_int("chunk_size", cfg.chunk_size)
        if d_inner % P:
            raise ValueError(f"expected d_inner = expand·d_model = {d_inner} divisible by headdim {P}")
        H = d_inner // P
        if H % G:
            raise ValueError(f"expected the heads ({H}) divisible by ngroups ({G})")
        lo, hi = cfg.A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"expected 0 < A_init_range[0] <= A_init_range[1], got {cfg.A_init_range}")
        if not 0 < cfg.dt_min <= cfg.dt_max:
            raise ValueError(f"expected 0 < dt_min <= dt_max, got {cfg.dt_min}, {cfg.dt_max}")
        if not cfg.dt_limit[0] <= cfg.dt_limit[1]:
            raise ValueError(f"expected dt_limit (low, high) with low <= high, got {cfg.dt_limit}")
        if cfg.backend not in BACKENDS:
            raise ValueError(f"expected backend in {BACKENDS}, got {cfg.backend!r}")
        self.headdim, self.nheads, self.d_state, self.ngroups = P, H, N, G
        self.conv_dim = d_inner + 2 * G * N
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * G * N + H, bias=cfg.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        dt = torch.exp(torch.rand(H) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(Δ)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(lo, hi)))
        self.D = nn.Parameter(torch.ones(H))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        if cfg.rmsnorm:
            self.norm = _GatedGroupRMSNorm(d_inner, G, cfg.rmsnorm_eps, cfg.norm_before_gate)
        self.out_proj = nn.Linear(d_inner, d_model, bias=cfg.bias)

    # --- state ----------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        return {"conv": torch.zeros(conv_state_shape(self.conv1d, batch_size), device=device, dtype=dtype),
                "ssm": torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=dtype)}

    def state_size(self, seq_len: int) -> int:
        return self.conv_dim * (self.config.d_conv - 1) + self.nheads * self.headdim * self.d_state

    def flops(self, seq_len: int) -> float:
        """2T·Σ(projection weights) + 2T·conv_dim·d_conv + 6T·H·P·N (per token and head: the update Δ x Bᵀ,
        the decay and the read-out S C)."""
        extra = 2.0 * self.conv_dim * self.config.d_conv + 6.0 * self.nheads * self.headdim * self.d_state
        return super().flops(seq_len) + seq_len * extra

    # --- pieces -------------------------------------------------------------------------------------
    def _inputs(self, x: Tensor, conv_state: Tensor, step: bool):
        """z, x (…, H, P), B, C (…, G, N) per group, Δ (…, H) and A (H,), and the new conv window."""
        G, N, H, P, d = self.ngroups, self.d_state, self.nheads, self.headdim, self.d_inner
        z, xBC, dt = self.in_proj(x).split([d, self.conv_dim, H], dim=-1)
        conv = causal_conv_step if step else causal_conv
        xBC, conv_state = conv(self.conv1d, xBC, conv_state)
        xs, Bm, Cm = F.silu(xBC).split([d, G * N, G * N], dim=-1)
        ctype = torch.promote_types(x.dtype, torch.float32)
        dt = F.softplus(dt.to(ctype) + self.dt_bias.to(ctype)).clamp(*self.config.dt_limit)
        return z, xs.unflatten(-1, (H, P)), Bm.unflatten(-1, (G, N)), Cm.unflatten(-1, (G, N)), dt, \
            -self.A_log.to(ctype).exp(), conv_state

    def _per_head(self, t: Tensor) -> Tensor:
        """(…, G, N) per group -> (…, H, N) per head (the heads of a group share it)."""
        return t.repeat_interleave(self.nheads // self.ngroups, dim=-2)

    def _output(self, y: Tensor, z: Tensor) -> Tensor:
        y = y.flatten(-2)
        y = self.norm(y, z) if self.config.rmsnorm else y * F.silu(z)
        return self.out_proj(y.to(z.dtype))

    # --- the contract -------------------------------------------------------------------------------
    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """The chunked scan (``ops.ssd``) segment by segment on the CPU, so activations stay in cache;
        elsewhere one segment (mamba-ssm's SSD kernel on CUDA when it imports)."""
        state = self.check_input(x, state)
        B, T = x.shape[:2]
        segment = max(T, 1)
        if x.device.type == "cpu":
            L, width = self.config.chunk_size, max(self.config.chunk_size, self.headdim, self.d_state)
            segment = L * max(1, ops.GROUP_ELEMENTS // max(1, B * self.nheads * L * width))
        return by_segments(self._forward_segment, x, state, segment)

    def _forward_segment(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        z, xs, Bm, Cm, dt, A, conv = self._inputs(x, state["conv"], step=False)
        S0 = state["ssm"]
        if (x.is_cuda and self.config.backend == "auto" and x.dtype != torch.float64 and x.shape[1] > 0
                and (kernels := _mamba_ssm_ops()) is not None):
            y, S = kernels["chunk_scan"](xs, dt, A, Bm, Cm, chunk_size=256, D=self.D, initial_states=S0.float(),
                                         return_final_states=True)
        else:
            y, S = ssd(xs, dt, A, Bm, Cm, initial_state=S0, output_final_state=True, chunk_size=self.config.chunk_size)
            y = y + self.D.to(y.dtype)[:, None] * xs
        return self._output(y, z), {"conv": conv, "ssm": S.to(S0.dtype)}

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One token: S ← exp(Δ A) S + Δ x Bᵀ, y = S C + D x (half precision computed in float32)."""
        state = self.check_input(x, state, step=True)
        z, xs, Bm, Cm, dt, A, conv = self._inputs(x, state["conv"], step=True)  # (B, H, ·)
        ct = dt.dtype
        xs, Bm, Cm, S = xs.to(ct), self._per_head(Bm).to(ct), self._per_head(Cm).to(ct), state["ssm"].to(ct)
        S = torch.addcmul(S * (dt * A).exp()[..., None, None], (xs * dt.unsqueeze(-1)).unsqueeze(-1), Bm.unsqueeze(-2))
        y = torch.einsum("bhpn,bhn->bhp", S, Cm) + self.D.to(ct)[:, None] * xs
        return self._output(y.to(x.dtype), z), {"conv": conv, "ssm": S.to(state["ssm"].dtype)}

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, nheads={self.nheads}, {self.config}"


class _GatedGroupRMSNorm(nn.Module):
    """mamba-ssm's ``RMSNormGated``: RMSNorm(y·SiLU(z)) (or RMSNorm(y)·SiLU(z) with norm_before_gate) over
    groups of d / ngroups channels, times ``weight`` (d,); computed in at least float32."""

    def __init__(self, d: int, groups: int, eps: float, norm_before_gate: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.groups, self.eps, self.norm_before_gate = groups, eps, norm_before_gate

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        ctype = torch.promote_types(y.dtype, torch.float32)
        h, gate = y.to(ctype), F.silu(z.to(ctype))
        if not self.norm_before_gate:
            h = h * gate
        g = h.unflatten(-1, (self.groups, -1))
        h = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight.to(ctype)
        return h * gate if self.norm_before_gate else h
