"""The math of the delta-rule family, first: plain token loops, the specification every fast path is
tested against.

Per head, a matrix state S ∈ R^{K×V} is a linear model v ≈ Sᵀk trained online, one token at a time,
by one gradient step on the inner loss ℓ_t(S) = ½‖Sᵀk_t − v_t‖² with the per-token learning rate β_t
(a scalar per head, or a vector over V: one rate per value column), after a decay α_t = exp(g_t):

    S'_t = α_t S_{t−1}                                  (decay first; g ≡ 0 is the plain delta rule)
    u_t  = β_t ⊙ (v_t − S'_tᵀ k_t)                      (the error, scaled by the learning rate)
    S_t  = S'_t + k_t u_tᵀ  = S'_t − β_t ∇ℓ_t(S'_t)     (one gradient step)
    o_t  = S_tᵀ (scale · q_t)                           (the output rule, read after the update)

Tensors are (B, T, H, ·) as flash-linear-attention's API: q, k (B, T, H, K), v (B, T, H, V), β
(B, T, H) or (B, T, H, V), g (B, T, H) in log space, states (B, H, K, V). Everything is computed in
the input dtype (float64 works); nothing is normalised here (a layer L2-normalises q and k itself).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["delta_rule_reference", "gated_delta_rule_reference", "mesa_net_reference", "mesa_net_cg_reference",
           "cg_solve", "CG_EPS", "longhorn_reference"]

#: the guard ε of the conjugate gradient's two divisions (flash-linear-attention's)
CG_EPS = 1e-5


def gated_delta_rule_reference(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The token loop above; returns o (B, T, H, V) and S_T (B, H, K, V). ``g`` None means g ≡ 0."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    if beta.ndim == 3:
        beta = beta.unsqueeze(-1)  # one rate for every value column
    outputs = []
    for t in range(T):
        k_t, v_t, q_t = k[:, t], v[:, t], q[:, t] * scale  # (B, H, ·)
        if g is not None:
            S = S * g[:, t].exp()[..., None, None]  # S'_t = α_t S_{t−1}
        u = beta[:, t] * (v_t - torch.einsum("bhkv,bhk->bhv", S, k_t))  # u_t = β_t ⊙ (v_t − S'ᵀk_t)
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, u)  # S_t = S'_t + k_t u_tᵀ
        outputs.append(torch.einsum("bhkv,bhk->bhv", S, q_t))  # o_t = S_tᵀ(scale · q_t)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o, S


def delta_rule_reference(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The delta rule (no decay): ``gated_delta_rule_reference`` with g ≡ 0."""
    return gated_delta_rule_reference(q, k, v, None, beta, scale=scale, initial_state=initial_state)


def mesa_net_reference(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, lamb: Tensor, *,
    initial_state: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """MesaNet's exact form as a token loop: the state is the sufficient statistics of a decayed,
    weighted ridge regression of v on k, and the output is that regression's prediction at q,

        H^kk_t = α_t H^kk_{t−1} + β_t k_t k_tᵀ,   H^kv_t = α_t H^kv_{t−1} + β_t k_t v_tᵀ,
        o_t = H^kv_tᵀ (H^kk_t + diag λ)⁻¹ q_t   = argmin_W Σ_{s≤t} β_s (Π α) ‖Wᵀk_s − v_s‖² + ‖Λ^½ W‖² at q_t,

    with α_t = exp(g_t), λ (H, K) > 0. q, k (B, T, H, K), v (B, T, H, V), g, β (B, T, H); the state is
    (H^kk (B, H, K, K), H^kv (B, H, K, V)). No scale on q: the solve sets the output's size."""
    return _mesa_loop(q, k, v, g, beta, lamb, initial_state, torch.linalg.solve)  # (H^kk + diag λ)⁻¹ q_t


def _mesa_loop(q, k, v, g, beta, lamb, initial_state, solve):
    """MesaNet's token loop with ``solve(H^kk_t + diag λ, q_t)`` for the per-token solve."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    if initial_state is None:
        Hkk, Hkv = q.new_zeros(B, H, K, K), q.new_zeros(B, H, K, V)
    else:
        Hkk, Hkv = initial_state
    ridge = torch.diag_embed(lamb)  # (H, K, K)
    outputs = []
    for t in range(T):
        alpha, bk = g[:, t].exp()[..., None, None], beta[:, t, :, None] * k[:, t]
        Hkk = alpha * Hkk + torch.einsum("bhi,bhj->bhij", bk, k[:, t])
        Hkv = alpha * Hkv + torch.einsum("bhi,bhj->bhij", bk, v[:, t])
        outputs.append(torch.einsum("bhkv,bhk->bhv", Hkv, solve(Hkk + ridge, q[:, t])))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o, (Hkk, Hkv)


def mesa_net_cg_reference(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, lamb: Tensor, *, iterations: int,
    eps: float = CG_EPS, initial_state: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``mesa_net_reference`` with the solve (H^kk_t + diag λ)⁻¹ q_t replaced by ``iterations`` steps of
    ``cg_solve`` on the formed matrix (MesaNet's fast form, as flash-linear-attention's kernels)."""
    def solve(A, b):
        return cg_solve(lambda p: torch.einsum("bhij,bhj->bhi", A, p), b, iterations, eps)

    return _mesa_loop(q, k, v, g, beta, lamb, initial_state, solve)


def cg_solve(apply, b: Tensor, iterations: int, eps: float = CG_EPS) -> Tensor:
    """MesaNet's conjugate gradient for A x = b over the last dim (A symmetric positive definite, given as
    ``apply(p) = A p`` on (..., K)): from x = 0, r = p = b, δ = r·r, each of ``iterations`` steps does

        α = δ / (p·Ap + ε),  x += α p,  r −= α Ap,  δ' = r·r,  p = r + δ' / (δ + ε) · p,  δ = δ'

    with ε = ``CG_EPS`` as flash-linear-attention's kernels (a finished or all-zero token, δ = 0, stays at
    rest). The guard costs accuracy: once δ nears ε the steps shrink, so x stalls about √ε / λ_min from
    the solution. With ε = 0 (a zero denominator then means δ = 0 and gives α = 0) this is textbook CG,
    exact after K steps in exact arithmetic."""
    nonzero = lambda d: torch.where(d > 0, d, torch.ones_like(d))  # d = 0 only where δ = 0: α = 0
    x, r = torch.zeros_like(b), b
    p, delta = r, (r * r).sum(-1, keepdim=True)
    for _ in range(iterations):
        Ap = apply(p)
        alpha = delta / nonzero((p * Ap).sum(-1, keepdim=True) + eps)
        x, r = torch.addcmul(x, alpha, p), torch.addcmul(r, alpha, Ap, value=-1.0)
        delta_new = (r * r).sum(-1, keepdim=True)
        p = torch.addcmul(r, delta_new / nonzero(delta + eps), p)
        delta = delta_new
    return x


def longhorn_reference(
    x: Tensor, k: Tensor, q: Tensor, beta: Tensor, *, initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Longhorn's state update as a token loop (Liu et al. 2024, "Longhorn: State Space Models are
    Amortized Online Learners"). Each channel d keeps a row s_d ∈ R^N, a linear model x_d ≈ s_d·k,
    updated by the implicit (proximal) online step
        s_t = argmin_s ‖s − s_{t−1}‖² + β_t (s·k_t − x_t)²,
    whose closed form is, with ε_t = β_t / (1 + β_t ‖k_t‖²) per channel,
        s_t = s_{t−1} ⊙ (1 − ε_t k_t²) + ε_t x_t k_t   (the diagonal of I − ε k kᵀ, as Longhorn keeps it),
        y_t = s_t · q_t.
    x, β (B, T, D); k, q (B, T, N); the state (B, D, N). Returns y (B, T, D) and the last state."""
    B, T, D = x.shape
    N = k.shape[-1]
    S = x.new_zeros(B, D, N) if initial_state is None else initial_state
    ys = []
    for t in range(T):
        k_t, q_t = k[:, t], q[:, t]
        eps = beta[:, t] / (1 + beta[:, t] * k_t.pow(2).sum(-1, keepdim=True))  # (B, D)
        S = S * (1 - eps[..., None] * k_t.pow(2)[:, None]) + (eps * x[:, t])[..., None] * k_t[:, None]
        ys.append(torch.einsum("bdn,bn->bd", S, q_t))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(B, 0, D)
    return y, S
