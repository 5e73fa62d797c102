"""The speed harness: prefill and decode latency, forward+backward time, peak memory, achieved FLOP/s.

Every figure is the median of ``repeats`` timed calls after ``warmup`` untimed ones, with the
interquartile range and min/max; CUDA timings synchronise before reading the clock. FLOP counts are
analytic, declared by each layer (``SequenceLayer.flops``, its formula in its docstring); they are compared with the fp32
matmul peak measured in the same run, so the fraction of peak does not depend on the machine's
nominal figures. CPU peak memory is the RSS high-water mark of a fresh subprocess per measurement.
"""

from __future__ import annotations

import json
import logging
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
    "matmul_peak_stats",
    "rss_now",
    "reset_peak_rss",
    "peak_rss",
    "PeakRSS",
    "layer_flops",
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
    inner: int = 1,
) -> dict[Any, dict[str, float]]:
    """``timeit`` for several functions called in turn within each repeat (after ``warmup`` rounds), so
    a slow phase of a shared machine hits them alike and their ratios hold: {key: summary}. With
    ``max_seconds``, stops after the round in which that much time was spent (at least one round).
    ``clock``: ``time.perf_counter`` (wall) or ``time.process_time`` (this process's CPU time, which other
    processes' load hardly changes); ``inner`` calls per timing (the time is per call)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[Any, list[float]] = {key: [] for key in fns}
    spent = 0.0
    for _ in range(max(repeats, 1)):
        for key, fn in fns.items():
            t0 = clock()
            for _ in range(inner):
                fn()
            _sync(device)
            times[key].append((clock() - t0) / inner)
            spent += times[key][-1] * inner
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
    """Achieved fp32 GFLOP/s of an n×n matmul (the machine's practical peak, measured now): the best of
    ``matmul_peak_stats``."""
    return matmul_peak_stats(device, n=n, repeats=repeats)["gflops_best"]


def matmul_peak_stats(device="cpu", *, n: int | None = None, repeats: int = 5,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """fp32 GFLOP/s of an n×n @ n×n matmul after warm-up: ``gflops_median`` and ``gflops_best`` of
    ``repeats`` (n: 4096 on CUDA, 1024 on the CPU by default)."""
    n = n or (4096 if torch.device(device).type == "cuda" else 1024)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t = time_in_turn({0: lambda: a @ b}, repeats=repeats, warmup=2, device=device, clock=clock)[0]
    flops = 2 * n**3
    return {"n": n, "gflops_median": flops / t["median"] / 1e9, "gflops_best": flops / t["min"] / 1e9}


# --- memory: the RSS high-water mark of a process -------------------------------------------------------
def rss_now() -> int:
    """Resident set size of this process now, in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ``clear_refs`` 5), so that what ran before (imports,
    set-up) does not mask the peak; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss(*, since_reset: bool) -> int:
    """The RSS high-water mark in bytes: ``VmHWM`` (since the last ``reset_peak_rss``) when
    ``since_reset``, else ``ru_maxrss`` (the process's lifetime mark)."""
    if since_reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.peak_mb`` (the high-water mark above the RSS at entry),
    ``m.baseline_mb`` and ``m.source`` (how the peak was read)."""

    def __enter__(self) -> PeakRSS:
        self.base = rss_now()
        self.exact = reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        peak = peak_rss(since_reset=self.exact)
        self.peak_mb = max(peak - self.base, 0) / 2**20
        self.baseline_mb = self.base / 2**20
        self.source = "VmHWM after clear_refs" if self.exact else "ru_maxrss (lifetime high-water mark)"


# --- FLOP counts: declared by each layer ------------------------------------------------------------------
def layer_flops(layer: torch.nn.Module, seq_len: int) -> tuple[float, str]:
    """Forward FLOPs of ``layer`` on one sequence of ``seq_len`` tokens, and the formula used: the layer's
    own ``flops(T)`` (``SequenceLayer.flops``; the first line of its docstring is the formula), or
    ``2·params·T`` (the matmul FLOPs of its weights) for a module without one."""
    method = getattr(layer, "flops", None)
    if callable(method):
        doc = (getattr(type(layer).flops, "__doc__", None) or "").strip().splitlines()
        formula = doc[0].split(":")[0].strip() if doc else f"{type(layer).__name__}.flops"
        return float(method(seq_len)), formula
    return 2.0 * sum(p.numel() for p in layer.parameters()) * seq_len, "2·params·T (generic)"


# --- building and running ----------------------------------------------------------------------------
def make_layer(name: str, d_model: int, heads: int | None = None, **config) -> torch.nn.Module:
    """A registered layer with ``num_heads=heads`` when the layer has that option."""
    from ..registry import create_layer, layer_spec

    if heads is not None and "num_heads" in layer_spec(name).field_names():
        config.setdefault("num_heads", heads)
    return create_layer(name, d_model, **config)


def _decode_timer(module, prompt, token, steps: int) -> Callable[[], None]:
    """A function that runs ``steps`` decode steps from the state after ``prompt``, as generation does:
    through the layer's decoder (a language model: its layers' decoders)."""
    with torch.no_grad():
        _, state = module(prompt)
    if hasattr(module, "decoders"):  # a LanguageModel
        decoders = module.decoders(token.shape[0])
        step = lambda tok, s: module.step(tok, s, decoders=decoders)  # noqa: E731
    else:
        step = module.decoder(token.shape[0]).step

    def run():
        with torch.no_grad():
            s = state
            for _ in range(steps):
                _, s = step(token, s)

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
    def run() -> None:
        if spec["backward"]:
            y, _ = layer(x)
            y.square().mean().backward()
        else:
            with torch.no_grad():
                layer(x)

    if not cuda:
        with PeakRSS() as m:
            run()
        return {"peak_mb": m.peak_mb, "baseline_mb": m.baseline_mb}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
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

    def flops(T):
        return layer_flops(layer, T)[0]

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
        flops_formula=layer_flops(layer, 1)[1],
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-probe":
        torch.set_num_threads(1)
        print(json.dumps(_memory_probe(json.loads(sys.argv[2]))))
    else:
        raise SystemExit("usage: python -m seqzoo.bench.speed --memory-probe JSON (internal)")
