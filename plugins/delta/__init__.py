"""The delta-rule family: layers whose state is a linear model trained online, one gradient step per
token (``reference``: the math as token loops; ``ops``: ``delta_rule`` and ``gated_delta_rule`` as plain
functions, chunked; ``layers``: ``deltanet`` and ``gated_deltanet``, as flash-linear-attention's)."""

import seqzoo

from .layers import DeltaNet, DeltaNetConfig, GatedDeltaNet, GatedDeltaNetConfig
from .ops import delta_rule, gated_delta_rule
from .reference import delta_rule_reference, gated_delta_rule_reference

__all__ = ["delta_rule", "gated_delta_rule", "delta_rule_reference", "gated_delta_rule_reference",
           "DeltaNet", "DeltaNetConfig", "GatedDeltaNet", "GatedDeltaNetConfig"]


@seqzoo.hookimpl
def register_layers(register):
    register("deltanet", DeltaNet,
             description="DeltaNet: state S trained online by the delta rule, β = σ(b_proj x) (chunked forward)")
    register("gated_deltanet", GatedDeltaNet,
             description="Gated DeltaNet: the delta rule after a data-dependent decay α = exp(g) (chunked forward)")
