"""``seqzoo compare``: every layer in every backbone, parameter-matched, one recipe, one table.

A comparison is a grid of cells (layer, backbone; or a preset's named variants). For each cell, task and
width a :class:`Series` of training runs is spent as the preset says (``seqzoo.bench.presets``): a
learning-rate sweep with the first seed, ended early by a run that reaches the task's ``stop_at``, then
further seeds at the winning rate. Before the training, one speed sweep per cell. Every run is written into
``results.json`` (atomically) as soon as it ends, so an interrupted comparison keeps everything finished
and ``resume=True`` continues it. A run that raises or produces a non-finite loss is recorded with the
reason and the rest of the grid still runs. At the end the known claims the run can check are
evaluated from its numbers (``seqzoo.bench.claims``).

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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..backbones import BACKBONES, create_model, default_intermediate_size
from ..registry import layer_spec, list_layers, task_spec
from .presets import PRESETS, RECIPE, preset, widths
from .speed import bench_model
from .store import machine_info, read_json, versions, write_json
from .tasks import make_task, reaches
from .train import Interrupted, TrainConfig, model_state_size, train

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


def run_key(lr: float, seed: int) -> str:
    """A run's key in its entry's ``runs``: the learning rate and the seed."""
    return f"lr {_lr_key(lr)} seed {seed}"


@dataclass
class Series:
    """The training runs of one (cell, task, width): the learning-rate sweep with the first seed, then
    the further seeds at the winning rate. What to run next is a function of the runs recorded so far,
    so a resumed comparison continues where the interrupted one stopped."""

    cell: dict
    task: str
    width: int
    tcfg: dict
    seeds: list[int]
    #: whether this width is the backbone's largest (``seeds_when: unsolved_at_largest``)
    largest: bool
    score_key: str = "loss"
    score_sign: float = -1.0

    @property
    def label(self) -> str:
        return f"{cell_name(self.cell)} {self.task} d{self.width}"

    def entry(self) -> dict:
        return self.cell["tasks"].setdefault(self.task, {}).setdefault(f"d{self.width}", {"runs": {}})

    def _reached(self, rec: dict) -> bool:
        stop_at = self.tcfg.get("stop_at")
        if stop_at is None or rec.get("status") != "ok":
            return False
        return reaches(rec["metrics"][self.score_key], stop_at, self.score_sign)

    def wanted(self) -> list[tuple[float, int]]:
        """The runs (lr, seed) to start now: the next rate of the sweep, or the further seeds."""
        runs = self.entry()["runs"]
        first = self.seeds[0]
        for lr in self.tcfg["lrs"]:
            rec = runs.get(run_key(lr, first))
            if rec is None:
                return [(lr, first)]
            if self._reached(rec):
                break
        best = self.best_lr()
        if best is None:
            return []
        when = self.tcfg.get("seeds_when", "always")
        if when not in ("always", "unsolved_at_largest"):
            raise ValueError(f"expected seeds_when 'always' or 'unsolved_at_largest', got {when!r}")
        if when == "unsolved_at_largest" and (not self.largest or self._reached(runs[run_key(best, first)])):
            return []
        return [(best, s) for s in self.seeds[1:] if run_key(best, s) not in runs]

    def best_lr(self) -> float | None:
        """The rate whose first-seed run scored best (None while none has finished well)."""
        runs, first = self.entry()["runs"], self.seeds[0]
        ok = [(lr, runs[run_key(lr, first)]) for lr in self.tcfg["lrs"] if run_key(lr, first) in runs]
        ok = [(lr, r) for lr, r in ok if r.get("status") == "ok"]
        if not ok:
            return None
        return max(ok, key=lambda item: self.score_sign * item[1]["metrics"][self.score_key])[0]

    def summarise(self) -> None:
        """``entry["best"]``: the winning rate and, over the seeds run at it, every scalar metric's mean,
        min, max and standard deviation."""
        entry = self.entry()
        lr = self.best_lr()
        if lr is None:
            entry["best"] = None
            return
        recs = [(s, entry["runs"][run_key(lr, s)]) for s in self.seeds if run_key(lr, s) in entry["runs"]]
        recs = [(s, r) for s, r in recs if r.get("status") == "ok"]
        names = [k for k, v in recs[0][1]["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        entry["best"] = {
            "lr": lr,
            "selected_by": self.score_key,
            "seeds": [s for s, _ in recs],
            "n": len(recs),
            "metrics": {k: spread([r["metrics"][k] for _, r in recs if k in r["metrics"]]) for k in names},
            "stop_at": self.tcfg.get("stop_at"),
        }


def cell_series(cell: dict, task: str, tcfg: dict, seed: int, score_key: str, score_sign: float) -> list[Series]:
    """A cell's series for ``task``, one per width of its backbone, with the preset's seeds from ``seed``."""
    ws = widths(tcfg, cell["backbone"])
    seeds = [seed + k for k in range(int(tcfg.get("seeds", 1)))]
    return [Series(cell, task, d, tcfg, seeds, d == max(ws), score_key, score_sign) for d in ws]


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min, max and (population) standard deviation of a list of numbers."""
    n = len(values)
    mean = sum(values) / n
    return {
        "mean": mean,
        "min": min(values),
        "max": max(values),
        "std": (sum((v - mean) ** 2 for v in values) / n) ** 0.5,
        "n": n,
    }


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
    log_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the comparison and write ``out/results.json``; returns the results dict.

    The speed sweep runs first, alone; then ``jobs`` > 1 trains that many runs at once in worker processes
    (each with this process's torch thread count; the layers must come from installed plugins, which the
    workers load). Every run's numbers are the same as with ``jobs=1``.

    ``progress`` is an optional ``rich.progress.Progress``; ``console`` an optional rich console for notes;
    ``log_line`` is called with one plain line per finished unit (for logs and pipes).
    ``overrides`` replaces preset entries (``{"tasks": {"mqar": {"steps": 10}}}``), for tests and sweeps.
    """
    cfg = preset(preset_name)
    if overrides:
        _deep_update(cfg, overrides)
    variants = cfg.get("variants")
    if variants is not None and (layers or backbones):
        raise ValueError(f"preset {preset_name!r} lists its own rows; drop --layers / --backbones")
    if variants is None:
        layers = list(layers or list_layers())
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
        if t not in cfg["tasks"]:
            cfg["tasks"][t] = copy.deepcopy(cfg["tasks"].get("lm", {}))
            cfg["tasks"][t]["task_config"] = {}
    for t in tasks:
        tcfg = cfg["tasks"][t]
        for b in backbones:
            widths(tcfg, b)
        if not tcfg.get("lrs"):
            raise ValueError(f"expected at least one learning rate for task {t!r}")
        if int(tcfg.get("seeds", 1)) < 1:
            raise ValueError(f"expected seeds >= 1 for task {t!r}, got {tcfg.get('seeds')}")
    if data is not None and "lm" in cfg["tasks"]:
        cfg["tasks"]["lm"]["task_config"]["data"] = str(Path(data).expanduser().resolve())
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
    heads: dict[str, tuple[str, float]] = {}
    for cell in results["cells"].values():
        for task, by_width in cell.get("tasks", {}).items():
            tcfg = cfg["tasks"][task]
            if task not in heads:  # the task's headline metric (its data come from the run's cache)
                t = make_task(task, seed=rc["seed"], cache_dir=outp / "cache", **tcfg["task_config"])
                heads[task] = (t.score_key, t.score_sign)
            for s in cell_series(cell, task, tcfg, rc["seed"], *heads[task]):
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
    pool = _Pool(jobs, torch.get_num_threads()) if jobs > 1 else None
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
                label = f"{s.label} lr {_lr_key(lr)} seed {sd}"
                sub = progress.add_task(f"  {label}", total=s.tcfg["steps"]) if progress is not None else None

                def on_step(step: int, loss: float, sub=sub, label=label) -> None:
                    if progress is not None:
                        progress.update(sub, completed=step, description=f"  {label} loss {loss:.3f}")

                spec = _prepare(results, s, lr, sd, seed, device, get_task, cache_dir)
                rec = _train_cell(spec, task=get_task(s.task), on_step=on_step)
                if progress is not None:
                    progress.remove_task(sub)
                _finish(s, lr, sd, rec, save, finished)
            else:
                while ready and len(in_flight) < jobs:
                    n, lr, sd = ready.pop(0)
                    in_flight[(n, lr, sd)] = series[n]
                    pool.submit((n, lr, sd), _prepare(results, series[n], lr, sd, seed, device, get_task, cache_dir))
                if progress is not None:
                    shown = ", ".join(f"{series[n].label} lr {_lr_key(lr)} seed {sd}" for n, lr, sd in in_flight)
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
        log.warning("%s lr %s seed %s failed: %s", s.label, _lr_key(lr), sd, rec.get("error"))
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
    finished(f"{s.label} lr {_lr_key(lr)} seed {sd}", text)


class _Pool:
    """``jobs`` spawned worker processes that train prepared runs; ``submit`` one, ``get`` the next result.
    However the comparison ends (Ctrl-C, SIGTERM, an error), ``close`` stops every worker started."""

    def __init__(self, jobs: int, threads: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.todo, self.done = ctx.Queue(), ctx.Queue()
        self.workers = []
        self.waiting: set = set()
        self.dead = False
        try:
            for _ in range(jobs):
                self.workers.append(ctx.Process(target=_worker, args=(self.todo, self.done, threads), daemon=True))
                self.workers[-1].start()
        except BaseException:
            self.close()
            raise

    def submit(self, key, spec: dict) -> None:
        self.waiting.add(key)
        if self.dead:  # the workers died: what is left fails with the reason, the comparison ends cleanly
            self.done.put((key, {"status": "failed", "error": "training worker process died"}))
        else:
            self.todo.put((key, spec))

    def get(self):
        import queue

        while True:
            try:
                key, rec = self.done.get(timeout=0.5)
            except queue.Empty:
                if any(w.is_alive() for w in self.workers):
                    continue
                try:  # a last result may have arrived as the last worker exited
                    key, rec = self.done.get(timeout=1.0)
                except queue.Empty:
                    self.dead = True
                    key = next(iter(self.waiting))
                    rec = {"status": "failed", "error": "training worker process died"}
            self.waiting.discard(key)
            return key, rec

    def close(self) -> None:
        for _ in self.workers:
            self.todo.put(None)
        started = [w for w in self.workers if w.pid is not None]  # an interrupt may land inside start()
        for w in started:
            w.join(timeout=0.2)
            if w.is_alive():
                w.terminate()
        for w in started:
            w.join()
        self.todo.cancel_join_thread()
        self.done.cancel_join_thread()


def _worker(todo, done, threads: int) -> None:
    """A training worker: runs prepared specs until the stop mark. The parent stops the workers on
    Ctrl-C / SIGTERM (and keeps only the runs that finished); a Ctrl-C that reaches the worker between
    runs is ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        while (item := todo.get()) is not None:
            key, spec = item
            done.put((key, _train_cell(spec)))
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


def _prepare(results, s: Series, lr: float, run_seed: int, base_seed: int, device, get_task, cache_dir) -> dict:
    """One run's spec (parameter matching, here); a failure (a layer that cannot be built) is the run's
    recorded error. The spec trains anywhere: in this process or a worker."""
    task, d, tcfg, cell = s.task, s.width, s.tcfg, s.cell
    spec: dict[str, Any] = {"task": task, "seed": base_seed, "cache_dir": str(cache_dir),
                            "task_kwargs": tcfg["task_config"], "lr": lr, "run_seed": run_seed}
    try:
        t = get_task(task)
        layer_config = {
            **_layer_config(cell["layer"], tcfg.get("layer_config", {})),
            **cell.get("layer_config", {}),
        }
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
        s.entry().update(
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
            seed=run_seed,
            data_order=run_seed - base_seed,
            eval_batch_size=tcfg["eval_batch_size"],
            eval_every=int(tcfg.get("eval_every", 0)),
            stop_at=tcfg.get("stop_at"),
            device=device,
        )
    except (KeyboardInterrupt, Interrupted):
        raise
    except Exception as exc:  # noqa: BLE001 - a failing layer is reported in its cell
        spec["error"] = _error_text(exc)
    return spec


def _train_cell(spec: dict, task=None, on_step=None) -> dict:
    """Train and evaluate one prepared run (``spec`` from ``_prepare``); returns its record. Runs in a
    worker process as well as in the caller's: ``task`` (built from the spec when None) and ``on_step``
    are the caller's conveniences. A layer that fails (raises, produces NaN) gives a failed record."""
    rec: dict[str, Any] = {"lr": spec["lr"], "seed": spec["run_seed"], "status": "running"}
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
            steps=res.steps,
            stopped_at=res.stopped_at,
            evals=[list(e) for e in res.evals],
        )
    except (KeyboardInterrupt, Interrupted):
        raise
    except Exception as exc:  # noqa: BLE001 - a failing layer is reported in its cell
        rec.update(status="failed", error=_error_text(exc))
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return _json_roundtrip(rec)


def _run_speed(cell, scfg, seed, device, save) -> None:
    t0 = time.perf_counter()
    try:
        torch.manual_seed(seed)
        layer_config = {**_layer_config(cell["layer"], scfg.get("layer_config", {})), **cell.get("layer_config", {})}
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


# --- reading results -----------------------------------------------------------------------------------
def cell_name(cell: dict) -> str:
    """A cell's name: its variant's (a ``variants`` preset) or ``layer/backbone``."""
    return cell.get("variant") or cell_key(cell["layer"], cell["backbone"])


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
