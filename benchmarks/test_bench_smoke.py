"""Smoke runs of the speed and comparison harnesses at tiny sizes, so the benchmark code cannot rot."""

from __future__ import annotations

import json

import pytest

import seqzoo
from seqzoo.bench.speed import FLOPS, bench_layer, layer_flops, matmul_peak, timeit
from seqzoo.cli import main


def test_timeit_statistics():
    t = timeit(lambda: sum(range(1000)), repeats=5, warmup=1)
    assert t["n"] == 5 and t["min"] <= t["q1"] <= t["median"] <= t["q3"] <= t["max"]


def test_flop_formulas_scale_as_stated():
    d = 64
    for name in ("rnn", "linear_attention", "mamba", "ttt_linear", "ttt_mlp"):
        f1, _ = layer_flops(name, 1000, d)
        f2, _ = layer_flops(name, 2000, d)
        assert f2 == pytest.approx(2 * f1), name  # linear in T
    a1, _ = layer_flops("self_attention", 1000, d)
    a2, _ = layer_flops("self_attention", 2000, d)
    assert 2 < a2 / a1 < 4  # projections O(T) + attention O(T²)
    assert layer_flops("self_attention", 10, d)[0] == 8 * 10 * d * d + 2 * 100 * d
    # TTT-Linear at 125M widths: about 5 MFLOP per token (DESIGN §7)
    assert 4.5e6 < layer_flops("ttt_linear", 1, 768, num_heads=12)[0] < 5.5e6
    assert set(FLOPS) >= {
        "rnn",
        "self_attention",
        "linear_attention",
        "mamba",
        "ttt_linear",
        "ttt_mlp",
        "ttt_nw",
    }


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
    assert res["flops_formula"] == FLOPS["rnn"][1]


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
