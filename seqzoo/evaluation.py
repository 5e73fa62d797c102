"""Evaluating a saved model (a ``save_pretrained`` folder): EleutherAI's lm-evaluation-harness, and
held-out loss by token position on documents longer than the training context (the TTT paper's
loss-by-token-index figure).

``seqzoo eval DIR --tasks ...`` and ``seqzoo eval DIR --by-position`` call these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .bench.store import atomic_write, write_json

__all__ = ["run_lm_eval", "loss_by_position", "plot_loss_by_position", "folder_tokenizer", "training_context"]


def folder_tokenizer(folder: str | Path, tokenizer: str | None = None) -> str:
    """The tokenizer to read text for a saved model with: ``tokenizer`` if given, else the folder's own
    (``seqzoo export`` saves one for byte-level models), else ``bytes``."""
    if tokenizer:
        return tokenizer
    return str(folder) if (Path(folder) / "tokenizer_config.json").is_file() else "bytes"


def training_context(config) -> int | None:
    """The window the model was trained on, where its config records it (``seqzoo export``)."""
    train = getattr(config, "seqzoo_train", None) or {}
    seq_len = (train.get("task_config") or {}).get("seq_len")
    return int(seq_len) if seq_len else None


def run_lm_eval(folder: str | Path, tasks: Sequence[str], *, tokenizer: str | None = None, batch_size: int = 1,
                limit: float | None = None, num_fewshot: int | None = None, include_path: str | None = None,
                device: str = "cpu") -> dict[str, Any]:
    """lm-evaluation-harness's ``hf`` model on a saved seqzoo model: its ``simple_evaluate`` result."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError('seqzoo eval --tasks needs lm-evaluation-harness: pip install "seqzoo[eval]"') from err
    from . import hf  # noqa: F401 - registers the seqzoo model type with the Auto classes

    tok = folder_tokenizer(folder, tokenizer)
    if tok == "bytes":
        raise ValueError(f"{folder} has no tokenizer: pass --tokenizer (a Hugging Face tokenizer name or folder)")
    model = HFLM(pretrained=str(folder), tokenizer=tok, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return lm_eval.simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager)


@torch.no_grad()
def loss_by_position(model, documents: Iterable[Sequence[int]], *, length: int, max_documents: int = 16,
                     chunk: int = 512, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Mean next-token loss (nats) at every position 0..length-1 over the first ``max_documents``
    documents of at least ``length + 1`` tokens (their first ``length + 1``). ``model`` is a seqzoo
    ``LanguageModel``; each document runs through it ``chunk`` tokens at a time, the state carried from
    chunk to chunk, so a recurrent layer reads any length in constant memory."""
    if length < 1 or max_documents < 1 or chunk < 1:
        raise ValueError(f"expected length, max_documents and chunk >= 1, got {length}, {max_documents}, {chunk}")
    total = torch.zeros(length, dtype=torch.float64)
    used = skipped = 0
    for ids in documents:
        if len(ids) < length + 1:
            skipped += 1
            continue
        seq = torch.as_tensor(np.asarray(ids[: length + 1], dtype=np.int64), device=device)[None]
        state = None
        for lo in range(0, length, chunk):
            hi = min(lo + chunk, length)
            logits, state = model(seq[:, lo:hi], state)
            total[lo:hi] += F.cross_entropy(logits[0].float(), seq[0, lo + 1:hi + 1], reduction="none").double().cpu()
        used += 1
        if used == max_documents:
            break
    if not used:
        raise ValueError(f"no document has the {length + 1} tokens a length of {length} needs "
                         f"({skipped} shorter ones); pass a shorter --length or longer documents")
    curve = (total / used).tolist()
    return {"length": length, "documents": used, "shorter_documents_skipped": skipped,
            "loss": float(np.mean(curve)), "loss_by_position": curve}


def _log_bins(length: int, per_decade: int = 12) -> list[tuple[int, int]]:
    edges = sorted({0, *(int(round(10 ** (k / per_decade))) for k in range(int(per_decade * math.log10(length)) + 1)),
                    length})
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def plot_loss_by_position(result: dict, path: str | Path, *, title: str = "", train_context: int | None = None) -> Path:
    """Loss against token position (log scale; means over log-spaced bins), the training context marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = np.asarray(result["loss_by_position"])
    bins = _log_bins(len(curve))
    xs = [(a + b - 1) / 2 + 1 for a, b in bins]
    ys = [curve[a:b].mean() for a, b in bins]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, marker=".", label=f"{result['documents']} held-out documents")
    if train_context:
        ax.axvline(train_context, color="grey", linestyle="--", label=f"training context ({train_context})")
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title or "held-out loss by token position")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)


def save_by_position(result: dict, out: str | Path, *, title: str = "", train_context: int | None = None) -> dict:
    """Write ``by_position.json`` and ``by_position.png`` under ``out``; returns their paths."""
    out = Path(out)
    json_path = write_json(out / "by_position.json", {**result, "train_context": train_context})
    png = plot_loss_by_position(result, out / "by_position.png", title=title, train_context=train_context)
    return {"json": str(json_path), "plot": str(png)}
