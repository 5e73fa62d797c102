"""One training recipe for every layer: AdamW (β 0.9, 0.95), weight decay 0.1, clip 1.0, cosine + warmup.

``train(config)`` trains a ``LanguageModel`` of one layer on one task, evaluates it, and (with ``out``)
writes checkpoints (safetensors + JSON, never pickle) and a JSONL log. Batches are pure functions of
``(seed, step)``, so ``resume=True`` continues with exactly the loss curve of an uninterrupted run.
Under ``torchrun`` (``WORLD_SIZE`` > 1) it runs data-parallel with DDP (gloo on CPU, NCCL on CUDA):
each rank takes a contiguous slice of the global batch and the loss is normalised by the global
count of labelled tokens, so k steps on N processes give the losses of one process on the whole batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import LanguageModel, create_model, default_intermediate_size
from .store import load_tensors, read_json, save_tensors, write_json
from .tasks import IGNORE, Task, make_task, reaches

log = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "build_model",
    "model_state_size",
    "lr_at",
    "make_optimizer",
    "NonFiniteLoss",
    "Interrupted",
]


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the last complete checkpoint and results stay on disk."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved with every checkpoint)."""

    layer: str
    backbone: str = "transformer"
    task: str = "mqar"
    task_config: dict = field(default_factory=dict)
    d_model: int = 64
    n_layers: int = 2
    intermediate_size: int | None = None
    layer_config: dict = field(default_factory=dict)
    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    #: which of the task's independent data orders to train on (0: the task's own); the held-out set is fixed
    data_order: int = 0
    eval_batch_size: int = 64
    #: evaluate on the held-out set every this many steps (0: only at the end)
    eval_every: int = 0
    #: stop once the task's headline metric reaches this value at one of those evaluations (None: never)
    stop_at: float | None = None
    log_every: int = 10
    checkpoint_every: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["betas"] = tuple(d.get("betas", (0.9, 0.95)))
        return cls(**d)


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    losses: list[float]
    params: int
    params_non_embedding: int
    state_size: int
    seconds: float
    steps: int
    resumed_from: int | None = None
    #: the headline metric at each evaluation during training: [(step, value)]
    evals: list = field(default_factory=list)
    #: the step at which ``stop_at`` was reached (None: trained for every step)
    stopped_at: int | None = None


def build_model(cfg: TrainConfig, vocab_size: int) -> LanguageModel:
    """The model of a config, initialised from ``cfg.seed`` (identical on every rank)."""
    torch.manual_seed(cfg.seed)
    return create_model(
        cfg.layer,
        cfg.backbone,
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        intermediate_size=cfg.intermediate_size or default_intermediate_size(cfg.d_model),
        **cfg.layer_config,
    )


def model_state_size(model: LanguageModel, seq_len: int) -> int:
    """Scalars of one sequence's state after ``seq_len`` tokens: every block's layer state plus the
    Mamba backbone's pre-conv state."""
    total = 0
    for block in model.layers:
        total += block.seq_modeling_block.state_size(seq_len)
        if block.conv is not None:
            total += block.conv.conv.weight.shape[0] * (block.conv.conv.weight.shape[-1] - 1)
    return total


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio·lr`` at ``steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig, *, implementation: str = "auto") -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (ndim ≥ 2), none on vectors (norms, biases, per-head scalars) nor
    on the parameters a module names in its ``no_weight_decay`` attribute or marks ``_no_weight_decay``
    (mamba-ssm's conventions: Mamba's A_log and D).

    ``implementation``: ``"fused"`` (one kernel updates every parameter), ``"foreach"``, ``"for-loop"``
    (a few small ops per parameter), or ``"auto"``: fused where torch has it for the parameters' device
    (CPU and CUDA), else torch's default. The same updates to float32 rounding; the fused one saves the
    small models of the harness their per-parameter dispatches (benchmarks/bench_train.py)."""
    if implementation not in ("auto", "fused", "foreach", "for-loop"):
        raise ValueError(f"expected implementation 'auto', 'fused', 'foreach' or 'for-loop', got {implementation!r}")
    exempt = {id(getattr(m, name)) for m in model.modules() for name in getattr(m, "no_weight_decay", ())}
    decays = lambda p: p.ndim >= 2 and id(p) not in exempt and not getattr(p, "_no_weight_decay", False)
    decay = [p for p in model.parameters() if p.requires_grad and decays(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not decays(p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    options: dict[str, bool] = {}
    if implementation == "auto":
        devices = {p.device.type for p in decay + no_decay}
        dtypes = {p.dtype for p in decay + no_decay}
        if devices <= {"cpu", "cuda"} and dtypes <= {torch.float32, torch.float64, torch.float16, torch.bfloat16}:
            options["fused"] = True
    elif implementation == "fused":
        options["fused"] = True
    else:
        options["foreach"] = implementation == "foreach"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, **options)


# --- distributed ----------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return _Dist(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        active=True,
    )


def _all_reduce_sum(values: list[float], d: _Dist, device) -> list[float]:
    if not d.active:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --- checkpoints ---------------------------------------------------------------------------------------
def save_checkpoint(
    out: Path, step: int, cfg: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer, losses: list[float],
    *, data: dict | None = None,
) -> Path:
    """Write ``out/checkpoint-{step}/`` (model, optimizer, RNG: safetensors; rest: JSON, with ``data``: the
    task's position in its data, where it has one), then point ``out/latest.json`` at it with an atomic
    replace; older checkpoints are removed afterwards."""
    folder = out / f"checkpoint-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / "model.safetensors", model.state_dict())
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"state.{idx}.{k}"] = v
    save_tensors(folder / "optimizer.safetensors", tensors)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    write_json(folder / "optimizer.json", {"param_groups": groups, "scalars": scalars})
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and cfg.device.startswith("cuda"):
        rng["torch_cuda"] = torch.cuda.get_rng_state(torch.device(cfg.device))
    save_tensors(folder / "rng.safetensors", rng)
    trainer = {"step": step, "config": cfg.to_dict(), "losses": losses}
    if data is not None:
        trainer["data"] = data
    write_json(folder / "trainer.json", trainer)
    write_json(out / "latest.json", {"checkpoint": folder.name, "step": step})
    for old in out.glob("checkpoint-*"):
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def checkpoint_data(out: Path) -> dict | None:
    """The data position kept in the checkpoint named by ``out/latest.json`` (None: the task has none)."""
    latest = read_json(out / "latest.json")
    return read_json(out / latest["checkpoint"] / "trainer.json").get("data")


def _data_state(task: Task, step: int) -> dict | None:
    state = getattr(task, "data_state", None)
    return state(step) if state is not None else None


def load_checkpoint(
    out: Path, model: nn.Module, opt: torch.optim.Optimizer, device
) -> tuple[int, list[float], dict]:
    """Restore the checkpoint named by ``out/latest.json``: returns (step, losses, saved config)."""
    latest = read_json(out / "latest.json")
    folder = out / latest["checkpoint"]
    trainer = read_json(folder / "trainer.json")
    state, _ = load_tensors(folder / "model.safetensors", device=str(device))
    model.load_state_dict(state, strict=True)
    tensors, _ = load_tensors(folder / "optimizer.safetensors", device=str(device))
    meta = read_json(folder / "optimizer.json")
    opt_state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        _, idx, name = key.split(".", 2)
        opt_state.setdefault(int(idx), {})[name] = v.to("cpu") if name == "step" and torch.is_tensor(v) else v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": opt_state, "param_groups": groups})
    rng, _ = load_tensors(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(rng["torch_cuda"], torch.device(device))
    return int(trainer["step"]), list(trainer["losses"]), trainer["config"]


# --- the loop ------------------------------------------------------------------------------------------
class _Signals:
    """Turn SIGINT/SIGTERM into a flag checked between steps (installed only in the main thread)."""

    def __init__(self):
        self.caught: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.caught is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.caught = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _masked_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    mask = labels != IGNORE
    return F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum"), int(mask.sum())


def train(
    cfg: TrainConfig,
    *,
    task: Task | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    cache_dir=None,
    evaluate: bool = True,
) -> TrainResult:
    """Train and evaluate one model. ``stop_after`` ends the run after that many steps, as an interruption would."""
    device = torch.device(cfg.device)
    dist = _init_distributed(cfg.device)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    for name, low in (("steps", 1), ("batch_size", 1), ("d_model", 1), ("n_layers", 1), ("warmup_steps", 0),
                      ("log_every", 0), ("checkpoint_every", 0), ("eval_batch_size", 1)):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < low:
            raise ValueError(f"expected {name} an integer >= {low}, got {value!r}")
    if not (isinstance(cfg.lr, (int, float)) and 0 < cfg.lr < float("inf")):
        raise ValueError(f"expected lr a positive finite number, got {cfg.lr!r}")
    if cfg.eval_every < 0:
        raise ValueError(f"expected eval_every >= 0, got {cfg.eval_every}")
    if cfg.stop_at is not None and cfg.eval_every == 0:
        raise ValueError("expected eval_every > 0 with stop_at (early stopping needs evaluations)")
    if cfg.batch_size % dist.world:
        raise ValueError(f"expected batch_size divisible by the {dist.world} processes, got {cfg.batch_size}")
    task = task or make_task(cfg.task, seed=cfg.seed, cache_dir=cache_dir, **cfg.task_config)
    if cfg.data_order and not _takes_order(task):
        raise TypeError(
            f"expected task {cfg.task!r} to take train_batch(step, batch_size, *, order=k) for data_order "
            f"{cfg.data_order} (a further seed trains on another order of the same data)"
        )
    model = build_model(cfg, task.vocab_size).to(device)
    params = model.num_parameters()
    params_ne = model.num_parameters(embeddings=False)
    state_size = model_state_size(model, task.seq_len)
    opt = make_optimizer(model, cfg)
    outp = Path(out) if out is not None else None
    if outp is not None and dist.main:
        outp.mkdir(parents=True, exist_ok=True)
    start, losses, resumed_from = 0, [], None
    if resume and outp is not None and (outp / "latest.json").exists():
        start, losses, saved = load_checkpoint(outp, model, opt, device)
        if saved != cfg.to_dict():
            diff = sorted(k for k in saved if saved.get(k) != cfg.to_dict().get(k))
            raise ValueError(f"cannot resume {outp}: its config differs in {diff}")
        resumed_from = start
        log.info("resumed from step %d", start)
        if dist.main:
            _truncate_log(outp / "log.jsonl", start)
    runner: nn.Module = model
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=_has_unused_parameters(model, task, device),
        )
    if resumed_from is not None:  # after the DDP probe above, which reads a batch of its own
        data = checkpoint_data(outp)
        if data is not None:
            task.load_data_state(data)
    logf = open(outp / "log.jsonl", "a") if outp is not None and dist.main else None  # noqa: SIM115
    per_rank = cfg.batch_size // dist.world
    t0 = time.perf_counter()
    step = start
    evals: list[tuple[int, float]] = []
    stopped_at: int | None = None
    metrics: dict[str, Any] = {}
    try:
        with _Signals() as signals:
            model.train()
            while step < cfg.steps:
                lr = lr_at(step, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                ids, labels = (
                    task.train_batch(step, cfg.batch_size, order=cfg.data_order)
                    if cfg.data_order
                    else task.train_batch(step, cfg.batch_size)  # tasks written before data orders
                )
                ids = ids[dist.rank * per_rank : (dist.rank + 1) * per_rank].to(device)
                labels = labels[dist.rank * per_rank : (dist.rank + 1) * per_rank].to(device)
                global_count = _all_reduce_sum([float((labels != IGNORE).sum())], dist, device)[0]
                logits, _ = runner(ids)
                loss_sum, _ = _masked_loss_sum(logits, labels)
                # DDP averages gradients over ranks: scale so the result is d(global mean loss)
                (loss_sum * dist.world / max(global_count, 1.0)).backward()
                loss = _all_reduce_sum([loss_sum.item()], dist, device)[0] / max(global_count, 1.0)
                if not math.isfinite(loss):
                    raise NonFiniteLoss(f"loss is {loss} at step {step}")
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss)
                step += 1
                if logf is not None and (step % max(cfg.log_every, 1) == 0 or step == cfg.steps):
                    logf.write(
                        json.dumps(
                            {
                                "step": step,
                                "loss": loss,
                                "lr": lr,
                                "grad_norm": grad_norm,
                                "seconds": round(time.perf_counter() - t0, 3),
                            }
                        )
                        + "\n"
                    )
                    logf.flush()
                if on_step is not None:
                    on_step(step, loss)
                stopping = signals.caught is not None or (
                    stop_after is not None and step - start >= stop_after
                )
                if (
                    outp is not None
                    and dist.main
                    and (
                        stopping
                        or step == cfg.steps
                        or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                    )
                ):
                    save_checkpoint(outp, step, cfg, model, opt, losses, data=_data_state(task, step))
                if signals.caught is not None:
                    raise Interrupted(
                        f"stopped by signal {signals.caught} after step {step}; resume with --resume"
                    )
                if stopping:
                    break
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and evaluate:
                    metrics = _evaluate(model, task, cfg, device)
                    model.train()
                    evals.append((step, metrics[task.score_key]))
                    if cfg.stop_at is not None and reaches(evals[-1][1], cfg.stop_at, task.score_sign):
                        stopped_at = step
                        if outp is not None and dist.main:
                            save_checkpoint(outp, step, cfg, model, opt, losses, data=_data_state(task, step))
                        break
    finally:
        if logf is not None:
            logf.close()
    seconds = time.perf_counter() - t0
    if evaluate and (step >= cfg.steps or stopped_at is not None):
        if stopped_at is None:
            metrics = _evaluate(model, task, cfg, device)
            if cfg.eval_every:
                evals.append((step, metrics[task.score_key]))
        if outp is not None and dist.main:
            write_json(outp / "metrics.json", {"metrics": metrics, "config": cfg.to_dict(), "steps": step})
    return TrainResult(
        metrics=metrics,
        losses=losses,
        params=params,
        params_non_embedding=params_ne,
        state_size=state_size,
        seconds=seconds,
        steps=step,
        resumed_from=resumed_from,
        evals=evals,
        stopped_at=stopped_at,
    )


def _takes_order(task: Task) -> bool:
    import inspect

    try:
        params = inspect.signature(task.train_batch).parameters
    except (TypeError, ValueError):
        return False
    return "order" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _evaluate(model: nn.Module, task: Task, cfg: TrainConfig, device) -> dict[str, Any]:
    """The task's held-out metrics of ``model`` (left in eval mode); non-finite values raise."""
    model.eval()
    metrics = task.evaluate(model, batch_size=cfg.eval_batch_size, device=device)
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise NonFiniteLoss(f"evaluation gave non-finite {', '.join(bad)}")
    return metrics


def _has_unused_parameters(model: nn.Module, task: Task, device) -> bool:
    """Whether some parameter gets no gradient (DDP must then be told): one probe backward, discarded."""
    ids, _ = task.train_batch(0, 1)
    logits, _ = model(ids.to(device))
    logits.float().sum().backward()
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    return unused


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after ``step`` (they belong to the interrupted part that is being redone)."""
    if not path.exists():
        return
    from .store import atomic_write

    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))
