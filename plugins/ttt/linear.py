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
from torch import Tensor

from seqzoo.learner import GradientLearner, TTTConfig

from . import native_kernels, scan_grad
from .common import InnerNormTTT, kernel, ln_l2_bwd_centered
from .reference import LN_EPS, causal_eta, ln_fwd, ln_l2_bwd

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


def ttt_linear_step(XQ, XK, XV, lr, tok, W1, b1, GW1, Gb1, ln_w, ln_b, commit=True):
    """One token in the primal form, without forming W̄ unless ``commit`` (the mini-batch's last token).

    Shapes as ``ttt_linear_chunk`` with r = 1. With G' = G + gate·∇ℓ(W) (∇_W1 = XKᵀg, ∇_b1 = g),
    z = f(XQ; W − tok·G') where XQ·(W1 − tok·G'_W) + (b1 − tok·G'_b) = XQ·W1 + b1 − tok·(XQ·G'_W + G'_b).
    Returns Z (N, 1, d), (W̄1, b̄1) or (None, None), and (G'_W, G'_b).
    """
    norm = ln_w is not None
    if norm:
        g = ln_l2_bwd_centered(torch.baddbmm(b1, XK, W1), torch.addcmul(ln_w * ln_b, ln_w, XK - XV), ln_w * ln_w)
    else:
        g = torch.bmm(XK, W1) - XV
    lr_g = lr.unsqueeze(-1) * g
    GW = torch.baddbmm(GW1, XK.transpose(-1, -2), lr_g)
    if norm:
        Gb = Gb1 + lr_g
        Z_bar = torch.baddbmm(b1, XQ, W1) - tok * torch.baddbmm(Gb, XQ, GW)
        Z = XQ + ln_fwd(Z_bar, ln_w, ln_b)
    else:
        Gb = None
        Z = torch.bmm(XQ, W1) - tok * torch.bmm(XQ, GW)
    W_bar = (W1 - tok * GW, b1 - tok * Gb if norm else None) if commit else (None, None)
    return Z, W_bar, (GW, Gb)


def ttt_linear_dual(XQ, XK, XV, lr_eta, token_eta, W1, b1, ln_w, ln_b, mini_batch_size, checkpoint_group=0):
    """TTT-Linear over a sequence that starts at a mini-batch boundary with zero accumulated gradient.

    XQ/XK/XV (B, H, T, d) after RoPE, lr_eta (B, H, T) = ttt_base_lr·gate/d, token_eta (b,),
    W1 (B, H, d, d), b1 (B, H, 1, d), ln_w/ln_b (H, d) (b1 = ln_w = ln_b = None: no inner norm).
    Returns Z (B, H, T, d) and (W1, b1) after the last full mini-batch (a trailing partial one of r
    tokens uses rows 1..r and leaves them unchanged). Same signature as the Triton kernel.

    The η matrices of every mini-batch are one batched call before the loop; everything that reads a
    mini-batch's keys and queries runs inside it, on slices that stay in cache (computing XQ·XKᵀ or
    γβ + γ(XK − XV) for the whole sequence before the loop measured 10-30 % slower). Without autograd
    the weights are updated in place and the outputs written into one (B, T, H, d) buffer.
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
        mb = lambda t: t[:, :e].unflatten(1, (n, b))  # (N, n, b, ...), a view
        q, k, v = mb(XQ), mb(XK), mb(XV)
        eta = causal_eta(token_eta, mb(lr))  # (N, n, b, b)
        eta_last = eta[:, :, -1:, :]  # (N, n, 1, b): η[b, j], the weights of the end-of-mini-batch update
        if norm:  # ∂ℓ/∂x̂ = γ²·x̂ + γ(β − (XV − XK)) = γ²·x̂ + γβ + γ(XK − XV)
            gamma2, gamma_beta = gamma * gamma, gamma * beta
        # Without autograd the weights are updated in place and every mini-batch's output z = XQ + LN(Z̄)
        # goes straight into its place in one (B, n, b, H, d) buffer, the layout of the output projection's
        # input; with autograd each step makes new tensors.
        inplace = not torch.is_grad_enabled()
        if inplace:  # workspaces reused by every mini-batch
            Z_i, final = XQ.new_empty(N, b, d), XQ.new_empty(B, n, b, H, d)
            M_i, scaled_g = XQ.new_empty(N, b, b), XQ.new_empty(N, b, d)
            kTs = None
        else:  # (η[b, j] XK_j)ᵀ (N, n, d, b)
            kTs = (k * eta_last.transpose(-1, -2)).transpose(-1, -2).unbind(1)
        # per-mini-batch views made once (indexing in the loop costs a dispatch per tensor)
        ks, qs, vs, etas = k.unbind(1), q.unbind(1), v.unbind(1), eta.unbind(1)
        one = q.new_ones(()) if norm else q.new_zeros(())
        els = eta_last.unbind(1)

        def run(lo: int, hi: int, W: Tensor, bias: Tensor | None):
            Zb = []
            if inplace:
                W, bias = W.clone(), bias.clone() if norm else None
            for i in range(lo, hi):
                if norm:
                    c = torch.addcmul(gamma_beta, gamma, ks[i] - vs[i])
                    g = ln_l2_bwd_centered(torch.baddbmm(bias, ks[i], W), c, gamma2)
                else:
                    g = torch.bmm(ks[i], W) - vs[i]
                # M = η ⊙ (XQ·XKᵀ + 1) (without the 1 when there is no bias)
                if inplace:
                    M = torch.baddbmm(one, qs[i], ks[i].transpose(-1, -2), out=M_i).mul_(etas[i])
                else:
                    M = torch.baddbmm(one, qs[i], ks[i].transpose(-1, -2)) * etas[i]
                # Z̄ = XQ·W + b − M·g;  W ← W − Σ_j η[b, j] XK_jᵀ g_j,  b ← b − Σ_j η[b, j] g_j
                if inplace:
                    if norm:
                        torch.baddbmm(bias, qs[i], W, out=Z_i)
                    else:
                        torch.bmm(qs[i], W, out=Z_i)
                    Z_i.baddbmm_(M, g, alpha=-1.0)
                    dest = final[:, i].transpose(1, 2)  # (B, H, b, d)
                    if norm:
                        torch.add(ln_fwd(Z_i, gamma, beta).view(B, H, b, d), qs[i].view(B, H, b, d), out=dest)
                    else:
                        dest.copy_(Z_i.view(B, H, b, d))
                    # XK_jᵀ (η[b, j] g_j): the gradients scaled by the last row of η
                    torch.mul(g, els[i].transpose(-1, -2), out=scaled_g)
                    W.baddbmm_(ks[i].transpose(-1, -2), scaled_g, alpha=-1.0)
                    if norm:
                        bias.baddbmm_(els[i], g, alpha=-1.0)
                else:
                    Z_bar = torch.baddbmm(bias, qs[i], W) if norm else torch.bmm(qs[i], W)
                    Zb.append(torch.baddbmm(Z_bar, M, g, alpha=-1.0))
                    W = torch.baddbmm(W, kTs[i], g, alpha=-1.0)
                    if norm:
                        bias = torch.baddbmm(bias, els[i], g, alpha=-1.0)
            return (torch.stack(Zb) if Zb else None), W, bias

        group = checkpoint_group if checkpoint_group > 0 and torch.is_grad_enabled() else n
        for lo in range(0, n, group):
            hi = min(lo + group, n)
            if group < n:
                Z_bar, W, bias = torch.utils.checkpoint.checkpoint(run, lo, hi, W, bias, use_reentrant=False)
            else:
                Z_bar, W, bias = run(lo, hi, W, bias)
            Zs.append(Z_bar)
        if inplace:
            Z = final
        else:
            Z_bar = Zs[0] if len(Zs) == 1 else torch.cat(Zs)  # (n, N, b, d)
            # to (B, T, H, d), the layout of the output projection's input, in the LayerNorm's one copy
            Z_bar = Z_bar.reshape(n, B, H, b, d).permute(1, 0, 3, 2, 4)  # (B, n, b, H, d)
            Z = ln_fwd(Z_bar, ln_w, ln_b) + XQ[:, :e].reshape(B, H, n, b, d).permute(0, 2, 3, 1, 4) if norm else Z_bar
        # back to (N, e, d) as a view (B = 1) of the (B, T, H, d) tensor
        Zs = [Z.reshape(B, e, H, d).transpose(1, 2).reshape(N, e, d)]
    if T > n * b:  # a trailing partial mini-batch: rows 1..r, weights unchanged
        s, r = n * b, T - n * b
        zero_b = torch.zeros_like(bias) if norm else None
        Z, _, _ = ttt_linear_chunk(XQ[:, s:], XK[:, s:], XV[:, s:], lr[:, s:], token_eta[:r], W, bias,
                                   torch.zeros_like(W), zero_b, gamma, beta)
        Zs.append(Z)
    Z = (Zs[0] if len(Zs) == 1 else torch.cat(Zs, dim=1)) if Zs else XQ
    unflat = lambda t: t.reshape(B, H, *t.shape[1:])
    return unflat(Z), unflat(W), unflat(bias) if norm else None


class TTTLinear(InnerNormTTT):
    """TTT-Linear (Sun et al. 2024): hidden state W1, b1 of f(x) = x + LN(x·W1 + b1), per head.

    ``forward`` runs the dual form (matmuls within each mini-batch, batched over batch × heads);
    ``step`` the primal form. Equal to ttt-lm-pytorch's ``TTTLinear`` with the same state_dict.

    Which path runs when, and the test that ties it to the readable math (``reference``):

    ==================  ===========================================  ==========================================
    path                runs when                                    tied to the reference by
    ==================  ===========================================  ==========================================
    native C training   autograd, float32 CPU, ``backend="auto"``    test_native_backward_equals_autograd,
                        (forward: the prefill kernel; backward:      test_layer_gradients_equal_autograd
                        ``scan_grad``'s kernel)                      (test_ttt_backward)
    torch dual          ``forward`` with autograd elsewhere          test_torch_dual_form_equals_the_reference
    torch dual, no-grad ``forward`` without autograd, off native     test_torch_dual_form_equals_the_reference
    native C prefill    no autograd, float32 CPU, ``backend="auto"``  test_native_dual_form_equals_the_reference
    torch primal step   ``step``; the decoder where native is off     conformance: step = forward
    native C step       ``decoder(B).step``, no grad, float32 CPU     test_ttt_native_step_equals_torch_path
    Triton              CUDA tensors with ``auto``, or ``"triton"``   test_forward_matches_reference (test_kernels)
    ==================  ===========================================  ==========================================

    The official code's golden vectors tie all of them to ttt-lm-pytorch (test_layer_golden).
    """

    def flops(self, seq_len: int) -> float:
        """2T·Σ(projection weights) + 2T·C·H (the η gate) + T·H(6d² + 6b·d): the dual form per head.

        Per mini-batch of b tokens (head width d): XK·W and XQ·W, the update (η XK)ᵀ∇ (3 × 2b·d²), and
        XQ·XKᵀ, tril(η)∇ and (η ⊙ A)∇ (3 × 2b²·d); the official implementation's matmuls, verified
        against torch's FLOP counter on it (benchmarks/test_bench_speed_smoke.py)."""
        H, d, b = self.num_heads, self.head_dim, self.mini_batch_size
        return super().flops(seq_len) + seq_len * H * (6.0 * d * d + 6.0 * b * d)

    def _chunk(self, XQ, XK, XV, lr, tok, W, G, outer):
        ln_w, ln_b = self._ln(outer)
        Z, (W1, b1), (GW1, Gb1) = ttt_linear_chunk(
            XQ, XK, XV, lr, tok, W["W1"], W.get("b1"), G["W1"], G.get("b1"), ln_w, ln_b
        )
        W_bar, G_new = {"W1": W1}, {"W1": GW1}
        if b1 is not None:
            W_bar["b1"], G_new["b1"] = b1, Gb1
        return Z, W_bar, G_new

    def _native_token(self, q, k, v, x, gate, rope, token_idx, p, state, ln_w, ln_b, commit, post):
        Z, GW, Gb, W, b = native_kernels._ttt_linear_token(
            q, k, v, x, self.num_heads, *gate, rope, token_idx, p, state["W1"].contiguous(), state["b1"].contiguous(),
            state["W1_grad"].contiguous(), state["b1_grad"].contiguous(), ln_w, ln_b, LN_EPS, commit, *post)
        return Z, ({"W1": W, "b1": b} if commit else None), {"W1": GW, "b1": Gb}

    def _token_step(self, XQ, XK, XV, lr, tok, W, G, outer, commit: bool):
        ln_w, ln_b = self._ln(outer)
        Z, (W1, b1), (GW1, Gb1) = ttt_linear_step(
            XQ, XK, XV, lr, tok, W["W1"], W.get("b1"), G["W1"], G.get("b1"), ln_w, ln_b, commit
        )
        W_bar, G_new = {"W1": W1}, {"W1": GW1}
        if Gb1 is not None:
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
        elif self._native_prefill(XQ, XK, XV, lr, tok, ln_w, ln_b, *W.values()):
            Z, W1, b1 = native_kernels.ttt_linear_dual(*args[:9], self.mini_batch_size, LN_EPS)
        elif self._native_training(XQ, XK, XV, lr, tok, ln_w, ln_b, *W.values()):
            Z, W1, b1 = scan_grad.ttt_linear_train(*args, group)
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
