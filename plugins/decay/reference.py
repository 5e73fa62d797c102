"""The math of decayed linear attention, first: a plain token loop, the specification every fast path is
tested against.

Per head, a matrix state S ∈ R^{K×V} accumulates the outer products of keys and values under a decay:

    S_t = diag(exp(gk_t)) S_{t−1} + k_t v_tᵀ        (gk_t ∈ R^K, a log-decay per key feature: GLA, HGRN2)
    S_t = exp(g_t) S_{t−1} + k_t v_tᵀ               (g_t a scalar per head: RetNet, Mamba-2's SSD)
    o_t = S_tᵀ (scale · q_t)                        (the output rule, read after the update)

As a learner: S is a linear model v ≈ Sᵀk trained by one gradient step of the inner loss −⟨Sᵀk_t, v_t⟩
(Hebbian, no error correction, rate 1) after a weight decay; with gk ≡ 0 it is linear attention.
Tensors are (B, T, H, ·) as flash-linear-attention's API: q, k (B, T, H, K), v (B, T, H, V), g (B, T, H) or
gk (B, T, H, K) in log space (≤ 0 for a decay), states (B, H, K, V). Everything is computed in the input
dtype (float64 works).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gla_reference", "simple_gla_reference"]


def gla_reference(
    q: Tensor, k: Tensor, v: Tensor, gk: Tensor, *, scale: float | None = None, initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The token loop above with a decay per key feature, gk (B, T, H, K), or per head, gk (B, T, H).
    Returns o (B, T, H, V) and S_T (B, H, K, V)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    if gk.ndim == 3:
        gk = gk.unsqueeze(-1)  # one decay for every key feature
    outputs = []
    for t in range(T):
        S = S * gk[:, t].exp().unsqueeze(-1) + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outputs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o, S


def simple_gla_reference(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None, initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The scalar-decay case: ``gla_reference`` with g (B, T, H), one log-decay per head and token."""
    return gla_reference(q, k, v, g, scale=scale, initial_state=initial_state)
