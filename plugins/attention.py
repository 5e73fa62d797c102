"""Attention layers: causal linear attention (a matrix state) and causal softmax attention (a KV cache).

In the TTT paper's terms both are "an initial state, an update rule, an output rule":

- ``linear_attention``: state S_t = Σ_{s≤t} φ(k_s) v_sᵀ (and z_t = Σ_{s≤t} φ(k_s) when normalized);
  output y_t = φ(q_t)ᵀ S_t [/ (φ(q_t)ᵀ z_t + eps)]. With ``feature_map="identity", normalize=False`` it
  is exactly TTT-Linear with one step of batch GD from W0 = 0 (Theorem 1).
- ``self_attention``: state = every key and value so far; output y_t = softmax(q_t Kᵀ/√d) V.
  It is the Nadaraya-Watson learner with an exp kernel (Theorem 2).
- ``sliding_window_attention``: the same over the last ``window_size`` keys only; state = a FIFO of
  those keys and values (the non-parametric learner with a bounded memory).

Both share the projections of ttt-lm-pytorch (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, no bias)
and its Mamba-backbone options: ``share_qk`` (one ``q_proj`` then depthwise causal convs ``conv_q`` and
``conv_k``) and ``use_gate`` (output ``o_proj(gelu_tanh(g_proj(x)) * y)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

import seqzoo
from seqzoo import State
from seqzoo.nn import HeadProjections, apply_rope, by_segments, chunk_length

__all__ = [
    "LinearAttention",
    "LinearAttentionConfig",
    "SelfAttention",
    "SelfAttentionConfig",
    "FEATURE_MAPS",
    "linear_attention_chunked",
    "SlidingWindowAttention",
    "SlidingWindowAttentionConfig",
    "windowed_attention",
]


def _elu_plus_one(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


def _identity(x: Tensor) -> Tensor:
    return x


#: φ applied to queries and keys of linear attention, per head.
FEATURE_MAPS = {"identity": _identity, "elu+1": _elu_plus_one}


# --- linear attention ----------------------------------------------------------------------------
@dataclass
class LinearAttentionConfig:
    num_heads: int = field(default=4, metadata={"help": "number of heads; d_model must be divisible by it"})
    feature_map: str = field(
        default="elu+1", metadata={"help": "φ on queries and keys: 'elu+1' or 'identity'"}
    )
    normalize: bool = field(
        default=True,
        metadata={"help": "divide by φ(q_t)·z_t + eps (z_t = Σ φ(k_s)); False: no denominator, no scaling"},
    )
    eps: float = field(default=1e-6, metadata={"help": "added to the denominator when normalize=True"})
    chunk_size: int = field(default=64, metadata={"help": "tokens per chunk of the chunked forward"})
    scan_blocks: int | None = field(default=None, metadata={
        "help": "chunks per group (and segment) of the chunked forward, whose per-chunk states are formed "
                "together (default: GROUP_STATE_ELEMENTS // (batch·heads·d·d), at least 1)"})
    use_gate: bool = field(default=False, metadata={"help": "output o_proj(gelu_tanh(g_proj(x)) * y)"})
    share_qk: bool = field(
        default=False,
        metadata={"help": "one q_proj, then depthwise causal convs conv_q / conv_k for q and k"},
    )
    conv_kernel: int = field(default=4, metadata={"help": "width of conv_q / conv_k (with share_qk)"})


#: Elements of one group's per-chunk states (B, H, chunks, d, e) in the chunked forward (4 MiB in float32):
#: the groups go in order, each starting from the state the previous one ends in, so the buffers stay
#: the same size (and in cache) however long the sequence; e.g. 21 chunks of 64 tokens at 12 heads of 64.
GROUP_STATE_ELEMENTS = 2**20


def _chunks_per_group(per_chunk: int, T: int, chunk_size: int, device, blocks: int | None) -> int:
    """Chunks per group of the chunked form for per-chunk states of ``per_chunk`` elements (B·H·d·e):
    ``blocks``, else on the CPU as many as keep a group's states at ``GROUP_STATE_ELEMENTS`` (at least
    1), elsewhere all of T's (one group)."""
    if blocks is not None:
        return blocks
    if torch.device(device).type == "cpu":
        return max(1, GROUP_STATE_ELEMENTS // max(1, per_chunk))
    return max(1, -(-T // chunk_size))


def linear_attention_chunked(
    q: Tensor, k: Tensor, v: Tensor, S0: Tensor, z0: Tensor | None, chunk_size: int, eps: float = 0.0,
    blocks: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Causal linear attention on features q, k (B, H, T, d) and values v (B, H, T, e), chunked.

    Starting from S0 (B, H, d, e) (and z0 (B, H, d) when normalized, else None), returns y (B, H, T, e),
    S_T and z_T. Inside a chunk: a masked (L × L) matmul; across chunks: the state at each chunk start,
    an exclusive cumulative sum of the chunks' Σ k vᵀ. The chunks go in groups of ``blocks`` (default: on
    the CPU ``GROUP_STATE_ELEMENTS // (B·H·d·e)``, at least 1; elsewhere all of them), every chunk of a
    group at once, each group from the state the previous one ends in: memory and time per token do not
    grow with T.
    """
    B, H, T, d = q.shape
    e = v.shape[-1]
    if blocks is not None and blocks < 1:
        raise ValueError(f"linear_attention_chunked: expected blocks to be None or at least 1, got {blocks}")
    group = chunk_size * _chunks_per_group(B * H * d * e, T, chunk_size, q.device, blocks)
    if T <= group:
        return _linear_attention_group(q, k, v, S0, z0, chunk_size, eps)
    ys, S, z = [], S0, z0
    for start in range(0, T, group):
        part = slice(start, start + group)
        y, S, z = _linear_attention_group(q[:, :, part], k[:, :, part], v[:, :, part], S, z, chunk_size, eps)
        ys.append(y)
    return torch.cat(ys, dim=2), S, z


def _linear_attention_group(
    q: Tensor, k: Tensor, v: Tensor, S0: Tensor, z0: Tensor | None, chunk_size: int, eps: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``linear_attention_chunked`` on one group: all its chunks at once."""
    T = q.shape[2]
    L = chunk_length(chunk_size, T)  # a short sequence: one chunk of its length
    n = -(-T // L)
    pad = n * L - T  # zero features add nothing to S or z; the padded rows are cut off
    chunks = lambda t: rearrange(F.pad(t, (0, 0, 0, pad)), "b h (n l) d -> b h n l d", l=L)
    qc, kc, vc = chunks(q), chunks(k), chunks(v)

    # inter-chunk: S at the start of chunk c = S0 + Σ_{c' < c} Σ_{s in c'} k_s v_sᵀ
    kv = torch.einsum("bhnld,bhnle->bhnde", kc, vc)
    S_all = torch.cat([S0.unsqueeze(2), S0.unsqueeze(2) + kv.cumsum(2)], dim=2)  # (B, H, n+1, d, e)
    S_start, S_end = S_all[:, :, :-1], S_all[:, :, -1]

    # intra-chunk: A[i, j] = q_i · k_j for j ≤ i
    A = torch.einsum("bhnid,bhnjd->bhnij", qc, kc).tril()
    num = torch.einsum("bhnid,bhnde->bhnie", qc, S_start) + A @ vc  # φ(q_t)ᵀ S_t

    z_end = None
    if z0 is not None:
        z_all = torch.cat([z0.unsqueeze(2), z0.unsqueeze(2) + kc.sum(3).cumsum(2)], dim=2)  # (B, H, n+1, d)
        den = torch.einsum("bhnid,bhnd->bhni", qc, z_all[:, :, :-1]) + A.sum(-1)  # φ(q_t)ᵀ z_t
        num = num / (den.unsqueeze(-1) + eps)
        z_end = z_all[:, :, -1]
    y = rearrange(num, "b h n l e -> b h (n l) e")[:, :, :T]
    return y, S_end, z_end


class LinearAttention(HeadProjections):
    """Multi-head causal linear attention (Katharopoulos et al. 2020), chunked forward, O(1) step.

    Per head, with φ the feature map and q, k, v the projections of x:
      state   S_t = S_{t-1} + φ(k_t) v_tᵀ  (d × d),   z_t = z_{t-1} + φ(k_t)  (only when normalize)
      output  y_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + eps)   if normalize
              y_t = φ(q_t)ᵀ S_t = Σ_{s≤t} (φ(q_t)·φ(k_s)) v_s   otherwise (no eps, no 1/√d, no 1/d)
    Heads are concatenated and passed through ``o_proj`` (after the gate when ``use_gate``).
    State: ``S`` (B, H, d, d), ``z`` (B, H, d) when normalize, ``conv`` (B, C, K-1) when share_qk.

    Paths: ``step`` is the recurrence above (the reference); ``forward`` is chunked (within a chunk the
    quadratic form, between chunks the state), tied to the quadratic form by
    test_linear_attention_chunked_equals_quadratic and to ``step`` by the conformance suite;
    test_theorem1_ttt_linear_is_linear_attention ties the unnormalised form to TTT-Linear.
    """

    Config = LinearAttentionConfig

    def __init__(self, d_model: int, **config):
        super().__init__(d_model)
        self.config = cfg = LinearAttentionConfig(**config)
        if cfg.feature_map not in FEATURE_MAPS:
            raise ValueError(f"expected feature_map in {sorted(FEATURE_MAPS)}, got {cfg.feature_map!r}")
        if not isinstance(cfg.chunk_size, int) or isinstance(cfg.chunk_size, bool) or cfg.chunk_size < 1:
            raise ValueError(f"expected chunk_size to be a positive int, got {cfg.chunk_size!r}")
        if cfg.scan_blocks is not None and (
                not isinstance(cfg.scan_blocks, int) or isinstance(cfg.scan_blocks, bool) or cfg.scan_blocks < 1):
            raise ValueError(f"expected scan_blocks to be None or a positive int, got {cfg.scan_blocks!r}")
        if cfg.normalize and not cfg.eps >= 0:
            raise ValueError(f"expected eps >= 0, got {cfg.eps!r}")
        self.phi = FEATURE_MAPS[cfg.feature_map]
        self._build_projections(cfg.num_heads, cfg.share_qk, cfg.use_gate, cfg.conv_kernel)

    # state
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        H, d = self.num_heads, self.head_dim
        state = {"S": torch.zeros(batch_size, H, d, d, device=device, dtype=dtype)}
        if self.config.normalize:
            state["z"] = torch.zeros(batch_size, H, d, device=device, dtype=dtype)
        state.update(self._conv_state(batch_size, device, dtype))
        return state

    def state_size(self, seq_len: int) -> int:
        H, d = self.num_heads, self.head_dim
        return H * d * d + (H * d if self.config.normalize else 0) + self._conv_state_size()

    def flops(self, seq_len: int) -> float:
        """2T·Σ(projection weights) + 4T·C·d: per token and head, S += φ(k)vᵀ and φ(q)ᵀS (2d² each).

        (The normaliser's O(T·C) is not counted.)"""
        return super().flops(seq_len) + 4.0 * seq_len * self.d_model * self.head_dim

    # update rule, output rule
    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        state = self.check_input(x, state, step=True)
        q, k, v, new = self._qkv_step(x, state)
        q, k = self.phi(q), self.phi(k)
        S = state["S"] + torch.einsum("bhd,bhe->bhde", k, v)  # S_t = S_{t-1} + φ(k_t) v_tᵀ
        y = torch.einsum("bhd,bhde->bhe", q, S)  # φ(q_t)ᵀ S_t
        new["S"] = S
        if self.config.normalize:
            z = state["z"] + k  # z_t = z_{t-1} + φ(k_t)
            y = y / ((q * z).sum(-1, keepdim=True) + self.config.eps)
            new["z"] = z
        y = rearrange(y, "b h e -> b (h e)")
        return self.o_proj(self._gate(x, y)), new

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """The chunked form, segment by segment: each segment one group of chunks (see
        ``linear_attention_chunked``; on the CPU by default, or ``scan_blocks`` chunks anywhere) through the
        projections, φ, the chunks and ``o_proj``, from the state the previous segment ends in, so every
        activation of a segment stays in cache and the time per token does not grow with T. (Forward
        hooks on the projections therefore run once per segment.)"""
        state = self.check_input(x, state)
        B, T = x.shape[:2]
        H, d, L = self.num_heads, self.head_dim, self.config.chunk_size
        # cache-sized segments on the CPU; elsewhere (GPU) one launch sequence for all of T
        segment = L * _chunks_per_group(B * H * d * d, T, L, x.device, self.config.scan_blocks)
        ys = []
        for start in range(0, max(T, 1), segment):
            y, state = self._forward_segment(x[:, start:start + segment], state)
            ys.append(y)
        # copies: S and z are slices of the per-chunk buffers, which the state must not keep alive
        state["S"] = state["S"].clone(memory_format=torch.contiguous_format)
        if "z" in state:
            state["z"] = state["z"].clone(memory_format=torch.contiguous_format)
        return (ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)), state

    def _forward_segment(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """forward over x (B, T, C) from ``state`` (checked); the new state's S and z may be views."""
        q, k, v, new = self._qkv(x, state)
        z0 = state["z"] if self.config.normalize else None
        y, new["S"], z = linear_attention_chunked(
            self.phi(q), self.phi(k), v, state["S"], z0, self.config.chunk_size, self.config.eps,
            self.config.scan_blocks,
        )
        if z is not None:
            new["z"] = z
        return self.o_proj(self._gate(x, rearrange(y, "b h t e -> b t (h e)"))), new


# --- softmax self-attention ----------------------------------------------------------------------
@dataclass
class SelfAttentionConfig:
    num_heads: int = field(default=4, metadata={"help": "number of heads; d_model must be divisible by it"})
    rope: bool = field(default=True, metadata={"help": "rotary embedding of q and k at absolute positions"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base"})
    use_gate: bool = field(default=False, metadata={"help": "output o_proj(gelu_tanh(g_proj(x)) * y)"})
    share_qk: bool = field(
        default=False,
        metadata={"help": "one q_proj, then depthwise causal convs conv_q / conv_k for q and k"},
    )
    conv_kernel: int = field(default=4, metadata={"help": "width of conv_q / conv_k (with share_qk)"})


def causal_attention_flops(seq_len: int, width: int) -> float:
    """FLOPs of causal attention over ``seq_len`` tokens of ``width`` = heads × head width: token t
    scores t+1 keys (2 FLOPs per multiply-add of q·k) and sums t+1 values (2 per multiply-add)."""
    return 2.0 * seq_len * (seq_len + 1) * width


class SelfAttention(HeadProjections):
    """Multi-head causal softmax attention with a KV cache.

    Per head, with q, k, v the projections of x and R_t the RoPE rotation at absolute position t
    (0-based; adjacent pairs, base ``rope_theta``; identity when ``rope=False``):
      state   K = [R_0 k_0, ..., R_t k_t], V = [v_0, ..., v_t]   (grows by one row per token)
      output  y_t = Σ_{s≤t} softmax_s((R_t q_t)·(R_s k_s) / √d) v_s, with d the head width
    No bias, no dropout. Heads are concatenated and passed through ``o_proj`` (after the gate when
    ``use_gate``). State: ``k``, ``v`` (B, H, T_so_far, d) holding rotated keys and values, plus
    ``conv`` (B, C, K-1) with share_qk; the position of the next token is ``k.shape[2]``.

    Paths: ``forward`` and ``step`` call torch's fused attention (``scaled_dot_product_attention``),
    tied to the explicit softmax formula above by test_self_attention_equals_naive_softmax, to each
    other by the conformance suite, and to the Nadaraya-Watson learner by
    test_theorem2_nadaraya_watson_is_self_attention.
    """

    Config = SelfAttentionConfig
    state_dynamic_dims = {"k": (2,), "v": (2,)}

    def __init__(self, d_model: int, **config):
        super().__init__(d_model)
        self.config = cfg = SelfAttentionConfig(**config)
        self._build_projections(cfg.num_heads, cfg.share_qk, cfg.use_gate, cfg.conv_kernel)
        if cfg.rope and self.head_dim % 2:
            raise ValueError(
                f"rope needs an even head_dim, got head_dim={self.head_dim} "
                f"(d_model={d_model}, num_heads={cfg.num_heads})"
            )
        self.scale = 1.0 / math.sqrt(self.head_dim)

    # state
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        shape = (batch_size, self.num_heads, 0, self.head_dim)
        state = {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
        }
        state.update(self._conv_state(batch_size, device, dtype))
        return state

    def state_size(self, seq_len: int) -> int:
        """2·H·d·seq_len (keys and values: grows linearly with the sequence), plus the conv window."""
        return 2 * self.num_heads * self.head_dim * seq_len + self._conv_state_size()

    def flops(self, seq_len: int) -> float:
        """2T·Σ(projection weights) + 2T(T+1)·C: token t reads t+1 keys (q·k and the sum of values).

        Causal: the masked half of QKᵀ is not counted."""
        return super().flops(seq_len) + causal_attention_flops(seq_len, self.d_model)

    def check_input(self, x: Tensor, state: State | None = None, *, step: bool = False) -> State:
        state = super().check_input(x, state, step=step)
        if state["k"].shape[2] != state["v"].shape[2]:
            raise ValueError(
                f"expected state['k'] and state['v'] with the same length (dim 2), got "
                f"{tuple(state['k'].shape)} and {tuple(state['v'].shape)}"
            )
        return state

    def _rotate(self, q: Tensor, k: Tensor, start: int) -> tuple[Tensor, Tensor]:
        if not self.config.rope:
            return q, k
        positions = torch.arange(start, start + q.shape[2], device=q.device)
        theta = self.config.rope_theta
        return apply_rope(q, positions, theta), apply_rope(k, positions, theta)

    # update rule, output rule
    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        state = self.check_input(x, state, step=True)
        q, k, v, new = self._qkv_step(x, state)
        q, k = self._rotate(q.unsqueeze(2), k.unsqueeze(2), state["k"].shape[2])
        new["k"] = torch.cat([state["k"], k], dim=2)  # append R_t k_t, v_t
        new["v"] = torch.cat([state["v"], v.unsqueeze(2)], dim=2)
        # one query against the whole cache: every key is at or before this position, no mask
        y = F.scaled_dot_product_attention(q, new["k"], new["v"], scale=self.scale)
        return self.o_proj(self._gate(x, rearrange(y, "b h 1 e -> b (h e)"))), new

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        state = self.check_input(x, state)
        q, k, v, new = self._qkv(x, state)
        past, T = state["k"].shape[2], x.shape[1]
        q, k = self._rotate(q, k, past)
        # the cache after this call (from an empty cache: the new keys and values, made contiguous)
        new["k"] = torch.cat([state["k"], k], dim=2) if past else k.contiguous()
        new["v"] = torch.cat([state["v"], v], dim=2) if past else v.contiguous()
        if T == 0:
            y = q
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            # query i sits at position past + i and sees keys 0 .. past + i
            keys = torch.arange(past + T, device=x.device)
            mask = keys[None, :] <= (past + torch.arange(T, device=x.device))[:, None]  # (T, past + T)
            y = F.scaled_dot_product_attention(q, new["k"], new["v"], attn_mask=mask, scale=self.scale)
        return self.o_proj(self._gate(x, rearrange(y, "b h t e -> b t (h e)"))), new


# --- sliding-window attention --------------------------------------------------------------------
def windowed_attention(q: Tensor, k: Tensor, v: Tensor, window_size: int, *, scale: float | None = None,
                       past_k: Tensor | None = None, past_v: Tensor | None = None) -> Tensor:
    """Causal softmax attention in which query i sees the keys at positions i − window_size + 1 … i.

    q, k (B, H, T, d); v (B, H, T, e); ``past_k``/``past_v`` (B, H, P, ·), P ≤ window_size: the keys and
    values just before these (their positions −P … −1). Computed by blocks of b = min(window_size,
    ``WINDOW_BLOCK``) queries, each against the window_size + b keys that can reach it (one masked SDPA
    call for all blocks, the blocks in the batch dimension): time and memory O(T·(window_size + b)), not
    O(T²). Without past keys and with T ≤ window_size it is plain causal attention, one SDPA call.
    """
    B, H, T, d = q.shape
    W = window_size
    scale = d ** -0.5 if scale is None else scale
    P = 0 if past_k is None else past_k.shape[2]
    if P > W:
        raise ValueError(f"expected at most window_size = {W} past keys, got {P}")
    if T == 0:
        return v.new_zeros(B, H, 0, v.shape[-1])
    if P == 0 and T <= W:  # the window holds every earlier key: plain causal attention, one fused call
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    b = min(W, WINDOW_BLOCK)
    nb = -(-T // b)
    pad = nb * b - T
    # the key slots: W before the first query (the past, left-padded), then the new keys (right-padded)
    lead = lambda new, old: torch.cat(
        [new.new_zeros(B, H, W - P, new.shape[-1])] + ([old] if P else []) + [new, new.new_zeros(B, H, pad, new.shape[-1])],
        dim=2)
    windows = lambda t: t.unfold(2, W + b, b).transpose(-1, -2)  # (B, H, nb, W + b, ·): block i's keys
    i = torch.arange(nb, device=q.device)[:, None, None]
    r = torch.arange(b, device=q.device)[None, :, None]
    j = torch.arange(W + b, device=q.device)[None, None, :]
    # query r of block i (slot W + i·b + r) sees the slots i·b + r + 1 … i·b + W + r that are not padding
    mask = (j > r) & (j <= W + r) & (i * b + j >= W - P)
    # the blocks go in the batch dimension: 4-D inputs take SDPA's fused (flash) CPU kernel, about 3x the
    # math path that 5-D inputs fall back to
    blocks = lambda t: t.transpose(1, 2).flatten(0, 1)  # (B, H, nb, ·, ·) -> (B·nb, H, ·, ·)
    qb = F.pad(q, (0, 0, 0, pad)).unflatten(2, (nb, b))
    y = F.scaled_dot_product_attention(blocks(qb), blocks(windows(lead(k, past_k))), blocks(windows(lead(v, past_v))),
                                       attn_mask=mask.unsqueeze(1).repeat(B, 1, 1, 1), scale=scale)
    return y.unflatten(0, (B, nb)).transpose(1, 2).flatten(2, 3)[:, :, :T]


#: queries per block of ``windowed_attention`` (each block reads window_size + this many keys)
WINDOW_BLOCK = 64


#: tokens per segment of ``sliding_window_attention``'s CPU forward (at least one window)
SEGMENT_TOKENS = 2048


@dataclass
class SlidingWindowAttentionConfig(SelfAttentionConfig):
    window_size: int = field(default=64, metadata={"help": "keys each query sees, its own included"})


class SlidingWindowAttention(SelfAttention):
    """``self_attention`` over the last ``window_size`` keys: y_t = Σ_{t−W<s≤t} softmax_s(q_t·k_s/√d) v_s, with
    the same projections, RoPE at absolute positions and weight names as ``self_attention`` (whose
    weights it loads); with W ≥ T it is ``self_attention``.

    State: ``k``, ``v`` (B, H, min(t, W), d), the rotated keys and values of the last W tokens (a FIFO),
    ``position`` (B,) int64 (tokens seen: RoPE's offset), ``conv`` with share_qk. ``forward`` is
    ``windowed_attention``: O(T·W).
    """

    Config = SlidingWindowAttentionConfig

    def __init__(self, d_model: int, **config):
        cfg = SlidingWindowAttentionConfig(**config)
        if isinstance(cfg.window_size, bool) or not isinstance(cfg.window_size, int) or cfg.window_size < 1:
            raise ValueError(f"expected window_size to be a positive int, got {cfg.window_size!r}")
        super().__init__(d_model, **{k: v for k, v in vars(cfg).items() if k != "window_size"})
        self.config = cfg

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        state = super().init_state(batch_size, device=device, dtype=dtype)
        state["position"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return state

    def state_size(self, seq_len: int) -> int:
        return 2 * self.num_heads * self.head_dim * min(seq_len, self.config.window_size) + self._conv_state_size() + 1

    def flops(self, seq_len: int) -> float:
        """2T·Σ(projection weights) + 4·C·Σ_t min(t + 1, W): token t reads min(t + 1, W) keys and values."""
        W = self.config.window_size
        full = min(seq_len, W)  # tokens 0 … W − 1 read t + 1 keys, the rest W each
        keys = full * (full + 1) / 2 + (seq_len - full) * W
        return HeadProjections.flops(self, seq_len) + 4.0 * self.d_model * keys

    def check_input(self, x: Tensor, state: State | None = None, *, step: bool = False) -> State:
        state = super().check_input(x, state, step=step)
        if state["k"].shape[2] > self.config.window_size:
            raise ValueError(f"expected at most window_size = {self.config.window_size} cached keys, "
                             f"got {state['k'].shape[2]}")
        return state

    def _position(self, state: State) -> int:
        """The position of the next token (one for the batch)."""
        pos = state["position"]
        if pos.numel() and bool((pos != pos[0]).any()):
            raise ValueError("expected every sequence of the batch at the same position")
        return int(pos[0]) if pos.numel() else 0

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        state = self.check_input(x, state, step=True)
        q, k, v, new = self._qkv_step(x, state)
        q, k = self._rotate(q.unsqueeze(2), k.unsqueeze(2), self._position(state))
        W = self.config.window_size
        new["k"] = torch.cat([state["k"], k], dim=2)[:, :, -W:]  # the FIFO: append, drop the oldest
        new["v"] = torch.cat([state["v"], v.unsqueeze(2)], dim=2)[:, :, -W:]
        new["position"] = state["position"] + 1
        y = F.scaled_dot_product_attention(q, new["k"], new["v"], scale=self.scale)
        return self.o_proj(self._gate(x, rearrange(y, "b h 1 e -> b (h e)"))), new

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """``windowed_attention`` on the CPU by segments of ``SEGMENT_TOKENS`` (at least one window), each from
        the FIFO the previous one leaves, so the blocks' scores stay small; elsewhere one segment."""
        state = self.check_input(x, state)
        segment = max(x.shape[1], 1)
        if x.device.type == "cpu":
            segment = max(self.config.window_size, SEGMENT_TOKENS)
        return by_segments(self._forward_segment, x, state, segment)

    def _forward_segment(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        q, k, v, new = self._qkv(x, state)
        T, W = x.shape[1], self.config.window_size
        q, k = self._rotate(q, k, self._position(state))
        past_k, past_v = state["k"], state["v"]
        y = windowed_attention(q, k, v, W, scale=self.scale, past_k=past_k if past_k.shape[2] else None,
                               past_v=past_v if past_v.shape[2] else None)
        new["k"] = torch.cat([past_k, k], dim=2)[:, :, -W:].contiguous()
        new["v"] = torch.cat([past_v, v], dim=2)[:, :, -W:].contiguous()
        new["position"] = state["position"] + T
        return self.o_proj(self._gate(x, rearrange(y, "b h t e -> b t (h e)"))), new


@seqzoo.hookimpl
def register_layers(register):
    register(
        "linear_attention",
        LinearAttention,
        description="causal linear attention: matrix state S += φ(k)vᵀ, output φ(q)ᵀS (chunked forward)",
    )
    register(
        "self_attention",
        SelfAttention,
        description="causal softmax attention with RoPE and a KV cache (SDPA forward)",
    )
    register(
        "sliding_window_attention",
        SlidingWindowAttention,
        description="softmax attention over the last window_size keys (a FIFO cache; blockwise forward)",
    )
