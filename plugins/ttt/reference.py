"""The math of TTT-Linear and TTT-MLP, first: readable torch references of every fast path (the torch dual
form with and without autograd, the native CPU kernels, the Triton kernels), in the paper's names.

Per (batch, head), head_dim d, mini-batch b. For a mini-batch with start weights W and tokens
i, j = 1..b, η[i, j] = token_eta[i] · lr_eta[j] for j ≤ i, and the inner model is
f(x) = x + LN(f_res(x)), f_res(x) = x·W1 + b1 (linear) or gelu_tanh(x·W1 + b1)·W2 + b2 (mlp).
With ℓ_j = ½‖f(XK_j) − XV_j‖² and every gradient taken at the mini-batch-start weights:

    W̄_i = W − Σ_{j≤i} η[i, j] ∇_W ℓ_j(W),    z_i = XQ_i + LN(f_res(XQ_i; W̄_i)),    W ← W̄_b.

The dual form below computes this with matmuls only; ``*_decode_reference`` is the primal form of one
token. These functions are the specification the fast paths are tested against (tests/test_kernels.py,
tests/test_ttt.py), and the Triton kernels' backward recomputes through them under autograd. The
helpers (the inner LayerNorm, its fused L2 backward, gelu', the causal η) are the ones the layers use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LN_EPS",
    "ln_normalize",
    "ln_fwd",
    "ln_l2_bwd",
    "gelu_tanh",
    "gelu_tanh_grad",
    "causal_eta",
    "ttt_linear_reference",
    "ttt_mlp_reference",
    "ttt_linear_decode_reference",
    "ttt_mlp_decode_reference",
]

LN_EPS = 1e-6
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def ln_normalize(x: Tensor, eps: float = LN_EPS) -> tuple[Tensor, Tensor]:
    """x̂ = (x − μ)·rstd and rstd = 1/√(σ² + eps) over the last dim (biased variance, as LayerNorm)."""
    xc = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    return xc * rstd, rstd


def ln_fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float = LN_EPS) -> Tensor:
    """LayerNorm over the last dim with per-row-group weight and bias: weight · (x − μ)/√(σ² + eps) + bias."""
    return torch.addcmul(bias, weight, F.layer_norm(x, x.shape[-1:], eps=eps))


def ln_l2_bwd(x: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float = LN_EPS) -> Tensor:
    """∂/∂x of ½‖LN(x) − target‖², row by row (the LayerNorm backward fused with the L2 loss):
    with x̂ = (x − μ)·rstd and g = ∂ℓ/∂x̂ = (weight·x̂ + bias − target)·weight,
    ∂ℓ/∂x = (g − mean(g) − x̂·mean(g·x̂))·rstd."""
    x_hat, rstd = ln_normalize(x, eps)
    g = (torch.addcmul(bias, weight, x_hat) - target) * weight
    return (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True)) * rstd


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: Tensor) -> Tensor:
    """d/dx of gelu_tanh(x) = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³)."""
    t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


def causal_eta(token_eta: Tensor, lr_eta: Tensor) -> Tensor:
    """η[..., i, j] = token_eta[i] · lr_eta[..., j] for j ≤ i, else 0: token_eta (≥ r,), lr_eta (..., r)."""
    r = lr_eta.shape[-1]
    return torch.tril(token_eta[:r, None] * lr_eta[..., None, :])


def _ln_params(ln_w: Tensor, ln_b: Tensor) -> tuple[Tensor, Tensor]:
    """(H, d) -> (H, 1, d), broadcasting over (B, H, tokens, d)."""
    return ln_w.unsqueeze(-2), ln_b.unsqueeze(-2)


def _check_mini_batch_size(mini_batch_size: int, token_eta: Tensor) -> None:
    if mini_batch_size < 1:
        raise ValueError(f"expected mini_batch_size >= 1, got {mini_batch_size}")
    if token_eta.shape != (mini_batch_size,):
        raise ValueError(f"expected token_eta of shape ({mini_batch_size},), got {tuple(token_eta.shape)}")


def ttt_linear_reference(
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
) -> tuple[Tensor, Tensor, Tensor]:
    """TTT-Linear prefill, dual form, one mini-batch at a time.

    XQ/XK/XV (B, H, T, d), lr_eta (B, H, T), token_eta (b,), W1 (B, H, d, d), b1 (B, H, 1, d),
    ln_w/ln_b (H, d). Returns Z (B, H, T, d) and (W1, b1) after the last full mini-batch; a trailing
    partial mini-batch of r tokens uses token_eta[:r] and leaves the weights as they are.
    """
    _check_mini_batch_size(mini_batch_size, token_eta)
    gamma, beta = _ln_params(ln_w, ln_b)
    T = XQ.shape[2]
    Z = []
    for s in range(0, T, mini_batch_size):
        e = min(s + mini_batch_size, T)
        xq, xk, xv = XQ[:, :, s:e], XK[:, :, s:e], XV[:, :, s:e]
        eta = causal_eta(token_eta, lr_eta[:, :, s:e])  # (B, H, n, n), lower triangular

        # gradients at the mini-batch-start weights: G = ∂ℓ/∂Z1 with Z1 = XK·W1 + b1
        Z1 = xk @ W1 + b1
        G = ln_l2_bwd(Z1, xv - xk, gamma, beta)

        # Z̄1_i = XQ_i·W̄_i + b̄_i = XQ_i·W1 + b1 − Σ_{j≤i} η[i,j] (XQ_i·XK_j + 1) G_j
        attn = xq @ xk.transpose(-1, -2)
        Z1_bar = xq @ W1 + b1 - (eta * (attn + 1.0)) @ G
        Z.append(xq + ln_fwd(Z1_bar, gamma, beta))

        if e - s == mini_batch_size:  # W ← W̄_b
            eta_last = eta[:, :, -1, :, None]  # (B, H, b, 1): η[b, j]
            W1 = W1 - (eta_last * xk).transpose(-1, -2) @ G
            b1 = b1 - (eta_last * G).sum(-2, keepdim=True)
    Z = torch.cat(Z, dim=2) if Z else XQ.clone()
    return Z, W1, b1


def ttt_mlp_reference(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """TTT-MLP prefill, dual form: f_res(x) = gelu_tanh(x·W1 + b1)·W2 + b2, hidden 4d.

    W1 (B, H, d, 4d), b1 (B, H, 1, 4d), W2 (B, H, 4d, d), b2 (B, H, 1, d); the rest as
    ``ttt_linear_reference``. Returns Z and (W1, b1, W2, b2) after the last full mini-batch.
    """
    _check_mini_batch_size(mini_batch_size, token_eta)
    gamma, beta = _ln_params(ln_w, ln_b)
    T = XQ.shape[2]
    Z = []
    for s in range(0, T, mini_batch_size):
        e = min(s + mini_batch_size, T)
        xq, xk, xv = XQ[:, :, s:e], XK[:, :, s:e], XV[:, :, s:e]
        eta = causal_eta(token_eta, lr_eta[:, :, s:e])

        # forward and backward of the inner model on the keys, at the mini-batch-start weights
        Z1 = xk @ W1 + b1
        X2 = gelu_tanh(Z1)
        Z2 = X2 @ W2 + b2
        G2 = ln_l2_bwd(Z2, xv - xk, gamma, beta)  # ∂ℓ/∂Z2
        G1 = (G2 @ W2.transpose(-1, -2)) * gelu_tanh_grad(Z1)  # ∂ℓ/∂Z1

        # the queries through the per-token weights W̄_i, layer by layer, in dual form
        attn1 = xq @ xk.transpose(-1, -2)
        Z1_bar = xq @ W1 + b1 - (eta * (attn1 + 1.0)) @ G1
        X2_bar = gelu_tanh(Z1_bar)
        attn2 = X2_bar @ X2.transpose(-1, -2)
        Z2_bar = X2_bar @ W2 + b2 - (eta * (attn2 + 1.0)) @ G2
        Z.append(xq + ln_fwd(Z2_bar, gamma, beta))

        if e - s == mini_batch_size:
            eta_last = eta[:, :, -1, :, None]
            W1 = W1 - (eta_last * xk).transpose(-1, -2) @ G1
            b1 = b1 - (eta_last * G1).sum(-2, keepdim=True)
            W2 = W2 - (eta_last * X2).transpose(-1, -2) @ G2
            b2 = b2 - (eta_last * G2).sum(-2, keepdim=True)
    Z = torch.cat(Z, dim=2) if Z else XQ.clone()
    return Z, W1, b1, W2, b2


def _token_eta_column(token_eta_i: Tensor | float, like: Tensor) -> Tensor:
    """token_eta_i as a (B, 1, 1, 1) tensor (it is a scalar or one value per batch row)."""
    t = torch.as_tensor(token_eta_i, dtype=like.dtype, device=like.device)
    return t.reshape(-1, 1, 1, 1) if t.dim() == 1 else t


def ttt_linear_decode_reference(
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
    """TTT-Linear, one token in primal form: G' = G + lr_eta·∇ℓ(W), W̄ = W − token_eta_i·G'.

    xq/xk/xv (B, H, d), lr_eta (B, H), token_eta_i scalar or (B,); W1/b1 the mini-batch-start weights,
    G_W1/G_b1 the accumulated scaled gradients of the earlier tokens of this mini-batch.
    Returns z (B, H, d), G_W1', G_b1', W̄1, b̄1.
    """
    gamma, beta = _ln_params(ln_w, ln_b)
    q, k, v = xq.unsqueeze(-2), xk.unsqueeze(-2), xv.unsqueeze(-2)  # (B, H, 1, d)
    lr = lr_eta[..., None, None]
    tok = _token_eta_column(token_eta_i, xq)

    g = ln_l2_bwd(k @ W1 + b1, v - k, gamma, beta)  # ∂ℓ/∂Z1, (B, H, 1, d)
    G_W1 = G_W1 + lr * (k.transpose(-1, -2) @ g)  # ∇_W1 ℓ = k ⊗ g
    G_b1 = G_b1 + lr * g
    W1_bar = W1 - tok * G_W1
    b1_bar = b1 - tok * G_b1
    z = q + ln_fwd(q @ W1_bar + b1_bar, gamma, beta)
    return z.squeeze(-2), G_W1, G_b1, W1_bar, b1_bar


def ttt_mlp_decode_reference(
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
    """TTT-MLP, one token in primal form (see ``ttt_linear_decode_reference``).

    Returns z, G_W1', G_b1', G_W2', G_b2', W̄1, b̄1, W̄2, b̄2.
    """
    gamma, beta = _ln_params(ln_w, ln_b)
    q, k, v = xq.unsqueeze(-2), xk.unsqueeze(-2), xv.unsqueeze(-2)
    lr = lr_eta[..., None, None]
    tok = _token_eta_column(token_eta_i, xq)

    Z1 = k @ W1 + b1
    X2 = gelu_tanh(Z1)
    g2 = ln_l2_bwd(X2 @ W2 + b2, v - k, gamma, beta)  # ∂ℓ/∂Z2
    g1 = (g2 @ W2.transpose(-1, -2)) * gelu_tanh_grad(Z1)  # ∂ℓ/∂Z1
    G_W1 = G_W1 + lr * (k.transpose(-1, -2) @ g1)
    G_b1 = G_b1 + lr * g1
    G_W2 = G_W2 + lr * (X2.transpose(-1, -2) @ g2)
    G_b2 = G_b2 + lr * g2
    W1_bar, b1_bar = W1 - tok * G_W1, b1 - tok * G_b1
    W2_bar, b2_bar = W2 - tok * G_W2, b2 - tok * G_b2
    z = q + ln_fwd(gelu_tanh(q @ W1_bar + b1_bar) @ W2_bar + b2_bar, gamma, beta)
    return z.squeeze(-2), G_W1, G_b1, G_W2, G_b2, W1_bar, b1_bar, W2_bar, b2_bar
