"""Public entry points of the TTT kernels: validation, launch, selection and the exact backward.

The Triton kernels run when the tensors are on CUDA, or on the CPU when the Triton interpreter is on
(``TRITON_INTERPRET=1``). Triton reads that variable when ``@triton.jit`` decorates a function, so the
kernel module is loaded lazily at the first call, once per mode. ``triton.language``'s own helpers are
decorated when it is first imported (torch may import it early, e.g. through ``torch.func``): set the
variable before the process imports torch to run interpreted kernels.

Gradients: ``ttt_linear_forward`` / ``ttt_mlp_forward`` are a ``torch.autograd.Function`` whose forward
is the kernel (saving the inner weights every ``checkpoint_group`` mini-batches) and whose backward
recomputes each group through the torch reference (``reference.py``) under autograd, last group first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from seqzoo_plugins.ttt import reference as ref
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "kernels_available",
    "interpret_enabled",
    "ttt_linear_forward",
    "ttt_mlp_forward",
    "ttt_linear_decode",
    "ttt_mlp_decode",
]

logger = logging.getLogger(__name__)

_LOADED: dict[bool, ModuleType] = {}


# ----------------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------------
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpret_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    if not _triton_importable():
        return False
    try:
        from triton import knobs
    except ImportError:  # triton < 3.3 reads the variable directly
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def kernels_available(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on ``device``: CUDA with triton, or any device in interpreter mode."""
    if not _triton_importable():
        return False
    device = torch.device(device)
    if interpret_enabled():
        return device.type in ("cpu", "cuda")
    return device.type == "cuda" and torch.cuda.is_available()


def _require_kernels(device: torch.device) -> None:
    if kernels_available(device):
        return
    if not _triton_importable():
        raise RuntimeError("the TTT Triton kernels need the 'triton' package (pip install triton)")
    if device.type == "cpu":
        raise RuntimeError(
            "the TTT Triton kernels run on CPU tensors only under the Triton interpreter: set the "
            "environment variable TRITON_INTERPRET=1 before the first kernel call (or use CUDA tensors)"
        )
    raise RuntimeError(
        f"the TTT Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got device {device}"
    )


def load_kernels() -> ModuleType:
    """The kernel module, decorated under the current interpreter mode (loaded once per mode)."""
    interpret = interpret_enabled()
    module = _LOADED.get(interpret)
    if module is None:
        name = f"{__package__}._triton_ttt_{'interpreted' if interpret else 'compiled'}"
        path = os.path.join(os.path.dirname(__file__), "_triton_ttt.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _LOADED[interpret] = module
        logger.debug("loaded TTT kernels (%s)", "interpreted" if interpret else "compiled")
    return module


# ----------------------------------------------------------------------------------------------------
# validation and launch helpers
# ----------------------------------------------------------------------------------------------------
def _check_shape(name: str, t: Tensor, want: Sequence[int], what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"expected {name} to be a Tensor {what}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"expected {name} of shape {what} = {tuple(want)}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"expected {name} to be a floating-point tensor, got {t.dtype}")


def _check_head_dim(d: int) -> None:
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"expected head_dim a power of two in [16, 256] (tl.dot tiles), got {d}")


def _check_mini_batch(mini_batch_size: int) -> None:
    if not isinstance(mini_batch_size, int) or not 1 <= mini_batch_size <= 128:
        raise ValueError(f"expected mini_batch_size an int in [1, 128], got {mini_batch_size!r}")


def _check_devices(tensors: Sequence[Tensor]) -> torch.device:
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"expected all tensors on {device}, got one on {t.device}")
    return device


def _dtypes(x: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(accumulation dtype, matmul input dtype) for inputs of dtype x.dtype.

    bf16/fp16 inputs feed the tensor cores in their own dtype, except under the interpreter, whose
    ``tl.dot`` mishandles 16-bit floats (triton 3.x): there the matmuls take fp32 inputs.
    """
    if x.dtype == torch.float64:
        return torch.float64, torch.float64
    if x.dtype in (torch.bfloat16, torch.float16) and not interpret_enabled():
        return torch.float32, x.dtype
    return torch.float32, torch.float32


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {
        torch.float64: tl.float64,
        torch.float32: tl.float32,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }[dtype]


def _num_warps(weights: Sequence[Tensor]) -> int:
    """Warps per program, from the weight elements one program keeps on chip (measured with ptxas, sm_90):
    d = 64 linear fits 4 warps without spilling, d = 128 linear 8, TTT-MLP d = 64 16 (little spill); TTT-MLP
    d = 128 does not compile at 16 warps (the 16×512 accumulators need > 128 registers) and spills at 8."""
    elems = sum(w.shape[-1] * w.shape[-2] for w in weights)
    if elems <= 64 * 64 + 64:
        return 4
    if elems <= 128 * 128 + 128:
        return 8
    if elems <= 2 * 64 * 256 + 256 + 64:
        return 16
    return 8


def _mlp_decode_block(d: int, hidden: int) -> tuple[int, int]:
    """(hidden units per step, warps) of the TTT-MLP decode kernel: (d × HB) tiles of at most 4096 elements."""
    hb = max(16, min(hidden, 4096 // d))
    return hb, 4 if d * hb <= 2048 else 8


def _on_device(device: torch.device):
    """Context selecting the CUDA device of the tensors (nothing elsewhere)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _n_checkpoints(T: int, mini_batch_size: int, group: int) -> int:
    return max(1, math.ceil(T / (mini_batch_size * group)))


def _launch_prefill(
    kind: str,
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    lr_eta: Tensor,
    token_eta: Tensor,
    weights: Sequence[Tensor],
    ln_w: Tensor,
    ln_b: Tensor,
    mini_batch_size: int,
    checkpoint_group: int,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Run the prefill kernel. Returns Z, the final weights and (if checkpoint_group > 0) the weights at
    every group start, each (B, H, n_groups, ...), slot 0 the initial weights."""
    kernels = load_kernels()
    B, H, T, d = XQ.shape
    acc, dot = _dtypes(XQ)
    XQ, XK, XV, lr_eta, token_eta, ln_w, ln_b = (
        t.contiguous() for t in (XQ, XK, XV, lr_eta, token_eta, ln_w, ln_b)
    )
    weights = [w.contiguous() for w in weights]
    Z = torch.empty_like(XQ)
    outs = [torch.empty_like(w) for w in weights]
    if checkpoint_group > 0:
        n_ckpt = _n_checkpoints(T, mini_batch_size, checkpoint_group)
        ckpts = [w.new_empty(B, H, n_ckpt, *w.shape[2:]) for w in weights]
        for c, w in zip(ckpts, weights):
            c[:, :, 0] = w
        ckpt_args = ckpts
    else:
        n_ckpt, ckpts, ckpt_args = 0, [], outs  # unused pointers
    consts = dict(
        D=d,
        MB=mini_batch_size,
        BT=max(16, _next_power_of_2(mini_batch_size)),
        CKPT_EVERY=checkpoint_group,
        ACC=_tl_dtype(acc),
        DOT=_tl_dtype(dot),
        PREC="ieee",
        EPS=ref.LN_EPS,
        num_warps=_num_warps(weights),
    )
    args = [XQ, XK, XV, lr_eta, token_eta, *weights, ln_w, ln_b, Z, *outs, *ckpt_args, T, H, n_ckpt]
    with _on_device(XQ.device):
        if kind == "linear":
            kernels.ttt_linear_fwd_kernel[(B * H,)](*args, **consts)
        else:
            kernels.ttt_mlp_fwd_kernel[(B * H,)](*args, HID=weights[0].shape[-1], **consts)
    return Z, outs, ckpts


# ----------------------------------------------------------------------------------------------------
# the exact backward: recompute group by group through the torch reference
# ----------------------------------------------------------------------------------------------------
def _recompute_backward(
    reference_fn: Callable[..., tuple[Tensor, ...]],
    seq: Sequence[Tensor],
    shared: tuple[Tensor, Tensor, Tensor],
    ckpts: Sequence[Tensor],
    dZ: Tensor,
    d_weights_out: Sequence[Tensor],
    mini_batch_size: int,
    checkpoint_group: int,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Backward of a prefill through ``reference_fn``, one checkpointed group at a time, last first.

    seq = (XQ, XK, XV, lr_eta), shared = (token_eta, ln_w, ln_b); ckpts[i] (B, H, n_groups, ...) the
    weights at each group start. Returns the gradients of seq, of the initial weights and of shared.
    """
    acc, _ = _dtypes(seq[0])
    T = seq[0].shape[2]
    seg = mini_batch_size * checkpoint_group
    d_seq = [torch.zeros_like(t) for t in seq]
    d_shared = [torch.zeros_like(t, dtype=acc) for t in shared]
    carry = [g.to(acc) for g in d_weights_out]  # ∂L/∂(weights at the end of the current group)
    shared_leaf = [t.detach().to(acc).requires_grad_() for t in shared]
    for k in reversed(range(math.ceil(T / seg))):
        s, e = k * seg, min((k + 1) * seg, T)
        with torch.enable_grad():
            seq_leaf = [t[:, :, s:e].detach().to(acc).requires_grad_() for t in seq]
            w_leaf = [c[:, :, k].detach().to(acc).requires_grad_() for c in ckpts]
            XQ, XK, XV, lr = seq_leaf
            token_eta, ln_w, ln_b = shared_leaf
            Z, *w_end = reference_fn(XQ, XK, XV, lr, token_eta, *w_leaf, ln_w, ln_b, mini_batch_size)
            grads = torch.autograd.grad(
                [Z, *w_end],
                [*seq_leaf, *w_leaf, *shared_leaf],
                [dZ[:, :, s:e].to(acc), *carry],
                allow_unused=True,
            )
        grads = [
            torch.zeros_like(x) if g is None else g for g, x in zip(grads, [*seq_leaf, *w_leaf, *shared_leaf])
        ]
        n_seq, n_w = len(seq_leaf), len(w_leaf)
        for d, g in zip(d_seq, grads[:n_seq]):
            d[:, :, s:e] = g
        carry = list(grads[n_seq : n_seq + n_w])
        for d, g in zip(d_shared, grads[n_seq + n_w :]):
            d += g
    return d_seq, carry, d_shared


class _TTTPrefill(torch.autograd.Function):
    """Kernel forward, reference-recompute backward. Inputs: kind, mini_batch_size, checkpoint_group,
    XQ, XK, XV, lr_eta, token_eta, ln_w, ln_b, *weights; outputs: Z, *weights_out."""

    @staticmethod
    def forward(
        ctx, kind, mini_batch_size, checkpoint_group, XQ, XK, XV, lr_eta, token_eta, ln_w, ln_b, *weights
    ):
        Z, outs, ckpts = _launch_prefill(
            kind, XQ, XK, XV, lr_eta, token_eta, weights, ln_w, ln_b, mini_batch_size, checkpoint_group
        )
        ctx.save_for_backward(XQ, XK, XV, lr_eta, token_eta, ln_w, ln_b, *ckpts)
        ctx.kind, ctx.mini_batch_size, ctx.checkpoint_group = kind, mini_batch_size, checkpoint_group
        ctx.weight_dtypes = [w.dtype for w in weights]
        return (Z, *outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, dZ, *d_weights_out):
        XQ, XK, XV, lr_eta, token_eta, ln_w, ln_b, *ckpts = ctx.saved_tensors
        reference_fn = ref.ttt_linear_reference if ctx.kind == "linear" else ref.ttt_mlp_reference
        d_seq, d_w, d_shared = _recompute_backward(
            reference_fn,
            (XQ, XK, XV, lr_eta),
            (token_eta, ln_w, ln_b),
            ckpts,
            dZ,
            d_weights_out,
            ctx.mini_batch_size,
            ctx.checkpoint_group,
        )
        d_token_eta, d_ln_w, d_ln_b = (g.to(t.dtype) for g, t in zip(d_shared, (token_eta, ln_w, ln_b)))
        d_w = [g.to(dt) for g, dt in zip(d_w, ctx.weight_dtypes)]
        return (None, None, None, *d_seq, d_token_eta, d_ln_w, d_ln_b, *d_w)


def _prefill(kind, XQ, XK, XV, lr_eta, token_eta, weights, ln_w, ln_b, mini_batch_size, checkpoint_group):
    tensors = (XQ, XK, XV, lr_eta, token_eta, *weights, ln_w, ln_b)
    _require_kernels(_check_devices(tensors))
    n_mini_batches = max(1, math.ceil(XQ.shape[2] / mini_batch_size))
    if checkpoint_group is None:  # √n groups of √n: saved weights and live recompute both O(√n) copies
        checkpoint_group = math.ceil(math.sqrt(n_mini_batches))
    if not isinstance(checkpoint_group, int) or checkpoint_group < 0:
        raise ValueError(
            f"expected checkpoint_group None or an int >= 0 (0: the whole sequence), got {checkpoint_group!r}"
        )
    if checkpoint_group == 0:  # one group: the backward recomputes the whole sequence at once
        checkpoint_group = n_mini_batches
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _TTTPrefill.apply(
            kind, mini_batch_size, checkpoint_group, XQ, XK, XV, lr_eta, token_eta, ln_w, ln_b, *weights
        )
    Z, outs, _ = _launch_prefill(kind, XQ, XK, XV, lr_eta, token_eta, weights, ln_w, ln_b, mini_batch_size, 0)
    return (Z, *outs)


def _leading_shape(name: str, t: Tensor, n_dims: int, what: str) -> tuple[int, ...]:
    """The shape of t, which must be a tensor with n_dims dims (its sizes are then checked against the rest)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"expected {name} to be a Tensor {what}, got {type(t).__name__}")
    if t.dim() != n_dims:
        raise ValueError(f"expected {name} of shape {what}, got {tuple(t.shape)}")
    return tuple(t.shape)


def _check_prefill(XQ, XK, XV, lr_eta, token_eta, ln_w, ln_b, mini_batch_size) -> tuple[int, int, int, int]:
    B, H, T, d = _leading_shape("XQ", XQ, 4, "(B, H, T, head_dim)")
    _check_shape("XQ", XQ, (B, H, T, d), "(B, H, T, head_dim)")
    _check_head_dim(d)
    _check_mini_batch(mini_batch_size)
    _check_shape("XK", XK, (B, H, T, d), "(B, H, T, head_dim)")
    _check_shape("XV", XV, (B, H, T, d), "(B, H, T, head_dim)")
    _check_shape("lr_eta", lr_eta, (B, H, T), "(B, H, T)")
    _check_shape("token_eta", token_eta, (mini_batch_size,), "(mini_batch_size,)")
    _check_shape("ln_w", ln_w, (H, d), "(H, head_dim)")
    _check_shape("ln_b", ln_b, (H, d), "(H, head_dim)")
    return B, H, T, d


def ttt_linear_forward(
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    lr_eta: Tensor,
    token_eta: Tensor,
    W1: Tensor,
    b1: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
    mini_batch_size: int,
    *,
    checkpoint_group: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """TTT-Linear prefill (dual form) in one Triton kernel; same contract as ``ttt_linear_reference``.

    Returns Z (B, H, T, d) and (W1, b1) after the last full mini-batch. Differentiable: the backward
    recomputes groups of ``checkpoint_group`` mini-batches through the torch reference (None: √(number of
    mini-batches), 0: one group).
    """
    B, H, T, d = _check_prefill(XQ, XK, XV, lr_eta, token_eta, ln_w, ln_b, mini_batch_size)
    _check_shape("W1", W1, (B, H, d, d), "(B, H, head_dim, head_dim)")
    _check_shape("b1", b1, (B, H, 1, d), "(B, H, 1, head_dim)")
    return _prefill(
        "linear", XQ, XK, XV, lr_eta, token_eta, (W1, b1), ln_w, ln_b, mini_batch_size, checkpoint_group
    )


def ttt_mlp_forward(
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    lr_eta: Tensor,
    token_eta: Tensor,
    W1: Tensor,
    b1: Tensor,
    W2: Tensor,
    b2: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
    mini_batch_size: int,
    *,
    checkpoint_group: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """TTT-MLP prefill (dual form) in one Triton kernel; same contract as ``ttt_mlp_reference``.

    Returns Z and (W1, b1, W2, b2) after the last full mini-batch; differentiable like ``ttt_linear_forward``.
    """
    B, H, T, d = _check_prefill(XQ, XK, XV, lr_eta, token_eta, ln_w, ln_b, mini_batch_size)
    hid = _leading_shape("W1", W1, 4, "(B, H, head_dim, hidden)")[-1]
    _check_shape("W1", W1, (B, H, d, hid), "(B, H, head_dim, hidden)")
    if hid & (hid - 1):
        raise ValueError(f"expected the TTT-MLP hidden width (W1.shape[-1]) a power of two, got {hid}")
    _check_shape("b1", b1, (B, H, 1, hid), "(B, H, 1, hidden)")
    _check_shape("W2", W2, (B, H, hid, d), "(B, H, hidden, head_dim)")
    _check_shape("b2", b2, (B, H, 1, d), "(B, H, 1, head_dim)")
    return _prefill(
        "mlp", XQ, XK, XV, lr_eta, token_eta, (W1, b1, W2, b2), ln_w, ln_b, mini_batch_size, checkpoint_group
    )


# ----------------------------------------------------------------------------------------------------
# decode (one token, primal form)
# ----------------------------------------------------------------------------------------------------
def _launch_decode(kind: str, xq, xk, xv, lr_eta, token_eta, tensors, ln_w, ln_b) -> tuple[Tensor, ...]:
    """tensors: linear (W1, b1, G_W1, G_b1), mlp (W1, b1, W2, b2, G_W1, G_b1, G_W2, G_b2).
    Returns z, the new accumulated gradients, then the weights W̄."""
    kernels = load_kernels()
    B, H, d = xq.shape
    acc, _ = _dtypes(xq)
    xq, xk, xv, lr_eta, token_eta, ln_w, ln_b = (
        t.contiguous() for t in (xq, xk, xv, lr_eta, token_eta, ln_w, ln_b)
    )
    tensors = [t.contiguous() for t in tensors]
    n = len(tensors) // 2
    weights, grads = tensors[:n], tensors[n:]
    z = torch.empty_like(xq)
    grads_out = [torch.empty_like(g) for g in grads]
    weights_bar = [torch.empty_like(w) for w in weights]
    consts = dict(D=d, ACC=_tl_dtype(acc), EPS=ref.LN_EPS)
    args = [xq, xk, xv, lr_eta, token_eta, *tensors, ln_w, ln_b, z, *grads_out, *weights_bar, H]
    with _on_device(xq.device):
        if kind == "linear":
            kernels.ttt_linear_decode_kernel[(B * H,)](*args, num_warps=_num_warps(weights), **consts)
        else:
            hid = weights[0].shape[-1]
            hb, num_warps = _mlp_decode_block(d, hid)
            kernels.ttt_mlp_decode_kernel[(B * H,)](*args, HID=hid, HB=hb, num_warps=num_warps, **consts)
    return (z, *grads_out, *weights_bar)


def _check_decode_inputs(xq, xk, xv, lr_eta, ln_w, ln_b) -> tuple[int, int, int]:
    B, H, d = _leading_shape("xq", xq, 3, "(B, H, head_dim)")
    _check_shape("xq", xq, (B, H, d), "(B, H, head_dim)")
    _check_head_dim(d)
    _check_shape("xk", xk, (B, H, d), "(B, H, head_dim)")
    _check_shape("xv", xv, (B, H, d), "(B, H, head_dim)")
    _check_shape("lr_eta", lr_eta, (B, H), "(B, H)")
    _check_shape("ln_w", ln_w, (H, d), "(H, head_dim)")
    _check_shape("ln_b", ln_b, (H, d), "(H, head_dim)")
    return B, H, d


class _TTTDecode(torch.autograd.Function):
    """Kernel forward, backward through the primal reference of the same token."""

    @staticmethod
    def forward(ctx, kind, xq, xk, xv, lr_eta, token_eta, ln_w, ln_b, *tensors):
        ctx.kind = kind
        ctx.save_for_backward(xq, xk, xv, lr_eta, token_eta, ln_w, ln_b, *tensors)
        return _launch_decode(kind, xq, xk, xv, lr_eta, token_eta, tensors, ln_w, ln_b)

    @staticmethod
    @once_differentiable
    def backward(ctx, *d_outs):
        saved = ctx.saved_tensors
        acc, _ = _dtypes(saved[0])
        with torch.enable_grad():
            leaves = [t.detach().to(acc).requires_grad_() for t in saved]
            xq, xk, xv, lr, tok, ln_w, ln_b, *tensors = leaves
            n = len(tensors) // 2
            if ctx.kind == "linear":
                outs = ref.ttt_linear_decode_reference(xq, xk, xv, lr, tok, *tensors, ln_w, ln_b)
            else:
                outs = ref.ttt_mlp_decode_reference(
                    xq, xk, xv, lr, tok, *tensors[:n], *tensors[n:], ln_w, ln_b
                )
            # reference order: z, grads, weights — the kernel's order too
            grads = torch.autograd.grad(outs, leaves, [g.to(acc) for g in d_outs], allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in zip(grads, saved)]
        return (None, *grads)


def _decode(kind, xq, xk, xv, lr_eta, token_eta_i, weights, grads, ln_w, ln_b):
    B, H, d = xq.shape
    token_eta = torch.as_tensor(token_eta_i, device=xq.device)
    if token_eta.dim() == 0:
        token_eta = token_eta.expand(B)
    if token_eta.shape != (B,):
        raise ValueError(
            f"expected token_eta_i a scalar or of shape (B,) = ({B},), got {tuple(token_eta.shape)}"
        )
    if not token_eta.is_floating_point():
        token_eta = token_eta.to(xq.dtype)
    tensors = (*weights, *grads)
    _require_kernels(_check_devices((xq, xk, xv, lr_eta, token_eta, *tensors, ln_w, ln_b)))
    if torch.is_grad_enabled() and any(
        t.requires_grad for t in (xq, xk, xv, lr_eta, token_eta, *tensors, ln_w, ln_b)
    ):
        return _TTTDecode.apply(kind, xq, xk, xv, lr_eta, token_eta, ln_w, ln_b, *tensors)
    return _launch_decode(kind, xq, xk, xv, lr_eta, token_eta, tensors, ln_w, ln_b)


def ttt_linear_decode(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    lr_eta: Tensor,
    token_eta_i: Tensor | float,
    W1: Tensor,
    b1: Tensor,
    G_W1: Tensor,
    G_b1: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One TTT-Linear token (primal form) in one Triton kernel; contract of ``ttt_linear_decode_reference``.

    Returns z (B, H, d), G_W1', G_b1', W̄1, b̄1 (commit W̄ at the mini-batch's end).
    """
    B, H, d = _check_decode_inputs(xq, xk, xv, lr_eta, ln_w, ln_b)
    _check_shape("W1", W1, (B, H, d, d), "(B, H, head_dim, head_dim)")
    _check_shape("b1", b1, (B, H, 1, d), "(B, H, 1, head_dim)")
    _check_shape("G_W1", G_W1, (B, H, d, d), "(B, H, head_dim, head_dim)")
    _check_shape("G_b1", G_b1, (B, H, 1, d), "(B, H, 1, head_dim)")
    return _decode("linear", xq, xk, xv, lr_eta, token_eta_i, (W1, b1), (G_W1, G_b1), ln_w, ln_b)


def ttt_mlp_decode(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    lr_eta: Tensor,
    token_eta_i: Tensor | float,
    W1: Tensor,
    b1: Tensor,
    W2: Tensor,
    b2: Tensor,
    G_W1: Tensor,
    G_b1: Tensor,
    G_W2: Tensor,
    G_b2: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
) -> tuple[Tensor, ...]:
    """One TTT-MLP token (primal form) in one Triton kernel; contract of ``ttt_mlp_decode_reference``.

    Returns z, G_W1', G_b1', G_W2', G_b2', W̄1, b̄1, W̄2, b̄2.
    """
    B, H, d = _check_decode_inputs(xq, xk, xv, lr_eta, ln_w, ln_b)
    hid = _leading_shape("W1", W1, 4, "(B, H, head_dim, hidden)")[-1]
    if hid & (hid - 1):
        raise ValueError(f"expected the TTT-MLP hidden width (W1.shape[-1]) a power of two, got {hid}")
    for name, t, shape, what in (
        ("W1", W1, (B, H, d, hid), "(B, H, head_dim, hidden)"),
        ("b1", b1, (B, H, 1, hid), "(B, H, 1, hidden)"),
        ("W2", W2, (B, H, hid, d), "(B, H, hidden, head_dim)"),
        ("b2", b2, (B, H, 1, d), "(B, H, 1, head_dim)"),
        ("G_W1", G_W1, (B, H, d, hid), "(B, H, head_dim, hidden)"),
        ("G_b1", G_b1, (B, H, 1, hid), "(B, H, 1, hidden)"),
        ("G_W2", G_W2, (B, H, hid, d), "(B, H, hidden, head_dim)"),
        ("G_b2", G_b2, (B, H, 1, d), "(B, H, 1, head_dim)"),
    ):
        _check_shape(name, t, shape, what)
    return _decode(
        "mlp", xq, xk, xv, lr_eta, token_eta_i, (W1, b1, W2, b2), (G_W1, G_b1, G_W2, G_b2), ln_w, ln_b
    )
