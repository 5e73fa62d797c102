"""Harnesses: tasks (MQAR, byte-level LM), the training recipe, the speed harness, ``seqzoo compare``.

Modules: ``tasks`` (data and evaluation), ``train`` (one recipe, checkpoints, DDP), ``speed`` (latency,
memory, FLOP/s), ``compare`` (the side-by-side grid), ``report`` (tables, plots, Markdown), ``store``
(atomic JSON/safetensors writes). Heavy modules are imported on use.
"""
