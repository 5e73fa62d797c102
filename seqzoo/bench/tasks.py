"""Harness tasks: multi-query associative recall (MQAR) and byte-level language modelling.

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
import math
import os
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .store import load_tensors, save_tensors

log = logging.getLogger(__name__)

__all__ = [
    "Task",
    "MQARConfig",
    "MQARTask",
    "LMConfig",
    "LMTask",
    "mqar_examples",
    "reaches",
    "make_task",
    "default_cache_dir",
    "stdlib_files",
]

IGNORE = -100


def default_cache_dir() -> Path:
    """``$SEQZOO_CACHE`` or ``~/.cache/seqzoo``."""
    return Path(os.environ.get("SEQZOO_CACHE") or Path.home() / ".cache" / "seqzoo")


def _cache_key(kind: str, payload: dict) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return f"{kind}-{hashlib.sha256(blob).hexdigest()[:16]}"


def _cached(cache_dir: Path | None, key: str, build) -> dict[str, Tensor]:
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

    def train_batch(self, step: int, batch_size: int, *, order: int = 0) -> tuple[Tensor, Tensor]:
        """Batch ``step`` of data order ``order`` (0: the task's own order)."""
        raise NotImplementedError

    def evaluate(
        self, model: torch.nn.Module, *, batch_size: int = 64, device: str | torch.device = "cpu"
    ) -> dict:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError


# --- MQAR -------------------------------------------------------------------------------------------
def mqar_examples(
    num_examples: int,
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """MQAR examples with zoology's semantics: ``(inputs, labels)`` of shape (N, seq_len), int64.

    Keys come from ``[1, vocab/2)``, values from ``[vocab/2, vocab)``, both unique within an example.
    The ``num_kv_pairs`` key-value pairs come first; then every key is queried once, at an even offset
    ``2·gap`` after the context, the gaps drawn without replacement with P(gap = g) ∝ (g+1)^(power_a−1)
    (short gaps likely). The label at a query position is its value; every other label is −100.
    With ``random_non_queries`` the filler tokens are uniform over the vocabulary.
    """
    if seq_len % 2:
        raise ValueError(f"expected an even seq_len, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"expected vocab_size > seq_len, got vocab_size={vocab_size}, seq_len={seq_len}")
    if num_kv_pairs < 1 or 4 * num_kv_pairs > seq_len:
        raise ValueError(f"expected 1 <= num_kv_pairs <= seq_len/4 = {seq_len // 4}, got {num_kv_pairs}")
    half = vocab_size // 2
    if num_kv_pairs > half - 1:
        raise ValueError(f"expected num_kv_pairs <= vocab_size/2 - 1 = {half - 1}, got {num_kv_pairs}")
    rng = np.random.default_rng(seed)
    context = 2 * num_kv_pairs
    space = (seq_len - context) // 2
    log_p = (power_a - 1) * np.log(np.arange(1, space + 1)) + math.log(power_a)
    inputs = np.zeros((num_examples, seq_len), dtype=np.int64)
    labels = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    chunk = max(1, 2**22 // max(half, space))
    for lo in range(0, num_examples, chunk):
        n = min(chunk, num_examples - lo)
        rows = np.arange(n)[:, None]
        # unique keys and values: the first k of a random permutation of each half of the vocabulary
        keys = 1 + np.argsort(rng.random((n, half - 1)), axis=1)[:, :num_kv_pairs]
        values = half + np.argsort(rng.random((n, vocab_size - half)), axis=1)[:, :num_kv_pairs]
        # gaps without replacement, weighted by the power law (Gumbel top-k = successive sampling)
        gumbel = -np.log(-np.log(rng.random((n, space)) + 1e-300) + 1e-300)
        gaps = np.argsort(-(log_p + gumbel), axis=1)[:, :num_kv_pairs]
        block_in = np.zeros((n, seq_len), dtype=np.int64)
        block_in[:, 0:context:2] = keys
        block_in[:, 1:context:2] = values
        query_pos = context + 2 * gaps
        block_in[rows, query_pos] = keys
        block_lab = np.full((n, seq_len), IGNORE, dtype=np.int64)
        block_lab[rows, query_pos] = values
        if random_non_queries:
            filler = rng.integers(0, vocab_size, size=(n, seq_len))
            block_in = np.where(block_in == 0, filler, block_in)
        inputs[lo : lo + n] = block_in
        labels[lo : lo + n] = block_lab
    return torch.from_numpy(inputs), torch.from_numpy(labels)


@dataclass
class MQARConfig:
    """MQAR data: one or more segments ``(seq_len, num_kv_pairs, num_examples)`` for train and test."""

    vocab_size: int = field(default=256, metadata={"help": "keys from the lower half, values from the upper"})
    train: list = field(
        default_factory=lambda: [[64, 8, 16384]],
        metadata={"help": "train segments [seq_len, num_kv_pairs, num_examples]"},
    )
    test: list = field(
        default_factory=lambda: [[64, 8, 1024]],
        metadata={"help": "test segments [seq_len, num_kv_pairs, num_examples]"},
    )
    power_a: float = field(default=0.01, metadata={"help": "power-law exponent of the query gaps"})
    random_non_queries: bool = field(
        default=True, metadata={"help": "fill non-query slots with random tokens"}
    )


def reaches(value: float, target: float, sign: float) -> bool:
    """Whether a headline metric ``value`` reaches ``target`` (``sign`` +1: higher is better): the rule of
    early stopping, of the sweep's end and of "both solved"."""
    return sign * (value - target) >= 0


def _check_order(order: int) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"expected a data order >= 0 (an int), got {order!r}")
    return order


def _order_key(key: list[int], order: int) -> list[int]:
    """The seed of a stream of training batches: ``key`` for data order 0 (the task's own), ``key`` and
    the order for the others."""
    return key if _check_order(order) == 0 else [*key, order]


def _checked_config(cls, config: dict) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(config) - set(names))
    if unknown:
        raise TypeError(f"unknown {cls.__name__} option(s) {unknown}; options: {', '.join(names)}")
    return cls(**config)


class MQARTask(Task):
    """Multi-query associative recall (zoology): accuracy of the value predicted at each query."""

    name = "mqar"
    score_key = "accuracy"
    score_sign = 1.0

    def __init__(self, *, seed: int = 0, cache_dir: str | os.PathLike | None = None, **config):
        self.cfg = _checked_config(MQARConfig, config)
        self.seed = seed
        self.vocab_size = self.cfg.vocab_size
        self.seq_len = max(s[0] for s in self.cfg.train + self.cfg.test)
        cache = Path(cache_dir) if cache_dir is not None else None
        self.train_inputs, self.train_labels = self._build(cache, self.cfg.train, seed)
        self.test_inputs, self.test_labels = self._build(cache, self.cfg.test, seed + 10)
        self.test_segments = self._segment_ids(self.cfg.test)
        self._perm_epoch, self._perm = -1, None

    def _build(self, cache: Path | None, segments: list, seed: int) -> tuple[Tensor, Tensor]:
        cfg = self.cfg

        def build() -> dict[str, Tensor]:
            ins, labs = [], []
            for i, (seq_len, kv, n) in enumerate(segments):
                x, y = mqar_examples(
                    n,
                    vocab_size=cfg.vocab_size,
                    seq_len=seq_len,
                    num_kv_pairs=kv,
                    power_a=cfg.power_a,
                    random_non_queries=cfg.random_non_queries,
                    seed=seed + 1000 * i,
                )
                pad = self.seq_len - seq_len  # shorter segments padded on the right: causal, no labels
                ins.append(F.pad(x, (0, pad), value=0))
                labs.append(F.pad(y, (0, pad), value=IGNORE))
            return {"inputs": torch.cat(ins).to(torch.int32), "labels": torch.cat(labs).to(torch.int32)}

        key = _cache_key(
            "mqar",
            {
                "segments": segments,
                "seed": seed,
                "vocab": cfg.vocab_size,
                "power_a": cfg.power_a,
                "random": cfg.random_non_queries,
                "v": 1,
            },
        )
        t = _cached(cache, key, build)
        return t["inputs"].long(), t["labels"].long()

    @staticmethod
    def _segment_ids(segments: list) -> list[tuple[str, int, int]]:
        out, lo = [], 0
        for seq_len, kv, n in segments:
            out.append((f"T{seq_len}_kv{kv}", lo, lo + n))
            lo += n
        return out

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, **dataclasses.asdict(self.cfg)}

    def train_batch(self, step: int, batch_size: int, *, order: int = 0) -> tuple[Tensor, Tensor]:
        """Rows ``[step·B, (step+1)·B)`` of an endless stream of seeded per-epoch permutations."""
        _check_order(order)  # here, not only when a permutation is drawn
        n = self.train_inputs.shape[0]
        pos = np.arange(step * batch_size, (step + 1) * batch_size)
        idx = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            idx[sel] = self._permutation(int(epoch), n, order)[pos[sel] % n]
        idx_t = torch.from_numpy(idx)
        return self.train_inputs[idx_t], self.train_labels[idx_t]

    def _permutation(self, epoch: int, n: int, order: int) -> np.ndarray:
        if (epoch, order) != self._perm_epoch:
            self._perm = np.random.default_rng(_order_key([self.seed, 7, epoch], order)).permutation(n)
            self._perm_epoch = (epoch, order)
        return self._perm

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, *, batch_size: int = 64, device="cpu") -> dict:
        """Accuracy and loss over the labelled (query) positions of the test set, also per segment."""
        correct = torch.zeros(self.test_inputs.shape[0])
        counts = torch.zeros(self.test_inputs.shape[0])
        loss_sum = 0.0
        for lo in range(0, self.test_inputs.shape[0], batch_size):
            x = self.test_inputs[lo : lo + batch_size].to(device)
            y = self.test_labels[lo : lo + batch_size].to(device)
            logits, _ = model(x)
            mask = y != IGNORE
            loss_sum += F.cross_entropy(logits[mask].float(), y[mask], reduction="sum").item()
            hit = (logits.argmax(-1) == y) & mask
            correct[lo : lo + batch_size] = hit.sum(1).float().cpu()
            counts[lo : lo + batch_size] = mask.sum(1).float().cpu()
        total = counts.sum().item()
        out = {"accuracy": correct.sum().item() / total, "loss": loss_sum / total, "num_queries": int(total)}
        if len(self.test_segments) > 1:
            out["accuracy_by_segment"] = {
                name: correct[lo:hi].sum().item() / max(counts[lo:hi].sum().item(), 1)
                for name, lo, hi in self.test_segments
            }
        return out


# --- byte-level language modelling -----------------------------------------------------------------
def stdlib_files() -> tuple[Path, list[Path]]:
    """The Python standard library's own ``*.py`` files (no site-packages), sorted: (root, files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _text_files(path: Path) -> tuple[Path, list[Path]]:
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise ValueError(f"expected --data to be a text file or a folder of text files, got {str(path)!r}")
    files = []
    for p in sorted(path.rglob("*"), key=lambda q: q.relative_to(path).as_posix()):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
            with open(p, "rb") as f:
                if b"\0" not in f.read(1024):
                    files.append(p)
    if not files:
        raise ValueError(f"expected text files under {str(path)!r}, found none")
    return path, files


@dataclass
class LMConfig:
    """Byte-level LM data: windows of ``seq_len + 1`` bytes from local text files."""

    seq_len: int = field(default=128, metadata={"help": "tokens per training/validation window"})
    data: str | None = field(
        default=None, metadata={"help": "file or folder of text (default: stdlib sources)"}
    )
    max_train_bytes: int = field(default=8_000_000, metadata={"help": "cap on the training stream"})
    val_every: int = field(
        default=20, metadata={"help": "a file goes to validation when crc32(path) % val_every == 0"}
    )
    num_eval: int = field(default=64, metadata={"help": "validation windows"})


#: the early positions (bytes of context − 1) whose mean loss ``context_gain`` compares with the window's
#: second half: the small-scale form of the TTT paper's loss-by-token-index figure
EARLY = (16, 32)


class LMTask(Task):
    """Byte-level language modelling (vocab 256): validation loss, bits per byte, loss by position, and
    (windows of ≥ 64 bytes) ``context_gain``: mean loss at positions 16–31 minus that over the second half
    of the window (256–511 for 512-byte windows) — how much a layer gains from long context."""

    name = "lm"
    vocab_size = 256
    score_key = "loss"
    score_sign = -1.0

    def __init__(self, *, seed: int = 0, cache_dir: str | os.PathLike | None = None, **config):
        self.cfg = _checked_config(LMConfig, config)
        if self.cfg.seq_len < 1:
            raise ValueError(f"expected seq_len >= 1, got {self.cfg.seq_len}")
        self.seed = seed
        self.seq_len = self.cfg.seq_len
        root, files = (
            stdlib_files() if self.cfg.data is None else _text_files(Path(self.cfg.data).expanduser())
        )
        self.source = "python-stdlib" if self.cfg.data is None else str(Path(self.cfg.data).resolve())
        listing = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in files]
        key = _cache_key(
            "lm", {"source": self.source, "files": listing, "cfg": dataclasses.asdict(self.cfg), "v": 1}
        )
        cache = Path(cache_dir) if cache_dir is not None else None
        t = _cached(cache, key, lambda: self._build(root, files))
        self.train_bytes = t["train"].long()
        self.val_windows = t["val"].long()
        if self.train_bytes.numel() <= self.seq_len + 1:
            raise ValueError(
                f"expected more than {self.seq_len + 1} training bytes, got {self.train_bytes.numel()}"
            )

    def _build(self, root: Path, files: list[Path]) -> dict[str, Tensor]:
        cfg, w = self.cfg, self.cfg.seq_len + 1
        train, val = [], []
        if len(files) == 1:  # one file: the last 10% is validation
            blob = files[0].read_bytes()
            cut = int(len(blob) * 0.9)
            train, val = [blob[:cut][: cfg.max_train_bytes]], [blob[cut:]]
        else:
            size = 0
            for p in files:
                rel = p.relative_to(root).as_posix()
                if zlib.crc32(rel.encode()) % cfg.val_every == 0:
                    val.append(p.read_bytes())
                elif size < cfg.max_train_bytes:
                    blob = (p.read_bytes() + b"\n")[: cfg.max_train_bytes - size]
                    train.append(blob)
                    size += len(blob)
        # validation windows start at file starts (position t = t bytes of context), then continue
        windows: list[bytes] = []
        offset = 0
        while len(windows) < cfg.num_eval:
            added = False
            for blob in val:
                chunk = blob[offset : offset + w]
                if len(chunk) == w and len(windows) < cfg.num_eval:
                    windows.append(chunk)
                    added = True
            if not added:
                break
            offset += w
        if not windows:
            raise ValueError(f"expected validation text of at least {w} bytes, found none")
        train_arr = np.frombuffer(b"".join(train), dtype=np.uint8).copy()
        val_arr = np.frombuffer(b"".join(windows), dtype=np.uint8).reshape(len(windows), w).copy()
        return {"train": torch.from_numpy(train_arr), "val": torch.from_numpy(val_arr)}

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "source": self.source,
            **dataclasses.asdict(self.cfg),
            "train_bytes": int(self.train_bytes.numel()),
            "val_windows": int(self.val_windows.shape[0]),
        }

    def train_batch(self, step: int, batch_size: int, *, order: int = 0) -> tuple[Tensor, Tensor]:
        """``batch_size`` windows at offsets drawn from a generator seeded by ``(seed, order, step)``."""
        rng = np.random.default_rng(_order_key([self.seed, 11, step], order))
        starts = torch.from_numpy(
            rng.integers(0, self.train_bytes.numel() - self.seq_len - 1, size=batch_size)
        )
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        win = self.train_bytes[idx]
        return win[:, :-1], win[:, 1:]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, *, batch_size: int = 64, device="cpu") -> dict:
        """Validation loss (nats/byte), bits per byte, and the loss at every position."""
        per_pos = torch.zeros(self.seq_len, dtype=torch.float64)
        n = 0
        for lo in range(0, self.val_windows.shape[0], batch_size):
            win = self.val_windows[lo : lo + batch_size].to(device)
            logits, _ = model(win[:, :-1])
            loss = F.cross_entropy(logits.float().transpose(1, 2), win[:, 1:], reduction="none")  # (B, T)
            per_pos += loss.double().sum(0).cpu()
            n += win.shape[0]
        per_pos /= n
        loss = per_pos.mean().item()
        out = {
            "loss": loss,
            "bits_per_byte": loss / math.log(2),
            "loss_by_position": per_pos.tolist(),
            "num_windows": n,
        }
        T = self.seq_len
        if T >= 64:  # how much the second half of the window gains over its early positions
            out["loss_early"] = per_pos[EARLY[0] : EARLY[1]].mean().item()
            out["loss_late"] = per_pos[T // 2 :].mean().item()
            out["context_gain"] = out["loss_early"] - out["loss_late"]
        return out


TASKS: dict[str, type[Task]] = {"mqar": MQARTask, "lm": LMTask}


def make_task(name: str, *, seed: int = 0, cache_dir=None, **config) -> Task:
    """Build a registered task by name (``seqzoo.task_spec(name).factory``)."""
    from ..registry import task_spec

    spec = task_spec(name)
    return spec.factory(seed=seed, cache_dir=cache_dir, **config)
