"""The delta rule and the gated delta rule as plain functions, chunked for speed (the UT/WY form).

``delta_rule`` and ``gated_delta_rule`` take flash-linear-attention's layout, (B, T, H, ·), and equal
the token loops of ``reference`` (the math is there). Within a chunk of L tokens, from the state S0
at its start, with γ_t = Σ_{s≤t} g_s (the chunk's cumulative log-decay), Γ_t = exp(γ_t) and
D[t, s] = exp(γ_t − γ_s) for s ≤ t (else 0), the errors u_t of the recurrence solve one unit
lower-triangular system:

    (I + M) U = diag(β) (V − diag(Γ) K S0),    M[t, s] = β_t D[t, s] k_t·k_s  for s < t,

so U = Uv − W S0 with Uv = (I + M)⁻¹ diag(β) V and W = (I + M)⁻¹ diag(βΓ) K ((I + M)⁻¹ formed once
per chunk, applied to both right-hand sides in one product). Then, with q already scaled and P = (Q Kᵀ) ⊙ D,

    O     = P Uv + (diag(Γ) Q − P W) S0                          (the chunk's outputs)
    S_end = Γ_L S0 + K̃ᵀ U = (Γ_L I − K̃ᵀ W) S0 + K̃ᵀ Uv,   K̃ = diag(exp(γ_L − γ)) K.

Everything but the last line is computed for many chunks at once; the state crosses the chunks in a
loop of one (K×K)·(K×V) product each. Per chunk that is nine L×L×K-sized products (linear attention's
chunked form has four) and one L×L triangular inverse. A vector β (one rate per value column) makes each value
column a linear model of its own, so it runs as V heads of value width 1.
"""

from __future__ import annotations

import functools

import torch
from einops import rearrange
from torch import Tensor

from seqzoo.nn import check_head_tensors, decay_products, scan_chunk_groups

from .reference import (
    CG_EPS,
    cg_solve,
    gated_delta_rule_reference,
    longhorn_reference,
    mesa_net_cg_reference,
    mesa_net_reference,
)

__all__ = ["delta_rule", "gated_delta_rule", "mesa_net", "mesa_net_cg", "longhorn_scan", "DEFAULT_CHUNK_SIZE",
           "MESA_CHUNK_SIZE"]

#: tokens per chunk of the chunked form
DEFAULT_CHUNK_SIZE = 64
#: tokens per chunk of MesaNet's chunked forms (the exact one forms every token's statistics at L·K² a token)
MESA_CHUNK_SIZE = 16
#: elements of the largest per-group tensor (B·H·chunks·L·max(L, K)) of the chunked form: the chunks go
#: in groups of this size, so memory and time per token do not grow with T (4 MiB in float32)
GROUP_ELEMENTS = 2**20


def delta_rule(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """The delta rule S_t = S_{t−1} + k_t (β_t ⊙ (v_t − S_{t−1}ᵀk_t))ᵀ, o_t = S_tᵀ(scale·q_t).

    q, k (B, T, H, K); v (B, T, H, V); beta (B, T, H) or (B, T, H, V); initial_state (B, H, K, V) or
    None (zeros); scale defaults to K^−½. Returns o (B, T, H, V) in v's dtype and the final state
    (B, H, K, V) when ``output_final_state`` (else None). ``chunk_size`` None runs the token loop;
    an int runs the chunked form with chunks of that many tokens (any T). Half-precision inputs are
    computed in float32; float32 and float64 in their own dtype.
    """
    return _run("delta_rule", q, k, v, None, beta, scale, initial_state, output_final_state, chunk_size)


def gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """The gated delta rule S_t = α_t S_{t−1} + k_t (β_t ⊙ (v_t − α_t S_{t−1}ᵀk_t))ᵀ, α_t = exp(g_t).

    As ``delta_rule``, with g (B, T, H) the per-token log-decay (≤ 0 for a decay).
    """
    return _run("gated_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)


# --- checks ----------------------------------------------------------------------------------------
def _check(name, q, k, v, g, beta, initial_state, chunk_size) -> None:
    B, T, H, K, V = check_head_tensors(name, q, k, v, chunk_size, beta=beta, g=g, initial_state=initial_state)
    if tuple(beta.shape) not in ((B, T, H), (B, T, H, V)):
        raise ValueError(f"{name}: expected beta of shape {(B, T, H)} or {(B, T, H, V)}, got {tuple(beta.shape)}")
    if g is not None and tuple(g.shape) != (B, T, H):
        raise ValueError(f"{name}: expected g of shape {(B, T, H)}, got {tuple(g.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(
            f"{name}: expected initial_state of shape {(B, H, K, V)}, got {tuple(initial_state.shape)}")


def _run(name, q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size):
    _check(name, q, k, v, g, beta, initial_state, chunk_size)
    out_dtype = v.dtype
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    cast = lambda t: None if t is None else t.to(dtype)
    q, k, v, g, beta, S0 = map(cast, (q, k, v, g, beta, initial_state))
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    if chunk_size is None:
        o, S = gated_delta_rule_reference(q, k, v, g, beta, scale=scale, initial_state=S0)
        S = S.clone() if S is S0 else S  # T = 0: a state of its own, never the caller's tensor
    elif beta.ndim == 4:
        o, S = _vector_beta(q, k, v, g, beta, scale, S0, chunk_size)
    else:
        o, S = _chunked(q, k, v, g, beta, scale, S0, chunk_size)
    return o.to(out_dtype), (S if output_final_state else None)


def _vector_beta(q, k, v, g, beta, scale, S0, chunk_size):
    """A rate per value column: column j of S is a model of its own (its own error and update), so
    the V columns run as V heads of value width 1 (the keys, queries and decays shared)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    per_column = lambda t: t.unsqueeze(3).expand(B, T, H, V, K).reshape(B, T, H * V, K)
    S0 = None if S0 is None else rearrange(S0, "b h k v -> b (h v) k 1")
    g = None if g is None else g.unsqueeze(-1).expand(B, T, H, V).reshape(B, T, H * V)
    o, S = _chunked(per_column(q), per_column(k), v.reshape(B, T, H * V, 1), g, beta.reshape(B, T, H * V),
                    scale, S0, chunk_size)
    return o.reshape(B, T, H, V), rearrange(S, "b (h v) k 1 -> b h k v", v=V)


# --- the chunked form ------------------------------------------------------------------------------
def _chunked(q, k, v, g, beta, scale, S0, L):
    """The chunked form (module docstring) on (B, T, H, ·) tensors with a scalar β per head. Padded tokens
    have k = v = β = g = 0: u = 0 and no decay, so S is unchanged."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if S0 is None else S0
    if T == 0:
        return v.new_zeros(B, 0, H, V), S.clone()
    return scan_chunk_groups(_chunk_group, (q, k, v, beta, g), L, S, width=max(L, K, V),
                             group_elements=GROUP_ELEMENTS, scale=scale)


def _chunk_group(q, k, v, beta, g, S):
    """Chunks (B, N, H, L, ·) of one group from the state S (B, H, K, V) at the first one's start.

    Every chunk-local product is one ``bmm`` over the B·N·H chunks, transposes passed as strides (no
    copies). (I + M)⁻¹ is formed once per chunk by a triangular solve against the identity and applied to
    both right-hand sides by one product (faster here than solving for the L × (K + V) right-hand side).
    """
    B, N, H, L, K = q.shape
    V = v.shape[-1]
    flat = lambda t: t.reshape(B * N * H, *t.shape[3:])
    q, k, v, beta = flat(q), flat(k), flat(v), flat(beta)
    if g is None:
        D = torch.ones(L, L, dtype=q.dtype, device=q.device).tril()  # no decay: D[t, s] = 1 for s ≤ t
        Gamma = to_end = None
    else:
        D, Gamma, to_end = decay_products(flat(g))
    b = beta.unsqueeze(-1)
    M = torch.bmm(k, k.mT).mul_(D).mul_(b)  # β_t D[t, s] k_t·k_s; the diagonal is ignored below
    eye = torch.eye(L, dtype=q.dtype, device=q.device).expand(M.shape)
    T_inv = torch.linalg.solve_triangular(M, eye, upper=False, unitriangular=True)  # (I + M)⁻¹
    rhs = torch.cat([k * (b if Gamma is None else b * Gamma.unsqueeze(-1)), v * b], dim=-1)  # [diag(βΓ)K | diag(β)V]
    X = torch.bmm(T_inv, rhs)  # [W | Uv]
    P = torch.bmm(q, k.mT).mul_(D)  # (Q Kᵀ) ⊙ D
    PX = torch.bmm(P, X)  # [P W | P Uv]
    Q_state = (q if Gamma is None else q * Gamma.unsqueeze(-1)) - PX[..., :K]  # diag(Γ) Q − P W
    K_end = k if to_end is None else k * to_end.unsqueeze(-1)  # K̃
    KX = torch.bmm(K_end.mT, X).view(B, N, H, K, K + V)  # [K̃ᵀW | K̃ᵀUv]: S_end = A S0 + K̃ᵀ Uv
    decay_end = 1.0 if Gamma is None else Gamma[:, -1].view(B, N, H, 1, 1)
    A = torch.eye(K, dtype=q.dtype, device=q.device) * decay_end - KX[..., :K]  # Γ_L I − K̃ᵀ W
    S_start = q.new_empty(B, N, H, K, V)
    for c in range(N):
        S_start[:, c] = S
        S = torch.baddbmm(KX[:, c, :, :, K:].flatten(0, 1), A[:, c].flatten(0, 1), S.flatten(0, 1)).view_as(S)
    o = torch.baddbmm(PX[..., K:], Q_state, S_start.view(B * N * H, K, V))  # P Uv + (diag(Γ) Q − P W) S0
    return o.view(B, N, H, L, V), S


# --- MesaNet ---------------------------------------------------------------------------------------
def mesa_net(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, lamb: Tensor, *,
    initial_state: tuple[Tensor, Tensor] | None = None, output_final_state: bool = False,
    chunk_size: int | None = MESA_CHUNK_SIZE,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """MesaNet's exact output o_t = H^kv_tᵀ (H^kk_t + diag λ)⁻¹ q_t (the math: ``mesa_net_reference``).

    q, k (B, T, H, K); v (B, T, H, V); g (B, T, H) log-decays; beta (B, T, H); lamb (H, K) > 0; the state
    (H^kk (B, H, K, K), H^kv (B, H, K, V)) or None (zeros). Returns o (B, T, H, V) and the final state
    when ``output_final_state``. ``chunk_size`` None runs the token loop; an int the chunked form: per
    chunk, every token's H^kk_t = Γ_t H^kk_0 + Σ_{s≤t} D_ts β_s k_s k_sᵀ as one (L×L)·(L×K²) product,
    one batched Cholesky solve for all the chunk's tokens, and H^kv's part as in linear attention,
    (X Kᵀ ⊙ D diag(β)) V + diag(Γ) X H^kv_0. Exact (no conjugate-gradient iterations).
    """
    return _mesa_run("mesa_net", q, k, v, g, beta, lamb, initial_state, output_final_state, chunk_size, None)


def mesa_net_cg(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, lamb: Tensor, *, iterations: int = 30,
    eps: float = CG_EPS, initial_state: tuple[Tensor, Tensor] | None = None, output_final_state: bool = False,
    chunk_size: int | None = MESA_CHUNK_SIZE,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """MesaNet's fast form, as flash-linear-attention's kernels compute it: ``mesa_net`` with
    (H^kk_t + diag λ)⁻¹ q_t replaced by ``iterations`` steps of conjugate gradient from x = 0
    (``reference.cg_solve``, its divisions guarded by ``eps``: with fla's 1e-5 the iterate stalls near
    √eps / λ_min from the solve; with eps = 0, K or more steps reach the exact solve to the precision the
    conditioning allows). ``chunk_size`` None runs the token loop (``mesa_net_cg_reference``); an int the chunked
    form, which applies H^kk_t + diag λ to all of a chunk's tokens' search directions at once without
    forming the matrices (per step two (L×L)·(L×K)-sized products and one (L×K)·(K×K)), and reads
    the outputs out as ``mesa_net``.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"mesa_net_cg: expected iterations to be a non-negative int, got {iterations!r}")
    if not eps >= 0:
        raise ValueError(f"mesa_net_cg: expected eps >= 0, got {eps!r}")
    return _mesa_run("mesa_net_cg", q, k, v, g, beta, lamb, initial_state, output_final_state, chunk_size,
                     (iterations, float(eps)))


def _mesa_run(name, q, k, v, g, beta, lamb, initial_state, output_final_state, chunk_size, cg):
    """Checks, casts and runs: the exact solve (``cg`` None) or CG (``cg`` = (iterations, eps))."""
    _check(name, q, k, v, g, beta, None, chunk_size)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"{name}: expected beta of shape {(B, T, H)}, got {tuple(beta.shape)}")
    if not isinstance(lamb, Tensor) or tuple(lamb.shape) != (H, K):
        raise ValueError(f"{name}: expected lamb, a tensor of shape {(H, K)}, got "
                         f"{tuple(lamb.shape) if isinstance(lamb, Tensor) else type(lamb).__name__}")
    if initial_state is not None:
        if (not isinstance(initial_state, tuple) or len(initial_state) != 2
                or tuple(initial_state[0].shape) != (B, H, K, K) or tuple(initial_state[1].shape) != (B, H, K, V)):
            raise ValueError(f"{name}: expected initial_state = (H^kk {(B, H, K, K)}, H^kv {(B, H, K, V)})")
    out_dtype = v.dtype
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    cast = lambda t: t.to(dtype)
    q, k, v, g, beta, lamb = map(cast, (q, k, v, g, beta, lamb))
    state = None if initial_state is None else tuple(map(cast, initial_state))
    if chunk_size is None:
        given = state
        if cg is None:
            o, state = mesa_net_reference(q, k, v, g, beta, lamb, initial_state=state)
        else:
            o, state = mesa_net_cg_reference(q, k, v, g, beta, lamb, iterations=cg[0], eps=cg[1], initial_state=state)
        if given is not None and state[0] is given[0]:  # T = 0: states of their own
            state = (state[0].clone(), state[1].clone())
    else:
        o, state = _mesa_chunked(q, k, v, g, beta, lamb, state, chunk_size, cg)
    return o.to(out_dtype), (state if output_final_state else None)


def _mesa_chunked(q, k, v, g, beta, lamb, state, L, cg=None):
    """The chunked form from ``state`` (or zeros): the exact solve, or CG (``cg`` = (iterations, eps)). Padded
    tokens have β = k = v = g = 0, which leave the statistics unchanged, and q = 0, which gives o = 0."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    Hkk, Hkv = (q.new_zeros(B, H, K, K), q.new_zeros(B, H, K, V)) if state is None else state
    if T == 0:
        return v.new_zeros(B, 0, H, V), (Hkk.clone(), Hkv.clone())
    if cg is None:  # a token's K×K system is formed: the group's size counts it
        width = max(1, K * max(K, L) // 4)
        solve = functools.partial(_mesa_exact_solve, ridge=torch.diag_embed(lamb)[None, None, :, None])
    else:
        width = max(K, L, V)
        solve = functools.partial(_mesa_cg_solve, lamb=lamb[None, None, :, None], cg=cg)

    def group(q_, k_, v_, g_, b_, S):
        Gamma, Wts, S_kk, S_kv, *S = _mesa_statistics(k_, v_, g_, b_, *S)
        x = solve(q_, k_, Gamma, Wts, S_kk)  # ≈ (H^kk_t + Λ)⁻¹ q_t, (B, N, H, L, K)
        return ((x @ k_.transpose(-1, -2)) * Wts) @ v_ + Gamma.unsqueeze(-1) * (x @ S_kv), tuple(S)

    return scan_chunk_groups(group, (q, k, v, g, beta), L, (Hkk, Hkv), width=width, group_elements=GROUP_ELEMENTS)


def _mesa_statistics(k, v, g, beta, Hkk, Hkv):
    """For chunks (B, N, H, L, ·) from the statistics (H^kk, H^kv) at the first one's start: Γ, the
    weights Wts[t, s] = D[t, s] β_s, the statistics at every chunk's start (B, N, H, K, ·) and those at the
    last one's end. Within a chunk H^kk_t = Γ_t H^kk_0 + Σ_{s≤t} Wts[t, s] k_s k_sᵀ (H^kv_t alike)."""
    D, Gamma, to_end = decay_products(g)
    Wts = D * beta.unsqueeze(-2)  # D[t, s] β_s
    end = (to_end * beta).unsqueeze(-1)  # e^{γ_L − γ_s} β_s
    kv_end, kk_end = (k * end).transpose(-1, -2) @ v, (k * end).transpose(-1, -2) @ k
    starts_kk, starts_kv = [], []
    for c in range(k.shape[1]):  # the statistics at each chunk's start
        starts_kk.append(Hkk)
        starts_kv.append(Hkv)
        decay = Gamma[:, c, :, -1, None, None]
        Hkk, Hkv = decay * Hkk + kk_end[:, c], decay * Hkv + kv_end[:, c]
    return Gamma, Wts, torch.stack(starts_kk, dim=1), torch.stack(starts_kv, dim=1), Hkk, Hkv


def _mesa_exact_solve(q, k, Gamma, Wts, S_kk, *, ridge):
    """Every token's H^kk_t + Λ formed as one (L×L)·(L×K²) product per chunk, then one batched Cholesky."""
    B, N, H, L, K = q.shape
    outer = (k.unsqueeze(-1) * k.unsqueeze(-2)).reshape(-1, L, K * K)  # k_s k_sᵀ, (B·N·H, L, K²)
    base = torch.addcmul(ridge, Gamma[..., None, None], S_kk.unsqueeze(3))  # Γ_t H^kk_0 + Λ, (B, N, H, L, K, K)
    A = torch.baddbmm(base.view(-1, L, K * K), Wts.reshape(-1, L, L), outer).view(B, N, H, L, K, K)  # H^kk_t + Λ
    factor, info = torch.linalg.cholesky_ex(A)
    if info.any():
        raise ValueError("mesa_net: H^kk_t + diag(lamb) is not positive definite (expected lamb > 0 and beta >= 0)")
    return torch.cholesky_solve(q.unsqueeze(-1), factor).squeeze(-1)


def _mesa_cg_solve(q, k, Gamma, Wts, S_kk, *, lamb, cg):
    """``cg_solve`` for every token of the chunks at once, (H^kk_t + Λ) p applied without forming H^kk_t:
    Γ_t H^kk_0 p + Σ_{s≤t} Wts[t, s] k_s (k_s·p) + λ ⊙ p, per chunk two (L×L)·(L×K)-sized products and
    one (L×K)·(K×K) (H^kk_0 is symmetric)."""
    def apply(p):
        return torch.addcmul(((p @ k.transpose(-1, -2)) * Wts) @ k, Gamma.unsqueeze(-1), p @ S_kk).addcmul_(lamb, p)
    return cg_solve(apply, q, *cg)


# --- Longhorn --------------------------------------------------------------------------------------
def longhorn_scan(
    x: Tensor, k: Tensor, q: Tensor, beta: Tensor, *, initial_state: Tensor | None = None,
    output_final_state: bool = False, chunk_size: int | None = 16,
) -> tuple[Tensor, Tensor | None]:
    """Longhorn's recurrence (the math: ``longhorn_reference``): x, β (B, T, D); k, q (B, T, N); the
    state (B, D, N). Returns y (B, T, D) and the final state when ``output_final_state``.

    ``chunk_size`` None runs the token loop; an int cuts the sequence into chunks whose decays
    1 − ε k² and inputs ε x k ((B, L, D, N) each) are formed by whole-chunk operations, the recurrence
    then running over the chunk's positions as one fused multiply-add each (in place when autograd does
    not record), and the outputs s_t·q_t of a chunk come from one batched product."""
    name = "longhorn_scan"
    for label, t in (("x", x), ("k", k), ("q", q), ("beta", beta), ("initial_state", initial_state)):
        if t is not None and (not isinstance(t, Tensor) or not t.is_floating_point()):
            raise TypeError(f"{name}: expected {label} to be a floating-point torch.Tensor")
    if x.ndim != 3 or k.ndim != 3:
        raise ValueError(f"{name}: expected x of shape (B, T, D) and k of shape (B, T, N), got "
                         f"{tuple(x.shape)} and {tuple(k.shape)}")
    B, T, D = x.shape
    N = k.shape[-1]
    if tuple(k.shape) != (B, T, N) or tuple(q.shape) != (B, T, N):
        raise ValueError(f"{name}: expected k and q of shape {(B, T, N)}, got {tuple(k.shape)}, {tuple(q.shape)}")
    if tuple(beta.shape) != (B, T, D):
        raise ValueError(f"{name}: expected beta of shape {(B, T, D)}, got {tuple(beta.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, D, N):
        raise ValueError(f"{name}: expected initial_state of shape {(B, D, N)}, got {tuple(initial_state.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{name}: expected chunk_size to be None or a positive int, got {chunk_size!r}")
    out_dtype = x.dtype
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, k, q, beta = x.to(dtype), k.to(dtype), q.to(dtype), beta.to(dtype)
    S = x.new_zeros(B, D, N) if initial_state is None else initial_state.to(dtype)
    if chunk_size is None:
        y, S_end = longhorn_reference(x, k, q, beta, initial_state=S)
        return y.to(out_dtype), ((S_end.clone() if S_end is S else S_end) if output_final_state else None)
    eps = beta / (1 + beta * k.pow(2).sum(-1, keepdim=True))  # (B, T, D)
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (x, k, q, beta, S))
    ys = []
    for lo in range(0, T, chunk_size):
        part = slice(lo, lo + chunk_size)
        e, kk = eps[:, part, :, None], k[:, part, None, :]  # (B, L, D, 1), (B, L, 1, N)
        decay = 1 - e * kk.square()  # (B, L, D, N)
        states = (e * x[:, part, :, None]) * kk  # the inputs ε x k; overwritten with the states below
        if track:
            steps = []
            for i in range(states.shape[1]):
                S = torch.addcmul(states[:, i], decay[:, i], S)
                steps.append(S)
            states = torch.stack(steps, dim=1)
        else:
            for i in range(states.shape[1]):
                S = states[:, i].addcmul_(decay[:, i], S)
        ys.append((states @ q[:, part, :, None]).squeeze(-1))  # s_t · q_t
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(B, 0, D)
    if not track or T == 0:
        S = S.clone()  # a view into the last chunk's buffer (or, for T = 0, the caller's state)
    return y.to(out_dtype), (S if output_final_state else None)
