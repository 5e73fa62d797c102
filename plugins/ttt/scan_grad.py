"""The TTT dual form's backward, written for it: TTT-Linear and TTT-MLP train through these
``torch.autograd.Function``s instead of autograd's record of the mini-batch loop.

Autograd through the loop records some forty small ops per mini-batch and replays them one by one,
second-order LayerNorm terms included. There are two forms of the same math:

- the torch form (``_TTTLinearScan``, ``_TTTMLPScan``; any dtype, reached by calling ``ttt_linear_train`` /
  ``ttt_mlp_train`` on tensors the native kernels do not take): the forward runs without autograd and
  keeps only the weights at the start of every group of mini-batches;
- the native form (``_TTTLinearNative``, ``_TTTMLPNative``; float32 CPU, what the layers train through):
  the forward is the prefill kernel and keeps only its inputs; the backward kernel replays each head's
  weights at every mini-batch start, then runs as step 3 below, one mini-batch at a time, in cache.

The torch form's backward takes the groups last to first; for each it

1. replays the group's *sequential core* from its start weights: per mini-batch only what the next
   weights need (the inner gradients g at the keys and the update), a few ops per mini-batch;
2. computes everything else of the group in a handful of batched ops over all its mini-batches at
   once (the outputs Z̄, their LayerNorm, and every gradient that does not depend on the weights'
   gradient carried from later mini-batches);
3. runs the carried gradient (dW, db) backwards through the group's mini-batches, the only part that
   is sequential: dW_i = dW_{i+1} + XQ_iᵀ dZ̄_i + XK_iᵀ dZ_i^k, where dZ_i^k is the gradient through the
   inner LayerNorm's fused L2 backward (a second-order LayerNorm term, in closed form below).

The math, per head, for one mini-batch with start weights (W, b), η its causal rates and e = η[b, :]
the rates of the end-of-mini-batch update (the notation of ``linear.py``):

    Z^k = XK·W + b,  x̂, rstd = LN(Z^k),  u = γ²x̂ + γβ + γ(XK − XV),  g = rstd·P(u)
    P(u) = u − mean(u) − x̂·mean(u ⊙ x̂)          (the LayerNorm backward without affine)
    M = η ⊙ (XQ·XKᵀ + 1),  Z̄ = XQ·W + b − M·g,  z = XQ + γ·LN(Z̄) + β
    W' = W − XKᵀ(e ⊙ g),  b' = b − eᵀg

and the backward of g = rstd·P(u) for an incoming dg:

    du = rstd·P(dg),   dx̂ = γ²du − rstd·(dg·mean(u ⊙ x̂) + u·mean(dg ⊙ x̂)),
    drstd = Σ dg ⊙ g / rstd,   dZ^k = rstd·P(dx̂) − drstd·rstd²·x̂ / d.

Every result equals autograd's gradients through ``ttt_linear_dual`` / ``ttt_mlp_dual`` (float64 in
tests/test_ttt_backward.py). A second derivative (``create_graph=True``) goes through autograd's record of a
plain loop instead, recomputed in the backward (``seqzoo.nn.recomputed_backward``), so it is exact too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqzoo import native
from seqzoo.nn import recomputed_backward

from . import native_kernels
from .reference import _SQRT_2_OVER_PI, LN_EPS

__all__ = ["ttt_linear_train", "ttt_mlp_train", "applies", "native_applies", "DEFAULT_GROUP"]

#: mini-batches per group of the torch form (``group=0``): the weights are kept at each group's start, and
#: a group's intermediates live only while the backward handles it
DEFAULT_GROUP = 32


def applies(*tensors: Tensor | None) -> bool:
    """Whether a layer's training forward takes the written backward: autograd records (something
    requires a gradient), no ``torch.func`` transform, tracing or compiling is active (the Functions have
    no vmap rule), and the native kernels take the tensors (float32 CPU). Elsewhere autograd's record of
    the loop is as fast as the torch form here (float32 on a CPU, measured) or faster (TTT-MLP in float64),
    so the torch form is the float64 statement of the math that the kernels follow."""
    return (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
            and native.trainable() and native_applies(*tensors))


def native_applies(*tensors: Tensor | None) -> bool:
    """Whether the native backward kernels take these tensors (plain float32 CPU, a C compiler)."""
    return native_kernels.LIB.available() and native.plain_float32(*tensors)


def _ln_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x̂, mean, rstd of a LayerNorm without affine over the last dim (mean/rstd keep a trailing 1)."""
    return torch.native_layer_norm(x, x.shape[-1:], None, None, LN_EPS)


def _ln_bwd(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """rstd·P(grad): the backward of x ↦ x̂ (a LayerNorm without affine) at x."""
    return torch.ops.aten.native_layer_norm_backward(grad, x, x.shape[-1:], mean, rstd, None, None,
                                                     [True, False, False])[0]


def _ln_l2_bwd_grad(dg: Tensor, x: Tensor, x_hat: Tensor, mean: Tensor, rstd: Tensor, u: Tensor, g: Tensor,
                    gamma2: Tensor) -> tuple[Tensor, Tensor]:
    """The backward of g = rstd·P(u(x̂)) (``ln_l2_bwd``, u = γ²x̂ + c) for dg: (dx, du)."""
    d = x.shape[-1]
    du = _ln_bwd(dg, x, mean, rstd)
    m_u = (u * x_hat).mean(-1, keepdim=True)
    m_dg = (dg * x_hat).mean(-1, keepdim=True)
    # dx̂ = γ²·du − rstd·(dg·m_u + u·m_dg)
    dx_hat = torch.addcmul(dg * m_u, u, m_dg).mul_(-rstd).addcmul_(gamma2, du)
    drstd = (dg * g).sum(-1, keepdim=True) / rstd
    dx = _ln_bwd(dx_hat, x, mean, rstd).addcmul_(x_hat, drstd * rstd * rstd, value=-1.0 / d)
    return dx, du


# --- TTT-Linear ------------------------------------------------------------------------------------


def _linear_loop(q, k, v, eta, W, bias, gamma, beta):
    """``_TTTLinearScan``'s forward as a plain loop over mini-batches that autograd records (the
    reference its backward recomputes through for a second derivative)."""
    from .reference import ln_fwd, ln_l2_bwd

    outs = []
    for i in range(q.shape[0]):
        g = ln_l2_bwd(k[i] @ W + bias, v[i] - k[i], gamma, beta)
        Z_bar = q[i] @ W + bias - (eta[i] * (q[i] @ k[i].transpose(-1, -2) + 1.0)) @ g
        outs.append(q[i] + ln_fwd(Z_bar, gamma, beta))
        e = eta[i, :, -1, :, None]
        W = W - k[i].transpose(-1, -2) @ (e * g)
        bias = bias - (e * g).sum(-2, keepdim=True)
    return torch.stack(outs), W, bias


def _linear_core(k: Tensor, c: Tensor, e: Tensor, W: Tensor, bias: Tensor, gamma2: Tensor):
    """The sequential core over a group: k, c = γβ + γ(XK − XV) (G, N, b, d), e (G, N, b, 1) the update
    rates, W (N, d, d) and bias (N, 1, d) the start weights. Returns the weights at every mini-batch
    start (G + 1 of each, the last the end weights) and the key-side tensors (Z^k, x̂, mean, rstd, u, g)
    stacked over the group."""
    G = k.shape[0]
    Ws = W.new_empty((G + 1, *W.shape))
    bs = bias.new_empty((G + 1, *bias.shape))
    Ws[0], bs[0] = W, bias
    kept = []
    for i in range(G):
        Zk = torch.baddbmm(bs[i], k[i], Ws[i])
        x_hat, mean, rstd = _ln_stats(Zk)
        u = torch.addcmul(c[i], gamma2, x_hat)
        g = _ln_bwd(u, Zk, mean, rstd)
        torch.baddbmm(Ws[i], k[i].transpose(-1, -2), g * e[i], alpha=-1.0, out=Ws[i + 1])
        torch.baddbmm(bs[i], e[i].transpose(-1, -2), g, alpha=-1.0, out=bs[i + 1])
        kept.append((Zk, x_hat, mean, rstd, u, g))
    return Ws, bs, tuple(torch.stack(t) for t in zip(*kept))


class _TTTLinearScan(torch.autograd.Function):
    """Whole mini-batches of TTT-Linear with the inner LayerNorm: inputs in the (n, N, b, ·) layout
    (``ttt_linear_train`` lays them out), outputs z = XQ + LN(Z̄) (n, N, b, d) and the end weights."""

    @staticmethod
    def forward(ctx, q, k, v, eta, W, bias, gamma, beta, group: int):
        n, N, b, d = q.shape
        e = eta[:, :, -1, :, None]  # (n, N, b, 1)
        gamma2 = gamma * gamma
        starts_W, starts_b, outs = [], [], []
        for lo in range(0, n, group):
            hi = min(lo + group, n)
            starts_W.append(W)
            starts_b.append(bias)
            c = torch.addcmul(gamma * beta, gamma, k[lo:hi] - v[lo:hi])
            Ws, bs, (Zk, x_hat, mean, rstd, u, g) = _linear_core(k[lo:hi], c, e[lo:hi], W, bias, gamma2)
            Z_bar = _linear_outputs(q[lo:hi], k[lo:hi], eta[lo:hi], Ws[:-1], bs[:-1], g)[0]
            outs.append(torch.addcmul(beta, gamma, _ln_stats(Z_bar)[0]).add_(q[lo:hi]))
            W, bias = Ws[-1].clone(), bs[-1].clone()
        ctx.group = group
        ctx.save_for_backward(q, k, v, eta, gamma, beta, torch.stack(starts_W), torch.stack(starts_b),
                              starts_W[0], starts_b[0])  # (the start weights themselves: a second derivative)
        return torch.cat(outs) if len(outs) > 1 else outs[0], W, bias

    @staticmethod
    def backward(ctx, dz, dW_end, db_end):
        q, k, v, eta, gamma, beta, starts_W, starts_b, W0, b0 = ctx.saved_tensors
        if torch.is_grad_enabled():  # a second derivative: autograd through the loop, recomputed
            return (*recomputed_backward(_linear_loop, (q, k, v, eta, W0, b0, gamma, beta),
                                         (dz, dW_end, db_end), ctx.needs_input_grad[:8]), None)
        group = ctx.group
        n, N, b, d = q.shape
        e = eta[:, :, -1, :, None]
        gamma2 = gamma * gamma
        dW = torch.zeros_like(starts_W[0]) if dW_end is None else dW_end.clone()
        db = torch.zeros_like(starts_b[0]) if db_end is None else db_end.clone()
        dz = torch.zeros_like(q) if dz is None else dz.contiguous()
        dq, dk, dv, deta = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(eta)
        dgamma, dbeta = torch.zeros_like(gamma), torch.zeros_like(beta)
        flat = lambda t: t.reshape(-1, *t.shape[2:])  # (G, N, ...) -> (G·N, ...)
        for j in reversed(range(0, (n + group - 1) // group)):
            lo, hi = j * group, min((j + 1) * group, n)
            G = hi - lo
            qg, kg, vg, etag, eg, dzg = q[lo:hi], k[lo:hi], v[lo:hi], eta[lo:hi], e[lo:hi], dz[lo:hi]
            c = torch.addcmul(gamma * beta, gamma, kg - vg)
            Ws, bs, (Zk, x_hat, mean, rstd, u, g) = _linear_core(kg, c, eg, starts_W[j], starts_b[j], gamma2)
            Wi, bi = Ws[:-1], bs[:-1]
            Z_bar, A, M = _linear_outputs(qg, kg, etag, Wi, bi, g)
            z_hat, z_mean, z_rstd = _ln_stats(Z_bar)
            # the output LayerNorm and the residual
            dgamma += (dzg * z_hat).sum((0, 2)).unsqueeze(-2)
            dbeta += dzg.sum((0, 2)).unsqueeze(-2)
            dZ_bar = _ln_bwd(dzg * gamma, Z_bar, z_mean, z_rstd)
            # Z̄ = XQ·W + b − M·g, M = η ⊙ (XQ·XKᵀ + 1): every term but the carried weights' gradient
            dqg = torch.baddbmm(flat(dzg), flat(dZ_bar), flat(Wi).transpose(-1, -2)).view_as(qg)
            dW_local = torch.bmm(flat(qg).transpose(-1, -2), flat(dZ_bar)).view_as(Wi)
            db_local = dZ_bar.sum(-2, keepdim=True)
            dM = torch.bmm(flat(dZ_bar), flat(g).transpose(-1, -2)).neg_().view_as(A)
            deta[lo:hi] = dM * (A + 1.0)
            dA = flat(dM * etag)
            dqg = dqg.add_(torch.bmm(dA, flat(kg)).view_as(qg))
            dkg = torch.bmm(dA.transpose(-1, -2), flat(qg)).view_as(kg)
            dg = torch.bmm(flat(M).transpose(-1, -2), flat(dZ_bar)).neg_().view_as(g)
            # the carried gradient, last mini-batch first: (dW, db) is the gradient of the weights
            # after mini-batch i, the update W' = W − XKᵀ(e ⊙ g), b' = b − eᵀg reads it
            carries = torch.empty_like(Wi)
            dZk = torch.empty_like(Zk)
            du = torch.empty_like(u)
            for i in reversed(range(G)):
                carries[i] = dW
                R = torch.baddbmm(db, kg[i], dW).neg_()  # −(XK·dW + db): the gradient of e ⊙ g
                deta[lo + i, :, -1, :] += (g[i] * R).sum(-1)
                dg_i = dg[i].addcmul_(eg[i], R)
                dZk[i], du[i] = _ln_l2_bwd_grad(dg_i, Zk[i], x_hat[i], mean[i], rstd[i], u[i], g[i], gamma2)
                dW = dW.add_(dW_local[i]).baddbmm_(kg[i].transpose(-1, -2), dZk[i])
                db = db.add_(db_local[i]).add_(dZk[i].sum(-2, keepdim=True))
            # what reads the stored per-mini-batch tensors, batched again: the update's XK term, the
            # keys' forward, and the constant c = γβ + γ(XK − XV) of u
            dkg -= torch.bmm(flat(g * eg), flat(carries).transpose(-1, -2)).view_as(kg)
            dkg += torch.bmm(flat(dZk), flat(Wi).transpose(-1, -2)).view_as(kg)
            gdu = du * gamma
            dkg += gdu
            dq[lo:hi], dk[lo:hi], dv[lo:hi] = dqg, dkg, -gdu
            dgamma += (du * (2.0 * gamma * x_hat + beta + kg - vg)).sum((0, 2)).unsqueeze(-2)
            dbeta += gdu.sum((0, 2)).unsqueeze(-2)
        return dq, dk, dv, deta, dW, db, dgamma, dbeta, None


def _linear_outputs(q, k, eta, Wi, bi, g):
    """Z̄ = XQ·W_i + b_i − M·g with M = η ⊙ (XQ·XKᵀ + 1), batched over a group (G, N, ...): (Z̄, XQ·XKᵀ, M)."""
    flat = lambda t: t.reshape(-1, *t.shape[2:])
    A = torch.bmm(flat(q), flat(k).transpose(-1, -2)).view(*q.shape[:2], q.shape[2], k.shape[2])
    M = eta * (A + 1.0)
    Z_bar = torch.baddbmm(flat(bi), flat(q), flat(Wi)).baddbmm_(flat(M), flat(g), alpha=-1.0)
    return Z_bar.view_as(q), A, M


class _TTTLinearNative(torch.autograd.Function):
    """``_TTTLinearScan`` on float32 CPU tensors through the native kernels: the forward is the prefill
    kernel (``sz_ttt_linear_dual``) and keeps only its inputs; the backward kernel
    (``sz_ttt_linear_dual_bwd``) replays each head's weights at every mini-batch start, then runs its
    mini-batches last to first as ``_TTTLinearScan.backward`` does, in cache."""

    @staticmethod
    def forward(ctx, XQ, XK, XV, lr, tok, W1, b1, ln_w, ln_b, mini_batch_size: int):
        ctx.mini_batch_size = mini_batch_size
        ctx.save_for_backward(XQ, XK, XV, lr, tok, W1, b1, ln_w, ln_b)
        return native_kernels.ttt_linear_dual(XQ, XK, XV, lr, tok, W1, b1, ln_w, ln_b, mini_batch_size, LN_EPS)

    @staticmethod
    def backward(ctx, dZ, dW, db):
        XQ, XK, XV, lr, tok, W1, b1, ln_w, ln_b = ctx.saved_tensors
        if torch.is_grad_enabled():  # a second derivative: autograd through the torch dual form, recomputed
            from .linear import ttt_linear_dual

            dual = lambda *t: ttt_linear_dual(*t, ctx.mini_batch_size)
            return (*recomputed_backward(dual, ctx.saved_tensors, (dZ, dW, db), ctx.needs_input_grad[:9]), None)
        dZ = torch.zeros_like(XQ) if dZ is None else dZ
        dW = torch.zeros_like(W1) if dW is None else dW
        db = torch.zeros_like(b1) if db is None else db
        grads = native_kernels.ttt_linear_dual_bwd(XQ, XK, XV, lr, tok, W1, b1, ln_w, ln_b, ctx.mini_batch_size,
                                                   LN_EPS, dZ, dW, db)
        return (*grads, None)


# --- TTT-MLP ---------------------------------------------------------------------------------------
#
# Per head, hidden F = 4d, φ = gelu_tanh, one mini-batch from (W1, b1, W2, b2):
#     Z1 = XK·W1 + b1, X2 = φ(Z1), Z2 = X2·W2 + b2, g2 = rstd·P(u) (the key-side LayerNorm of Z2, as
#     TTT-Linear's), h = g2·W2ᵀ, g1 = h ⊙ φ'(Z1);
#     Z̄1 = XQ·W1 + b1 − M1·g1, X̄2 = φ(Z̄1), Z̄2 = X̄2·W2 + b2 − M2·g2, z = XQ + γ·LN(Z̄2) + β,
#     M1 = η ⊙ (XQ·XKᵀ + 1), M2 = η ⊙ (X̄2·X2ᵀ + 1);
#     W1' = W1 − XKᵀ(e ⊙ g1), b1' = b1 − eᵀg1, W2' = W2 − X2ᵀ(e ⊙ g2), b2' = b2 − eᵀg2.
# The backward adds, beyond TTT-Linear's terms, the path through h: dh = dg1 ⊙ φ'(Z1) gives
# dg2 += dh·W2 and dW2 += dhᵀ·g2, and dZ1 = dg1 ⊙ h ⊙ φ''(Z1) + dX2 ⊙ φ'(Z1).

_C0, _C1 = _SQRT_2_OVER_PI, 0.044715  # √(2/π) and the cubic coefficient of gelu_tanh


def _gelu_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """φ(x), φ'(x) and φ''(x) of gelu_tanh: with t = tanh(√(2/π)(x + 0.044715x³)) and
    u' = √(2/π)(1 + 3·0.044715x²): φ = ½x(1 + t), φ' = ½(1 + t) + ½x(1 − t²)u',
    φ'' = (1 − t²)(u' − x·t·u'² + 3·0.044715·√(2/π)·x²)."""
    x2 = x * x
    t = torch.tanh(_C0 * x * (1.0 + _C1 * x2))
    du = _C0 * (1.0 + 3.0 * _C1 * x2)
    one_t2 = 1.0 - t * t
    y = 0.5 * x * (1.0 + t)
    dy = 0.5 * (1.0 + t) + 0.5 * x * one_t2 * du
    d2y = one_t2 * (du - x * t * du * du + 3.0 * _C1 * _C0 * x2)
    return y, dy, d2y


def _mlp_core(k, c, e, W, gamma2):
    """The sequential core of TTT-MLP over a group (as ``_linear_core``): W = [W1, b1, W2, b2] at the
    group's start. Returns the weights at every mini-batch start (lists of G + 1 stacked tensors) and the
    key-side tensors (Z1, X2, φ'(Z1), φ''(Z1), Z2, x̂, mean, rstd, u, g2, h, g1)."""
    G = k.shape[0]
    stacks = [w.new_empty((G + 1, *w.shape)) for w in W]
    for st, w in zip(stacks, W):
        st[0] = w
    W1s, b1s, W2s, b2s = stacks
    kept = []
    for i in range(G):
        Z1 = torch.baddbmm(b1s[i], k[i], W1s[i])
        X2, dphi, d2phi = _gelu_parts(Z1)
        Z2 = torch.baddbmm(b2s[i], X2, W2s[i])
        x_hat, mean, rstd = _ln_stats(Z2)
        u = torch.addcmul(c[i], gamma2, x_hat)
        g2 = _ln_bwd(u, Z2, mean, rstd)
        h = torch.bmm(g2, W2s[i].transpose(-1, -2))
        g1 = h * dphi
        torch.baddbmm(W1s[i], k[i].transpose(-1, -2), g1 * e[i], alpha=-1.0, out=W1s[i + 1])
        torch.baddbmm(b1s[i], e[i].transpose(-1, -2), g1, alpha=-1.0, out=b1s[i + 1])
        torch.baddbmm(W2s[i], X2.transpose(-1, -2), g2 * e[i], alpha=-1.0, out=W2s[i + 1])
        torch.baddbmm(b2s[i], e[i].transpose(-1, -2), g2, alpha=-1.0, out=b2s[i + 1])
        kept.append((Z1, X2, dphi, d2phi, Z2, x_hat, mean, rstd, u, g2, h, g1))
    return stacks, tuple(torch.stack(t) for t in zip(*kept))


def _mlp_outputs(q, k, eta, W1, b1, W2, b2, X2, g1, g2):
    """The query side of a group, batched: (Z̄1, X̄2, φ'(Z̄1), Z̄2, S1, M1, S2, M2)."""
    flat = lambda t: t.reshape(-1, *t.shape[2:])
    shape_bb = (*q.shape[:3], q.shape[2])
    S1 = torch.bmm(flat(q), flat(k).transpose(-1, -2)).view(shape_bb)
    M1 = eta * (S1 + 1.0)
    Z1_bar = torch.baddbmm(flat(b1), flat(q), flat(W1)).baddbmm_(flat(M1), flat(g1), alpha=-1.0).view_as(g1)
    X2_bar, dphi_bar, _ = _gelu_parts(Z1_bar)
    S2 = torch.bmm(flat(X2_bar), flat(X2).transpose(-1, -2)).view(shape_bb)
    M2 = eta * (S2 + 1.0)
    Z2_bar = torch.baddbmm(flat(b2), flat(X2_bar), flat(W2)).baddbmm_(flat(M2), flat(g2), alpha=-1.0).view_as(q)
    return Z1_bar, X2_bar, dphi_bar, Z2_bar, S1, M1, S2, M2


def _mlp_loop(q, k, v, eta, W1, b1, W2, b2, gamma, beta):
    """``_TTTMLPScan``'s forward as a plain loop over mini-batches that autograd records (as ``_linear_loop``)."""
    from .reference import gelu_tanh, gelu_tanh_grad, ln_fwd, ln_l2_bwd

    outs = []
    for i in range(q.shape[0]):
        Z1 = k[i] @ W1 + b1
        X2 = gelu_tanh(Z1)
        g2 = ln_l2_bwd(X2 @ W2 + b2, v[i] - k[i], gamma, beta)
        g1 = (g2 @ W2.transpose(-1, -2)) * gelu_tanh_grad(Z1)
        X2_bar = gelu_tanh(q[i] @ W1 + b1 - (eta[i] * (q[i] @ k[i].transpose(-1, -2) + 1.0)) @ g1)
        Z2_bar = X2_bar @ W2 + b2 - (eta[i] * (X2_bar @ X2.transpose(-1, -2) + 1.0)) @ g2
        outs.append(q[i] + ln_fwd(Z2_bar, gamma, beta))
        e = eta[i, :, -1, :, None]
        W1, b1 = W1 - k[i].transpose(-1, -2) @ (e * g1), b1 - (e * g1).sum(-2, keepdim=True)
        W2, b2 = W2 - X2.transpose(-1, -2) @ (e * g2), b2 - (e * g2).sum(-2, keepdim=True)
    return torch.stack(outs), W1, b1, W2, b2


class _TTTMLPScan(torch.autograd.Function):
    """Whole mini-batches of TTT-MLP with the inner LayerNorm, as ``_TTTLinearScan``: inputs in the
    (n, N, b, ·) layout, outputs z (n, N, b, d) and the end weights W1, b1, W2, b2."""

    @staticmethod
    def forward(ctx, q, k, v, eta, W1, b1, W2, b2, gamma, beta, group: int):
        n = q.shape[0]
        e = eta[:, :, -1, :, None]
        gamma2 = gamma * gamma
        W = [W1, b1, W2, b2]
        starts, outs = [], []
        for lo in range(0, n, group):
            hi = min(lo + group, n)
            starts.append(W)
            c = torch.addcmul(gamma * beta, gamma, k[lo:hi] - v[lo:hi])
            stacks, kept = _mlp_core(k[lo:hi], c, e[lo:hi], W, gamma2)
            Z1, X2, dphi, d2phi, Z2, x_hat, mean, rstd, u, g2, h, g1 = kept
            Z2_bar = _mlp_outputs(q[lo:hi], k[lo:hi], eta[lo:hi], *(st[:-1] for st in stacks), X2, g1, g2)[3]
            outs.append(torch.addcmul(beta, gamma, _ln_stats(Z2_bar)[0]).add_(q[lo:hi]))
            W = [st[-1].clone() for st in stacks]
        ctx.group = group
        ctx.save_for_backward(q, k, v, eta, gamma, beta, *(torch.stack(ws) for ws in zip(*starts)),
                              *starts[0])  # (the start weights themselves: a second derivative)
        return (torch.cat(outs) if len(outs) > 1 else outs[0], *W)

    @staticmethod
    def backward(ctx, dz, dW1, db1, dW2, db2):
        q, k, v, eta, gamma, beta, *starts = ctx.saved_tensors
        starts, firsts = starts[:4], starts[4:]
        if torch.is_grad_enabled():  # a second derivative: autograd through the loop, recomputed
            return (*recomputed_backward(_mlp_loop, (q, k, v, eta, *firsts, gamma, beta),
                                         (dz, dW1, db1, dW2, db2), ctx.needs_input_grad[:10]), None)
        group = ctx.group
        n = q.shape[0]
        e = eta[:, :, -1, :, None]
        gamma2 = gamma * gamma
        carry = [torch.zeros_like(s[0]) if g is None else g.clone() for s, g in zip(starts, (dW1, db1, dW2, db2))]
        dz = torch.zeros_like(q) if dz is None else dz.contiguous()
        dq, dk, dv, deta = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(eta)
        dgamma, dbeta = torch.zeros_like(gamma), torch.zeros_like(beta)
        flat = lambda t: t.reshape(-1, *t.shape[2:])
        bmm = lambda a, b_: torch.bmm(flat(a), flat(b_)).view(*a.shape[:2], a.shape[2], b_.shape[-1])
        T_ = lambda t: t.transpose(-1, -2)
        for j in reversed(range(0, (n + group - 1) // group)):
            lo, hi = j * group, min((j + 1) * group, n)
            G = hi - lo
            qg, kg, vg, etag, eg, dzg = q[lo:hi], k[lo:hi], v[lo:hi], eta[lo:hi], e[lo:hi], dz[lo:hi]
            c = torch.addcmul(gamma * beta, gamma, kg - vg)
            stacks, kept = _mlp_core(kg, c, eg, [s[j] for s in starts], gamma2)
            Z1, X2, dphi, d2phi, Z2, x_hat, mean, rstd, u, g2, h, g1 = kept
            W1, b1, W2, b2 = (st[:-1] for st in stacks)
            Z1_bar, X2_bar, dphi_bar, Z2_bar, S1, M1, S2, M2 = _mlp_outputs(qg, kg, etag, W1, b1, W2, b2, X2, g1, g2)
            z_hat, z_mean, z_rstd = _ln_stats(Z2_bar)
            dgamma += (dzg * z_hat).sum((0, 2)).unsqueeze(-2)
            dbeta += dzg.sum((0, 2)).unsqueeze(-2)
            dZ2_bar = _ln_bwd(dzg * gamma, Z2_bar, z_mean, z_rstd)
            # Z̄2 = X̄2·W2 + b2 − M2·g2
            dX2_bar = bmm(dZ2_bar, T_(W2))
            dW2_local = bmm(T_(X2_bar), dZ2_bar)
            db2_local = dZ2_bar.sum(-2, keepdim=True)
            dM2 = bmm(dZ2_bar, T_(g2)).neg_()
            dg2 = bmm(T_(M2), dZ2_bar).neg_()
            dS2 = dM2 * etag
            deta_g = dM2 * (S2 + 1.0)
            dX2_bar += bmm(dS2, X2)
            dX2 = bmm(T_(dS2), X2_bar)
            # X̄2 = φ(Z̄1), Z̄1 = XQ·W1 + b1 − M1·g1
            dZ1_bar = dX2_bar * dphi_bar
            dqg = dzg + bmm(dZ1_bar, T_(W1))
            dW1_local = bmm(T_(qg), dZ1_bar)
            db1_local = dZ1_bar.sum(-2, keepdim=True)
            dM1 = bmm(dZ1_bar, T_(g1)).neg_()
            dg1 = bmm(T_(M1), dZ1_bar).neg_()
            dS1 = dM1 * etag
            deta_g += dM1 * (S1 + 1.0)
            dqg += bmm(dS1, kg)
            dkg = bmm(T_(dS1), qg)
            deta[lo:hi] = deta_g
            # the carried gradients, last mini-batch first
            carries = [torch.empty_like(st[:-1]) for st in stacks]
            dZ1 = torch.empty_like(Z1)
            dZ2 = torch.empty_like(Z2)
            du = torch.empty_like(u)
            dh = torch.empty_like(h)
            for i in reversed(range(G)):
                cW1, cb1, cW2, cb2 = carry
                for buf, cur in zip(carries, carry):
                    buf[i] = cur
                R1 = torch.baddbmm(cb1, kg[i], cW1).neg_()  # the gradient of e ⊙ g1
                R2 = torch.baddbmm(cb2, X2[i], cW2).neg_()  # the gradient of e ⊙ g2
                deta[lo + i, :, -1, :] += (g1[i] * R1).sum(-1) + (g2[i] * R2).sum(-1)
                dg1_i = dg1[i].addcmul_(eg[i], R1)
                dh[i] = dg1_i * dphi[i]
                dg2_i = dg2[i].addcmul_(eg[i], R2).baddbmm_(dh[i], W2[i])
                dZ2[i], du[i] = _ln_l2_bwd_grad(dg2_i, Z2[i], x_hat[i], mean[i], rstd[i], u[i], g2[i], gamma2)
                dX2_i = torch.baddbmm(dX2[i], dZ2[i], W2[i].transpose(-1, -2))
                dX2_i.baddbmm_(g2[i] * eg[i], cW2.transpose(-1, -2), alpha=-1.0)
                dZ1[i] = dX2_i * dphi[i] + dg1_i * h[i] * d2phi[i]
                carry = [
                    cW1.add_(dW1_local[i]).baddbmm_(kg[i].transpose(-1, -2), dZ1[i]),
                    cb1.add_(db1_local[i]).add_(dZ1[i].sum(-2, keepdim=True)),
                    cW2.add_(dW2_local[i]).baddbmm_(dh[i].transpose(-1, -2), g2[i]).baddbmm_(
                        X2[i].transpose(-1, -2), dZ2[i]),
                    cb2.add_(db2_local[i]).add_(dZ2[i].sum(-2, keepdim=True)),
                ]
            # batched again: the keys' other terms
            dkg -= bmm(g1 * eg, T_(carries[0]))
            dkg += bmm(dZ1, T_(W1))
            gdu = du * gamma
            dkg += gdu
            dq[lo:hi], dk[lo:hi], dv[lo:hi] = dqg, dkg, -gdu
            dgamma += (du * (2.0 * gamma * x_hat + beta + kg - vg)).sum((0, 2)).unsqueeze(-2)
            dbeta += gdu.sum((0, 2)).unsqueeze(-2)
        return (dq, dk, dv, deta, *carry, dgamma, dbeta, None)


class _TTTMLPNative(torch.autograd.Function):
    """``_TTTMLPScan`` on float32 CPU tensors through the native kernels (as ``_TTTLinearNative``)."""

    @staticmethod
    def forward(ctx, XQ, XK, XV, lr, tok, W1, b1, W2, b2, ln_w, ln_b, mini_batch_size: int):
        ctx.mini_batch_size = mini_batch_size
        ctx.save_for_backward(XQ, XK, XV, lr, tok, W1, b1, W2, b2, ln_w, ln_b)
        return native_kernels.ttt_mlp_dual(XQ, XK, XV, lr, tok, W1, b1, W2, b2, ln_w, ln_b, mini_batch_size, LN_EPS)

    @staticmethod
    def backward(ctx, dZ, dW1, db1, dW2, db2):
        XQ, XK, XV, lr, tok, W1, b1, W2, b2, ln_w, ln_b = ctx.saved_tensors
        if torch.is_grad_enabled():  # a second derivative: autograd through the torch dual form, recomputed
            from .mlp import ttt_mlp_dual

            dual = lambda *t: ttt_mlp_dual(*t, ctx.mini_batch_size)
            return (*recomputed_backward(dual, ctx.saved_tensors, (dZ, dW1, db1, dW2, db2), ctx.needs_input_grad[:11]),
                    None)
        dZ = torch.zeros_like(XQ) if dZ is None else dZ
        ends = [torch.zeros_like(w) if g is None else g for w, g in zip((W1, b1, W2, b2), (dW1, db1, dW2, db2))]
        grads = native_kernels.ttt_mlp_dual_bwd(XQ, XK, XV, lr, tok, W1, b1, W2, b2, ln_w, ln_b, ctx.mini_batch_size,
                                                LN_EPS, dZ, *ends)
        return (*grads, None)


def ttt_linear_train(XQ: Tensor, XK: Tensor, XV: Tensor, lr_eta: Tensor, token_eta: Tensor, W1: Tensor, b1: Tensor,
                     ln_w: Tensor, ln_b: Tensor, mini_batch_size: int, group: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``ttt_linear_dual`` with the inner norm, for T a whole number of mini-batches, through the written
    backward: XQ/XK/XV (B, H, T, d), lr_eta (B, H, T), token_eta (b,), W1 (B, H, d, d), b1 (B, H, 1, d),
    ln_w/ln_b (H, d); ``group``: mini-batches per kept weight of the torch form (0: ``DEFAULT_GROUP``; the
    native form keeps per-head replay buffers instead). Returns
    z = XQ + LN(Z̄) as (B, H, T, d) and the end weights (B, H, d, d), (B, H, 1, d)."""
    from .reference import causal_eta

    B, H, T, d = XQ.shape
    b = mini_batch_size
    n, N = T // b, B * H
    if n * b != T:
        raise ValueError(f"ttt_linear_train: T = {T} is not a whole number of mini-batches of {b}")
    if native_applies(XQ, XK, XV, lr_eta, token_eta, W1, b1, ln_w, ln_b):
        return _TTTLinearNative.apply(XQ, XK, XV, lr_eta, token_eta, W1, b1, ln_w, ln_b, b)
    lay = lambda t: t.reshape(N, n, b, *t.shape[3:]).transpose(0, 1).contiguous()  # (n, N, b, ·)
    eta = causal_eta(token_eta, lr_eta.reshape(N, n, b).transpose(0, 1))  # (n, N, b, b)
    gamma = ln_w.expand(B, H, d).reshape(N, 1, d)
    beta = ln_b.expand(B, H, d).reshape(N, 1, d)
    z, W, bias = _TTTLinearScan.apply(lay(XQ), lay(XK), lay(XV), eta, W1.reshape(N, d, d), b1.reshape(N, 1, d),
                                      gamma, beta, group or DEFAULT_GROUP)
    z = z.transpose(0, 1).reshape(B, H, T, d)
    return z, W.view(B, H, d, d), bias.view(B, H, 1, d)



def ttt_mlp_train(XQ: Tensor, XK: Tensor, XV: Tensor, lr_eta: Tensor, token_eta: Tensor, W1: Tensor, b1: Tensor,
                  W2: Tensor, b2: Tensor, ln_w: Tensor, ln_b: Tensor, mini_batch_size: int,
                  group: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``ttt_mlp_dual`` with the inner norm, for T a whole number of mini-batches, through the written
    backward (as ``ttt_linear_train``): W1 (B, H, d, 4d), b1 (B, H, 1, 4d), W2 (B, H, 4d, d), b2 (B, H, 1, d).
    Returns z (B, H, T, d) and the end weights."""
    from .reference import causal_eta

    B, H, T, d = XQ.shape
    b = mini_batch_size
    n, N = T // b, B * H
    if n * b != T:
        raise ValueError(f"ttt_mlp_train: T = {T} is not a whole number of mini-batches of {b}")
    weights = (W1, b1, W2, b2)
    if native_applies(XQ, XK, XV, lr_eta, token_eta, *weights, ln_w, ln_b):
        return _TTTMLPNative.apply(XQ, XK, XV, lr_eta, token_eta, *weights, ln_w, ln_b, b)
    lay = lambda t: t.reshape(N, n, b, *t.shape[3:]).transpose(0, 1).contiguous()
    eta = causal_eta(token_eta, lr_eta.reshape(N, n, b).transpose(0, 1))
    gamma = ln_w.expand(B, H, d).reshape(N, 1, d)
    beta = ln_b.expand(B, H, d).reshape(N, 1, d)
    z, *W = _TTTMLPScan.apply(lay(XQ), lay(XK), lay(XV), eta, *(w.reshape(N, *w.shape[2:]) for w in weights),
                              gamma, beta, group or DEFAULT_GROUP)
    z = z.transpose(0, 1).reshape(B, H, T, d)
    return (z, *(w.view(B, H, *w.shape[1:]) for w in W))
