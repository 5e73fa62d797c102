"""Smoke runs of ``bench_ttt.py`` and ``bench_layers.py`` at tiny sizes (pytest-benchmark), in seconds.

The full runs are ``python benchmarks/bench_ttt.py`` and ``python benchmarks/bench_layers.py`` (see
docs/benchmarks.md); these tests only keep their code paths alive and check the FLOP formula.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
import bench_decay  # noqa: E402
import bench_delta  # noqa: E402
import bench_layers  # noqa: E402
import bench_ttt  # noqa: E402
from official_ttt import make_official  # noqa: E402

import seqzoo  # noqa: E402

D, H, T = 64, 4, 64
ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1)


def _needs(name: str) -> None:
    """A built-in layer that is not registered is a broken install: the test fails, it is not skipped."""
    assert name in seqzoo.list_layers(), (
        f"built-in layer {name!r} is not registered (plugin failures: {seqzoo.plugin_failures()})")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: at these sizes threads only add synchronisation, badly so on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def x():
    return torch.randn(1, T, D, generator=torch.Generator().manual_seed(0))


# --- the FLOP formula the fraction-of-peak figures rest on ---------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_ttt_flops_equal_the_official_algorithms_counted_matmuls(kind):
    """TTT-Linear's and TTT-MLP's declared count equals torch's FLOP counter on the official
    implementation (projections, the η gate, the dual form), so GFLOP/s figures mean the algorithm's."""
    C, heads, b, L = 48, 3, 8, 32
    layer = make_official(kind, hidden_size=C, num_heads=heads, mini_batch_size=b)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(torch.randn(1, L, C))
    ours = seqzoo.create_layer(f"ttt_{kind}", C, num_heads=heads, mini_batch_size=b)
    assert ours.flops(L) == counter.get_total_flops()


def _counted_steps(layer, T: int, C: int) -> int:
    """torch's FLOP counter over T tokens of ``step`` (the recurrence itself, token by token)."""
    x = torch.randn(1, T, C)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        state = layer.init_state(1)
        for t in range(T):
            _, state = layer.step(x[:, t], state)
    return counter.get_total_flops()


def test_layer_flops_equal_counted_matmuls_of_the_recurrence():
    """Each built-in layer's declared count against torch's FLOP counter on its step loop; the counter
    sees matmuls only, so what a layer computes elementwise is added back, as stated per layer."""
    C, H, T = 48, 3, 32
    rnn = seqzoo.create_layer("rnn", C)
    assert rnn.flops(T) == _counted_steps(rnn, T, C)
    nw = seqzoo.create_layer("ttt_nw", C, num_heads=H)
    assert nw.flops(T) == _counted_steps(nw, T, C)
    # self-attention is the same function (Theorem 2); its fused attention kernel is invisible to the counter
    assert seqzoo.create_layer("self_attention", C, num_heads=H).flops(T) == nw.flops(T)
    la = seqzoo.create_layer("linear_attention", C, num_heads=H)
    outer_products = 2 * T * C * (C // H)  # S += φ(k)vᵀ: elementwise in step
    assert la.flops(T) == _counted_steps(la, T, C) + outer_products
    mamba = seqzoo.create_layer("mamba", C, use_kernels=False)
    E, N, K = mamba.d_inner, mamba.d_state, mamba.d_conv
    # the conv (2TEK) and exp(ΔA), its product with h and the sum (5TEN) are elementwise in step; the
    # counter sees the projections, Δx ⊗ B and C·h (2TEN each)
    assert mamba.flops(T) == _counted_steps(mamba, T, C) + 2 * T * E * K + 5 * T * E * N
    for name in ("deltanet", "gated_deltanet"):
        delta = seqzoo.create_layer(name, C, num_heads=H)
        widths = 2 * delta.key_dim + delta.value_dim
        # the short convs (2T·widths·conv_size) are elementwise in step; the counter sees the projections,
        # Sᵀk, the rank-1 update k uᵀ and Sᵀq
        assert delta.flops(T) == _counted_steps(delta, T, C) + 2 * T * widths * delta.config.conv_size, name
    longhorn = seqzoo.create_layer("longhorn", C)
    E, N, K = longhorn.d_inner, longhorn.d_state, longhorn.config.d_conv
    # the conv (2TEK) and the update's 6 elementwise operations per channel and state are not matmuls;
    # the counter sees the projections and the read-out s·q (2TEN)
    assert longhorn.flops(T) == _counted_steps(longhorn, T, C) + 2 * T * E * K + 6 * T * E * N


# --- pytest-benchmark smoke runs -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_official_forward(benchmark, kind, x):
    layer = make_official(kind, hidden_size=D, num_heads=H).eval()
    with torch.no_grad():
        y = benchmark.pedantic(layer, args=(x,), **ROUNDS)
    assert y.shape == x.shape


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_seqzoo_ttt_forward(benchmark, kind, x):
    _needs(f"ttt_{kind}")
    layer = seqzoo.create_layer(f"ttt_{kind}", D, num_heads=H).eval()
    with torch.no_grad():
        y, _ = benchmark.pedantic(layer, args=(x,), **ROUNDS)
    assert y.shape == x.shape


def test_seqzoo_ttt_linear_step(benchmark, x):
    _needs("ttt_linear")
    layer = seqzoo.create_layer("ttt_linear", D, num_heads=H).eval()
    with torch.no_grad():
        _, state = layer(x[:, :-1])
        y, _ = benchmark.pedantic(layer.step, args=(x[:, -1], state), **ROUNDS)
    assert y.shape == (1, D)


def test_hf_mamba_slow_forward(benchmark, x):
    _needs("mamba")
    pytest.importorskip("transformers")
    ours = seqzoo.create_layer("mamba", D).eval()
    hf = bench_layers.hf_mamba_mixer(ours, D, ours.config.d_state, ours.config.d_conv, ours.config.expand)
    with torch.no_grad():
        y = benchmark.pedantic(bench_layers.hf_torch_forward(hf), args=(x,), **ROUNDS)
        assert bench_layers.rel_err(ours(x)[0], y) < 1e-4


def test_mamba_forward(benchmark, x):
    _needs("mamba")
    layer = seqzoo.create_layer("mamba", D).eval()
    with torch.no_grad():
        y, _ = benchmark.pedantic(layer, args=(x,), **ROUNDS)
    assert y.shape == x.shape


def test_bare_sdpa_forward(benchmark, x):
    bare = bench_layers.BareAttention(D, H).eval()
    with torch.no_grad():
        y = benchmark.pedantic(bare, args=(x,), **ROUNDS)
    assert y.shape == x.shape


def test_self_attention_forward(benchmark, x):
    _needs("self_attention")
    layer = seqzoo.create_layer("self_attention", D, num_heads=H, rope=False).eval()
    bare = bench_layers.BareAttention(D, H).eval()
    layer.load_state_dict(bare.state_dict(), strict=True)
    with torch.no_grad():
        y, _ = benchmark.pedantic(layer, args=(x,), **ROUNDS)
        assert bench_layers.rel_err(y, bare(x)) < 1e-5


def test_linear_attention_chunked_forward(benchmark, x):
    _needs("linear_attention")
    layer = seqzoo.create_layer("linear_attention", D, num_heads=H).eval()
    with torch.no_grad():
        y, _ = benchmark.pedantic(layer, args=(x,), **ROUNDS)
    assert y.shape == x.shape


# --- the scripts themselves, at tiny sizes ---------------------------------------------------------------


def test_bench_ttt_quick_writes_json(tmp_path):
    out = tmp_path / "ttt.json"
    bench_ttt.main(
        ["--quick", "--lengths", "32", "64", "--sections", "prefill", "decode", "train", "--json", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["peak_gflops"] > 0
    assert {r["layer"] for r in result["train"]} == {"ttt_linear", "ttt_mlp"}
    assert all(r["ratio_vs_official"] > 0 and r["over_forward"] > 0 for r in result["train"])
    impls = {(r["layer"], r["impl"]) for r in result["prefill"]}
    assert ("ttt_linear", "official") in impls and ("ttt_mlp", "official") in impls
    assert all(r["us_per_token"] > 0 for r in result["prefill"])
    assert {g["goal"].split(" ")[0] for g in result["goals"]} >= {"ttt_linear", "ttt_mlp"}


def test_bench_delta_quick_writes_json(tmp_path):
    out = tmp_path / "delta.json"
    bench_delta.main(["--quick", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["forward"]) == set(bench_delta.LAYERS)
    assert all(r["ms"] > 0 for r in result["forward"].values())
    assert all(r["growth"] > 0 for r in result["decode"].values())


def test_bench_decay_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "decay.json"
    bench_decay.run(["--quick", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["forward"]) == set(bench_decay.ROWS)
    assert all(r["ms"] > 0 for r in result["forward"].values())
    assert "goal mamba2: forward / HF Mamba2Mixer" in capsys.readouterr().out


def test_bench_layers_quick_writes_json(tmp_path):
    out = tmp_path / "layers.json"
    bench_layers.main(["--quick", "--sections", "attention", "linear_attention", "--json", str(out)])
    result = json.loads(out.read_text())
    if "self_attention" in seqzoo.list_layers():
        assert any(
            r["layer"] == "self_attention" and r["rel_err"] < 1e-5 for r in result["rows"] if "rel_err" in r
        )
    assert len(result["goals"]) == 3


def test_memory_probe_in_subprocess():
    spec = {
        "cfg": {"d_model": 64, "num_heads": 4, "mini_batch_size": 16},
        "kind": "linear",
        "impl": "official",
        "mode": "prefill",
        "T": 2048,
    }
    r = bench_ttt.memory_probe(spec)
    assert "error" not in r, r.get("error")
    # the (B, T, C) activations alone are 2048 · 64 · 4 bytes = 0.5 MiB each, and several are alive at once
    assert 0.5 < r["peak_mb"] < 200, r


def test_bench_train_quick(tmp_path, capsys):
    import bench_train

    out = tmp_path / "train.json"
    rows = bench_train.main(["--quick", "--layers", "rnn", "ttt_linear", "--json", str(out)])
    assert [r["layer"] for r in rows] == ["rnn", "ttt_linear"]
    assert all(r["tokens_per_s_fused"] > 0 and r["tokens_per_s_for-loop"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"][0]["layer"] == "rnn"
    assert "fused AdamW" in capsys.readouterr().out
    medians = bench_train.phases("rnn", bench_train.QUICK, steps=3)
    assert list(medians) == ["forward", "backward", "clip", "optimizer"] and all(v > 0 for v in medians.values())
