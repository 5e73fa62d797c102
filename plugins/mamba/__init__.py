"""Mamba (v1): the layer (``layer``: the scans, the layer, its native decode step in ``csrc/``) and the
converter from mamba-ssm / Hugging Face checkpoints (``interop``)."""

import seqzoo

from .layer import NATIVE, Mamba, MambaConfig, mamba_step, selective_scan_chunked, selective_scan_ref

__all__ = ["Mamba", "MambaConfig", "selective_scan_ref", "selective_scan_chunked", "mamba_step", "NATIVE"]


@seqzoo.hookimpl
def register_layers(register):
    register("mamba", Mamba, description="Mamba (v1) selective SSM mixer, mamba-ssm / Hugging Face compatible")


@seqzoo.hookimpl
def register_converters(register):
    from .interop import from_mamba_ssm

    register("from_mamba_ssm", from_mamba_ssm)
