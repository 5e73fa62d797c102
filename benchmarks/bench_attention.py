"""Speed of the attention layers against their floors (pytest-benchmark, or run as a script).

- ``self_attention`` forward vs bare SDPA plus the four projections (the layer adds RoPE, cache, reshapes);
  goal: within 1.15x.
- ``linear_attention`` chunked forward vs a loop of ``step`` over the tokens; goal: at least 5x faster
  at T=4096 (d_model 768, 12 heads, batch 1, float32).

Run ``pytest benchmarks/bench_attention.py --benchmark-only`` or, for the ratios measured in one run,
``python benchmarks/bench_attention.py [--threads N] [--cpu-time]``. On a shared machine use
``--threads 1 --cpu-time``: one thread avoids thread-pool stalls that otherwise dominate the small ops,
and process CPU time ignores the time other jobs hold the cores.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import seqzoo
from seqzoo.bench import speed
from seqzoo.testing import scan_steps

D_MODEL, HEADS = 768, 12
T_SA, T_LA = 2048, 4096


def _layer(name: str, **config):
    torch.manual_seed(0)
    return seqzoo.create_layer(name, D_MODEL, num_heads=HEADS, **config).eval()


def _input(T: int) -> torch.Tensor:
    return torch.randn(1, T, D_MODEL, generator=torch.Generator().manual_seed(0))


def bare_sdpa(layer, x: torch.Tensor) -> torch.Tensor:
    """The floor: the four projections and one causal SDPA call, nothing else."""
    B, T, C = x.shape
    heads = lambda t: t.view(B, T, HEADS, C // HEADS).transpose(1, 2)
    q, k, v = heads(layer.q_proj(x)), heads(layer.k_proj(x)), heads(layer.v_proj(x))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return layer.o_proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.fixture(scope="module")
def sa():
    return _layer("self_attention"), _input(T_SA)


@pytest.fixture(scope="module")
def la():
    return _layer("linear_attention"), _input(T_LA)


@torch.no_grad()
def test_self_attention_forward(benchmark, sa):
    layer, x = sa
    benchmark(layer, x)


@torch.no_grad()
def test_bare_sdpa_with_projections(benchmark, sa):
    layer, x = sa
    benchmark(bare_sdpa, layer, x)


@torch.no_grad()
def test_linear_attention_chunked(benchmark, la):
    layer, x = la
    benchmark(layer, x)


@torch.no_grad()
def test_linear_attention_token_loop(benchmark, la):
    layer, x = la
    benchmark.pedantic(scan_steps, args=(layer, x), rounds=1, iterations=1)


def _interleaved_medians(fns: dict, repeats: int, clock=time.perf_counter, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, the functions run in turn in every repeat (so that a
    shared machine's load falls on all of them alike; ``seqzoo.bench.speed.time_in_turn``)."""
    times = speed.time_in_turn(fns, repeats=repeats, warmup=1, clock=clock, inner=inner)
    return {name: t["median"] for name, t in times.items()}


@torch.no_grad()
def main(sa_lengths=(2048, 4096), repeats: int = 7, clock=time.perf_counter) -> None:
    """Print the two ratios. ``clock=time.process_time`` with one thread counts only this process's
    CPU time, which is what to compare on a machine shared with other jobs."""
    layer = _layer("self_attention")
    for T in sa_lengths:
        x = _input(T)
        t = _interleaved_medians(
            {"layer": lambda x=x: layer(x), "bare": lambda x=x: bare_sdpa(layer, x)}, repeats, clock
        )
        print(
            f"self_attention T={T}: layer {t['layer'] * 1e3:.1f} ms, bare SDPA + projections "
            f"{t['bare'] * 1e3:.1f} ms, ratio {t['layer'] / t['bare']:.3f} (goal <= 1.15)"
        )
    layer, x = _layer("linear_attention"), _input(T_LA)
    t_chunk = _interleaved_medians({"chunked": lambda: layer(x)}, repeats, clock)["chunked"]
    t0 = clock()
    scan_steps(layer, x)  # one pass: it is the slow side
    t_loop = clock() - t0
    print(
        f"linear_attention T={T_LA}: chunked {t_chunk * 1e3:.1f} ms, token loop {t_loop * 1e3:.1f} ms, "
        f"speed-up {t_loop / t_chunk:.1f}x (goal >= 5)"
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--cpu-time", action="store_true", help="time with process CPU time (use with --threads 1)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, float32, batch 1, d_model {D_MODEL}, "
        f"{'CPU' if args.cpu_time else 'wall'} time"
    )
    main(repeats=args.repeats, clock=clock)
