"""Converters from other projects' checkpoints to seqzoo models.

- ``from_ttt_lm_pytorch(state_dict, config)``: the official TTT ``TTTForCausalLM`` (ttt-lm-pytorch).
- ``from_mamba_ssm(state_dict, config)``: mamba-ssm's ``MambaLMHeadModel`` or Hugging Face's
  ``MambaForCausalLM``.
"""

from __future__ import annotations

__all__ = ["from_ttt_lm_pytorch", "from_mamba_ssm"]

# === ttt-lm-pytorch ===============================================================================


def from_ttt_lm_pytorch(state_dict, config):
    """Build a ``LanguageModel`` equal to the official ``TTTForCausalLM`` with this state_dict."""
    raise NotImplementedError("ttt-lm-pytorch conversion is being built")


# === mamba-ssm / Hugging Face =====================================================================


def from_mamba_ssm(state_dict, config):
    """Build a ``LanguageModel`` equal to mamba-ssm's ``MambaLMHeadModel`` / HF ``MambaForCausalLM``."""
    raise NotImplementedError("mamba-ssm conversion is being built")
