"""Decayed linear attention: linear attention whose state forgets, by a scalar per head (RetNet, Mamba-2's
SSD) or by a decay per key feature (GLA, HGRN2).

``reference``: the math as a token loop; ``ops``: ``simple_gla`` and ``gla`` as plain functions, chunked."""

from .ops import gla, retention_log_decay, simple_gla
from .reference import gla_reference, simple_gla_reference

__all__ = ["simple_gla", "gla", "retention_log_decay", "simple_gla_reference", "gla_reference"]
