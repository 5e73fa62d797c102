"""Smoke runs of the speed and comparison harnesses at tiny sizes, so the benchmark code cannot rot."""

from __future__ import annotations

import json

import pytest
import torch

import seqzoo
from seqzoo.bench.speed import bench_layer, layer_flops, matmul_peak, timeit
from seqzoo.cli import main

BUILTIN = {"rnn", "self_attention", "ttt_nw", "linear_attention", "mamba", "ttt_linear", "ttt_mlp", "deltanet",
           "gated_deltanet", "mesanet", "longhorn", "titans", "retnet", "gla", "hgrn2", "mamba2",
           "sliding_window_attention"}


def test_timeit_statistics():
    t = timeit(lambda: sum(range(1000)), repeats=5, warmup=1)
    assert t["n"] == 5 and t["min"] <= t["q1"] <= t["median"] <= t["q3"] <= t["max"]


def test_flop_counts_scale_as_stated():
    d = 64
    layers = {name: seqzoo.create_layer(name, d) for name in seqzoo.list_layers() if name in BUILTIN}
    assert set(layers) == BUILTIN  # every built-in layer declares its count
    for name in ("rnn", "linear_attention", "mamba", "ttt_linear", "ttt_mlp", "deltanet", "gated_deltanet", "mesanet",
                 "longhorn", "titans", "retnet", "gla", "hgrn2", "mamba2"):
        f1, f2 = layer_flops(layers[name], 1000)[0], layer_flops(layers[name], 2000)[0]
        assert f2 == pytest.approx(2 * f1), name  # linear in T
    for name in ("self_attention", "ttt_nw"):
        assert layer_flops(layers[name], 10)[0] == 8 * 10 * d * d + 2 * 10 * 11 * d  # projections + causal
    # TTT-Linear at 125M widths: about 5 MFLOP per token
    assert 4.5e6 < layer_flops(seqzoo.create_layer("ttt_linear", 768, num_heads=12), 1)[0] < 5.5e6
    assert layer_flops(layers["self_attention"], 1)[1] == "2T·Σ(projection weights) + 2T(T+1)·C"
    assert layer_flops(torch.nn.Linear(3, 5), 7) == (2.0 * 20 * 7, "2·params·T (generic)")  # bias included


def test_matmul_peak_is_positive():
    assert matmul_peak("cpu", n=128, repeats=2) > 0


def test_bench_layer_tiny(tiny_lengths):
    res = bench_layer(
        "rnn",
        d_model=16,
        heads=None,
        lengths=tiny_lengths,
        decode_positions=[8],
        repeats=2,
        memory=True,
        peak_gflops=100.0,
    )
    assert [r["T"] for r in res["prefill"]] == tiny_lengths
    for row in res["prefill"]:
        assert row["ms_per_token"] > 0 and row["gflops"] > 0 and "fwd_bwd_seconds" in row
        assert row["peak_mb"] >= 0
    assert res["decode"][0]["ms_per_token"] > 0
    assert res["flops_formula"] == "2T·Σ(weights of nn.Linear)"


def test_bench_cli_tiny(tmp_path, capsys, tiny_lengths):
    layers = [n for n in ("rnn", "self_attention") if n in seqzoo.list_layers()]
    rc = main(
        [
            "bench",
            "--layers",
            ",".join(layers),
            "--d-model",
            "16",
            "--heads",
            "2",
            "--lengths",
            "16,32",
            "--decode-positions",
            "8",
            "--repeats",
            "1",
            "--no-memory",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert set(res["layers"]) == set(layers) and res["matmul_peak_gflops"] > 0
    assert (tmp_path / "bench_latency.png").exists()
    assert "seqzoo bench" in capsys.readouterr().out


def test_compare_smoke(tmp_path):
    rc = main(
        [
            "compare",
            "--preset",
            "quick",
            "--layers",
            "rnn",
            "--backbones",
            "transformer",
            "--tasks",
            "mqar",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--override",
            json.dumps({"tasks": {"mqar": {"steps": 2}}, "speed": {"lengths": [8]}}),
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["cells"]["rnn/transformer"]["status"] == "ok"
