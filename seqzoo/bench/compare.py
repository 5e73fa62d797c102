"""``seqzoo compare``: every layer in every backbone, parameter-matched, one recipe, one table.

A comparison is a grid of cells (layer, backbone; or a preset's named variants). For each cell, task and
width a :class:`Series` of training runs is spent as the preset says (``seqzoo.bench.presets``): a
learning-rate sweep with the first seed, ended early by a run that reaches the task's ``stop_at``, then
further seeds at the winning rate. Before the training, one speed sweep per cell. Every run is written into
``results.json`` (atomically) as soon as it ends, so an interrupted comparison keeps everything finished
and ``resume=True`` continues it. A run that raises or produces a non-finite loss is recorded with the
reason and the rest of the grid still runs. At the end the known claims the run can check are
evaluated from its numbers (``seqzoo.bench.claims``).

The recipes are in ``seqzoo.bench.presets``, the units of work (a ``Series`` per cell × task × width,
one run's preparation and training) in ``seqzoo.bench.runs``, the worker processes in
``seqzoo.bench.pool``; this module schedules them and keeps the results file.

``results.json``: ``cells[name]["tasks"][task]["d{width}"]`` holds ``runs`` (keyed ``"lr {lr} seed
{seed}"``, each recording its ``lr``, ``seed``, ``metrics``, ``steps``, ``stopped_at`` and ``evals``) and
``best`` (the winning ``lr``, the ``seeds`` run at it and, per scalar metric, mean/min/max/std over them);
``claims`` at the top level lists the verdicts.
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

from ..backbones import BACKBONES, create_model
from ..registry import layer_spec, list_layers, task_spec
from .pool import Pool
from .presets import PRESETS, RECIPE, preset, widths
from .runs import (
    Series,
    cell_key,
    cell_name,
    cell_series,
    error_text,
    json_roundtrip,
    layer_options,
    lr_key,
    match_intermediate_size,
    non_embedding_params,
    prepare_run,
    run_key,
    spread,
    train_run,
)
from .speed import bench_model
from .store import machine_info, read_json, versions, write_json
from .tasks import make_task, task_info, task_infos
from .train import Interrupted, model_state_size

log = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "preset",
    "compare",
    "match_intermediate_size",
    "non_embedding_params",
    "cell_key",
    "cell_name",
    "run_key",
    "RECIPE",
    "Series",
    "cell_series",
    "rerender",
    "spread",
    "best_run",
    "task_entry",
]


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
    data: str | dict | None = None,
    speed: bool = True,
    overrides: dict | None = None,
    progress: Any = None,
    console: Any = None,
    jobs: int = 1,
    log_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the comparison and write ``out/results.json``; returns the results dict.

    The speed sweep runs first, alone; then ``jobs`` > 1 trains that many runs at once in worker processes
    (each with this process's torch thread count; the layers must come from installed plugins, which the
    workers load). Every run's numbers are the same as with ``jobs=1``.

    ``progress`` is an optional ``rich.progress.Progress``; ``console`` an optional rich console for notes;
    ``log_line`` is called with one plain line per finished unit (for logs and pipes).
    ``overrides`` replaces preset entries (``{"tasks": {"mqar": {"steps": 10}}}``), for tests and sweeps.
    ``data``: a text file or folder for the tasks that take user data, or a dict of their data options
    (``{"data": ..., "tokenizer": ..., "data_split": ...}``, as ``seqzoo compare --data ... --tokenizer ...``).
    """
    cfg = preset(preset_name)
    if overrides:
        _deep_update(cfg, overrides)
    variants = cfg.get("variants")
    if variants is not None and (layers or backbones):
        raise ValueError(f"preset {preset_name!r} lists its own rows; drop --layers / --backbones")
    if variants is None:
        layers = list(layers or cfg.get("layers") or list_layers())
        backbones = list(backbones or BACKBONES)
        rows = [{"layer": la, "backbone": b, "layer_config": {}} for la in layers for b in backbones]
    else:
        rows = [dict(v) for v in variants]
        layers = sorted({v["layer"] for v in rows})
        backbones = sorted({v["backbone"] for v in rows})
    for b in backbones:
        if b not in BACKBONES:
            raise ValueError(f"expected backbones from {BACKBONES}, got {b!r}")
    for name in layers:
        layer_spec(name)  # unknown names fail here, with close matches
    tasks = list(tasks or cfg["tasks"])
    for t in tasks:
        task_spec(t)  # unknown names fail here, with close matches
        if t not in cfg["tasks"]:  # a task the preset does not name: its default recipe, the task's defaults
            recipe = cfg.get("task_defaults") or next(iter(cfg["tasks"].values()))
            cfg["tasks"][t] = {**copy.deepcopy(recipe), "task_config": {}}
    for t in tasks:
        tcfg = cfg["tasks"][t]
        for b in backbones:
            widths(tcfg, b)
        if not tcfg.get("lrs"):
            raise ValueError(f"expected at least one learning rate for task {t!r}")
        if int(tcfg.get("seeds", 1)) < 1:
            raise ValueError(f"expected seeds >= 1 for task {t!r}, got {tcfg.get('seeds')}")
    infos = {t: task_info(t) for t in tasks}
    if data is not None:
        takes = [t for t in tasks if infos[t]["data_option"]]
        if not takes:
            raise ValueError(f"--data: none of the tasks {tasks} takes user data")
        options = dict(data) if isinstance(data, dict) else {"data": str(Path(data).expanduser().resolve())}
        for t in takes:
            if options.get("streaming") and int(cfg["tasks"][t].get("seeds", 1)) > 1:
                raise ValueError(
                    f"a streamed dataset is read in one order, but the {preset_name!r} preset trains task {t!r} "
                    f"with {cfg['tasks'][t]['seeds']} seeds (each a further data order): drop --streaming (the "
                    "dataset is then read once and sampled), or use a preset with one seed"
                )
            tc = cfg["tasks"][t]["task_config"]
            if "data" in options:
                tc[infos[t]["data_option"]] = options["data"]
            tc.update({k: v for k, v in options.items() if k != "data"})
    if not cfg.get("speed"):
        speed = False
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
    results.setdefault("task_info", {}).update(infos)  # what the report reads of each task
    notes = console.print if console is not None else log.info
    t_start = time.perf_counter() - float(results.get("elapsed_s", 0.0))

    def save() -> None:
        results["updated"] = _now()
        results["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        write_json(path, results)

    cache_dir = outp / "cache"
    task_objs: dict[str, Any] = {}

    def get_task(name: str):
        if name not in task_objs:
            task_objs[name] = make_task(
                name, seed=seed, cache_dir=cache_dir, **cfg["tasks"][name]["task_config"]
            )
        return task_objs[name]

    series: list[Series] = []
    speed_cells: list[dict] = []
    for row in rows:
        key = row.get("name") or cell_key(row["layer"], row["backbone"])
        cell = results["cells"].setdefault(key, {"layer": row["layer"], "backbone": row["backbone"], "tasks": {}})
        if "name" in row:
            cell["variant"] = row["name"]
            cell["layer_config"] = row.get("layer_config", {})
        for task in tasks:
            t = get_task(task)
            for s in cell_series(cell, task, cfg["tasks"][task], seed, t.score_key, t.score_sign):
                entry = s.entry()
                # a resumed run retries what failed; what finished stays
                entry["runs"] = {k: r for k, r in entry["runs"].items() if r.get("status") == "ok"}
                series.append(s)
        if speed:
            speed_cells.append(cell)

    done_units = [0]
    clock = time.perf_counter()

    def finished(label: str, text: str) -> None:
        done_units[0] += 1
        if log_line is not None:
            log_line(f"[{done_units[0]} done, {time.perf_counter() - clock:.0f} s] {label}: {text}")

    with _TermAsInterrupt():
        # the speed sweep first: it is short, must run alone (no training beside it), and an interrupted
        # comparison then has its timings
        speed_todo = [c for c in speed_cells if c.get("speed", {}).get("status") != "ok"]
        if speed_cells and len(speed_todo) < len(speed_cells):
            notes(f"resume: {len(speed_cells) - len(speed_todo)} speed sweep(s) already finished")
        for cell in speed_todo:
            label = f"{cell_name(cell)} speed"
            sub = progress.add_task(f"  {label}", total=1) if progress is not None else None
            _run_speed(cell, cfg["speed"], seed, device, save)
            if progress is not None:
                progress.remove_task(sub)
            sp = cell["speed"]
            finished(label, f"{sp['status']} ({sp['seconds']:.0f} s)")
        _train_all(series, results, cfg, seed, device, get_task, save, cache_dir, jobs, progress, notes, finished)
    # finished when every cell of the file (a resumed comparison may have run a part of the grid) has run
    if not _not_run(results):
        results["finished"] = _now()
    _summarise(results)
    from .claims import evaluate_claims

    results["claims"] = evaluate_claims(results)
    save()
    return results


def rerender(out: str | Path) -> dict[str, Any]:
    """The results in ``out/results.json`` with the seeds' summaries, the cells' status and the claims
    computed again from the runs it holds (an interrupted comparison included); written back atomically."""
    from .claims import evaluate_claims

    outp = Path(out)
    path = outp / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"expected a comparison's results at {path}, found none")
    results = read_json(path)
    rc = results["run_config"]
    cfg = rc["preset_config"]
    infos = task_infos(results)
    for cell in results["cells"].values():
        for task, by_width in cell.get("tasks", {}).items():
            tcfg = cfg["tasks"][task]
            head = (infos[task]["score_key"], infos[task]["score_sign"])  # the task's headline metric
            for s in cell_series(cell, task, tcfg, rc["seed"], *head):
                if f"d{s.width}" in by_width:
                    s.summarise()
    if _not_run(results):
        results.pop("finished", None)
    _summarise(results)
    results["claims"] = evaluate_claims(results)
    write_json(path, results)
    return results


def _train_all(series, results, cfg, seed, device, get_task, save, cache_dir, jobs, progress, notes, finished):
    """Run every series to its end: ``jobs`` runs at once (worker processes when > 1), each series one
    run at a time through its sweep, its further seeds side by side; breadth first across the series."""
    in_flight: dict[tuple[int, float, int], Series] = {}
    already = sum(len(s.entry()["runs"]) for s in series)
    if already:
        notes(f"resume: keeping {already} finished training run(s)")
    pool = Pool(jobs, torch.get_num_threads()) if jobs > 1 else None
    overall = progress.add_task("seqzoo compare: training", total=None) if progress is not None else None
    try:
        while True:
            # breadth first: the runs of the series that have run least go first, so that every cell has
            # its first result before any cell gets its second (an interrupted comparison covers the grid)
            ready = sorted(
                (
                    (len(s.entry()["runs"]), n, lr, s_)
                    for n, s in enumerate(series)
                    for lr, s_ in s.wanted()
                    if (n, lr, s_) not in in_flight
                ),
                key=lambda r: (r[0], r[1]),
            )
            ready = [(n, lr, s_) for _, n, lr, s_ in ready]
            if not ready and not in_flight:
                break
            if pool is None:
                n, lr, sd = ready[0]
                s = series[n]
                label = f"{s.label} lr {lr_key(lr)} seed {sd}"
                sub = progress.add_task(f"  {label}", total=s.tcfg["steps"]) if progress is not None else None

                def on_step(step: int, loss: float, sub=sub, label=label) -> None:
                    if progress is not None:
                        progress.update(sub, completed=step, description=f"  {label} loss {loss:.3f}")

                spec = prepare_run(results, s, lr, sd, seed, device, get_task, cache_dir)
                rec = train_run(spec, task=get_task(s.task), on_step=on_step)
                if progress is not None:
                    progress.remove_task(sub)
                _finish(s, lr, sd, rec, save, finished)
            else:
                while ready and len(in_flight) < jobs:
                    n, lr, sd = ready.pop(0)
                    in_flight[(n, lr, sd)] = series[n]
                    pool.submit((n, lr, sd), prepare_run(results, series[n], lr, sd, seed, device, get_task, cache_dir))
                if progress is not None:
                    shown = ", ".join(f"{series[n].label} lr {lr_key(lr)} seed {sd}" for n, lr, sd in in_flight)
                    progress.update(overall, description=f"compare ({jobs} at once): {shown}")
                key, rec = pool.get()
                n, lr, sd = key
                del in_flight[key]
                _finish(series[n], lr, sd, rec, save, finished)
            if progress is not None:
                progress.advance(overall)
    finally:
        if pool is not None:
            pool.close()


def _finish(s: Series, lr: float, sd: int, rec: dict, save, finished) -> None:
    if rec["status"] != "ok":
        log.warning("%s lr %s seed %s failed: %s", s.label, lr_key(lr), sd, rec.get("error"))
    rec.setdefault("lr", lr)  # a dead worker's record has neither
    rec.setdefault("seed", sd)
    s.entry()["runs"][run_key(lr, sd)] = rec
    s.summarise()
    save()
    if rec["status"] == "ok":
        val = rec["metrics"].get(s.score_key)
        stop = f", stopped at step {rec['stopped_at']}" if rec.get("stopped_at") else ""
        text = f"{s.score_key} {val:.4g}{stop} ({rec['seconds']:.0f} s)"
    else:
        text = f"failed: {rec.get('error')}"
    finished(f"{s.label} lr {lr_key(lr)} seed {sd}", text)


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


#: preset entries that change no run's numbers (what is reported, not what is trained): a resumed
#: comparison may differ in them, and takes the new ones
_REPORTING = ("description", "claims", "task_defaults")


def _trains(preset_config: dict) -> dict:
    return json_roundtrip({k: v for k, v in preset_config.items() if k not in _REPORTING})


def _load_or_new(path: Path, run_config: dict, resume: bool, console) -> dict:
    if resume and path.exists():
        old = read_json(path)
        if (
            _trains(old.get("run_config", {}).get("preset_config", {})) != _trains(run_config["preset_config"])
            or old.get("run_config", {}).get("seed") != run_config["seed"]
        ):
            raise ValueError(
                f"cannot resume {path}: it was made with a different preset, overrides or seed; "
                "use another --out or drop --resume"
            )
        old["run_config"]["preset_config"] = json_roundtrip(run_config["preset_config"])  # the reporting ones
        for key in ("layers", "backbones", "tasks"):
            merged = old["run_config"][key] + [x for x in run_config[key] if x not in old["run_config"][key]]
            old["run_config"][key] = merged
        old["resumed"] = old.get("resumed", 0) + 1
        old.pop("finished", None)
        return old
    import seqzoo

    return {
        "schema": 2,
        "tool": f"seqzoo {seqzoo.__version__}",
        "started": _now(),
        "run_config": run_config,
        "versions": versions(),
        "machine": machine_info(run_config["device"]),
        "param_targets": {},
        "cells": {},
    }


def _run_speed(cell, scfg, seed, device, save) -> None:
    t0 = time.perf_counter()
    try:
        torch.manual_seed(seed)
        layer_config = {**layer_options(cell["layer"], scfg.get("layer_config", {})), **cell.get("layer_config", {})}
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
        cell["speed"] = {"status": "failed", "error": error_text(exc)}
    cell["speed"]["seconds"] = round(time.perf_counter() - t0, 2)
    save()


def _not_run(results: dict) -> list[str]:
    """The (cell, task, width) entries of a comparison without any run yet."""
    return [
        f"{name} {task} {width}"
        for name, cell in results["cells"].items()
        for task, by_width in cell.get("tasks", {}).items()
        for width, entry in by_width.items()
        if not entry.get("runs")
    ]


def _summarise(results: dict) -> None:
    """Per cell: status and the errors of its failed units."""
    for cell in results["cells"].values():
        errors = {}
        for task, by_width in cell.get("tasks", {}).items():
            for width, entry in by_width.items():
                for key, r in entry.get("runs", {}).items():
                    if r.get("status") != "ok":
                        errors[f"{task} {width} {key}"] = r.get("error", r.get("status"))
        if cell.get("speed", {}).get("status") == "failed":
            errors["speed"] = cell["speed"].get("error", "failed")
        cell["errors"] = errors
        cell["status"] = "ok" if not errors else "failed"


def task_entry(cell: dict, task: str, width: str | None = None) -> tuple[str | None, dict | None]:
    """A cell's (width, entry) for ``task`` at ``width`` (default: the largest width)."""
    by_width = cell.get("tasks", {}).get(task, {})
    if not by_width:
        return None, None
    width = width or max(by_width, key=lambda w: int(w[1:]))
    return width, by_width.get(width)


def best_run(cell: dict, task: str, width: str | None = None) -> tuple[str | None, dict | None]:
    """The reported run of a cell's task at ``width`` (default: the largest): the first seed's run at the
    winning learning rate, else the first recorded run (a failure, with its error): (width, run)."""
    width, entry = task_entry(cell, task, width)
    if entry is None:
        return width, None
    best = entry.get("best")
    if best:
        return width, entry["runs"][run_key(best["lr"], best["seeds"][0])]
    runs = list(entry.get("runs", {}).values())
    return width, (runs[0] if runs else None)


def lr_policy(cfg: dict) -> str:
    """How learning rates and seeds were spent, in words (for the table caption and the report)."""
    parts = []
    for task, t in cfg["tasks"].items():
        lrs = t["lrs"]
        text = (
            f"{task}: single lr {lrs[0]:g}"
            if len(lrs) == 1
            else f"{task}: lr sweep {', '.join(f'{x:g}' for x in lrs)} in this order, the best kept"
        )
        if t.get("stop_at") is not None:
            text += f", early stop at {t['stop_at']:g} (checked every {t.get('eval_every')} steps"
            text += ", which also ends the sweep)" if len(lrs) > 1 else ")"
        n = int(t.get("seeds", 1))
        if n > 1:
            when = (
                "at the largest width when unsolved"
                if t.get("seeds_when") == "unsolved_at_largest"
                else "for every cell"
            )
            text += f"; {n} seeds at the winning rate {when}"
        parts.append(text)
    return "; ".join(parts)
