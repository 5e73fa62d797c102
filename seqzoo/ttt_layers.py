"""The TTT layer machinery: the layers built from a learner (the author API is ``seqzoo.learner``).

- ``LearnerLayer`` runs any ``Learner`` token by token (``step``; ``forward`` scans it).
- ``TTTLayer`` runs a ``GradientLearner``: the projections, the learnable learning rate η, RoPE, the
  mini-batch GD scan (gradients from torch.func, or a plugin's hand-derived chunk), the decode state.

The math, per head and mini-batch, is in ``seqzoo.learner``'s docstring and docs/layers/ttt.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .contract import State
from .learner import GradientLearner, Learner, online_options, positive_int
from .nn import (
    GatedRMSNorm,
    HeadProjections,
    RMSNorm,
    apply_rope,
    cached_views,
    causal_conv,
    causal_conv_step,
    conv_state_shape,
    l2_normalize,
    softplus_decay_init,
    softplus_log_decay,
)

log = logging.getLogger(__name__)

__all__ = ["LearnerLayer", "TTTLayer", "token_eta"]


def _no_autocast(device_type: str):
    """A context that turns autocast off for the inner loop (a no-op when it is off already)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def token_eta(mini_batch_size: int, learnable_token_idx: Tensor | None, *, device=None, dtype=None) -> Tensor:
    """tokidx[i] = max(1/i + learnable_token_idx[i], 0) for i = 1..b; ones when there is no offset."""
    if learnable_token_idx is None:
        return torch.ones(mini_batch_size, device=device, dtype=dtype)
    i = torch.arange(1, mini_batch_size + 1, device=learnable_token_idx.device, dtype=learnable_token_idx.dtype)
    return torch.clamp_min(1.0 / i + learnable_token_idx, 0.0)


# --- a layer around any Learner --------------------------------------------------------------------
class LearnerLayer(HeadProjections):
    """The TTT layer of a general ``Learner``: step = train(k_t, v_t), then y_t = predict(q_t).

    ``forward`` scans ``step``; a learner with a parallel form gets a subclass that overrides it.
    """

    def __init__(self, d_model: int, *, learner: type[Learner], **config: Any):
        super().__init__(d_model)
        self.config = cfg = learner.layer_config()(**config)
        self._build_projections(cfg.num_heads, cfg.share_qk, cfg.use_gate, cfg.conv_kernel)
        if cfg.rope and self.head_dim % 2:
            raise ValueError(
                f"rope needs an even head_dim, got head_dim={self.head_dim} "
                f"(d_model={d_model}, num_heads={cfg.num_heads})"
            )
        self.learner = learner(self.head_dim, **dataclasses.asdict(cfg))
        self.state_dynamic_dims = dict(learner.state_dynamic_dims)
        for name, kind in learner.rates.items():  # per-token rates from the token: σ(θ·x + b) per head
            if kind != "sigmoid":
                raise ValueError(f"{learner.__name__}.rates[{name!r}]: expected 'sigmoid', got {kind!r}")
            setattr(self, f"{name}_proj", nn.Linear(d_model, self.num_heads, bias=True))
        outer = [self.learner.init_outer_params() for _ in range(self.num_heads)]
        self.outer_names = list(outer[0])
        for name in self.outer_names:
            if hasattr(self, name):
                raise ValueError(f"learner parameter name {name!r} clashes with the layer's own names")
            setattr(self, name, nn.Parameter(torch.stack([p[name] for p in outer]).float()))

    def _rule_inputs(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The learner's per-token rates for x (B, C), (B, H) each, and the ``outer`` keyword (if any)."""
        rates = {name: torch.sigmoid(getattr(self, f"{name}_proj")(x)) for name in self.learner.rates}
        extra = {"outer": {n: getattr(self, n).to(x.dtype) for n in self.outer_names}} if self.outer_names else {}
        return rates, extra

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        state = self.learner.init_state(batch_size, self.num_heads, device=device, dtype=dtype)
        if "conv" in state:
            raise ValueError("a learner's state may not use the key 'conv' (the share_qk conv window)")
        state.update(self._conv_state(batch_size, device, dtype))
        return state

    def state_size(self, seq_len: int) -> int:
        return self.learner.state_size(self.num_heads, seq_len) + self._conv_state_size()

    def _position(self, state: State) -> int:
        """Absolute position of the next token, for RoPE (the learner's ``position(state)``)."""
        return self.learner.position(state)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        state = self.check_input(x, state, step=True)
        q, k, v, new = self._qkv_step(x, state)
        inner = {key: t for key, t in state.items() if key != "conv"}
        if self.config.rope:
            pos = torch.tensor([self._position(state)], device=x.device)
            q = apply_rope(q.unsqueeze(2), pos, self.config.rope_theta).squeeze(2)
            k = apply_rope(k.unsqueeze(2), pos, self.config.rope_theta).squeeze(2)
        rates, extra = self._rule_inputs(x)
        inner = self.learner.train(inner, k, v, **rates, **extra)  # update rule
        y = self.learner.predict(inner, q, **extra)  # output rule
        new.update(inner)
        y = rearrange(y, "b h d -> b (h d)")
        return self.o_proj(self._gate(x, y)), new

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        state = self.check_input(x, state)
        ys = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return (torch.stack(ys, 1) if ys else x.new_zeros(x.shape)), state


# --- the TTT layer around any GradientLearner ------------------------------------------------------
class TTTLayer(HeadProjections):
    """A TTT layer whose hidden state is a ``GradientLearner``'s weights, trained by mini-batch GD.

    Parameters (ttt-lm-pytorch names): ``q_proj``, ``k_proj`` (or ``conv_q``/``conv_k`` with share_qk),
    ``v_proj``, ``o_proj``, ``g_proj`` (use_gate), the learner's W0 stacked over heads (e.g. ``W1`` (H, d, d)),
    its outer parameters (e.g. ``ttt_norm_weight`` (H, d)), ``learnable_ttt_lr_weight`` (H, 1, C),
    ``learnable_ttt_lr_bias`` (H, 1), ``learnable_token_idx`` (b,), ``post_norm`` (LayerNorm(C)).
    Output: o_proj([gelu_tanh(g_proj(x)) ⊙] post_norm(z)).

    State: for each weight ``n`` of the learner, ``n`` (B, H, ...) = weights at the mini-batch start and
    ``n_grad`` = Σ gate_j ∇ℓ_j over the mini-batch so far; ``pos`` (B,) int64, the position inside the
    mini-batch; ``mini_batch_size`` (B,) int64, b (so a state of another layer is refused);
    ``conv`` (B, C, K-1) with share_qk.

    The online learners' options (``seqzoo.learner.ONLINE_OPTIONS``; DeltaNet, Gated DeltaNet and
    Titans-style memories are learners with them): ``lr_gate`` and ``lr_per_dim`` shape η;
    ``qk_norm="l2"`` normalises q and k; ``short_conv`` adds depthwise causal convs with SiLU on q, k, v
    (``q_conv1d``, ``k_conv1d``, ``v_conv1d``, no bias; state ``conv_q``, ``conv_k``, ``conv_v``);
    ``output_norm="rmsnorm"`` is an RMSNorm per head (``o_norm``, weight (d,), eps 1e-5; with use_gate
    gated by SiLU(g_proj x) inside the norm instead of gelu_tanh after it); ``head_gate`` multiplies each
    head's output by σ(head_gate_proj x) (H × C). With mini_batch_size 1, ``decay`` ("softplus":
    ``a_proj`` (H × C), ``A_log`` (H,), ``dt_bias`` (H,), Gated DeltaNet's α; "sigmoid": ``decay_proj``
    (H × C, with bias), α = 1 − σ(·), Titans'; with ``decay_shape="key"`` a vector α over the key features,
    ``a_proj``/``decay_proj`` (H·d × C) and ``dt_bias`` (H·d,), applied as diag(α) along each weight's
    key axis, ``GradientLearner.key_axes``) and ``momentum`` (``momentum_proj`` (H × C, with bias);
    state ``n_momentum``) make the update, per token,

        S_t = [μ_t S_{t−1}] − η_t ∇ℓ_t(W_in),   W_t = α_t W_{t−1} + S_t,
        W_in = α_t W_{t−1} (decay_position "before") or W_{t−1} ("after").
    """

    #: whether this class implements the online learners' options (the generic path does; a layer with
    #: hand-derived fast paths that does not is replaced by ``TTTLayer`` when they are set)
    online_options: bool = True

    #: the ``backend`` names this layer resolves: "torch" (the torch path) and "auto" (its fastest exact
    #: path); a layer with kernels of its own adds their names
    backends: tuple[str, ...] = ("auto", "torch")

    def flops(self, seq_len: int) -> float:
        """2T·Σ(projection weights) + 2T·C·H (the η gate) [+ T·H·learner.token_flops()]: what every TTT layer
        computes outside its inner model, plus the inner model's training and prediction per token and
        head when the learner states them (``token_flops``); a layer of hand-derived forms counts its own."""
        gate = 2.0 * seq_len * self.d_model * self.num_heads if self.config.learnable_lr else 0.0
        token_flops = getattr(self.learner, "token_flops", None)
        inner = seq_len * self.num_heads * token_flops() if callable(token_flops) else 0.0
        return super().flops(seq_len) + gate + inner

    def __init__(self, d_model: int, *, learner: type[GradientLearner], **config: Any):
        super().__init__(d_model)
        self.config = cfg = learner.layer_config()(**config)
        self._build_projections(cfg.num_heads, cfg.share_qk, cfg.use_gate, cfg.conv_kernel)
        H, d, C = self.num_heads, self.head_dim, d_model
        b = self.mini_batch_size = positive_int("mini_batch_size", cfg.mini_batch_size)
        if cfg.rope and d % 2:
            raise ValueError(f"rope needs an even head_dim, got head_dim={d} (d_model={C}, num_heads={H})")
        if cfg.backend not in self.backends:
            raise ValueError(f"expected backend in {self.backends}, got {cfg.backend!r}")
        if not isinstance(cfg.scan_checkpoint_group_size, int) or cfg.scan_checkpoint_group_size < 0:
            raise ValueError(f"expected scan_checkpoint_group_size >= 0, got {cfg.scan_checkpoint_group_size!r}")
        if not self.online_options and online_options(cfg):
            raise ValueError(f"{type(self).__name__} does not implement {online_options(cfg)}; the learner's "
                             "make_layer builds the generic TTTLayer for them")
        self._check_online_options(cfg)
        self.learner = learner(d, **dataclasses.asdict(cfg))

        # W0 and the outer-only parameters of the learner, one per head, stacked on dim 0
        inner = [self.learner.init_params() for _ in range(H)]
        outer = [self.learner.init_outer_params() for _ in range(H)]
        self.inner_names = list(inner[0])
        self.outer_names = list(outer[0])
        for name in self.inner_names + self.outer_names:
            if (hasattr(self, name) or name in ("pos", "conv", "conv_q", "conv_k", "conv_v", "mini_batch_size")
                    or name.endswith(("_grad", "_momentum"))):
                raise ValueError(f"learner parameter name {name!r} clashes with the TTT layer's own names")
        for name in self.inner_names:
            w0 = torch.stack([p[name] for p in inner]).float()
            if cfg.learnable_w0:
                setattr(self, name, nn.Parameter(w0))
            else:  # W0 = 0, fixed (the linear-attention end of the ablation ladder)
                self.register_buffer(name, torch.zeros_like(w0))
        for name in self.outer_names:
            setattr(self, name, nn.Parameter(torch.stack([p[name] for p in outer]).float()))

        # learnable η: gate_j = σ(θ_lr,h · x_j + b_lr,h), row scale tokidx[i] = 1/i + learnable_token_idx[i]
        if cfg.learnable_lr:
            self.learnable_ttt_lr_weight = nn.Parameter(0.02 * torch.randn(H, 1, C))
            self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(H, 1))
        if cfg.token_idx:
            self.learnable_token_idx = nn.Parameter(torch.zeros(b))
        self.post_norm = nn.LayerNorm(C, eps=1e-6) if cfg.post_norm and cfg.output_norm == "layernorm" else None
        self._build_online_modules(cfg)
        self._check_key_axes()

    def _check_online_options(self, cfg) -> None:
        choices = {"lr_gate": ("sigmoid", "2sigmoid"), "qk_norm": ("none", "l2"),
                   "output_norm": ("layernorm", "rmsnorm"), "decay": ("none", "softplus", "sigmoid"),
                   "decay_shape": ("head", "key"), "decay_position": ("before", "after")}
        for name, allowed in choices.items():
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"expected {name} in {allowed}, got {getattr(cfg, name)!r}")
        if not isinstance(cfg.short_conv, int) or isinstance(cfg.short_conv, bool) or cfg.short_conv < 0:
            raise ValueError(f"expected short_conv to be an int >= 0, got {cfg.short_conv!r}")
        if cfg.short_conv and cfg.share_qk:
            raise ValueError("short_conv and share_qk both convolve q and k: choose one")
        if (cfg.decay != "none" or cfg.momentum) and self.mini_batch_size != 1:
            raise ValueError(f"decay and momentum are online updates: expected mini_batch_size=1, got "
                             f"{self.mini_batch_size}")
        if cfg.output_norm == "rmsnorm" and cfg.use_gate and not cfg.post_norm:
            raise ValueError("output_norm='rmsnorm' with use_gate gates inside the norm: it needs post_norm=True")

    def _check_key_axes(self) -> None:
        """``decay_shape="key"`` needs every weight's key axis (``GradientLearner.key_axes``), of size d."""
        if self.config.decay == "none" or self.config.decay_shape != "key":
            return
        axes = getattr(self.learner, "key_axes", {})
        for name in self.inner_names:
            shape = getattr(self, name).shape[1:]
            if name not in axes or not 0 <= axes[name] < len(shape) or shape[axes[name]] != self.head_dim:
                raise ValueError(f"decay_shape='key' needs {type(self.learner).__name__}.key_axes to name the "
                                 f"key axis (size {self.head_dim}) of weight {name!r} (shape {tuple(shape)}); "
                                 f"got key_axes={axes}")

    def _build_online_modules(self, cfg) -> None:
        """The modules of the online learners' options (none at their defaults)."""
        C, H, d = self.d_model, self.num_heads, self.head_dim
        rows = H * d if cfg.decay_shape == "key" else H  # one decay per head, or per head and key feature
        if cfg.short_conv:
            conv = lambda: nn.Conv1d(C, C, cfg.short_conv, groups=C, padding=cfg.short_conv - 1, bias=False)
            self.q_conv1d, self.k_conv1d, self.v_conv1d = conv(), conv(), conv()
        self.o_norm = None
        if cfg.post_norm and cfg.output_norm == "rmsnorm":
            self.o_norm = GatedRMSNorm(d, eps=1e-5) if cfg.use_gate else RMSNorm(d, eps=1e-5)
        if cfg.decay == "softplus":  # initialised as Gated DeltaNet's: A ~ U(0, 16), softplus(dt_bias) in [1e-3, 0.1]
            self.a_proj = nn.Linear(C, rows, bias=False)
            self.A_log, self.dt_bias = map(nn.Parameter, softplus_decay_init(H, rows))
        elif cfg.decay == "sigmoid":
            self.decay_proj = nn.Linear(C, rows, bias=True)
        if cfg.momentum:
            self.momentum_proj = nn.Linear(C, H, bias=True)
        if cfg.head_gate:
            self.head_gate_proj = nn.Linear(C, H, bias=False)

    @property
    def _online(self) -> bool:
        """Whether the update is the online rule with a decay or a momentum (``_online_scan``)."""
        return self.config.decay != "none" or self.config.momentum

    # --- state ------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        state: State = {}
        for name in self.inner_names:
            w0 = getattr(self, name).to(device=device, dtype=dtype)  # W0 keeps its graph: it is learned
            state[name] = w0.unsqueeze(0).expand(batch_size, *w0.shape).clone()
            state[f"{name}_grad"] = torch.zeros_like(state[name])
            if self.config.momentum:
                state[f"{name}_momentum"] = torch.zeros_like(state[name])
        state["pos"] = torch.zeros(batch_size, dtype=torch.int64, device=device)
        state["mini_batch_size"] = torch.full((batch_size,), self.mini_batch_size, dtype=torch.int64, device=device)
        state.update(self._conv_state(batch_size, device, dtype))
        return state

    def state_size(self, seq_len: int) -> int:
        weights = sum(getattr(self, n).numel() for n in self.inner_names)
        return (3 if self.config.momentum else 2) * weights + 2 + self._conv_state_size()

    def _conv_state(self, batch_size: int, device, dtype) -> State:
        if not self.config.short_conv:
            return super()._conv_state(batch_size, device, dtype)
        shape = conv_state_shape(self.q_conv1d, batch_size)
        return {f"conv_{n}": torch.zeros(shape, device=device, dtype=dtype) for n in ("q", "k", "v")}

    def _conv_state_size(self) -> int:
        if not self.config.short_conv:
            return super()._conv_state_size()
        return 3 * self.d_model * (self.config.short_conv - 1)

    def _qkv(self, x: Tensor, state: State) -> tuple[Tensor, Tensor, Tensor, State]:
        """The views (B, H, T, d), after the short convs and the q/k norm when those options are on."""
        if not self.config.short_conv:
            XQ, XK, XV, new = super()._qkv(x, state)
        else:
            views, new = self._short_convs(x, state, step=False)
            XQ, XK, XV = (rearrange(t, "b t (h d) -> b h t d", h=self.num_heads) for t in views)
        if self.config.qk_norm == "l2":
            XQ, XK = l2_normalize(XQ), l2_normalize(XK)
        return XQ, XK, XV, new

    def _qkv_step(self, x: Tensor, state: State) -> tuple[Tensor, Tensor, Tensor, State]:
        if not self.config.short_conv:
            q, k, v, new = super()._qkv_step(x, state)
        else:
            views, new = self._short_convs(x, state, step=True)
            q, k, v = (t.unflatten(-1, (self.num_heads, -1)) for t in views)
        if self.config.qk_norm == "l2":
            q, k = l2_normalize(q), l2_normalize(k)
        return q, k, v, new

    def _short_convs(self, x: Tensor, state: State, step: bool) -> tuple[list[Tensor], State]:
        """SiLU(short conv(proj x)) for q, k, v (heads merged) and the new conv windows."""
        conv = causal_conv_step if step else causal_conv
        views, new = [], {}
        for n in ("q", "k", "v"):
            y, new[f"conv_{n}"] = conv(getattr(self, f"{n}_conv1d"), getattr(self, f"{n}_proj")(x), state[f"conv_{n}"])
            views.append(F.silu(y))
        return views, new

    def _owns_qk(self) -> bool:
        return bool(self.config.short_conv or self.config.qk_norm != "none") or super()._owns_qk()

    def check_input(self, x: Tensor, state: State | None = None, *, step: bool = False) -> State:
        return self._checked(x, state, step)[0]

    def _checked(self, x: Tensor, state: State | None, step: bool) -> tuple[State, int]:
        """``check_input`` and the position inside the mini-batch (read once: step runs per token)."""
        state = super().check_input(x, state, step=step)
        pos, b = state["pos"].tolist(), state["mini_batch_size"].tolist()
        if any(m != self.mini_batch_size for m in b):
            raise ValueError(
                f"expected a state of a layer with mini_batch_size={self.mini_batch_size}, got one with "
                f"state['mini_batch_size'] = {b}"
            )
        if pos and (min(pos) < 0 or max(pos) >= self.mini_batch_size):
            raise ValueError(f"expected state['pos'] in [0, {self.mini_batch_size}), got {pos}")
        if pos and any(p != pos[0] for p in pos):
            raise ValueError(f"expected every batch element at the same position, got state['pos'] = {pos}")
        return state, (pos[0] if pos else 0)

    def _start_weights(self, state: State) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """W and G from the state, flattened to (B·H, ...)."""
        flat = lambda t: t.reshape(-1, *t.shape[2:])
        W = {n: flat(state[n]) for n in self.inner_names}
        G = {n: flat(state[f"{n}_grad"]) for n in self.inner_names}
        return W, G

    # --- the views and the learning rate -----------------------------------------------------------
    def _outer(self, batch: int, dtype) -> dict[str, Tensor]:
        """The outer-only per-head parameters expanded to (B·H, ...) (views, made once per batch size in
        the parameters' dtype while autograd does not track them)."""

        def build():
            out = {}
            for n in self.outer_names:
                p = getattr(self, n).to(dtype)
                out[n] = p.unsqueeze(0).expand(batch, *p.shape).reshape(-1, *p.shape[1:])
            return out

        return cached_views(self, ("outer", batch, dtype), [getattr(self, n) for n in self.outer_names], build)

    def _lr_base(self) -> float:
        """ttt_base_lr [/ d with lr_per_dim] [· 2 with lr_gate '2sigmoid']: η = base · σ(θ_lr x + b)."""
        cfg = self.config
        base = cfg.ttt_base_lr / (self.head_dim if cfg.lr_per_dim else 1)
        return base * (2.0 if cfg.lr_gate == "2sigmoid" and cfg.learnable_lr else 1.0)

    def _gate_eta(self, x: Tensor) -> Tensor:
        """gate_j = ttt_base_lr · σ(θ_lr,h · x_j + b_lr,h) / d for x (B, T, C) -> (B, H, T) (``_lr_base``)."""
        base = self._lr_base()
        if not self.config.learnable_lr:
            return torch.full((x.shape[0], self.num_heads, x.shape[1]), base, device=x.device, dtype=x.dtype)
        logits = torch.einsum("btc,hc->bht", x, self.learnable_ttt_lr_weight[:, 0].to(x.dtype))
        return base * torch.sigmoid(logits + self.learnable_ttt_lr_bias.to(x.dtype).unsqueeze(0))

    def _token_eta(self, device, dtype) -> Tensor:
        idx = getattr(self, "learnable_token_idx", None)
        return token_eta(self.mini_batch_size, None if idx is None else idx.to(dtype), device=device, dtype=dtype)

    def _rope(self, XQ: Tensor, XK: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """RoPE at positions t mod b (the position inside the mini-batch)."""
        if not self.config.rope:
            return XQ, XK
        T = XQ.shape[-2]
        positions = (start + torch.arange(T, device=XQ.device)) % self.mini_batch_size
        theta = self.config.rope_theta
        # XQ and XK are this call's own projections: rotated in place unless a hook has seen them
        inplace = self._owns_qk()
        return apply_rope(XQ, positions, theta, inplace=inplace), apply_rope(XK, positions, theta, inplace=inplace)

    def _output(self, x: Tensor, z: Tensor) -> Tensor:
        heads = lambda t: t.unflatten(-1, (self.num_heads, self.head_dim))
        if self.o_norm is not None:  # RMSNorm per head, the gate inside it with use_gate
            z = heads(z)
            z = (self.o_norm(z, heads(self.g_proj(x))) if self.use_gate else self.o_norm(z)).flatten(-2)
        else:
            if self.post_norm is not None:  # module calls, so hooks and wrapped modules (LoRA, ...) apply
                z = self.post_norm(z)
            z = self._gate(x, z)
        if self.config.head_gate:
            z = (heads(z) * torch.sigmoid(self.head_gate_proj(x)).unsqueeze(-1)).flatten(-2)
        return self.o_proj(z)

    # --- forward: whole mini-batches through _full, partial ones through _chunk --------------------
    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        state = self.check_input(x, state)
        B, T, _ = x.shape
        if T == 0:
            return x.new_zeros(x.shape), dict(state)
        XQ, XK, XV, new = self._qkv(x, state)
        return self._ttt(x, XQ, XK, XV, state, new)

    def _ttt(self, x: Tensor, XQ: Tensor, XK: Tensor, XV: Tensor, state: State, new: State) -> tuple[Tensor, State]:
        """The inner loop and the output rule on the views XQ, XK, XV (B, H, T, d) of x (B, T, C)."""
        B = x.shape[0]
        p = int(state["pos"][0]) if B else 0
        dtype = x.dtype  # RoPE, the inner loop and the state stay in x's dtype, under autocast too
        with _no_autocast(x.device.type):
            XQ, XK = self._rope(XQ.to(dtype), XK.to(dtype), p)
            flat = lambda t: rearrange(t.to(dtype), "b h t d -> (b h) t d")
            lr = rearrange(self._gate_eta(x), "b h t -> (b h) t")
            W, G = self._start_weights(state)
            if self._online:
                M = self._momentum(state)
                Z, W, M = self._online_scan(flat(XQ), flat(XK), flat(XV), lr * self._token_eta(x.device, dtype)[0],
                                            *self._online_rates(x), W, M, self._outer(B, dtype))
                p_end = 0
            else:
                Z, W, G, p_end = self._scan(flat(XQ), flat(XK), flat(XV), lr, self._token_eta(x.device, dtype),
                                            W, G, p, self._outer(B, dtype))
        unflat = lambda t: t.reshape(B, self.num_heads, *t.shape[1:])
        for n in self.inner_names:
            new[n], new[f"{n}_grad"] = unflat(W[n]), unflat(G[n])
            if self.config.momentum:
                new[f"{n}_momentum"] = unflat(M[n])
        new["pos"] = torch.full((B,), p_end, dtype=torch.int64, device=x.device)
        new["mini_batch_size"] = state["mini_batch_size"]
        z = rearrange(Z, "(b h) t d -> b t (h d)", b=B)
        return self._output(x, z), new

    def _scan(self, XQ, XK, XV, lr, tok, W, G, p, outer):
        """Split (B·H, T, ...) at absolute mini-batch boundaries: a head to the next boundary, whole
        mini-batches, a tail. Returns Z (B·H, T, d), W, G and the position after the last token."""
        b, T = self.mini_batch_size, XQ.shape[1]
        Zs, t = [], 0
        if p > 0:  # finish the mini-batch a previous call started
            r = min(T, b - p)
            Z, W_bar, G = self._chunk(XQ[:, :r], XK[:, :r], XV[:, :r], lr[:, :r], tok[p:p + r], W, G, outer)
            Zs.append(Z)
            t, p = r, (p + r) % b
            if p == 0:  # W ← W̄_b, G ← 0
                W, G = W_bar, {n: torch.zeros_like(g) for n, g in G.items()}
        n_full = (T - t) // b
        if n_full:
            e = t + n_full * b
            Z, W = self._full(XQ[:, t:e], XK[:, t:e], XV[:, t:e], lr[:, t:e], tok, W, outer)
            Zs.append(Z)
            t = e
        if t < T:  # a partial mini-batch: rows 1..r, weights unchanged, G carried in the state
            r = T - t
            Z, _, G = self._chunk(XQ[:, t:], XK[:, t:], XV[:, t:], lr[:, t:], tok[:r], W, G, outer)
            Zs.append(Z)
            p = r
        return (Zs[0] if len(Zs) == 1 else torch.cat(Zs, dim=1)), W, G, p

    def _full(self, XQ, XK, XV, lr, tok, W, outer):
        """Whole mini-batches from W with G = 0; returns Z and the weights after the last one."""
        b = self.mini_batch_size
        n = XQ.shape[1] // b
        group = self.config.scan_checkpoint_group_size
        use_ckpt = group > 0 and self.training and torch.is_grad_enabled()

        def run(lo: int, hi: int, *flat_W: Tensor):
            Wc = dict(zip(self.inner_names, flat_W))
            Zs = []
            for k in range(lo, hi):
                s = slice(k * b, (k + 1) * b)
                G0 = {m: torch.zeros_like(w) for m, w in Wc.items()}
                Z, Wc, _ = self._chunk(XQ[:, s], XK[:, s], XV[:, s], lr[:, s], tok, Wc, G0, outer)
                Zs.append(Z)
            return (torch.cat(Zs, dim=1), *[Wc[m] for m in self.inner_names])

        Zs = []
        step = group if use_ckpt else n
        flat_W = [W[m] for m in self.inner_names]
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            if use_ckpt:
                Z, *flat_W = torch.utils.checkpoint.checkpoint(run, lo, hi, *flat_W, use_reentrant=False)
            else:
                Z, *flat_W = run(lo, hi, *flat_W)
            Zs.append(Z)
        return torch.cat(Zs, dim=1), dict(zip(self.inner_names, flat_W))

    def _chunk(self, XQ, XK, XV, lr, tok, W, G, outer):
        """r consecutive tokens of one mini-batch, generic (torch.func) form.

        XQ/XK/XV (N, r, d), lr (N, r) gates, tok (r,) row scales, W/G dicts of (N, ...), outer of (N, ...).
        Returns Z (N, r, d), W̄ of the last row, and G + Σ_j gate_j ∇ℓ_j(W).
        """
        learner = self.learner

        def loss(inner, out, k, v):
            return learner.loss({**inner, **out}, k, v)

        def predict(inner, out, q):
            return learner.predict({**inner, **out}, q)

        # ∇ℓ_j(W) for every token j, all at the mini-batch-start weights
        grads = torch.func.vmap(torch.func.vmap(torch.func.grad(loss), in_dims=(None, None, 0, 0)))(W, outer, XK, XV)
        W_bar, G_new = {}, {}
        for n, g in grads.items():
            shape = (-1, g.shape[1]) + (1,) * (g.ndim - 2)
            Gc = G[n].unsqueeze(1) + torch.cumsum(lr.reshape(shape) * g, dim=1)  # G_i
            W_bar[n] = W[n].unsqueeze(1) - tok.reshape(1, -1, *[1] * (g.ndim - 2)) * Gc  # W̄_i = W − tokidx[i]·G_i
            G_new[n] = Gc[:, -1]
        Z = torch.func.vmap(torch.func.vmap(predict, in_dims=(0, None, 0)))(W_bar, outer, XQ)
        return Z, {n: w[:, -1] for n, w in W_bar.items()}, G_new

    # --- step: one token --------------------------------------------------------------------------
    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One token in the primal form: the gradient of this token at the mini-batch-start weights W is
        added to G, the output uses W̄ = W − tokidx·G, and W ← W̄ only at the mini-batch's end."""
        state, p = self._checked(x, state, step=True)
        B, H, d, b = x.shape[0], self.num_heads, self.head_dim, self.mini_batch_size
        q, k, v, new = self._qkv_step(x, state)
        dtype = x.dtype
        with _no_autocast(x.device.type):
            if q.dtype != dtype:  # under autocast
                q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            q, k = self._rope_step(q, k, p)
            flat = lambda t: t.reshape(B * H, 1, d)
            W, G = self._start_weights(state)
            commit = p + 1 == b  # the mini-batch is complete: W ← W̄_b, G ← 0
            tok = self._token_eta_at(p, x.device, dtype)
            if self._online:
                M = self._momentum(state)
                rates = self._online_rates(x.unsqueeze(1))  # (B·H, 1[, d]) each
                Z, W_bar, M = self._online_scan(flat(q), flat(k), flat(v), self._gate_eta_step(x) * tok, *rates, W, M,
                                                self._outer(B, dtype))
            else:
                Z, W_bar, G = self._token_step(flat(q), flat(k), flat(v), self._gate_eta_step(x), tok, W, G,
                                               self._outer(B, dtype), commit)
        if commit:
            W, G = W_bar, {n: torch.zeros_like(g) for n, g in G.items()}
        for n in self.inner_names:
            new[n], new[f"{n}_grad"] = W[n].reshape(B, H, *W[n].shape[1:]), G[n].reshape(B, H, *G[n].shape[1:])
            if self.config.momentum:
                new[f"{n}_momentum"] = M[n].reshape(B, H, *M[n].shape[1:])
        new["pos"] = torch.full((B,), (p + 1) % b, dtype=torch.int64, device=x.device)
        new["mini_batch_size"] = state["mini_batch_size"]
        return self._output(x, Z.reshape(B, H * d)), new

    # --- the online rule with a decay or a momentum (mini_batch_size 1) ----------------------------
    def _momentum(self, state: State) -> dict[str, Tensor] | None:
        if not self.config.momentum:
            return None
        return {n: state[f"{n}_momentum"].reshape(-1, *state[n].shape[2:]) for n in self.inner_names}

    def _online_rates(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """α_t (decay) and μ_t (momentum) per head and token, (B·H, T) each, or None without the option."""
        alpha = mu = None
        key = self.config.decay_shape == "key"
        if self.config.decay == "softplus":
            A_log = self.A_log.repeat_interleave(self.head_dim) if key else self.A_log  # one A per head
            alpha = softplus_log_decay(self.a_proj(x), A_log, self.dt_bias).exp()
        elif self.config.decay == "sigmoid":
            alpha = 1 - torch.sigmoid(self.decay_proj(x))
        if alpha is not None:  # (B·H, T) per head, (B·H, T, d) per head and key feature
            alpha = (rearrange(alpha, "b t (h d) -> (b h) t d", h=self.num_heads) if key
                     else rearrange(alpha, "b t h -> (b h) t"))
        if self.config.momentum:
            mu = rearrange(torch.sigmoid(self.momentum_proj(x)), "b t h -> (b h) t")
        return alpha, mu

    def _online_scan(self, XQ, XK, XV, lr, alpha, mu, W, M, outer):
        """Token by token (N, T, d): S_t = [μ_t S_{t−1}] − η_t ∇ℓ_t(W_in), W_t = [α_t] W_{t−1} + S_t with
        W_in = α_t W_{t−1} (decay_position "before") or W_{t−1} ("after"); z_t = f(q_t; W_t).
        Returns Z (N, T, d), W and the momentum S (None without it). Gradients from torch.func."""
        learner, before = self.learner, self.config.decay_position == "before"
        grad = torch.func.vmap(torch.func.grad(lambda w, o, k, v: learner.loss({**w, **o}, k, v)))
        predict = torch.func.vmap(lambda w, o, q: learner.predict({**w, **o}, q))
        scale = lambda c, t: c.reshape(-1, *[1] * (t.ndim - 1)) * t  # a per-row scalar times (N, ...)
        axes = getattr(learner, "key_axes", {})

        def decay(a: Tensor, name: str, w: Tensor) -> Tensor:
            if a.ndim == 1:
                return scale(a, w)
            shape = [a.shape[0]] + [1] * (w.ndim - 1)  # diag(α) along the weight's key axis
            shape[1 + axes[name]] = a.shape[1]
            return a.reshape(shape) * w

        Zs = []
        for t in range(XQ.shape[1]):
            decayed = W if alpha is None else {n: decay(alpha[:, t], n, w) for n, w in W.items()}
            g = grad(decayed if before else W, outer, XK[:, t], XV[:, t])
            S = {n: -scale(lr[:, t], g[n]) for n in W}
            if mu is not None:
                S = M = {n: scale(mu[:, t], M[n]) + S[n] for n in W}
            W = {n: decayed[n] + S[n] for n in W}
            Zs.append(predict(W, outer, XQ[:, t]))
        Z = torch.stack(Zs, dim=1) if Zs else XQ.new_zeros(XQ.shape)
        return Z, W, M

    def _token_step(self, XQ, XK, XV, lr, tok, W, G, outer, commit: bool):
        """One token (N, 1, d) of ``step``: Z (N, 1, d), W̄ (needed only when ``commit``), G updated.
        A learner with a closed-form primal step overrides this; the default is ``_chunk``."""
        return self._chunk(XQ, XK, XV, lr, tok, W, G, outer)

    def _gate_eta_step(self, x: Tensor) -> Tensor:
        """``_gate_eta`` of one token x (B, C) -> (B·H, 1)."""
        if not self.config.learnable_lr:
            return x.new_full((x.shape[0] * self.num_heads, 1), self._lr_base())
        weight, bias = self.learnable_ttt_lr_weight, self.learnable_ttt_lr_bias
        weight_t, bias = cached_views(self, ("lr_gate", x.dtype), [weight, bias],
                                      lambda: (weight[:, 0].to(x.dtype).t(), bias[:, 0].to(x.dtype)))
        gate = torch.sigmoid(torch.addmm(bias, x, weight_t)).view(-1, 1)
        return gate * self._lr_base()

    def _token_eta_at(self, p: int, device, dtype) -> Tensor:
        """tokidx[p] of ``token_eta`` as a (1,) tensor."""
        idx = getattr(self, "learnable_token_idx", None)
        if idx is None:
            return torch.ones(1, device=device, dtype=dtype)
        return torch.clamp_min(idx[p:p + 1].to(dtype) + 1.0 / (p + 1), 0.0)

    def _rope_step(self, q: Tensor, k: Tensor, p: int) -> tuple[Tensor, Tensor]:
        """RoPE of one token (B, H, d) at position p inside the mini-batch, from a table of the b
        rotations made once per dtype and device by ``apply_rope`` itself (so the numbers are its own)."""
        if not self.config.rope:
            return q, k
        if q.dtype not in (torch.float32, torch.float64):
            pos = torch.tensor([p], device=q.device)
            rope = lambda t: apply_rope(t.unsqueeze(-2), pos, self.config.rope_theta).squeeze(-2)
            return rope(q), rope(k)
        rotation = self._rope_table(q.dtype, q.device)[p]
        pairs = lambda t: torch.view_as_complex(t.contiguous().unflatten(-1, (-1, 2)))
        rope = lambda t: torch.view_as_real(pairs(t) * rotation).flatten(-2)
        return rope(q), rope(k)

    def _rope_table(self, dtype: torch.dtype, device, *, pairs: bool = False) -> Tensor:
        """The b rotations e^{i·p·θ_k} of the positions p inside a mini-batch, (b, d/2) complex, or with
        ``pairs`` the same memory as (cos, sin) pairs (b, d/2, 2) real; made once per dtype and device by
        ``apply_rope`` itself (so the numbers are its own)."""
        cache = self.__dict__.setdefault("_rope_tables", {})
        key = (dtype, device, apply_rope, torch.is_inference_mode_enabled())  # an inference tensor serves only there
        if key not in cache:  # apply_rope of the pairs (1, 0) at positions 0..b-1 is (cos, sin)
            basis = torch.zeros(self.mini_batch_size, self.head_dim, dtype=dtype, device=device)
            basis[:, 0::2] = 1.0
            table = apply_rope(basis, torch.arange(self.mini_batch_size, device=device), self.config.rope_theta)
            real = table.unflatten(-1, (-1, 2)).contiguous()
            cache[key] = (torch.view_as_complex(real), real)
        rotations, cos_sin = cache[key]
        return cos_sin if pairs else rotations

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, {self.config}"
