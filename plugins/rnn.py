"""The paper's naive RNN: s_t = tanh(θ_ss s_{t−1} + θ_sx x_t + b), z_t = θ_zs s_t + θ_zx x_t."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import seqzoo
from seqzoo import SequenceLayer, State, native
from seqzoo.native import plain
from seqzoo.nn import recomputed_backward


@dataclass
class RNNConfig:
    state_dim: int | None = field(default=None, metadata={"help": "size of s_t (default: d_model)"})


class NaiveRNN(SequenceLayer):
    """Naive RNN (TTT paper §2.1): a state vector, a tanh update, a linear output.

    ``step`` is the update and output rule; ``forward`` forms every step's input term in one matmul,
    then runs the same recurrence (it is nonlinear: no parallel form). The conformance suite ties the two."""

    Config = RNNConfig

    def __init__(self, d_model: int, **config):
        super().__init__(d_model)
        self.config = cfg = RNNConfig(**config)
        n = cfg.state_dim or d_model
        if n < 1:
            raise ValueError(f"expected state_dim >= 1, got {n}")
        self.state_dim = n
        self.theta_ss = nn.Linear(n, n, bias=False)  # state -> state
        self.theta_sx = nn.Linear(d_model, n, bias=True)  # input -> state, with b
        self.theta_zs = nn.Linear(n, d_model, bias=False)  # state -> output
        self.theta_zx = nn.Linear(d_model, d_model, bias=False)  # input -> output
        nn.init.orthogonal_(self.theta_ss.weight, gain=0.9)

    # state
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        return {"s": torch.zeros(batch_size, self.state_dim, device=device, dtype=dtype)}

    def state_size(self, seq_len: int) -> int:
        return self.state_dim

    # update rule, output rule
    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        state = self.check_input(x, state, step=True)
        s = torch.tanh(self.theta_ss(state["s"]) + self.theta_sx(x))  # s_t = tanh(θ_ss s_{t−1} + θ_sx x_t + b)
        return self.theta_zs(s) + self.theta_zx(x), {"s": s}  # z_t = θ_zs s_t + θ_zx x_t

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        state = self.check_input(x, state)
        if x.shape[1] == 0:
            return x.new_zeros(x.shape), {"s": state["s"]}
        u = self.theta_sx(x)  # input terms of every step in one matmul
        W = self.theta_ss.weight
        if torch.is_grad_enabled() and native.trainable() and plain(self.theta_ss) and (
                u.requires_grad or W.requires_grad or state["s"].requires_grad):
            S = _TanhRecurrence.apply(u, state["s"], W)  # with its written backward
            s = S[:, -1]
        else:  # the recurrence is nonlinear: no parallel form
            S, s = _tanh_loop(u, state["s"], self.theta_ss)
        return self.theta_zs(S) + self.theta_zx(x), {"s": s}


def _tanh_loop(u: Tensor, s0: Tensor, ss) -> tuple[Tensor, Tensor]:
    """S_t = tanh(ss(S_{t−1}) + u_t), the token loop (autograd records it): every S_t (B, T, n) and the last."""
    s, states = s0, []
    for u_t in u.unbind(1):
        s = torch.tanh(ss(s) + u_t)
        states.append(s)
    return torch.stack(states, dim=1), s


class _TanhRecurrence(torch.autograd.Function):
    """S_t = tanh(S_{t−1}·Wᵀ + u_t) over t for u (B, T, n), s0 (B, n), W (n, n), with a backward written
    for it: the carried gradient c runs last token to first, h_t = (dS_t + c) ⊙ (1 − S_t²), c ← h_t·W
    (three ops a token, against about eight in autograd's record of the loop), then dW = Σ_t h_tᵀ S_{t−1}
    and du = h in one product each. Equal to autograd through the loop (tests/test_conformance.py); a
    second derivative goes through the loop itself (``recomputed_backward``)."""

    @staticmethod
    def forward(ctx, u, s0, W):
        B, T, n = u.shape
        S = u.new_empty(B, T, n)
        Wt = W.t()
        s = s0
        for t in range(T):
            s = torch.addmm(u[:, t], s, Wt, out=S[:, t]).tanh_()
        ctx.save_for_backward(S, s0, W, u)  # (u only for a second derivative: an input, kept alive anyway)
        return S

    @staticmethod
    def backward(ctx, dS):
        S, s0, W, u = ctx.saved_tensors
        if torch.is_grad_enabled():  # a second derivative: autograd through the loop, recomputed
            loop = lambda u, s0, W: _tanh_loop(u, s0, lambda s: F.linear(s, W))[0]
            return recomputed_backward(loop, (u, s0, W), (dS,), ctx.needs_input_grad)
        B, T, n = S.shape
        slope = torch.addcmul(torch.ones_like(S), S, S, value=-1.0)  # 1 − S_t², tanh's derivative
        H = torch.empty_like(S)
        carry = torch.zeros_like(s0)
        for t in range(T - 1, -1, -1):
            h = torch.mul(dS[:, t] + carry, slope[:, t], out=H[:, t])
            carry = h @ W
        previous = torch.cat([s0.unsqueeze(1), S[:, :-1]], dim=1)  # S_{t−1}
        dW = H.reshape(-1, n).t() @ previous.reshape(-1, n)
        return H, carry, dW


@seqzoo.hookimpl
def register_layers(register):
    register("rnn", NaiveRNN, description="naive RNN: tanh state update, linear output (TTT paper §2.1)")
