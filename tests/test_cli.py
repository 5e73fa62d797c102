"""The seqzoo command: list, info, plugins, check (exit codes and output)."""

import os
import subprocess
import sys
import textwrap

import pytest

from seqzoo.cli import main, parse_config


def run(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "seqzoo", *args], capture_output=True, text=True, env=e, timeout=300)


def test_parse_config_types():
    assert parse_config(["a=4", "b=true", "c=elu+1", "d=0.5", "e=None", "f=False"]) == {
        "a": 4, "b": True, "c": "elu+1", "d": 0.5, "e": None, "f": False}
    with pytest.raises(SystemExit):
        parse_config(["novalue"])


def test_list_shows_layers_and_state_sizes(capsys):
    assert main(["list", "--d-model", "32"]) == 0
    out = capsys.readouterr().out
    assert "rnn" in out and "32 @1k" in out


def test_info_shows_config(capsys):
    assert main(["info", "rnn"]) == 0
    out = capsys.readouterr().out
    assert "state_dim" in out and "plugin 'rnn'" in out
    assert main(["info", "rnnn"]) == 2
    assert "did you mean rnn" in capsys.readouterr().err


def test_check_passes_with_exit_0(capsys):
    assert main(["check", "rnn", "--config", "state_dim=12", "--d-model", "8"]) == 0
    assert "all 10 of 10" in capsys.readouterr().out


def test_check_bad_config_exit_2(capsys):
    assert main(["check", "rnn", "--config", "state_dimm=3"]) == 2
    assert "did you mean state_dim" in capsys.readouterr().err


def test_check_exit_1_and_plugins_report_for_third_party_packages(tmp_path):
    """A non-causal layer installed through an entry point fails `seqzoo check` with exit 1; a broken
    plugin beside it is listed by `seqzoo plugins` with its reason while everything else loads."""
    (tmp_path / "zoo_cli_peek.py").write_text(textwrap.dedent("""
        import torch, seqzoo
        from seqzoo_plugins.rnn import NaiveRNN

        class Peek(NaiveRNN):
            def forward(self, x, state=None):
                y, s = super().forward(x, state)
                return y + x.flip(1), s

        @seqzoo.hookimpl
        def register_layers(register):
            register("zoo_peek", Peek)
    """))
    (tmp_path / "zoo_cli_broken.py").write_text("import not_a_real_module_anywhere\n")
    for dist, ep, mod in (("zoo-peek", "peek", "zoo_cli_peek"), ("zoo-broken", "brk", "zoo_cli_broken")):
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[seqzoo]\n{ep} = {mod}\n")
    env = {"PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = run("check", "zoo_peek", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "causality" in r.stdout
    r = run("plugins", env=env)
    assert r.returncode == 0
    assert "brk" in r.stdout and "not_a_real_module_anywhere" in r.stdout
    assert "rnn" in r.stdout
    r = run("list", env=env)
    assert r.returncode == 0 and "zoo_peek" in r.stdout and "rnn" in r.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--layer", "rnn", "--steps", "-5"], "argument --steps: expected an integer >= 1, got -5"),
    (["train", "--layer", "rnn", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["train", "--layer", "rnn", "--lr", "nan"], "argument --lr: expected a positive finite number"),
    (["train", "--layer", "rnn", "--warmup", "-1"], "argument --warmup: expected an integer >= 0"),
    (["bench", "--lengths", "1k,0"], "argument --lengths: expected comma-separated positive integers"),
    (["bench", "--repeats", "two"], "argument --repeats: expected an integer, got 'two'"),
    (["compare", "--jobs", "0"], "argument --jobs: expected an integer >= 1, got 0"),
    (["eval", "some/folder", "--by-position", "--length", "0"], "argument --length: expected an integer >= 1"),
    (["eval", "some/folder", "--tasks", "x", "--limit", "-1"], "argument --limit: expected a positive finite"),
    (["eval", "some/folder", "--documents", "zero"], "argument --documents: expected an integer, got 'zero'"),
    (["eval", "some/folder", "--num-fewshot", "-2"], "argument --num-fewshot: expected an integer >= 0"),
    (["export", "run"], "the following arguments are required: folder"),
    (["export", "run", "out", "--tokenizer", "gpt9"], "unrecognized arguments: --tokenizer gpt9"),
])
def test_bad_numbers_are_refused_with_what_was_expected(args, message, capsys):
    """Out-of-range or malformed numbers stop the command before any work, with usage exit status 2 and a
    message naming the argument and what it takes (instead of a crash deep in training)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_train_refuses_a_bad_config_from_the_api():
    from seqzoo.bench.train import TrainConfig, train

    with pytest.raises(ValueError, match="expected steps an integer >= 1, got -5"):
        train(TrainConfig(layer="rnn", steps=-5))
    with pytest.raises(ValueError, match="expected lr a positive finite number"):
        train(TrainConfig(layer="rnn", lr=0.0))


def test_train_shows_a_bar_on_a_terminal_and_log_lines_elsewhere(monkeypatch, tmp_path):
    import io
    import json

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    args = ["train", "--layer", "rnn", "--task", "mqar", "--task-config", "vocab_size=32", "train=[[16,2,32]]",
            "test=[[16,2,8]]", "--d-model", "8", "--n-layers", "1", "--steps", "4", "--batch-size", "4",
            "--log-every", "1"]
    monkeypatch.setenv("SEQZOO_CACHE", str(tmp_path))
    for tty in (True, False):
        out = Terminal() if tty else io.StringIO()
        monkeypatch.setattr("sys.stdout", out)
        assert main(args) == 0
        text = out.getvalue()
        steps = [json.loads(line)["step"] for line in text.splitlines() if line.startswith('{"step"')]
        assert '"result"' in text
        if tty:
            assert steps == [] and "rnn (transformer) loss" in text and "4/4" in text
        else:
            assert steps == [1, 2, 3, 4] and "loss " not in text.replace('"loss"', "")
