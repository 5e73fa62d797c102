"""The units of work of ``seqzoo compare``: a ``Series`` of training runs per (cell, task, width), and one
run, prepared (parameter matching: ``prepare_run``) and trained (``train_run``) in this process or a
worker's (``seqzoo.bench.pool``).

A run's spec and record are plain JSON-able dicts: the spec says everything the run needs, the record
everything it produced (``lr``, ``seed``, ``status``, ``metrics``, ``steps``, ``stopped_at``, ``evals``, ...).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..backbones import create_model, default_intermediate_size
from ..registry import layer_spec, list_layers
from .presets import widths
from .tasks import make_task, reaches
from .train import Interrupted, TrainConfig, train

__all__ = ["Series", "cell_series", "run_key", "lr_key", "spread", "prepare_run", "train_run", "match_intermediate_size",
           "non_embedding_params", "cell_key", "cell_name", "layer_options", "error_text", "json_roundtrip"]


def lr_key(lr: float) -> str:
    return f"{lr:.3g}"


def layer_options(layer: str, wanted: dict) -> dict:
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


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:300]


def run_key(lr: float, seed: int) -> str:
    """A run's key in its entry's ``runs``: the learning rate and the seed."""
    return f"lr {lr_key(lr)} seed {seed}"


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


def json_roundtrip(obj):
    import json

    from .store import jsonable

    return json.loads(json.dumps(jsonable(obj)))


def _param_target(results: dict, task: str, d: int, tcfg: dict, vocab: int, layer_config: dict) -> int:
    """Non-embedding parameters of the reference model (self-attention, transformer, default MLP)."""
    key = f"{task}/d{d}"
    if key not in results["param_targets"]:
        ref = results["run_config"]["preset_config"].get("reference_layer")  # the preset names it
        ref = ref if ref in list_layers() else sorted(results["run_config"]["layers"])[0]
        n = non_embedding_params(
            ref,
            "transformer",
            d_model=d,
            n_layers=tcfg["n_layers"],
            vocab_size=vocab,
            intermediate_size=default_intermediate_size(d),
            layer_config=layer_options(ref, layer_config),
        )
        results["param_targets"][key] = {"reference": f"{ref}/transformer", "params_non_embedding": n}
    return results["param_targets"][key]["params_non_embedding"]


def prepare_run(results, s: Series, lr: float, run_seed: int, base_seed: int, device, get_task, cache_dir) -> dict:
    """One run's spec (parameter matching, here); a failure (a layer that cannot be built) is the run's
    recorded error. The spec trains anywhere: in this process or a worker."""
    task, d, tcfg, cell = s.task, s.width, s.tcfg, s.cell
    spec: dict[str, Any] = {"task": task, "seed": base_seed, "cache_dir": str(cache_dir),
                            "task_kwargs": tcfg["task_config"], "lr": lr, "run_seed": run_seed}
    try:
        t = get_task(task)
        layer_config = {
            **layer_options(cell["layer"], tcfg.get("layer_config", {})),
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
        spec["error"] = error_text(exc)
    return spec


def train_run(spec: dict, task=None, on_step=None) -> dict:
    """Train and evaluate one prepared run (``spec`` from ``prepare_run``); returns its record. Runs in a
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
        rec.update(status="failed", error=error_text(exc))
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return json_roundtrip(rec)


# --- reading results -----------------------------------------------------------------------------------
def cell_key(layer: str, backbone: str) -> str:
    return f"{layer}/{backbone}"


def cell_name(cell: dict) -> str:
    """A cell's name: its variant's (a ``variants`` preset) or ``layer/backbone``."""
    return cell.get("variant") or cell_key(cell["layer"], cell["backbone"])
