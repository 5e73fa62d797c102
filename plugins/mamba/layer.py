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
``selective_scan_chunked`` (the CPU fast path: chunk by chunk, see its docstring) and,
on CUDA when mamba-ssm's compiled kernels exist, mamba-ssm's own kernels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from seqzoo import SequenceLayer, State, native
from seqzoo.contract import Decoder
from seqzoo.nn import causal_conv, causal_conv_step, gelu_tanh, recomputed_backward

__all__ = ["Mamba", "MambaConfig", "selective_scan_ref", "selective_scan_chunked", "mamba_step", "NATIVE"]


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


#: Sets the scan's groups: by default a group has SCAN_STEP_ELEMENTS // (batch · d_inner · d_state)
#: chunks (at least 4), e.g. 42 chunks of 8 tokens at d_inner 1536, d_state 16, batch 1. A group's chunks
#: share their buffers, and ``Mamba.forward``'s segments are whole groups.
SCAN_STEP_ELEMENTS = 2**20

#: Elements of a (batch, tokens, d_inner) activation in one segment of ``Mamba.forward`` (2 MiB in
#: float32): long sequences go through the layer segment by segment, each a whole number of scan groups.
SEGMENT_ELEMENTS = 2**19


def selective_scan_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h: Tensor,
                           chunk_size: int = 8, blocks: int | None = None, *,
                           kernels: bool = False) -> tuple[Tensor, Tensor]:
    """The selective scan chunk by chunk: the same contract as ``selective_scan_ref``.

    The sequence is cut into groups of ``blocks`` chunks of ``chunk_size`` tokens, and the chunks are
    scanned one after another. For a chunk, the decays exp(Δ A) and inputs Δ B x of all its positions
    are formed by two whole-chunk operations ((b, chunk_size, d, n) each, cache-sized), the recurrence
    h_i = exp(Δ_i A) h_{i−1} + Δ_i B_i x_i runs over the positions as one fused multiply-add each
    (in place in the input buffer when no gradient is tracked), and the outputs C_i·h_i of the whole
    chunk come from one batched product. Each token costs one pass of each kind over (b, d, n): the
    token loop's arithmetic, in larger operations. Only exponentials of non-positive arguments appear.
    ``blocks`` defaults to ``SCAN_STEP_ELEMENTS // (b·d·n)`` (at least 4).

    With ``kernels`` (the layer's ``use_kernels``), a group that autograd records runs through the native
    scan and its written-out backward (``_NativeScanGroup``) on plain float32 CPU tensors.
    """
    b, T, d = x.shape
    n = A.shape[-1]
    if blocks is None:
        blocks = max(4, SCAN_STEP_ELEMENTS // max(1, b * d * n))
    dtx = dt * x
    ys = []
    for lo in range(0, T, chunk_size * blocks):
        group = slice(lo, lo + chunk_size * blocks)
        y, h = _scan_group(dt[:, group], dtx[:, group], A, B[:, group], C[:, group], h, chunk_size, kernels=kernels)
        ys.append(y)
    y = (ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)) if ys else x.new_zeros(x.shape)
    return y.addcmul_(x, D), h  # y is a fresh tensor: + D x in place


def _scan_group(dt: Tensor, dtx: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor,
                chunk_size: int, *, kernels: bool = False) -> tuple[Tensor, Tensor]:
    """One group of ``selective_scan_chunked``: dt, dtx = Δ ⊙ x (b, s, d); B, C (b, s, n); h (b, d, n).

    Returns y (b, s, d) without the D term, and the state after the group.
    """
    tensors = (dt, dtx, A, B, C, h)
    track = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if track and kernels and native.trainable(*tensors) and NATIVE.available():
        return _NativeScanGroup.apply(*tensors)
    b, s, d = dt.shape
    At = A.t().contiguous()  # (n, d): states are laid out (b, l, n, d), d innermost, for long vector ops
    h = h.transpose(1, 2)  # (b, n, d)
    if not track:
        # the chunks reuse cache-resident buffers (2x faster than fresh tensors per chunk); the inputs
        # alternate between two, as a chunk's last state is read while the next chunk's inputs are formed
        shape = (b, min(chunk_size, s), At.shape[0], d)
        decays, inputs = dt.new_empty(shape), (dt.new_empty(shape), dt.new_empty(shape))
        y = dt.new_empty(b, s, 1, d)
    ys = []  # with autograd: the chunks' outputs
    for k, lo in enumerate(range(0, s, chunk_size)):
        c = slice(lo, lo + chunk_size)
        # per chunk: exp(Δ_i A) and Δ_i B_i x_i (b, l, n, d); h_i = exp(Δ_i A) h_{i−1} + Δ_i B_i x_i;
        # y_i = C_i·h_i as (1, n) @ (n, d) per position
        if track:  # autograd needs every h_i as its own tensor
            decay = (dt[:, c, None, :] * At).exp_()
            states = []
            for inputs_i, decay_i in zip((B[:, c, :, None] * dtx[:, c, None, :]).unbind(1), decay.unbind(1)):
                h = torch.addcmul(inputs_i, decay_i, h)
                states.append(h)
            ys.append(torch.matmul(C[:, c, None, :], torch.stack(states, dim=1)))
        else:  # the same arithmetic in the buffers, the states written over the inputs
            size = min(chunk_size, s - lo)
            decay = torch.mul(dt[:, c, None, :], At, out=decays[:, :size]).exp_()
            hs = torch.mul(B[:, c, :, None], dtx[:, c, None, :], out=inputs[k % 2][:, :size])
            for h_i, decay_i in zip(hs.unbind(1), decay.unbind(1)):
                h = h_i.addcmul_(decay_i, h)
            torch.matmul(C[:, c, None, :], hs, out=y[:, c])
    if track:
        y = torch.cat(ys, dim=1)
    return y[:, :, 0], h.transpose(1, 2).contiguous()


class _NativeScanGroup(torch.autograd.Function):
    """A scan group under autograd through the native scan (``csrc/mamba_scan.c``): the forward keeps
    only its inputs, the backward recomputes the states one batch row at a time and runs the state's
    gradient backwards, g_t = C_t ⊗ ∂y_t + exp(Δ_{t+1} A) ⊙ g_{t+1}, reading every input's gradient off
    it in the same pass. Equal to autograd through the torch scan to float32 rounding
    (test_native_scan_equals_autograd_through_the_torch_scan)."""

    @staticmethod
    def forward(ctx, dt, dtx, A, B, C, h0):
        ctx.save_for_backward(dt, dtx, A, B, C, h0)  # the inputs themselves (a second derivative recomputes)
        dt, dtx, A, B, C, h0 = (t.contiguous() for t in (dt, dtx, A, B, C, h0))
        b, s, d = dt.shape
        n = A.shape[1]
        y, hT = dt.new_empty(b, s, d), dt.new_empty(b, d, n)
        NATIVE.sz_mamba_scan_fwd(b, s, d, n, *(t.data_ptr() for t in (dt, dtx, A, B, C, h0, y, hT)))
        return y, hT

    @staticmethod
    def backward(ctx, gy, gh):
        dt, dtx, A, B, C, h0 = ctx.saved_tensors
        if torch.is_grad_enabled():  # a second derivative: autograd through the torch scan, recomputed
            return recomputed_backward(lambda *t: _scan_group(*t, 8), ctx.saved_tensors, (gy, gh),
                                       ctx.needs_input_grad)
        dt, dtx, A, B, C, h0 = (t.contiguous() for t in (dt, dtx, A, B, C, h0))
        b, s, d = dt.shape
        n = A.shape[1]
        gy = gy.contiguous() if gy is not None else None
        gh = gh.contiguous() if gh is not None else None
        gdt, gdtx, gA = torch.empty_like(dt), torch.empty_like(dtx), torch.empty_like(A)
        gB, gC, gh0 = torch.empty_like(B), torch.empty_like(C), torch.empty_like(h0)
        status = NATIVE.sz_mamba_scan_bwd(
            b, s, d, n, *(native.address(t) for t in (dt, dtx, A, B, C, h0, gy, gh, gdt, gdtx, gA, gB, gC, gh0)))
        if status:
            raise MemoryError(f"the native scan's backward could not allocate {s * d * n * 4 / 2**20:.0f} MB")
        return gdt, gdtx, gA, gB, gC, gh0


# --- mamba-ssm's CUDA kernels (only ever imported for CUDA tensors) ---------------------------------
@functools.cache
def _cuda_kernels() -> dict | None:
    """mamba-ssm's and causal-conv1d's kernels, or None unless both import with compiled extensions."""
    return native.optional_kernels(
        "mamba-ssm CUDA kernels", "the torch scan",
        causal_conv1d_cuda="causal_conv1d_cuda", selective_scan_cuda="selective_scan_cuda",  # the extensions
        causal_conv1d_fn="causal_conv1d:causal_conv1d_fn",
        selective_scan_fn="mamba_ssm.ops.selective_scan_interface:selective_scan_fn",
        selective_state_update="mamba_ssm.ops.triton.selective_state_update:selective_state_update")


# --- seqzoo's fused CPU decode step (csrc/mamba_step.c, built by seqzoo.native) -----------------------
NATIVE = native.Library("mamba", [Path(__file__).parent / "csrc" / f for f in ("mamba_step.c", "mamba_scan.c")], {
    "sz_mamba_step": (native.I32, [native.I64] * 6 + [native.PTR, native.I64] + [native.PTR] * 12),
    "sz_mamba_scan_fwd": (native.I32, [native.I64] * 4 + [native.PTR] * 8),
    "sz_mamba_scan_bwd": (native.I32, [native.I64] * 4 + [native.PTR] * 14),
})


def mamba_step(xz: Tensor, conv_state: Tensor, h: Tensor, conv_w: Tensor, conv_b: Tensor | None,
               x_proj_w: Tensor, dt_w: Tensor, dt_b: Tensor, A_log: Tensor, D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mamba's decode step between ``in_proj`` and ``out_proj`` (as ``Mamba.step``'s torch path):
    xz (B, 2·d_inner) = in_proj(u), conv_state (B, d_inner, W ≥ max(K−1, 1)), h (B, d_inner, d_state), conv_w
    (d_inner, 1, K), x_proj_w (R + 2·d_state, d_inner), dt_w (d_inner, R), dt_b, D (d_inner,), A_log
    (d_inner, d_state) -> y = (C·h' + D·xc) ⊙ silu(z) (B, d_inner), the new conv_state and h'."""
    Bsz, two_d = xz.shape
    Dn, N = A_log.shape
    K, W, R = conv_w.shape[-1], conv_state.shape[-1], dt_w.shape[-1]
    tensors = (xz, conv_state, h, conv_w, conv_b, x_proj_w, dt_w, dt_b, A_log, D)
    want = ((Bsz, 2 * Dn), (Bsz, Dn, W), (Bsz, Dn, N), (Dn, 1, K), (Dn,), (R + 2 * N, Dn), (Dn, R), (Dn,), (Dn, N),
            (Dn,))
    got = tuple(None if t is None else t.shape for t in tensors)
    names = ("xz", "conv_state", "h", "conv_w", "conv_b", "x_proj_w", "dt_w", "dt_b", "A_log", "D")
    if got != tuple(None if t is None else w for t, w in zip(tensors, want)) or K < 1 or W < max(K - 1, 1) or (
            dt_b is None):
        raise ValueError("mamba_step: inconsistent shapes " + ", ".join(
            f"{n} {tuple(g)}" for n, g in zip(names, got) if g is not None)
            + f" (a conv of K >= 1 taps, a conv state of W >= {max(K - 1, 1)}, a dt bias)")
    native.require_float32_cpu("mamba_step", dict(zip(names, tensors)))
    # every pointer below is of a tensor bound to a name here, alive until the call returns
    return _mamba_step(xz, *(None if t is None else t.contiguous() for t in tensors[1:]))


def _mamba_step(xz: Tensor, conv_state: Tensor, h: Tensor, conv_w: Tensor, conv_b: Tensor | None, x_proj_w: Tensor,
                dt_w: Tensor, dt_b: Tensor, A_log: Tensor, D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel call of ``mamba_step`` on inputs its caller has checked as ``mamba_step`` does (shapes,
    float32 CPU, a dt bias; contiguous, but for xz, whose rows may be strided)."""
    if xz.stride(-1) != 1:
        xz = xz.contiguous()
    Bsz, two_d = xz.shape
    Dn, N = A_log.shape
    K, W, R = conv_w.shape[-1], conv_state.shape[-1], dt_w.shape[-1]
    y = xz.new_empty((Bsz, Dn))
    conv_out, h_out = torch.empty_like(conv_state), torch.empty_like(h)
    status = NATIVE.sz_mamba_step(
        Bsz, Dn, N, R, W, K, xz.data_ptr(), xz.stride(0) if Bsz > 1 else two_d, conv_state.data_ptr(),
        conv_out.data_ptr(), conv_w.data_ptr(), None if conv_b is None else conv_b.data_ptr(), x_proj_w.data_ptr(),
        dt_w.data_ptr(), dt_b.data_ptr(), A_log.data_ptr(), D.data_ptr(), h.data_ptr(), h_out.data_ptr(),
        y.data_ptr())
    if status:
        raise MemoryError("mamba_step: the kernel could not allocate its workspace")
    return y, conv_out, h_out


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
    chunk_size: int = field(default=8, metadata={
        "help": "tokens per chunk of the CPU scan (decays formed at once)"})
    scan_blocks: int | None = field(default=None, metadata={
        "help": "chunks per group of the CPU scan (default: SCAN_STEP_ELEMENTS // (batch·d_inner·d_state), "
                "at least 4)"})
    use_kernels: bool = field(default=True, metadata={
        "help": "fused kernels: mamba-ssm's on CUDA tensors when installed; on the CPU (float32) seqzoo's native "
                "decode step and training scan"})


class Mamba(SequenceLayer):
    """The Mamba (v1) mixer, with mamba-ssm's parameter names, shapes and initialisation.

    Which path runs when, and the test that ties it to the readable math (``selective_scan_ref``):

    ==================  ============================================  ========================================
    path                runs when                                     tied to the reference by
    ==================  ============================================  ========================================
    chunked scan        ``forward`` on the CPU, no autograd, or not   test_chunked_scan_equals_token_loop
                        float32, or ``use_kernels=False``
    native C scan       ``forward`` training, float32 CPU             test_native_scan_equals_autograd_through_the_torch_scan
    torch step          ``step``; the decoder where native is off     conformance: step = forward
    native C step       ``decoder(B).step``, no grad, float32 CPU     test_mamba_native_step_equals_torch_path
    mamba-ssm kernels   CUDA tensors, when mamba-ssm is installed     test_cuda_kernels_equal_torch_path
    ==================  ============================================  ========================================

    Hugging Face's ``MambaMixer`` ties the whole layer to the reference implementation
    (test_layer_matches_hf_golden, test_layer_matches_live_hf_mixer).
    """

    Config = MambaConfig
    #: parameters an optimiser should not decay (by name: a mark on the tensor is lost by deepcopy and
    #: ``load_state_dict(assign=True)``); mamba-ssm also marks them ``_no_weight_decay``
    no_weight_decay: tuple[str, ...] = ("A_log", "D")

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

    def flops(self, seq_len: int) -> float:
        """2T·Σ(projection weights) + 2T·E·K + 9T·E·N: the depthwise conv, and the scan per channel and
        state (exp(ΔA), the update exp(ΔA)h + Δx·B, the read-out C·h)."""
        E, N, K = self.d_inner, self.d_state, self.d_conv
        return super().flops(seq_len) + 2.0 * seq_len * E * K + 9.0 * seq_len * E * N

    # pieces shared by forward and step
    def _output(self, y: Tensor, z: Tensor, u: Tensor) -> Tensor:
        """out_proj(y ⊙ silu(z) [⊙ gelu_tanh(g_proj(u))]). Unless autograd tracks z, z (a slice of
        in_proj's fresh output) is overwritten: one activation less to allocate."""
        in_place = not (torch.is_grad_enabled() and z.requires_grad)  # autograd forbids it on chunk()'s views
        y = F.silu(z, inplace=in_place).mul_(y)
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
        ctype = torch.promote_types(dtype, torch.float32)  # scan in at least float32
        A = self._A(ctype)
        conv_state, h = state["conv_state"], state["ssm_state"].to(ctype)
        ys = []
        span = self._segment_tokens(x.shape[0])
        for lo in range(0, x.shape[1], span):
            y, conv_state, h = self._forward_segment(x[:, lo:lo + span], conv_state, h, A)
            ys.append(y)
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
        return y, {"conv_state": conv_state, "ssm_state": h.to(dtype)}

    def _segment_tokens(self, batch_size: int) -> int:
        """Tokens per segment of ``forward``: whole scan groups, about ``SEGMENT_ELEMENTS`` per
        (b, tokens, d_inner) activation, so that the segment's activations stay cache-resident."""
        cfg = self.config
        states = batch_size * self.d_inner * self.d_state
        blocks = cfg.scan_blocks or max(4, SCAN_STEP_ELEMENTS // max(1, states))
        group = cfg.chunk_size * blocks
        return group * max(1, SEGMENT_ELEMENTS // (batch_size * self.d_inner * group))

    def _forward_segment(self, u: Tensor, conv_state: Tensor, h: Tensor,
                         A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """forward over u (b, s, d_model) from conv_state and h (in the scan's dtype, that of A).

        Returns the output, the new conv_state and the new h."""
        xi, z = self.in_proj(u).chunk(2, dim=-1)  # (b, s, d_inner) each
        xc, conv_state = causal_conv(self.conv1d, xi, conv_state)  # conv_state keeps the last d_conv inputs
        xc = F.silu(xc, inplace=True)  # xc is the conv's fresh output
        dt, B, C = torch.split(self.x_proj(xc), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        ctype = A.dtype
        dt = F.softplus(F.linear(dt, self.dt_proj.weight, self.dt_proj.bias).to(ctype))  # Δ_t
        y, h = selective_scan_chunked(xc.to(ctype), dt, A, B.to(ctype), C.to(ctype), self.D.to(ctype), h,
                                      self.config.chunk_size, self.config.scan_blocks,
                                      kernels=self.config.use_kernels)
        return self._output(y.to(u.dtype), z, u), conv_state, h

    # update rule + output rule, one token
    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        state = self.check_input(x, state, step=True)
        dtype = x.dtype
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # (b, d_inner) each
        xc, conv_state = causal_conv_step(self.conv1d, xi, state["conv_state"])  # keeps the last d_conv inputs
        xc = F.silu(xc)
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self._use_kernels(x) and not torch.is_grad_enabled():  # the kernel has no backward
            y, h = self._step_kernels(xc, F.linear(dt, self.dt_proj.weight), B, C, z, state["ssm_state"])
            return self._output_gate_only(y, x), {"conv_state": conv_state, "ssm_state": h}
        ctype = torch.promote_types(dtype, torch.float32)
        if ctype != dtype:
            xc, B, C = xc.to(ctype), B.to(ctype), C.to(ctype)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight, self.dt_proj.bias).to(ctype))  # Δ_t (b, d_inner)
        # h_t = exp(Δ A) h_{t−1} + Δ B x: the outer product Δx ⊗ B is one bmm, the decay is added in place
        decay = torch.mul(dt.unsqueeze(-1), self._A(ctype)).exp_()
        h = torch.bmm((dt * xc).unsqueeze(-1), B.unsqueeze(1)).addcmul_(decay, state["ssm_state"].to(ctype))
        y = torch.baddbmm((self.D.to(ctype) * xc).unsqueeze(-1), h, C.unsqueeze(-1)).squeeze(-1)  # C·h + D x
        return self._output(y.to(dtype), z, x), {"conv_state": conv_state, "ssm_state": h.to(dtype)}

    # --- CPU: seqzoo's fused decode step (NATIVE) -------------------------------------------
    def decoder(self, batch_size: int) -> Decoder:
        """A decoder whose steps run everything between in_proj and out_proj in one native call (float32
        CPU, no autograd; ``native_step``), or plain ``step`` where the kernel does not apply: without
        ``use_kernels`` or a C compiler, or for a subclass that overrides a method of the torch step
        (checked once, here)."""
        if self.config.use_kernels and self._native_step_allowed() and NATIVE.available():
            return native.NativeDecoder(self, batch_size)
        return super().decoder(batch_size)

    @classmethod
    def _native_step_allowed(cls) -> bool:
        """A subclass that overrides a method of the torch step gets the torch step."""
        return native.keeps_methods(cls, Mamba, ("_A", "_output", "_output_gate_only", "check_input", "check_state"))

    def native_step(self, x: Tensor, state: State) -> tuple[Tensor, State] | None:
        """``step`` with everything between in_proj and out_proj in one native call (seqzoo.native),
        equal to the torch path to float32 rounding; None where the kernel does not apply, and then the
        torch path validates (naming what is wrong) and runs. What the kernel reads is checked here, once,
        without raising: x and the state (``native.step_fits``: what ``check_input`` accepts), the
        parameters' shapes, plain float32 CPU tensors and bare modules; all before in_proj, while the
        caches still hold what the checks read. (The registries are read directly: nn.Module's attribute
        fallback costs microseconds per name, per token.)"""
        modules, own = self._modules, self._parameters
        x_proj, dt_proj, conv, in_proj, out_proj = (
            modules["x_proj"], modules["dt_proj"], modules["conv1d"], modules["in_proj"], modules["out_proj"])
        if not (NATIVE.available() and native.step_fits(self, x, state) and native.plain(x_proj, dt_proj)):
            return None
        xp, dp = x_proj._parameters, dt_proj._parameters  # (plain: weight and bias registered)
        params = (conv.weight, conv.bias, xp["weight"], dp["weight"], dp["bias"], own.get("A_log"), own.get("D"))
        Dn, N, K, R = self.d_inner, self.d_state, self.d_conv, self.dt_rank
        shapes = ((Dn, 1, K), (Dn,) if params[1] is not None else None, (R + 2 * N, Dn), (Dn, R), (Dn,), (Dn, N), (Dn,))
        if not native.plain_float32(*params) or tuple(None if t is None else t.shape for t in params) != shapes:
            return None  # (a missing dt bias, A_log or D fails the shapes)
        conv_w, conv_b, x_proj_w, dt_w, dt_b, A_log, D = (None if t is None else t.contiguous() for t in params)
        conv_state, h = state["conv_state"].contiguous(), state["ssm_state"].contiguous()
        # bare nn.Linear modules: what their forward computes, without the module calls
        plain = native.plain(in_proj, out_proj) and modules.get("g_proj") is None
        if plain:
            xz = F.linear(x, in_proj._parameters["weight"], in_proj._parameters["bias"])
        else:
            xz = in_proj(x)  # called once, hooks and all
        if xz.shape != (x.shape[0], 2 * Dn):
            raise ValueError(f"Mamba: expected in_proj to give (B, 2·d_inner) = {(x.shape[0], 2 * Dn)}, got "
                             f"{tuple(xz.shape)}")
        y, conv_state, h = _mamba_step(xz, conv_state, h, conv_w, conv_b, x_proj_w, dt_w, dt_b, A_log, D)
        out = F.linear(y, out_proj._parameters["weight"], out_proj._parameters["bias"]) if plain else (
            self._output_gate_only(y, x))
        return out, {"conv_state": conv_state, "ssm_state": h}

    def _A(self, ctype: torch.dtype) -> Tensor:
        """A = −exp(A_log) in ``ctype`` (derived afresh per call: a cached value could not see a change
        of A_log made through ``.data``)."""
        return -torch.exp(self.A_log.to(ctype))

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
