"""Decayed linear attention as plain functions, chunked for speed: ``simple_gla`` (a scalar log-decay per
head and token: RetNet, Mamba-2's SSD) and ``gla`` (a log-decay per key feature: GLA, HGRN2).

Both take flash-linear-attention's layout, (B, T, H, ·), and equal the token loops of ``reference`` (the
math is there). Within a chunk of L tokens from the state S0 at its start, with γ_t = Σ_{r≤t} g_r,

    o_t   = Σ_{s≤t} (q_t ⊙ e^{γ_t − γ_s})·k_s v_s + (q_t ⊙ e^{γ_t})ᵀ S0        (scale folded into q)
    S_end = diag(e^{γ_L}) S0 + Σ_s (k_s ⊙ e^{γ_L − γ_s}) v_sᵀ.

Every decay factor is e^{(a sum of the log-decays it spans)}, never of a difference of two cumulative
sums: the log-decays are ≤ 0, so the sums cannot cancel, a log-decay of −inf is an exact reset, and
nothing overflows. For a scalar decay the factors e^{γ_t − γ_s} form one L×L matrix (``decay_products``)
and the chunk is two products. For a decay per key feature they differ per feature; while the chunk's
log-decays sum to no less than −``FACTOR_SAFE`` they factor as e^{γ_t}·e^{−γ_s} (no factor above e^20)
and the chunk is again two products. Stronger decays cut the chunk into sub-chunks (of 16, else 8, 4 or
2 tokens) whose log-decays after their first token pass that test: a pair (t, s) in sub-chunks i > j
factors through the boundaries between them (every term ≤ 1, so this part never overflows),

    e^{γ_t − γ_s} = e^{Σ(g over i up to t)} · e^{Σ(g over the whole sub-chunks between)} · e^{Σ(g after s in j)},

so its block is a product (q ⊙ e^{…}) diag(e^{…}) (k ⊙ e^{…})ᵀ; pairs within one sub-chunk factor about
its first token. Only a single log-decay below −FACTOR_SAFE (or −inf) leaves the pairs of 2-token
sub-chunks to take their factors per pair and feature from the e^{g} they span: exact for any decay.
The state crosses the chunks in a loop of one scaled (K×V) addition each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seqzoo.nn import check_head_tensors, decay_products, scan_chunk_groups

from .reference import gla_reference

__all__ = ["simple_gla", "gla", "ssd", "retention_log_decay", "DEFAULT_CHUNK_SIZE", "SUB_CHUNK"]

#: tokens per chunk of the chunked forms
DEFAULT_CHUNK_SIZE = 64
#: tokens per sub-chunk of ``gla``'s chunked form (the pairs inside one need a decay factor per feature)
SUB_CHUNK = 16
#: ``gla``'s chunked form factors e^{Σ g} within a sub-chunk as e^{Σ to t}·e^{−Σ to s} (two products) when
#: no sub-chunk's sum of log-decays falls below −FACTOR_SAFE (so no factor exceeds e^20); otherwise it forms
#: the factors per pair and feature from the spans themselves
FACTOR_SAFE = 20.0
#: elements of the largest per-group tensor (B·H·chunks·L·max(L, K, V)): the chunks go in groups of this
#: size, so memory and time per token do not grow with T (4 MiB in float32)
GROUP_ELEMENTS = 2**20


def simple_gla(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """S_t = exp(g_t) S_{t−1} + k_t v_tᵀ, o_t = S_tᵀ(scale·q_t): linear attention with a scalar decay.

    q, k (B, T, H, K); v (B, T, H, V); g (B, T, H) log-decays; initial_state (B, H, K, V) or None (zeros);
    scale defaults to K^−½. Returns o (B, T, H, V) in v's dtype and the final state (B, H, K, V) when
    ``output_final_state`` (else None). ``chunk_size`` None runs the token loop; an int the chunked form
    with chunks of that many tokens (any T). Half precision is computed in float32; float32 and float64
    in their own dtype.
    """
    return _run("simple_gla", q, k, v, g, (3,), scale, initial_state, output_final_state, chunk_size)


def gla(
    q: Tensor, k: Tensor, v: Tensor, gk: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """S_t = diag(exp(gk_t)) S_{t−1} + k_t v_tᵀ, o_t = S_tᵀ(scale·q_t): gated linear attention.

    As ``simple_gla`` with gk (B, T, H, K), a log-decay per key feature.
    """
    return _run("gla", q, k, v, gk, (4,), scale, initial_state, output_final_state, chunk_size)


def ssd(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, initial_state: Tensor | None = None,
    output_final_state: bool = False, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """Mamba-2's scan (SSD) with B and C shared by the heads of a group: per head h of group G(h),
    S_t = exp(Δ_t A_h) S_{t−1} + Δ_t x_t B_tᵀ, y_t = S_t C_t (no D term).

    x (b, T, H, P); dt = Δ (b, T, H) (after its softplus); A (H,); B, C (b, T, G, N) with H a multiple of
    G; initial_state (b, H, P, N) (mamba-ssm's layout) or None. Returns y (b, T, H, P) and the final state
    when ``output_final_state``. It is ``simple_gla`` with q = C, k = B, v = Δ·x, g = Δ·A, scale 1 and the
    state transposed (``chunk_size`` None runs that token loop); the chunked form uses the sharing: C·Bᵀ
    once per group and chunk, and the state's read-out and update as one product per group over all its
    heads' states side by side.
    """
    name = "ssd"
    if x.ndim != 4 or dt.shape != x.shape[:3] or A.shape != (x.shape[2],):
        raise ValueError(f"{name}: expected x (b, T, H, P), dt (b, T, H) and A (H,), got {tuple(x.shape)}, "
                         f"{tuple(dt.shape)}, {tuple(A.shape)}")
    b, T, H, P = x.shape
    if B.ndim != 4 or B.shape[:2] != (b, T) or C.shape != B.shape or H % B.shape[2]:
        raise ValueError(f"{name}: expected B and C of shape (b, T, G, N) with G dividing H = {H}, got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    G, N = B.shape[2], B.shape[3]
    if initial_state is not None and tuple(initial_state.shape) != (b, H, P, N):
        raise ValueError(f"{name}: expected initial_state of shape {(b, H, P, N)}, got {tuple(initial_state.shape)}")
    check_head_tensors(name, C, B, x.unflatten(2, (G, H // G)).flatten(3), chunk_size, dt=dt, A=A,
                       initial_state=initial_state)
    out_dtype = x.dtype
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    S = x.new_zeros(b, H, P, N) if initial_state is None else initial_state.to(dtype)
    if chunk_size is None or T == 0:
        per_head = lambda t: t.repeat_interleave(H // G, dim=2)
        y, S_kv = gla_reference(per_head(C), per_head(B), x * dt.unsqueeze(-1), dt * A, scale=1.0,
                                initial_state=S.transpose(-1, -2))
        return y.to(out_dtype), (S_kv.transpose(-1, -2).contiguous() if output_final_state else None)
    # padded tokens: Δ = 0 (no decay, nothing added), C = 0 (y = 0); B and C stand in the head axis per group
    y, S = scan_chunk_groups(_ssd_group, (x * dt.unsqueeze(-1), dt * A, B, C), chunk_size, S,
                             width=max(chunk_size, P, N), group_elements=GROUP_ELEMENTS)
    return y.to(out_dtype), (S if output_final_state else None)


def _ssd_group(v, g, B, C, S):
    """Chunks of one group: v = Δ·x (b, n, H, L, P), g = Δ·A (b, n, H, L), B, C (b, n, G, L, N), from the
    state S (b, H, P, N) at the first chunk's start."""
    b, n, H, L, P = v.shape
    G, N = B.shape[2], B.shape[-1]
    hpg = H // G
    D, Gamma, to_end = decay_products(g)  # (b, n, H, L, L), (b, n, H, L), (b, n, H, L)
    heads = lambda t: t.unflatten(2, (G, hpg))  # (b, n, H, …) -> (b, n, G, hpg, …)
    side_by_side = lambda t: t.permute(0, 1, 2, 4, 3, 5).flatten(-2)  # (b, n, G, hpg, L, P) -> (b, n, G, L, hpg·P)
    # the state at every chunk's start: S ← Γ_L S + Σ_s e^{γ_L − γ_s} v_s B_sᵀ, one product per group
    kv = side_by_side(heads(v * to_end.unsqueeze(-1))).mT @ B  # (b, n, G, hpg·P, N)
    kv = kv.unflatten(3, (hpg, P)).flatten(2, 3)  # (b, n, H, P, N)
    starts = S.new_empty(b, n, H, P, N)
    decay_end = Gamma[..., -1, None, None]
    for c in range(n):
        starts[:, c] = S
        S = torch.addcmul(kv[:, c], decay_end[:, c], S)
    # the outputs: ((C Bᵀ) ⊙ D_h) v_h within the chunk, plus Γ_t S_h C_t from the start state
    CB = (C @ B.mT).unsqueeze(3)  # (b, n, G, 1, L, L): once per group
    y = (CB * heads(D)) @ heads(v)  # (b, n, G, hpg, L, P)
    read = C @ heads(starts).permute(0, 1, 2, 5, 3, 4).flatten(-2)  # (b, n, G, L, hpg·P): C_t · S_h for all h
    y = y + read.unflatten(-1, (hpg, P)).transpose(3, 4) * heads(Gamma).unsqueeze(-1)
    return y.flatten(2, 3), S


def retention_log_decay(num_heads: int, *, dtype=torch.float32, device=None) -> Tensor:
    """RetNet's fixed per-head log-decays log γ_h, γ_h = 1 − 2^(−5−h) for h = 0 … num_heads − 1 (Sun et al.
    2023; fla's retention ops): the g of ``simple_gla`` for every token."""
    h = torch.arange(num_heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.exp2(-5.0 - h)).to(dtype)


def _check(name, q, k, v, g, g_ndim, initial_state, chunk_size) -> None:
    B, T, H, K, V = check_head_tensors(name, q, k, v, chunk_size, g=g, initial_state=initial_state)
    want = (B, T, H) if g_ndim == (3,) else (B, T, H, K)
    if tuple(g.shape) != want:
        raise ValueError(f"{name}: expected the log-decays of shape {want}, got {tuple(g.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"{name}: expected initial_state of shape {(B, H, K, V)}, got {tuple(initial_state.shape)}")


def _run(name, q, k, v, g, g_ndim, scale, initial_state, output_final_state, chunk_size):
    _check(name, q, k, v, g, g_ndim, initial_state, chunk_size)
    out_dtype = v.dtype
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    q, k, v, g = (t.to(dtype) for t in (q, k, v, g))
    S0 = None if initial_state is None else initial_state.to(dtype)
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    if chunk_size is None:
        o, S = gla_reference(q, k, v, g, scale=scale, initial_state=S0)
        S = S.clone() if S is S0 else S  # T = 0: a state of its own, never the caller's tensor
    else:
        o, S = _chunked(q, k, v, g, scale, S0, chunk_size)
    return o.to(out_dtype), (S if output_final_state else None)


def _chunked(q, k, v, g, scale, S0, L):
    """The chunked form on (B, T, H, ·) tensors; g (B, T, H) or (B, T, H, K). Padded tokens have k = v = g = 0:
    no decay and nothing added, so S is unchanged."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if S0 is None else S0
    if T == 0:
        return v.new_zeros(B, 0, H, V), S.clone()
    return scan_chunk_groups(_scalar_group if g.ndim == 3 else _vector_group, (q, k, v, g), L, S,
                             width=max(L, K, V), group_elements=GROUP_ELEMENTS, scale=scale)


def _pass_state(k_end: Tensor, v: Tensor, decay_end: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """The states at every chunk's start and after the last: S ← decay_end ⊙ S + k_endᵀ V per chunk.
    k_end, v (B, N, H, L, ·); decay_end (B, N, H, K, 1) or (B, N, H, 1, 1); S (B, H, K, V)."""
    B, N, H, L, K = k_end.shape
    V = v.shape[-1]
    kv = torch.bmm(k_end.reshape(-1, L, K).mT, v.reshape(-1, L, V)).view(B, N, H, K, V)
    starts = S.new_empty(B, N, H, K, V)
    for c in range(N):
        starts[:, c] = S
        S = torch.addcmul(kv[:, c], decay_end[:, c], S)
    return starts, S


def _scalar_group(q, k, v, g, S):
    """Chunks (B, N, H, L, ·) with a scalar log-decay g (B, N, H, L), from the state S at the first one's start."""
    B, N, H, L, K = q.shape
    V = v.shape[-1]
    D, Gamma, to_end = decay_products(g)  # (B, N, H, L, L), (B, N, H, L), (B, N, H, L)
    starts, S = _pass_state(k * to_end.unsqueeze(-1), v, Gamma[..., -1, None, None], S)
    flat = lambda t: t.reshape(B * N * H, *t.shape[3:])
    P = torch.bmm(flat(q), flat(k).mT).mul_(flat(D))  # (Q Kᵀ) ⊙ D
    o = torch.baddbmm(torch.bmm(P, flat(v)), flat(q * Gamma.unsqueeze(-1)), flat(starts))
    return o.view(B, N, H, L, V), S


def _between_sums(total: Tensor) -> Tensor:
    """span[i, j] = Σ_{j<l<i} total_l for sub-chunk totals (n, m, K): (n, m, m, K) (0 where i ≤ j + 1), each
    a sum of the totals it spans."""
    n, m, K = total.shape
    idx = torch.arange(m, device=total.device)
    after = (idx[None, :] > idx[:, None])[..., None]  # [j, l]: l > j
    upto = total.unsqueeze(1).expand(n, m, m, K).masked_fill(~after, 0.0).cumsum(2)  # [j, i']: Σ_{j<l≤i'}
    return F.pad(upto.transpose(1, 2)[:, :-1], (0, 0, 0, 0, 1, 0))  # [i, j] = [j, i − 1] transposed


def _vector_group(q, k, v, g, S):
    """Chunks (B, N, H, L, ·) with a log-decay per key feature g (B, N, H, L, K) (module docstring)."""
    B, N, H, L, K = q.shape
    V = v.shape[-1]
    # the state: q ⊙ e^{γ_t}, k ⊙ e^{Σ_{r>s} g_r}, and e^{Σ g} over the chunk
    gamma = g.cumsum(-2)
    after = F.pad(g.flip(-2).cumsum(-2).flip(-2)[..., 1:, :], (0, 0, 0, 1))  # Σ_{r>s} g_r
    starts, S = _pass_state(k * after.exp(), v, gamma[..., -1, :].exp().unsqueeze(-1), S)
    flat = lambda t: t.reshape(B * N * H, *t.shape[3:])
    o = torch.bmm(flat(q * gamma.exp()), flat(starts))  # the state's part, (B·N·H, L, V)

    # within the chunk, by sub-chunks of c tokens: the largest c (the whole chunk, SUB_CHUNK, /2, /4, 2) whose
    # sums of log-decays after each sub-chunk's first token all stay above −FACTOR_SAFE factors its pairs
    # (the whole chunk: one product, as linear attention's); none (a log-decay below −FACTOR_SAFE): the
    # per-pair path at the smallest sub-chunks
    sizes = [L] + [c for c in (SUB_CHUNK, SUB_CHUNK // 2, SUB_CHUNK // 4, 2) if c >= 2 and L % c == 0 and c < L]
    for c in sizes:
        gs = g.reshape(B * N * H, L // c, c, K)
        inside = F.pad(gs[..., 1:, :], (0, 0, 1, 0)).cumsum(-2)  # Σ_{first<r≤t} g_r within t's sub-chunk
        if bool(inside.amin() >= -FACTOR_SAFE):
            A = _factored_blocks(q, k, gs, inside)
            break
    else:
        A = _pairwise_blocks(q, k, g.reshape(B * N * H, L // sizes[-1], sizes[-1], K))
    o = torch.baddbmm(o, A, flat(v))
    return o.view(B, N, H, L, V), S


def _cross_blocks(q: Tensor, k: Tensor, gs: Tensor) -> tuple[Tensor, Tensor]:
    """The pairs of tokens in different sub-chunks (n, m, m, c, c), each factor a product of terms ≤ 1: for
    t in sub-chunk i and s in j < i, e^{Σ g over i up to t} · e^{Σ g over the sub-chunks between} ·
    e^{Σ g after s in j}; zero blocks for j ≥ i. Also returns the causal mask (c, c) of a sub-chunk."""
    n, m, c, K = gs.shape
    qs, ks = q.reshape(n, m, c, K), k.reshape(n, m, c, K)
    upto = gs.cumsum(-2)  # Σ of g from the sub-chunk's start to t (inclusive)
    past = F.pad(gs.flip(-2).cumsum(-2).flip(-2)[..., 1:, :], (0, 0, 0, 1))  # Σ_{r>s} g_r within s's sub-chunk
    idx = torch.arange(m, device=q.device)
    span = _between_sums(upto[..., -1, :]).masked_fill(~(idx[None, :] < idx[:, None])[..., None], float("-inf"))
    blocks = torch.matmul((qs * upto.exp()).unsqueeze(2) * span.exp().unsqueeze(-2), (ks * past.exp()).unsqueeze(1).mT)
    return blocks, torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # [t, s]: s ≤ t


def _with_diagonal(blocks: Tensor, inner: Tensor) -> Tensor:
    """The chunk's L × L weights from the cross blocks (n, m, m, c, c) and the pairs within each sub-chunk
    (n, m, c, c)."""
    n, m, _, c, _ = blocks.shape
    blocks = blocks + torch.eye(m, dtype=blocks.dtype, device=blocks.device)[:, :, None, None] * inner.unsqueeze(2)
    return blocks.transpose(2, 3).reshape(n, m * c, m * c)  # (…, i, c, j, c) -> (L, L)


def _factored_blocks(q, k, gs, inside):
    """The chunk's L × L weights when every e^{−Σ g} after a sub-chunk's first token is at most
    e^FACTOR_SAFE: a pair in one sub-chunk is e^{inside_t}·e^{−inside_s} (one product per sub-chunk)."""
    n, m, c, K = gs.shape
    blocks, causal = _cross_blocks(q, k, gs)
    qs, ks = q.reshape(n, m, c, K), k.reshape(n, m, c, K)
    inner = torch.matmul(qs * inside.exp(), (ks * (-inside).exp()).mT).masked_fill(~causal, 0.0)
    return _with_diagonal(blocks, inner)


def _pairwise_blocks(q, k, gs):
    """The chunk's L × L weights with the factors of pairs in one sub-chunk formed per pair and feature as
    products of the e^{g} they span (exact for any log-decay ≤ 0, −inf included)."""
    n, m, c, K = gs.shape
    blocks, causal = _cross_blocks(q, k, gs)
    qs, ks = q.reshape(n, m, c, K), k.reshape(n, m, c, K)
    factors = torch.where(~causal[..., None], gs.exp().unsqueeze(-3), 1.0).cumprod(-2)  # [s, t]: Π_{s<r≤t} e^{g_r}
    inner = torch.linalg.vecdot(qs.unsqueeze(-2) * ks.unsqueeze(-3), factors.transpose(-2, -3)).masked_fill(~causal, 0.0)
    return _with_diagonal(blocks, inner)
