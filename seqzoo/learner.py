"""Learners: the inner models of TTT layers, what a plugin author writes (the author API).

The layers built from a learner (``LearnerLayer``, ``TTTLayer``) are in ``seqzoo.ttt_layers``.

A TTT layer's hidden state is the storage of a learner; the update rule trains the learner on the
current token's view (θ_K x, θ_V x) and the output rule asks it to predict from θ_Q x.

- ``Learner``: the general form (``init_state``, ``train``, ``predict``), e.g. Nadaraya-Watson, whose
  storage is every key and value seen. ``LearnerLayer`` runs any learner token by token.
- ``GradientLearner``: a parametric model f(x; W) written for one head and one token, trained by
  mini-batch gradient descent. ``TTTLayer`` supplies the projections, the learnable learning rate η,
  RoPE, the mini-batch GD scan (gradients from torch.func) and the decode state.

Mini-batch GD (TTT paper §2.7), per head, for a mini-batch with start weights W, tokens i, j = 1..b:
    η[i, j] = tokidx[i] · gate_j,   gate_j = ttt_base_lr · σ(θ_lr · x_j + b_lr) / d,
    tokidx[i] = max(1/i + learnable_token_idx[i], 0),
    W̄_i = W − Σ_{j≤i} η[i, j] ∇ℓ_j(W) = W − tokidx[i] · G_i,   G_i = Σ_{j≤i} gate_j ∇ℓ_j(W),
    z_i = f(θ_Q x_i; W̄_i),   and at the end of the mini-batch W ← W̄_b.
So the decode state is W (weights at the mini-batch start), G and the position inside the mini-batch.
Mini-batches are aligned to absolute positions [kb, (k+1)b), so a sequence may be cut anywhere.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from .contract import SequenceLayer, State

log = logging.getLogger(__name__)

__all__ = [
    "Learner",
    "GradientLearner",
    "LearnerLayerConfig",
    "TTTConfig",
    "ONLINE_OPTIONS",
    "online_options",
]



def positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"expected {name} to be a positive int, got {value!r}")
    return value


# --- configs ---------------------------------------------------------------------------------------
@dataclass
class LearnerLayerConfig:
    """Options of a layer built around a general ``Learner`` (projections as in self-attention)."""

    num_heads: int = field(default=4, metadata={"help": "number of heads; d_model must be divisible by it"})
    rope: bool = field(default=True, metadata={"help": "rotary embedding of q and k at absolute positions"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base"})
    use_gate: bool = field(default=False, metadata={"help": "output o_proj(gelu_tanh(g_proj(x)) * y)"})
    share_qk: bool = field(
        default=False, metadata={"help": "one q_proj, then depthwise causal convs conv_q / conv_k for q and k"}
    )
    conv_kernel: int = field(default=4, metadata={"help": "width of conv_q / conv_k (with share_qk)"})


@dataclass
class TTTConfig:
    """Options of a TTT layer around a ``GradientLearner`` (names as in ttt-lm-pytorch's TTTConfig)."""

    num_heads: int = field(default=4, metadata={"help": "number of heads; d_model must be divisible by it"})
    mini_batch_size: int = field(
        default=16, metadata={"help": "TTT mini-batch b: 1 = online GD, >= sequence length = batch GD"}
    )
    ttt_base_lr: float = field(default=1.0, metadata={"help": "base inner learning rate (η = base·gate/d)"})
    share_qk: bool = field(
        default=False, metadata={"help": "one q_proj, then depthwise causal convs conv_q / conv_k for q and k"}
    )
    use_gate: bool = field(default=False, metadata={"help": "output o_proj(gelu_tanh(g_proj(x)) * post_norm(z))"})
    conv_kernel: int = field(default=4, metadata={"help": "width of conv_q / conv_k (with share_qk)"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base (positions t mod b)"})
    backend: str = field(
        default="auto",
        metadata={"help": "which implementation of the inner scan runs, resolved by the layer's plugin: 'torch' "
                          "(the readable torch path), 'auto' (the plugin's fastest exact path for the tensors), or "
                          "a name of the plugin's kernels ('triton'); see the layer's documentation"},
    )
    scan_checkpoint_group_size: int = field(
        default=0, metadata={"help": "mini-batches per gradient-checkpointed group when training (0 = off)"}
    )
    # the Table-1 ablation ladder
    learnable_w0: bool = field(default=True, metadata={"help": "W0 a learnable parameter (False: W0 = 0, fixed)"})
    inner_norm: bool = field(
        default=True, metadata={"help": "f(x) = x + LN(f_res(x)) (False: f(x) = f_res(x), no bias, no LN)"}
    )
    learnable_lr: bool = field(default=True, metadata={"help": "η_j gated by σ(θ_lr x_j + b) (False: gate 1)"})
    token_idx: bool = field(default=True, metadata={"help": "scale row i of η by 1/i + learnable offset"})
    rope: bool = field(default=True, metadata={"help": "RoPE on XQ and XK"})
    post_norm: bool = field(default=True, metadata={"help": "a norm on z before the output projection (output_norm)"})
    # the online learners' options (DeltaNet, Gated DeltaNet, Titans-style memories); the generic path
    lr_gate: str = field(default="sigmoid", metadata={"online": True,
        "help": "η's gate: 'sigmoid' σ(θ_lr x + b), or '2sigmoid' 2σ(θ_lr x + b) (eigenvalues of I − ηkkᵀ down to −1)"})
    lr_per_dim: bool = field(default=True, metadata={"online": True, "help": "divide η by head_dim (the TTT paper's 1/d)"})
    qk_norm: str = field(default="none", metadata={"online": True, "help": "'l2': q and k scaled to unit norm, x·rsqrt(Σx² + 1e-6)"})
    short_conv: int = field(default=0, metadata={"online": True,
        "help": "width of depthwise causal convs with SiLU on q, k and v (q_conv1d, k_conv1d, v_conv1d; 0: none)"})
    output_norm: str = field(default="layernorm", metadata={"online": True,
        "help": "post_norm's kind: 'layernorm' over d_model, or 'rmsnorm' per head (o_norm; gated by "
                "SiLU(g_proj x) with use_gate)"})
    decay: str = field(default="none", metadata={"online": True,
        "help": "a decay α_t of the weights per head and token (mini_batch_size 1): 'softplus' "
                "α = exp(−exp(A_log)·softplus(a_proj x + dt_bias)) (Gated DeltaNet's), 'sigmoid' "
                "α = 1 − σ(decay_proj x) (Titans')"})
    decay_shape: str = field(default="head", metadata={"online": True,
        "help": "'head': one α per head and token; 'key': a vector α over the key features (diag(α)W: the "
                "learner names each weight's key axis in key_axes)"})
    decay_position: str = field(default="before", metadata={"online": True,
        "help": "'before': W_t = αW − η∇ℓ(αW) (the gradient at the decayed weights); 'after': W_t = αW − η∇ℓ(W)"})
    momentum: bool = field(default=False, metadata={"online": True,
        "help": "the step is a momentum S_t = μ_t S_{t−1} − η_t∇ℓ, μ_t = σ(momentum_proj x_t) (mini_batch_size 1)"})
    head_gate: bool = field(default=False, metadata={"online": True,
        "help": "each head's output times σ(head_gate_proj x), before o_proj (Titans' retrieve gate)"})


#: the online learners' options of ``TTTConfig`` (its fields marked ``online``) and their defaults: a
#: layer class that does not implement them (``TTTLayer.online_options`` False) gives way to the generic
#: ``TTTLayer`` when any is set
ONLINE_OPTIONS = {f.name: f.default for f in dataclasses.fields(TTTConfig) if f.metadata.get("online")}


def online_options(config: Any) -> list[str]:
    """The online-learner options that ``config`` (a ``TTTConfig`` or a dict) sets away from their defaults."""
    get = config.get if isinstance(config, dict) else (lambda k, d: getattr(config, k, d))
    return [k for k, default in ONLINE_OPTIONS.items() if get(k, default) != default]


# --- learners --------------------------------------------------------------------------------------
class Learner:
    """A learner has a storage (the TTT layer's hidden state), ``train`` and ``predict``.

    Subclasses implement, for a batch of heads (leading dims (B, H)):
      ``init_state(batch_size, num_heads, device, dtype)`` -> dict of tensors (B, H, ...),
      ``train(state, k, v)`` -> new state after one token (k, v of shape (B, H, d)),
      ``predict(state, q)`` -> (B, H, d).
    ``make_layer`` wraps it in a ``LearnerLayer``: step = train on (k, v), then predict from q.
    """

    Config: ClassVar[type] = LearnerLayerConfig
    #: state keys whose dims grow with the sequence (as ``SequenceLayer.state_dynamic_dims``)
    state_dynamic_dims: ClassVar[dict[str, tuple[int, ...]]] = {}
    #: per-token rates ``train`` takes as keyword arguments, (B, H) each, made by the layer from the token:
    #: name -> "sigmoid", σ(θ·x + b) from a projection ``{name}_proj`` (d_model -> heads, with bias)
    rates: ClassVar[dict[str, str]] = {}

    def __init__(self, head_dim: int, **config: Any):
        self.head_dim = positive_int("head_dim", head_dim)
        self.config = config

    @classmethod
    def layer_config(cls) -> type:
        """The dataclass of the TTT layer's config options for this learner."""
        return cls.Config

    @classmethod
    def make_layer(cls, d_model: int, **config: Any) -> SequenceLayer:
        """Build the TTT layer whose hidden state is this learner."""
        return cls.layer_class()(d_model, learner=cls, **config)

    @classmethod
    def layer_class(cls) -> type:
        from .ttt_layers import LearnerLayer

        return LearnerLayer

    def init_state(self, batch_size: int, num_heads: int, *, device=None, dtype=None) -> State:
        raise NotImplementedError

    def train(self, state: State, k: Tensor, v: Tensor, **rates: Tensor) -> State:
        """The update rule for one token; ``rates`` as declared in ``rates`` (and ``outer``, the
        parameters of ``init_outer_params`` stacked over heads, when there are any)."""
        raise NotImplementedError

    def predict(self, state: State, q: Tensor) -> Tensor:
        """The output rule for one token (with ``outer=`` when there are outer parameters)."""
        raise NotImplementedError

    def init_outer_params(self) -> dict[str, Tensor]:
        """Parameters of one head that the outer loop trains and the rules read (default none); the layer
        stacks them over heads and passes them to ``train`` and ``predict`` as ``outer`` ((H, ...) each)."""
        return {}

    def position(self, state: State) -> int:
        """How many tokens the storage has seen (the absolute position of the next one), for RoPE."""
        raise NotImplementedError(f"{type(self).__name__} does not track positions; use rope=False")

    def state_size(self, num_heads: int, seq_len: int) -> int:
        """Scalars of storage per batch element after ``seq_len`` tokens."""
        st = self.init_state(1, num_heads, device="meta")
        return sum(v.numel() for v in st.values())


class GradientLearner(Learner):
    """A parametric inner model f(x; W) for one head and one token, trained by mini-batch GD.

    Write ``init_params`` (W0 of one head: a dict of tensors) and ``predict(params, x)`` for one token
    x of shape (head_dim,); optionally ``loss(params, k, v)`` (default ½‖predict(params, k) − v‖²) and
    ``init_outer_params`` (per-head parameters the inner loop reads but does not train, such as an
    inner LayerNorm). Gradients come from torch.func, so no backward is needed.
    """

    Config: ClassVar[type] = TTTConfig
    #: for ``decay_shape="key"``: each weight's axis of key features (size head_dim), e.g. {"W": 0} for
    #: f(x) = xW, whose rows a vector decay diag(α) scales
    key_axes: ClassVar[dict[str, int]] = {}

    @classmethod
    def layer_class(cls) -> type:
        from .ttt_layers import TTTLayer

        return TTTLayer

    @classmethod
    def make_layer(cls, d_model: int, **config: Any) -> SequenceLayer:
        """The TTT layer of this learner: ``layer_class()``, or the generic ``TTTLayer`` when the config
        sets an online-learner option (``ONLINE_OPTIONS``) that the layer class's fast paths lack."""
        from .ttt_layers import TTTLayer

        layer_cls = cls.layer_class()
        if not getattr(layer_cls, "online_options", False) and online_options(config):
            log.info("%s: %s set; using the generic TTT layer", cls.__name__, ", ".join(online_options(config)))
            layer_cls = TTTLayer
        return layer_cls(d_model, learner=cls, **config)

    def init_params(self) -> dict[str, Tensor]:
        """W0 of one head: the inner model's trainable weights (a learnable outer-loop parameter)."""
        raise NotImplementedError

    def init_outer_params(self) -> dict[str, Tensor]:
        """Per-head parameters read by ``predict`` but trained by the outer loop only (default none)."""
        return {}

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """f(x; params) for one token x of shape (head_dim,) -> (head_dim,)."""
        raise NotImplementedError

    def loss(self, params: dict[str, Tensor], k: Tensor, v: Tensor) -> Tensor:
        """The inner self-supervised loss of one token: ½‖f(k) − v‖²."""
        return 0.5 * (self.predict(params, k) - v).pow(2).sum()


