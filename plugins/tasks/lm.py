"""Byte-level language modelling on local text (the Python standard library by default): the language
modelling task of the comparison.

Registered by this plugin as the task ``lm``; the harness reads what it declares (its headline metric,
its table columns, its loss-by-position curve, its ``data`` option), never its name.
"""

from __future__ import annotations

import dataclasses
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

from seqzoo.bench.tasks import Task, cache_key, cached, checked_config, order_key

log = logging.getLogger(__name__)

__all__ = ["LMConfig", "LMTask", "stdlib_files"]


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
    columns = (("bits_per_byte", "bits/byte"), ("context_gain", "context gain (nats)"))
    position_curve = "loss_by_position"
    data_option = "data"
    notes = "Context gain: LM loss (nats) at positions 16–31 minus its mean over the window's second half."

    def __init__(self, *, seed: int = 0, cache_dir: str | os.PathLike | None = None, **config):
        self.cfg = checked_config(LMConfig, config)
        if self.cfg.seq_len < 1:
            raise ValueError(f"expected seq_len >= 1, got {self.cfg.seq_len}")
        self.seed = seed
        self.seq_len = self.cfg.seq_len
        root, files = (
            stdlib_files() if self.cfg.data is None else _text_files(Path(self.cfg.data).expanduser())
        )
        self.source = "python-stdlib" if self.cfg.data is None else str(Path(self.cfg.data).resolve())
        listing = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in files]
        key = cache_key(
            "lm", {"source": self.source, "files": listing, "cfg": dataclasses.asdict(self.cfg), "v": 1}
        )
        cache = Path(cache_dir) if cache_dir is not None else None
        t = cached(cache, key, lambda: self._build(root, files))
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
        rng = np.random.default_rng(order_key([self.seed, 11, step], order))
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
