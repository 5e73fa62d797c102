"""MQAR generator properties (zoology's semantics) and the byte-level LM task."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from seqzoo_plugins.tasks import LMTask, MQARTask, mqar_examples

import seqzoo
from seqzoo.bench.tasks import IGNORE


def _mqar(**kw):
    args = dict(vocab_size=64, seq_len=48, num_kv_pairs=6, power_a=0.01, random_non_queries=True, seed=3)
    args.update(kw)
    return mqar_examples(500, **args)


def test_tasks_are_registered():
    assert {"mqar", "lm"} <= set(seqzoo.list_tasks())
    assert seqzoo.task_spec("mqar").factory is MQARTask


def test_mqar_keys_values_labels():
    vocab, T, kv = 64, 48, 6
    x, y = _mqar(vocab_size=vocab, seq_len=T, num_kv_pairs=kv)
    assert x.shape == y.shape == (500, T) and x.dtype == y.dtype == torch.int64
    half = vocab // 2
    keys, values = x[:, 0 : 2 * kv : 2], x[:, 1 : 2 * kv : 2]
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < vocab)).all()
    for row in range(x.shape[0]):  # unique keys and unique values in every example
        assert len(set(keys[row].tolist())) == kv and len(set(values[row].tolist())) == kv
    assert (x >= 0).all() and (x < vocab).all()
    # labels only at queries after the context, one per key, and each is the value of the key queried there
    mask = y != IGNORE
    assert (mask.sum(1) == kv).all()
    assert not mask[:, : 2 * kv].any()
    pos = mask.nonzero()
    assert ((pos[:, 1] - 2 * kv) % 2 == 0).all()  # queries at even offsets after the context
    for r, t in pos.tolist():
        k = x[r, t].item()
        j = keys[r].tolist().index(k)
        assert y[r, t].item() == values[r, j].item()
    queried = torch.stack([x[r][mask[r]].sort().values for r in range(x.shape[0])])
    assert torch.equal(queried, keys.sort(dim=1).values)  # every key is queried exactly once


def test_mqar_without_random_fill_has_zero_filler():
    x, y = _mqar(random_non_queries=False)
    filler = y == IGNORE
    filler[:, : 2 * 6] = False
    assert (x[filler] == 0).all()


def test_mqar_deterministic_from_seed():
    a, b = _mqar(seed=5), _mqar(seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = _mqar(seed=6)
    assert not torch.equal(a[0], c[0])


def test_mqar_gaps_follow_the_power_law():
    """Short gaps between context and query are far more likely than long ones (power_a = 0.01)."""
    T, kv = 256, 4
    x, y = mqar_examples(4000, vocab_size=512, seq_len=T, num_kv_pairs=kv, seed=0)
    gaps = ((y != IGNORE).nonzero()[:, 1] - 2 * kv) // 2
    space = (T - 2 * kv) // 2
    counts = np.bincount(gaps.numpy(), minlength=space)
    assert counts[: space // 8].sum() > 3 * counts[-space // 8 :].sum()
    # uniform gaps with power_a = 1
    x, y = mqar_examples(4000, vocab_size=512, seq_len=T, num_kv_pairs=kv, power_a=1.0, seed=0)
    gaps = ((y != IGNORE).nonzero()[:, 1] - 2 * kv) // 2
    counts = np.bincount(gaps.numpy(), minlength=space)
    lo, hi = counts[: space // 8].sum(), counts[-space // 8 :].sum()
    assert abs(lo - hi) / (lo + hi) < 0.15


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(seq_len=47), "even seq_len"),
        (dict(vocab_size=40), "vocab_size > seq_len"),
        (dict(num_kv_pairs=13), "num_kv_pairs"),
    ],
)
def test_mqar_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _mqar(**kw)


def test_mqar_task_batches_cache_and_evaluation(tmp_path):
    cfg = dict(vocab_size=64, train=[[32, 4, 100], [16, 2, 50]], test=[[32, 4, 20]])
    task = MQARTask(seed=1, cache_dir=tmp_path, **cfg)
    assert task.seq_len == 32 and task.train_inputs.shape == (150, 32)
    assert len(list(tmp_path.glob("mqar-*.safetensors"))) == 2  # train and test sets cached
    again = MQARTask(seed=1, cache_dir=tmp_path, **cfg)
    assert torch.equal(task.train_inputs, again.train_inputs)
    # batches: a pure function of (seed, step); an epoch visits every example once
    b1 = task.train_batch(3, 8)
    assert torch.equal(b1[0], again.train_batch(3, 8)[0])
    seen = torch.cat([task.train_batch(s, 10)[0] for s in range(15)])
    assert torch.equal(seen.unique(dim=0), task.train_inputs.unique(dim=0))
    # the short segment is padded on the right without labels
    assert (task.train_labels[100:, 16:] == IGNORE).all()

    class Oracle(torch.nn.Module):  # predicts the label wherever there is one: accuracy 1
        def forward(self, ids):
            y = task.test_labels[: ids.shape[0]] if ids.shape[0] == task.test_inputs.shape[0] else None
            logits = torch.zeros(*ids.shape, 64)
            idx = _lookup(ids)
            logits.scatter_(2, idx[..., None], 10.0)
            return logits, y

    def _lookup(ids):
        out = torch.zeros_like(ids)
        for r in range(ids.shape[0]):
            row = task.test_inputs.tolist().index(ids[r].tolist())
            lab = task.test_labels[row]
            out[r] = torch.where(lab != IGNORE, lab, 0)
        return out

    m = task.evaluate(Oracle(), batch_size=7)
    assert m["accuracy"] == 1.0 and m["num_queries"] == 20 * 4
    with pytest.raises(TypeError, match="unknown MQARConfig"):
        MQARTask(seed=0, vocab=64)


def test_lm_task_on_a_folder(tmp_path):
    data = tmp_path / "text"
    data.mkdir()
    for i in range(30):
        (data / f"f{i:02d}.txt").write_text(f"file {i}: " + "abcdefghij" * (5 + i))
    (data / "blob.bin").write_bytes(b"\0\1\2" * 100)  # binary files are skipped
    task = LMTask(seed=0, cache_dir=tmp_path / "cache", data=str(data), seq_len=16, num_eval=8, val_every=5)
    assert task.vocab_size == 256
    x, y = task.train_batch(0, 4)
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(task.train_batch(0, 4)[0], x) and not torch.equal(task.train_batch(1, 4)[0], x)
    # the binary file is skipped: the only NULs are the end-of-text bytes after each training document
    train_docs = [p for p in data.glob("*.txt") if zlib.crc32(p.name.encode()) % 5]
    stream = task.train_tokens
    assert int((stream == 0).sum()) == len(train_docs) and int(stream[-1]) == 0
    assert bytes(stream[: stream.tolist().index(0)].tolist()).decode().startswith("file ")
    assert task.val_windows.shape == (8, 17)
    # a uniform model scores ln(256) nats/byte = 8 bits/byte at every position

    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, 256), {}

    m = task.evaluate(Uniform())
    assert m["loss"] == pytest.approx(math.log(256)) and m["bits_per_byte"] == pytest.approx(8.0)
    assert len(m["loss_by_position"]) == 16


def test_lm_default_corpus_is_the_stdlib(tmp_path):
    task = LMTask(seed=0, cache_dir=tmp_path, seq_len=64, max_train_bytes=200_000, num_eval=4)
    assert task.config()["source"] == "python-stdlib" and task.train_tokens.numel() == 200_000
    text = bytes(task.val_windows[0].tolist()).decode("utf-8", errors="replace")
    assert text.strip()  # Python source
