"""Decayed linear attention: linear attention whose state forgets, by a scalar per head (RetNet, Mamba-2's
SSD) or by a decay per key feature (GLA, HGRN2).

``reference``: the math as a token loop; ``ops``: ``simple_gla`` and ``gla`` as plain functions, chunked;
``layers``: ``retnet``, ``gla`` and ``hgrn2`` as flash-linear-attention's layers; ``mamba2``: Mamba-2 as
mamba-ssm's ``Mamba2``, its scan ``simple_gla``."""

import seqzoo

from .layers import GLA, HGRN2, GLAConfig, HGRN2Config, RetNet, RetNetConfig
from .mamba2 import Mamba2, Mamba2Config
from .ops import gla, retention_log_decay, simple_gla
from .reference import gla_reference, simple_gla_reference

__all__ = ["simple_gla", "gla", "retention_log_decay", "simple_gla_reference", "gla_reference", "RetNet",
           "RetNetConfig", "GLA", "GLAConfig", "HGRN2", "HGRN2Config", "Mamba2", "Mamba2Config"]


@seqzoo.hookimpl
def register_layers(register):
    register("retnet", RetNet,
             description="RetNet: linear attention with a fixed decay per head, γ_h = 1 − 2^(−5−h) (chunked forward)")
    register("gla", GLA,
             description="GLA: linear attention with a data-dependent decay per key feature (chunked forward)")
    register("hgrn2", HGRN2,
             description="HGRN2: GLA with the key tied to the forget gate, k = 1 − α (chunked forward)")
    register("mamba2", Mamba2,
             description="Mamba-2: selective SSM with a scalar decay per head, its scan simple_gla (chunked forward)")
