"""Learners (the inner models of TTT layers) and the generic TTT layer built from any learner.

SKELETON: the registry relies on ``Learner.make_layer`` and ``Learner.layer_config``; the TTT machinery
(GradientLearner, the generic TTT layer) is filled in by the TTT work.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["Learner", "GradientLearner"]


class Learner:
    """A learner has a storage (the TTT layer's hidden state), ``train`` and ``predict``."""

    def __init__(self, head_dim: int, **config: Any):
        self.head_dim = head_dim

    @classmethod
    def layer_config(cls) -> type:
        """The dataclass of the TTT layer's config options for this learner."""
        raise NotImplementedError

    @classmethod
    def make_layer(cls, d_model: int, **config: Any):
        """Build the TTT layer whose hidden state is this learner."""
        raise NotImplementedError


class GradientLearner(Learner):
    """A parametric inner model f(x; W) for one head and one token, trained by mini-batch GD."""

    def init_params(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        raise NotImplementedError
