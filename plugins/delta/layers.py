"""DeltaNet and Gated DeltaNet: layers whose state is a linear model trained online by the delta rule.

Per head (K key and V value features), S ∈ R^{K×V} is the learner; each token takes one gradient step
on ½‖Sᵀk_t − v_t‖² with the learning rate β_t, after a decay α_t (Gated DeltaNet only), and the output
asks the updated model about q_t (the math: ``reference``; the chunked form: ``ops``):

    S_t = α_t S_{t−1} + k_t (β_t (v_t − α_t S_{t−1}ᵀ k_t))ᵀ,   o_t = S_tᵀ q_t / √K.

Both layers follow flash-linear-attention's ``fla.layers.DeltaNet`` / ``fla.layers.GatedDeltaNet``:
the same options, parameter names and shapes (a state dict of one loads into the other with
``strict=True``), the same features: q, k, v = SiLU(short causal conv(proj(x))) (or the chosen
activation), q and k L2-normalised (x·rsqrt(Σx² + 1e−6)), β = σ(b_proj x) (×2 with
``allow_neg_eigval``), for Gated DeltaNet g = log α = −exp(A_log)·softplus(a_proj x + dt_bias), and
an RMSNorm per head on the output (gated by SiLU(g_proj x) with ``use_gate``) before ``o_proj``.

Paths (each tied to another by a test in tests/test_delta.py):

| path | where it runs | tested against |
|---|---|---|
| ``step`` (the recurrence, one token) | always | ``forward`` at every split (conformance suite) |
| ``forward``: the chunked form (``ops``) | CPU, or without fla | fla's reference op and layer (golden vectors), the token loop |
| fla's chunk kernels | CUDA tensors, when flash-linear-attention is installed | the torch path (skipped without CUDA) |
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import seqzoo
from seqzoo import SequenceLayer, State, native
from seqzoo.learner import LearnerLayerConfig, positive_int
from seqzoo.nn import (
    GatedRMSNorm,
    RMSNorm,
    by_segments,
    causal_conv,
    causal_conv_step,
    conv_state_shape,
    l2_normalize,
    softplus_decay_init,
    softplus_log_decay,
)

from . import ops
from .ops import DEFAULT_CHUNK_SIZE, delta_rule, gated_delta_rule
from .reference import mesa_net_cg_reference, mesa_net_reference

__all__ = ["DeltaNet", "DeltaNetConfig", "GatedDeltaNet", "GatedDeltaNetConfig", "MesaNet", "MesaNetConfig", "MesaLearner"]

QK_ACTIVATIONS = ("silu", "relu", "elu", "identity")
QK_NORMS = ("l2", "sum")
BACKENDS = ("auto", "torch")


@functools.cache
def _fla_ops() -> dict | None:
    """flash-linear-attention's chunk kernels, or None unless they import (only asked for CUDA tensors)."""
    return native.optional_kernels("flash-linear-attention kernels", "the torch chunked form",
                                   delta_rule="fla.ops.delta_rule:chunk_delta_rule",
                                   gated_delta_rule="fla.ops.gated_delta_rule:chunk_gated_delta_rule")


@functools.cache
def _fla_mesa() -> dict | None:
    """flash-linear-attention's MesaNet CG kernel, or None unless it imports (only asked for CUDA tensors)."""
    return native.optional_kernels("flash-linear-attention kernels", "the torch chunked form",
                                   chunk_mesa_net="fla.ops.mesa_net:chunk_mesa_net")


def _whole(name: str, value: float) -> int:
    """A dimension given as a product with a float (fla's expand_k / expand_v) must be a whole number."""
    if not math.isclose(value, round(value), rel_tol=1e-5) or round(value) < 1:
        raise ValueError(f"expected {name} to be a positive whole number, got {value}")
    return int(round(value))


def _head_norm_output(layer: nn.Module, x: Tensor, o: Tensor, gated: bool) -> Tensor:
    """o (…, H, V) -> o_proj(o_norm(o) [gated by SiLU(g_proj x)]) with the heads merged."""
    if gated:
        o = layer.o_norm(o, layer.g_proj(x).unflatten(-1, o.shape[-2:]))
    else:
        o = layer.o_norm(o)
    return layer.o_proj(o.flatten(-2))


# --- the shared machinery --------------------------------------------------------------------------
class _DeltaLayer(SequenceLayer):
    """Projections, short convs, the rates, the state and the output norm of both layers."""

    def _build(self, key_dim: int, value_dim: int, num_heads: int, num_v_heads: int, cfg) -> None:
        C = self.d_model
        if cfg.backend not in BACKENDS:
            raise ValueError(f"expected backend in {BACKENDS}, got {cfg.backend!r}")
        positive_int("chunk_size", cfg.chunk_size)
        if key_dim % num_heads or value_dim % num_v_heads:
            raise ValueError(f"expected key_dim {key_dim} divisible by num_heads {num_heads} and value_dim "
                             f"{value_dim} by the value heads {num_v_heads}")
        if num_v_heads % num_heads:
            raise ValueError(f"expected num_v_heads ({num_v_heads}) divisible by num_heads ({num_heads})")
        self.num_heads, self.num_v_heads = num_heads, num_v_heads
        self.key_dim, self.value_dim = key_dim, value_dim
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_v_heads
        self.q_proj = nn.Linear(C, key_dim, bias=False)
        self.k_proj = nn.Linear(C, key_dim, bias=False)
        self.v_proj = nn.Linear(C, value_dim, bias=False)
        if cfg.use_short_conv:
            K = positive_int("conv_size", cfg.conv_size)
            conv = lambda n: nn.Conv1d(n, n, K, groups=n, padding=K - 1, bias=cfg.conv_bias)
            self.q_conv1d, self.k_conv1d, self.v_conv1d = conv(key_dim), conv(key_dim), conv(value_dim)
        if cfg.use_gate:
            self.g_proj = nn.Linear(C, value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=cfg.norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(value_dim, C, bias=False)

    # --- state --------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        state = {"S": torch.zeros(batch_size, self.num_v_heads, self.head_k_dim, self.head_v_dim,
                                  device=device, dtype=dtype)}
        if self.config.use_short_conv:
            for name in ("q", "k", "v"):
                shape = conv_state_shape(getattr(self, f"{name}_conv1d"), batch_size)
                state[f"conv_{name}"] = torch.zeros(shape, device=device, dtype=dtype)
        return state

    def state_size(self, seq_len: int) -> int:
        convs = (2 * self.key_dim + self.value_dim) * (self.config.conv_size - 1) if self.config.use_short_conv else 0
        return self.num_v_heads * self.head_k_dim * self.head_v_dim + convs

    def flops(self, seq_len: int) -> float:
        """2T·Σ(projection weights) + 6T·H_v·K·V (per token and value head: Sᵀk, the rank-1 update and
        Sᵀq, 2KV each) + 2T·(2·key_dim + value_dim)·conv_size (the short convs)."""
        convs = 2.0 * (2 * self.key_dim + self.value_dim) * self.config.conv_size if self.config.use_short_conv else 0.0
        rule = 6.0 * self.num_v_heads * self.head_k_dim * self.head_v_dim
        return super().flops(seq_len) + seq_len * (rule + convs)

    # --- features -----------------------------------------------------------------------------------
    def _features(self, x: Tensor, state: State, step: bool) -> tuple[Tensor, Tensor, Tensor, State]:
        """q, k (…, H, K) and v (…, H_v, V) after the convs, activations and norms; the new conv windows."""
        cfg, new = self.config, {}
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        act = self._qk_activation()
        if cfg.use_short_conv:
            conv = causal_conv_step if step else causal_conv
            q, new["conv_q"] = conv(self.q_conv1d, q, state["conv_q"])
            k, new["conv_k"] = conv(self.k_conv1d, k, state["conv_k"])
            v, new["conv_v"] = conv(self.v_conv1d, v, state["conv_v"])
        q, k, v = act(q), act(k), F.silu(v)
        q = q.unflatten(-1, (self.num_heads, self.head_k_dim))
        k = k.unflatten(-1, (self.num_heads, self.head_k_dim))
        v = v.unflatten(-1, (self.num_v_heads, self.head_v_dim))
        if self._qk_norm() == "l2":
            q, k = l2_normalize(q), l2_normalize(k)
        else:  # "sum": x / Σx
            q, k = q / q.sum(-1, keepdim=True), k / k.sum(-1, keepdim=True)
        if self.num_v_heads != self.num_heads:  # grouped values: value head i reads key head i // group
            group = self.num_v_heads // self.num_heads
            q, k = q.repeat_interleave(group, dim=-2), k.repeat_interleave(group, dim=-2)
        return q, k, v, new

    def _qk_activation(self):
        return {"silu": F.silu, "relu": F.relu, "elu": lambda t: F.elu(t) + 1.0,
                "identity": lambda t: t}[getattr(self.config, "qk_activation", "silu")]

    def _qk_norm(self) -> str:
        return getattr(self.config, "qk_norm", "l2")

    def _beta(self, x: Tensor) -> Tensor:
        beta = torch.sigmoid(self.b_proj(x))
        return beta * 2.0 if self.config.allow_neg_eigval else beta

    def _log_decay(self, x: Tensor) -> Tensor | None:
        """g = log α per token and value head, or None (no decay)."""
        return None

    def _output(self, x: Tensor, o: Tensor) -> Tensor:
        """o (…, H_v, V) -> o_proj(norm(o)) (gated by SiLU(g_proj x) with use_gate)."""
        return _head_norm_output(self, x, o, self.config.use_gate)

    # --- the contract -------------------------------------------------------------------------------
    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """The chunked form, segment by segment on the CPU: each segment one group of chunks of the op
        (``ops.GROUP_ELEMENTS``) through the projections, convs, the rule, the norm and ``o_proj``, from
        the state the previous segment ends in, so every activation of a segment stays in cache and the
        time per token does not grow with T. Elsewhere (GPU) one segment. (Forward hooks on the
        projections therefore run once per segment.)"""
        state = self.check_input(x, state)
        B, T = x.shape[:2]
        segment = max(T, 1)
        if x.device.type == "cpu":
            L, K, V = self.config.chunk_size, self.head_k_dim, self.head_v_dim
            chunks = max(1, ops.GROUP_ELEMENTS // max(1, B * self.num_v_heads * L * max(L, K, V)))
            segment = L * chunks
        return by_segments(self._forward_segment, x, state, segment)

    def _forward_segment(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        q, k, v, new = self._features(x, state, step=False)
        beta, g = self._beta(x), self._log_decay(x)
        o, new["S"] = self._rule(q, k, v, g, beta, state["S"])
        return self._output(x, o), new

    def _rule(self, q, k, v, g, beta, S0) -> tuple[Tensor, Tensor]:
        """The recurrence over (B, T, H, ·): fla's chunk kernels on CUDA when they import, else ``ops``."""
        if (q.is_cuda and self.config.backend == "auto" and q.dtype != torch.float64 and q.shape[1] > 0
                and (kernels := _fla_ops()) is not None):  # fla keeps its states in float32
            if g is None:
                o, S = kernels["delta_rule"](q, k, v, beta, initial_state=S0.float(), output_final_state=True)
            else:
                o, S = kernels["gated_delta_rule"](q, k, v, g.float(), beta, initial_state=S0.float(),
                                                   output_final_state=True)
            return o.to(v.dtype), S.to(S0.dtype)
        chunk = self.config.chunk_size
        if g is None:
            o, S = delta_rule(q, k, v, beta, initial_state=S0, output_final_state=True, chunk_size=chunk)
        else:
            o, S = gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True, chunk_size=chunk)
        return o, S.to(S0.dtype)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One token of the recurrence: S ← α S; u = β(v − Sᵀk); S ← S + k uᵀ; o = Sᵀq/√K."""
        state = self.check_input(x, state, step=True)
        q, k, v, new = self._features(x, state, step=True)  # (B, H_v, ·)
        beta, g = self._beta(x), self._log_decay(x)  # (B, H_v)
        dt = torch.promote_types(x.dtype, torch.float32)  # half precision computes in float32, as forward
        q, k, v, beta, S = q.to(dt), k.to(dt), v.to(dt), beta.to(dt), state["S"].to(dt)
        if g is not None:
            S = S * g.to(dt).exp()[..., None, None]
        u = beta.unsqueeze(-1) * (v - torch.einsum("bhkv,bhk->bhv", S, k))
        S = torch.baddbmm(S.flatten(0, 1), k.reshape(-1, self.head_k_dim, 1), u.reshape(-1, 1, self.head_v_dim))
        S = S.view_as(state["S"])
        o = torch.einsum("bhkv,bhk->bhv", S, q) * (self.head_k_dim ** -0.5)
        new["S"] = S.to(state["S"].dtype)
        return self._output(x, o.to(x.dtype)), new

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, {self.config}"


# --- DeltaNet --------------------------------------------------------------------------------------
@dataclass
class DeltaNetConfig:
    """Options of ``deltanet`` (names and defaults as fla's ``DeltaNet``, plus chunk_size and backend)."""

    num_heads: int = field(default=4, metadata={"help": "number of heads"})
    expand_k: float = field(default=1.0, metadata={"help": "key_dim = d_model·expand_k"})
    expand_v: float = field(default=1.0, metadata={"help": "value_dim = d_model·expand_v"})
    use_beta: bool = field(default=True, metadata={"help": "β_t = σ(b_proj x) (False: β = 1)"})
    use_gate: bool = field(default=False, metadata={"help": "output norm gated by SiLU(g_proj x)"})
    use_short_conv: bool = field(default=True, metadata={"help": "depthwise causal convs on q, k, v"})
    conv_size: int = field(default=4, metadata={"help": "width of the short convs"})
    conv_bias: bool = field(default=False, metadata={"help": "bias in the short convs"})
    allow_neg_eigval: bool = field(default=False, metadata={"help": "β = 2σ(·): eigenvalues of I − βkkᵀ in (−1, 1]"})
    qk_activation: str = field(default="silu", metadata={"help": f"activation of q and k: {QK_ACTIVATIONS}"})
    qk_norm: str = field(default="l2", metadata={"help": f"normalisation of q and k: {QK_NORMS}"})
    norm_eps: float = field(default=1e-5, metadata={"help": "eps of the output RMSNorm"})
    chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={"help": "tokens per chunk of the chunked forward"})
    backend: str = field(default="auto", metadata={
        "help": "'auto': fla's chunk kernels for CUDA tensors when flash-linear-attention is installed, else "
                "the torch chunked form; 'torch': always the torch chunked form"})


class DeltaNet(_DeltaLayer):
    """DeltaNet (Schlag et al. 2021; Yang et al. 2024): the delta rule with β_t = σ(b_proj x_t).

    Parameters: ``q_proj``, ``k_proj`` (key_dim × C), ``v_proj`` (value_dim × C), ``b_proj`` (H × C, with
    use_beta), ``q_conv1d``/``k_conv1d``/``v_conv1d`` (depthwise, (n, 1, conv_size)), ``g_proj`` (use_gate),
    ``o_norm.weight`` (V), ``o_proj``. State: ``S`` (B, H, K, V) and the conv windows ``conv_q``,
    ``conv_k``, ``conv_v`` (B, n, conv_size − 1).
    """

    Config = DeltaNetConfig

    def __init__(self, d_model: int, **config):
        super().__init__(d_model)
        self.config = cfg = DeltaNetConfig(**config)
        if cfg.qk_activation not in QK_ACTIVATIONS:
            raise ValueError(f"expected qk_activation in {QK_ACTIVATIONS}, got {cfg.qk_activation!r}")
        if cfg.qk_norm not in QK_NORMS:
            raise ValueError(f"expected qk_norm in {QK_NORMS}, got {cfg.qk_norm!r}")
        H = positive_int("num_heads", cfg.num_heads)
        self._build(_whole("d_model·expand_k", d_model * cfg.expand_k), _whole("d_model·expand_v", d_model * cfg.expand_v),
                    H, H, cfg)
        if cfg.use_beta:
            self.b_proj = nn.Linear(d_model, H, bias=False)

    def _beta(self, x: Tensor) -> Tensor:
        if not self.config.use_beta:
            beta = x.new_ones(*x.shape[:-1], self.num_heads)
            return beta * 2.0 if self.config.allow_neg_eigval else beta
        return super()._beta(x)


# --- Gated DeltaNet --------------------------------------------------------------------------------
@dataclass
class GatedDeltaNetConfig:
    """Options of ``gated_deltanet`` (names as fla's ``GatedDeltaNet``; head_dim defaults to
    d_model / num_heads here, 256 there)."""

    num_heads: int = field(default=4, metadata={"help": "number of query/key heads"})
    head_dim: int | None = field(default=None, metadata={"help": "key features per head (default d_model // num_heads)"})
    expand_v: float = field(default=2.0, metadata={"help": "value features per head = head_dim·expand_v"})
    num_v_heads: int | None = field(default=None, metadata={
        "help": "value heads (default num_heads); more than num_heads groups the values (GVA)"})
    use_gate: bool = field(default=True, metadata={"help": "output norm gated by SiLU(g_proj x)"})
    use_short_conv: bool = field(default=True, metadata={"help": "depthwise causal convs on q, k, v"})
    allow_neg_eigval: bool = field(default=False, metadata={"help": "β = 2σ(·): eigenvalues of I − βkkᵀ in (−1, 1]"})
    conv_size: int = field(default=4, metadata={"help": "width of the short convs"})
    conv_bias: bool = field(default=False, metadata={"help": "bias in the short convs"})
    norm_eps: float = field(default=1e-5, metadata={"help": "eps of the output RMSNorm"})
    chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={"help": "tokens per chunk of the chunked forward"})
    backend: str = field(default="auto", metadata={
        "help": "'auto': fla's chunk kernels for CUDA tensors when flash-linear-attention is installed, else "
                "the torch chunked form; 'torch': always the torch chunked form"})


class GatedDeltaNet(_DeltaLayer):
    """Gated DeltaNet (Yang et al. 2025): the delta rule after a decay α_t = exp(g_t),
    g_t = −exp(A_log)·softplus(a_proj x_t + dt_bias), per token and value head.

    Parameters: as ``DeltaNet`` (``b_proj`` always) plus ``a_proj`` (H_v × C), ``A_log`` (H_v,) and
    ``dt_bias`` (H_v,), initialised as fla's (A ~ U(0, 16), dt log-uniform in [0.001, 0.1]).
    """

    Config = GatedDeltaNetConfig

    def __init__(self, d_model: int, **config):
        super().__init__(d_model)
        self.config = cfg = GatedDeltaNetConfig(**config)
        H = positive_int("num_heads", cfg.num_heads)
        if cfg.head_dim is None and d_model % H:
            raise ValueError(f"expected d_model divisible by num_heads, got d_model={d_model}, num_heads={H}")
        hd = positive_int("head_dim", d_model // H if cfg.head_dim is None else cfg.head_dim)
        HV = H if cfg.num_v_heads is None else positive_int("num_v_heads", cfg.num_v_heads)
        self.head_dim = hd
        self._build(H * hd, HV * _whole("head_dim·expand_v", hd * cfg.expand_v), H, HV, cfg)
        self.a_proj = nn.Linear(d_model, HV, bias=False)
        self.b_proj = nn.Linear(d_model, HV, bias=False)
        self.A_log, self.dt_bias = map(nn.Parameter, softplus_decay_init(HV, HV))
        self.A_log._no_weight_decay = self.dt_bias._no_weight_decay = True

    def _log_decay(self, x: Tensor) -> Tensor:
        """g = −exp(A_log)·softplus(a_proj x + dt_bias), in at least float32 (as fla's kernels)."""
        return softplus_log_decay(self.a_proj(x).to(torch.promote_types(x.dtype, torch.float32)), self.A_log,
                                  self.dt_bias)


# --- MesaNet ---------------------------------------------------------------------------------------
@dataclass
class MesaNetConfig:
    """Options of ``mesanet`` (names as fla's ``MesaNet``; head_dim defaults to d_model / num_heads here,
    128 there). ``solver``: ``exact`` (one Cholesky solve per token and head, fla's
    ``naive_mesa_net_exact``) or ``cg`` (conjugate gradient from 0 for ``max_cg_step_training`` steps in
    ``forward`` and ``max_cg_step_decoding`` in ``step``, as fla's kernels; step = forward when the two
    are equal)."""

    num_heads: int = field(default=4, metadata={"help": "number of heads"})
    head_dim: int | None = field(default=None, metadata={"help": "key and value features per head (default d_model // num_heads)"})
    use_output_gate: bool = field(default=False, metadata={"help": "output norm gated by SiLU(g_proj x)"})
    conv_size: int = field(default=4, metadata={"help": "width of the short convs on q and k"})
    conv_bias: bool = field(default=False, metadata={"help": "bias in the short convs"})
    norm_eps: float = field(default=1e-5, metadata={"help": "eps of the output RMSNorm"})
    lambda_lower_bound: float = field(default=0.25, metadata={"help": "λ = softplus(lambda_params) + this bound"})
    chunk_size: int = field(default=ops.MESA_CHUNK_SIZE, metadata={"help": "tokens per chunk of the chunked forward"})
    solver: str = field(default="exact", metadata={"help": "exact (Cholesky per token) or cg (fla's conjugate gradient)"})
    max_cg_step_training: int = field(default=30, metadata={"help": "CG steps in forward (solver cg)"})
    max_cg_step_decoding: int = field(default=30, metadata={"help": "CG steps in step (solver cg)"})
    backend: str = field(default="auto", metadata={"help": "auto: fla's CG kernel on CUDA (solver cg) when it imports; torch"})


class MesaNet(SequenceLayer):
    """MesaNet (von Oswald et al. 2025): each token's output is the exact ridge-regression prediction
    o_t = H^kv_tᵀ (H^kk_t + diag λ)⁻¹ q_t from decayed, β-weighted statistics of the keys and values
    (``ops.mesa_net``), with α_t = σ(a_proj x_t), β_t = σ(b_proj x_t) (both projections with bias),
    λ = softplus(lambda_params) + lambda_lower_bound per key feature; q, k = L2-normalised SiLU(short
    conv(proj x)), v = v_proj x; an RMSNorm per head (gated with use_output_gate) and ``o_proj``.

    Parameters as fla's ``MesaNet``: ``q_proj``, ``k_proj``, ``v_proj``, ``a_proj``, ``b_proj``,
    ``lambda_params`` (key_dim,), ``q_conv1d``, ``k_conv1d``, ``g_proj`` (use_output_gate), ``o_norm``,
    ``o_proj``. State: ``h_kk`` (B, H, K, K), ``h_kv`` (B, H, K, V), ``conv_q``, ``conv_k``.
    """

    Config = MesaNetConfig

    def __init__(self, d_model: int, **config):
        super().__init__(d_model)
        self.config = cfg = MesaNetConfig(**config)
        H = positive_int("num_heads", cfg.num_heads)
        if cfg.head_dim is None and d_model % H:
            raise ValueError(f"expected d_model divisible by num_heads, got d_model={d_model}, num_heads={H}")
        d = positive_int("head_dim", d_model // H if cfg.head_dim is None else cfg.head_dim)
        positive_int("chunk_size", cfg.chunk_size)
        K = positive_int("conv_size", cfg.conv_size)
        if not cfg.lambda_lower_bound >= 0:
            raise ValueError(f"expected lambda_lower_bound >= 0, got {cfg.lambda_lower_bound!r}")
        if cfg.solver not in ("exact", "cg"):
            raise ValueError(f"expected solver 'exact' or 'cg', got {cfg.solver!r}")
        if cfg.backend not in BACKENDS:
            raise ValueError(f"expected backend in {BACKENDS}, got {cfg.backend!r}")
        for name in ("max_cg_step_training", "max_cg_step_decoding"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"expected {name} to be a non-negative int, got {value!r}")
        self.num_heads, self.head_dim, self.key_dim = H, d, H * d
        C = d_model
        self.q_proj = nn.Linear(C, H * d, bias=False)
        self.k_proj = nn.Linear(C, H * d, bias=False)
        self.v_proj = nn.Linear(C, H * d, bias=False)
        self.a_proj = nn.Linear(C, H, bias=True)
        self.b_proj = nn.Linear(C, H, bias=True)
        lamb0 = math.log(math.expm1(1.0 - cfg.lambda_lower_bound))  # λ = 1 at the start (fla's)
        self.lambda_params = nn.Parameter(torch.full((H * d,), lamb0))
        self.lambda_params._no_weight_decay = True
        conv = lambda: nn.Conv1d(H * d, H * d, K, groups=H * d, padding=K - 1, bias=cfg.conv_bias)
        self.q_conv1d, self.k_conv1d = conv(), conv()
        if cfg.use_output_gate:
            self.g_proj = nn.Linear(C, H * d, bias=False)
            self.o_norm = GatedRMSNorm(d, eps=cfg.norm_eps)
        else:
            self.o_norm = RMSNorm(d, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(H * d, C, bias=False)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        H, d = self.num_heads, self.head_dim
        zeros = lambda *s: torch.zeros(*s, device=device, dtype=dtype)
        return {"h_kk": zeros(batch_size, H, d, d), "h_kv": zeros(batch_size, H, d, d),
                "conv_q": zeros(conv_state_shape(self.q_conv1d, batch_size)),
                "conv_k": zeros(conv_state_shape(self.k_conv1d, batch_size))}

    def state_size(self, seq_len: int) -> int:
        return 2 * self.num_heads * self.head_dim ** 2 + 2 * self.key_dim * (self.config.conv_size - 1)

    def flops(self, seq_len: int) -> float:
        """2T·Σ(projection weights) + T·H·(per token and head) + 4T·key_dim·conv_size (the q and k convs);
        per token and head: the two statistics' rank-1 updates (4K²) and the read-out H^kvᵀx (2K²), plus for
        ``exact`` a Cholesky factorisation and its two triangular solves (K³/3 + 2K²), for ``cg`` each step's
        product (2K² + 4·chunk_size·K, the chunked form's)."""
        d, cfg = self.head_dim, self.config
        if cfg.solver == "cg":
            solve = cfg.max_cg_step_training * (2 * d * d + 4 * cfg.chunk_size * d)
        else:
            solve = d ** 3 / 3 + 2 * d * d
        per_head = 6 * d * d + solve
        return super().flops(seq_len) + seq_len * (self.num_heads * per_head + 4.0 * self.key_dim * cfg.conv_size)

    def _lamb(self, dtype) -> Tensor:
        lamb = F.softplus(self.lambda_params.to(dtype)) + self.config.lambda_lower_bound
        return lamb.view(self.num_heads, self.head_dim)

    def _features(self, x: Tensor, state: State, step: bool):
        conv = causal_conv_step if step else causal_conv
        new = {}
        q, new["conv_q"] = conv(self.q_conv1d, self.q_proj(x), state["conv_q"])
        k, new["conv_k"] = conv(self.k_conv1d, self.k_proj(x), state["conv_k"])
        heads = lambda t: t.unflatten(-1, (self.num_heads, self.head_dim))
        q, k = l2_normalize(heads(F.silu(q))), l2_normalize(heads(F.silu(k)))
        beta, g = torch.sigmoid(self.b_proj(x)), F.logsigmoid(self.a_proj(x))
        return q, k, heads(self.v_proj(x)), g, beta, new

    def _output(self, x: Tensor, o: Tensor) -> Tensor:
        return _head_norm_output(self, x, o, self.config.use_output_gate)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        state = self.check_input(x, state)
        q, k, v, g, beta, new = self._features(x, state, step=False)
        cfg, lamb, stats = self.config, self._lamb(q.dtype), (state["h_kk"], state["h_kv"])
        if (cfg.solver == "cg" and q.is_cuda and cfg.backend == "auto" and q.dtype != torch.float64
                and q.shape[1] > 0 and (kernels := _fla_mesa()) is not None):
            o, h_kk, h_kv = kernels["chunk_mesa_net"](
                q=q, k=k, v=v, g=g.float(), beta=beta.float(), lamb=lamb.float(), h_kk_init=stats[0].float(),
                h_kv_init=stats[1].float(), output_final_state=True, max_CG_iteration=cfg.max_cg_step_training)
            o = o.to(v.dtype)
        elif cfg.solver == "cg":
            o, (h_kk, h_kv) = ops.mesa_net_cg(q, k, v, g, beta, lamb, iterations=cfg.max_cg_step_training,
                                              initial_state=stats, output_final_state=True, chunk_size=cfg.chunk_size)
        else:
            o, (h_kk, h_kv) = ops.mesa_net(q, k, v, g, beta, lamb, initial_state=stats, output_final_state=True,
                                           chunk_size=cfg.chunk_size)
        new["h_kk"], new["h_kv"] = h_kk.to(state["h_kk"].dtype), h_kv.to(state["h_kv"].dtype)
        return self._output(x, o), new

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One token of the recurrence (``mesa_net_reference``, or ``mesa_net_cg_reference`` with
        ``max_cg_step_decoding`` steps from 0): the statistics' decay and rank-1 updates, then one K×K
        solve per head."""
        state = self.check_input(x, state, step=True)
        features = self._features(x, state, step=True)  # (B, H, ·); half precision computes in float32
        dt = torch.promote_types(x.dtype, torch.float32)
        (q, k, v, g, beta), new = [t.to(dt).unsqueeze(1) for t in features[:5]], features[5]  # T = 1
        stats = (state["h_kk"].to(dt), state["h_kv"].to(dt))
        if self.config.solver == "cg":
            o, (h_kk, h_kv) = mesa_net_cg_reference(q, k, v, g, beta, self._lamb(dt), initial_state=stats,
                                                    iterations=self.config.max_cg_step_decoding)
        else:
            o, (h_kk, h_kv) = mesa_net_reference(q, k, v, g, beta, self._lamb(dt), initial_state=stats)
        new["h_kk"], new["h_kv"] = h_kk.to(state["h_kk"].dtype), h_kv.to(state["h_kv"].dtype)
        return self._output(x, o[:, 0].to(x.dtype)), new

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, {self.config}"


# --- MesaNet's rule as a general learner -----------------------------------------------------------
@dataclass
class MesaLearnerConfig(LearnerLayerConfig):
    """The general learner layer's options with RoPE off (the statistics keep no positions)."""

    rope: bool = field(default=False, metadata={"help": "rotary embedding of q and k (needs positions: off)"})


class MesaLearner(seqzoo.Learner):
    """MesaNet's rule as a general, non-gradient ``seqzoo.Learner``, run token by token by the learner
    layer: the storage is the statistics H^kk, H^kv; ``train`` decays them by α = σ(a_proj x) and adds
    the token with the weight β = σ(b_proj x) (the learner's ``rates``); ``predict`` solves
    (H^kk + diag λ) x = q and reads out H^kvᵀ x, λ = softplus(lambda_params) + 0.25 (an outer parameter per
    head). ``mesanet`` is the same rule chunked, with flash-linear-attention's features and names;
    tests/test_delta.py ties the two."""

    Config = MesaLearnerConfig
    rates = {"a": "sigmoid", "b": "sigmoid"}

    def init_state(self, batch_size: int, num_heads: int, *, device=None, dtype=None) -> State:
        d = self.head_dim
        return {"h_kk": torch.zeros(batch_size, num_heads, d, d, device=device, dtype=dtype),
                "h_kv": torch.zeros(batch_size, num_heads, d, d, device=device, dtype=dtype)}

    def init_outer_params(self) -> dict[str, Tensor]:
        bound = MesaNetConfig.lambda_lower_bound
        return {"lambda_params": torch.full((self.head_dim,), math.log(math.expm1(1.0 - bound)))}  # λ = 1

    def train(self, state: State, k: Tensor, v: Tensor, *, a: Tensor, b: Tensor, outer) -> State:
        alpha, bk = a[..., None, None], b.unsqueeze(-1) * k
        return {"h_kk": alpha * state["h_kk"] + bk.unsqueeze(-1) * k.unsqueeze(-2),
                "h_kv": alpha * state["h_kv"] + bk.unsqueeze(-1) * v.unsqueeze(-2)}

    def predict(self, state: State, q: Tensor, *, outer) -> Tensor:
        lamb = F.softplus(outer["lambda_params"]) + MesaNetConfig.lambda_lower_bound  # (H, d), as MesaNet's
        x = torch.linalg.solve(state["h_kk"] + torch.diag_embed(lamb), q)
        return torch.einsum("bhkv,bhk->bhv", state["h_kv"], x)

    def state_size(self, num_heads: int, seq_len: int) -> int:
        return 2 * num_heads * self.head_dim ** 2
