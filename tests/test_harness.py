"""``seqzoo compare`` end to end at the quick preset: results.json, plots, report, resume, failures."""

from __future__ import annotations

import json

import pytest
import torch

import seqzoo
from seqzoo.bench.compare import compare, match_intermediate_size, non_embedding_params
from seqzoo.cli import main

# tiny everything: the point is the plumbing, in seconds
TINY = {
    "tasks": {"mqar": {"steps": 3}, "lm": {"steps": 2}},
    "speed": {"lengths": [8, 16], "decode_positions": [4], "decode_steps": 2},
}


def _two_layers() -> list[str]:
    names = seqzoo.list_layers()
    other = next(
        (n for n in ("self_attention", "linear_attention", "mamba", "ttt_linear") if n in names), None
    )
    return ["rnn"] + ([other] if other else [])


def test_parameter_matching_within_5_percent():
    target = non_embedding_params(
        "rnn", "transformer", d_model=32, n_layers=2, vocab_size=64, intermediate_size=96
    )
    for layer in _two_layers():
        for backbone in ("transformer", "mamba"):
            width, n = match_intermediate_size(layer, backbone, target, d_model=32, n_layers=2, vocab_size=64)
            assert abs(n / target - 1) < 0.05, (layer, backbone, width, n, target)


def test_compare_quick_end_to_end(tmp_path, capsys):
    layers = _two_layers()
    out = tmp_path / "res"
    rc = main(
        [
            "compare",
            "--preset",
            "quick",
            "--layers",
            ",".join(layers),
            "--out",
            str(out),
            "--no-progress",
            "--override",
            json.dumps(TINY),
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["cells"]) == {f"{la}/{b}" for la in layers for b in ("transformer", "mamba")}
    assert res["run_config"]["preset"] == "quick" and res["run_config"]["seed"] == 0
    assert {"python", "torch", "seqzoo"} <= set(res["versions"]) and res["machine"]["cpu_count"]
    target = res["param_targets"]["mqar/d32"]["params_non_embedding"]
    for key, cell in res["cells"].items():
        assert cell["status"] == "ok", (key, cell.get("errors"))
        mq = cell["tasks"]["mqar"]["d32"]
        assert abs(mq["param_ratio"] - 1) < 0.05
        run = mq["runs"]["lr 0.003 seed 0"]
        assert run["seed"] == 0 and run["lr"] == 3e-3 and mq["best"]["seeds"] == [0]
        assert 0.0 <= run["metrics"]["accuracy"] <= 1.0 and run["state_size"] > 0
        lm = cell["tasks"]["lm"]["d32"]["runs"]["lr 0.003 seed 0"]["metrics"]
        assert lm["bits_per_byte"] == pytest.approx(lm["loss"] / torch.log(torch.tensor(2.0)).item())
        assert len(lm["loss_by_position"]) == 32
        assert [r["T"] for r in cell["speed"]["prefill"]] == [8, 16]
        assert cell["speed"]["decode"][0]["ms_per_token"] > 0
    assert target > 0
    for png in ("mqar_accuracy_vs_state.png", "lm_loss_by_position.png", "latency_vs_context.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in (out / "report.md").read_text()
    text = capsys.readouterr().out
    assert "seqzoo compare" in text and "rnn" in text

    # resume: everything finished is skipped, and the file is unchanged apart from timestamps
    rc = main(
        [
            "compare",
            "--preset",
            "quick",
            "--layers",
            ",".join(layers),
            "--out",
            str(out),
            "--no-progress",
            "--resume",
            "--override",
            json.dumps(TINY),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "keeping 8 finished training run(s)" in text and "4 speed sweep(s) already finished" in text
    again = json.loads((out / "results.json").read_text())
    assert again["cells"] == res["cells"] and again["resumed"] == 1


class _NaNLayer(seqzoo.SequenceLayer):
    """Produces NaN: its cell must say so and the others must complete."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.w = torch.nn.Linear(d_model, d_model)

    def init_state(self, batch_size, *, device=None, dtype=None):
        return {"s": torch.zeros(batch_size, 1, device=device, dtype=dtype)}

    def state_size(self, seq_len):
        return 1

    def forward(self, x, state=None):
        state = self.check_input(x, state)
        return self.w(x) * float("nan"), state

    def step(self, x, state):
        state = self.check_input(x, state, step=True)
        return self.w(x) * float("nan"), state


class _NaNPlugin:
    @staticmethod
    @seqzoo.hookimpl
    def register_layers(register):
        register("nan_layer_harness_test", _NaNLayer)


def test_nan_layer_is_reported_and_the_rest_completes(tmp_path):
    seqzoo.register_plugin(_NaNPlugin, name="nan-harness-test")
    try:
        res = compare(
            layers=["rnn", "nan_layer_harness_test"],
            backbones=["transformer"],
            preset_name="quick",
            out=tmp_path,
            speed=False,
            overrides=TINY,
        )
    finally:
        seqzoo.unregister_plugin("nan-harness-test")
    bad = res["cells"]["nan_layer_harness_test/transformer"]
    assert bad["status"] == "failed"
    assert all("loss is nan" in e for e in bad["errors"].values()), bad["errors"]
    assert res["cells"]["rnn/transformer"]["status"] == "ok"
    from seqzoo.bench.report import compare_rows

    header, rows = compare_rows(res)
    row = next(r for r in rows if r[0] == "nan_layer_harness_test")
    assert row[header.index("MQAR acc")].startswith("failed: NonFiniteLoss: loss is nan")
    assert "nan_layer_harness_test" not in seqzoo.list_layers()


def test_resume_refuses_a_different_preset(tmp_path):
    compare(
        layers=["rnn"],
        backbones=["transformer"],
        tasks=["mqar"],
        preset_name="quick",
        out=tmp_path,
        speed=False,
        overrides=TINY,
    )
    with pytest.raises(ValueError, match="different preset"):
        compare(
            layers=["rnn"],
            backbones=["transformer"],
            tasks=["mqar"],
            preset_name="quick",
            out=tmp_path,
            speed=False,
            resume=True,
            overrides={"tasks": {"mqar": {"steps": 4}}},
        )


def test_interrupt_leaves_complete_results(tmp_path, monkeypatch):
    """A KeyboardInterrupt in the second unit leaves the first unit's results, complete and valid."""
    import seqzoo.bench.runs as cmp  # where a run trains

    calls = {"n": 0}
    real = cmp.train

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(cmp, "train", flaky)
    with pytest.raises(KeyboardInterrupt):
        compare(
            layers=["rnn"],
            backbones=["transformer", "mamba"],
            tasks=["mqar"],
            preset_name="quick",
            out=tmp_path,
            speed=False,
            overrides=TINY,
        )
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["cells"]["rnn/transformer"]["tasks"]["mqar"]["d32"]["runs"]["lr 0.003 seed 0"]["status"] == "ok"
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(cmp, "train", real)
    res = compare(
        layers=["rnn"],
        backbones=["transformer", "mamba"],
        tasks=["mqar"],
        preset_name="quick",
        out=tmp_path,
        speed=False,
        resume=True,
        overrides=TINY,
    )
    assert all(c["status"] == "ok" for c in res["cells"].values())


def test_paper_preset_is_the_published_recipe():
    from seqzoo.bench.compare import preset

    p = preset("paper")
    mq = p["tasks"]["mqar"]
    assert mq["task_config"]["vocab_size"] == 8192 and mq["d_models"] == [64, 128, 256, 512]
    assert {s[0] for s in mq["task_config"]["train"]} == {64, 128, 256}
    assert max(s[1] for s in mq["task_config"]["train"]) == 64 and len(mq["lrs"]) == 4
    lm = p["tasks"]["lm"]
    assert lm["d_models"] == [768] and lm["n_layers"] == 12 and lm["layer_config"]["num_heads"] == 12


def test_sigterm_leaves_valid_results_and_resume_finishes(tmp_path):
    """SIGTERM during a run: exit code 130, a complete results.json, no temp files; --resume completes it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    override = json.dumps({"tasks": {"mqar": {"steps": 60}}})
    cmd = [
        sys.executable,
        "-m",
        "seqzoo",
        "compare",
        "--preset",
        "quick",
        "--layers",
        "rnn",
        "--tasks",
        "mqar",
        "--no-speed",
        "--no-progress",
        "--out",
        str(tmp_path),
        "--override",
        override,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (tmp_path / "results.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    res = json.loads((tmp_path / "results.json").read_text())
    assert not list(tmp_path.glob(".*.tmp"))
    if proc.returncode == 0:  # the run had already finished: nothing to interrupt
        return
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in out
    assert "rnn/transformer" in res["cells"] and "finished" not in res
    done = compare(
        layers=["rnn"],
        tasks=["mqar"],
        preset_name="quick",
        out=tmp_path,
        speed=False,
        resume=True,
        overrides=json.loads(override),
    )
    assert all(c["status"] == "ok" for c in done["cells"].values())


def _run_numbers(res: dict) -> dict:
    out = {}
    for key, cell in res["cells"].items():
        for task, by_width in cell["tasks"].items():
            for width, entry in by_width.items():
                for lr, run in entry["runs"].items():
                    out[(key, task, width, lr)] = (run["status"], run.get("metrics"), run.get("final_train_loss"))
    return out


def test_parallel_training_gives_the_serial_numbers(tmp_path):
    """jobs=2 trains cells in worker processes; every number equals the one-process run's."""
    kw = dict(layers=["rnn", "ttt_linear"], tasks=["mqar", "lm"], preset_name="quick", speed=False, overrides=TINY)
    serial = compare(out=tmp_path / "serial", jobs=1, **kw)
    parallel = compare(out=tmp_path / "parallel", jobs=2, **kw)
    want, got = _run_numbers(serial), _run_numbers(parallel)
    assert len(want) == 8 and got == want
    assert json.loads((tmp_path / "parallel" / "results.json").read_text())["finished"]


def test_parallel_worker_without_the_layer_reports_it(tmp_path):
    """A layer registered only in this process (not an installed plugin) fails in its cell, with the
    reason, when the workers cannot see it; the other cells complete."""
    seqzoo.register_plugin(_NaNPlugin, name="nan-harness-test")
    try:
        res = compare(layers=["rnn", "nan_layer_harness_test"], backbones=["transformer"], tasks=["mqar"],
                      preset_name="quick", out=tmp_path, speed=False, overrides=TINY, jobs=2)
    finally:
        seqzoo.unregister_plugin("nan-harness-test")
    assert res["cells"]["rnn/transformer"]["status"] == "ok"
    bad = res["cells"]["nan_layer_harness_test/transformer"]
    assert bad["status"] == "failed" and "nan_layer_harness_test" in json.dumps(bad["errors"])
