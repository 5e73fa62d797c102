"""Converters from other projects' checkpoints to seqzoo models.

Each converter lives beside the layers whose names it encodes and is registered by their plugin
(``register_converters``); this module is the public entry to all of them: ``seqzoo.interop.<name>``
is the registered converter ``<name>``, e.g.

- ``from_ttt_lm_pytorch(state_dict, config)``: the official TTT ``TTTForCausalLM`` (ttt-lm-pytorch);
- ``from_mamba_ssm(state_dict, config)``: mamba-ssm's ``MambaLMHeadModel`` or Hugging Face's
  ``MambaForCausalLM``.

``list_converters()`` names every registered one.
"""

from __future__ import annotations

from .registry import converter, list_converters

__all__ = ["list_converters"]


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return converter(name).function
    except KeyError as err:
        raise AttributeError(f"module 'seqzoo.interop' has no attribute {name!r}: {err.args[0]}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *list_converters()})
