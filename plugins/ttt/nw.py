"""The Nadaraya-Watson learner: a nonparametric TTT layer whose storage is every key and value seen.

Per head, with κ(k, q) ∝ exp(⟨k, q⟩/√d) (keys θ_K x and queries θ_Q x, RoPE at absolute positions):
    train:    storage ← storage ∪ {(k_t, v_t)}
    predict:  y_t = Σ_{s≤t} κ(k_s, q_t) v_s / Σ_{s≤t} κ(k_s, q_t)     (kernel regression)
This is causal softmax self-attention (TTT paper, Theorem 2); its state is a KV cache.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from seqzoo.contract import State
from seqzoo.learner import Learner
from seqzoo.nn import apply_rope
from seqzoo.ttt_layers import LearnerLayer

__all__ = ["NWLearner", "NWLayer"]


class NWLearner(Learner):
    """Nadaraya-Watson kernel regression with the exp kernel of bandwidth √d (TTT paper §2.6)."""

    state_dynamic_dims = {"k": (2,), "v": (2,)}

    @classmethod
    def layer_class(cls) -> type:
        return NWLayer

    def init_state(self, batch_size: int, num_heads: int, *, device=None, dtype=None) -> State:
        shape = (batch_size, num_heads, 0, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype), "v": torch.zeros(shape, device=device, dtype=dtype)}

    def train(self, state: State, k: Tensor, v: Tensor) -> State:
        return {"k": torch.cat([state["k"], k.unsqueeze(2)], 2), "v": torch.cat([state["v"], v.unsqueeze(2)], 2)}

    def predict(self, state: State, q: Tensor) -> Tensor:
        return self.regress(q.unsqueeze(2), state["k"], state["v"], None).squeeze(2)

    def regress(self, q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None) -> Tensor:
        """Σ_s κ(K_s, q) V_s / Σ_s κ(K_s, q) over the keys ``mask`` allows: q (B, H, T, d), K/V (B, H, S, d)."""
        log_k = (q @ K.transpose(-1, -2)) / math.sqrt(self.head_dim)  # log κ(K_s, q), up to a constant
        if mask is not None:
            log_k = log_k.masked_fill(~mask, float("-inf"))
        # the weights κ_s / Σ_s κ_s: exp of log κ normalised over s (the constant cancels), one softmax
        # (1.6x faster to train than exp, sum and divide written out; equal to 2e-15 in float64)
        return torch.softmax(log_k, dim=-1) @ V

    def position(self, state: State) -> int:
        return state["k"].shape[2]

    def state_size(self, num_heads: int, seq_len: int) -> int:
        return 2 * num_heads * self.head_dim * seq_len


class NWLayer(LearnerLayer):
    """The Nadaraya-Watson TTT layer: ``step`` trains then predicts; ``forward`` regresses every token
    at once with a causal mask. Parameters and state as ``self_attention`` (``q_proj`` ... ``o_proj``; ``k``, ``v``).

    Paths: ``step`` is the learner's train-then-predict (the reference); ``forward`` the same regression
    for every token at once (the conformance suite ties them); the kernel regression is written out
    here, independent of torch's fused attention, so that Theorem 2's test compares two computations."""

    def flops(self, seq_len: int) -> float:
        """2T·Σ(projection weights) + 2T(T+1)·C: token t regresses on t+1 stored pairs (κ and Σκv).

        As causal self-attention (Theorem 2); the masked half of ``forward``'s T×T products is not counted."""
        return super().flops(seq_len) + 2.0 * seq_len * (seq_len + 1) * self.d_model

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        state = self.check_input(x, state)
        T = x.shape[1]
        if T == 0:
            return x.new_zeros(x.shape), dict(state)
        q, k, v, new = self._qkv(x, state)
        past = state["k"].shape[2]
        if self.config.rope:
            positions = torch.arange(past, past + T, device=x.device)
            q = apply_rope(q, positions, self.config.rope_theta)
            k = apply_rope(k, positions, self.config.rope_theta)
        new["k"] = K = torch.cat([state["k"], k], dim=2)  # train: store every (k_t, v_t)
        new["v"] = V = torch.cat([state["v"], v], dim=2)
        keys = torch.arange(past + T, device=x.device)
        mask = keys[None, :] <= past + torch.arange(T, device=x.device)[:, None]  # token t sees keys ≤ past + t
        y = self.learner.regress(q, K, V, mask)  # predict
        return self.o_proj(self._gate(x, rearrange(y, "b h t d -> b t (h d)"))), new
