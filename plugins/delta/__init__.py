"""The delta-rule family: layers whose state is a linear model of the values given the keys, trained
online (DeltaNet, Gated DeltaNet: one gradient step per token; Longhorn: an implicit online step;
Titans: an MLP memory with momentum and weight decay) or solved exactly (MesaNet: the ridge regression
of everything seen).

``reference``: the math as token loops; ``ops``: ``delta_rule``, ``gated_delta_rule``, ``mesa_net`` (exact),
``mesa_net_cg`` (conjugate gradient, as fla's kernels) and ``longhorn_scan`` as plain functions, chunked; ``layers``: ``deltanet``, ``gated_deltanet`` and
``mesanet``, as flash-linear-attention's layers; ``longhorn``: as the official Longhorn layer; ``titans``
(``titans``): titans-pytorch's neural memory, a learner on the generic TTT machinery."""

import seqzoo

from .layers import (
    DeltaNet,
    DeltaNetConfig,
    GatedDeltaNet,
    GatedDeltaNetConfig,
    MesaLearner,
    MesaNet,
    MesaNetConfig,
)
from .longhorn import Longhorn, LonghornConfig
from .ops import delta_rule, gated_delta_rule, longhorn_scan, mesa_net, mesa_net_cg
from .reference import (
    cg_solve,
    delta_rule_reference,
    gated_delta_rule_reference,
    longhorn_reference,
    mesa_net_cg_reference,
    mesa_net_reference,
)
from .titans import TitansConfig, TitansMemory, from_titans_pytorch, titans

__all__ = ["delta_rule", "gated_delta_rule", "mesa_net", "mesa_net_cg", "delta_rule_reference",
           "gated_delta_rule_reference", "mesa_net_reference", "mesa_net_cg_reference", "cg_solve", "DeltaNet", "DeltaNetConfig", "GatedDeltaNet", "GatedDeltaNetConfig", "MesaNet",
           "MesaNetConfig", "Longhorn", "LonghornConfig", "longhorn_scan", "longhorn_reference", "TitansConfig", "TitansMemory",
           "from_titans_pytorch", "MesaLearner"]


@seqzoo.hookimpl
def register_layers(register):
    register("deltanet", DeltaNet,
             description="DeltaNet: state S trained online by the delta rule, β = σ(b_proj x) (chunked forward)")
    register("gated_deltanet", GatedDeltaNet,
             description="Gated DeltaNet: the delta rule after a data-dependent decay α = exp(g) (chunked forward)")
    register("mesanet", MesaNet,
             description="MesaNet: exact decayed ridge regression of v on k, read at q (chunked forward)")
    register("titans", titans, config=TitansConfig,
             description="Titans' neural memory: an MLP trained online with momentum and weight decay")
    register("longhorn", Longhorn,
             description="Longhorn: Mamba-shaped SSM whose update is an implicit online regression step")


@seqzoo.hookimpl
def register_converters(register):
    register("from_titans_pytorch", from_titans_pytorch)
