"""Harness tasks: the contract every task keeps, and what the harness reads of a task.

The tasks themselves are plugins (``register_tasks``): the built-in ones, multi-query associative recall
(``mqar``) and byte-level language modelling (``lm``), live in ``seqzoo_plugins.tasks`` like any
third-party task. A task declares what the harness reads: its headline metric (``score_key``,
``score_sign``), its table columns (``columns``), a per-position curve (``position_curve``) and the
option a user's data goes to (``data_option``); ``task_info`` collects them.

A task gives the same data to every layer: ``train_batch(step, batch_size, order=k)`` is a pure function of
``(seed, k, step)`` (so a resumed or multi-process run sees exactly the batches of an uninterrupted one;
``order`` picks one of independent data orders over the same training data, so the seeds of a comparison
differ in data order while the held-out set stays fixed), and ``evaluate(model)`` scores a model on a
fixed held-out set. Labels are aligned with the inputs
(``labels[:, t]`` is the target of the logits at ``t``); ``-100`` marks positions without a target.
Generated data is cached as safetensors (written atomically) keyed by a hash of its config and seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .store import load_tensors, save_tensors

log = logging.getLogger(__name__)

__all__ = [
    "Task",
    "IGNORE",
    "reaches",
    "make_task",
    "task_info",
    "task_infos",
    "compared",
    "default_cache_dir",
    "cache_key",
    "cached",
    "check_order",
    "order_key",
    "checked_config",
]

IGNORE = -100


def default_cache_dir() -> Path:
    """``$SEQZOO_CACHE`` or ``~/.cache/seqzoo``."""
    return Path(os.environ.get("SEQZOO_CACHE") or Path.home() / ".cache" / "seqzoo")


def cache_key(kind: str, payload: dict) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return f"{kind}-{hashlib.sha256(blob).hexdigest()[:16]}"


def cached(cache_dir: Path | None, key: str, build) -> dict[str, Tensor]:
    """Load ``key`` from the cache, or build it and save it atomically (no cache when dir is None)."""
    if cache_dir is None:
        return build()
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.exists():
        try:
            return load_tensors(path)[0]
        except Exception as exc:  # noqa: BLE001 - a corrupt cache file is rebuilt, not fatal
            log.warning("rebuilding cache file %s (%s)", path, exc)
    tensors = build()
    save_tensors(path, tensors)
    return tensors


class Task:
    """Base of the harness tasks (see the module docstring for the contract)."""

    name: str = "task"
    vocab_size: int = 0
    seq_len: int = 0
    #: the headline metric (a learning-rate sweep optimises it, early stopping and the report read it),
    #: and its sign (+1: higher is better)
    score_key: str = "loss"
    score_sign: float = -1.0
    #: the report's table columns, (metric, label) pairs; the first is the one pairs of layers are compared
    #: by (same direction as the headline metric); None: the headline metric alone
    columns: tuple[tuple[str, str], ...] | None = None
    #: a metric holding the held-out loss at each position (the report plots it), or None
    position_curve: str | None = None
    #: whether the report plots the first column against the models' state size (recall tasks)
    plot_vs_state: bool = False
    #: the config option that ``seqzoo compare --data PATH`` sets, or None (the task takes no user data)
    data_option: str | None = None
    #: the config option naming the tokenizer the task's token ids come from, and its default (the task reads
    #: text: ``seqzoo export`` saves that tokenizer with the model), or None (token ids of its own)
    tokenizer_option: tuple[str, str] | None = None
    #: a sentence the report prints under its table (what a column means), or None
    notes: str | None = None

    def train_batch(self, step: int, batch_size: int, *, order: int = 0) -> tuple[Tensor, Tensor]:
        """Batch ``step`` of data order ``order`` (0: the task's own order)."""
        raise NotImplementedError

    def evaluate(
        self, model: torch.nn.Module, *, batch_size: int = 64, device: str | torch.device = "cpu"
    ) -> dict:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError


def reaches(value: float, target: float, sign: float) -> bool:
    """Whether a headline metric ``value`` reaches ``target`` (``sign`` +1: higher is better): the rule of
    early stopping, of the sweep's end and of "both solved"."""
    return sign * (value - target) >= 0


def check_order(order: int) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"expected a data order >= 0 (an int), got {order!r}")
    return order


def order_key(key: list[int], order: int) -> list[int]:
    """The seed of a stream of training batches: ``key`` for data order 0 (the task's own), ``key`` and
    the order for the others."""
    return key if check_order(order) == 0 else [*key, order]


def checked_config(cls, config: dict) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(config) - set(names))
    if unknown:
        raise TypeError(f"unknown {cls.__name__} option(s) {unknown}; options: {', '.join(names)}")
    return cls(**config)


def task_info(name: str) -> dict[str, Any]:
    """What the harness reads of the registered task ``name``: ``score_key``, ``score_sign``, ``columns``
    ([metric, label] pairs; the first is compared), ``position_curve``, ``data_option`` and
    ``tokenizer_option``, from the task's class (no data is built). ``seqzoo compare`` keeps it in
    results.json, so a report needs no plugin."""
    from ..registry import task_spec

    factory = task_spec(name).factory
    get = lambda attr: getattr(factory, attr, getattr(Task, attr))  # noqa: E731
    score_key = get("score_key")
    columns = get("columns") or ((score_key, f"{name} {score_key}"),)
    return {
        "score_key": score_key,
        "score_sign": float(get("score_sign")),
        "columns": [list(c) for c in columns],
        "position_curve": get("position_curve"),
        "plot_vs_state": bool(get("plot_vs_state")),
        "data_option": get("data_option"),
        "tokenizer_option": get("tokenizer_option"),
        "notes": get("notes"),
    }


def compared(info: dict) -> tuple[str, float]:
    """The metric a task's cells are compared on (its first table column) and its sign, from ``task_info``."""
    return info["columns"][0][0], info["score_sign"]


def task_infos(results: dict) -> dict[str, dict]:
    """``task_info`` of every task of a comparison's results: as ``seqzoo compare`` kept it in
    results.json (``task_info``), or, for a file without it, from the registered task."""
    kept = results.get("task_info") or {}
    return {t: kept.get(t) or task_info(t) for t in results["run_config"]["tasks"]}


def make_task(name: str, *, seed: int = 0, cache_dir=None, **config) -> Task:
    """Build a registered task by name (``seqzoo.task_spec(name).factory``)."""
    from ..registry import task_spec

    spec = task_spec(name)
    return spec.factory(seed=seed, cache_dir=cache_dir, **config)
