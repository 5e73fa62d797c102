"""``seqzoo compare``: every layer in every backbone, parameter-matched, one recipe, one table.

A run is a grid of units — (layer, backbone, task, d_model, learning rate) trainings and one speed
sweep per (layer, backbone) — each written into ``results.json`` (atomically) as soon as it ends, so
an interrupted run keeps everything finished and ``resume=True`` skips it. A unit that raises or
produces a non-finite loss is recorded with the reason and the rest of the grid still runs.
"""

from __future__ import annotations

import copy
import logging
import signal
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..backbones import BACKBONES, create_model, default_intermediate_size
from ..registry import layer_spec, list_layers, task_spec
from .speed import bench_model
from .store import machine_info, read_json, versions, write_json
from .tasks import make_task
from .train import Interrupted, TrainConfig, model_state_size, train

log = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "preset",
    "compare",
    "match_intermediate_size",
    "non_embedding_params",
    "cell_key",
    "RECIPE",
]

RECIPE = {
    "optimizer": "AdamW",
    "betas": [0.9, 0.95],
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "schedule": "linear warmup then cosine decay to 0.1·lr",
}


def _mqar_paper() -> dict:
    """The zoology / Based MQAR recipe (arXiv 2402.18668 figure 2; zoology's configs)."""
    vocab = 8192
    train_segments = [
        [64, 4, 100_000],
        [128, 8, 20_000],
        [256, 16, 20_000],
        [256, 32, 20_000],
        [256, 64, 20_000],
    ]
    test_segments = [
        [64, 4, 1000],
        [64, 8, 1000],
        [64, 16, 1000],
        [128, 32, 1000],
        [256, 64, 1000],
        [512, 128, 1000],
        [1024, 256, 1000],
    ]
    batch, epochs = 256, 32
    n_train = sum(s[2] for s in train_segments)
    return {
        "task_config": {"vocab_size": vocab, "train": train_segments, "test": test_segments},
        "d_models": [64, 128, 256, 512],
        "n_layers": 2,
        "batch_size": batch,
        "steps": epochs * n_train // batch,
        "warmup_frac": 0.1,
        "lrs": [float(f"{10**e:.3g}") for e in (-4.0, -10 / 3, -8 / 3, -2.0)],
        "eval_batch_size": 32,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "description": "seconds-long smoke run (tests): tiny widths, a few steps; numbers are not meaningful",
        "tasks": {
            "mqar": {
                "task_config": {"vocab_size": 64, "train": [[32, 4, 256]], "test": [[32, 4, 64]]},
                "d_models": [32],
                "n_layers": 1,
                "batch_size": 16,
                "steps": 6,
                "warmup_frac": 0.2,
                "lrs": [3e-3],
                "eval_batch_size": 64,
            },
            "lm": {
                "task_config": {"seq_len": 32, "max_train_bytes": 100_000, "num_eval": 8},
                "d_models": [32],
                "n_layers": 1,
                "batch_size": 8,
                "steps": 4,
                "warmup_frac": 0.2,
                "lrs": [3e-3],
                "eval_batch_size": 8,
            },
        },
        "speed": {
            "d_model": 32,
            "n_layers": 1,
            "lengths": [16, 32],
            "decode_positions": [8],
            "repeats": 1,
            "warmup": 0,
            "decode_steps": 2,
        },
        "reference_layer": "self_attention",
    },
    "default": {
        "description": "CPU-sized recipe: minutes on 2 cores for 7 layers × 2 backbones; one learning rate for "
        "every cell (no sweep)",
        "tasks": {
            "mqar": {
                "task_config": {
                    "vocab_size": 64,
                    "train": [[32, 4, 16384]],
                    "test": [[32, 4, 512]],
                    "random_non_queries": False,
                },
                "d_models": [64],
                "n_layers": 2,
                # many small steps rather than few large ones: for the same tokens and about the same
                # time, 1000 × 16 lets the recurrent layers learn recall that 250 × 64 does not (Mamba
                # backbone: linear attention 0.28 -> 0.99, TTT-MLP 0.28 -> 1.0)
                "batch_size": 16,
                "steps": 1000,
                "warmup_frac": 0.1,
                "lrs": [1e-2],
                "eval_batch_size": 256,
            },
            "lm": {
                "task_config": {"seq_len": 64, "num_eval": 64},
                "d_models": [64],
                "n_layers": 2,
                "batch_size": 16,
                "steps": 60,
                "warmup_frac": 0.1,
                "lrs": [1e-2],
                "eval_batch_size": 64,
            },
        },
        "speed": {
            "d_model": 64,
            "n_layers": 2,
            "lengths": [256, 1024, 4096],
            "decode_positions": [64, 1024],
            "repeats": 2,
            "warmup": 1,
            "decode_steps": 4,
        },
        "reference_layer": "self_attention",
    },
    "paper": {
        "description": "the zoology/Based MQAR sweep and the TTT paper's 125M LM (d 768, 12 layers, 12 heads); "
        "needs a GPU",
        "tasks": {
            "mqar": _mqar_paper(),
            "lm": {
                "task_config": {"seq_len": 2048, "num_eval": 256, "max_train_bytes": 10**12},
                "d_models": [768],
                "n_layers": 12,
                "layer_config": {"num_heads": 12},
                "batch_size": 256,
                "steps": 4800,
                "warmup_frac": 0.1,
                "lrs": [3e-3],
                "eval_batch_size": 8,
            },
        },
        "speed": {
            "d_model": 768,
            "n_layers": 12,
            "layer_config": {"num_heads": 12},
            "lengths": [1024, 4096, 16384],
            "decode_positions": [1024, 16384],
            "repeats": 5,
            "warmup": 2,
            "decode_steps": 16,
        },
        "reference_layer": "self_attention",
    },
}


def preset(name: str) -> dict[str, Any]:
    """A deep copy of a preset (``quick``, ``default``, ``paper``)."""
    if name not in PRESETS:
        raise ValueError(f"expected --preset in {sorted(PRESETS)}, got {name!r}")
    return copy.deepcopy(PRESETS[name])


def cell_key(layer: str, backbone: str) -> str:
    return f"{layer}/{backbone}"


def _lr_key(lr: float) -> str:
    return f"{lr:.3g}"


def _layer_config(layer: str, wanted: dict) -> dict:
    """The preset's layer options that this layer has (e.g. num_heads), the others dropped."""
    names = layer_spec(layer).field_names()
    return {k: v for k, v in wanted.items() if k in names}


def non_embedding_params(
    layer: str,
    backbone: str,
    *,
    d_model: int,
    n_layers: int,
    vocab_size: int,
    intermediate_size: int,
    layer_config: dict | None = None,
) -> int:
    """Parameters of the model minus its (tied) embedding, built on the meta device when possible."""
    kwargs = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        intermediate_size=intermediate_size,
        **(layer_config or {}),
    )
    try:
        with torch.device("meta"):
            model = create_model(layer, backbone, **kwargs)
    except Exception:  # noqa: BLE001 - some initialisers cannot run on meta tensors
        model = create_model(layer, backbone, **kwargs)
    return model.num_parameters(embeddings=False)


def match_intermediate_size(
    layer: str,
    backbone: str,
    target: int,
    *,
    d_model: int,
    n_layers: int,
    vocab_size: int,
    layer_config: dict | None = None,
) -> tuple[int, int]:
    """The SwiGLU width that brings the model's non-embedding parameters closest to ``target``.

    Returns ``(intermediate_size, params)``. Parameters are linear in the width (3·d·n_layers per unit).
    """
    base = default_intermediate_size(d_model)

    def count(i: int) -> int:
        return non_embedding_params(
            layer,
            backbone,
            d_model=d_model,
            n_layers=n_layers,
            vocab_size=vocab_size,
            intermediate_size=i,
            layer_config=layer_config,
        )

    p_base = count(base)
    per_unit = 3 * d_model * n_layers
    width = max(1, base + round((target - p_base) / per_unit))
    return width, count(width)


# --- the run -------------------------------------------------------------------------------------------
class _TermAsInterrupt:
    """SIGTERM raises KeyboardInterrupt (like Ctrl-C) while a comparison runs."""

    def __enter__(self):
        import threading

        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:300]


def compare(
    *,
    layers: list[str] | None = None,
    backbones: list[str] | None = None,
    tasks: list[str] | None = None,
    preset_name: str = "default",
    device: str = "cpu",
    seed: int = 0,
    out: str | Path = "seqzoo-results",
    resume: bool = False,
    data: str | None = None,
    speed: bool = True,
    overrides: dict | None = None,
    progress: Any = None,
    console: Any = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run the comparison and write ``out/results.json``; returns the results dict.

    ``jobs`` > 1 trains that many cells at once in worker processes (each with this process's torch
    thread count; the layers must come from installed plugins, which the workers load), then runs the
    speed sweep alone. Every cell's numbers are the same as with ``jobs=1``.

    ``progress`` is an optional ``rich.progress.Progress``; ``console`` an optional rich console for notes.
    ``overrides`` replaces preset entries (``{"tasks": {"mqar": {"steps": 10}}}``), for tests and sweeps.
    """
    cfg = preset(preset_name)
    if overrides:
        _deep_update(cfg, overrides)
    layers = list(layers or list_layers())
    for name in layers:
        layer_spec(name)  # unknown names fail here, with close matches
    backbones = list(backbones or BACKBONES)
    for b in backbones:
        if b not in BACKBONES:
            raise ValueError(f"expected backbones from {BACKBONES}, got {b!r}")
    tasks = list(tasks or cfg["tasks"])
    for t in tasks:
        task_spec(t)  # unknown names fail here, with close matches
        if t not in cfg["tasks"]:
            cfg["tasks"][t] = copy.deepcopy(cfg["tasks"].get("lm", {}))
            cfg["tasks"][t]["task_config"] = {}
    if data is not None and "lm" in cfg["tasks"]:
        cfg["tasks"]["lm"]["task_config"]["data"] = str(Path(data).expanduser().resolve())
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    path = outp / "results.json"
    run_config = {
        "preset": preset_name,
        "preset_config": cfg,
        "layers": layers,
        "backbones": backbones,
        "tasks": tasks,
        "seed": seed,
        "device": device,
        "recipe": RECIPE,
    }
    results = _load_or_new(path, run_config, resume, console)
    notes = console.print if console is not None else log.info
    t_start = time.perf_counter() - float(results.get("elapsed_s", 0.0))

    def save() -> None:
        results["updated"] = _now()
        results["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        write_json(path, results)

    # the units of work
    units: list[tuple[str, Callable[[], None], int]] = []
    cache_dir = outp / "cache"
    task_objs: dict[str, Any] = {}

    def get_task(name: str):
        if name not in task_objs:
            task_objs[name] = make_task(
                name, seed=seed, cache_dir=cache_dir, **cfg["tasks"][name]["task_config"]
            )
        return task_objs[name]

    for layer in layers:
        for backbone in backbones:
            cell = results["cells"].setdefault(
                cell_key(layer, backbone), {"layer": layer, "backbone": backbone, "tasks": {}}
            )
            for task in tasks:
                tcfg = cfg["tasks"][task]
                for d in tcfg["d_models"]:
                    for lr in tcfg["lrs"]:
                        units.append(
                            (
                                f"{layer}/{backbone} {task} d{d} lr {_lr_key(lr)}",
                                _train_unit(results, cell, task, d, lr, tcfg, seed, device, get_task, save,
                                            cache_dir),
                                tcfg["steps"],
                            )
                        )
            if speed:
                units.append(
                    (f"{layer}/{backbone} speed", _speed_unit(cell, cfg["speed"], seed, device, save), 0)
                )

    pending = [(label, fn, steps) for label, fn, steps in units if not getattr(fn, "done", lambda: False)()]
    skipped = len(units) - len(pending)
    if skipped:
        notes(f"resume: skipping {skipped} finished unit(s) of {len(units)} from {path}")
    overall = progress.add_task("seqzoo compare", total=len(pending)) if progress is not None else None
    with _TermAsInterrupt():
        training = [u for u in pending if hasattr(u[1], "prepare")]
        if jobs > 1 and len(training) > 1:  # training units in worker processes; the speed sweep alone after
            _run_parallel(training, jobs, torch.get_num_threads(), progress, overall)
            pending = [u for u in pending if not hasattr(u[1], "prepare")]
        for label, fn, steps in pending:
            sub = None
            if progress is not None:
                progress.update(overall, description=f"compare: {label}")
                sub = progress.add_task(f"  {label}", total=steps or 1)

            def on_step(step: int, loss: float, sub=sub, label=label) -> None:
                if progress is not None:
                    progress.update(sub, completed=step, description=f"  {label} loss {loss:.3f}")

            fn.on_step = on_step
            fn()
            if progress is not None:
                progress.remove_task(sub)
                progress.advance(overall)
    results["finished"] = _now()
    _summarise(results, cfg, tasks)
    save()
    return results


def _run_parallel(units: list, jobs: int, threads: int, progress, overall) -> None:
    """Train ``units`` (label, run, steps) in ``jobs`` spawned worker processes; each finished run is
    merged and saved here as it arrives. However this ends (Ctrl-C, SIGTERM, an error), every worker
    started is stopped before it returns; the runs that finished are kept."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    todo, done = ctx.Queue(), ctx.Queue()
    specs = {}
    for n, (label, fn, _) in enumerate(units):
        specs[n] = (label, fn)
        todo.put((n, fn.prepare()))
    workers = []
    try:
        for _ in range(min(jobs, len(units))):
            todo.put(None)  # one stop mark per worker
            workers.append(ctx.Process(target=_worker, args=(todo, done, threads), daemon=True))
            workers[-1].start()
        left = set(specs)
        while left:
            if progress is not None:
                shown = ", ".join(specs[n][0] for n in sorted(left)[:jobs])
                progress.update(overall, description=f"compare ({jobs} at once): {shown}")
            try:
                n, rec = done.get(timeout=0.5)
            except queue.Empty:
                if any(w.is_alive() for w in workers):
                    continue
                try:  # a last result may have arrived as the last worker exited
                    n, rec = done.get(timeout=1.0)
                except queue.Empty:
                    for n in sorted(left):  # the workers died without a word: each run says so
                        specs[n][1].finish({"status": "failed", "error": "training worker process died"})
                    return
            left.discard(n)
            specs[n][1].finish(rec)
            if progress is not None:
                progress.advance(overall)
    finally:
        started = [w for w in workers if w.pid is not None]  # an interrupt may land inside start()
        for w in started:
            if w.is_alive():
                w.terminate()
        for w in started:
            w.join()
        todo.cancel_join_thread()
        done.cancel_join_thread()


def _worker(todo, done, threads: int) -> None:
    """A training worker: runs prepared specs until the stop mark. The parent stops the workers on
    Ctrl-C / SIGTERM (and keeps only the runs that finished); a Ctrl-C that reaches the worker between
    runs is ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        while (item := todo.get()) is not None:
            n, spec = item
            done.put((n, _train_cell(spec)))
    except (KeyboardInterrupt, Interrupted):  # a Ctrl-C during a run (training handles it): stop quietly
        return


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def _load_or_new(path: Path, run_config: dict, resume: bool, console) -> dict:
    if resume and path.exists():
        old = read_json(path)
        if (
            old.get("run_config", {}).get("preset_config") != _json_roundtrip(run_config["preset_config"])
            or old.get("run_config", {}).get("seed") != run_config["seed"]
        ):
            raise ValueError(
                f"cannot resume {path}: it was made with a different preset, overrides or seed; "
                "use another --out or drop --resume"
            )
        for key in ("layers", "backbones", "tasks"):
            merged = old["run_config"][key] + [x for x in run_config[key] if x not in old["run_config"][key]]
            old["run_config"][key] = merged
        old["resumed"] = old.get("resumed", 0) + 1
        return old
    import seqzoo

    return {
        "schema": 1,
        "tool": f"seqzoo {seqzoo.__version__}",
        "started": _now(),
        "run_config": run_config,
        "versions": versions(),
        "machine": machine_info(run_config["device"]),
        "param_targets": {},
        "cells": {},
    }


def _json_roundtrip(obj):
    import json

    from .store import jsonable

    return json.loads(json.dumps(jsonable(obj)))


def _param_target(results: dict, task: str, d: int, tcfg: dict, vocab: int, layer_config: dict) -> int:
    """Non-embedding parameters of the reference model (self-attention, transformer, default MLP)."""
    key = f"{task}/d{d}"
    if key not in results["param_targets"]:
        ref = results["run_config"]["preset_config"].get("reference_layer", "self_attention")
        names = list_layers()
        ref = ref if ref in names else sorted(results["run_config"]["layers"])[0]
        n = non_embedding_params(
            ref,
            "transformer",
            d_model=d,
            n_layers=tcfg["n_layers"],
            vocab_size=vocab,
            intermediate_size=default_intermediate_size(d),
            layer_config=_layer_config(ref, layer_config),
        )
        results["param_targets"][key] = {"reference": f"{ref}/transformer", "params_non_embedding": n}
    return results["param_targets"][key]["params_non_embedding"]


def _train_unit(results, cell, task, d, lr, tcfg, seed, device, get_task, save, cache_dir):
    """One (cell, task, width, lr) training run: ``run()`` in this process, or ``prepare()`` (parameter
    matching, here), ``_train_cell(spec)`` (anywhere: a worker process) and ``finish(rec)`` (here)."""
    entry_path = (task, f"d{d}")

    def runs() -> dict:
        return cell["tasks"].setdefault(entry_path[0], {}).setdefault(entry_path[1], {"runs": {}})

    def done() -> bool:
        r = cell["tasks"].get(task, {}).get(f"d{d}", {}).get("runs", {}).get(_lr_key(lr))
        return r is not None and r.get("status") == "ok"

    def prepare() -> dict:
        """The run's spec; a failure here (a layer that cannot be built) is the run's recorded error."""
        spec: dict[str, Any] = {"task": task, "seed": seed, "cache_dir": str(cache_dir),
                                "task_kwargs": tcfg["task_config"], "lr": lr}
        try:
            t = get_task(task)
            layer_config = _layer_config(cell["layer"], tcfg.get("layer_config", {}))
            target = _param_target(results, task, d, tcfg, t.vocab_size, tcfg.get("layer_config", {}))
            width, n_params = match_intermediate_size(
                cell["layer"],
                cell["backbone"],
                target,
                d_model=d,
                n_layers=tcfg["n_layers"],
                vocab_size=t.vocab_size,
                layer_config=layer_config,
            )
            runs().update(
                intermediate_size=width,
                params_non_embedding=n_params,
                param_ratio=n_params / target,
                layer_config=layer_config,
            )
            steps = tcfg["steps"]
            spec["train_config"] = dict(
                layer=cell["layer"],
                backbone=cell["backbone"],
                task=task,
                task_config=tcfg["task_config"],
                d_model=d,
                n_layers=tcfg["n_layers"],
                intermediate_size=width,
                layer_config=layer_config,
                steps=steps,
                batch_size=tcfg["batch_size"],
                lr=lr,
                warmup_steps=int(tcfg["warmup_frac"] * steps),
                seed=seed,
                eval_batch_size=tcfg["eval_batch_size"],
                device=device,
            )
        except (KeyboardInterrupt, Interrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - a failing layer is reported in its cell
            spec["error"] = _error_text(exc)
        return spec

    def finish(rec: dict) -> None:
        if rec["status"] != "ok":
            log.warning("%s/%s %s failed: %s", cell["layer"], cell["backbone"], task, rec.get("error"))
        entry = runs()
        entry["runs"][_lr_key(lr)] = rec
        _pick_best(entry, get_task(task) if rec["status"] == "ok" else None)
        save()

    def run() -> None:
        finish(_train_cell(prepare(), task=get_task(task), on_step=run.on_step))

    run.done, run.prepare, run.finish = done, prepare, finish
    run.on_step = lambda s, loss: None
    return run


def _train_cell(spec: dict, task=None, on_step=None) -> dict:
    """Train and evaluate one prepared run (``spec`` from ``_train_unit``); returns its record. Runs in a
    worker process as well as in the caller's: ``task`` (built from the spec when None) and ``on_step``
    are the caller's conveniences. A layer that fails (raises, produces NaN) gives a failed record."""
    rec: dict[str, Any] = {"lr": spec["lr"], "status": "running"}
    if "error" in spec:  # the layer could not even be built
        return {**rec, "status": "failed", "error": spec["error"], "seconds": 0.0}
    t0 = time.perf_counter()
    try:
        if task is None:
            task = make_task(spec["task"], seed=spec["seed"], cache_dir=Path(spec["cache_dir"]), **spec["task_kwargs"])
        res = train(TrainConfig(**spec["train_config"]), task=task, on_step=on_step)
        stride = max(1, len(res.losses) // 100)
        rec.update(
            status="ok",
            metrics=res.metrics,
            params=res.params,
            params_non_embedding=res.params_non_embedding,
            state_size=res.state_size,
            loss_curve={"stride": stride, "loss": res.losses[::stride]},
            final_train_loss=res.losses[-1],
        )
    except (KeyboardInterrupt, Interrupted):
        raise
    except Exception as exc:  # noqa: BLE001 - a failing layer is reported in its cell
        rec.update(status="failed", error=_error_text(exc))
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return _json_roundtrip(rec)


def _pick_best(entry: dict, task) -> None:
    """The reported run of a (cell, task, width): the best score over the learning rates tried."""
    ok = [r for r in entry["runs"].values() if r.get("status") == "ok"]
    if not ok:
        entry["best"] = None
        return
    key = "accuracy" if any("accuracy" in r["metrics"] for r in ok) else "loss"
    sign = 1.0 if key == "accuracy" else -1.0
    best = max(ok, key=lambda r: sign * r["metrics"][key])
    entry["best"] = {"lr": best["lr"], "selected_by": key}


def _speed_unit(cell, scfg, seed, device, save):
    def done() -> bool:
        return cell.get("speed", {}).get("status") == "ok"

    def run() -> None:
        t0 = time.perf_counter()
        try:
            torch.manual_seed(seed)
            layer_config = _layer_config(cell["layer"], scfg.get("layer_config", {}))
            model = create_model(
                cell["layer"],
                cell["backbone"],
                vocab_size=256,
                d_model=scfg["d_model"],
                n_layers=scfg["n_layers"],
                **layer_config,
            ).to(device)
            gen = torch.Generator().manual_seed(seed)

            def make_input(T: int) -> torch.Tensor:
                return torch.randint(0, 256, (1, T), generator=gen).to(device)

            res = bench_model(
                model,
                make_input,
                lengths=scfg["lengths"],
                decode_positions=scfg["decode_positions"],
                decode_steps=scfg["decode_steps"],
                repeats=scfg["repeats"],
                warmup=scfg["warmup"],
                device=device,
                max_seconds=scfg.get("max_seconds", 10.0),
            )
            errors = [r["error"] for r in res["prefill"] + res["decode"] if "error" in r]
            state = {str(T): model_state_size(model, T) for T in scfg["lengths"]}
            cell["speed"] = {
                "status": "ok" if not errors else "failed",
                **res,
                "state_size": state,
                "d_model": scfg["d_model"],
                "n_layers": scfg["n_layers"],
                "batch": 1,
            }
            if errors:
                cell["speed"]["error"] = errors[0]
        except (KeyboardInterrupt, Interrupted):
            raise
        except Exception as exc:  # noqa: BLE001
            cell["speed"] = {"status": "failed", "error": _error_text(exc)}
        cell["speed"]["seconds"] = round(time.perf_counter() - t0, 2)
        save()

    run.done = done
    run.on_step = lambda s, loss: None
    return run


def _summarise(results: dict, cfg: dict, tasks: list[str]) -> None:
    """Per cell: status and the errors of its failed units."""
    for cell in results["cells"].values():
        errors = {}
        for task, by_width in cell.get("tasks", {}).items():
            for width, entry in by_width.items():
                for lr, r in entry.get("runs", {}).items():
                    if r.get("status") != "ok":
                        errors[f"{task} {width} lr {lr}"] = r.get("error", r.get("status"))
        if cell.get("speed", {}).get("status") == "failed":
            errors["speed"] = cell["speed"].get("error", "failed")
        cell["errors"] = errors
        cell["status"] = "ok" if not errors else "failed"


# --- reading results -----------------------------------------------------------------------------------
def best_run(cell: dict, task: str, width: str | None = None) -> tuple[str | None, dict | None]:
    """The reported run of a cell's task at ``width`` (default: the first width): (width, run)."""
    by_width = cell.get("tasks", {}).get(task, {})
    if not by_width:
        return None, None
    width = width or sorted(by_width, key=lambda w: int(w[1:]))[0]
    entry = by_width.get(width, {})
    best = entry.get("best")
    if best:
        return width, entry["runs"][_lr_key(best["lr"])]
    runs = list(entry.get("runs", {}).values())
    return width, (runs[0] if runs else None)


def lr_policy(cfg: dict) -> str:
    """How the learning rate was chosen, in words (for the table caption and the report)."""
    parts = []
    for task, t in cfg["tasks"].items():
        lrs = t["lrs"]
        parts.append(
            f"{task}: single lr {lrs[0]:g} (no sweep)"
            if len(lrs) == 1
            else f"{task}: best of lr sweep {', '.join(f'{x:g}' for x in lrs)}"
        )
    return "; ".join(parts)
