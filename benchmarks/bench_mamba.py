"""Speed of the ``mamba`` layer on CPU against Hugging Face's pure-torch ``MambaMixer`` (same weights).

Goals (d_model 768, batch 1, float32):
- ``forward`` at most 0.3x the time of HF's ``MambaMixer.slow_forward`` for T = 2048..8192;
- time per token at T = 16384 within 1.3x of that at T = 1024 (the scan is linear in T);
- one decode ``step`` under 0.5 ms (the figures also give the floor under it: the two weight mat-vecs
  of ``in_proj`` and ``out_proj`` alone, whose 14 MB of float32 weights are read once per token).

Run ``pytest benchmarks/bench_mamba.py`` (tiny sizes, pytest-benchmark) or, for the figures,
``python benchmarks/bench_mamba.py [--threads 1 --cpu-time] [--lengths 1024 2048 ...] [--hf-lengths ...]``.
On a shared machine use ``--threads 1 --cpu-time`` (see bench_attention.py). HF's slow path
materialises (B, d_inner, T, d_state) tensors: about 3 GB at T = 8192. Ours and HF's run in turn in
every repeat and the medians are reported.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import seqzoo
from seqzoo.bench import speed

sys.path.insert(0, str(Path(__file__).parent))
from bench_layers import hf_torch_forward  # noqa: E402

D_MODEL = 768


def _layer(d_model: int = D_MODEL, **config):
    torch.manual_seed(0)
    return seqzoo.create_layer("mamba", d_model, **config).eval()


def _hf_mixer(layer):
    """HF's ``MambaMixer`` carrying the same weights as ``layer``."""
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    logging.getLogger("transformers.models.mamba.modeling_mamba").setLevel(logging.ERROR)
    cfg = MambaConfig(hidden_size=layer.d_model, state_size=layer.d_state, conv_kernel=layer.d_conv,
                      expand=layer.config.expand, time_step_rank=layer.dt_rank)
    mixer = MambaMixer(cfg, layer_idx=0).eval()
    mixer.load_state_dict(layer.state_dict())
    return mixer


def _input(T: int, d_model: int = D_MODEL) -> torch.Tensor:
    return torch.randn(1, T, d_model, generator=torch.Generator().manual_seed(0))


# --- pytest-benchmark, tiny sizes --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    layer = _layer(64)
    return layer, _input(256, 64)


@torch.no_grad()
def test_mamba_forward(benchmark, tiny):
    layer, x = tiny
    benchmark(layer, x)


@torch.no_grad()
def test_mamba_step(benchmark, tiny):
    layer, x = tiny
    _, state = layer(x[:, :8])
    benchmark(layer.step, x[:, 8], state)


@torch.no_grad()
def test_hf_mixer_slow_forward(benchmark, tiny):
    pytest.importorskip("transformers")
    layer, x = tiny
    benchmark(hf_torch_forward(_hf_mixer(layer)), x)


# --- the figures -------------------------------------------------------------------------------------
def _interleaved_medians(fns: dict, repeats: int, clock=time.perf_counter, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, the functions run in turn in every repeat (so that a
    shared machine's load falls on all of them alike; ``seqzoo.bench.speed.time_in_turn``)."""
    times = speed.time_in_turn(fns, repeats=repeats, warmup=1, clock=clock, inner=inner)
    return {name: t["median"] for name, t in times.items()}


@torch.no_grad()
def main(lengths=(1024, 2048, 4096, 8192, 16384), hf_lengths=(2048, 4096, 8192), repeats: int = 3,
         clock=time.perf_counter) -> dict:
    """Print and return the figures: per-token forward times, the ratios to HF, the step time and the
    floor under it (the two weight mat-vecs alone)."""
    layer = _layer()
    mixer = _hf_mixer(layer) if hf_lengths else None
    out = {"forward_us_per_token": {}, "hf_us_per_token": {}, "ratio_to_hf": {}}
    for T in sorted(set(lengths) | set(hf_lengths)):
        x = _input(T)
        fns = {"ours": lambda x=x: layer(x)}
        if T in hf_lengths:
            fns["hf"] = lambda x=x: hf_torch_forward(mixer)(x)
        m = _interleaved_medians(fns, repeats, clock)
        ours = m["ours"]
        out["forward_us_per_token"][T] = ours / T * 1e6
        line = f"T={T:6d}: mamba.forward {ours * 1e3:8.1f} ms ({ours / T * 1e6:6.1f} us/token)"
        if T in hf_lengths:
            hf = m["hf"]
            out["hf_us_per_token"][T] = hf / T * 1e6
            out["ratio_to_hf"][T] = ours / hf
            line += f", HF slow_forward {hf * 1e3:8.1f} ms, ratio {ours / hf:.3f} (goal <= 0.3)"
        print(line, flush=True)
    per_token = out["forward_us_per_token"]
    if 1024 in per_token and 16384 in per_token:
        growth = per_token[16384] / per_token[1024]
        out["per_token_16k_over_1k"] = growth
        print(f"per-token time at 16k / at 1k: {growth:.2f} (goal <= 1.3)")
    x = _input(64)
    _, state = layer(x)
    u, v = x[:, -1].contiguous(), torch.randn(1, layer.d_inner)
    m = _interleaved_medians({
        "step": lambda decoder=layer.decoder(1): decoder.step(u, state),
        "matvecs": lambda: (F.linear(u, layer.in_proj.weight), F.linear(v, layer.out_proj.weight)),
    }, max(repeats, 30), clock, inner=20)
    out["step_ms"], out["matvec_floor_ms"] = m["step"] * 1e3, m["matvecs"] * 1e3
    print(f"decode step: {m['step'] * 1e3:.3f} ms (goal < 0.5); its two weight mat-vecs alone "
          f"(in_proj, out_proj): {m['matvecs'] * 1e3:.3f} ms")
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--hf-lengths", type=int, nargs="*", default=[2048, 4096, 8192])
    parser.add_argument("--cpu-time", action="store_true", help="time with process CPU time (use with --threads 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, float32, batch 1, "
          f"d_model {D_MODEL}, {'CPU' if args.cpu_time else 'wall'} time")
    main(args.lengths, args.hf_lengths, args.repeats, clock)
