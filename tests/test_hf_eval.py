"""From a training run to the tools researchers evaluate with: ``seqzoo export``, lm-evaluation-harness
(its ``hf`` model, offline, on a task built here), and loss by token position."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
import seqzoo.hf as H  # noqa: E402
from seqzoo import evaluation  # noqa: E402
from seqzoo.bench.store import load_tensors, read_json  # noqa: E402
from seqzoo.bench.train import TrainConfig, build_model, train  # noqa: E402
from seqzoo.cli import main  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

DOCS = [
    {"context": "def add(a, b):\n    return a ", "choices": ["+ b", "- b", "* b"], "label": 0},
    {"context": "import os\nprint(os.", "choices": ["path", "zzz", "%%%"], "label": 0},
    {"context": "for i in range(", "choices": ["10):", "]]]", "qq"], "label": 0},
    {"context": "class Foo:\n    def __", "choices": ["init__", "xyz__", "__"], "label": 0},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A byte-level model trained a few steps on the standard library's sources, exported."""
    root = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(layer="mamba", task="lm", task_config={"seq_len": 32, "max_train_bytes": 200_000,
                                                             "num_eval": 4},
                      d_model=32, n_layers=2, steps=4, batch_size=4, warmup_steps=1)
    train(cfg, out=root / "run", cache_dir=root / "cache")
    assert main(["export", str(root / "run"), str(root / "model")]) == 0
    return root


def test_export_writes_a_transformers_folder_with_the_trained_weights(run):
    folder = run / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "seqzoo_auto.py"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.glob("*.bin"))
    config = json.loads((folder / "config.json").read_text())
    assert config["layer"] == "mamba" and config["seqzoo_train"]["step"] == 4
    assert config["seqzoo_train"]["task_config"]["seq_len"] == 32
    model = H.SeqzooForCausalLM.from_pretrained(str(folder)).eval()
    ckpt = run / "run" / read_json(run / "run" / "latest.json")["checkpoint"]
    lm = build_model(TrainConfig.from_dict(read_json(ckpt / "trainer.json")["config"]), 256)
    lm.load_state_dict(load_tensors(ckpt / "model.safetensors")[0])
    ids = torch.tensor([list(b"def f(x):\n    return x")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, lm(ids)[0])
    assert evaluation.training_context(model.config) == 32


def test_export_and_eval_refuse_bad_input(run, tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "latest.json" in capsys.readouterr().err
    assert main(["eval", str(run / "model")]) == 2
    assert "--tasks" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--by-position"]) == 2
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(run / "model"), "--by-position", "--length", "0"])
    assert exc.value.code == 2


def _own_loglikelihood(model, context: str, continuation: str) -> float:
    """log p(continuation | context) from seqzoo's logits, with lm-eval's convention that a context's
    trailing whitespace belongs to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ids = torch.tensor([list((context + continuation).encode())])
    n = len(continuation.encode())
    with torch.no_grad():
        logp = model(ids).logits[0].double().log_softmax(-1)
    return sum(float(logp[ids.shape[1] - n - 1 + i, ids[0, ids.shape[1] - n + i]]) for i in range(n))


def _task_folder(tmp_path):
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "task.yaml").write_text(
        "task: seqzoo_local_choice\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n"
    )
    return tmp_path


def test_lm_eval_hf_model_computes_seqzoos_log_likelihoods(run, tmp_path, monkeypatch):
    """lm-eval's own ``HFLM`` on the exported folder: its log-likelihoods are seqzoo's, and a multiple-choice
    task built here scores the accuracy seqzoo's log-likelihoods give."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    folder = str(run / "model")
    model = H.SeqzooForCausalLM.from_pretrained(folder).eval()
    lm = HFLM(pretrained=folder, tokenizer=folder, batch_size=2, device="cpu")
    reqs = [(d["context"], c) for d in DOCS for c in d["choices"]]
    got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                            for i, r in enumerate(reqs)])
    own = [_own_loglikelihood(model, c, x) for c, x in reqs]
    for (ll, _), want in zip(got, own):
        assert ll == pytest.approx(want, rel=1e-5, abs=1e-5)  # lm-eval sums float32 log-probs
    correct = [max(range(3), key=lambda j, i=i: own[3 * i + j]) == d["label"] for i, d in enumerate(DOCS)]
    task_dir = _task_folder(tmp_path)
    result = evaluation.run_lm_eval(folder, ["seqzoo_local_choice"], include_path=str(task_dir), batch_size=2)
    assert result["results"]["seqzoo_local_choice"]["acc,none"] == pytest.approx(sum(correct) / len(DOCS))


def test_the_lm_eval_command_and_seqzoo_eval_run_the_same_task(run, tmp_path):
    """The stock ``lm_eval`` command (which never imports seqzoo.hf: the folder's ``seqzoo_auto`` module
    does, under trust_remote_code) and ``seqzoo eval`` print the same accuracy."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    task_dir = _task_folder(tmp_path)
    folder = run / "model"
    env = {**os.environ, **OFFLINE}
    stock = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={folder},tokenizer={folder},trust_remote_code=True", "--tasks", "seqzoo_local_choice",
         "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "2", "--output_path",
         str(tmp_path / "stock")], capture_output=True, text=True, timeout=600, env=env)
    assert stock.returncode == 0, stock.stderr[-3000:]
    ours = subprocess.run(
        [sys.executable, "-m", "seqzoo", "eval", str(folder), "--tasks", "seqzoo_local_choice", "--include-path",
         str(task_dir), "--batch-size", "2", "--out", str(tmp_path / "ours")],
        capture_output=True, text=True, timeout=600, env=env)
    assert ours.returncode == 0, ours.stderr[-3000:]
    saved = json.loads((tmp_path / "ours" / "lm_eval.json").read_text())
    acc = saved["results"]["seqzoo_local_choice"]["acc,none"]
    row = next(line for line in stock.stdout.splitlines() if "seqzoo_local_choice" in line)
    assert f"{acc:.4f}".rstrip("0").rstrip(".") in row.replace(" ", "")


def test_loss_by_position_equals_one_forward_over_each_document():
    torch.manual_seed(0)
    lm = H.SeqzooForCausalLM(H.SeqzooConfig(layer="gla", d_model=32, n_layers=2)).model.eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (50, 10, 70, 61)]
    res = evaluation.loss_by_position(lm, docs, length=60, chunk=16, max_documents=3)
    assert res["documents"] == 2 and res["shorter_documents_skipped"] == 2
    want = torch.zeros(60, dtype=torch.float64)
    with torch.no_grad():
        for d in (docs[2], docs[3]):
            ids = torch.tensor([d[:61]])
            want += torch.nn.functional.cross_entropy(lm(ids[:, :-1])[0][0], ids[0, 1:], reduction="none").double()
    # only two documents are long enough: max_documents=3 averages those two
    torch.testing.assert_close(torch.tensor(res["loss_by_position"], dtype=torch.float64), want / 2,
                               rtol=1e-5, atol=1e-5)
    assert res["loss"] == pytest.approx(float(want.mean() / 2), rel=1e-5)
    with pytest.raises(ValueError, match="no document has the 101 tokens"):
        evaluation.loss_by_position(lm, docs, length=100)


def test_eval_by_position_writes_the_curve_and_its_plot(run, tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    for i in range(40):
        (text / f"doc{i:02d}.txt").write_text(f"# file {i}\n" + "x = [i * i for i in range(10)]\n" * 8)
    assert main(["eval", str(run / "model"), "--by-position", "--data", str(text), "--length", "200",
                 "--documents", "2", "--chunk", "64", "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "by_position.json").read_text())
    assert saved["length"] == 200 and saved["documents"] == 2 and saved["train_context"] == 32
    assert len(saved["loss_by_position"]) == 200 and all(math.isfinite(v) for v in saved["loss_by_position"])
    assert (tmp_path / "out" / "by_position.png").read_bytes()[:4] == b"\x89PNG"


def test_export_and_by_position_follow_the_training_run(tmp_path, word_tokenizer):
    """A run trained with a Hugging Face tokenizer on a dataset is exported with that tokenizer, and
    ``eval --by-position`` without --data reads the documents that run held out (its val_every)."""
    docs = [f"doc {i} " + " ".join(f"w{(i * j) % 23}" for j in range(40 + i % 9)) for i in range(80)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok, vocab = word_tokenizer(docs)
    cfg = TrainConfig(layer="rnn", task="lm", task_config={"data": str(data), "tokenizer": tok, "seq_len": 16,
                                                           "num_eval": 2, "val_every": 7},
                      d_model=16, n_layers=1, steps=2, batch_size=2, warmup_steps=1)
    train(cfg, out=tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "model")]) == 0
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    assert len(saved) == len(vocab) and saved.eos_token == "</s>"
    assert main(["eval", str(tmp_path / "model"), "--by-position", "--length", "32", "--documents", "3",
                 "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "by_position.json").read_text())
    assert result["data"]["data"] == str(data) and result["data"]["val_every"] == 7
    assert result["documents"] == 3 and result["train_context"] == 16
    # the documents it read are the held-out ones: by position 0, the loss of their first tokens
    from seqzoo.bench.textdata import held_out

    held = [t for i, t in enumerate(docs) if held_out(str(i), 7)][:3]
    model = H.SeqzooForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    ids = torch.tensor([saved(t, add_special_tokens=False)["input_ids"][:33] for t in held])
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits.transpose(1, 2), ids[:, 1:],
                                                   reduction="none").mean(0)
    assert result["loss_by_position"] == pytest.approx(losses.tolist(), rel=1e-5, abs=1e-6)
    assert main(["eval", str(tmp_path / "model"), "--by-position", "--streaming"]) == 2
