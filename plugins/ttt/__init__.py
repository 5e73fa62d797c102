"""The TTT family: TTT-Linear, TTT-MLP and the Nadaraya-Watson learner, registered as learners.

Each learner ``foo`` becomes the layer ``ttt_foo`` (``ttt_linear``, ``ttt_mlp``, ``ttt_nw``).
"""

from __future__ import annotations

import seqzoo

from .linear import LinearLearner, TTTLinear, ttt_linear_dual
from .mlp import TTTMLP, MLPLearner, ttt_mlp_dual
from .nw import NWLayer, NWLearner

__all__ = ["LinearLearner", "TTTLinear", "ttt_linear_dual", "MLPLearner", "TTTMLP", "ttt_mlp_dual", "NWLearner", "NWLayer"]


@seqzoo.hookimpl
def register_learners(register):
    register("linear", LinearLearner, description="TTT-Linear: hidden state W of f(x) = x + LN(xW + b), mini-batch GD")
    register("mlp", MLPLearner, description="TTT-MLP: hidden state of a 2-layer MLP f(x) = x + LN(MLP(x)), mini-batch GD")
    register("nw", NWLearner, description="Nadaraya-Watson learner: stores keys/values, kernel regression (= self-attention)")


@seqzoo.hookimpl
def register_converters(register):
    from .interop import from_ttt_lm_pytorch

    register("from_ttt_lm_pytorch", from_ttt_lm_pytorch)
