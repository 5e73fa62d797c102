"""The ``seqzoo`` command: list, info, plugins, check (and compare, train, bench from seqzoo.bench)."""

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
