"""The paper's naive RNN: s_t = tanh(θ_ss s_{t−1} + θ_sx x_t + b), z_t = θ_zs s_t + θ_zx x_t."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import seqzoo
from seqzoo import SequenceLayer, State


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
        u = self.theta_sx(x)  # input terms of every step in one matmul
        s = state["s"]
        states = []
        for t in range(x.shape[1]):  # the recurrence is nonlinear: no parallel form
            s = torch.tanh(self.theta_ss(s) + u[:, t])
            states.append(s)
        if not states:
            return x.new_zeros(x.shape), {"s": s}
        S = torch.stack(states, dim=1)
        return self.theta_zs(S) + self.theta_zx(x), {"s": s}


@seqzoo.hookimpl
def register_layers(register):
    register("rnn", NaiveRNN, description="naive RNN: tanh state update, linear output (TTT paper §2.1)")
