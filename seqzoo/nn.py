"""Small building blocks shared by layers and backbones: norms, causal depthwise convs, RoPE, gates."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .contract import SequenceLayer, State

T = TypeVar("T")

__all__ = [
    "HeadProjections", "RMSNorm", "GatedRMSNorm", "SwiGLU", "gelu_tanh", "causal_conv", "causal_conv_step",
    "conv_state_shape", "apply_rope", "cached_views", "l2_normalize", "by_segments", "softplus_decay_init",
    "softplus_log_decay", "decay_products", "apply_rope_halves", "check_head_tensors", "scan_chunk_groups",
    "CHUNK_GRAIN", "chunk_length", "recomputed_backward",
]


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def cached_views(owner: nn.Module, key: Hashable, sources: Sequence[Tensor], build: Callable[[], T]) -> T:
    """``build()``, views of the tensors ``sources`` (parameters: reshaped, expanded, transposed), kept
    on ``owner`` under ``key`` while every source is the same tensor on the same storage. A view reads
    its source's current values, so in-place changes (through ``.data`` too) need no invalidation; a
    result that is not all views (a dtype cast copies, a product computes) is not kept. Nor is anything
    while autograd would record it (a cached graph could not be reused), for inference tensors and for
    tensors under ``torch.func`` transforms. A decode step runs per token: the views it needs of
    per-head parameters are made once."""
    unstampable = lambda t: torch._C._functorch.is_functorch_wrapped_tensor(t) or t.is_inference()
    if any(unstampable(t) for t in sources) or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
        return build()
    stamp = tuple(t.data_ptr() for t in sources), torch.is_inference_mode_enabled()
    cache = owner.__dict__.setdefault("_seqzoo_views", {})
    hit = cache.get(key)
    if hit is not None and hit[1] == stamp and all(a is b for a, b in zip(hit[0], sources)):
        return hit[2]
    value = build()
    storages = {t.untyped_storage().data_ptr() for t in sources}
    if all(v.untyped_storage().data_ptr() in storages for v in _tensors_in(value)):
        cache[key] = (tuple(sources), stamp, value)
    return value


def _tensors_in(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in _tensors_in(v)]


class RMSNorm(nn.Module):
    """RMSNorm computed in at least float32: weight * x / sqrt(mean(x²) + eps)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """RMSNorm(x)·weight·SiLU(g), computed in at least float32 (flash-linear-attention's FusedRMSNormGated)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        dtype = x.dtype
        h, g = x.to(torch.promote_types(dtype, torch.float32)), g.to(torch.promote_types(g.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return (h * F.silu(g)).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def softplus_decay_init(heads: int, rows: int) -> tuple[Tensor, Tensor]:
    """The initial ``A_log`` (heads,), A ~ U(0, 16), and ``dt_bias`` (rows,) = softplus⁻¹(Δt) with Δt
    log-uniform in [0.001, 0.1] (floored at 1e-4), of the decay ``softplus_log_decay`` (Gated DeltaNet's)."""
    A_log = torch.log(torch.empty(heads).uniform_(0, 16))
    dt = torch.exp(torch.rand(rows) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
    return A_log, dt + torch.log(-torch.expm1(-dt))


def softplus_log_decay(a: Tensor, A_log: Tensor, dt_bias: Tensor) -> Tensor:
    """g = log α = −exp(A_log)·softplus(a + dt_bias), computed in ``a``'s dtype (callers choose it)."""
    return -A_log.to(a.dtype).exp() * F.softplus(a + dt_bias.to(a.dtype))


def decay_products(g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The decay products of chunks of log-decays g (..., L): D (..., L, L) with D[t, s] = exp(Σ_{s<r≤t} g_r)
    for s ≤ t (else 0), Γ_t = exp(Σ_{r≤t} g_r) and exp(Σ_{r>s} g_r) (..., L), each exponent a sum of the
    g's it spans, never a difference of two cumulative sums: exact for strong decays (a log-decay of −1e30
    or −inf is a full reset) where differences would cancel."""
    L = g.shape[-1]
    later = torch.ones(L, L, dtype=torch.bool, device=g.device).triu(1)  # [s, r]: r > s
    spans = g.unsqueeze(-2).expand(*g.shape[:-1], L, L).masked_fill(~later, 0.0).cumsum(-1)  # [s, t]: Σ_{s<r≤t} g_r
    D = spans.transpose(-1, -2).exp().masked_fill(~later.t().logical_or(torch.eye(L, dtype=torch.bool,
                                                                                   device=g.device)), 0.0)
    Gamma = g.cumsum(-1).exp()
    to_end = spans[..., -1].exp()  # Σ_{r>s} g_r: the row s of spans at t = L
    return D, Gamma, to_end


def check_head_tensors(name: str, q: Tensor, k: Tensor, v: Tensor, chunk_size, **others: Tensor | None
                       ) -> tuple[int, int, int, int, int]:
    """The checks every op on flash-linear-attention's (B, T, H, ·) layout makes: q, k, v and each of
    ``others`` that is not None a floating-point tensor on q's device; q (B, T, H, K), k of q's shape, v
    (B, T, H, V); ``chunk_size`` None or a positive int. Returns (B, T, H, K, V); ``name`` starts the errors."""
    for label, t in (("q", q), ("k", k), ("v", v), *others.items()):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected {label} to be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point {label}, got dtype {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected {label} on {q.device} (q's device), got {t.device}")
    if q.ndim != 4:
        raise ValueError(f"{name}: expected q of shape (B, T, H, K), got {tuple(q.shape)}")
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"{name}: expected k of q's shape {(B, T, H, K)}, got {tuple(k.shape)}")
    if v.ndim != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"{name}: expected v of shape {(B, T, H)} + (V,), got {tuple(v.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{name}: expected chunk_size to be None or a positive int, got {chunk_size!r}")
    return B, T, H, K, v.shape[-1]


#: a chunk shortened to a short sequence stays a multiple of this (the sub-chunks of 16, 8, 4, 2 divide it)
CHUNK_GRAIN = 16


def chunk_length(L: int, T: int) -> int:
    """The chunk length a chunked form uses for T tokens: L, or for a sequence shorter than a chunk one
    chunk of T tokens rounded up to ``CHUNK_GRAIN`` (a chunk's length is the form's choice, not the math's;
    padding 32 tokens to 64 doubled a short training sequence's work)."""
    return min(L, max(1, -(-T // CHUNK_GRAIN)) * CHUNK_GRAIN)


def scan_chunk_groups(group_fn: Callable, tensors: Sequence[Tensor | None], L: int, S, *, width: int,
                      group_elements: int, scale: float = 1.0) -> tuple[Tensor, Any]:
    """The outer loop of a chunked form over (B, T, H, ·) tensors (T > 0): each of ``tensors`` zero-padded to
    whole chunks of ``chunk_length(L, T)`` tokens and laid out (B, N, H, L, ·) (None
    passes through); the chunks in groups of
    ``group_elements // (B·H·L·width)`` (at least one), each group ``group_fn(*parts, S) -> (o (B, n, H, L,
    ·), S)`` from the state the previous one ends in. The first tensor's chunks are multiplied by ``scale``
    (in place where they are a copy). Returns o (B, T, H, ·) and the last state."""
    first = tensors[0]
    B, T, H = first.shape[:3]
    L = chunk_length(L, T)
    n = -(-T // L)
    pad = n * L - T
    padded = lambda t: F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad)) if pad else t
    chunks = [None if t is None else rearrange(padded(t), "b (n l) h ... -> b n h l ...", l=L).contiguous()
              for t in tensors]
    if scale != 1.0:
        chunks[0] = chunks[0].mul_(scale) if chunks[0].data_ptr() != first.data_ptr() else chunks[0] * scale
    group = max(1, group_elements // (B * H * L * width))
    outs = []
    for lo in range(0, n, group):
        part = slice(lo, min(lo + group, n))
        o, S = group_fn(*(None if c is None else c[:, part] for c in chunks), S)
        outs.append(o)
    o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    return rearrange(o, "b n h l d -> b (n l) h d")[:, :T], S


def by_segments(fn: Callable[[Tensor, State], tuple[Tensor, State]], x: Tensor, state: State,
                segment: int) -> tuple[Tensor, State]:
    """``fn(x_part, state) -> (y_part, state)`` over consecutive segments of ``segment`` tokens of x (B, T, ·),
    each from the state the previous one ends in; the outputs concatenated (T = 0: one call). Layers run
    their forward this way on the CPU so that a segment's activations stay in cache."""
    ys = []
    for start in range(0, max(x.shape[1], 1), segment):
        y, state = fn(x[:, start:start + segment], state)
        ys.append(y)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)), state


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x·rsqrt(Σx² + eps) over the last dim (flash-linear-attention's L2 norm of q and k)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class SwiGLU(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), no biases (the Llama / ttt-lm-pytorch MLP)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def conv_state_shape(conv: nn.Conv1d, batch_size: int) -> tuple[int, int, int]:
    """Shape of a depthwise causal conv's state: the last ``kernel - 1`` inputs, (B, C, K - 1)."""
    return (batch_size, conv.weight.shape[0], conv.weight.shape[-1] - 1)


def causal_conv(conv: nn.Conv1d, x: Tensor, conv_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv over x (B, T, C) continuing from ``conv_state`` (B, C, W), the last W ≥ K−1
    inputs (K−1 by default; Mamba's state keeps K).

    Returns (y (B, T, C), new conv_state of the same width). Without a state the sequence is left-padded
    with zeros, exactly as ``nn.Conv1d(padding=K-1)`` followed by keeping the first T outputs. The new
    state has its own storage, and T = 0 returns a copy of the state. The conv runs as K shifted
    multiply-adds over (B, T, C) with the channels innermost (F.conv1d's depthwise CPU path is about
    100x slower at these sizes, a windows · taps product 3x).
    """
    B, T, C = x.shape
    K = conv.weight.shape[-1]
    if conv_state is None:
        conv_state = x.new_zeros(B, C, K - 1)
    W = conv_state.shape[-1]
    if W < K - 1:
        raise ValueError(f"expected a conv_state of at least K - 1 = {K - 1} inputs, got shape {tuple(conv_state.shape)}")
    if T == 0:
        return x.new_zeros(B, 0, C), conv_state.clone()
    padded = torch.cat([conv_state.transpose(1, 2), x], dim=1)  # (B, W + T, C)
    taps = conv.weight[:, 0].t().contiguous()  # (K, C)
    s = W - (K - 1)  # the input the first output's window starts at
    window = lambda k: padded[:, s + k:s + k + T]  # x_{t − K + 1 + k} for every t
    y = window(0) * taps[0] if conv.bias is None else torch.addcmul(conv.bias, window(0), taps[0])
    for k in range(1, K):
        y = y.addcmul_(window(k), taps[k])
    return y, padded[:, T:].transpose(1, 2).contiguous()


def causal_conv_step(conv: nn.Conv1d, x: Tensor, conv_state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of ``causal_conv``: x (B, C) -> y (B, C), new conv_state of the same width W ≥ K−1."""
    K = conv.weight.shape[-1]
    if conv_state.shape[-1] < K - 1:
        raise ValueError(f"expected a conv_state of at least K - 1 = {K - 1} inputs, got shape {tuple(conv_state.shape)}")
    inputs = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)  # (B, C, W + 1)
    y = torch.linalg.vecdot(inputs[..., inputs.shape[-1] - K:], conv.weight[:, 0])  # the window · taps
    if conv.bias is not None:
        y = y + conv.bias
    return y, inputs[..., 1:].contiguous()


def apply_rope(x: Tensor, positions: Tensor, theta: float = 10000.0, *, inplace: bool = False) -> Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of x (..., T, d) by positions (T,) · theta^(-2i/d).

    This is the EasyLM / ttt-lm-pytorch convention (pairs are neighbours, not halves). ``inplace``:
    rotate x itself where its layout allows (float32/64 with the pairs adjacent in memory) and return
    it — for a caller that owns x, a whole-sequence buffer less to allocate and fault in.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {d}")
    ctype = torch.promote_types(x.dtype, torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=ctype) / d))
    angle = positions.to(ctype)[:, None] * inv_freq[None, :]  # (T, d/2)
    if x.dtype in (torch.float32, torch.float64):
        # one fused pass (3x faster): the pair (x_2i, x_2i+1) as x_2i + i·x_2i+1, times e^{i·angle}
        pairs = x.unflatten(-1, (d // 2, 2))
        rotation = torch.polar(torch.ones_like(angle), angle)
        if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
            pairs = pairs.contiguous()
        elif inplace:
            torch.view_as_complex(pairs).mul_(rotation)
            return x
        return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2)


def apply_rope_halves(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotate x (B, T, H, d) by positions (B, T) · theta^(−2i/d) in the GPT-NeoX / flash-attention layout
    (feature i pairs with i + d/2, not with its neighbour as ``apply_rope``), computed in at least float32."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {d}")
    ctype = torch.promote_types(x.dtype, torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=ctype) / d))
    angle = (positions.to(ctype)[..., None] * inv_freq).unsqueeze(-2)  # (B, T, 1, d/2)
    cos, sin = angle.cos(), angle.sin()
    h = x.to(ctype)
    x1, x2 = h[..., : d // 2], h[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class HeadProjections(SequenceLayer):
    """Base of the multi-head layers: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (no bias) split into
    heads, with the Mamba-backbone options ``share_qk`` (one ``q_proj``, then depthwise causal convs
    ``conv_q``/``conv_k`` of width ``conv_kernel``, with bias) and ``use_gate`` (``g_proj``).

    The names are ttt-lm-pytorch's, so attention and TTT layers load each other's weights.
    """

    def _build_projections(self, num_heads: int, share_qk: bool, use_gate: bool, conv_kernel: int) -> None:
        C = self.d_model
        for name, value in (("num_heads", num_heads), ("conv_kernel", conv_kernel)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"expected {name} to be a positive int, got {value!r}")
        if C % num_heads:
            raise ValueError(f"expected d_model divisible by num_heads, got d_model={C}, num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, C // num_heads
        self.share_qk, self.use_gate = bool(share_qk), bool(use_gate)
        self.q_proj = nn.Linear(C, C, bias=False)
        if self.share_qk:  # XQ = conv_q(q_proj(x)), XK = conv_k(q_proj(x))
            self.conv_q = nn.Conv1d(C, C, conv_kernel, groups=C, bias=True, padding=conv_kernel - 1)
            self.conv_k = nn.Conv1d(C, C, conv_kernel, groups=C, bias=True, padding=conv_kernel - 1)
        else:
            self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)
        if self.use_gate:
            self.g_proj = nn.Linear(C, C, bias=False)

    def _conv_state(self, batch_size: int, device, dtype) -> State:
        """conv_q and conv_k read the same sequence q_proj(x): one window (B, C, K-1) serves both."""
        if not self.share_qk:
            return {}
        return {"conv": torch.zeros(conv_state_shape(self.conv_q, batch_size), device=device, dtype=dtype)}

    def _conv_state_size(self) -> int:
        return self.d_model * (self.conv_q.weight.shape[-1] - 1) if self.share_qk else 0

    def _qkv(self, x: Tensor, state: State) -> tuple[Tensor, Tensor, Tensor, State]:
        """x (B, T, C) -> XQ, XK, XV (B, H, T, d) and the new conv state."""
        new: State = {}
        if self.share_qk:
            xq = self.q_proj(x)
            q, _ = causal_conv(self.conv_q, xq, state["conv"])
            k, new["conv"] = causal_conv(self.conv_k, xq, state["conv"])
        else:
            q, k = self.q_proj(x), self.k_proj(x)
        heads = lambda t: rearrange(t, "b t (h d) -> b h t d", h=self.num_heads)
        return heads(q), heads(k), heads(self.v_proj(x)), new

    def _qkv_step(self, x: Tensor, state: State) -> tuple[Tensor, Tensor, Tensor, State]:
        """x (B, C) -> XQ, XK, XV (B, H, d) and the new conv state."""
        new: State = {}
        if self.share_qk:
            xq = self.q_proj(x)
            q, _ = causal_conv_step(self.conv_q, xq, state["conv"])
            k, new["conv"] = causal_conv_step(self.conv_k, xq, state["conv"])
        else:
            q, k = self.q_proj(x), self.k_proj(x)
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1))  # (B, H, d), a view (einops costs ~10x more)
        return heads(q), heads(k), heads(self.v_proj(x)), new

    def _owns_qk(self) -> bool:
        """Whether the XQ/XK that ``_qkv`` returns are seen by nobody else, so a caller may overwrite them:
        conv outputs with share_qk, or plain ``nn.Linear`` outputs that no forward hook has seen."""
        if self.share_qk:
            return True
        from torch.nn.modules import module as module_globals

        plain = lambda m: type(m) is nn.Linear and not m._forward_hooks
        return plain(self.q_proj) and plain(self.k_proj) and not module_globals._global_forward_hooks

    def _gate(self, x: Tensor, y: Tensor) -> Tensor:
        """gelu_tanh(g_proj(x)) * y with use_gate, else y (heads merged)."""
        return gelu_tanh(self.g_proj(x)) * y if self.use_gate else y

    def extra_repr(self) -> str:
        config = getattr(self, "config", None)
        return f"d_model={self.d_model}" + (f", {config}" if config is not None else "")


def recomputed_backward(fn: Callable, inputs: Sequence, grad_outputs: Sequence[Tensor | None],
                        needs: Sequence[bool]) -> tuple:
    """The backward of a ``torch.autograd.Function`` whose written backward is not itself differentiable,
    for the calls that need it to be: when its backward runs while autograd records (``create_graph=True``,
    a second derivative), return autograd's gradients through ``fn(*inputs)``, a differentiable reference of
    the forward recomputed here, so that higher derivatives are exact. (``once_differentiable`` would instead
    detach the written gradients, and a second derivative taken with respect to some inputs would silently
    miss the Function's part.) ``needs``: ``ctx.needs_input_grad``. Returns one gradient per input."""
    wanted = [i for i, need in enumerate(needs) if need]
    with torch.enable_grad():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs)
                 if g is not None and isinstance(o, Tensor) and o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                    create_graph=True, allow_unused=True) if pairs and wanted else ()
    result: list = [None] * len(inputs)
    for i, g in zip(wanted, grads):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return tuple(result)
