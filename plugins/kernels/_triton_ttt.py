"""Triton kernels of TTT-Linear / TTT-MLP: dual-form prefill and primal one-token decode.

One program per (batch, head). The prefill kernels keep the inner weights on chip in the accumulation
dtype for the whole sequence and stream the mini-batches through them; every matmul is a ``tl.dot``
with ``BT`` rows (the mini-batch padded to at least 16, the smallest ``tl.dot`` tile; padded rows are
masked to zero). The math is the one of ``reference.py``, line for line.

This module is loaded by ``ttt.py`` through ``load_kernels()`` *after* the interpreter mode is known,
because ``@triton.jit`` decides between compiled and interpreted kernels when it decorates.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """a @ b with inputs cast to DOT and the result accumulated in ACC."""
    return tl.dot(a.to(DOT), b.to(DOT), input_precision=PREC, out_dtype=ACC)


@triton.jit
def _ln_fwd(x, w, b, EPS: tl.constexpr):
    """Row-wise LayerNorm of x (R, D) with weight/bias (1, D)."""
    D: tl.constexpr = x.shape[1]
    mu = tl.sum(x, axis=1, keep_dims=True) / D
    xc = x - mu
    var = tl.sum(xc * xc, axis=1, keep_dims=True) / D
    return w * (xc / tl.sqrt(var + EPS)) + b


@triton.jit
def _ln_l2_bwd(x, target, w, b, EPS: tl.constexpr):
    """Row-wise ∂/∂x of ½‖LN(x) − target‖² for x (R, D)."""
    D: tl.constexpr = x.shape[1]
    mu = tl.sum(x, axis=1, keep_dims=True) / D
    xc = x - mu
    var = tl.sum(xc * xc, axis=1, keep_dims=True) / D
    std = tl.sqrt(var + EPS)
    x_hat = xc / std
    gx_hat = (w * x_hat + b - target) * w
    s1 = tl.sum(gx_hat, axis=1, keep_dims=True)
    s2 = tl.sum(gx_hat * x_hat, axis=1, keep_dims=True)
    return (D * gx_hat - s1 - x_hat * s2) / (D * std)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gelu_tanh(x):
    # ½x(1 + tanh u) = x·σ(2u), u = √(2/π)(x + 0.044715x³), √(2/π) = 0.7978845608028654
    u = (x + 0.044715 * x * x * x) * 0.7978845608028654
    return x * _sigmoid(2.0 * u)


@triton.jit
def _gelu_tanh_grad(x):
    # d/dx [x·σ(2u)] = σ(2u) + x·σ(2u)(1 − σ(2u))·2u'
    s = _sigmoid((x + 0.044715 * x * x * x) * (2.0 * 0.7978845608028654))
    du = (1.0 + 3.0 * 0.044715 * x * x) * 0.7978845608028654
    return s + 2.0 * x * s * (1.0 - s) * du


@triton.jit
def ttt_linear_fwd_kernel(
    XQ, XK, XV, LR, TOK,  # (B,H,T,D) x3, (B,H,T), (MB,)
    W1, B1, LNW, LNB,  # (B,H,D,D), (B,H,1,D), (H,D) x2
    Z, W1_OUT, B1_OUT,  # (B,H,T,D), (B,H,D,D), (B,H,1,D)
    W1_CKPT, B1_CKPT,  # (B,H,N_CKPT,D,D), (B,H,N_CKPT,1,D): weights at every CKPT_EVERY-th boundary
    T, NH, N_CKPT,
    D: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, CKPT_EVERY: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)  # (batch, head); int64 offsets for long sequences
    h = bh % NH
    rows = tl.arange(0, BT)  # position inside the mini-batch (padded to BT)
    cols = tl.arange(0, D)
    w_offs = cols[:, None] * D + cols[None, :]

    W = tl.load(W1 + bh * D * D + w_offs).to(ACC)
    b = tl.load(B1 + bh * D + cols[None, :]).to(ACC)  # (1, D)
    ln_w = tl.load(LNW + h * D + cols[None, :]).to(ACC)
    ln_b = tl.load(LNB + h * D + cols[None, :]).to(ACC)
    tok = tl.load(TOK + rows, mask=rows < MB, other=0.0).to(ACC)  # token_eta[i]
    tok_last = tl.sum(tl.where(rows == MB - 1, tok, 0.0), axis=0)  # token_eta[b]
    causal = rows[:, None] >= rows[None, :]

    for n in range(0, tl.cdiv(T, MB)):
        t0 = n * MB
        n_valid = tl.minimum(T - t0, MB)
        valid = rows < n_valid
        offs = (bh * T + t0 + rows[:, None]) * D + cols[None, :]
        xq = tl.load(XQ + offs, mask=valid[:, None], other=0.0).to(ACC)
        xk = tl.load(XK + offs, mask=valid[:, None], other=0.0).to(ACC)
        xv = tl.load(XV + offs, mask=valid[:, None], other=0.0).to(ACC)
        lr = tl.load(LR + bh * T + t0 + rows, mask=valid, other=0.0).to(ACC)
        eta = tl.where(causal, tok[:, None] * lr[None, :], 0.0)  # η[i, j], (BT, BT)

        # G = ∂ℓ/∂Z1 at the mini-batch-start weights
        z1 = _dot(xk, W, ACC, DOT, PREC) + b
        g = _ln_l2_bwd(z1, xv - xk, ln_w, ln_b, EPS)
        g = tl.where(valid[:, None], g, 0.0)

        # Z̄1 = XQ·W + b − (η ⊙ (XQ·XKᵀ + 1))·G ;  z = XQ + LN(Z̄1)
        attn = _dot(xq, tl.trans(xk), ACC, DOT, PREC)
        z1_bar = _dot(xq, W, ACC, DOT, PREC) + b - _dot(eta * (attn + 1.0), g, ACC, DOT, PREC)
        z = xq + _ln_fwd(z1_bar, ln_w, ln_b, EPS)
        tl.store(Z + offs, z.to(Z.dtype.element_ty), mask=valid[:, None])

        # W ← W̄_b after a full mini-batch (a partial one has eta_last = 0)
        eta_last = tl.where(n_valid == MB, tok_last, 0.0) * lr  # η[b, j]
        W -= _dot(tl.trans(xk * eta_last[:, None]), g, ACC, DOT, PREC)
        b -= tl.sum(g * eta_last[:, None], axis=0, keep_dims=True)

        if CKPT_EVERY > 0:
            k = (n + 1) // CKPT_EVERY
            if ((n + 1) % CKPT_EVERY == 0) & (k < N_CKPT):
                tl.store(W1_CKPT + (bh * N_CKPT + k) * D * D + w_offs, W.to(W1_CKPT.dtype.element_ty))
                tl.store(B1_CKPT + (bh * N_CKPT + k) * D + cols[None, :], b.to(B1_CKPT.dtype.element_ty))

    tl.store(W1_OUT + bh * D * D + w_offs, W.to(W1_OUT.dtype.element_ty))
    tl.store(B1_OUT + bh * D + cols[None, :], b.to(B1_OUT.dtype.element_ty))


@triton.jit
def ttt_mlp_fwd_kernel(
    XQ, XK, XV, LR, TOK,  # (B,H,T,D) x3, (B,H,T), (MB,)
    W1, B1, W2, B2, LNW, LNB,  # (B,H,D,HID), (B,H,1,HID), (B,H,HID,D), (B,H,1,D), (H,D) x2
    Z, W1_OUT, B1_OUT, W2_OUT, B2_OUT,
    W1_CKPT, B1_CKPT, W2_CKPT, B2_CKPT,  # (B,H,N_CKPT,...): weights at every CKPT_EVERY-th boundary
    T, NH, N_CKPT,
    D: tl.constexpr, HID: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, CKPT_EVERY: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)  # (batch, head); int64 offsets for long sequences
    h = bh % NH
    rows = tl.arange(0, BT)
    cols = tl.arange(0, D)
    hid = tl.arange(0, HID)
    w1_offs = cols[:, None] * HID + hid[None, :]  # (D, HID)
    w2_offs = hid[:, None] * D + cols[None, :]  # (HID, D)

    W1t = tl.load(W1 + bh * D * HID + w1_offs).to(ACC)
    b1 = tl.load(B1 + bh * HID + hid[None, :]).to(ACC)
    W2t = tl.load(W2 + bh * HID * D + w2_offs).to(ACC)
    b2 = tl.load(B2 + bh * D + cols[None, :]).to(ACC)
    ln_w = tl.load(LNW + h * D + cols[None, :]).to(ACC)
    ln_b = tl.load(LNB + h * D + cols[None, :]).to(ACC)
    tok = tl.load(TOK + rows, mask=rows < MB, other=0.0).to(ACC)
    tok_last = tl.sum(tl.where(rows == MB - 1, tok, 0.0), axis=0)
    causal = rows[:, None] >= rows[None, :]

    for n in range(0, tl.cdiv(T, MB)):
        t0 = n * MB
        n_valid = tl.minimum(T - t0, MB)
        valid = rows < n_valid
        offs = (bh * T + t0 + rows[:, None]) * D + cols[None, :]
        xq = tl.load(XQ + offs, mask=valid[:, None], other=0.0).to(ACC)
        xk = tl.load(XK + offs, mask=valid[:, None], other=0.0).to(ACC)
        xv = tl.load(XV + offs, mask=valid[:, None], other=0.0).to(ACC)
        lr = tl.load(LR + bh * T + t0 + rows, mask=valid, other=0.0).to(ACC)
        eta = tl.where(causal, tok[:, None] * lr[None, :], 0.0)

        # inner model forward and backward on the keys
        z1 = _dot(xk, W1t, ACC, DOT, PREC) + b1  # (BT, HID)
        x2 = _gelu_tanh(z1)
        z2 = _dot(x2, W2t, ACC, DOT, PREC) + b2  # (BT, D)
        g2 = _ln_l2_bwd(z2, xv - xk, ln_w, ln_b, EPS)
        g2 = tl.where(valid[:, None], g2, 0.0)  # ∂ℓ/∂Z2
        g1 = _dot(g2, tl.trans(W2t), ACC, DOT, PREC) * _gelu_tanh_grad(z1)  # ∂ℓ/∂Z1

        # queries through W̄_i in dual form, layer by layer
        attn1 = _dot(xq, tl.trans(xk), ACC, DOT, PREC)
        z1_bar = _dot(xq, W1t, ACC, DOT, PREC) + b1 - _dot(eta * (attn1 + 1.0), g1, ACC, DOT, PREC)
        x2_bar = _gelu_tanh(z1_bar)
        attn2 = _dot(x2_bar, tl.trans(x2), ACC, DOT, PREC)
        z2_bar = _dot(x2_bar, W2t, ACC, DOT, PREC) + b2 - _dot(eta * (attn2 + 1.0), g2, ACC, DOT, PREC)
        z = xq + _ln_fwd(z2_bar, ln_w, ln_b, EPS)
        tl.store(Z + offs, z.to(Z.dtype.element_ty), mask=valid[:, None])

        eta_last = tl.where(n_valid == MB, tok_last, 0.0) * lr
        W1t -= _dot(tl.trans(xk * eta_last[:, None]), g1, ACC, DOT, PREC)
        b1 -= tl.sum(g1 * eta_last[:, None], axis=0, keep_dims=True)
        W2t -= _dot(tl.trans(x2 * eta_last[:, None]), g2, ACC, DOT, PREC)
        b2 -= tl.sum(g2 * eta_last[:, None], axis=0, keep_dims=True)

        if CKPT_EVERY > 0:
            k = (n + 1) // CKPT_EVERY
            if ((n + 1) % CKPT_EVERY == 0) & (k < N_CKPT):
                slot = bh * N_CKPT + k
                tl.store(W1_CKPT + slot * D * HID + w1_offs, W1t.to(W1_CKPT.dtype.element_ty))
                tl.store(B1_CKPT + slot * HID + hid[None, :], b1.to(B1_CKPT.dtype.element_ty))
                tl.store(W2_CKPT + slot * HID * D + w2_offs, W2t.to(W2_CKPT.dtype.element_ty))
                tl.store(B2_CKPT + slot * D + cols[None, :], b2.to(B2_CKPT.dtype.element_ty))

    tl.store(W1_OUT + bh * D * HID + w1_offs, W1t.to(W1_OUT.dtype.element_ty))
    tl.store(B1_OUT + bh * HID + hid[None, :], b1.to(B1_OUT.dtype.element_ty))
    tl.store(W2_OUT + bh * HID * D + w2_offs, W2t.to(W2_OUT.dtype.element_ty))
    tl.store(B2_OUT + bh * D + cols[None, :], b2.to(B2_OUT.dtype.element_ty))


@triton.jit
def ttt_linear_decode_kernel(
    XQ, XK, XV, LR, TOK,  # (B,H,D) x3, (B,H), (B,)
    W1, B1, GW1, GB1, LNW, LNB,  # (B,H,D,D), (B,H,1,D), the same for G, (H,D) x2
    Z, GW1_OUT, GB1_OUT, W1_BAR, B1_BAR,
    NH,
    D: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)  # (batch, head); int64 offsets for long sequences
    h = bh % NH
    cols = tl.arange(0, D)
    w_offs = cols[:, None] * D + cols[None, :]
    row = cols[None, :]  # vectors as (1, D) rows
    col = cols[:, None]  # or as (D, 1) columns

    k_col = tl.load(XK + bh * D + col).to(ACC)
    k_row = tl.load(XK + bh * D + row).to(ACC)
    v_row = tl.load(XV + bh * D + row).to(ACC)
    q_col = tl.load(XQ + bh * D + col).to(ACC)
    q_row = tl.load(XQ + bh * D + row).to(ACC)
    lr = tl.load(LR + bh).to(ACC)
    tok = tl.load(TOK + bh // NH).to(ACC)
    ln_w = tl.load(LNW + h * D + row).to(ACC)
    ln_b = tl.load(LNB + h * D + row).to(ACC)
    W = tl.load(W1 + bh * D * D + w_offs).to(ACC)
    b = tl.load(B1 + bh * D + row).to(ACC)

    # G' = G + lr·∇ℓ(W): ∇_W1 ℓ = k ⊗ g, ∇_b1 ℓ = g, g = ∂ℓ/∂(k·W1 + b1)
    z1 = tl.sum(k_col * W, axis=0, keep_dims=True) + b
    g = _ln_l2_bwd(z1, v_row - k_row, ln_w, ln_b, EPS)
    gw = tl.load(GW1 + bh * D * D + w_offs).to(ACC) + lr * (k_col * g)
    gb = tl.load(GB1 + bh * D + row).to(ACC) + lr * g
    W_bar = W - tok * gw
    b_bar = b - tok * gb
    z = q_row + _ln_fwd(tl.sum(q_col * W_bar, axis=0, keep_dims=True) + b_bar, ln_w, ln_b, EPS)

    tl.store(Z + bh * D + row, z.to(Z.dtype.element_ty))
    tl.store(GW1_OUT + bh * D * D + w_offs, gw.to(GW1_OUT.dtype.element_ty))
    tl.store(GB1_OUT + bh * D + row, gb.to(GB1_OUT.dtype.element_ty))
    tl.store(W1_BAR + bh * D * D + w_offs, W_bar.to(W1_BAR.dtype.element_ty))
    tl.store(B1_BAR + bh * D + row, b_bar.to(B1_BAR.dtype.element_ty))


@triton.jit
def ttt_mlp_decode_kernel(
    XQ, XK, XV, LR, TOK,  # (B,H,D) x3, (B,H), (B,)
    W1, B1, W2, B2, GW1, GB1, GW2, GB2, LNW, LNB,
    Z, GW1_OUT, GB1_OUT, GW2_OUT, GB2_OUT, W1_BAR, B1_BAR, W2_BAR, B2_BAR,
    NH,
    D: tl.constexpr, HID: tl.constexpr, HB: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
):  # fmt: skip
    """One token of TTT-MLP, HB hidden units at a time (hidden units are independent given g2)."""
    bh = tl.program_id(0).to(tl.int64)
    h = bh % NH
    cols = tl.arange(0, D)
    row = cols[None, :]
    col = cols[:, None]

    k_col = tl.load(XK + bh * D + col).to(ACC)
    k_row = tl.load(XK + bh * D + row).to(ACC)
    v_row = tl.load(XV + bh * D + row).to(ACC)
    q_col = tl.load(XQ + bh * D + col).to(ACC)
    q_row = tl.load(XQ + bh * D + row).to(ACC)
    lr = tl.load(LR + bh).to(ACC)
    tok = tl.load(TOK + bh // NH).to(ACC)
    ln_w = tl.load(LNW + h * D + row).to(ACC)
    ln_b = tl.load(LNB + h * D + row).to(ACC)
    W1_base = W1 + bh * D * HID
    W2_base = W2 + bh * HID * D

    # pass 1: the key through the start weights, z2 = gelu(k·W1 + b1)·W2 + b2, then g2 = ∂ℓ/∂z2
    z2 = tl.load(B2 + bh * D + row).to(ACC)
    for c in range(0, HID, HB):
        hc = c + tl.arange(0, HB)
        z1 = tl.sum(k_col * tl.load(W1_base + col * HID + hc[None, :]).to(ACC), axis=0, keep_dims=True)
        z1 += tl.load(B1 + bh * HID + hc[None, :]).to(ACC)
        W2c = tl.load(W2_base + hc[:, None] * D + row).to(ACC)
        z2 += tl.sum(tl.trans(_gelu_tanh(z1)) * W2c, axis=0, keep_dims=True)
    g2 = _ln_l2_bwd(z2, v_row - k_row, ln_w, ln_b, EPS)
    gb2 = tl.load(GB2 + bh * D + row).to(ACC) + lr * g2
    b2_bar = tl.load(B2 + bh * D + row).to(ACC) - tok * gb2

    # pass 2, per hidden block: G' = G + lr·∇ℓ, W̄ = W − tok·G', and the query through W̄1, W̄2
    z2_q = b2_bar
    for c in range(0, HID, HB):
        hc = c + tl.arange(0, HB)
        w1_offs = bh * D * HID + col * HID + hc[None, :]  # (D, HB)
        w2_offs = bh * HID * D + hc[:, None] * D + row  # (HB, D)
        b1_offs = bh * HID + hc[None, :]
        W1c = tl.load(W1 + w1_offs).to(ACC)
        b1c = tl.load(B1 + b1_offs).to(ACC)
        W2c = tl.load(W2 + w2_offs).to(ACC)
        z1 = tl.sum(k_col * W1c, axis=0, keep_dims=True) + b1c
        x2 = _gelu_tanh(z1)
        g1 = tl.trans(tl.sum(W2c * g2, axis=1, keep_dims=True)) * _gelu_tanh_grad(z1)  # ∂ℓ/∂z1, (1, HB)

        gw1 = tl.load(GW1 + w1_offs).to(ACC) + lr * (k_col * g1)
        gb1 = tl.load(GB1 + b1_offs).to(ACC) + lr * g1
        gw2 = tl.load(GW2 + w2_offs).to(ACC) + lr * (tl.trans(x2) * g2)
        W1_bar = W1c - tok * gw1
        b1_bar = b1c - tok * gb1
        W2_bar = W2c - tok * gw2
        tl.store(GW1_OUT + w1_offs, gw1.to(GW1_OUT.dtype.element_ty))
        tl.store(GB1_OUT + b1_offs, gb1.to(GB1_OUT.dtype.element_ty))
        tl.store(GW2_OUT + w2_offs, gw2.to(GW2_OUT.dtype.element_ty))
        tl.store(W1_BAR + w1_offs, W1_bar.to(W1_BAR.dtype.element_ty))
        tl.store(B1_BAR + b1_offs, b1_bar.to(B1_BAR.dtype.element_ty))
        tl.store(W2_BAR + w2_offs, W2_bar.to(W2_BAR.dtype.element_ty))

        x2_q = _gelu_tanh(tl.sum(q_col * W1_bar, axis=0, keep_dims=True) + b1_bar)
        z2_q += tl.sum(tl.trans(x2_q) * W2_bar, axis=0, keep_dims=True)

    z = q_row + _ln_fwd(z2_q, ln_w, ln_b, EPS)
    tl.store(Z + bh * D + row, z.to(Z.dtype.element_ty))
    tl.store(GB2_OUT + bh * D + row, gb2.to(GB2_OUT.dtype.element_ty))
    tl.store(B2_BAR + bh * D + row, b2_bar.to(B2_BAR.dtype.element_ty))
