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
