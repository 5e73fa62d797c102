"""TTT-Linear: the inner model is f(x) = x + LN(x·W1 + b1), trained by mini-batch GD on the sequence.

Per head (head_dim d, mini-batch b), for a mini-batch with start weights (W1, b1), tokens i, j = 1..b:
    ∂ℓ_j/∂Z_j = g_j   (Z_j = XK_j·W1 + b1, ℓ_j = ½‖LN(Z_j) − (XV_j − XK_j)‖²)
    ∇_W1 ℓ_j = XK_jᵀ g_j,   ∇_b1 ℓ_j = g_j
    Z̄_i = XQ_i·W̄_i + b̄_i = XQ_i·W1 + b1 − Σ_{j≤i} η[i, j] (XQ_i·XK_j + 1) g_j     (dual form)
    z_i = XQ_i + LN(Z̄_i),   W1 ← W1 − Σ_j η[b, j] XK_jᵀ g_j,   b1 ← b1 − Σ_j η[b, j] g_j
With ``inner_norm=False``: f(x) = x·W1 (no bias, no LN, no residual), g_j = XK_j·W1 − XV_j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from seqzoo.learner import GradientLearner, TTTConfig, TTTLayer

from .common import LN_EPS, causal_eta, kernel, ln_fwd, ln_l2_bwd, ln_normalize

__all__ = ["LinearLearner", "TTTLinear", "ttt_linear_dual", "ttt_linear_chunk"]


class LinearLearner(GradientLearner):
    """f(x) = x + LN(x·W1 + b1) per head (TTT-Linear); with inner_norm=False, f(x) = x·W1."""

    Config = TTTConfig

    def __init__(self, head_dim: int, **config):
        super().__init__(head_dim, **config)
        self.inner_norm = config.get("inner_norm", True)

    @classmethod
    def layer_class(cls) -> type:
        return TTTLinear

    def init_params(self) -> dict[str, Tensor]:
        d = self.head_dim
        params = {"W1": torch.normal(0.0, 0.02, size=(d, d))}
        if self.inner_norm:
            params["b1"] = torch.zeros(1, d)
        return params

    def init_outer_params(self) -> dict[str, Tensor]:
        if not self.inner_norm:
            return {}
        return {"ttt_norm_weight": torch.ones(self.head_dim), "ttt_norm_bias": torch.zeros(self.head_dim)}

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        if not self.inner_norm:
            return x @ params["W1"]
        z = x @ params["W1"] + params["b1"][0]
        return x + F.layer_norm(z, z.shape, params["ttt_norm_weight"], params["ttt_norm_bias"], eps=LN_EPS)


def ttt_linear_chunk(XQ, XK, XV, lr, tok, W1, b1, GW1, Gb1, ln_w, ln_b):
    """r tokens of one mini-batch from start weights (W1, b1) and accumulated gradients (GW1, Gb1).

    XQ/XK/XV (N, r, d), lr (N, r), tok (r,), W1/GW1 (N, d, d), b1/Gb1 (N, 1, d) or None (no inner norm),
    ln_w/ln_b (N, 1, d) or None. Returns Z (N, r, d), (W̄1, b̄1) of the last row, and (GW1, Gb1) updated.
    With r = 1 this is the primal form: W̄ = W − tokidx·G is formed and applied to XQ.
    """
    norm = ln_w is not None
    Z1 = XK @ W1 + b1 if norm else XK @ W1
    g = ln_l2_bwd(Z1, XV - XK, ln_w, ln_b) if norm else Z1 - XV  # ∂ℓ_j/∂Z1_j at the start weights
    lr_g = lr.unsqueeze(-1) * g
    GW_new = GW1 + XK.transpose(-1, -2) @ lr_g  # G ← G + Σ_j gate_j ∇ℓ_j
    Gb_new = Gb1 + lr_g.sum(-2, keepdim=True) if norm else None
    if XQ.shape[1] == 1:  # primal: W̄ = W − tokidx·G, z = f(XQ; W̄)
        W_bar = W1 - tok * GW_new
        b_bar = b1 - tok * Gb_new if norm else None
        Z_bar = XQ @ W_bar + b_bar if norm else XQ @ W_bar
    else:  # dual: Z̄_i = XQ_i·(W − tok_i G) + (b − tok_i Gb) − Σ_{j≤i} η[i, j](XQ_i·XK_j + 1) g_j
        eta = causal_eta(tok, lr)  # (N, r, r)
        attn = XQ @ XK.transpose(-1, -2)
        row = tok[:, None]
        if norm:
            Z_bar = XQ @ W1 + b1 - row * (XQ @ GW1 + Gb1) - (eta * (attn + 1.0)) @ g
        else:
            Z_bar = XQ @ W1 - row * (XQ @ GW1) - (eta * attn) @ g
        W_bar = W1 - tok[-1] * GW_new
        b_bar = b1 - tok[-1] * Gb_new if norm else None
    Z = XQ + ln_fwd(Z_bar, ln_w, ln_b) if norm else Z_bar
    return Z, (W_bar, b_bar), (GW_new, Gb_new)


def ttt_linear_dual(XQ, XK, XV, lr_eta, token_eta, W1, b1, ln_w, ln_b, mini_batch_size, checkpoint_group=0):
    """TTT-Linear over a sequence that starts at a mini-batch boundary with zero accumulated gradient.

    XQ/XK/XV (B, H, T, d) after RoPE, lr_eta (B, H, T) = ttt_base_lr·gate/d, token_eta (b,),
    W1 (B, H, d, d), b1 (B, H, 1, d), ln_w/ln_b (H, d) (b1 = ln_w = ln_b = None: no inner norm).
    Returns Z (B, H, T, d) and (W1, b1) after the last full mini-batch (a trailing partial one of r
    tokens uses rows 1..r and leaves them unchanged). Same signature as the Triton kernel.
    """
    B, H, T, d = XQ.shape
    b, N = mini_batch_size, B * H
    n, norm = T // b, ln_w is not None
    flat = lambda t: t.reshape(N, *t.shape[2:])
    XQ, XK, XV, lr, W, bias = flat(XQ), flat(XK), flat(XV), flat(lr_eta), flat(W1), flat(b1) if norm else None
    gamma = beta = None
    if norm:
        gamma = ln_w.unsqueeze(0).expand(B, H, d).reshape(N, 1, d)
        beta = ln_b.unsqueeze(0).expand(B, H, d).reshape(N, 1, d)
    Zs = []
    if n:
        e = n * b
        mb = lambda t: rearrange(t[:, :e], "N (n b) d -> n N b d", b=b)
        q, k, v = mb(XQ), mb(XK), mb(XV)
        # Everything that does not depend on the evolving weights, for all mini-batches at once. With the
        # inner norm the bias rides along as a last row of W: [x, 1]·[W; b] = x·W + b, and the dual
        # form's (q·k + 1) is [q, 1]·[k, 1].
        if norm:
            ones = q.new_ones(*q.shape[:-1], 1)
            q, k = torch.cat([q, ones], -1), torch.cat([k, ones], -1)
            W = torch.cat([W, bias], -2)  # (N, d + 1, d)
        eta = causal_eta(token_eta, rearrange(lr[:, :e], "N (n b) -> n N b", b=b))  # (n, N, b, b)
        M = eta * (q @ k.transpose(-1, -2))  # Z̄ = [XQ, 1]·W − M·g
        kT_last = (eta[:, :, -1:, :].transpose(-1, -2) * k).transpose(-1, -2)  # (n, N, d(+1), b): (η[b, j] XK_j)ᵀ
        kq = torch.cat([k, q], -2)  # (n, N, 2b, d(+1)): one matmul with W gives Z1 and XQ·W
        if norm:  # g = ∂ℓ/∂x̂·... = γ²·x̂ + γ(β − target): the part without x̂, for all mini-batches
            gamma2, c = gamma * gamma, gamma * (beta - (v - mb(XK)))
        else:
            target = v

        def run(lo: int, hi: int, W: Tensor):
            out = []
            for i in range(lo, hi):
                Z1, Zq = torch.bmm(kq[i], W).split(b, dim=-2)
                if norm:  # the LayerNorm backward fused with the L2 loss (see ln_l2_bwd)
                    x_hat, rstd = ln_normalize(Z1)
                    g = torch.addcmul(c[i], gamma2, x_hat)
                    g = torch.addcmul(g - g.mean(-1, keepdim=True), x_hat, (g * x_hat).mean(-1, keepdim=True),
                                      value=-1.0) * rstd
                else:
                    g = Z1 - target[i]
                out.append(torch.baddbmm(Zq, M[i], g, alpha=-1.0))
                W = torch.baddbmm(W, kT_last[i], g, alpha=-1.0)  # W ← W − Σ_j η[b, j] XK_jᵀ g_j
            return torch.stack(out), W

        group = checkpoint_group if checkpoint_group > 0 and torch.is_grad_enabled() else n
        for lo in range(0, n, group):
            hi = min(lo + group, n)
            if group < n:
                Z_bar, W = torch.utils.checkpoint.checkpoint(run, lo, hi, W, use_reentrant=False)
            else:
                Z_bar, W = run(lo, hi, W)
            Zs.append(Z_bar)
        if norm:
            W, bias = W[:, :d], W[:, d:]
        Z_bar = rearrange(Zs[0] if len(Zs) == 1 else torch.cat(Zs), "n N b d -> N (n b) d")
        Zs = [XQ[:, :e] + ln_fwd(Z_bar, gamma, beta) if norm else Z_bar]
    if T > n * b:  # a trailing partial mini-batch: rows 1..r, weights unchanged
        s, r = n * b, T - n * b
        zero_b = torch.zeros_like(bias) if norm else None
        Z, _, _ = ttt_linear_chunk(XQ[:, s:], XK[:, s:], XV[:, s:], lr[:, s:], token_eta[:r], W, bias,
                                   torch.zeros_like(W), zero_b, gamma, beta)
        Zs.append(Z)
    Z = (Zs[0] if len(Zs) == 1 else torch.cat(Zs, dim=1)) if Zs else XQ
    unflat = lambda t: t.reshape(B, H, *t.shape[1:])
    return unflat(Z), unflat(W), unflat(bias) if norm else None


class TTTLinear(TTTLayer):
    """TTT-Linear (Sun et al. 2024): hidden state W1, b1 of f(x) = x + LN(x·W1 + b1), per head.

    ``forward`` runs the dual form (matmuls within each mini-batch, batched over batch × heads);
    ``step`` the primal form. Equal to ttt-lm-pytorch's ``TTTLinear`` with the same state_dict.
    """

    def _ln(self, outer):
        if not self.config.inner_norm:
            return None, None
        return outer["ttt_norm_weight"].unsqueeze(1), outer["ttt_norm_bias"].unsqueeze(1)

    def _chunk(self, XQ, XK, XV, lr, tok, W, G, outer):
        ln_w, ln_b = self._ln(outer)
        Z, (W1, b1), (GW1, Gb1) = ttt_linear_chunk(
            XQ, XK, XV, lr, tok, W["W1"], W.get("b1"), G["W1"], G.get("b1"), ln_w, ln_b
        )
        W_bar, G_new = {"W1": W1}, {"W1": GW1}
        if b1 is not None:
            W_bar["b1"], G_new["b1"] = b1, Gb1
        return Z, W_bar, G_new

    def _full(self, XQ, XK, XV, lr, tok, W, outer):
        H = self.num_heads
        B = XQ.shape[0] // H
        split = lambda t: t.reshape(B, H, *t.shape[1:])
        norm = self.config.inner_norm
        dtype = XQ.dtype
        ln_w = self.ttt_norm_weight.to(dtype) if norm else None
        ln_b = self.ttt_norm_bias.to(dtype) if norm else None
        b1 = split(W["b1"]) if norm else None
        args = (split(XQ), split(XK), split(XV), split(lr), tok, split(W["W1"]), b1, ln_w, ln_b, self.mini_batch_size)
        fn = self._triton_kernel(XQ)
        group = self.config.scan_checkpoint_group_size if self.training else 0
        if fn is not None:
            Z, W1, b1 = fn(*args, **({"checkpoint_group": group} if group else {}))
        else:
            Z, W1, b1 = ttt_linear_dual(*args, checkpoint_group=group)
        flat = lambda t: t.reshape(B * H, *t.shape[2:])
        W_new = {"W1": flat(W1)}
        if norm:
            W_new["b1"] = flat(b1)
        return flat(Z), W_new

    def _triton_kernel(self, XQ: Tensor):
        backend = self.config.backend
        if backend == "torch" or (backend == "auto" and not XQ.is_cuda):
            return None
        if not self.config.inner_norm:
            if backend == "triton":
                raise ValueError("backend='triton' needs inner_norm=True (the kernels implement f(x) = x + LN(xW + b))")
            return None
        return kernel("ttt_linear_forward", XQ.device, required=backend == "triton")
