"""Tables, plots (matplotlib Agg) and the Markdown report of ``seqzoo compare`` and ``seqzoo bench``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from .compare import best_run, lr_policy
from .store import atomic_write

log = logging.getLogger(__name__)

__all__ = [
    "compare_rows",
    "compare_table",
    "markdown_table",
    "write_plots",
    "write_report",
    "bench_table",
    "plot_bench",
    "latency_plot",
]


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _short_error(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def compare_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The comparison table as plain strings: (header, rows), one row per (layer, backbone)."""
    cfg = results["run_config"]["preset_config"]
    tasks = results["run_config"]["tasks"]
    speed = cfg.get("speed", {})
    lengths = speed.get("lengths", [])
    positions = speed.get("decode_positions", [])
    header = ["layer", "backbone", "params (non-emb)", "state size"]
    if "mqar" in tasks:
        header.append("MQAR acc")
    if "lm" in tasks:
        header += ["LM loss", "bits/byte"]
    for t in tasks:
        if t not in ("mqar", "lm"):
            header.append(f"{t} loss")
    header += [f"prefill ms/tok @{T}" for T in lengths]
    header += [f"decode ms/tok @{P}" for P in positions]
    rows = []
    for cell in results["cells"].values():
        if (
            cell["layer"] not in results["run_config"]["layers"]
            or cell["backbone"] not in results["run_config"]["backbones"]
        ):
            continue
        row = [cell["layer"], cell["backbone"]]
        first_task = next((t for t in tasks if best_run(cell, t)[1]), None)
        run = best_run(cell, first_task)[1] if first_task else None
        if run and run.get("status") == "ok":
            ratio = run.get("params_non_embedding", 0)
            row += [_fmt(ratio), _fmt(run.get("state_size"))]
        else:
            row += ["—", "—"]
        for t in tasks:
            _, r = best_run(cell, t)
            cols = 2 if t == "lm" else 1
            if r is None:
                row += ["—"] * cols
            elif r.get("status") != "ok":
                row += [f"failed: {_short_error(r.get('error', ''))}"] + ["—"] * (cols - 1)
            elif t == "mqar":
                row.append(_fmt(r["metrics"].get("accuracy")))
            elif t == "lm":
                row += [_fmt(r["metrics"].get("loss")), _fmt(r["metrics"].get("bits_per_byte"))]
            else:
                row.append(_fmt(r["metrics"].get("loss")))
        sp = cell.get("speed") or {}
        pre = {r["T"]: r for r in sp.get("prefill", [])}
        dec = {r["position"]: r for r in sp.get("decode", [])}
        for T in lengths:
            r = pre.get(T, {})
            row.append(
                _fmt(r.get("ms_per_token"))
                if "ms_per_token" in r
                else (
                    "skipped"
                    if "skipped" in r
                    else (
                        f"failed: {_short_error(r['error'])}"
                        if "error" in r
                        else ("failed: " + _short_error(sp.get("error", "")))
                        if sp.get("status") == "failed"
                        else "—"
                    )
                )
            )
        for P in positions:
            r = dec.get(P, {})
            row.append(
                _fmt(r.get("ms_per_token"))
                if "ms_per_token" in r
                else (f"failed: {_short_error(r['error'])}" if "error" in r else "—")
            )
        rows.append(row)
    return header, rows


def caption(results: dict) -> str:
    cfg = results["run_config"]["preset_config"]
    rc = results["run_config"]
    parts = [
        f"preset {rc['preset']!r}, seed {rc['seed']}, device {rc['device']}",
        "params: non-embedding, matched to "
        + ", ".join(
            f"{v['reference']} ({v['params_non_embedding']:,}) for {k}"
            for k, v in results.get("param_targets", {}).items()
        )
        + " by the SwiGLU width",
        "learning rate: " + lr_policy(cfg),
        "state size: scalars per sequence after the MQAR sequence length, all blocks (incl. the Mamba backbone's pre-conv)",
    ]
    return "; ".join(parts)


def compare_table(results: dict):
    """A rich Table of the comparison."""
    from rich.table import Table

    header, rows = compare_rows(results)
    table = Table(title="seqzoo compare", caption=caption(results), show_lines=False)
    for i, h in enumerate(header):
        table.add_column(h, overflow="fold", no_wrap=i < 2)
    for row in rows:
        table.add_row(*[f"[red]{c}[/red]" if c.startswith("failed") else c for c in row])
    return table


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- plots -------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: Path) -> Path:
    plt = _plt()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


_MARKERS = {"transformer": "o", "mamba": "s"}


def _colors(names: list[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(sorted(set(names)))}


def plot_accuracy_vs_state(results: dict, path: Path) -> Path | None:
    """MQAR accuracy against state size (log x), one line per (layer, backbone) over widths."""
    plt = _plt()
    cells = [c for c in results["cells"].values() if "mqar" in c.get("tasks", {})]
    if not cells:
        return None
    colors = _colors([c["layer"] for c in cells])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plotted = False
    for c in cells:
        pts = []
        for width in sorted(c["tasks"]["mqar"], key=lambda w: int(w[1:])):
            _, r = best_run(c, "mqar", width)
            if r and r.get("status") == "ok":
                pts.append((r["state_size"], r["metrics"]["accuracy"]))
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(
            xs,
            ys,
            marker=_MARKERS.get(c["backbone"], "^"),
            color=colors[c["layer"]],
            linestyle="-" if c["backbone"] == "transformer" else "--",
            label=f"{c['layer']} ({c['backbone']})",
        )
        plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_xlabel("state size (scalars per sequence, all blocks)")
    ax.set_ylabel("MQAR accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("MQAR accuracy vs state size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _savefig(fig, path)


def plot_loss_by_position(results: dict, path: Path) -> Path | None:
    """Validation loss at each token position (byte LM), smoothed over a few positions."""
    plt = _plt()
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5))
    cells = list(results["cells"].values())
    colors = _colors([c["layer"] for c in cells])
    plotted = False
    for c in cells:
        _, r = best_run(c, "lm")
        if not r or r.get("status") != "ok" or "loss_by_position" not in r["metrics"]:
            continue
        y = np.asarray(r["metrics"]["loss_by_position"], dtype=float)
        k = max(1, len(y) // 16)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        x = np.arange(len(smooth)) + (k + 1) / 2
        ax.plot(
            x,
            smooth,
            color=colors[c["layer"]],
            linestyle="-" if c["backbone"] == "transformer" else "--",
            label=f"{c['layer']} ({c['backbone']})",
        )
        plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("token position (bytes of context)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Byte-level LM: loss by token position")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _savefig(fig, path)


def latency_plot(
    series: dict[str, list[tuple[int, float]]], path: Path, *, title: str, ylabel: str = "prefill latency (s)"
) -> Path | None:
    """Log-log latency vs context length with O(T) and O(T²) guide lines through the median first point."""
    plt = _plt()
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    families = {name: name.split(" (")[0] for name in series}
    colors = _colors(list(families.values()))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, pts in series.items():
        xs, ys = zip(*sorted(pts))
        dashed = name.endswith("(mamba)")
        ax.plot(
            xs,
            ys,
            marker="s" if dashed else "o",
            linestyle="--" if dashed else "-",
            color=colors[families[name]],
            label=name,
        )
    all_x = sorted({x for pts in series.values() for x, _ in pts})
    firsts = sorted(min(pts)[1] for pts in series.values())
    x0, y0 = all_x[0], firsts[len(firsts) // 2]
    xs = [all_x[0], all_x[-1]]
    ax.plot(xs, [y0 * x / x0 for x in xs], "k:", linewidth=1, label="O(T)")
    ax.plot(xs, [y0 * (x / x0) ** 2 for x in xs], "k--", linewidth=1, label="O(T²)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(all_x, [str(x) for x in all_x])
    ax.minorticks_off()
    ax.set_xlabel("context length T (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _savefig(fig, path)


def plot_latency(results: dict, path: Path) -> Path | None:
    series = {}
    for c in results["cells"].values():
        pts = [
            (r["T"], r["seconds"]["median"])
            for r in (c.get("speed") or {}).get("prefill", [])
            if "seconds" in r
        ]
        series[f"{c['layer']} ({c['backbone']})"] = pts
    sp = results["run_config"]["preset_config"].get("speed", {})
    return latency_plot(
        series,
        path,
        title=f"Prefill latency vs context (model d={sp.get('d_model')}, "
        f"{sp.get('n_layers')} blocks, batch 1)",
    )


def write_plots(results: dict, out: Path) -> dict[str, str]:
    """The three comparison plots as PNG files in ``out``; returns {kind: file name} of those drawn."""
    made = {}
    for kind, fn, name in (
        ("accuracy_vs_state", plot_accuracy_vs_state, "mqar_accuracy_vs_state.png"),
        ("loss_by_position", plot_loss_by_position, "lm_loss_by_position.png"),
        ("latency", plot_latency, "latency_vs_context.png"),
    ):
        try:
            if fn(results, out / name) is not None:
                made[kind] = name
        except Exception as exc:  # noqa: BLE001 - a plot must not lose the results
            log.warning("plot %s failed: %s", name, exc)
    return made


def write_report(results: dict, out: Path, plots: dict[str, str]) -> Path:
    """``report.md``: what was run, the table, the plots, the failures."""
    rc = results["run_config"]
    cfg = rc["preset_config"]
    header, rows = compare_rows(results)
    lines = [
        f"# seqzoo compare — preset `{rc['preset']}`",
        "",
        f"{cfg.get('description', '')}.",
        "",
        f"- started {results.get('started')}, finished {results.get('finished', '(unfinished)')}, "
        f"elapsed {results.get('elapsed_s', 0):.0f} s",
        f"- machine: {results['machine'].get('processor')} ({results['machine'].get('cpu_count')} cores, "
        f"{results['machine'].get('torch_threads')} torch threads), device `{rc['device']}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        f"- recipe (identical for every cell): AdamW β (0.9, 0.95), weight decay 0.1 on matrices, grad clip 1.0, "
        f"linear warmup then cosine decay; same data, seed ({rc['seed']}), token budget and evaluation",
        f"- learning rate: {lr_policy(cfg)}",
        "- parameters matched (non-embedding) to "
        + ", ".join(
            f"{v['reference']} = {v['params_non_embedding']:,} ({k})"
            for k, v in results.get("param_targets", {}).items()
        )
        + " by adjusting each model's SwiGLU width",
        "",
    ]
    for task, t in cfg["tasks"].items():
        if task in rc["tasks"]:
            lines.append(
                f"- `{task}`: {t['steps']} steps × batch {t['batch_size']}, d_model {t['d_models']}, "
                f"{t['n_layers']} blocks, data {t['task_config']}"
            )
    sp = cfg.get("speed", {})
    lines += [
        f"- speed: model d_model {sp.get('d_model')}, {sp.get('n_layers')} blocks, batch 1, median of "
        f"{sp.get('repeats')} after {sp.get('warmup')} warm-up",
        "",
        "## Results",
        "",
        markdown_table(header, rows),
        "",
    ]
    titles = {
        "accuracy_vs_state": "MQAR accuracy vs state size",
        "loss_by_position": "LM loss by token position",
        "latency": "Prefill latency vs context length",
    }
    for kind, name in plots.items():
        lines += [f"## {titles[kind]}", "", f"![{titles[kind]}]({name})", ""]
    failed = {k: c["errors"] for k, c in results["cells"].items() if c.get("errors")}
    if failed:
        lines += ["## Failures", ""]
        for k, errs in failed.items():
            for unit, err in errs.items():
                lines.append(f"- `{k}` {unit}: {err}")
        lines.append("")
    text = "\n".join(lines)
    path = out / "report.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


# --- bench ------------------------------------------------------------------------------------------------
def bench_table(results: dict):
    """A rich Table of ``seqzoo bench`` results (prefill rows, then decode rows)."""
    from rich.table import Table

    peak = results.get("matmul_peak_gflops")
    table = Table(
        title=f"seqzoo bench (fp32 matmul peak measured now: {_fmt(peak)} GFLOP/s)",
        caption="median of repeats after warm-up [IQR]; GFLOP/s from the analytic counts in "
        "seqzoo.bench.speed.FLOPS",
    )
    for h in (
        "layer",
        "T",
        "prefill ms",
        "[IQR]",
        "tok/s",
        "GFLOP/s",
        "% peak",
        "fwd+bwd ms",
        "peak MB",
        "state",
    ):
        table.add_column(h)
    for name, r in results["layers"].items():
        if "error" in r:
            table.add_row(name, "", f"[red]failed: {_short_error(r['error'])}[/red]", *[""] * 7)
            continue
        for row in r["prefill"]:
            if "seconds" not in row:
                why = row.get("error") or row.get("skipped", "")
                table.add_row(name, str(row["T"]), f"[red]{_short_error(why)}[/red]", *[""] * 7)
                continue
            s = row["seconds"]
            fb = row.get("fwd_bwd_seconds", {}).get("median")
            table.add_row(
                name,
                str(row["T"]),
                _fmt(1e3 * s["median"]),
                f"{_fmt(1e3 * s['q1'])}–{_fmt(1e3 * s['q3'])}",
                _fmt(row["tokens_per_s"]),
                _fmt(row.get("gflops")),
                _fmt(100 * row["fraction_of_peak"]) if "fraction_of_peak" in row else "—",
                _fmt(1e3 * fb) if fb else "—",
                _fmt(row.get("peak_mb")) if "peak_mb" in row else "—",
                _fmt(r["state_size"].get(str(row["T"]))),
            )
        for row in r["decode"]:
            if "ms_per_token" in row:
                s = row["seconds"]
                table.add_row(
                    name,
                    f"decode @{row['position']}",
                    _fmt(row["ms_per_token"]) + " /tok",
                    f"{_fmt(1e3 * s['q1'] / row['steps'])}–{_fmt(1e3 * s['q3'] / row['steps'])}",
                    _fmt(1e3 / row["ms_per_token"]),
                    "",
                    "",
                    "",
                    "",
                    "",
                )
            else:
                table.add_row(
                    name,
                    f"decode @{row['position']}",
                    f"[red]{_short_error(row.get('error', ''))}[/red]",
                    *[""] * 7,
                )
    return table


def plot_bench(results: dict, path: Path) -> Path | None:
    series = {
        name: [(row["T"], row["seconds"]["median"]) for row in r.get("prefill", []) if "seconds" in row]
        for name, r in results["layers"].items()
    }
    c = results["config"]
    return latency_plot(
        series,
        path,
        title=f"Prefill latency vs context (d={c['d_model']}, heads {c['heads']}, "
        f"batch {c['batch']}, {c['device']})",
    )
