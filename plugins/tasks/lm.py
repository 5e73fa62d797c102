"""Language modelling on text (the Python standard library's sources, byte by byte, by default): the
language modelling task of the comparison and of ``seqzoo train --task lm``.

The text is local files or a Hugging Face dataset (see ``seqzoo.bench.textdata``), read as UTF-8 bytes
or through a Hugging Face tokenizer; documents are packed with an end-of-text token after each. Held
out are whole documents (``crc32`` of a file's path, or of a dataset document's index, modulo
``val_every``), and validation windows start at their starts. Training windows are drawn at random
offsets of the packed stream (a pure function of seed and step), or, with ``streaming``, read in order
from the stream, the position (document, token) kept in every checkpoint so a resumed run reads on
exactly where it stopped.

Registered by this plugin as the task ``lm``; the harness reads what it declares (its headline metric,
its table columns, its loss-by-position curve, its ``data`` option), never its name.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from seqzoo.bench.tasks import Task, cache_key, cached, checked_config, order_key
from seqzoo.bench.textdata import TextSource, load_tokenizer, stdlib_files

log = logging.getLogger(__name__)

__all__ = ["LMConfig", "LMTask", "stdlib_files"]


@dataclass
class LMConfig:
    """LM data: windows of ``seq_len + 1`` tokens from text files or a Hugging Face dataset."""

    seq_len: int = field(default=128, metadata={"help": "tokens per training/validation window"})
    data: str | None = field(
        default=None,
        metadata={"help": "text file or folder, jsonl/parquet file, save_to_disk folder, or hub dataset name "
                          "(default: stdlib sources)"},
    )
    tokenizer: str = field(default="bytes", metadata={"help": "'bytes' or a Hugging Face tokenizer name/folder"})
    data_config: str | None = field(default=None, metadata={"help": "the hub dataset's configuration"})
    data_split: str = field(default=TextSource.data_split, metadata={"help": "the dataset split read"})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "a dataset split to validate on (default: documents held out of data_split)"},
    )
    text_field: str = field(default=TextSource.text_field, metadata={"help": "the dataset field holding the text"})
    streaming: bool = field(default=False, metadata={"help": "read the dataset as a stream, in order"})
    max_train_bytes: int = field(default=8_000_000,
                                 metadata={"help": "cap on the training stream, in tokens (not streamed)"})
    val_every: int = field(
        default=TextSource.val_every, metadata={"help": "a document is held out when crc32(path or index) % val_every == 0"}
    )
    num_eval: int = field(default=64, metadata={"help": "validation windows"})


#: the early positions (bytes of context − 1) whose mean loss ``context_gain`` compares with the window's
#: second half: the small-scale form of the TTT paper's loss-by-token-index figure
EARLY = (16, 32)


class LMTask(Task):
    """Language modelling (bytes by default: vocab 256): validation loss, bits per token (and per byte with
    the byte tokenizer; the table's bits/byte column is empty for another tokenizer), loss by position,
    and (windows of ≥ 64 tokens) ``context_gain``: mean loss at positions 16–31 minus that over the second
    half of the window (256–511 for 512-token windows) — how much a layer gains from long context."""

    name = "lm"
    vocab_size = 256
    score_key = "loss"
    score_sign = -1.0
    columns = (("bits_per_byte", "bits/byte"), ("context_gain", "context gain (nats)"))
    position_curve = "loss_by_position"
    data_option = "data"
    tokenizer_option = ("tokenizer", "bytes")
    notes = "Context gain: LM loss (nats) at positions 16–31 minus its mean over the window's second half."

    def __init__(self, *, seed: int = 0, cache_dir: str | os.PathLike | None = None, **config):
        self.cfg = checked_config(LMConfig, config)
        cfg = self.cfg
        if cfg.seq_len < 1:
            raise ValueError(f"expected seq_len >= 1, got {cfg.seq_len}")
        if cfg.val_every < 1 or cfg.num_eval < 1:
            raise ValueError(f"expected val_every and num_eval >= 1, got {cfg.val_every} and {cfg.num_eval}")
        self.seed = seed
        self.seq_len = cfg.seq_len
        self.tok = load_tokenizer(cfg.tokenizer)
        self.vocab_size = self.tok.vocab_size
        self.text = TextSource.from_options(dataclasses.asdict(cfg))
        self.dataset = self.text.is_dataset
        if cfg.data is None:
            self.source = "python-stdlib"
        elif self.dataset and not Path(cfg.data).expanduser().exists():
            self.source = cfg.data  # a hub name
        else:
            self.source = str(Path(cfg.data).expanduser().resolve())
        payload = {"source": self.source, "cfg": dataclasses.asdict(cfg), "v": 2}
        if self.dataset:
            local = Path(cfg.data).expanduser()
            if local.exists():
                payload["files"] = sorted((p.relative_to(local).as_posix() if local.is_dir() else p.name,
                                           p.stat().st_size, p.stat().st_mtime_ns)
                                          for p in ([local] if local.is_file() else local.rglob("*")) if p.is_file())
        else:
            root, files = self.text.files
            payload["files"] = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in files]
        build = self._build_streamed_val if cfg.streaming else self._build
        cache = Path(cache_dir) if cache_dir is not None else None
        t = cached(cache, cache_key("lm", payload), build)
        self.val_windows = t["val"].long()
        self.train_tokens = None if cfg.streaming else t["train"].long()
        if self.train_tokens is not None and self.train_tokens.numel() <= self.seq_len + 1:
            raise ValueError(
                f"expected more than {self.seq_len + 1} training tokens, got {self.train_tokens.numel()}"
            )
        # the streamed reader: the (document, token) where batch `step` starts, for the steps read so far
        self._positions: dict[int, tuple[int, int]] = {0: (0, 0)}
        self._reader = None

    # --- building the data ----------------------------------------------------------------------
    def _build(self) -> dict[str, Tensor]:
        return self._pack((text for _, text in self.text.training()), self.text.held_out())

    def _build_streamed_val(self) -> dict[str, Tensor]:
        """Validation windows from the held-out documents at the stream's head (training reads on)."""
        return {"val": self._val_windows(self.text.held_out())}

    def _pack(self, train_texts, val_texts) -> dict[str, Tensor]:
        """The training stream (each document's tokens, then end-of-text; at most ``max_train_bytes``
        tokens) and the validation windows (``_val_windows``)."""
        cfg = self.cfg
        dtype = np.uint8 if self.vocab_size <= 256 else np.int32
        eos = np.asarray([self.tok.eos_id], dtype=dtype)
        parts, size = [], 0
        for text in train_texts:
            if size >= cfg.max_train_bytes:
                break
            ids = np.asarray(self.tok.encode(text), dtype=dtype)
            parts += [ids, eos]
            size += len(ids) + 1
        stream = np.concatenate(parts)[: cfg.max_train_bytes] if parts else np.zeros(0, dtype)
        return {"train": torch.from_numpy(stream), "val": self._val_windows(val_texts)}

    def _val_windows(self, val_texts) -> Tensor:
        """Each validation document's first window, then each one's second, ... up to ``num_eval``
        (position t of a window has t tokens of its document before it); documents are read only until
        enough of them are long enough for the first round."""
        cfg, w = self.cfg, self.seq_len + 1
        val_ids: list = []
        for text in val_texts:
            ids = self.tok.encode(text)
            if len(ids) >= w:  # a shorter document holds no window
                val_ids.append(ids)
                if len(val_ids) >= cfg.num_eval:
                    break
        windows: list = []
        offset = 0
        while len(windows) < cfg.num_eval:
            added = False
            for ids in val_ids:
                chunk = ids[offset : offset + w]
                if len(chunk) == w and len(windows) < cfg.num_eval:
                    windows.append(chunk)
                    added = True
            if not added:
                break
            offset += w
        return self._windows_tensor(windows)

    def _windows_tensor(self, windows: list) -> Tensor:
        if not windows:
            raise ValueError(f"expected held-out text of at least {self.seq_len + 1} tokens, found none")
        dtype = np.uint8 if self.vocab_size <= 256 else np.int32
        return torch.from_numpy(np.stack([np.asarray(x, dtype=dtype) for x in windows]))

    def config(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "seed": self.seed,
            "source": self.source,
            **dataclasses.asdict(self.cfg),
            "vocab_size": self.vocab_size,
            "val_windows": int(self.val_windows.shape[0]),
        }
        if self.train_tokens is not None:
            out["train_tokens"] = int(self.train_tokens.numel())
        return out

    # --- training batches -------------------------------------------------------------------------
    def train_batch(self, step: int, batch_size: int, *, order: int = 0) -> tuple[Tensor, Tensor]:
        """``batch_size`` windows at offsets drawn from a generator seeded by ``(seed, order, step)``; or,
        streamed, the next ``batch_size`` windows of the stream (each starts at its predecessor's last
        token, so every token is a target once)."""
        if self.train_tokens is None:
            if order:
                raise ValueError("a streamed dataset is read in one order; data_order must be 0")
            win = self._streamed_windows(step, batch_size)
        else:
            rng = np.random.default_rng(order_key([self.seed, 11, step], order))
            starts = torch.from_numpy(
                rng.integers(0, self.train_tokens.numel() - self.seq_len - 1, size=batch_size)
            )
            win = self.train_tokens[starts[:, None] + torch.arange(self.seq_len + 1)]
        return win[:, :-1], win[:, 1:]

    def _streamed_windows(self, step: int, batch_size: int) -> Tensor:
        if step not in self._positions:
            raise ValueError(
                f"a streamed dataset is read in order: batch {step} was asked for, but the stream is known "
                f"up to batch {max(self._positions)} (resuming from a checkpoint restores its position)"
            )
        doc, offset = self._positions[step]
        # the open reader: the stream's generator and the token carried over from the last window (the
        # first of the next), valid where the last batch ended
        reader = self._reader
        if reader is None or reader[0] != (doc, offset):
            reader = ((doc, offset), self._train_tokens_from(doc, offset), [])
        _, tokens, buf = reader
        w = self.seq_len + 1
        windows = []
        for _ in range(batch_size):
            while len(buf) < w:
                try:
                    buf.append(next(tokens))
                except StopIteration:
                    raise ValueError(f"the dataset {self.cfg.data!r} ran out of training text at batch {step}") \
                        from None
            windows.append([t for t, _, _ in buf])
            buf = buf[-1:]  # the next window starts at this one's last token
        _, doc, offset = buf[0]
        self._reader = ((doc, offset), tokens, buf)
        self._positions[step + 1] = (doc, offset)
        return torch.tensor(windows, dtype=torch.long)

    def _train_tokens_from(self, doc: int, offset: int):
        """(token, document, offset) of the packed training stream from ``offset`` of document ``doc``."""
        for i, text in self.text.training(skip=doc):
            ids = [*self.tok.encode(text), self.tok.eos_id]
            for o in range(offset if i == doc else 0, len(ids)):
                yield ids[o], i, o

    def data_state(self, step: int) -> dict[str, Any] | None:
        """Where batch ``step`` starts in the data, for a checkpoint (None: a pure function of the step)."""
        if self.train_tokens is not None:
            return None
        doc, offset = self._positions[step]
        return {"step": step, "document": doc, "offset": offset}

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Continue the stream at a checkpoint's position."""
        self._positions[int(state["step"])] = (int(state["document"]), int(state["offset"]))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, *, batch_size: int = 64, device="cpu") -> dict:
        """Validation loss (nats per token), bits per token (and per byte, for the byte tokenizer), and the
        loss at every position."""
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
        out = {"loss": loss, "bits_per_token": loss / math.log(2)}
        if self.tok.name == "bytes":  # a token is a byte; with another tokenizer bits per byte is unknown here
            out["bits_per_byte"] = out["bits_per_token"]
        out.update(loss_by_position=per_pos.tolist(), num_windows=n)
        T = self.seq_len
        if T >= 64:  # how much the second half of the window gains over its early positions
            out["loss_early"] = per_pos[EARLY[0] : EARLY[1]].mean().item()
            out["loss_late"] = per_pos[T // 2 :].mean().item()
            out["context_gain"] = out["loss_early"] - out["loss_late"]
        return out
