"""The speed harness: prefill and decode latency, forward+backward time, peak memory, achieved FLOP/s.

Every figure is the median of ``repeats`` timed calls after ``warmup`` untimed ones, with the
interquartile range and min/max; CUDA timings synchronise before reading the clock. FLOP counts are
analytic and approximate (``FLOPS`` below states each formula); they are compared with the fp32
matmul peak measured in the same run, so the fraction of peak does not depend on the machine's
nominal figures. CPU peak memory is the RSS high-water mark of a fresh subprocess per measurement.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = [
    "timeit",
    "time_in_turn",
    "matmul_peak",
    "layer_flops",
    "FLOPS",
    "bench_layer",
    "bench_model",
    "make_layer",
    "peak_memory",
]


# --- timing -------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timeit(
    fn: Callable[[], Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device="cpu",
    max_seconds: float | None = None,
) -> dict[str, float]:
    """Seconds per call of ``fn``: median, quartiles, min, max over ``repeats`` calls after warm-up.

    With ``max_seconds``, stops repeating once that much time was spent (at least one timed call).
    """
    return time_in_turn({None: fn}, repeats=repeats, warmup=warmup, device=device, max_seconds=max_seconds)[None]


def time_in_turn(
    fns: dict[Any, Callable[[], Any]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device="cpu",
    clock: Callable[[], float] = time.perf_counter,
    max_seconds: float | None = None,
) -> dict[Any, dict[str, float]]:
    """``timeit`` for several functions called in turn within each repeat (after ``warmup`` rounds), so
    a slow phase of a shared machine hits them alike and their ratios hold: {key: summary}. With
    ``max_seconds``, stops after the round in which that much time was spent (at least one round)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[Any, list[float]] = {key: [] for key in fns}
    spent = 0.0
    for _ in range(max(repeats, 1)):
        for key, fn in fns.items():
            t0 = clock()
            fn()
            _sync(device)
            times[key].append(clock() - t0)
            spent += times[key][-1]
        if max_seconds is not None and spent > max_seconds:
            break
    return {key: summarize(ts) for key, ts in times.items()}


def summarize(times: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of a list of seconds."""
    times = sorted(times)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {
        "median": statistics.median(times),
        "q1": q[0],
        "q3": q[2],
        "min": times[0],
        "max": times[-1],
        "n": len(times),
    }


def matmul_peak(device="cpu", *, n: int | None = None, repeats: int = 5) -> float:
    """Achieved fp32 GFLOP/s of an n×n matmul (the machine's practical peak, measured now)."""
    n = n or (4096 if torch.device(device).type == "cuda" else 1024)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t = timeit(lambda: a @ b, repeats=repeats, warmup=2, device=device)
    return 2 * n**3 / t["min"] / 1e9


# --- analytic FLOP counts (forward, one sequence of T tokens) ----------------------------------------------
def _opt(cfg: dict, key: str, default):
    v = cfg.get(key)
    return default if v is None else v


def _rnn(T, d, cfg):
    n = _opt(cfg, "state_dim", d)
    return 2 * T * (d * n + n * n + n * d + d * d)


def _softmax_attention(T, d, cfg):
    return 2 * T * 4 * d * d + 2 * T * T * d  # q,k,v,o projections + causal QKᵀ and AV (half of T² each)


def _linear_attention(T, d, cfg):
    dh = d // _opt(cfg, "num_heads", 4)
    return 2 * T * 4 * d * d + 4 * T * d * dh  # projections + per head: S += k vᵀ, y = q S (2·dh² each)


def _mamba(T, d, cfg):
    E = _opt(cfg, "expand", 2) * d
    N = _opt(cfg, "d_state", 16)
    K = _opt(cfg, "d_conv", 4)
    R = cfg.get("dt_rank")
    R = math.ceil(d / 16) if R in (None, "auto") else int(R)
    proj = 2 * T * (d * 2 * E + E * (R + 2 * N) + R * E + E * d)  # in_proj, x_proj, dt_proj, out_proj
    return proj + 2 * T * E * K + 9 * T * E * N  # conv + selective scan (discretise, update, read out)


def _ttt(hidden_mult: int):
    def flops(T, d, cfg):
        H = _opt(cfg, "num_heads", 4)
        dh = d // H
        b = _opt(cfg, "mini_batch_size", 16)
        inner = hidden_mult * dh * dh  # parameters of the inner model per head
        # per head and token: f(k) forward, its gradient, the output with the updated weights (2 FLOPs
        # per weight each), plus the within-mini-batch attention-like terms of the dual form
        per_token = H * (3 * 2 * inner + 2 * 2 * b * dh)
        return 2 * T * 4 * d * d + T * per_token

    return flops


FLOPS: dict[str, tuple[Callable[[int, int, dict], float], str]] = {
    "rnn": (_rnn, "2T(2dn + n² + d²)"),
    "self_attention": (_softmax_attention, "8Td² + 2T²d"),
    "ttt_nw": (_softmax_attention, "8Td² + 2T²d"),
    "linear_attention": (_linear_attention, "8Td² + 4Td·d_head"),
    "mamba": (_mamba, "2T(2dE + E(R+2N) + RE + Ed) + 2TEK + 9TEN"),
    "ttt_linear": (_ttt(1), "8Td² + T·H(6d_h² + 4b·d_h)"),
    "ttt_mlp": (_ttt(8), "8Td² + T·H(48d_h² + 4b·d_h)"),
}


def layer_flops(
    name: str, T: int, d_model: int, layer: torch.nn.Module | None = None, **config
) -> tuple[float, str]:
    """Approximate forward FLOPs of ``name`` on one sequence of T tokens, and the formula used.

    Layers without a formula count ``2·params·T`` (the matmul FLOPs of their weights).
    """
    if name in FLOPS:
        fn, text = FLOPS[name]
        return float(fn(T, d_model, config)), text
    if layer is None:
        return float("nan"), "unknown"
    return 2.0 * sum(p.numel() for p in layer.parameters()) * T, "2·params·T (generic)"


# --- building and running ----------------------------------------------------------------------------
def make_layer(name: str, d_model: int, heads: int | None = None, **config) -> torch.nn.Module:
    """A registered layer with ``num_heads=heads`` when the layer has that option."""
    from ..registry import create_layer, layer_spec

    if heads is not None and "num_heads" in layer_spec(name).field_names():
        config.setdefault("num_heads", heads)
    return create_layer(name, d_model, **config)


def _decode_timer(module, prompt, token, steps: int) -> Callable[[], None]:
    """A function that runs ``steps`` decode steps from the state after ``prompt``."""
    with torch.no_grad():
        _, state = module(prompt)

    def run():
        with torch.no_grad():
            s = state
            for _ in range(steps):
                _, s = module.step(token, s)

    return run


def bench_model(
    module: torch.nn.Module,
    make_input: Callable[[int], torch.Tensor],
    *,
    lengths: list[int],
    decode_positions: list[int] = (),
    decode_steps: int = 8,
    repeats: int = 3,
    warmup: int = 1,
    backward: bool = False,
    device="cpu",
    max_seconds: float = 20.0,
    flops: Callable[[int], float] | None = None,
    peak_gflops: float | None = None,
) -> dict:
    """Prefill (and optionally forward+backward) per length, decode per position, for any module with
    the contract's ``forward(x) -> (y, state)`` and ``step(x_t, state)``. ``make_input(T)`` gives a batch.

    A measurement that raises is recorded with its error; lengths after one slower than ``max_seconds``
    are skipped (recorded as such).
    """
    out: dict[str, Any] = {"prefill": [], "decode": []}
    too_slow = False
    module.eval()
    for T in lengths:
        row: dict[str, Any] = {"T": T}
        if too_slow:
            row["skipped"] = f"previous length took over {max_seconds:g} s"
            out["prefill"].append(row)
            continue
        try:
            x = make_input(T)
            batch = x.shape[0]

            def fwd(x=x):
                with torch.no_grad():
                    module(x)

            t = timeit(fwd, repeats=repeats, warmup=warmup, device=device, max_seconds=max_seconds)
            row.update(
                seconds=t, ms_per_token=1e3 * t["median"] / (batch * T), tokens_per_s=batch * T / t["median"]
            )
            if flops is not None:
                f = flops(T) * batch
                row["gflops"] = f / t["median"] / 1e9
                if peak_gflops:
                    row["fraction_of_peak"] = row["gflops"] / peak_gflops
            if backward:
                module.train()

                def fwd_bwd(x=x):
                    y, _ = module(x)
                    y.float().square().mean().backward()

                tb = timeit(fwd_bwd, repeats=repeats, warmup=warmup, device=device, max_seconds=max_seconds)
                module.zero_grad(set_to_none=True)
                module.eval()
                row["fwd_bwd_seconds"] = tb
                if flops is not None:
                    row["fwd_bwd_gflops"] = 3 * flops(T) * batch / tb["median"] / 1e9
            too_slow = t["median"] > max_seconds
        except Exception as exc:  # noqa: BLE001 - one failing length is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        out["prefill"].append(row)
    # decode: the positions timed in turn within each repeat, so their ratio holds on a busy machine
    rows = [{"position": P} for P in decode_positions]
    runs = {}
    for i, P in enumerate(decode_positions):
        try:
            x = make_input(P + 1)
            runs[i] = _decode_timer(module, x[:, :P], x[:, P], decode_steps)
        except Exception as exc:  # noqa: BLE001
            rows[i]["error"] = f"{type(exc).__name__}: {exc}"[:300]
    if runs:
        try:
            times = time_in_turn(runs, repeats=repeats, warmup=warmup, device=device, max_seconds=max_seconds)
        except Exception as exc:  # noqa: BLE001 - a step that raises is reported for every position timed
            for i in runs:
                rows[i]["error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            for i, t in times.items():
                rows[i].update(seconds=t, ms_per_token=1e3 * t["median"] / decode_steps, steps=decode_steps)
    out["decode"] = rows
    return out


def peak_memory(
    name: str,
    d_model: int,
    heads: int | None,
    batch: int,
    T: int,
    device="cpu",
    layer_config: dict | None = None,
    backward: bool = False,
) -> dict[str, float]:
    """Peak memory of one forward (or forward+backward) in MB above the baseline after setup.

    CPU: the RSS high-water mark (``resource.getrusage``) of a fresh subprocess; CUDA:
    ``torch.cuda.max_memory_allocated`` in this process.
    """
    spec = {
        "name": name,
        "d_model": d_model,
        "heads": heads,
        "batch": batch,
        "T": T,
        "device": device,
        "layer_config": layer_config or {},
        "backward": backward,
    }
    if torch.device(device).type == "cuda":
        return _memory_probe(spec)
    proc = subprocess.run(
        [sys.executable, "-m", "seqzoo.bench.speed", "--memory-probe", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"memory probe failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_probe(spec: dict) -> dict[str, float]:
    device = spec["device"]
    torch.manual_seed(0)
    layer = make_layer(spec["name"], spec["d_model"], spec["heads"], **spec["layer_config"]).to(device)
    x = torch.randn(spec["batch"], spec["T"], spec["d_model"], device=device, requires_grad=spec["backward"])
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        import resource

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if spec["backward"]:
        y, _ = layer(x)
        y.square().mean().backward()
    else:
        with torch.no_grad():
            layer(x)
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mb": max(peak - base, 0) / 2**20, "baseline_mb": base / 2**20}


def bench_layer(
    name: str,
    *,
    d_model: int = 64,
    heads: int | None = 4,
    batch: int = 1,
    lengths: list[int] = (512, 1024, 2048, 4096, 8192, 16384),
    decode_positions: list[int] = (64, 8192),
    repeats: int = 5,
    warmup: int = 1,
    device="cpu",
    backward: bool = True,
    memory: bool = True,
    max_seconds: float = 20.0,
    peak_gflops: float | None = None,
    layer_config: dict | None = None,
) -> dict:
    """Every speed figure of one registered layer (see the module docstring)."""
    layer_config = dict(layer_config or {})
    torch.manual_seed(0)
    layer = make_layer(name, d_model, heads, **layer_config).to(device)
    cfg = {**{f.name: f.default for f in _fields(name)}, **layer_config}
    if heads is not None:
        cfg.setdefault("num_heads", heads)
        cfg["num_heads"] = getattr(layer, "num_heads", cfg["num_heads"])

    def flops(T):
        return layer_flops(name, T, d_model, layer, **cfg)[0]

    res = bench_model(
        layer,
        lambda T: torch.randn(batch, T, d_model, device=device),
        lengths=list(lengths),
        decode_positions=list(decode_positions),
        repeats=repeats,
        warmup=warmup,
        backward=backward,
        device=device,
        max_seconds=max_seconds,
        flops=flops,
        peak_gflops=peak_gflops,
    )
    res.update(
        layer=name,
        d_model=d_model,
        heads=heads,
        batch=batch,
        params=sum(p.numel() for p in layer.parameters()),
        flops_formula=layer_flops(name, 1, d_model, layer, **cfg)[1],
        state_size={str(T): layer.state_size(T) for T in lengths},
    )
    if memory:
        for row in res["prefill"]:
            if "seconds" not in row:
                continue
            try:
                row["peak_mb"] = peak_memory(name, d_model, heads, batch, row["T"], device, layer_config)[
                    "peak_mb"
                ]
            except Exception as exc:  # noqa: BLE001
                row["peak_mb_error"] = str(exc)[:200]
    return res


def _fields(name: str):
    import dataclasses

    from ..registry import layer_spec

    return [f for f in layer_spec(name).fields if f.default is not dataclasses.MISSING]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-probe":
        torch.set_num_threads(1)
        print(json.dumps(_memory_probe(json.loads(sys.argv[2]))))
    else:
        raise SystemExit("usage: python -m seqzoo.bench.speed --memory-probe JSON (internal)")
