"""The ``seqzoo`` command: list, info, plugins, check, export, eval (and compare, train, bench from
seqzoo.bench)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys

__all__ = ["main", "parse_config"]


def parse_config(pairs: list[str] | None, spec=None) -> dict:
    """Turn ``["num_heads=4", "share_qk=true"]`` into a dict, typed by Python literal syntax."""
    out = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: expected --config key=value, got {pair!r}")
        low = raw.strip().lower()
        if low in ("true", "false"):
            value = low == "true"
        elif low in ("none", "null"):
            value = None
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        out[key.strip()] = value
    return out


def _cmd_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import layer_spec, list_layers
    from .registry import plugin_failures

    table = Table(title="seqzoo layers")
    for col in ("name", "description", "plugin", "state / batch element"):
        table.add_column(col)
    for name in list_layers(args.pattern):
        spec = layer_spec(name)
        table.add_row(name, spec.description, spec.plugin, _state_size_text(name, args.d_model))
    console = Console()
    console.print(table)
    failures = plugin_failures()
    if failures:
        console.print(f"[yellow]{len(failures)} plugin(s) failed to load: {', '.join(failures)} "
                      "(see `seqzoo plugins`)[/yellow]")
    return 0


def _state_size_text(name: str, d_model: int) -> str:
    """State size at 1k and 16k tokens for a default-config layer of width d_model."""
    from . import create_layer

    try:
        layer = create_layer(name, d_model)
        a, b = layer.state_size(1024), layer.state_size(16384)
    except Exception as exc:  # noqa: BLE001 - a listing must not fail on one layer
        return f"? ({type(exc).__name__})"
    growth = "constant" if a == b else "grows with T"
    return f"{a:,} @1k, {b:,} @16k ({growth}, d_model={d_model})"


def _cmd_info(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import layer_spec

    try:
        spec = layer_spec(args.name)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    console = Console()
    console.print(f"[bold]{spec.name}[/bold] ({spec.kind}) from plugin {spec.plugin!r}"
                  f" ({spec.distribution} {spec.version})")
    if spec.aliases:
        console.print(f"aliases: {', '.join(spec.aliases)}")
    doc = (spec.target.__doc__ or spec.description or "").strip()
    if doc:
        console.print(doc)
    table = Table(title="config")
    for col in ("option", "type", "default", "help"):
        table.add_column(col)
    for f in spec.fields:
        default = "(required)" if f.default is dataclasses.MISSING else repr(f.default)
        table.add_row(f.name, f.type_name, default, f.help)
    console.print(table)
    return 0


def _cmd_plugins(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .registry import list_plugins

    table = Table(title="seqzoo plugins")
    for col in ("plugin", "module", "distribution", "version", "registered", "status"):
        table.add_column(col)
    plugins = list_plugins()
    for p in plugins:
        status = "[green]ok[/green]" if not p.error else f"[red]failed: {p.error}[/red]"
        registered = ", ".join(p.layers + [f"task:{t}" for t in p.tasks] + [f"converter:{c}" for c in p.converters])
        table.add_row(p.name, p.module, p.distribution, p.version, registered, status)
    console = Console(width=max(120, Console().width))
    console.print(table)
    failed = [p for p in plugins if p.error]
    if failed:
        console.print(f"{len(failed)} plugin(s) failed; the others loaded:", highlight=False)
        for p in failed:
            console.print(f"  {p.name} ({p.distribution or p.module}): {p.error}", highlight=False, soft_wrap=True)
            if args.verbose and p.traceback:
                console.print(p.traceback, highlight=False, soft_wrap=True)
    return 0


def _cmd_check(args) -> int:
    from .testing import CHECKS, check_layer

    config = parse_config(args.config)
    try:
        results = check_layer(args.name, args.d_model, checks=args.checks, **config)
    except AssertionError as exc:
        print(str(exc))
        return 1
    except (KeyError, TypeError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    for c in results:
        print(f"  ok  {c}")
    print(f"{args.name}: all {len(results)} of {len(CHECKS)} conformance checks passed"
          if len(results) == len(CHECKS) else f"{args.name}: {len(results)} checks passed")
    return 0


def _cmd_export(args) -> int:
    try:
        from .hf import export_checkpoint
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        folder = export_checkpoint(args.run, args.folder, tokenizer=False if args.no_tokenizer else None)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    print(f"saved {folder} (load it with AutoModelForCausalLM.from_pretrained after `import seqzoo.hf`)")
    return 0


def _held_out_source(args, config):
    """Where ``eval --by-position`` reads held-out documents: the options given, else those the model's
    training run read (recorded by ``seqzoo export``), with its ``val_every``, so the documents are ones
    it never trained on."""
    from .bench.cli import _data_options
    from .bench.textdata import TextSource

    trained = dict((getattr(config, "seqzoo_train", None) or {}).get("task_config") or {})
    given = _data_options(args)  # raises when dataset options come without --data
    if "data" in given:  # another source: none of the training run's options apply to it
        trained = {}
    return TextSource.from_options({**trained, **given})


def _cmd_eval(args) -> int:
    import json
    from pathlib import Path

    if not args.tasks and not args.by_position:
        print("error: expected --tasks (lm-evaluation-harness) or --by-position, or both", file=sys.stderr)
        return 2
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        print(f"error: expected a saved model folder with config.json, got {str(folder)!r}", file=sys.stderr)
        return 2
    try:
        from . import evaluation
        from .hf import SeqzooForCausalLM
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else folder / "eval"
    try:
        if args.tasks:
            from .bench.store import write_json

            tasks = [t for v in args.tasks for t in v.split(",") if t]
            result = evaluation.run_lm_eval(folder, tasks, tokenizer=args.tokenizer, batch_size=args.batch_size,
                                            limit=args.limit, num_fewshot=args.num_fewshot,
                                            include_path=args.include_path, device=args.device)
            from lm_eval.utils import make_table

            print(make_table(result))
            kept = {k: result[k] for k in ("results", "versions", "n-shot", "config") if k in result}
            write_json(out / "lm_eval.json", json.loads(json.dumps(kept, default=str)))  # its config holds dtypes
        if args.by_position:
            from .bench.textdata import load_tokenizer

            model = SeqzooForCausalLM.from_pretrained(str(folder)).eval().to(args.device)
            context = evaluation.training_context(model.config)
            length = args.length or 4 * (context or 512)
            tok = load_tokenizer(evaluation.folder_tokenizer(folder, args.tokenizer))
            if tok.vocab_size > model.config.vocab_size:
                raise ValueError(f"the tokenizer {tok.name!r} has {tok.vocab_size} tokens but the model reads "
                                 f"{model.config.vocab_size}")
            source = _held_out_source(args, model.config)
            docs = (tok.encode(text) for text in source.held_out())
            result = evaluation.loss_by_position(model.model, docs, length=length, max_documents=args.documents,
                                                 chunk=args.chunk, device=args.device)
            result["data"] = {k: v for k, v in dataclasses.asdict(source).items() if v is not None}
            paths = evaluation.save_by_position(result, out, title=f"{model.config.layer} ({model.config.backbone})",
                                                train_context=context)
            summary = {k: v for k, v in result.items() if k != "loss_by_position"}
            print(json.dumps({"by_position": summary, **paths}))
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqzoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list the registered layers")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'ttt_*'")
    p.add_argument("--d-model", type=int, default=768, help="width used for the state-size column")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="describe a layer and its config options")
    p.add_argument("name")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("plugins", help="list the plugins, what they registered, and failures")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failed plugins")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("check", help="run the conformance suite on a layer (exit code 0/1)")
    p.add_argument("name")
    p.add_argument("--config", nargs="*", metavar="KEY=VALUE", help="layer config options")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--checks", nargs="*", default=None, help="run only these checks")
    p.set_defaults(func=_cmd_check)

    from .bench import cli as bench_cli

    bench_cli.add_commands(sub)

    p = sub.add_parser("export", help="write a seqzoo train run's latest checkpoint as a transformers folder")
    p.add_argument("run", help="the --out folder of seqzoo train")
    p.add_argument("folder", help="the folder to write (config.json, model.safetensors, tokenizer)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="do not save the tokenizer a text task's run was trained with (bytes or its Hugging Face one)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval", help="evaluate a saved model: lm-evaluation-harness tasks, loss by token position")
    p.add_argument("folder", help="a save_pretrained / seqzoo export folder")
    p.add_argument("--tasks", nargs="*", help="lm-evaluation-harness tasks (comma or space separated)")
    p.add_argument("--batch-size", type=bench_cli._count(1), default=1)
    p.add_argument("--limit", type=bench_cli._positive_float, default=None,
                   help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=bench_cli._count(0), default=None)
    p.add_argument("--include-path", default=None, help="a folder of your own lm-evaluation-harness task YAMLs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="folder for the results (default: FOLDER/eval)")
    p.add_argument("--by-position", action="store_true",
                   help="held-out loss at every token position of documents longer than the training context")
    p.add_argument("--length", type=bench_cli._count(1), default=None,
                   help="positions to evaluate (default: 4x the training context, or 2048)")
    p.add_argument("--documents", type=bench_cli._count(1), default=16, help="held-out documents to average")
    p.add_argument("--chunk", type=bench_cli._count(1), default=512, help="tokens per forward call")
    bench_cli._add_data_arguments(p, tokenizer_help="the tokenizer (default: the folder's own, else bytes)",
                                  data_default="the documents the model's training run held out")
    p.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
