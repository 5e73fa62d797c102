"""CLI commands of the harnesses: compare, train, bench (added to the ``seqzoo`` parser)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    values = [int(_size(t)) for t in _csv(text)]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _count(low: int):
    """An argparse type: an integer ≥ ``low``, refused with a message saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def _size(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def _names(values: list[str] | None) -> list[str] | None:
    """``--layers a,b c`` -> [a, b, c]; ``all`` or nothing -> None (every registered one)."""
    if not values:
        return None
    out = [n for v in values for n in _csv(v)]
    return None if out == ["all"] else out


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )


def _data_source(data: str) -> str:
    """A local ``--data`` path made absolute (worker processes and checkpoints read it from anywhere);
    anything else (a hub dataset name) as given."""
    path = Path(data).expanduser()
    return str(path.resolve()) if path.exists() else data


def _data_options(args) -> dict:
    """The lm task's options given on the command line (``--data``, ``--tokenizer``, ...), defaults left out."""
    out = {}
    if args.data:
        out["data"] = _data_source(args.data)
    for name in ("tokenizer", "data_config", "data_split", "eval_split", "text_field"):
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    if getattr(args, "streaming", False):
        out["streaming"] = True
    if set(out) - {"data", "tokenizer"} and "data" not in out:
        raise ValueError("--data-config, --data-split, --eval-split, --text-field and --streaming describe a "
                         "dataset: give --data too")
    return out


def _add_data_arguments(p, tokenizer_help: str | None = None, data_default: str | None = None) -> None:
    p.add_argument("--data", default=None,
                   help="text for the lm task: a text file or folder, a jsonl/parquet file, a datasets.save_to_disk "
                        "folder, or a Hugging Face hub dataset name (default: "
                        f"{data_default or 'the Python standard library sources'})")
    p.add_argument("--tokenizer", default=None,
                   help=tokenizer_help or "'bytes' (default: UTF-8 bytes, vocabulary 256) or a Hugging Face "
                                          "tokenizer name or folder")
    p.add_argument("--data-config", default=None, help="the hub dataset's configuration name")
    p.add_argument("--data-split", default=None, help="the dataset split to read (default: train)")
    p.add_argument("--eval-split", default=None,
                   help="a dataset split to validate on (default: documents held out of --data-split)")
    p.add_argument("--text-field", default=None, help="the dataset field holding the text (default: text)")
    p.add_argument("--streaming", action="store_true",
                   help="stream the dataset and read it in order (the position is kept in checkpoints)")


# --- compare ----------------------------------------------------------------------------------------------
def _jobs(args) -> int:
    """Training runs at once: given, or on CPU one per core left by the torch threads (on CUDA one)."""
    if args.jobs is not None:
        if args.jobs < 1:
            raise ValueError(f"expected --jobs >= 1, got {args.jobs}")
        return args.jobs
    if args.device != "cpu":
        return 1
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, torch.get_num_threads()))


def _cmd_compare(args) -> int:
    from rich.console import Console

    from .compare import compare
    from .train import Interrupted

    if args.threads is None and args.device == "cpu":
        args.threads = 1  # models this small gain little from intra-op threads, and stall on a busy machine
    _threads(args)
    console = Console(width=max(160, Console().width))
    out = Path(args.out)
    overrides = json.loads(args.override) if args.override else None
    t0 = time.perf_counter()
    if args.report_only:
        from .compare import rerender

        try:
            results = rerender(out)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return _show_compare(console, results, out, t0)
    # bars on a terminal; elsewhere (CI, nohup, a pipe) one plain line per finished unit
    bars = not args.no_progress and sys.stdout.isatty()
    progress = _progress(bars)
    log_line = None if bars else (lambda line: print(line, flush=True))
    try:
        data_options = _data_options(args) or None
        with progress:
            results = compare(
                layers=_names(args.layers),
                backbones=_names(args.backbones),
                tasks=_names(args.tasks),
                preset_name=args.preset,
                device=args.device,
                seed=args.seed,
                out=out,
                resume=args.resume,
                data=data_options,
                speed=not args.no_speed,
                overrides=overrides,
                progress=progress if bars else None,
                console=console,
                jobs=_jobs(args),
                log_line=log_line,
            )
    except (KeyboardInterrupt, Interrupted):
        console.print(
            f"[yellow]interrupted: finished units are in {out / 'results.json'}; "
            "continue with --resume[/yellow]"
        )
        return 130
    except (KeyError, ValueError, TypeError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    return _show_compare(console, results, out, t0)


def _show_compare(console, results: dict, out: Path, t0: float) -> int:
    """Plots, report.md, the table and the claims on the terminal."""
    from .report import compare_table, write_plots, write_report

    plots = write_plots(results, out)
    report = write_report(results, out, plots)
    console.print(compare_table(results))
    if "finished" not in results:
        console.print(
            f"[yellow]unfinished run ({results.get('elapsed_s', 0):.0f} s so far): continue it with "
            "--resume[/yellow]"
        )
    if results.get("claims"):
        console.print("[bold]What this run reproduces[/bold] (computed from the numbers above):")
        for c in results["claims"]:
            color = {"reproduced": "green", "not reproduced": "red"}.get(c["verdict"], "yellow")
            console.print(f"- {c['claim']}: [{color}]{c['verdict']}[/{color}]")
            for e in c["evidence"]:
                console.print(f"    {e}", highlight=False)
    elapsed = time.perf_counter() - t0
    console.print(
        f"results: {out / 'results.json'}; report: {report}; plots: {', '.join(plots.values()) or 'none'}"
        f"; wall time {elapsed // 60:.0f} min {elapsed % 60:.0f} s"
    )
    failed = [k for k, c in results["cells"].items() if c.get("status") != "ok"]
    if failed:
        console.print(
            f"[yellow]{len(failed)} cell(s) with failures (see report.md): {', '.join(failed)}[/yellow]"
        )
    return 0


# --- train ------------------------------------------------------------------------------------------------
def _cmd_train(args) -> int:
    import os

    from ..cli import parse_config
    from .train import Interrupted, NonFiniteLoss, TrainConfig, train

    _threads(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    rank = int(os.environ.get("RANK", "0"))
    task_config = parse_config(args.task_config)
    try:
        task_config.update(_data_options(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = TrainConfig(
        layer=args.layer,
        backbone=args.backbone,
        task=args.task,
        task_config=task_config,
        d_model=args.d_model,
        n_layers=args.n_layers,
        intermediate_size=args.intermediate_size,
        layer_config=parse_config(args.config),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup if args.warmup is not None else args.steps // 10,
        seed=args.seed,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
    )
    try:
        run = _wandb_run(args, cfg) if rank == 0 and args.wandb else None
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tb = _tensorboard(args.out) if rank == 0 and args.out else None
    # a bar on a terminal; elsewhere (CI, nohup, a pipe, other ranks) one JSON line every --log-every steps
    bars = rank == 0 and not args.no_progress and sys.stdout.isatty()
    progress = _progress(bars)
    bar = progress.add_task(f"{cfg.layer} ({cfg.backbone}) on {cfg.task}", total=cfg.steps) if bars else None

    def on_step(step: int, loss: float) -> None:
        if bar is not None:
            progress.update(bar, completed=step, description=f"{cfg.layer} ({cfg.backbone}) loss {loss:.4f}")
        elif rank == 0 and (step % max(args.log_every, 1) == 0 or step == cfg.steps):
            print(json.dumps({"step": step, "loss": round(loss, 6)}), flush=True)
        if tb is not None:
            tb.add_scalar("train/loss", loss, step)
        if run is not None:
            run.log({"train/loss": loss}, step=step)

    res = None
    try:
        with progress:
            res = train(cfg, out=args.out, resume=args.resume, stop_after=args.stop_after, on_step=on_step)
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyError, ValueError, TypeError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    finally:
        if tb is not None:
            tb.close()
        if run is not None:
            if res is not None:
                run.summary.update({f"eval/{k}": v for k, v in res.metrics.items() if isinstance(v, (int, float))})
            run.finish(exit_code=0 if res is not None else 1)
        _destroy_process_group()
    if rank == 0:
        summary = {
            "steps": res.steps,
            "params": res.params,
            "params_non_embedding": res.params_non_embedding,
            "state_size": res.state_size,
            "seconds": round(res.seconds, 2),
            "resumed_from": res.resumed_from,
            "metrics": {k: v for k, v in res.metrics.items() if k != "loss_by_position"},
        }
        print(json.dumps({"result": summary}), flush=True)
    return 0


def _tensorboard(out):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - TensorBoard is optional
        return None
    return SummaryWriter(str(Path(out) / "tensorboard"))


def _wandb_run(args, cfg):
    """A Weights & Biases run for ``seqzoo train --wandb`` (its files under --out; WANDB_MODE=offline
    keeps it on disk)."""
    try:
        import wandb
    except ImportError as err:
        raise ImportError('--wandb needs Weights & Biases: pip install wandb (or "seqzoo[wandb]")') from err
    # a resumed run continues its W&B run: the id is kept beside the checkpoints
    id_file = Path(args.out) / "wandb-run.json" if args.out else None
    run_id = None
    if id_file is not None and args.resume and id_file.is_file():
        run_id = json.loads(id_file.read_text())["id"]
    run = wandb.init(project=args.wandb_project, name=args.wandb_name, config=cfg.to_dict(),
                     dir=str(Path(args.out)) if args.out else None, id=run_id,
                     resume="allow" if run_id else None)
    if id_file is not None:
        from .store import write_json

        write_json(id_file, {"id": run.id, "project": args.wandb_project})
    return run


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- bench ------------------------------------------------------------------------------------------------
def _cmd_bench(args) -> int:
    from rich.console import Console

    from ..registry import list_layers
    from .report import bench_table, plot_bench
    from .speed import bench_layer, matmul_peak
    from .store import machine_info, versions, write_json

    _threads(args)
    console = Console(width=max(140, Console().width))
    layers = _names(args.layers) or list_layers()
    progress = _progress(not args.no_progress)
    peak = matmul_peak(args.device)
    results = {
        "config": {
            "d_model": args.d_model,
            "heads": args.heads,
            "batch": args.batch,
            "lengths": args.lengths,
            "decode_positions": args.decode_positions,
            "repeats": args.repeats,
            "device": args.device,
            "backward": not args.no_backward,
            "memory": not args.no_memory,
        },
        "matmul_peak_gflops": peak,
        "versions": versions(),
        "machine": machine_info(args.device),
        "layers": {},
    }
    out = Path(args.out)
    with progress:
        task = progress.add_task("seqzoo bench", total=len(layers))
        for name in layers:
            progress.update(task, description=f"bench: {name}")
            try:
                results["layers"][name] = bench_layer(
                    name,
                    d_model=args.d_model,
                    heads=args.heads,
                    batch=args.batch,
                    lengths=args.lengths,
                    decode_positions=args.decode_positions,
                    repeats=args.repeats,
                    warmup=args.warmup,
                    device=args.device,
                    backward=not args.no_backward,
                    memory=not args.no_memory,
                    max_seconds=args.max_seconds,
                    peak_gflops=peak,
                )
            except Exception as exc:  # noqa: BLE001 - one failing layer is reported, not fatal
                results["layers"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            write_json(out / "bench.json", results)
            progress.advance(task)
    plot = plot_bench(results, out / "bench_latency.png")
    console.print(bench_table(results))
    console.print(f"results: {out / 'bench.json'}" + (f"; plot: {plot}" if plot else ""))
    return 0


def add_commands(sub) -> None:
    """Add the harness subcommands to the ``seqzoo`` argument parser."""
    p = sub.add_parser(
        "compare",
        help="train and time the preset's layers in both backbones; table, JSON, plots, report",
        description="Train the preset's layers (or --layers) in both backbones, parameter-matched, under one "
        "recipe on the default tasks, time them, and write results.json, PNG plots "
        "and report.md.",
    )
    p.add_argument(
        "--layers", nargs="*",
        help="layer names (comma or space separated; default: the preset's layers, the TTT paper's seven for "
             "quick, default and paper, the delta-rule family for delta, decayed linear attention for decay)"
    )
    p.add_argument("--backbones", nargs="*", help="transformer, mamba (default: both)")
    p.add_argument("--tasks", nargs="*", help="registered tasks (default: the preset's, mqar and lm)")
    p.add_argument(
        "--preset",
        default="default",
        choices=["quick", "default", "ladder", "paper", "delta", "decay"],
        help="quick: seconds (tests); default: the comparison on a CPU (about 3 h on 2 cores; --resume continues it); ladder: the "
        "TTT paper's ablation ladder (Table 1) on the byte LM; paper: the published recipes (GPU); delta: the "
        "delta-rule family beside linear and softmax attention on the default recipe; decay: RetNet, GLA, HGRN2, Mamba-2 "
        "and sliding-window attention beside them on the same recipe",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--seed", type=int, default=0,
        help="first seed (default 0): it sets the data; runs use seeds seed, seed+1, … (initialisation, data order)",
    )
    p.add_argument("--out", default="seqzoo-results", help="output folder (default seqzoo-results)")
    p.add_argument("--resume", action="store_true", help="keep finished units of an earlier run in --out")
    _add_data_arguments(p)
    p.add_argument("--no-speed", action="store_true", help="skip the speed sweep")
    p.add_argument(
        "--report-only", action="store_true",
        help="train nothing: read --out/results.json (finished or interrupted), recompute the seeds' "
        "summaries and the claims, and write the table, plots and report.md again",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--override", default=None, help=argparse.SUPPRESS)  # JSON merged into the preset (tests)
    p.add_argument("--threads", type=_count(1), default=None, help="torch CPU threads (default: 1 on CPU)")
    p.add_argument(
        "--jobs", type=_count(1), default=None,
        help="training runs at once, in worker processes (default on CPU: cores / threads; the speed sweep "
        "always runs alone, first)",
    )
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "train",
        help="train one model (checkpoints, resume, JSONL log; runs under torchrun)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--layer", required=True)
    p.add_argument("--backbone", default="transformer", choices=["transformer", "mamba"])
    p.add_argument("--task", default="mqar")
    p.add_argument("--task-config", nargs="*", metavar="KEY=VALUE", help="task options, e.g. seq_len=256")
    _add_data_arguments(p)
    p.add_argument("--config", nargs="*", metavar="KEY=VALUE", help="layer config options")
    p.add_argument("--d-model", type=_count(1), default=64)
    p.add_argument("--n-layers", type=_count(1), default=2)
    p.add_argument("--intermediate-size", type=_count(1), default=None)
    p.add_argument("--steps", type=_count(1), default=200)
    p.add_argument("--batch-size", type=_count(1), default=32, help="global batch (split over torchrun processes)")
    p.add_argument("--lr", type=_positive_float, default=3e-3)
    p.add_argument("--warmup", type=_count(0), default=None, help="warmup steps (default: 10%% of steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="folder for checkpoints, log.jsonl, metrics.json")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--checkpoint-every", type=_count(0), default=0)
    p.add_argument("--log-every", type=_count(1), default=10)
    p.add_argument("--stop-after", type=_count(1), default=None, help="stop after this many steps (checkpointed)")
    p.add_argument("--threads", type=_count(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="JSON log lines instead of a bar, even on a terminal")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (optional dependency)")
    p.add_argument("--wandb-project", default="seqzoo", help="the Weights & Biases project")
    p.add_argument("--wandb-name", default=None, help="the Weights & Biases run name (default: its own)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "bench",
        help="prefill/decode latency, memory, FLOP/s vs context length",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--layers", nargs="*", help="layer names (default: all registered)")
    p.add_argument("--d-model", type=_count(1), default=64)
    p.add_argument("--heads", type=_count(1), default=4)
    p.add_argument("--batch", type=_count(1), default=1)
    p.add_argument(
        "--lengths",
        type=_ints,
        default=[512, 1024, 2048, 4096, 8192, 16384],
        help="comma-separated context lengths (k = ×1024)",
    )
    p.add_argument("--decode-positions", type=_ints, default=[64, 8192], help="positions for decode timing")
    p.add_argument("--repeats", type=_count(1), default=5)
    p.add_argument("--warmup", type=_count(0), default=1)
    p.add_argument(
        "--max-seconds", type=_positive_float, default=20.0, help="skip longer lengths once one call is slower"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-backward", action="store_true", help="skip forward+backward timing")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory subprocesses")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="seqzoo-bench")
    p.add_argument("--threads", type=_count(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_cmd_bench)
