"""Triton kernels of the TTT layers (GPU; on the CPU under ``TRITON_INTERPRET=1``) and their torch references.

``ttt_linear_forward`` / ``ttt_mlp_forward`` (dual-form prefill, differentiable) and ``ttt_linear_decode`` /
``ttt_mlp_decode`` (one token, primal form) have the contracts of the functions of the same name with
``_reference`` in ``seqzoo_plugins.ttt.reference`` (the layers' readable math).
"""

from seqzoo_plugins.ttt.reference import (
    ttt_linear_decode_reference,
    ttt_linear_reference,
    ttt_mlp_decode_reference,
    ttt_mlp_reference,
)

from .ttt import (
    interpret_enabled,
    kernels_available,
    ttt_linear_decode,
    ttt_linear_forward,
    ttt_mlp_decode,
    ttt_mlp_forward,
)

__all__ = [
    "kernels_available",
    "interpret_enabled",
    "ttt_linear_forward",
    "ttt_mlp_forward",
    "ttt_linear_decode",
    "ttt_mlp_decode",
    "ttt_linear_reference",
    "ttt_mlp_reference",
    "ttt_linear_decode_reference",
    "ttt_mlp_decode_reference",
]
