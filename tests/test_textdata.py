"""Real text for the lm task: Hugging Face datasets (jsonl, parquet, save_to_disk, a dataset folder),
Hugging Face tokenizers, documents packed with end-of-text, streaming with an exact resume. Local
fixtures only: nothing here touches the network."""

import json
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from seqzoo_plugins.tasks import LMTask

datasets = pytest.importorskip("datasets")

from seqzoo.bench.train import TrainConfig, train  # noqa: E402

DOCS = [f"document {i}: " + "the quick brown fox. " * (3 + i % 7) + f"end {i}" for i in range(60)]


def _held_out(i: int, every: int = 20) -> bool:
    return zlib.crc32(str(i).encode()) % every == 0


def _expected_stream(docs, encode=lambda t: list(t.encode()), eos=0):
    out = []
    for i, text in enumerate(docs):
        if not _held_out(i):
            out += [*encode(text), eos]
    return out


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(DOCS)))
    return path


def test_held_out_documents_exist_in_the_fixture():
    held = [i for i in range(len(DOCS)) if _held_out(i)]
    assert 0 < len(held) < len(DOCS) // 2


def test_jsonl_documents_are_packed_with_end_of_text(jsonl, tmp_path):
    task = LMTask(data=str(jsonl), seq_len=16, num_eval=4, cache_dir=tmp_path / "c")
    assert task.vocab_size == 256 and task.dataset
    assert task.train_tokens.tolist() == _expected_stream(DOCS)
    # validation windows: the first 17 bytes of each held-out document, in order
    held = [DOCS[i] for i in range(len(DOCS)) if _held_out(i)]
    want = [list(t.encode()[:17]) for t in held][:4]
    assert task.val_windows.tolist()[: len(want)] == want
    x, y = task.train_batch(3, 5)
    assert x.shape == (5, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_parquet_save_to_disk_and_a_dataset_folder_read_the_same_documents(jsonl, tmp_path):
    ds = datasets.Dataset.from_dict({"body": DOCS})
    ds.to_parquet(str(tmp_path / "docs.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "part.jsonl").write_text(jsonl.read_text())
    want = _expected_stream(DOCS)
    for data, field in ((tmp_path / "docs.parquet", "body"), (tmp_path / "saved", "body"), (folder, "text")):
        task = LMTask(data=str(data), text_field=field, seq_len=16, num_eval=2)
        assert task.train_tokens.tolist() == want, data
    with pytest.raises(ValueError, match="no split 'test'"):
        LMTask(data=str(tmp_path / "saved"), text_field="body", data_split="test", seq_len=16)
    with pytest.raises(ValueError, match="text field 'text'.*body"):
        LMTask(data=str(tmp_path / "docs.parquet"), seq_len=16)


def test_a_hugging_face_tokenizer_sets_the_vocabulary_and_end_of_text(jsonl, tmp_path, word_tokenizer):
    pytest.importorskip("transformers")
    path, vocab = word_tokenizer(DOCS)
    task = LMTask(data=str(jsonl), tokenizer=path, seq_len=8, num_eval=2)
    assert task.vocab_size == len(vocab)
    want = _expected_stream(DOCS, lambda t: [vocab[w] for w in t.split()], eos=1)
    assert task.train_tokens.tolist() == want
    with pytest.raises(ValueError, match="cannot load the tokenizer"):
        LMTask(data=str(jsonl), tokenizer=str(tmp_path / "nothing-here"), seq_len=8)


def test_streaming_reads_the_stream_in_order(jsonl, tmp_path):
    task = LMTask(data=str(jsonl), streaming=True, seq_len=16, num_eval=4)
    assert task.train_tokens is None
    stream = _expected_stream(DOCS)
    # window k starts at token 16k: each window's last token starts the next one
    batches = [task.train_batch(step, 3) for step in range(4)]
    for step, (x, y) in enumerate(batches):
        for j in range(3):
            k = 3 * step + j
            assert x[j].tolist() == stream[16 * k:16 * k + 16] and y[j].tolist() == stream[16 * k + 1:16 * k + 17]
    # the same batches again from the start, and from a position kept in a checkpoint
    assert torch.equal(task.train_batch(0, 3)[0], batches[0][0])
    state = task.data_state(2)
    assert set(state) == {"step", "document", "offset"}
    fresh = LMTask(data=str(jsonl), streaming=True, seq_len=16, num_eval=4)
    fresh.load_data_state(state)
    assert torch.equal(fresh.train_batch(2, 3)[0], batches[2][0])
    assert torch.equal(fresh.train_batch(3, 3)[0], batches[3][0])
    with pytest.raises(ValueError, match="read in order"):
        fresh.train_batch(9, 3)
    with pytest.raises(ValueError, match="data_order must be 0"):
        fresh.train_batch(0, 3, order=1)
    with pytest.raises(ValueError, match="ran out of training text"):
        fresh.train_batch(4, 10_000)


def test_a_long_stream_reads_in_constant_depth(tmp_path):
    """Thousands of batches in a row (each reading on from the last) still give the packed stream."""
    docs = [f"doc {i} " + "abc " * (i % 5) for i in range(3000)]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    task = LMTask(data=str(path), streaming=True, seq_len=8, num_eval=2)
    stream = _expected_stream(docs)
    for step in range(2000):
        x, _ = task.train_batch(step, 2)
    k = 2 * 1999 + 1  # the last window of the last batch
    assert x[1].tolist() == stream[8 * k:8 * k + 8]


def test_one_file_has_one_split(jsonl, tmp_path):
    with pytest.raises(ValueError, match="holds one split"):
        LMTask(data=str(jsonl), eval_split="validation", seq_len=16)
    with pytest.raises(ValueError, match="holds one split"):
        LMTask(data=str(jsonl), data_split="test", seq_len=16)
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="holds one split"):
        LMTask(data=str(tmp_path / "plain"), eval_split="validation", seq_len=16)


def test_compare_refuses_a_stream_with_several_seeds(jsonl, tmp_path):
    from seqzoo.bench.compare import compare

    with pytest.raises(ValueError, match="read in one order"):
        compare(layers=["rnn"], tasks=["lm"], preset_name="quick", out=tmp_path, speed=False,
                data={"data": str(jsonl), "streaming": True}, overrides={"tasks": {"lm": {"seeds": 2}}})


def _cfg(data, **kw):
    base = dict(layer="rnn", task="lm", task_config={"data": str(data), "seq_len": 16, "num_eval": 4,
                                                     "streaming": True},
                d_model=16, n_layers=1, steps=8, batch_size=4, warmup_steps=2, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_a_streamed_run_resumes_exactly(jsonl, tmp_path):
    full = train(_cfg(jsonl), out=tmp_path / "full")
    part = train(_cfg(jsonl), out=tmp_path / "part", stop_after=3)
    assert part.steps == 3
    trainer = json.loads(next((tmp_path / "part").glob("checkpoint-*/trainer.json")).read_text())
    assert trainer["data"]["step"] == 3 and trainer["data"]["document"] > 0
    rest = train(_cfg(jsonl), out=tmp_path / "part", resume=True)
    assert rest.resumed_from == 3 and rest.losses == full.losses  # bit-identical: the same batches
    assert rest.metrics["loss"] == full.metrics["loss"]


def test_train_command_takes_a_dataset_and_a_tokenizer(jsonl, tmp_path):
    run = [sys.executable, "-m", "seqzoo", "train", "--layer", "rnn", "--task", "lm", "--d-model", "16",
           "--n-layers", "1", "--steps", "3", "--batch-size", "2", "--task-config", "seq_len=16", "num_eval=2"]
    done = subprocess.run([*run, "--data", str(jsonl), "--streaming", "--tokenizer", "bytes", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["result"]["steps"] == 3
    bad = subprocess.run([*run, "--streaming"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "give --data too" in bad.stderr


def test_bytes_encode_is_utf8():
    from seqzoo.bench.textdata import load_tokenizer

    tok = load_tokenizer("bytes")
    assert np.asarray(tok.encode("é✓")).tolist() == list("é✓".encode()) and tok.eos_id == 0
    with pytest.raises(ValueError, match="expected a tokenizer name"):
        load_tokenizer("")


def test_train_logs_to_weights_and_biases_offline(tmp_path):
    """``--wandb`` with the real client in offline mode: the run's record file holds the config and every
    logged loss (nothing leaves the machine)."""
    pytest.importorskip("wandb")
    import os

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "SEQZOO_CACHE": str(tmp_path / "c")}
    done = subprocess.run(
        [sys.executable, "-m", "seqzoo", "train", "--layer", "rnn", "--task", "mqar", "--task-config",
         "vocab_size=32", "train=[[16,2,64]]", "test=[[16,2,16]]", "--d-model", "16", "--n-layers", "1",
         "--steps", "5", "--batch-size", "4", "--log-every", "1", "--wandb", "--wandb-project", "seqzoo-test",
         "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    records = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    blob = records[0].read_bytes()
    assert blob.count(b"train/loss") >= 5 and b"seqzoo-test" in blob and b"eval/accuracy" in blob
    # the plain log lines are still printed when stdout is no terminal
    assert [json.loads(line)["step"] for line in done.stdout.splitlines() if '"step"' in line] == [1, 2, 3, 4, 5]


def test_an_eval_split_is_the_validation_set(tmp_path):
    """With ``eval_split`` every training-split document trains and the named split validates."""
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:40]}),
                               "validation": datasets.Dataset.from_dict({"text": DOCS[40:]})})
    ds.save_to_disk(str(tmp_path / "saved"))
    task = LMTask(data=str(tmp_path / "saved"), eval_split="validation", seq_len=16, num_eval=5)
    want = []
    for text in DOCS[:40]:
        want += [*text.encode(), 0]
    assert task.train_tokens.tolist() == want
    assert task.val_windows.tolist() == [list(t.encode()[:17]) for t in DOCS[40:45]]
    streamed = LMTask(data=str(tmp_path / "saved"), eval_split="validation", streaming=True, seq_len=16, num_eval=5)
    assert torch.equal(streamed.val_windows, task.val_windows)
    assert streamed.train_batch(0, 2)[0].tolist() == [want[:16], want[16:32]]
    from seqzoo.bench.textdata import TextSource

    assert list(TextSource(str(tmp_path / "saved"), eval_split="validation").held_out()) == DOCS[40:]
    with pytest.raises(ValueError, match="expected a dataset with eval_split"):
        LMTask(eval_split="validation", seq_len=16)


def test_compare_trains_its_lm_task_on_a_dataset(jsonl, tmp_path):
    """``seqzoo compare --data X --streaming``: the lm task of the comparison reads the dataset, recorded in
    results.json, and the streamed task serves every cell from its first batch."""
    from seqzoo.cli import main

    tiny = json.dumps({"tasks": {"lm": {"steps": 2, "task_config": {"seq_len": 16, "num_eval": 2}}}})
    assert main(["compare", "--preset", "quick", "--layers", "rnn", "--tasks", "lm", "--no-speed", "--no-progress",
                 "--data", str(jsonl), "--streaming", "--text-field", "text", "--out", str(tmp_path / "out"),
                 "--override", tiny]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert json.dumps(results).count(str(jsonl)) >= 1
    cells = results["cells"]
    assert {c["status"] for c in cells.values()} == {"ok"} and len(cells) == 2  # both backbones


def test_a_resumed_run_continues_its_weights_and_biases_run(tmp_path):
    pytest.importorskip("wandb")
    import os

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "SEQZOO_CACHE": str(tmp_path / "c")}
    args = [sys.executable, "-m", "seqzoo", "train", "--layer", "rnn", "--task", "mqar", "--task-config",
            "vocab_size=32", "train=[[16,2,64]]", "test=[[16,2,16]]", "--d-model", "16", "--n-layers", "1",
            "--steps", "4", "--batch-size", "4", "--wandb", "--out", str(tmp_path / "run")]
    first = subprocess.run([*args, "--stop-after", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    run_id = json.loads((tmp_path / "run" / "wandb-run.json").read_text())["id"]
    second = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "wandb-run.json").read_text())["id"] == run_id
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
