"""The TTT layers' native CPU kernels (``csrc/ttt.c``): one decode token of TTT-Linear / TTT-MLP with the
inner LayerNorm, and their dual form over whole mini-batches (prefill without autograd).

Built, cached and loaded by ``seqzoo.native`` at the first use; every function validates what the
kernel will read (shapes, float32 CPU, contiguity) and raises instead of passing it on. Each is
tested against the layers' torch paths (tests/test_native.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from seqzoo import native
from seqzoo.native import F32, I64, PTR, address, require_float32_cpu

__all__ = ["LIB", "MAX_DIM", "ttt_linear_token", "ttt_mlp_token", "ttt_linear_dual", "ttt_mlp_dual",
           "ttt_linear_dual_bwd", "ttt_mlp_dual_bwd"]

MAX_DIM = 1024  # MAX_DIM of csrc/ttt.c: the longest head the decode kernels take

LIB = native.Library("ttt", [Path(__file__).parent / "csrc" / "ttt.c"], {
    "sz_ttt_linear_dual": (native.I32, [I64] * 5 + [PTR] * 3 + [I64] * 3 + [PTR] * 4 + [F32] + [PTR] * 3 + [I64] * 2),
    "sz_ttt_mlp_dual": (native.I32, [I64] * 5 + [PTR] * 3 + [I64] * 3 + [PTR] * 4 + [F32] + [PTR] * 5 + [I64] * 2),
    "sz_ttt_linear_dual_bwd": (native.I32, [I64] * 5 + [PTR] * 3 + [I64] * 3 + [PTR] * 4 + [F32] + [PTR] * 12 + [I64] * 2),
    "sz_ttt_mlp_dual_bwd": (native.I32, [I64] * 5 + [PTR] * 3 + [I64] * 3 + [PTR] * 4 + [F32] + [PTR] * 10 + [I64] * 2),
    "sz_ttt_mlp_token": (native.I32, [I64] * 4 + [PTR] * 6 + [F32, PTR, PTR, I64] + [PTR] * 10
                         + [F32, PTR, PTR, F32] + [PTR] * 9),
    "sz_ttt_linear_token": (native.I32, [I64] * 4 + [PTR] * 6 + [F32, PTR, PTR, I64] + [PTR] * 6
                            + [F32, PTR, PTR, F32] + [PTR] * 5),
})


def _token_inputs(name: str, q: Tensor, x: Tensor, p: int, named: list[tuple[str, Tensor, tuple]], ln_w: Tensor,
                  ln_b: Tensor, lr_w, lr_b, rope, token_idx, post_w, post_b) -> list[Tensor | None]:
    """Validate a TTT decode kernel's inputs: q (B, H, d), x (B, C), the named (tensor, shape) pairs (k
    and v first, then the weights), and the per-head / optional ones. Returns, contiguous (None stays
    None): q, k, v, x, the weights, ln_w, ln_b, lr_w, lr_b, rope, token_idx, post_w, post_b."""
    Bsz, H, d = q.shape
    C = x.shape[-1]
    n_rope = rope.shape[0] if rope is not None else 0
    n_tok = token_idx.shape[0] if token_idx is not None else 0
    labels = ("x", *(n for n, _, _ in named), "ln_w", "ln_b", "lr_w", "lr_b", "rope", "token_idx", "post_w", "post_b")
    tensors = (x, *(t for _, t, _ in named), ln_w, ln_b, lr_w, lr_b, rope, token_idx, post_w, post_b)
    want = ((Bsz, H * d), *(s for _, _, s in named), (H, d), (H, d), (H, 1, C), (H, 1), (n_rope, d // 2, 2),
            (n_tok,), (C,), (C,))
    got = tuple(None if t is None else t.shape for t in tensors)
    if got != tuple(None if t is None else w for t, w in zip(tensors, want)) or (lr_w is None) != (lr_b is None) or (
            rope is not None and not 0 <= p < n_rope) or (token_idx is not None and not 0 <= p < n_tok):
        wrong = {n: tuple(g) for n, g, w, t in zip(labels, got, want, tensors) if t is not None and g != w}
        expected = {n: tuple(w) for n, w, t in zip(labels, want, tensors) if t is not None}
        raise ValueError(f"{name}: for q {tuple(q.shape)} and x {tuple(x.shape)}, got shapes {wrong} "
                         f"(expected {expected}), position {p}")
    if d > MAX_DIM or (rope is not None and d % 2):
        raise ValueError(f"{name}: head_dim {d} must be at most {MAX_DIM} (and even with RoPE)")
    require_float32_cpu(name, {"q": q, **dict(zip(labels, tensors))})
    # the callers bind every returned tensor to a name, alive until their kernel call returns
    q, x, k, v, *rest = (None if t is None else t.contiguous() for t in (q, *tensors))
    return [q, k, v, x, *rest]


def ttt_linear_token(q: Tensor, k: Tensor, v: Tensor, x: Tensor, lr_w: Tensor | None, lr_b: Tensor | None,
                     lr_base: float, rope: Tensor | None, token_idx: Tensor | None, p: int, W: Tensor, b: Tensor,
                     GW: Tensor, Gb: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, commit: bool,
                     post_norm: tuple[Tensor, Tensor, float] | None = None,
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """One TTT-Linear token with the inner LayerNorm (as ``TTTLayer.step`` with ``ttt_linear_step``):
    q, k, v (B, H, d) before RoPE; x (B, C) the layer input, lr_w (H, 1, C) / lr_b (H, 1) the η gate
    (None: the gate is ``lr_base``), ``lr_base`` = ttt_base_lr / d; rope (b, d/2, 2) the (cos, sin)
    of the positions in a mini-batch, or None; token_idx (b,) the learnable offsets or None, p the
    position in the mini-batch; W/GW (B, H, d, d), b/Gb (B, H, 1, d), ln_w/ln_b (H, d);
    ``post_norm`` = (weight (C,), bias (C,), eps): the layer's output LayerNorm, applied to each
    batch element's z. Returns Z (B, H, d), G'_W, G'_b and, when ``commit``, W̄ and b̄ (else None)."""
    Bsz, H, d = q.shape
    post_w, post_b, post_eps = post_norm if post_norm is not None else (None, None, 0.0)
    q, k, v, x, W, b, GW, Gb, ln_w, ln_b, lr_w, lr_b, rope, token_idx, post_w, post_b = _token_inputs(
        "ttt_linear_token", q, x, p,
        [("k", k, q.shape), ("v", v, q.shape), ("W", W, (Bsz, H, d, d)), ("b", b, (Bsz, H, 1, d)),
         ("GW", GW, (Bsz, H, d, d)), ("Gb", Gb, (Bsz, H, 1, d))],
        ln_w, ln_b, lr_w, lr_b, rope, token_idx, post_w, post_b)
    rows = (Bsz, H * d)
    Z, GW, Gb, W, b = _ttt_linear_token(q.view(rows), k.view(rows), v.view(rows), x, H, lr_w, lr_b, lr_base, rope,
                                        token_idx, p, W, b, GW, Gb, ln_w, ln_b, eps, commit, post_w, post_b, post_eps)
    return Z.view(Bsz, H, d), GW, Gb, W, b


def _ttt_linear_token(q, k, v, x, H, lr_w, lr_b, lr_base, rope, token_idx, p, W, b, GW, Gb, ln_w, ln_b, eps, commit,
                      post_w, post_b, post_eps):
    """The kernel call of ``ttt_linear_token`` on inputs its caller has checked as ``_token_inputs`` does
    (shapes, float32 CPU, contiguous, the position inside the tables), with q, k, v as rows (B, H·d) of
    H heads; Z comes back as such rows."""
    Bsz, C = q.shape
    d = C // H
    ptr = address
    Z = torch.empty_like(q)
    GW_out, Gb_out = torch.empty_like(GW), torch.empty_like(Gb)
    W_out = torch.empty_like(W) if commit else None
    b_out = torch.empty_like(b) if commit else None
    status = LIB.sz_ttt_linear_token(
        Bsz * H, H, d, x.shape[-1], q.data_ptr(), k.data_ptr(), v.data_ptr(), x.data_ptr(), ptr(lr_w), ptr(lr_b),
        lr_base, ptr(rope), ptr(token_idx), p, W.data_ptr(), b.data_ptr(), GW.data_ptr(), Gb.data_ptr(),
        ln_w.data_ptr(), ln_b.data_ptr(), eps, ptr(post_w), ptr(post_b), post_eps, Z.data_ptr(), GW_out.data_ptr(),
        Gb_out.data_ptr(), ptr(W_out), ptr(b_out))
    if status:
        raise RuntimeError(f"ttt_linear_token: the kernel refused head_dim {d}")
    return Z, GW_out, Gb_out, W_out, b_out


def ttt_mlp_token(q: Tensor, k: Tensor, v: Tensor, x: Tensor, lr_w: Tensor | None, lr_b: Tensor | None,
                  lr_base: float, rope: Tensor | None, token_idx: Tensor | None, p: int, W: list[Tensor],
                  G: list[Tensor], ln_w: Tensor, ln_b: Tensor, eps: float, commit: bool,
                  post_norm: tuple[Tensor, Tensor, float] | None = None,
                  ) -> tuple[Tensor, list[Tensor], list[Tensor] | None]:
    """One TTT-MLP token with the inner LayerNorm (as ``TTTLayer.step`` with ``ttt_mlp_step``), the other
    arguments as ``ttt_linear_token``: W = [W1 (B, H, d, 4d), b1 (B, H, 1, 4d), W2 (B, H, 4d, d),
    b2 (B, H, 1, d)] and G their accumulated gradients. Returns Z (B, H, d), G' (a list like G) and,
    when ``commit``, W̄ (a list like W, else None)."""
    Bsz, H, d = q.shape
    F = 4 * d
    post_w, post_b, post_eps = post_norm if post_norm is not None else (None, None, 0.0)
    if len(W) != 4 or len(G) != 4:
        raise ValueError(f"ttt_mlp_token: expected W = [W1, b1, W2, b2] and G likewise, got {len(W)} and {len(G)}")
    shapes = [(Bsz, H, d, F), (Bsz, H, 1, F), (Bsz, H, F, d), (Bsz, H, 1, d)]
    names = ("W1", "b1", "W2", "b2")
    checked = _token_inputs(
        "ttt_mlp_token", q, x, p,
        [("k", k, q.shape), ("v", v, q.shape), *zip(names, W, shapes), *zip(("G" + n for n in names), G, shapes)],
        ln_w, ln_b, lr_w, lr_b, rope, token_idx, post_w, post_b)
    q, k, v = (t.view(Bsz, H * d) for t in checked[:3])
    x = checked[3]
    ln_w, ln_b, lr_w, lr_b, rope, token_idx, post_w, post_b = checked[12:]
    Z, G_out, W_out = _ttt_mlp_token(q, k, v, x, H, lr_w, lr_b, lr_base, rope, token_idx, p, checked[4:8], checked[8:12],
                                     ln_w, ln_b, eps, commit, post_w, post_b, post_eps)
    return Z.view(Bsz, H, d), G_out, W_out


def _ttt_mlp_token(q, k, v, x, H, lr_w, lr_b, lr_base, rope, token_idx, p, W, G, ln_w, ln_b, eps, commit, post_w,
                   post_b, post_eps):
    """The kernel call of ``ttt_mlp_token`` on inputs its caller has checked as ``_token_inputs`` does, with
    q, k, v as rows (B, H·d) of H heads; Z comes back as such rows."""
    Bsz, C = q.shape
    d = C // H
    ptr = address
    Z = torch.empty_like(q)
    G_out = [torch.empty_like(t) for t in G]
    W_out = [torch.empty_like(t) for t in W] if commit else None
    status = LIB.sz_ttt_mlp_token(
        Bsz * H, H, d, x.shape[-1], q.data_ptr(), k.data_ptr(), v.data_ptr(), x.data_ptr(), ptr(lr_w), ptr(lr_b),
        lr_base, ptr(rope), ptr(token_idx), p, *(t.data_ptr() for t in W), *(t.data_ptr() for t in G),
        ln_w.data_ptr(), ln_b.data_ptr(), eps, ptr(post_w), ptr(post_b), post_eps, Z.data_ptr(),
        *(t.data_ptr() for t in G_out), *(ptr(t) for t in (W_out or [None] * 4)))
    if status:
        raise MemoryError("ttt_mlp_token: the kernel could not allocate its workspace")
    return Z, G_out, W_out


def _dual_inputs(name: str, XQ: Tensor, XK: Tensor, XV: Tensor, lr: Tensor, tok: Tensor, weights: dict,
                 ln_w: Tensor, ln_b: Tensor, mini_batch_size: int) -> tuple:
    """Validate the dual-form kernels' inputs (weights: name -> (tensor, expected shape)); returns XQ, XK,
    XV with shared strides and unit stride within a head, and the other inputs contiguous."""
    Bsz, H, T, d = XQ.shape
    bs = mini_batch_size
    expected = [(XK, XQ.shape), (XV, XQ.shape), (lr, (Bsz, H, T)), (tok, (bs,)), (ln_w, (H, d)), (ln_b, (H, d)),
                *weights.values()]
    wrong = [tuple(t.shape) for t, shape in expected if t.shape != shape]
    if wrong or bs < 1 or T % bs:
        raise ValueError(f"{name}: for XQ {tuple(XQ.shape)} and mini-batches of {bs}, got shapes {wrong} "
                         f"(expected {[tuple(s) for _, s in expected]}; T a multiple of b)")
    require_float32_cpu(name, dict(XQ=XQ, XK=XK, XV=XV, lr=lr, tok=tok, ln_w=ln_w, ln_b=ln_b,
                                    **{k: t for k, (t, _) in weights.items()}))
    if XQ.stride(-1) != 1 or XK.stride() != XQ.stride() or XV.stride() != XQ.stride():
        XQ, XK, XV = XQ.contiguous(), XK.contiguous(), XV.contiguous()
    return XQ, XK, XV, lr.contiguous(), tok.contiguous(), ln_w.contiguous(), ln_b.contiguous()


def ttt_linear_dual(XQ: Tensor, XK: Tensor, XV: Tensor, lr: Tensor, tok: Tensor, W: Tensor, b: Tensor,
                    ln_w: Tensor, ln_b: Tensor, mini_batch_size: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """TTT-Linear with the inner LayerNorm over whole mini-batches, dual form, without autograd (as
    ``seqzoo_plugins.ttt.linear.ttt_linear_dual`` for T a multiple of b): XQ, XK, XV (B, H, T, d) after
    RoPE, lr (B, H, T), tok (b,), W (B, H, d, d), b (B, H, 1, d), ln_w/ln_b (H, d). Returns Z (B, H, T, d)
    (a view of a (B, T, H, d) tensor, the layout the output projection reads) and the new W and b."""
    Bsz, H, T, d = XQ.shape
    XQ, XK, XV, lr, tok, ln_w, ln_b = _dual_inputs(
        "ttt_linear_dual", XQ, XK, XV, lr, tok, {"W": (W, (Bsz, H, d, d)), "b": (b, (Bsz, H, 1, d))}, ln_w, ln_b,
        mini_batch_size)
    W_out, b_out = (t.clone(memory_format=torch.contiguous_format) for t in (W, b))
    Z = XQ.new_empty((Bsz, T, H, d))
    sB, sH, sT, _ = XQ.stride()
    args = (Bsz, H, T, d, mini_batch_size, XQ.data_ptr(), XK.data_ptr(), XV.data_ptr(), sB, sH, sT, lr.data_ptr(),
            tok.data_ptr(), ln_w.data_ptr(), ln_b.data_ptr(), eps, W_out.data_ptr(), b_out.data_ptr(), Z.data_ptr())
    if any(native.over_rows(lambda lo, hi: LIB.sz_ttt_linear_dual(*args, lo, hi), Bsz * H)):
        raise MemoryError("ttt_linear_dual: the kernel could not allocate its workspace")
    return Z.transpose(1, 2), W_out, b_out


def ttt_mlp_dual(XQ: Tensor, XK: Tensor, XV: Tensor, lr: Tensor, tok: Tensor, W1: Tensor, b1: Tensor, W2: Tensor,
                 b2: Tensor, ln_w: Tensor, ln_b: Tensor, mini_batch_size: int,
                 eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """TTT-MLP with the inner LayerNorm over whole mini-batches, dual form, without autograd (as
    ``seqzoo_plugins.ttt.mlp.ttt_mlp_dual`` for T a multiple of b): W1 (B, H, d, 4d), b1 (B, H, 1, 4d),
    W2 (B, H, 4d, d), b2 (B, H, 1, d), the rest as ``ttt_linear_dual``. Returns Z (B, H, T, d) (a view
    of a (B, T, H, d) tensor) and the new W1, b1, W2, b2."""
    Bsz, H, T, d = XQ.shape
    F = 4 * d
    XQ, XK, XV, lr, tok, ln_w, ln_b = _dual_inputs(
        "ttt_mlp_dual", XQ, XK, XV, lr, tok,
        {"W1": (W1, (Bsz, H, d, F)), "b1": (b1, (Bsz, H, 1, F)), "W2": (W2, (Bsz, H, F, d)), "b2": (b2, (Bsz, H, 1, d))},
        ln_w, ln_b, mini_batch_size)
    W1_out, b1_out, W2_out, b2_out = (t.clone(memory_format=torch.contiguous_format) for t in (W1, b1, W2, b2))
    Z = XQ.new_empty((Bsz, T, H, d))
    sB, sH, sT, _ = XQ.stride()
    args = (Bsz, H, T, d, mini_batch_size, XQ.data_ptr(), XK.data_ptr(), XV.data_ptr(), sB, sH, sT, lr.data_ptr(),
            tok.data_ptr(), ln_w.data_ptr(), ln_b.data_ptr(), eps, W1_out.data_ptr(), b1_out.data_ptr(),
            W2_out.data_ptr(), b2_out.data_ptr(), Z.data_ptr())
    if any(native.over_rows(lambda lo, hi: LIB.sz_ttt_mlp_dual(*args, lo, hi), Bsz * H)):
        raise MemoryError("ttt_mlp_dual: the kernel could not allocate its workspace")
    return Z.transpose(1, 2), W1_out, b1_out, W2_out, b2_out


def _bwd_outputs(XQ: Tensor, lr: Tensor, tok: Tensor, ln_w: Tensor, dZ: Tensor, mini_batch_size: int):
    """The backward kernels' gradient buffers and dZ in the (B, T, H, d) layout the forward wrote Z in:
    (dZ, dXQ, dXK, dXV, dlr, dtok per head, dgamma per head, dbeta per head)."""
    Bsz, H, T, d = XQ.shape
    dXQ, dXK, dXV = (XQ.new_empty((Bsz, H, T, d)) for _ in range(3))
    return (dZ.transpose(1, 2).contiguous(), dXQ, dXK, dXV, lr.new_empty((Bsz, H, T)),
            tok.new_empty((Bsz * H, mini_batch_size)), ln_w.new_empty((Bsz, H, d)), ln_w.new_empty((Bsz, H, d)))


def ttt_linear_dual_bwd(XQ: Tensor, XK: Tensor, XV: Tensor, lr: Tensor, tok: Tensor, W0: Tensor, b0: Tensor,
                        ln_w: Tensor, ln_b: Tensor, mini_batch_size: int, eps: float, dZ: Tensor, dW: Tensor,
                        db: Tensor) -> tuple[Tensor, ...]:
    """The backward of ``ttt_linear_dual`` (its inputs, W0/b0 the start weights): dZ (B, H, T, d) the
    gradient of Z, dW/db that of the end weights. Returns the gradients of XQ, XK, XV, lr, tok, W0, b0,
    ln_w, ln_b, in their shapes."""
    Bsz, H, T, d = XQ.shape
    XQ, XK, XV, lr, tok, ln_w, ln_b = _dual_inputs(
        "ttt_linear_dual_bwd", XQ, XK, XV, lr, tok,
        {"W0": (W0, (Bsz, H, d, d)), "b0": (b0, (Bsz, H, 1, d)), "dW": (dW, (Bsz, H, d, d)),
         "db": (db, (Bsz, H, 1, d)), "dZ": (dZ, (Bsz, H, T, d))}, ln_w, ln_b, mini_batch_size)
    W0, b0 = W0.contiguous(), b0.contiguous()
    dW, db = (t.clone(memory_format=torch.contiguous_format) for t in (dW, db))
    dZ, dXQ, dXK, dXV, dlr, dtok, dgamma, dbeta = _bwd_outputs(XQ, lr, tok, ln_w, dZ, mini_batch_size)
    sB, sH, sT, _ = XQ.stride()
    args = (Bsz, H, T, d, mini_batch_size, XQ.data_ptr(), XK.data_ptr(), XV.data_ptr(), sB, sH, sT, lr.data_ptr(),
            tok.data_ptr(), ln_w.data_ptr(), ln_b.data_ptr(), eps, W0.data_ptr(), b0.data_ptr(), dZ.data_ptr(),
            dW.data_ptr(), db.data_ptr(), dXQ.data_ptr(), dXK.data_ptr(), dXV.data_ptr(), dlr.data_ptr(),
            dtok.data_ptr(), dgamma.data_ptr(), dbeta.data_ptr())
    # the heads are independent: one range of them per thread
    if any(native.over_rows(lambda lo, hi: LIB.sz_ttt_linear_dual_bwd(*args, lo, hi), Bsz * H)):
        mb = (T // mini_batch_size + 1) * d * d * 4 / 2**20
        raise MemoryError(f"ttt_linear_dual_bwd: the kernel could not allocate {mb:.0f} MB")
    return dXQ, dXK, dXV, dlr, dtok.sum(0), dW, db, dgamma.sum(0), dbeta.sum(0)


def ttt_mlp_dual_bwd(XQ: Tensor, XK: Tensor, XV: Tensor, lr: Tensor, tok: Tensor, W1: Tensor, b1: Tensor, W2: Tensor,
                     b2: Tensor, ln_w: Tensor, ln_b: Tensor, mini_batch_size: int, eps: float, dZ: Tensor,
                     dW1: Tensor, db1: Tensor, dW2: Tensor, db2: Tensor) -> tuple[Tensor, ...]:
    """The backward of ``ttt_mlp_dual`` (its inputs, W1..b2 the start weights): dZ (B, H, T, d) the gradient
    of Z, dW1..db2 that of the end weights. Returns the gradients of XQ, XK, XV, lr, tok, W1, b1, W2, b2,
    ln_w, ln_b, in their shapes."""
    Bsz, H, T, d = XQ.shape
    F = 4 * d
    shapes = [(Bsz, H, d, F), (Bsz, H, 1, F), (Bsz, H, F, d), (Bsz, H, 1, d)]
    named = {**{n: (t, s) for n, t, s in zip(("W1", "b1", "W2", "b2"), (W1, b1, W2, b2), shapes)},
             **{n: (t, s) for n, t, s in zip(("dW1", "db1", "dW2", "db2"), (dW1, db1, dW2, db2), shapes)},
             "dZ": (dZ, (Bsz, H, T, d))}
    XQ, XK, XV, lr, tok, ln_w, ln_b = _dual_inputs("ttt_mlp_dual_bwd", XQ, XK, XV, lr, tok, named, ln_w, ln_b,
                                                   mini_batch_size)
    pack = lambda ts: torch.cat([t.reshape(Bsz, H, -1) for t in ts], dim=-1).contiguous()  # (B, H, 2dF + F + d)
    W0, dW = pack((W1, b1, W2, b2)), pack((dW1, db1, dW2, db2))
    dZ, dXQ, dXK, dXV, dlr, dtok, dgamma, dbeta = _bwd_outputs(XQ, lr, tok, ln_w, dZ, mini_batch_size)
    sB, sH, sT, _ = XQ.stride()
    args = (Bsz, H, T, d, mini_batch_size, XQ.data_ptr(), XK.data_ptr(), XV.data_ptr(), sB, sH, sT, lr.data_ptr(),
            tok.data_ptr(), ln_w.data_ptr(), ln_b.data_ptr(), eps, W0.data_ptr(), dZ.data_ptr(), dW.data_ptr(),
            dXQ.data_ptr(), dXK.data_ptr(), dXV.data_ptr(), dlr.data_ptr(), dtok.data_ptr(), dgamma.data_ptr(),
            dbeta.data_ptr())
    if any(native.over_rows(lambda lo, hi: LIB.sz_ttt_mlp_dual_bwd(*args, lo, hi), Bsz * H)):
        mb = (T // mini_batch_size + 1) * W0.shape[-1] * 4 / 2**20
        raise MemoryError(f"ttt_mlp_dual_bwd: the kernel could not allocate {mb:.0f} MB")
    sizes = [d * F, F, F * d, d]
    grads = [g.reshape(s) for g, s in zip(dW.split(sizes, dim=-1), shapes)]
    return (dXQ, dXK, dXV, dlr, dtok.sum(0), *grads, dgamma.sum(0), dbeta.sum(0))
