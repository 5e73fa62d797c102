"""The official TTT-Linear / TTT-MLP layer, structured as ttt-lm-pytorch runs it: the speed anchor.

This is a port for benchmarking, not a seqzoo layer. It keeps the reference implementation's algorithmic
structure on purpose, because that structure is what the benchmark compares against:

- Q/K/V projections for the whole sequence, then RoPE at positions ``t mod b`` computed the
  Hugging Face way (cos/sin in float32, rotate-half) between a permutation of the head dimension into
  halves and its inverse (``permute_qk`` / ``undo_permute_qk``), so the net rotation is of adjacent pairs;
- the learning rate η[i, j] = token_idx[i] · ttt_base_lr · σ(θ_lr · x_j + b_lr) / d for every mini-batch,
  as one (B, H, n, b, b) tensor (``get_eta``);
- a Python loop over the mini-batches (the reference's ``scan``) whose body is the dual form for one
  mini-batch, with the LayerNorm + L2 loss gradient written out by hand (``ln_fused_l2_bwd``);
- a trailing partial mini-batch of r < b tokens is a second scan with mini-batch size r, continuing from
  the weights the first scan ended with.

Parameter names are the official ones, so one state_dict loads into this module, into seqzoo's
``ttt_linear`` / ``ttt_mlp`` and into ttt-lm-pytorch's ``TTTLinear`` / ``TTTMLP``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

__all__ = ["OfficialConfig", "OfficialTTTLinear", "OfficialTTTMLP", "make_official"]


@dataclass
class OfficialConfig:
    """The subset of ttt-lm-pytorch's ``TTTConfig`` that a single TTT layer reads."""

    hidden_size: int = 768
    num_heads: int = 12
    mini_batch_size: int = 16
    ttt_base_lr: float = 1.0
    share_qk: bool = False
    use_gate: bool = False
    conv_kernel: int = 4
    rope_theta: float = 10000.0
    #: mini-batches per gradient-checkpoint group of the scan when training (0: no checkpointing)
    scan_checkpoint_group_size: int = 0


# --- helpers of the reference, one function each -------------------------------------------------


def _pairs_to_halves(x: Tensor) -> Tensor:
    """(..., d) with pairs (2i, 2i+1) -> (..., d) with all even entries first, then all odd ones."""
    *lead, d = x.shape
    return x.reshape(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


def _halves_to_pairs(x: Tensor) -> Tensor:
    """Inverse of ``_pairs_to_halves``."""
    *lead, d = x.shape
    return x.reshape(*lead, 2, d // 2).transpose(-1, -2).reshape(*lead, d)


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def _rope_cos_sin(
    head_dim: int, positions: Tensor, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, head_dim) for rotate-half RoPE; angles in float32 like the reference."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # (T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, d)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _layer_norm(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-6) -> Tensor:
    mu = x.mean(dim=-1, keepdim=True)
    std = torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + eps)
    return gamma * (x - mu) / std + beta


def _layer_norm_l2_grad(z: Tensor, target: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-6) -> Tensor:
    """∂/∂z of ½‖LN(z) − target‖², by hand (the reference's fused LayerNorm + L2 backward)."""
    d = z.shape[-1]
    mu = z.mean(dim=-1, keepdim=True)
    std = torch.sqrt(z.var(dim=-1, keepdim=True, unbiased=False) + eps)
    z_hat = (z - mu) / std
    grad_z_hat = (gamma * z_hat + beta - target) * gamma
    return (
        d * grad_z_hat
        - grad_z_hat.sum(dim=-1, keepdim=True)
        - z_hat * (grad_z_hat * z_hat).sum(dim=-1, keepdim=True)
    ) / (d * std)


def _gelu_tanh_grad(x: Tensor) -> Tensor:
    """d/dx gelu_tanh(x), with the reference's rounded constants."""
    t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    return 0.5 * x * ((1 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + t)


def _scan(
    body, carry: dict[str, Tensor], xs: dict[str, Tensor], out: Tensor, group: int
) -> dict[str, Tensor]:
    """``jax.lax.scan`` as the reference writes it: a Python loop over dim 0 of ``xs``, results into ``out``.

    With ``group > 0`` every ``group`` iterations run under one activation checkpoint.
    """
    n = next(iter(xs.values())).shape[0]

    def run(carry, start, stop):
        for i in range(start, stop):
            carry, out[i] = body(carry, {k: v[i] for k, v in xs.items()})
        return carry

    if group <= 0:
        return run(carry, 0, n)
    for start in range(0, n, group):
        carry = torch.utils.checkpoint.checkpoint(
            run, carry, start, min(start + group, n), use_reentrant=False
        )
    return carry


# --- the layer -----------------------------------------------------------------------------------


class _OfficialTTTBase(nn.Module):
    """Projections, RoPE, η, the mini-batch scan and the output path shared by TTT-Linear and TTT-MLP."""

    inner_names: tuple[str, ...] = ()

    def __init__(self, config: OfficialConfig):
        super().__init__()
        self.config = config
        C, H = config.hidden_size, config.num_heads
        if C % H:
            raise ValueError(f"hidden_size {C} is not divisible by num_heads {H}")
        self.width, self.num_heads, self.head_dim = C, H, C // H
        self.mini_batch_size = config.mini_batch_size

        self.learnable_token_idx = nn.Parameter(torch.zeros(config.mini_batch_size))

        self.q_proj = nn.Linear(C, C, bias=False)
        if not config.share_qk:
            self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)
        if config.share_qk:
            conv = dict(kernel_size=config.conv_kernel, groups=C, padding=config.conv_kernel - 1, bias=True)
            self.conv_q = nn.Conv1d(C, C, **conv)
            self.conv_k = nn.Conv1d(C, C, **conv)

        self.learnable_ttt_lr_weight = nn.Parameter(0.02 * torch.randn(H, 1, C))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(H, 1))
        self.ttt_norm_weight = nn.Parameter(torch.ones(H, self.head_dim))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(H, self.head_dim))
        if config.use_gate:
            self.g_proj = nn.Linear(C, C, bias=False)
        self.post_norm = nn.LayerNorm(C, eps=1e-6)

    # projections -------------------------------------------------------------------------------
    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """XQ, XK, XV of shape (B, T, C)."""
        if not self.config.share_qk:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        T = x.shape[1]
        xq = self.q_proj(x).transpose(1, 2)  # (B, C, T)
        XQ = self.conv_q(xq)[..., :T].transpose(1, 2)
        XK = self.conv_k(xq)[..., :T].transpose(1, 2)
        return XQ, XK, self.v_proj(x)

    def rope(self, XQ: Tensor, XK: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate-half RoPE at positions mod b, wrapped in the pairs <-> halves permutation."""
        cos, sin = _rope_cos_sin(
            self.head_dim, positions % self.mini_batch_size, self.config.rope_theta, XQ.dtype
        )
        XQ, XK = _pairs_to_halves(XQ), _pairs_to_halves(XK)
        XQ = XQ * cos + _rotate_half(XQ) * sin
        XK = XK * cos + _rotate_half(XK) * sin
        return _halves_to_pairs(XQ), _halves_to_pairs(XK)

    # learning rate -----------------------------------------------------------------------------
    def get_eta(self, X: Tensor, mini_batch_size: int) -> Tensor:
        """η of shape (B, H, n, b, b): η[i, j] = clamp(1/i + idx_i, 0) · base_lr · σ(θ_h·x_j + b_h) / d."""
        # X: (B, n, b, C) -> gate (B, H, n, b, 1) -> (B, H, n, 1, b), one column per source token j
        gate = torch.einsum("bnkc,hdc->bhnkd", X, self.learnable_ttt_lr_weight)
        gate = torch.sigmoid(gate + self.learnable_ttt_lr_bias.reshape(1, -1, 1, 1, 1))
        lr_eta = self.config.ttt_base_lr * gate.permute(0, 1, 2, 4, 3) / self.head_dim
        token_idx = 1.0 / torch.arange(1, self.mini_batch_size + 1, dtype=X.dtype, device=X.device)
        token_eta = torch.clamp_min(token_idx + self.learnable_token_idx, 0.0)[:mini_batch_size]
        token_eta = token_eta.reshape(1, 1, 1, mini_batch_size, 1)  # one row per target token i
        return token_eta * lr_eta

    # the scan ----------------------------------------------------------------------------------
    def initial_params(self, batch_size: int) -> dict[str, Tensor]:
        return {
            name: getattr(self, name).unsqueeze(0).repeat(batch_size, 1, 1, 1) for name in self.inner_names
        }

    def mini_batch(
        self, params: dict[str, Tensor], inputs: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Dual form for one mini-batch: (params at its end, outputs XQ + LN(f_res(XQ; W̄)))."""
        raise NotImplementedError

    def ttt(self, XQ: Tensor, XK: Tensor, XV: Tensor, X: Tensor, mini_batch_size: int, params):
        """Run the scan over the mini-batches of (B, H, L, d) views; L a multiple of ``mini_batch_size``."""
        B, H, L, d = XV.shape
        n = L // mini_batch_size
        split = lambda t: t.reshape(B, H, n, mini_batch_size, d)
        eta = self.get_eta(X.reshape(B, n, mini_batch_size, self.width), mini_batch_size)
        # (B, H, n, b, ·) -> (n, B, H, b, ·): the scan runs over dim 0
        xs = {
            name: t.permute(2, 0, 1, 3, 4)
            for name, t in {"XQ": split(XQ), "XK": split(XK), "XV": split(XV), "eta": eta}.items()
        }
        out = torch.empty(n, B, H, mini_batch_size, d, dtype=XV.dtype, device=XV.device)
        if params is None:
            params = self.initial_params(B)
        group = self.config.scan_checkpoint_group_size if self.training else 0
        params = _scan(self.mini_batch, params, xs, out, group)
        return out.permute(1, 0, 3, 2, 4).reshape(B, L, self.width), params

    def forward(self, hidden_states: Tensor) -> Tensor:
        """Apply the layer to a fresh sequence ``hidden_states`` of shape (B, T, hidden_size)."""
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.width:
            raise ValueError(
                f"expected input of shape (B, T, {self.width}), got {tuple(hidden_states.shape)}"
            )
        B, L, _ = hidden_states.shape
        b = self.mini_batch_size
        XQ, XK, XV = self.qkv(hidden_states)
        # (B, L, C) -> (B, H, L, d)
        XQ, XK, XV = (t.reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2) for t in (XQ, XK, XV))
        XQ, XK = self.rope(XQ, XK, torch.arange(L, device=hidden_states.device))

        n_full, rest = divmod(L, b)
        outputs, params = [], None
        if n_full:
            cut = n_full * b
            out, params = self.ttt(
                XQ[:, :, :cut], XK[:, :, :cut], XV[:, :, :cut], hidden_states[:, :cut], b, params
            )
            outputs.append(out)
        if rest:
            out, _ = self.ttt(
                XQ[:, :, -rest:], XK[:, :, -rest:], XV[:, :, -rest:], hidden_states[:, -rest:], rest, params
            )
            outputs.append(out)
        z = self.post_norm(torch.cat(outputs, dim=1))
        if self.config.use_gate:
            z = F.gelu(self.g_proj(hidden_states), approximate="tanh") * z
        return self.o_proj(z)


class OfficialTTTLinear(_OfficialTTTBase):
    """TTT-Linear: f(x) = x + LN(x·W1 + b1) per head."""

    inner_names = ("W1", "b1")

    def __init__(self, config: OfficialConfig):
        super().__init__(config)
        self.W1 = nn.Parameter(0.02 * torch.randn(self.num_heads, self.head_dim, self.head_dim))
        self.b1 = nn.Parameter(torch.zeros(self.num_heads, 1, self.head_dim))

    def mini_batch(self, params, inputs):
        W1, b1 = params["W1"], params["b1"]  # (B, H, d, d), (B, H, 1, d)
        XQ, XK, XV, eta = inputs["XQ"], inputs["XK"], inputs["XV"], inputs["eta"]  # (B, H, b, ·)
        ln_w = self.ttt_norm_weight.reshape(self.num_heads, 1, self.head_dim)
        ln_b = self.ttt_norm_bias.reshape(self.num_heads, 1, self.head_dim)

        # gradient of ½‖LN(XK W1 + b1) − (XV − XK)‖² w.r.t. Z1 at the mini-batch-start weights
        Z1 = XK @ W1 + b1
        grad_Z1 = _layer_norm_l2_grad(Z1, XV - XK, ln_w, ln_b)

        # dual form: W̄_i = W1 − Σ_{j≤i} η_ij XK_jᵀ ∇_j  =>  XQ_i W̄_i = XQ_i W1 − Σ_{j≤i} η_ij (XQ_i·XK_j) ∇_j
        attn = torch.tril(XQ @ XK.transpose(-2, -1))
        b1_bar = b1 - torch.tril(eta) @ grad_Z1
        Z1_bar = XQ @ W1 - (eta * attn) @ grad_Z1 + b1_bar

        eta_last = eta[:, :, -1, :, None]  # (B, H, b, 1): η of the last row
        new = {
            "W1": W1 - (eta_last * XK).transpose(-1, -2) @ grad_Z1,
            "b1": b1 - (eta_last * grad_Z1).sum(dim=-2, keepdim=True),
        }
        return new, XQ + _layer_norm(Z1_bar, ln_w, ln_b)


class OfficialTTTMLP(_OfficialTTTBase):
    """TTT-MLP: f(x) = x + LN(gelu_tanh(x·W1 + b1)·W2 + b2) per head, hidden width 4d."""

    inner_names = ("W1", "b1", "W2", "b2")

    def __init__(self, config: OfficialConfig):
        super().__init__(config)
        H, d = self.num_heads, self.head_dim
        self.W1 = nn.Parameter(0.02 * torch.randn(H, d, 4 * d))
        self.b1 = nn.Parameter(torch.zeros(H, 1, 4 * d))
        self.W2 = nn.Parameter(0.02 * torch.randn(H, 4 * d, d))
        self.b2 = nn.Parameter(torch.zeros(H, 1, d))

    def mini_batch(self, params, inputs):
        W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
        XQ, XK, XV, eta = inputs["XQ"], inputs["XK"], inputs["XV"], inputs["eta"]
        ln_w = self.ttt_norm_weight.reshape(self.num_heads, 1, self.head_dim)
        ln_b = self.ttt_norm_bias.reshape(self.num_heads, 1, self.head_dim)

        # forward and hand-written backward of the inner MLP on the keys
        Z1 = XK @ W1 + b1
        X2 = F.gelu(Z1, approximate="tanh")
        Z2 = X2 @ W2 + b2
        grad_Z2 = _layer_norm_l2_grad(Z2, XV - XK, ln_w, ln_b)
        grad_Z1 = (grad_Z2 @ W2.transpose(-2, -1)) * _gelu_tanh_grad(Z1)

        # dual form, layer by layer
        eta_tril = torch.tril(eta)
        attn1 = torch.tril(XQ @ XK.transpose(-2, -1))
        b1_bar = b1 - eta_tril @ grad_Z1
        Z1_bar = XQ @ W1 - (eta * attn1) @ grad_Z1 + b1_bar
        X2_bar = F.gelu(Z1_bar, approximate="tanh")
        attn2 = torch.tril(X2_bar @ X2.transpose(-2, -1))
        b2_bar = b2 - eta_tril @ grad_Z2
        Z2_bar = X2_bar @ W2 - (eta * attn2) @ grad_Z2 + b2_bar

        eta_last = eta[:, :, -1, :, None]
        new = {
            "W1": W1 - (eta_last * XK).transpose(-1, -2) @ grad_Z1,
            "b1": b1 - (eta_last * grad_Z1).sum(dim=-2, keepdim=True),
            "W2": W2 - (eta_last * X2).transpose(-1, -2) @ grad_Z2,
            "b2": b2 - (eta_last * grad_Z2).sum(dim=-2, keepdim=True),
        }
        return new, XQ + _layer_norm(Z2_bar, ln_w, ln_b)


def make_official(kind: str, **config) -> _OfficialTTTBase:
    """``make_official("linear" | "mlp", hidden_size=..., num_heads=..., ...)``."""
    classes = {"linear": OfficialTTTLinear, "mlp": OfficialTTTMLP}
    if kind not in classes:
        raise ValueError(f"expected kind 'linear' or 'mlp', got {kind!r}")
    return classes[kind](OfficialConfig(**config))
