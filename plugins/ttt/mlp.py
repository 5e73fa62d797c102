"""TTT-MLP: the inner model is f(x) = x + LN(gelu_tanh(x·W1 + b1)·W2 + b2), hidden 4·head_dim.

Per head, for a mini-batch with start weights (W1, b1, W2, b2), tokens i, j = 1..b:
    Z1_j = XK_j·W1 + b1,  X2_j = gelu(Z1_j),  Z2_j = X2_j·W2 + b2
    g2_j = ∂ℓ_j/∂Z2_j (LN fused with the L2 loss to XV_j − XK_j),  g1_j = (g2_j·W2ᵀ) ⊙ gelu'(Z1_j)
    Z̄1_i = XQ_i·W1 + b1 − Σ_{j≤i} η[i, j](XQ_i·XK_j + 1) g1_j,   X̄2_i = gelu(Z̄1_i)
    Z̄2_i = X̄2_i·W2 + b2 − Σ_{j≤i} η[i, j](X̄2_i·X2_j + 1) g2_j,   z_i = XQ_i + LN(Z̄2_i)
With ``inner_norm=False``: f(x) = gelu(x·W1)·W2 (no biases, no LN, no residual), g2_j = Z2_j − XV_j.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from seqzoo.learner import GradientLearner, TTTConfig
from seqzoo.nn import gelu_tanh

from . import native_kernels, scan_grad
from .common import InnerNormTTT, gelu_tanh_grad_into, gelu_tanh_into, kernel, ln_l2_bwd_centered
from .reference import LN_EPS, causal_eta, ln_fwd

__all__ = ["MLPLearner", "TTTMLP", "TTTMLPConfig", "ttt_mlp_dual", "ttt_mlp_chunk"]


@dataclass
class TTTMLPConfig(TTTConfig):
    ttt_base_lr: float = field(default=0.1, metadata={"help": "base inner learning rate (η = base·gate/d)"})


class MLPLearner(GradientLearner):
    """f(x) = x + LN(gelu_tanh(x·W1 + b1)·W2 + b2) per head, hidden 4·head_dim (TTT-MLP)."""

    Config = TTTMLPConfig

    def __init__(self, head_dim: int, **config):
        super().__init__(head_dim, **config)
        self.inner_norm = config.get("inner_norm", True)

    @classmethod
    def layer_class(cls) -> type:
        return TTTMLP

    def init_params(self) -> dict[str, Tensor]:
        d = self.head_dim
        params = {"W1": torch.normal(0.0, 0.02, size=(d, 4 * d))}
        if self.inner_norm:
            params["b1"] = torch.zeros(1, 4 * d)
        params["W2"] = torch.normal(0.0, 0.02, size=(4 * d, d))
        if self.inner_norm:
            params["b2"] = torch.zeros(1, d)
        return params

    def init_outer_params(self) -> dict[str, Tensor]:
        if not self.inner_norm:
            return {}
        return {"ttt_norm_weight": torch.ones(self.head_dim), "ttt_norm_bias": torch.zeros(self.head_dim)}

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        if not self.inner_norm:
            return gelu_tanh(x @ params["W1"]) @ params["W2"]
        z = gelu_tanh(x @ params["W1"] + params["b1"][0]) @ params["W2"] + params["b2"][0]
        return x + F.layer_norm(z, z.shape, params["ttt_norm_weight"], params["ttt_norm_bias"], eps=LN_EPS)


def _affine(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    return torch.baddbmm(b, x, W) if b is not None else torch.bmm(x, W)


def _mlp_grads(XK, XV, W1, b1, W2, b2, ln_w, ln_b):
    """Forward and backward of the inner model on the keys: X2, g1 = ∂ℓ/∂Z1, g2 = ∂ℓ/∂Z2."""
    Z1 = _affine(XK, W1, b1)
    X2 = gelu_tanh(Z1)
    Z2 = _affine(X2, W2, b2)
    if ln_w is not None:  # the LayerNorm backward fused with the L2 loss, in three kernels
        g2 = ln_l2_bwd_centered(Z2, torch.addcmul(ln_w * ln_b, ln_w, XK - XV), ln_w * ln_w)
    else:
        g2 = Z2 - XV
    # g1 = (g2·W2ᵀ) ⊙ gelu'(Z1), in one kernel
    g1 = torch.ops.aten.gelu_backward(torch.bmm(g2, W2.transpose(-1, -2)), Z1, approximate="tanh")
    return X2, g1, g2


def ttt_mlp_chunk(XQ, XK, XV, lr, tok, W, G, ln_w, ln_b):
    """r tokens of one mini-batch from start weights W and accumulated gradients G (dicts of (N, ...)).

    Keys W1, W2 (and b1, b2 with the inner norm). Returns Z (N, r, d), W̄ of the last row, G updated.
    With r = 1 this is the primal form (W̄ = W − tokidx·G formed and applied).
    """
    norm = ln_w is not None
    X2, g1, g2 = _mlp_grads(XK, XV, W["W1"], W.get("b1"), W["W2"], W.get("b2"), ln_w, ln_b)
    lr_ = lr.unsqueeze(-1)
    G_new = {"W1": G["W1"] + XK.transpose(-1, -2) @ (lr_ * g1), "W2": G["W2"] + X2.transpose(-1, -2) @ (lr_ * g2)}
    if norm:
        G_new["b1"] = G["b1"] + (lr_ * g1).sum(-2, keepdim=True)
        G_new["b2"] = G["b2"] + (lr_ * g2).sum(-2, keepdim=True)
    W_last = {n: W[n] - tok[-1] * G_new[n] for n in W}
    if XQ.shape[1] == 1:  # primal
        X2_bar = gelu_tanh(_affine(XQ, W_last["W1"], W_last.get("b1")))
        Z2_bar = _affine(X2_bar, W_last["W2"], W_last.get("b2"))
    else:  # dual, with the gradients G accumulated before this chunk scaled by tok_i
        eta = causal_eta(tok, lr)
        row, one = tok[:, None], 1.0 if norm else 0.0
        Z1_bar = _affine(XQ, W["W1"], W.get("b1")) - row * (XQ @ G["W1"]) - (eta * (XQ @ XK.transpose(-1, -2) + one)) @ g1
        if norm:
            Z1_bar = Z1_bar - row * G["b1"]
        X2_bar = gelu_tanh(Z1_bar)
        Z2_bar = _affine(X2_bar, W["W2"], W.get("b2")) - row * (X2_bar @ G["W2"]) - (eta * (X2_bar @ X2.transpose(-1, -2) + one)) @ g2
        if norm:
            Z2_bar = Z2_bar - row * G["b2"]
    Z = XQ + ln_fwd(Z2_bar, ln_w, ln_b) if norm else Z2_bar
    return Z, W_last, G_new


def ttt_mlp_step(XQ, XK, XV, lr, tok, W, G, ln_w, ln_b, commit=True):
    """One token (N, 1, d) in the primal form, without forming W̄ = W − tok·G' unless ``commit``:
    x·(W − tok·G'_W) + (b − tok·G'_b) = (x·W + b) − tok·(x·G'_W + G'_b) for both layers.
    Returns Z (N, 1, d), W̄ (a dict, or None without ``commit``) and G' (as ``ttt_mlp_chunk``)."""
    norm = ln_w is not None
    X2, g1, g2 = _mlp_grads(XK, XV, W["W1"], W.get("b1"), W["W2"], W.get("b2"), ln_w, ln_b)
    lr_ = lr.unsqueeze(-1)
    lr_g1, lr_g2 = lr_ * g1, lr_ * g2
    G_new = {"W1": torch.baddbmm(G["W1"], XK.transpose(-1, -2), lr_g1),
             "W2": torch.baddbmm(G["W2"], X2.transpose(-1, -2), lr_g2)}
    if norm:
        G_new["b1"], G_new["b2"] = G["b1"] + lr_g1, G["b2"] + lr_g2
    X2_bar = gelu_tanh(_affine(XQ, W["W1"], W.get("b1")) - tok * _affine(XQ, G_new["W1"], G_new.get("b1")))
    Z2_bar = _affine(X2_bar, W["W2"], W.get("b2")) - tok * _affine(X2_bar, G_new["W2"], G_new.get("b2"))
    Z = XQ + ln_fwd(Z2_bar, ln_w, ln_b) if norm else Z2_bar
    W_last = {n: W[n] - tok * G_new[n] for n in W} if commit else None
    return Z, W_last, G_new


def ttt_mlp_dual(XQ, XK, XV, lr_eta, token_eta, W1, b1, W2, b2, ln_w, ln_b, mini_batch_size, checkpoint_group=0):
    """TTT-MLP over a sequence that starts at a mini-batch boundary with zero accumulated gradient.

    XQ/XK/XV (B, H, T, d) after RoPE, lr_eta (B, H, T), token_eta (b,), W1 (B, H, d, 4d), b1 (B, H, 1, 4d),
    W2 (B, H, 4d, d), b2 (B, H, 1, d), ln_w/ln_b (H, d) (biases and ln None: no inner norm). Returns
    Z (B, H, T, d) and (W1, b1, W2, b2) after the last full mini-batch. Same signature as the Triton kernel.
    """
    B, H, T, d = XQ.shape
    b, N = mini_batch_size, B * H
    n, norm = T // b, ln_w is not None
    flat = lambda t: t.reshape(N, *t.shape[2:]) if t is not None else None
    XQ, XK, XV, lr = flat(XQ), flat(XK), flat(XV), flat(lr_eta)
    W1, b1, W2, b2 = flat(W1), flat(b1), flat(W2), flat(b2)
    gamma = beta = None
    if norm:
        gamma = ln_w.unsqueeze(0).expand(B, H, d).reshape(N, 1, d)
        beta = ln_b.unsqueeze(0).expand(B, H, d).reshape(N, 1, d)
    Zs = []
    if n:
        e = n * b
        mb = lambda t: rearrange(t[:, :e], "N (n b) d -> n N b d", b=b)
        q, k, v = mb(XQ), mb(XK), mb(XV)
        eta = causal_eta(token_eta, rearrange(lr[:, :e], "N (n b) -> n N b", b=b))  # (n, N, b, b)
        if not torch.is_grad_enabled():
            Z, W1, b1, W2, b2 = _mlp_scan_no_grad(q, k, v, eta, W1, b1, W2, b2, gamma, beta, B)
            Zs.append(Z.reshape(B, e, H, d).transpose(1, 2).reshape(N, e, d))  # a view when B = 1
        else:
            one = 1.0 if norm else 0.0
            M1 = eta * (q @ k.transpose(-1, -2) + one)  # Z̄1 = XQ·W1 + b1 − M1·g1
            eta_last = eta[:, :, -1:, :]  # (n, N, 1, b)
            kT_last = (eta_last.transpose(-1, -2) * k).transpose(-1, -2)

            def run(lo, hi, W1, b1, W2, b2):
                out = []
                for i in range(lo, hi):
                    X2, g1, g2 = _mlp_grads(k[i], v[i], W1, b1, W2, b2, gamma, beta)
                    X2_bar = gelu_tanh(torch.baddbmm(_affine(q[i], W1, b1), M1[i], g1, alpha=-1.0))
                    M2 = eta[i] * (X2_bar @ X2.transpose(-1, -2) + one)
                    out.append(torch.baddbmm(_affine(X2_bar, W2, b2), M2, g2, alpha=-1.0))
                    eta_X2 = eta_last[i].transpose(-1, -2) * X2  # (N, b, 4d): η[b, j] X2_j
                    W1 = torch.baddbmm(W1, kT_last[i], g1, alpha=-1.0)
                    W2 = torch.baddbmm(W2, eta_X2.transpose(-1, -2), g2, alpha=-1.0)
                    if norm:
                        b1 = torch.baddbmm(b1, eta_last[i], g1, alpha=-1.0)
                        b2 = torch.baddbmm(b2, eta_last[i], g2, alpha=-1.0)
                return torch.stack(out), W1, b1, W2, b2

            group = checkpoint_group if checkpoint_group > 0 else n
            for lo in range(0, n, group):
                hi = min(lo + group, n)
                if group < n:
                    Z_bar, W1, b1, W2, b2 = torch.utils.checkpoint.checkpoint(
                        run, lo, hi, W1, b1, W2, b2, use_reentrant=False)
                else:
                    Z_bar, W1, b1, W2, b2 = run(lo, hi, W1, b1, W2, b2)
                Zs.append(Z_bar)
            Z_bar = rearrange(Zs[0] if len(Zs) == 1 else torch.cat(Zs), "n N b d -> N (n b) d")
            Zs = [XQ[:, :e] + ln_fwd(Z_bar, gamma, beta) if norm else Z_bar]
    if T > n * b:  # a trailing partial mini-batch: rows 1..r, weights unchanged
        s, r = n * b, T - n * b
        W = {"W1": W1, "W2": W2}
        if norm:
            W.update(b1=b1, b2=b2)
        Z, _, _ = ttt_mlp_chunk(XQ[:, s:], XK[:, s:], XV[:, s:], lr[:, s:], token_eta[:r], W,
                                {m: torch.zeros_like(w) for m, w in W.items()}, gamma, beta)
        Zs.append(Z)
    Z = (Zs[0] if len(Zs) == 1 else torch.cat(Zs, dim=1)) if Zs else XQ
    unflat = lambda t: t.reshape(B, H, *t.shape[1:]) if t is not None else None
    return unflat(Z), unflat(W1), unflat(b1), unflat(W2), unflat(b2)


def _mlp_scan_no_grad(q, k, v, eta, W1, b1, W2, b2, gamma, beta, batch):
    """The mini-batch loop of ``ttt_mlp_dual`` without autograd: q/k/v (n, N, b, d) with N = batch·H,
    eta (n, N, b, b). Returns z = XQ + LN(Z̄) (Z̄ without the inner norm) in the (batch, n, b, H, d)
    layout of the output projection's input, and the final W1, b1, W2, b2 (copies, updated in place).

    Everything that reads a mini-batch runs inside the loop, and every intermediate is written into one
    workspace that all mini-batches reuse: fresh (N, b, 4d) tensors would each cost page faults (glibc
    hands such sizes back to the OS) and arrive cold in cache. GELU and its derivative share tanh u
    (``gelu_tanh_into``)."""
    n, N, b, d = q.shape
    H = N // batch
    norm = gamma is not None
    W1, W2 = W1.clone(), W2.clone()
    b1, b2 = (b1.clone(), b2.clone()) if norm else (None, None)
    new = lambda *shape: q.new_empty(N, b, *shape)
    Z1, X2, G1, g1, Zq, X2_bar, scaled_g1, t, x_sq, scratch = (new(W1.shape[-1]) for _ in range(10))
    Z2, Z2_bar, scaled_g2, M1, M2 = new(d), new(d), new(d), new(b), new(b)
    final = q.new_empty(batch, n, b, H, d)
    one = q.new_ones(()) if norm else q.new_zeros(())
    if norm:
        gamma2, gamma_beta = gamma * gamma, gamma * beta
    affine = lambda x, W, bias, out: torch.baddbmm(bias, x, W, out=out) if norm else torch.bmm(x, W, out=out)
    for i in range(n):
        # forward and backward of the inner model on the keys at the mini-batch-start weights
        gelu_tanh_into(affine(k[i], W1, b1, Z1), X2, t, x_sq)
        affine(X2, W2, b2, Z2)
        if norm:
            g2 = ln_l2_bwd_centered(Z2, torch.addcmul(gamma_beta, gamma, k[i] - v[i]), gamma2)
        else:
            g2 = Z2.sub_(v[i])
        gelu_tanh_grad_into(torch.bmm(g2, W2.transpose(-1, -2), out=G1), Z1, t, x_sq, g1, scratch)
        # the dual form: Z̄1 = XQ·W1 + b1 − M1·g1,  Z̄2 = X̄2·W2 + b2 − M2·g2,  M = η ⊙ (·ᵀ + 1)
        torch.baddbmm(one, q[i], k[i].transpose(-1, -2), out=M1).mul_(eta[i])
        gelu_tanh_into(affine(q[i], W1, b1, Zq).baddbmm_(M1, g1, alpha=-1.0), X2_bar, t, x_sq)
        torch.baddbmm(one, X2_bar, X2.transpose(-1, -2), out=M2).mul_(eta[i])
        affine(X2_bar, W2, b2, Z2_bar).baddbmm_(M2, g2, alpha=-1.0)
        dest = final[:, i].transpose(1, 2)  # (batch, H, b, d)
        if norm:
            torch.add(ln_fwd(Z2_bar, gamma, beta).view(batch, H, b, d), q[i].view(batch, H, b, d), out=dest)
        else:
            dest.copy_(Z2_bar.view(batch, H, b, d))
        # W ← W − Σ_j η[b, j] ∇ℓ_j: the gradients scaled by the last row of η
        last = eta[i, :, -1:, :]  # (N, 1, b)
        torch.mul(g1, last.transpose(-1, -2), out=scaled_g1)
        torch.mul(g2, last.transpose(-1, -2), out=scaled_g2)
        W1.baddbmm_(k[i].transpose(-1, -2), scaled_g1, alpha=-1.0)
        W2.baddbmm_(X2.transpose(-1, -2), scaled_g2, alpha=-1.0)
        if norm:
            b1.baddbmm_(last, g1, alpha=-1.0)
            b2.baddbmm_(last, g2, alpha=-1.0)
    return final, W1, b1, W2, b2


class TTTMLP(InnerNormTTT):
    """TTT-MLP (Sun et al. 2024): hidden state W1, b1, W2, b2 of a two-layer MLP with LN and residual.

    ``forward`` runs the dual form, ``step`` the primal form. Equal to ttt-lm-pytorch's ``TTTMLP``.

    Which path runs when, and what ties it to the readable math (``reference.ttt_mlp_reference``,
    ``ttt_mlp_decode_reference``): the same table as ``TTTLinear``'s — torch dual form with and without
    autograd (test_torch_dual_form_equals_the_reference), native C prefill on float32 CPU without
    autograd (test_native_dual_form_equals_the_reference), native C training on float32 CPU with autograd
    (the prefill kernel and ``scan_grad``'s backward kernel: test_ttt_backward), torch primal step (conformance: step = forward),
    native C step through ``decoder(B).step`` (test_ttt_native_step_equals_torch_path), Triton on CUDA (test_forward_matches_reference);
    golden vectors of ttt-lm-pytorch (test_layer_golden).
    """

    def flops(self, seq_len: int) -> float:
        """2T·Σ(projection weights) + 2T·C·H (the η gate) + T·H(56d² + 30b·d): the dual form per head.

        Per mini-batch of b tokens (head width d, hidden 4d): seven b×d×4d products (two forward on the
        keys, one backward through W2, two for the output with W̄, two updates: 7 × 8b·d²), and the
        b×b terms XQ·XKᵀ (2b²d), tril(η)∇₁ and (η ⊙ A₁)∇₁ (2 × 8b²d), X̄₂·X₂ᵀ (8b²d), tril(η)∇₂ and
        (η ⊙ A₂)∇₂ (2 × 2b²d); the official implementation's matmuls, verified against torch's FLOP
        counter on it (benchmarks/test_bench_speed_smoke.py)."""
        H, d, b = self.num_heads, self.head_dim, self.mini_batch_size
        return super().flops(seq_len) + seq_len * H * (56.0 * d * d + 30.0 * b * d)

    def _chunk(self, XQ, XK, XV, lr, tok, W, G, outer):
        ln_w, ln_b = self._ln(outer)
        return ttt_mlp_chunk(XQ, XK, XV, lr, tok, W, G, ln_w, ln_b)

    def _token_step(self, XQ, XK, XV, lr, tok, W, G, outer, commit: bool):
        ln_w, ln_b = self._ln(outer)
        return ttt_mlp_step(XQ, XK, XV, lr, tok, W, G, ln_w, ln_b, commit)

    def _native_token(self, q, k, v, x, gate, rope, token_idx, p, state, ln_w, ln_b, commit, post):
        names = ("W1", "b1", "W2", "b2")
        Z, G, W_bar = native_kernels._ttt_mlp_token(
            q, k, v, x, self.num_heads, *gate, rope, token_idx, p, [state[n].contiguous() for n in names],
            [state[f"{n}_grad"].contiguous() for n in names], ln_w, ln_b, LN_EPS, commit, *post)
        return Z, (dict(zip(names, W_bar)) if commit else None), dict(zip(names, G))

    def _full(self, XQ, XK, XV, lr, tok, W, outer):
        H = self.num_heads
        B = XQ.shape[0] // H
        split = lambda t: t.reshape(B, H, *t.shape[1:]) if t is not None else None
        norm = self.config.inner_norm
        dtype = XQ.dtype
        ln_w = self.ttt_norm_weight.to(dtype) if norm else None
        ln_b = self.ttt_norm_bias.to(dtype) if norm else None
        args = (split(XQ), split(XK), split(XV), split(lr), tok, split(W["W1"]), split(W.get("b1")),
                split(W["W2"]), split(W.get("b2")), ln_w, ln_b, self.mini_batch_size)
        fn = self._triton_kernel(XQ)
        group = self.config.scan_checkpoint_group_size if self.training else 0
        if fn is not None:
            Z, W1, b1, W2, b2 = fn(*args, **({"checkpoint_group": group} if group else {}))
        elif self._native_prefill(XQ, XK, XV, lr, tok, ln_w, ln_b, *W.values()):
            Z, W1, b1, W2, b2 = native_kernels.ttt_mlp_dual(*args[:11], self.mini_batch_size, LN_EPS)
        elif self._native_training(XQ, XK, XV, lr, tok, ln_w, ln_b, *W.values()):
            Z, W1, b1, W2, b2 = scan_grad.ttt_mlp_train(*args, group)
        else:
            Z, W1, b1, W2, b2 = ttt_mlp_dual(*args, checkpoint_group=group)
        flat = lambda t: t.reshape(B * H, *t.shape[2:])
        W_new = {"W1": flat(W1), "W2": flat(W2)}
        if norm:
            W_new.update(b1=flat(b1), b2=flat(b2))
        return flat(Z), W_new

    def _triton_kernel(self, XQ: Tensor):
        backend = self.config.backend
        if backend == "torch" or (backend == "auto" and not XQ.is_cuda):
            return None
        if not self.config.inner_norm:
            if backend == "triton":
                raise ValueError("backend='triton' needs inner_norm=True (the kernels implement f(x) = x + LN(...))")
            return None
        return kernel("ttt_mlp_forward", XQ.device, required=backend == "triton")
