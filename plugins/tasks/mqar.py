"""Multi-query associative recall (MQAR, zoology's generator): the recall task of the comparison.

Registered by this plugin as the task ``mqar``; the harness reads what it declares (its headline metric,
its table column), never its name.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from seqzoo.bench.tasks import IGNORE, Task, cache_key, cached, check_order, checked_config, order_key

__all__ = ["MQARConfig", "MQARTask", "mqar_examples"]


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


class MQARTask(Task):
    """Multi-query associative recall (zoology): accuracy of the value predicted at each query."""

    name = "mqar"
    score_key = "accuracy"
    score_sign = 1.0
    columns = (("accuracy", "MQAR acc"),)
    plot_vs_state = True

    def __init__(self, *, seed: int = 0, cache_dir: str | os.PathLike | None = None, **config):
        self.cfg = checked_config(MQARConfig, config)
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

        key = cache_key(
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
        t = cached(cache, key, build)
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
        check_order(order)  # here, not only when a permutation is drawn
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
            self._perm = np.random.default_rng(order_key([self.seed, 7, epoch], order)).permutation(n)
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
