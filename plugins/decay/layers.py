"""RetNet, GLA and HGRN2 as flash-linear-attention's layers (fla 0.5.2's parameter names and shapes, so a fla
layer's ``state_dict()`` loads with ``strict=True``), on the contract: ``forward`` is the chunked op of
``ops`` segment by segment, ``step`` one token of the recurrence S ← diag(e^{g}) S + k vᵀ, o = Sᵀ(scale·q).

- ``retnet`` (fla's ``MultiScaleRetention``): fixed decays γ_h = 1 − 2^(−5−h) per head; q, k rotated by
  RoPE (the halves layout) at absolute positions; output RMSNorm per head gated by swish(g_proj x).
- ``gla`` (``GatedLinearAttention``): gk = logsigmoid(gk_proj x) / gate_logit_normalizer per key feature
  (gk_proj a rank-16 pair of linears), the same output norm and gate.
- ``hgrn2`` (``HGRN2Attention``): GLA with the key tied to the forget gate, k = 1 − e^{g}, g = logsigmoid(f_proj x);
  q = swish(q_proj x), v = i_proj x; RMSNorm over the whole width, then o_proj.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqzoo import SequenceLayer, State, native
from seqzoo.learner import positive_int
from seqzoo.nn import (
    GatedRMSNorm,
    RMSNorm,
    apply_rope_halves,
    by_segments,
    causal_conv,
    causal_conv_step,
    conv_state_shape,
)

from . import ops
from .ops import DEFAULT_CHUNK_SIZE, gla, retention_log_decay, simple_gla

__all__ = ["RetNet", "RetNetConfig", "GLA", "GLAConfig", "HGRN2", "HGRN2Config"]

#: q/k feature maps (fla's ``feature_map`` names, through transformers' ACT2FN)
FEATURE_MAPS = {None: lambda t: t, "swish": F.silu, "silu": F.silu, "relu": F.relu, "sigmoid": torch.sigmoid,
                "elu": F.elu, "gelu": F.gelu}
#: output gate activations (``gate_fn``) when the norm and gate are not fused
GATE_FNS = {"swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid, "relu": F.relu, "gelu": F.gelu}


BACKENDS = ("auto", "torch")


@functools.cache
def _fla_ops() -> dict | None:
    """flash-linear-attention's chunk kernels, or None unless they import (only asked for CUDA tensors)."""
    return native.optional_kernels("flash-linear-attention kernels", "the torch chunked form",
                                   simple_gla="fla.ops.simple_gla:chunk_simple_gla", gla="fla.ops.gla:chunk_gla")


def _whole(name: str, value: float) -> int:
    """A width given as d_model times a float (fla's expand_k / expand_v) must be a whole number."""
    if not math.isclose(value, round(value), rel_tol=1e-6) or round(value) < 1:
        raise ValueError(f"expected {name} to be a positive whole number, got {value}")
    return int(round(value))


class _DecayAttention(SequenceLayer):
    """Projections, short convs, output norm and the state of the three layers; subclasses give
    ``_features`` (q, k, v, the log-decay) and may override ``_output``."""

    #: the op of ``forward``: ``simple_gla`` (a decay per head) or ``gla`` (per key feature)
    vector_decay = True

    def _build(self, key_dim: int, value_dim: int, num_heads: int, num_kv_heads: int | None, cfg) -> None:
        C = self.d_model
        H = positive_int("num_heads", num_heads)
        Hkv = H if num_kv_heads is None else positive_int("num_kv_heads", num_kv_heads)
        if H % Hkv:
            raise ValueError(f"expected num_heads ({H}) divisible by num_kv_heads ({Hkv})")
        if key_dim % H or value_dim % H:
            raise ValueError(f"expected key_dim {key_dim} and value_dim {value_dim} divisible by num_heads {H}")
        positive_int("chunk_size", cfg.chunk_size)
        if cfg.backend not in BACKENDS:
            raise ValueError(f"expected backend in {BACKENDS}, got {cfg.backend!r}")
        self.num_heads, self.num_kv_groups = H, H // Hkv
        self.key_dim, self.value_dim = key_dim, value_dim
        self.head_k_dim, self.head_v_dim = key_dim // H, value_dim // H
        self.q_proj = nn.Linear(C, key_dim, bias=False)
        self.k_proj = nn.Linear(C, key_dim // self.num_kv_groups, bias=False)
        self.v_proj = nn.Linear(C, value_dim // self.num_kv_groups, bias=False)
        self._build_convs(("q", key_dim), ("k", key_dim // self.num_kv_groups), ("v", value_dim // self.num_kv_groups))
        if cfg.feature_map not in FEATURE_MAPS:
            raise ValueError(f"expected feature_map in {sorted(k for k in FEATURE_MAPS if k)} or None, got {cfg.feature_map!r}")
        if cfg.gate_fn not in GATE_FNS:
            raise ValueError(f"expected gate_fn in {sorted(GATE_FNS)}, got {cfg.gate_fn!r}")
        if not cfg.elementwise_affine:
            raise ValueError("expected elementwise_affine=True (the output norm here always has its weight)")
        if cfg.use_output_gate:
            self.g_proj = nn.Linear(C, value_dim, bias=False)
        self.fused_gate = cfg.use_output_gate and cfg.gate_fn == "swish" and cfg.fuse_norm
        if self.fused_gate:
            self.g_norm_swish_gate = GatedRMSNorm(self.head_v_dim, eps=cfg.norm_eps)
        else:
            self.g_norm = RMSNorm(self.head_v_dim, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(value_dim, C, bias=False)

    def _build_convs(self, *widths: tuple[str, int]) -> None:
        self.conv_names = tuple(name for name, _ in widths) if self.config.use_short_conv else ()
        if self.config.use_short_conv:
            K = positive_int("conv_size", self.config.conv_size)
            for name, n in widths:
                setattr(self, f"{name}_conv1d", nn.Conv1d(n, n, K, groups=n, padding=K - 1, bias=self.config.conv_bias))

    # --- state ----------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        state = {"S": torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device,
                                  dtype=dtype)}
        for name in self.conv_names:
            state[f"conv_{name}"] = torch.zeros(conv_state_shape(getattr(self, f"{name}_conv1d"), batch_size),
                                                device=device, dtype=dtype)
        return state

    def state_size(self, seq_len: int) -> int:
        convs = sum(getattr(self, f"{n}_conv1d").weight.shape[0] for n in self.conv_names) * (self.config.conv_size - 1)
        return self.num_heads * self.head_k_dim * self.head_v_dim + convs

    def flops(self, seq_len: int) -> float:
        """2T·Σ(projection weights) + 4T·H·K·V (per token and head: the update k vᵀ and the read-out Sᵀq)."""
        return super().flops(seq_len) + 4.0 * seq_len * self.num_heads * self.head_k_dim * self.head_v_dim

    # --- pieces -------------------------------------------------------------------------------------
    def _conv(self, name: str, t: Tensor, state: State, new: State, step: bool, act=F.silu) -> Tensor:
        """The short conv ``name`` (with SiLU, as fla's ShortConvolution) when there is one."""
        if name not in self.conv_names:
            return t
        conv = causal_conv_step if step else causal_conv
        t, new[f"conv_{name}"] = conv(getattr(self, f"{name}_conv1d"), t, state[f"conv_{name}"])
        return t if act is None else act(t)

    def _heads(self, t: Tensor, d: int, grouped: bool) -> Tensor:
        """(…, n·d) -> (…, H, d); a grouped (key/value) tensor's heads repeated num_kv_groups times each."""
        t = t.unflatten(-1, (-1, d))
        return t.repeat_interleave(self.num_kv_groups, dim=-2) if grouped and self.num_kv_groups > 1 else t

    def _output(self, x: Tensor, o: Tensor) -> Tensor:
        """o (…, H, V) -> o_proj of the per-head RMSNorm, gated by gate_fn(g_proj x) (fused: swish)."""
        if self.fused_gate:
            o = self.g_norm_swish_gate(o, self.g_proj(x).unflatten(-1, o.shape[-2:])).flatten(-2)
        else:
            o = self.g_norm(o).flatten(-2)
            if self.config.use_output_gate:
                o = o * GATE_FNS[self.config.gate_fn](self.g_proj(x))
        return self.o_proj(o)

    # --- the contract -------------------------------------------------------------------------------
    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """The chunked op segment by segment on the CPU (one group of chunks, ``ops.GROUP_ELEMENTS``,
        through projections, op, norm and ``o_proj`` at a time, so activations stay in cache and the time
        per token does not grow with T); elsewhere one segment."""
        state = self.check_input(x, state)
        B, T = x.shape[:2]
        segment = max(T, 1)
        if x.device.type == "cpu":
            L, K, V = self.config.chunk_size, self.head_k_dim, self.head_v_dim
            segment = L * max(1, ops.GROUP_ELEMENTS // max(1, B * self.num_heads * L * max(L, K, V)))
        return by_segments(self._forward_segment, x, state, segment)

    def _forward_segment(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        q, k, v, g, new = self._features(x, state, step=False)
        name = "gla" if self.vector_decay else "simple_gla"
        if (q.is_cuda and self.config.backend == "auto" and q.dtype != torch.float64 and q.shape[1] > 0
                and (kernels := _fla_ops()) is not None):  # fla keeps its states in float32
            o, S = kernels[name](q, k, v, g=g.float(), scale=self.scale, initial_state=state["S"].float(),
                                 output_final_state=True)
            o = o.to(v.dtype)
        else:
            o, S = {"gla": gla, "simple_gla": simple_gla}[name](
                q, k, v, g, scale=self.scale, initial_state=state["S"], output_final_state=True,
                chunk_size=self.config.chunk_size)
        new["S"] = S.to(state["S"].dtype)
        return self._output(x, o), new

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One token: S ← diag(e^{g}) S + k vᵀ, o = Sᵀ(scale·q) (half precision computed in float32)."""
        state = self.check_input(x, state, step=True)
        q, k, v, g, new = self._features(x, state, step=True)  # (B, H, ·)
        dt = torch.promote_types(x.dtype, torch.float32)
        q, k, v, g, S = q.to(dt), k.to(dt), v.to(dt), g.to(dt), state["S"].to(dt)
        decay = g.exp().unsqueeze(-1) if g.ndim == 3 else g.exp()[..., None, None]
        S = torch.addcmul(S * decay, k.unsqueeze(-1), v.unsqueeze(-2))
        o = torch.einsum("bhkv,bhk->bhv", S, q * self.scale)
        new["S"] = S.to(state["S"].dtype)
        return self._output(x, o.to(x.dtype)), new

    @property
    def scale(self) -> float:
        return self.head_k_dim ** -0.5

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, {self.config}"


# --- the options RetNet and GLA share (fla's names) --------------------------------------------------
@dataclass
class _FlaAttentionConfig:
    num_heads: int = field(default=4, metadata={"help": "number of heads"})
    num_kv_heads: int | None = field(default=None, metadata={"help": "key/value heads (GQA); default num_heads"})
    expand_k: float = field(default=0.5, metadata={"help": "key_dim = d_model·expand_k"})
    expand_v: float = field(default=1.0, metadata={"help": "value_dim = d_model·expand_v"})
    feature_map: str | None = field(default=None, metadata={"help": "q/k feature map (None: identity)"})
    use_short_conv: bool = field(default=False, metadata={"help": "depthwise causal convs (SiLU) on q, k, v"})
    conv_size: int = field(default=4, metadata={"help": "width of the short convs"})
    conv_bias: bool = field(default=False, metadata={"help": "bias in the short convs"})
    use_output_gate: bool = field(default=True, metadata={"help": "output gated by gate_fn(g_proj x)"})
    gate_fn: str = field(default="swish", metadata={"help": f"output gate activation: {sorted(GATE_FNS)}"})
    elementwise_affine: bool = field(default=True, metadata={"help": "the output norm has a weight (must be True)"})
    norm_eps: float = field(default=1e-5, metadata={"help": "eps of the output RMSNorm"})
    fuse_norm: bool = field(default=True, metadata={"help": "swish gate inside the norm (g_norm_swish_gate)"})
    chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={"help": "tokens per chunk of the chunked forward"})
    backend: str = field(default="auto", metadata={
        "help": "'auto': fla's chunk kernels for CUDA tensors when flash-linear-attention is installed, else "
                "the torch chunked form; 'torch': always the torch chunked form"})


# --- RetNet ----------------------------------------------------------------------------------------
@dataclass
class RetNetConfig(_FlaAttentionConfig):
    """Options of ``retnet`` (fla's ``MultiScaleRetention`` names and defaults; num_heads 4 here, 8 there)."""

    expand_k: float = field(default=1.0, metadata={"help": "key_dim = d_model·expand_k"})
    expand_v: float = field(default=2.0, metadata={"help": "value_dim = d_model·expand_v"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base (fla's RotaryEmbedding default)"})


class RetNet(_DecayAttention):
    """RetNet's multi-scale retention (Sun et al. 2023): S_t = γ_h S_{t−1} + k_t v_tᵀ, γ_h = 1 − 2^(−5−h),
    o_t = S_tᵀ q_t / √K with q, k rotated by RoPE at their absolute positions.

    Parameters as fla's ``MultiScaleRetention``: ``q_proj``, ``k_proj``, ``v_proj``, ``g_proj``
    (use_output_gate), ``q_conv1d``/``k_conv1d``/``v_conv1d`` (use_short_conv), ``g_norm_swish_gate`` (fused)
    or ``g_norm``, ``o_proj``. State: ``S`` (B, H, K, V), ``position`` (B,) int64 (tokens seen: RoPE's
    offset), the conv windows.
    """

    Config = RetNetConfig
    vector_decay = False

    def __init__(self, d_model: int, **config):
        super().__init__(d_model)
        self.config = cfg = RetNetConfig(**config)
        self._build(_whole("key_dim", d_model * cfg.expand_k), _whole("value_dim", d_model * cfg.expand_v),
                    cfg.num_heads, cfg.num_kv_heads, cfg)
        if self.head_k_dim % 2:
            raise ValueError(f"expected an even key head dim for RoPE, got {self.head_k_dim}")

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        state = super().init_state(batch_size, device=device, dtype=dtype)
        state["position"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return state

    def state_size(self, seq_len: int) -> int:
        return super().state_size(seq_len) + 1

    def _features(self, x: Tensor, state: State, step: bool):
        new: State = {}
        q = self._conv("q", self.q_proj(x), state, new, step)
        k = self._conv("k", self.k_proj(x), state, new, step)
        v = self._conv("v", self.v_proj(x), state, new, step)
        if step:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        fmap = FEATURE_MAPS[self.config.feature_map]
        q, k = fmap(q.unflatten(-1, (-1, self.head_k_dim))), fmap(k.unflatten(-1, (-1, self.head_k_dim)))
        T = q.shape[1]
        positions = state["position"][:, None] + torch.arange(T, device=x.device)
        q = apply_rope_halves(q, positions, self.config.rope_theta)
        k = apply_rope_halves(k, positions, self.config.rope_theta)
        if self.num_kv_groups > 1:
            k = k.repeat_interleave(self.num_kv_groups, dim=-2)
        v = self._heads(v, self.head_v_dim, grouped=True)
        new["position"] = state["position"] + T
        g = retention_log_decay(self.num_heads, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        g = g.expand(x.shape[0], T, self.num_heads)
        if step:
            q, k, v, g = q[:, 0], k[:, 0], v[:, 0], g[:, 0]
        return q, k, v, g, new


# --- GLA -------------------------------------------------------------------------------------------
@dataclass
class GLAConfig(_FlaAttentionConfig):
    """Options of ``gla`` (fla's ``GatedLinearAttention`` names and defaults)."""

    gate_logit_normalizer: int = field(default=16, metadata={"help": "gk = logsigmoid(gk_proj x) / this"})
    gate_low_rank_dim: int = field(default=16, metadata={"help": "rank of gk_proj"})
    clamp_min: float | None = field(default=None, metadata={"help": "lower bound of gk (None: none)"})


class GLA(_DecayAttention):
    """Gated linear attention (Yang et al. 2024): S_t = diag(e^{gk_t}) S_{t−1} + k_t v_tᵀ, o_t = S_tᵀ q_t / √K,
    gk = logsigmoid(gk_proj x) / gate_logit_normalizer (clamped below by clamp_min).

    Parameters as fla's ``GatedLinearAttention``: ``q_proj``, ``k_proj``, ``v_proj``, ``g_proj``,
    ``gk_proj.0`` (C → rank, no bias), ``gk_proj.1`` (rank → key_dim/groups, bias), the convs,
    ``g_norm_swish_gate`` or ``g_norm``, ``o_proj``. State: ``S`` (B, H, K, V) and the conv windows.
    """

    Config = GLAConfig

    def __init__(self, d_model: int, **config):
        super().__init__(d_model)
        self.config = cfg = GLAConfig(**config)
        self._build(_whole("key_dim", d_model * cfg.expand_k), _whole("value_dim", d_model * cfg.expand_v),
                    cfg.num_heads, cfg.num_kv_heads, cfg)
        rank = positive_int("gate_low_rank_dim", cfg.gate_low_rank_dim)
        if not cfg.gate_logit_normalizer > 0:
            raise ValueError(f"expected gate_logit_normalizer > 0, got {cfg.gate_logit_normalizer!r}")
        self.gk_proj = nn.Sequential(nn.Linear(d_model, rank, bias=False),
                                     nn.Linear(rank, self.key_dim // self.num_kv_groups, bias=True))

    def _features(self, x: Tensor, state: State, step: bool):
        cfg, new = self.config, {}
        q = self._conv("q", self.q_proj(x), state, new, step)
        k = self._conv("k", self.k_proj(x), state, new, step)
        v = self._conv("v", self.v_proj(x), state, new, step)
        gk = self.gk_proj(x)
        q, k, v = self._heads(q, self.head_k_dim, False), self._heads(k, self.head_k_dim, True), \
            self._heads(v, self.head_v_dim, True)
        gk = F.logsigmoid(self._heads(gk, self.head_k_dim, True).to(torch.promote_types(x.dtype, torch.float32)))
        gk = gk / cfg.gate_logit_normalizer
        if cfg.clamp_min is not None:
            gk = gk.clamp_min(cfg.clamp_min)
        fmap = FEATURE_MAPS[cfg.feature_map]
        return fmap(q), fmap(k), v, gk, new


# --- HGRN2 -----------------------------------------------------------------------------------------
@dataclass
class HGRN2Config:
    """Options of ``hgrn2`` (fla's ``HGRN2Attention`` names; its default expand_ratio 128 sets
    num_heads = d_model / 128, here num_heads 4 sets expand_ratio = d_model / 4 unless given)."""

    num_heads: int = field(default=4, metadata={"help": "number of heads (ignored when expand_ratio is given)"})
    expand_ratio: int | None = field(default=None, metadata={
        "help": "forget/key features per head; given, num_heads = d_model // expand_ratio (fla's rule)"})
    use_short_conv: bool = field(default=False, metadata={"help": "depthwise causal convs (no activation) on q, f, i"})
    conv_size: int = field(default=4, metadata={"help": "width of the short convs"})
    conv_bias: bool = field(default=False, metadata={"help": "bias in the short convs"})
    elementwise_affine: bool = field(default=True, metadata={"help": "the output norm has a weight (must be True)"})
    norm_eps: float = field(default=1e-5, metadata={"help": "eps of the output RMSNorm"})
    chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={"help": "tokens per chunk of the chunked forward"})
    backend: str = field(default="auto", metadata={
        "help": "'auto': fla's chunk kernels for CUDA tensors when flash-linear-attention is installed, else "
                "the torch chunked form; 'torch': always the torch chunked form"})


class HGRN2(_DecayAttention):
    """HGRN2 (Qin et al. 2024): GLA whose key is the complement of its forget gate, per head
    S_t = diag(α_t) S_{t−1} + (1 − α_t) i_tᵀ, α = σ(f_proj x), o_t = S_tᵀ swish(q_proj x)/√K; RMSNorm over
    the whole width, then ``o_proj``. (fla's HGRN2 model gives deeper layers a lower bound on α; the layer
    alone has none, as here.)

    Parameters as fla's ``HGRN2Attention``: ``q_proj``, ``f_proj`` (C → H·expand_ratio), ``i_proj`` (C → C),
    ``q_conv1d``/``f_conv1d``/``i_conv1d`` (use_short_conv), ``g_norm`` (C), ``o_proj``. State: ``S``
    (B, H, expand_ratio, C/H) and the conv windows.
    """

    Config = HGRN2Config

    def __init__(self, d_model: int, **config):
        super().__init__(d_model)
        self.config = cfg = HGRN2Config(**config)
        if cfg.expand_ratio is not None:
            ratio = positive_int("expand_ratio", cfg.expand_ratio)
            H = d_model // ratio
            if H < 1:
                raise ValueError(f"expected expand_ratio ≤ d_model ({d_model}), got {ratio}")
        else:
            H = positive_int("num_heads", cfg.num_heads)
            if d_model % H:
                raise ValueError(f"expected d_model divisible by num_heads, got d_model={d_model}, num_heads={H}")
            ratio = d_model // H
        if d_model % H:
            raise ValueError(f"expected d_model ({d_model}) divisible by the number of heads ({H})")
        if not cfg.elementwise_affine:
            raise ValueError("expected elementwise_affine=True (the output norm here always has its weight)")
        positive_int("chunk_size", cfg.chunk_size)
        if cfg.backend not in BACKENDS:
            raise ValueError(f"expected backend in {BACKENDS}, got {cfg.backend!r}")
        self.num_heads, self.num_kv_groups = H, 1
        self.key_dim, self.value_dim = H * ratio, d_model
        self.head_k_dim, self.head_v_dim = ratio, d_model // H
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.f_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.i_proj = nn.Linear(d_model, d_model, bias=False)
        self._build_convs(("q", self.key_dim), ("f", self.key_dim), ("i", d_model))
        self.g_norm = RMSNorm(d_model, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def _features(self, x: Tensor, state: State, step: bool):
        new: State = {}
        q = F.silu(self._conv("q", self.q_proj(x), state, new, step, act=None))
        f = self._conv("f", self.f_proj(x), state, new, step, act=None)
        i = self._conv("i", self.i_proj(x), state, new, step, act=None)
        g = F.logsigmoid(f.to(torch.promote_types(x.dtype, torch.float32)))
        k = (1 - g.exp()).to(x.dtype)
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1))
        return heads(q), heads(k), heads(i), heads(g), new

    def _output(self, x: Tensor, o: Tensor) -> Tensor:
        return self.o_proj(self.g_norm(o.flatten(-2)))
