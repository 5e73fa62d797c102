"""The built-in harness tasks: ``mqar`` (multi-query associative recall) and ``lm`` (byte-level LM)."""

from __future__ import annotations

import seqzoo

from .lm import LMConfig, LMTask, stdlib_files
from .mqar import MQARConfig, MQARTask, mqar_examples

__all__ = ["MQARTask", "MQARConfig", "mqar_examples", "LMTask", "LMConfig", "stdlib_files"]


@seqzoo.hookimpl
def register_tasks(register):
    register("mqar", MQARTask, description="multi-query associative recall (zoology's generator): accuracy")
    register("lm", LMTask, description="byte-level language modelling on local text: loss, bits per byte")
