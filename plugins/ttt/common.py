"""Pieces shared by the hand-derived TTT layers' fast paths (the readable definitions are in ``reference``):
the fused and in-place forms of the inner LayerNorm backward and gelu, and the layers' common base."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqzoo import State, native
from seqzoo.contract import Decoder
from seqzoo.ttt_layers import TTTLayer

from . import native_kernels, scan_grad
from .reference import _SQRT_2_OVER_PI, LN_EPS

log = logging.getLogger(__name__)



def ln_l2_bwd_centered(x: Tensor, c: Tensor, gamma2: Tensor, eps: float = LN_EPS) -> Tensor:
    """``ln_l2_bwd`` in three kernels for the hot loop, with the parts that do not depend on x given:
    c = weight·(bias − target) and gamma2 = weight². Then ∂ℓ/∂x̂ = gamma2·x̂ + c, and the LayerNorm
    backward (the same formula as ``ln_l2_bwd``) maps it to ∂ℓ/∂x; differentiable to first order."""
    x_hat, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, eps)
    grad_x_hat = torch.addcmul(c, gamma2, x_hat)
    return torch.ops.aten.native_layer_norm_backward(
        grad_x_hat, x, x.shape[-1:], mean, rstd, None, None, [True, False, False]
    )[0]


def gelu_tanh_into(x: Tensor, out: Tensor, t: Tensor, x_sq: Tensor) -> Tensor:
    """gelu_tanh(x) = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³), written into ``out``; keeps
    t = tanh u and x_sq = x² (for ``gelu_tanh_grad_into``). Workspaces of x's shape, no autograd: the
    fused ``F.gelu(approximate="tanh")`` CPU kernel measured 1.7x slower than these seven passes."""
    torch.mul(x, x, out=x_sq)
    torch.mul(x_sq, _SQRT_2_OVER_PI * 0.044715, out=t).add_(_SQRT_2_OVER_PI).mul_(x).tanh_()
    torch.mul(x, 0.5, out=out)
    return out.addcmul_(out, t)


def gelu_tanh_grad_into(grad: Tensor, x: Tensor, t: Tensor, x_sq: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    """grad ⊙ gelu_tanh'(x) into ``out``, from t and x_sq of ``gelu_tanh_into`` (x_sq is overwritten):
    gelu_tanh'(x) = ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²). ``out`` may be ``grad``."""
    torch.mul(x_sq, 3 * _SQRT_2_OVER_PI * 0.044715, out=scratch).add_(_SQRT_2_OVER_PI).mul_(x)
    t_sq = torch.mul(t, t, out=x_sq)
    scratch.addcmul_(scratch, t_sq, value=-1.0)  # x(1 − t²)·√(2/π)(1 + 3kx²)
    scratch.add_(t).add_(1.0)
    return torch.mul(grad, scratch, out=out).mul_(0.5)


def kernel(name: str, device: torch.device, *, required: bool):
    """The Triton kernel ``name`` of seqzoo_plugins.kernels when it can run on ``device``; else None
    (``required``: raise a RuntimeError saying why instead)."""
    try:
        from seqzoo_plugins import kernels
    except ImportError as exc:  # pragma: no cover - the package ships with seqzoo
        if required:
            raise RuntimeError(f"backend='triton' needs seqzoo_plugins.kernels, which failed to import: {exc}") from exc
        return None
    fn = getattr(kernels, name, None)
    available = getattr(kernels, "kernels_available", lambda device: False)
    if fn is None or not available(device):
        if required:
            raise RuntimeError(
                f"backend='triton': the Triton kernel {name} cannot run on device {device} (it needs CUDA "
                "tensors and the triton package, or TRITON_INTERPRET=1 on the CPU); use backend='torch'"
            )
        log.debug("Triton kernel %s unavailable on %s; using the torch dual form", name, device)
        return None
    return fn


# the InnerNormTTT classes whose step may run natively (see InnerNormTTT._native_step_allowed)
_NATIVE_STEP_CLASSES: dict[type, bool] = {}
# the parameters the native step reads besides the projections: (lr_w, lr_b, token_idx, ln_w, ln_b)
_NATIVE_STEP_PARAMETERS = ("learnable_ttt_lr_weight", "learnable_ttt_lr_bias", "learnable_token_idx", "ttt_norm_weight",
                           "ttt_norm_bias")
_CPU = torch.device("cpu")


class InnerNormTTT(TTTLayer):
    """Base of the hand-derived TTT layers (TTT-Linear, TTT-MLP), whose inner model ends in a per-head
    LayerNorm (``inner_norm``) with parameters ``ttt_norm_weight``/``ttt_norm_bias``. Their ``backend``
    may also be ``"triton"``: the Triton kernels of ``seqzoo_plugins.kernels``.

    On CPU float32 without autograd (``backend="auto"``), ``step`` runs everything between the
    projections and ``o_proj`` in one native call (seqzoo.native): the η gate, RoPE, the inner gradient,
    G, the output, W̄ at a mini-batch's end and ``post_norm`` while it is a bare LayerNorm. A layer
    provides it as ``_native_token``; equal to the torch path to float32 rounding.
    """

    backends = ("auto", "torch", "triton")
    online_options = False  # the hand-derived paths implement the TTT paper's rule only

    # the methods of the step's torch path that the native step stands in for: a subclass that overrides
    # one of them gets the torch path
    _NATIVE_STEP_REPLACES = ("_qkv_step", "_rope_step", "_gate_eta_step", "_token_eta_at", "_token_step", "_output",
                             "_gate", "_checked", "check_input", "check_state")

    def _native_token(self, q, k, v, x, gate, rope, token_idx, p, state, ln_w, ln_b, commit, post):
        """One native call on inputs ``native_step`` has checked (contiguous, but for the state's tensors;
        q, k, v rows (B, H·d); ``post`` = (weight, bias, eps) of the fused post_norm or (None, None, 0.0)):
        (Z (B, H·d), W̄ by name when ``commit`` else None, G' by name)."""
        raise NotImplementedError

    def decoder(self, batch_size: int) -> Decoder:
        """A decoder whose steps run everything between the projections and ``o_proj`` in one native call
        (float32 CPU, no autograd; ``native_step``), or plain ``step`` where the kernel does not apply:
        ``backend`` other than "auto", no inner norm, heads wider than the kernel's arrays, no C compiler,
        or a subclass that overrides a method the kernel stands in for (checked once, here)."""
        if (self.config.backend == "auto" and self.config.inner_norm and self.head_dim <= native_kernels.MAX_DIM
                and self._native_step_allowed() and native_kernels.LIB.available()):
            return native.NativeDecoder(self, batch_size)
        return super().decoder(batch_size)

    @classmethod
    def _native_step_allowed(cls) -> bool:
        """Whether ``cls`` has a native step and overrides none of the methods it stands in for (compared
        with the class that defines ``_native_token``); once per class."""
        allowed = _NATIVE_STEP_CLASSES.get(cls)
        if allowed is None:
            owner = next(c for c in cls.__mro__ if "_native_token" in c.__dict__)
            allowed = _NATIVE_STEP_CLASSES[cls] = owner is not InnerNormTTT and native.keeps_methods(
                cls, owner, cls._NATIVE_STEP_REPLACES)
        return allowed

    def _native_prefill(self, *tensors: Tensor) -> bool:
        """Whether ``_full`` may run the native dual form on these tensors (``backend="auto"``, the inner
        norm, plain float32 CPU tensors without autograd)."""
        return self.config.backend == "auto" and self.config.inner_norm and native_kernels.LIB.usable(*tensors)

    def _native_training(self, *tensors: Tensor) -> bool:
        """Whether ``_full`` may train through the native kernels and their written backward
        (``scan_grad``) on these tensors: ``backend="auto"``, the inner norm, autograd recording on plain
        float32 CPU tensors (``scan_grad.applies``)."""
        return self.config.backend == "auto" and self.config.inner_norm and scan_grad.applies(*tensors)

    def native_step(self, x: Tensor, state: State) -> tuple[Tensor, State] | None:
        """``step`` through ``_native_token``; None where the native path does not apply, and then the
        torch path validates (naming what is wrong) and runs. Everything the kernel reads is checked
        here, once, without raising: x and the state (``native.step_fits``: what ``check_input``
        accepts), the state's position, the parameters' shapes, plain float32 CPU tensors and bare
        modules. Written for the hot path: the registries are read directly (nn.Module's attribute
        fallback costs microseconds per name, per token), no views or generators (after the projections
        every Python object is a cache miss)."""
        if not (native_kernels.LIB.available() and native.step_fits(self, x, state)):
            return None
        B, C = x.shape
        H, d, b = self.num_heads, self.head_dim, self.mini_batch_size
        pos, sizes = state["pos"].tolist(), state["mini_batch_size"].tolist()
        p = pos[0] if pos else 0
        if pos.count(p) != B or sizes.count(b) != B or not 0 <= p < b:
            return None
        modules, own = self._modules, self._parameters
        lr_w, lr_b, token_idx, ln_w, ln_b = params = (
            own.get("learnable_ttt_lr_weight"), own.get("learnable_ttt_lr_bias"), own.get("learnable_token_idx"),
            own.get("ttt_norm_weight"), own.get("ttt_norm_bias"))
        if (lr_w is None or lr_b is None or token_idx is None) and any(  # (`is`: `None in params` would compare
                t is None and getattr(self, n, None) is not None for n, t in zip(_NATIVE_STEP_PARAMETERS, params)):
            return None  # not a parameter but something else set under its name: the torch path reads it
        # the shapes (a missing inner norm fails them), then plain float32 CPU tensors
        if ((lr_w is None) != (lr_b is None) or ln_w is None or ln_b is None or ln_w.shape != (H, d)
                or ln_b.shape != (H, d) or (lr_w is not None and (lr_w.shape != (H, 1, C) or lr_b.shape != (H, 1)))
                or (token_idx is not None and token_idx.shape != (b,)) or not native.plain_float32(*params)):
            return None
        # bare nn.Linear projections without hooks (a hooked one must be called, and only once: the torch
        # path), of C outputs each: the kernel reads H·d values per row of q, k and v (weights of another
        # dtype than x make F.linear raise, as they do on the torch path)
        q_proj, v_proj = modules["q_proj"], modules["v_proj"]
        k_proj = q_proj if self.share_qk else modules["k_proj"]
        if not native.plain(q_proj, k_proj, v_proj):
            return None
        for proj in (q_proj, k_proj, v_proj):
            weight = proj._parameters["weight"]
            if weight is None or weight.shape != (C, C):
                return None
        # everything that does not need the projections first, while the caches still hold what it reads
        # (the projections' weights stream through them)
        ln_w, ln_b = ln_w.contiguous(), ln_b.contiguous()
        gate = (None, None, self.config.ttt_base_lr / d) if lr_w is None else (
            lr_w.contiguous(), lr_b.contiguous(), self.config.ttt_base_lr / d)
        if token_idx is not None:
            token_idx = token_idx.contiguous()
        rope = self._rope_table(torch.float32, _CPU, pairs=True) if self.config.rope else None  # (b, d/2, 2)
        commit = p + 1 == b  # the mini-batch is complete: W ← W̄_b, G ← 0
        norm = modules.get("post_norm")  # (None: the layer has none)
        post_w = post_b = None
        if norm is not None and native.plain(norm, kind=nn.LayerNorm):
            post_w, post_b = norm._parameters.get("weight"), norm._parameters.get("bias")
        fuse_norm = (post_w is not None and post_b is not None and post_w.shape == (C,) and post_b.shape == (C,)
                     and native.plain_float32(post_w, post_b))
        post = (post_w.contiguous(), post_b.contiguous(), norm.eps) if fuse_norm else (None, None, 0.0)
        o_proj = modules["o_proj"]
        bare_output = fuse_norm and not self.use_gate and native.plain(o_proj)
        new_pos = torch.full((B,), (p + 1) % b, dtype=torch.int64, device=x.device)
        if self.share_qk:  # q_proj, then the conv_q / conv_k pair
            q, k, v, new = self._qkv_step(x, state)
            q, k, v = q.reshape(B, C).contiguous(), k.reshape(B, C).contiguous(), v.reshape(B, C).contiguous()
        else:  # what the modules' forward computes, without the module calls: rows (B, C), contiguous
            q = F.linear(x, q_proj._parameters["weight"], q_proj._parameters["bias"])
            k = F.linear(x, k_proj._parameters["weight"], k_proj._parameters["bias"])
            v = F.linear(x, v_proj._parameters["weight"], v_proj._parameters["bias"])
            new = {}
        z, W_bar, G = self._native_token(q, k, v, x.contiguous(), gate, rope, token_idx, p, state, ln_w, ln_b, commit,
                                         post)
        for name in self.inner_names:
            if commit:
                new[name], new[f"{name}_grad"] = W_bar[name], torch.zeros_like(G[name])
            else:
                new[name], new[f"{name}_grad"] = state[name], G[name]
        new["pos"] = new_pos
        new["mini_batch_size"] = state["mini_batch_size"]
        if bare_output:
            return F.linear(z, o_proj._parameters["weight"], o_proj._parameters["bias"]), new
        if not fuse_norm:
            return self._output(x, z), new
        return o_proj(self._gate(x, z)), new

    def _ln(self, outer: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """The inner LayerNorm's weight and bias as (B·H, 1, d), or (None, None) without it."""
        if not self.config.inner_norm:
            return None, None
        return outer["ttt_norm_weight"].unsqueeze(1), outer["ttt_norm_bias"].unsqueeze(1)
