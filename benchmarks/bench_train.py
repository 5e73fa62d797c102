"""Training speed of every registered layer at the comparison harness's sizes, before/after in one run.

    python benchmarks/bench_train.py [--quick] [--layers NAME ...] [--json results.json] [--profile NAME]

A model of ``seqzoo compare``'s recipe (``seqzoo.bench.train``: d_model 64, 2 blocks, the transformer
backbone, the MQAR vocabulary of 256) trains on batches of 16 × 32 random tokens: forward, masked
cross-entropy, backward, gradient clipping at 1.0, an AdamW step. Each optimizer implementation is timed
in turn within every repeat, so the machine's drift hits them alike:

- ``for-loop``: ``torch.optim.AdamW`` with ``foreach=False`` (one small op per parameter per update
  term: the harness's optimizer before ``make_optimizer`` chose the fused one);
- ``fused``: ``fused=True`` (one kernel for every parameter), what ``make_optimizer`` builds on a CPU.

It reports training tokens per second (median step time after warm-up) and the ratio. ``--profile NAME``
prints the median time of each phase of that layer's step (forward with the loss, backward, clipping,
optimizer), timed directly, then the torch profiler's table of five steps (which ops run, how often). Both
optimizers give the same loss curve to float32 rounding (tests/test_train.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import seqzoo
from seqzoo.bench import speed
from seqzoo.bench.store import write_json
from seqzoo.bench.train import TrainConfig, build_model, make_optimizer

VOCAB = 256  # the MQAR task's vocabulary
FULL = dict(d_model=64, n_layers=2, batch=16, seq=32, repeats=9)
QUICK = dict(d_model=32, n_layers=1, batch=4, seq=16, repeats=2)
OPTIMIZERS = ("for-loop", "fused")


def _step_fn(layer: str, cfg: dict, optimizer: str, phases: dict | None = None):
    """One training step of a fresh model (the same initialisation for every optimizer). ``phases``: a
    dict that collects each phase's seconds (forward with the loss, backward, clipping, optimizer)."""
    tc = TrainConfig(layer=layer, d_model=cfg["d_model"], n_layers=cfg["n_layers"], batch_size=cfg["batch"])
    model = build_model(tc, VOCAB).train()
    opt = make_optimizer(model, tc, implementation=optimizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (cfg["batch"], cfg["seq"] + 1), generator=g)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    clock = time.perf_counter

    def step():
        t0 = clock()
        logits, _ = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        t1 = clock()
        loss.backward()
        t2 = clock()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t3 = clock()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = clock()
        if phases is not None:
            for name, a, b in (("forward", t0, t1), ("backward", t1, t2), ("clip", t2, t3), ("optimizer", t3, t4)):
                phases.setdefault(name, []).append(b - a)
        return loss.item()

    return step


def bench(layers: list[str], cfg: dict) -> list[dict]:
    rows = []
    tokens = cfg["batch"] * cfg["seq"]
    for layer in layers:
        try:
            fns = {opt: _step_fn(layer, cfg, opt) for opt in OPTIMIZERS}
        except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
            rows.append({"layer": layer, "error": f"{type(exc).__name__}: {exc}"})
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {layer}", file=sys.stderr, flush=True)
        res = speed.time_in_turn(fns, repeats=cfg["repeats"], warmup=2)
        row = {"layer": layer, "seconds": res}
        for opt in OPTIMIZERS:
            row[f"tokens_per_s_{opt}"] = tokens / res[opt]["median"]
        row["speedup"] = res["for-loop"]["median"] / res["fused"]["median"]
        rows.append(row)
    return rows


def phases(layer: str, cfg: dict, steps: int = 15) -> dict[str, float]:
    """Median seconds of each phase of a training step, timed directly (no profiler)."""
    times: dict[str, list[float]] = {}
    step = _step_fn(layer, cfg, "fused", times)
    for _ in range(3):
        step()
    times.clear()
    for _ in range(steps):
        step()
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def profile(layer: str, cfg: dict) -> str:
    """The phases timed directly, then the profiler's table of five steps. The profiler's own cost can fall
    unevenly on ops (on a loaded machine it booked ~15 ms a call to the fused AdamW kernel, which takes
    under 1 ms unprofiled), so read its table for which ops run and how often, the phase line for where
    the time goes."""
    from torch.profiler import profile as torch_profile

    medians = phases(layer, cfg)
    total = sum(medians.values())
    line = ", ".join(f"{k} {v * 1e3:.2f} ms ({v / total:.0%})" for k, v in medians.items())
    step = _step_fn(layer, cfg, "fused")
    for _ in range(3):
        step()
    with torch_profile() as p:
        for _ in range(5):
            step()
    return (f"{layer}: a step of {total * 1e3:.2f} ms (medians, {torch.get_num_threads()} threads): {line}\n\n"
            + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def report(rows: list[dict], cfg: dict) -> str:
    lines = [f"d_model {cfg['d_model']}, {cfg['n_layers']} blocks, batch {cfg['batch']} × {cfg['seq']} tokens, "
             f"{torch.get_num_threads()} threads; training tokens/s (median step)", "",
             f"{'layer':<26}{'for-loop AdamW':>16}{'fused AdamW':>13}{'ratio':>8}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['layer']:<26}  {r['error']}")
            continue
        lines.append(f"{r['layer']:<26}{r['tokens_per_s_for-loop']:>16.0f}{r['tokens_per_s_fused']:>13.0f}"
                     f"{r['speedup']:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--layers", nargs="+", help="layers to time (default: every registered layer)")
    parser.add_argument("--repeats", type=int, help="timed steps per optimizer (default 9)")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--profile", metavar="LAYER", help="print the profiler table of five steps of LAYER")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats:
        cfg["repeats"] = args.repeats
    if args.profile:
        print(profile(args.profile, cfg))
        return []
    layers = args.layers or seqzoo.list_layers()
    unknown = sorted(set(layers) - set(seqzoo.list_layers()))
    if unknown:
        parser.error(f"unknown layers {unknown}; registered: {seqzoo.list_layers()}")
    rows = bench(layers, cfg)
    print(report(rows, cfg))
    if args.json:
        write_json(args.json, {"benchmark": "bench_train", "config": cfg, "threads": torch.get_num_threads(),
                               "rows": rows})
    return rows


if __name__ == "__main__":
    main()
