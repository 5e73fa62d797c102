"""Mamba (v1): the selective state-space mixer of Gu & Dao (arXiv 2312.00752).

Per channel d of the inner width and state index n, with Δ_t = softplus(dt_proj(·) + bias) > 0 and
A = −exp(A_log) < 0::

    h_t[d, n] = exp(Δ_t[d] A[d, n]) h_{t−1}[d, n] + Δ_t[d] B_t[n] x_t[d]      (update rule)
    y_t[d]    = Σ_n C_t[n] h_t[d, n] + D[d] x_t[d]                            (output rule)
    out_t     = out_proj(y_t ⊙ silu(z_t))

where x and z are the two halves of ``in_proj(u)``, x passed through a depthwise causal conv and silu,
and (Δ, B, C) are read from x by ``x_proj`` (Δ through the low-rank ``dt_proj``). Parameter names,
shapes and initialisation are mamba-ssm's ``Mamba`` (= Hugging Face ``MambaMixer``), so their
state_dicts load strictly and give the same output.

The state is ``conv_state`` (B, d_inner, d_conv), the last ``d_conv`` conv inputs (mamba-ssm's
convention), and ``ssm_state`` (B, d_inner, d_state), h.

Three forms of the scan live here: ``selective_scan_ref`` (token by token, the readable reference),
``selective_scan_chunked`` (the CPU fast path: a two-level scan over chunks, see its docstring) and,
on CUDA when mamba-ssm's compiled kernels exist, mamba-ssm's own kernels.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import seqzoo
from seqzoo import SequenceLayer, State
from seqzoo.nn import causal_conv, causal_conv_step, gelu_tanh

log = logging.getLogger(__name__)

__all__ = ["Mamba", "MambaConfig", "selective_scan_ref", "selective_scan_chunked"]


# --- the selective scan ----------------------------------------------------------------------------
def selective_scan_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                       h: Tensor) -> tuple[Tensor, Tensor]:
    """Token-by-token selective scan, the readable reference.

    x, dt: (b, t, d); A: (d, n); B, C: (b, t, n); D: (d,); h: (b, d, n) the state before x.
    Returns y (b, t, d) = C·h_t + D x_t (no gate) and the last state (b, d, n).
    """
    ys = []
    for i in range(x.shape[1]):
        decay = torch.exp(dt[:, i, :, None] * A)  # exp(Δ_t A)
        h = decay * h + (dt[:, i] * x[:, i])[:, :, None] * B[:, i, None, :]  # + Δ_t B_t x_t
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, i]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    return y + x * D, h


#: Elements of (batch, blocks, d_inner, d_state) touched per step of the two-level scan: about 512 KiB
#: in float32, so that each step's tensors stay in a core's L2 cache.
SCAN_STEP_ELEMENTS = 2**17


def selective_scan_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h: Tensor,
                           chunk_size: int = 64, blocks: int | None = None) -> tuple[Tensor, Tensor]:
    """The selective scan as a two-level scan: the same contract as ``selective_scan_ref``.

    The sequence is cut into chunks of ``chunk_size`` tokens, and ``blocks`` consecutive chunks form
    a group. Within a group, the chunks are scanned at once, in lock-step over the positions of a
    chunk: first from a zero state to get each chunk's end state, then (after carrying the true
    start states across the group's chunks) again from those start states for the outputs. Only
    exp(Δ A) and exp(A Σ Δ) of non-positive arguments and products of such decays appear, so nothing
    overflows. Python steps: about 2·T / blocks; memory: O(b·t·d) plus O(b·blocks·d·n) per step.
    ``blocks`` defaults to what keeps a step's tensors near ``SCAN_STEP_ELEMENTS`` (at least 4).
    """
    b, T, d = x.shape
    n = A.shape[-1]
    if blocks is None:
        blocks = max(4, SCAN_STEP_ELEMENTS // max(1, b * d * n))
    dtx = dt * x
    ys = []
    for lo in range(0, T, chunk_size * blocks):
        group = slice(lo, lo + chunk_size * blocks)
        y, h = _scan_group(dt[:, group], dtx[:, group], A, B[:, group], C[:, group], h, chunk_size)
        ys.append(y)
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(x.shape)
    return y + x * D, h


def _scan_group(dt: Tensor, dtx: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor,
                chunk_size: int) -> tuple[Tensor, Tensor]:
    """One group of ``selective_scan_chunked``: dt, dtx = Δ ⊙ x (b, s, d); B, C (b, s, n); h (b, d, n).

    Returns y (b, s, d) without the D term, and the state after the group.
    """
    s = dt.shape[1]
    L = min(chunk_size, s)
    pad = -s % L  # padding with Δ = 0 is the identity step: decay 1, input 0
    if pad:
        dt, dtx, B, C = (F.pad(v, (0, 0, 0, pad)) for v in (dt, dtx, B, C))
    dt = rearrange(dt, "b (g l) d -> l b g d 1", l=L)
    dtx = rearrange(dtx, "b (g l) d -> l b g d 1", l=L)
    B = rearrange(B, "b (g l) n -> l b g 1 n", l=L)
    C = rearrange(C, "b (g l) n -> l b g n 1", l=L)

    G = dt.shape[2]

    # level 1: chunks 0..G-2 from h = 0, in lock-step, for their end states (the last chunk's end
    # state comes out of level 3)
    h_run = h[:, None]
    if G > 1:
        dt1, dtx1, B1 = (v[:, :, :-1].unbind(0) for v in (dt, dtx, B))
        h_end = dtx1[0] * B1[0]
        for i in range(1, L):
            h_end = torch.addcmul(dtx1[i] * B1[i], torch.exp(dt1[i] * A), h_end)  # h ← exp(Δ A) h + Δ B x
        decay = torch.exp(dt[:, :, :-1].sum(0) * A)  # exp(A Σ_chunk Δ), the decay across a whole chunk

        # level 2: carry the state across the chunks, h_start(g+1) = decay(g) h_start(g) + h_end(g)
        starts = [h]
        for g in range(G - 1):
            starts.append(torch.addcmul(h_end[:, g], decay[:, g], starts[-1]))
        h_run = torch.stack(starts, dim=1)  # (b, g, d, n)

    # level 3: every chunk again, now from its true start state, with the outputs y = C·h
    ys = []
    for dt_i, dtx_i, B_i, C_i in zip(dt.unbind(0), dtx.unbind(0), B.unbind(0), C.unbind(0)):
        h_run = torch.addcmul(dtx_i * B_i, torch.exp(dt_i * A), h_run)
        ys.append(torch.matmul(h_run, C_i))  # (b, g, d, 1)
    y = rearrange(torch.stack(ys), "l b g d 1 -> b (g l) d")
    return y[:, :s], h_run[:, -1].clone()  # padding steps are the identity: the last lane ends in the state


# --- mamba-ssm's CUDA kernels (only ever imported for CUDA tensors) ---------------------------------
@functools.cache
def _cuda_kernels() -> dict | None:
    """mamba-ssm's and causal-conv1d's kernels, or None unless both import with compiled extensions."""
    try:
        import causal_conv1d_cuda  # noqa: F401  the compiled extensions, not just the Python packages
        import selective_scan_cuda  # noqa: F401
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception as exc:  # noqa: BLE001 - any failure means: use the torch path
        log.info("mamba-ssm CUDA kernels unavailable (%s); using the torch scan", exc)
        return None
    return {"causal_conv1d_fn": causal_conv1d_fn, "selective_scan_fn": selective_scan_fn,
            "selective_state_update": selective_state_update}


# --- the layer -------------------------------------------------------------------------------------
@dataclass
class MambaConfig:
    d_state: int = field(default=16, metadata={"help": "SSM state size N per channel"})
    d_conv: int = field(default=4, metadata={"help": "width of the depthwise causal conv"})
    expand: int = field(default=2, metadata={"help": "d_inner = expand · d_model"})
    dt_rank: int | str = field(default="auto", metadata={"help": "rank of the Δ projection; 'auto' = ceil(d_model/16)"})
    dt_min: float = field(default=0.001, metadata={"help": "smallest initial Δ"})
    dt_max: float = field(default=0.1, metadata={"help": "largest initial Δ"})
    dt_init: str = field(default="random", metadata={"help": "dt_proj weight init: 'random' (uniform) or 'constant'"})
    dt_scale: float = field(default=1.0, metadata={"help": "scale of the dt_proj weight init"})
    dt_init_floor: float = field(default=1e-4, metadata={"help": "floor of the initial Δ"})
    conv_bias: bool = field(default=True, metadata={"help": "bias in conv1d"})
    bias: bool = field(default=False, metadata={"help": "biases in in_proj and out_proj"})
    use_gate: bool = field(default=False, metadata={
        "help": "extra output gate of the TTT Mamba backbone: out_proj(gelu_tanh(g_proj(u)) ⊙ y), g_proj: d_model → d_inner"})
    chunk_size: int = field(default=64, metadata={"help": "tokens per chunk of the CPU two-level scan"})
    scan_blocks: int | None = field(default=None, metadata={
        "help": "chunks the CPU scan runs in lock-step (default: enough to fill about 512 KiB per step, at least 4)"})
    use_kernels: bool = field(default=True, metadata={"help": "use mamba-ssm's CUDA kernels on CUDA tensors when installed"})


class Mamba(SequenceLayer):
    """The Mamba (v1) mixer, with mamba-ssm's parameter names, shapes and initialisation."""

    Config = MambaConfig

    def __init__(self, d_model: int, **config):
        super().__init__(d_model)
        self.config = cfg = MambaConfig(**config)
        for name in ("d_state", "d_conv", "expand", "chunk_size"):
            value = getattr(cfg, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"expected {name} to be a positive int, got {value!r}")
        if cfg.scan_blocks is not None and (not isinstance(cfg.scan_blocks, int) or cfg.scan_blocks < 1):
            raise ValueError(f"expected scan_blocks to be None or a positive int, got {cfg.scan_blocks!r}")
        if cfg.dt_rank == "auto":
            self.dt_rank = math.ceil(d_model / 16)
        elif isinstance(cfg.dt_rank, int) and not isinstance(cfg.dt_rank, bool) and cfg.dt_rank >= 1:
            self.dt_rank = cfg.dt_rank
        else:
            raise ValueError(f"expected dt_rank to be 'auto' or a positive int, got {cfg.dt_rank!r}")
        if cfg.dt_init not in ("random", "constant"):
            raise ValueError(f"expected dt_init 'random' or 'constant', got {cfg.dt_init!r}")
        if not 0 < cfg.dt_min <= cfg.dt_max:
            raise ValueError(f"expected 0 < dt_min <= dt_max, got dt_min={cfg.dt_min}, dt_max={cfg.dt_max}")
        self.d_state, self.d_conv = cfg.d_state, cfg.d_conv
        self.d_inner = d_inner = cfg.expand * d_model

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=cfg.bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, bias=cfg.conv_bias,
                                padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, cfg.d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.g_proj = nn.Linear(d_model, d_inner, bias=False) if cfg.use_gate else None
        self.out_proj = nn.Linear(d_inner, d_model, bias=cfg.bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba-ssm's initialisation of dt_proj, A_log (S4D-real) and D."""
        cfg = self.config
        std = self.dt_rank ** -0.5 * cfg.dt_scale
        if cfg.dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        # Δ log-uniform in [dt_min, dt_max], floored; the bias is softplus⁻¹(Δ) = Δ + log(1 − exp(−Δ))
        log_lo, log_hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt = torch.exp(torch.rand(self.d_inner) * (log_hi - log_lo) + log_lo).clamp(min=cfg.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)  # S4D-real
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        self.A_log._no_weight_decay = self.D._no_weight_decay = True  # mamba-ssm's marks for optimisers

    # state
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        return {
            "conv_state": torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype),
            "ssm_state": torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=dtype),
        }

    def state_size(self, seq_len: int) -> int:
        return self.d_inner * (self.d_conv + self.d_state)

    # pieces shared by forward and step
    def _ssm_inputs(self, xc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(Δ before its bias and softplus, B, C) read from the conv output xc (..., d_inner)."""
        dt, B, C = torch.split(self.x_proj(xc), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def _output(self, y: Tensor, z: Tensor, u: Tensor) -> Tensor:
        """out_proj(y ⊙ silu(z) [⊙ gelu_tanh(g_proj(u))])."""
        y = y * F.silu(z)
        if self.g_proj is not None:
            y = y * gelu_tanh(self.g_proj(u))
        return self.out_proj(y)

    def _use_kernels(self, x: Tensor) -> bool:
        return (x.is_cuda and self.config.use_kernels and x.dtype != torch.float64
                and _cuda_kernels() is not None)

    # update rule + output rule, many tokens
    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        fresh = state is None
        state = self.check_input(x, state)
        if x.shape[1] == 0:
            return x.new_zeros(x.shape), {k: v.clone() for k, v in state.items()}
        if fresh and self._use_kernels(x):
            return self._forward_kernels(x)
        dtype = x.dtype
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # (b, t, d_inner) each
        xc, _ = causal_conv(self.conv1d, xi, state["conv_state"][..., 1:])
        conv_state = torch.cat([state["conv_state"], xi[:, -self.d_conv:].transpose(1, 2)], dim=-1)
        xc = F.silu(xc)
        dt, B, C = self._ssm_inputs(xc)
        ctype = torch.promote_types(dtype, torch.float32)  # scan in at least float32
        A = -torch.exp(self.A_log.to(ctype))
        dt = F.softplus((dt + self.dt_proj.bias).to(ctype))  # Δ_t
        y, h = selective_scan_chunked(xc.to(ctype), dt, A, B.to(ctype), C.to(ctype),
                                      self.D.to(ctype), state["ssm_state"].to(ctype), self.config.chunk_size,
                                      self.config.scan_blocks)
        new_state = {"conv_state": conv_state[..., -self.d_conv:], "ssm_state": h.to(dtype)}
        return self._output(y.to(dtype), z, x), new_state

    # update rule + output rule, one token
    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        state = self.check_input(x, state, step=True)
        dtype = x.dtype
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # (b, d_inner) each
        xc, _ = causal_conv_step(self.conv1d, xi, state["conv_state"][..., 1:])
        conv_state = torch.cat([state["conv_state"][..., 1:], xi[..., None]], dim=-1)  # last d_conv inputs
        xc = F.silu(xc)
        dt, B, C = self._ssm_inputs(xc)
        if self._use_kernels(x) and not torch.is_grad_enabled():  # the kernel has no backward
            y, h = self._step_kernels(xc, dt, B, C, z, state["ssm_state"])
            return self._output_gate_only(y, x), {"conv_state": conv_state, "ssm_state": h}
        ctype = torch.promote_types(dtype, torch.float32)
        dt = F.softplus((dt + self.dt_proj.bias).to(ctype))  # Δ_t
        A = -torch.exp(self.A_log.to(ctype))
        h = torch.exp(dt[..., None] * A) * state["ssm_state"].to(ctype) \
            + (dt * xc.to(ctype))[..., None] * B.to(ctype)[:, None, :]  # h_t = exp(Δ A) h_{t−1} + Δ B x
        y = torch.einsum("bdn,bn->bd", h, C.to(ctype)) + self.D.to(ctype) * xc.to(ctype)  # y = C·h + D x
        return self._output(y.to(dtype), z, x), {"conv_state": conv_state, "ssm_state": h.to(dtype)}

    # --- CUDA: mamba-ssm's kernels ------------------------------------------------------------------
    def _output_gate_only(self, y: Tensor, u: Tensor) -> Tensor:
        """out_proj([gelu_tanh(g_proj(u)) ⊙] y) for kernel outputs that already include silu(z)."""
        if self.g_proj is not None:
            y = y * gelu_tanh(self.g_proj(u))
        return self.out_proj(y)

    def _forward_kernels(self, x: Tensor) -> tuple[Tensor, State]:
        """mamba-ssm's forward from the initial state: causal_conv1d_fn, then selective_scan_fn."""
        k = _cuda_kernels()
        T = x.shape[1]
        xz = rearrange(self.in_proj.weight @ rearrange(x, "b t c -> c (b t)"), "d (b t) -> b d t", t=T)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        xi, z = xz.chunk(2, dim=1)  # (b, d_inner, t)
        conv_state = F.pad(xi, (self.d_conv - T, 0))  # the last d_conv inputs (crops when T > d_conv)
        xc = k["causal_conv1d_fn"](xi, rearrange(self.conv1d.weight, "d 1 w -> d w"), self.conv1d.bias,
                                   activation="silu")
        dt, B, C = torch.split(self.x_proj(rearrange(xc, "b d t -> (b t) d")),
                               [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = rearrange(self.dt_proj.weight @ dt.t(), "d (b t) -> b d t", t=T)
        B = rearrange(B, "(b t) n -> b n t", t=T).contiguous()
        C = rearrange(C, "(b t) n -> b n t", t=T).contiguous()
        A = -torch.exp(self.A_log.float())
        y, h = k["selective_scan_fn"](xc, dt, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                                      delta_softplus=True, return_last_state=True)
        out = self._output_gate_only(rearrange(y, "b d t -> b t d"), x)
        return out, {"conv_state": conv_state.contiguous(), "ssm_state": h.to(x.dtype)}

    def _step_kernels(self, xc: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor,
                      ssm_state: Tensor) -> tuple[Tensor, Tensor]:
        """mamba-ssm's selective_state_update on a copy of the state (it updates in place)."""
        h = ssm_state.clone()
        y = _cuda_kernels()["selective_state_update"](
            h, xc, dt, -torch.exp(self.A_log.float()), B, C, self.D, z=z, dt_bias=self.dt_proj.bias,
            dt_softplus=True)
        return y, h

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={c.d_state}, d_conv={c.d_conv}, "
                f"dt_rank={self.dt_rank}, use_gate={c.use_gate}")


@seqzoo.hookimpl
def register_layers(register):
    register("mamba", Mamba, description="Mamba (v1) selective SSM mixer, mamba-ssm / Hugging Face compatible")
