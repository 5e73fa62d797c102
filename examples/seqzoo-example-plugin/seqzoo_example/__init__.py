"""An out-of-tree seqzoo plugin: one layer and one learner, found through the "seqzoo" entry point."""

import torch
from torch import nn

import seqzoo


class EMA(seqzoo.SequenceLayer):
    """h_t = a ⊙ h_{t−1} + (1 − a) ⊙ x_t with a learnable per-channel decay a; y_t = W h_t."""

    def __init__(self, d_model: int, decay: float = 0.9):
        super().__init__(d_model)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"expected 0 < decay < 1, got {decay}")
        self.decay_logit = nn.Parameter(torch.full((d_model,), torch.logit(torch.tensor(decay)).item()))
        self.out = nn.Linear(d_model, d_model)

    def init_state(self, batch_size, *, device=None, dtype=None):
        return {"h": torch.zeros(batch_size, self.d_model, device=device, dtype=dtype)}

    def state_size(self, seq_len):
        return self.d_model

    def step(self, x, state):
        state = self.check_input(x, state, step=True)
        a = torch.sigmoid(self.decay_logit)
        h = a * state["h"] + (1 - a) * x  # update rule
        return self.out(h), {"h": h}  # output rule

    def forward(self, x, state=None):
        state = self.check_input(x, state)
        ys = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return (torch.stack(ys, 1) if ys else x.new_zeros(x.shape)), state


class TanhLearner(seqzoo.GradientLearner):
    """f(x) = x + tanh(x W): a TTT inner model written for one head and one token."""

    def init_params(self):
        return {"W": 0.02 * torch.randn(self.head_dim, self.head_dim)}

    def predict(self, params, x):
        return x + torch.tanh(x @ params["W"])


@seqzoo.hookimpl
def register_layers(register):
    register("example_ema", EMA, description="learnable exponential moving average (example plugin)")


@seqzoo.hookimpl
def register_learners(register):
    register("tanh", TanhLearner, description="TTT with f(x) = x + tanh(xW) (example plugin)")
