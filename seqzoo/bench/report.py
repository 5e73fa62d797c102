"""Tables, plots (matplotlib Agg) and the Markdown report of ``seqzoo compare`` and ``seqzoo bench``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from .compare import best_run, lr_policy, task_entry
from .presets import widths
from .runs import cell_name, run_key
from .store import atomic_write
from .tasks import compared, task_infos

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


def _spread_text(s: dict | None, digits: int = 3) -> str:
    """``mean [min–max]`` over seeds, or the value alone for one seed."""
    if s is None:
        return "—"
    if s.get("n", 1) > 1:
        return f"{_fmt(s['mean'], digits)} [{_fmt(s['min'], digits)}–{_fmt(s['max'], digits)}]"
    return _fmt(s["mean"], digits)


def _task_cells(r: dict | None, entry: dict | None, metrics: list[str]) -> list[str]:
    """A task's columns for one cell: each metric's mean [min–max] over seeds, or the failure."""
    if r is None:
        return ["—"] * len(metrics)
    if r.get("status") != "ok" or not entry or not entry.get("best"):
        return [f"failed: {_short_error(r.get('error', ''))}"] + ["—"] * (len(metrics) - 1)
    return [_spread_text(entry["best"]["metrics"].get(m), 4) for m in metrics]


def _lr_column(results: dict, task: str) -> bool:
    """Whether the table shows ``task``'s winning learning rate: when its recipe tries more than one."""
    return len(results["run_config"]["preset_config"]["tasks"].get(task, {}).get("lrs", [])) > 1


def compare_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The comparison table as plain strings: (header, rows), one row per cell. Task columns are at each
    backbone's largest width: mean [min–max] over the seeds at the winning learning rate."""
    cfg = results["run_config"]["preset_config"]
    tasks = results["run_config"]["tasks"]
    speed = cfg.get("speed") or {}
    lengths = speed.get("lengths", [])
    positions = speed.get("decode_positions", [])
    variants = bool(cfg.get("variants"))
    header = (["variant"] if variants else ["layer"]) + ["backbone", "params (non-emb)", "state size"]
    cols: dict[str, list[str]] = {}
    infos = task_infos(results)
    for t in tasks:
        cols[t] = [metric for metric, _ in infos[t]["columns"]]
        header += [label for _, label in infos[t]["columns"]]
        if _lr_column(results, t):
            header.append(f"{t} lr")
    has_speed = any(c.get("speed") for c in results["cells"].values())
    if has_speed:
        header += [f"prefill ms/tok @{T}" for T in lengths]
        header += [f"decode ms/tok @{P}" for P in positions]
    rows = []
    for cell in results["cells"].values():
        if not variants and (
            cell["layer"] not in results["run_config"]["layers"]
            or cell["backbone"] not in results["run_config"]["backbones"]
        ):
            continue
        row = [cell_name(cell) if variants else cell["layer"], cell["backbone"]]
        first_task = next((t for t in tasks if best_run(cell, t)[1]), None)
        run = best_run(cell, first_task)[1] if first_task else None
        if run and run.get("status") == "ok":
            row += [_fmt(run.get("params_non_embedding", 0)), _fmt(run.get("state_size"))]
        else:
            row += ["—", "—"]
        for t in tasks:
            width, r = best_run(cell, t)
            entry = task_entry(cell, t, width)[1]
            row += _task_cells(r, entry, cols[t])
            if _lr_column(results, t):
                best = (entry or {}).get("best")
                row.append(_fmt(best["lr"]) if best else "—")
        if has_speed:
            row += _speed_cells(cell, lengths, positions)
        rows.append(row)
    return header, rows


def _speed_cells(cell: dict, lengths: list[int], positions: list[int]) -> list[str]:
    sp = cell.get("speed") or {}
    pre = {r["T"]: r for r in sp.get("prefill", [])}
    dec = {r["position"]: r for r in sp.get("decode", [])}
    out = []
    for T in lengths:
        r = pre.get(T, {})
        if "ms_per_token" in r:
            out.append(_fmt(r["ms_per_token"]))
        elif "skipped" in r:
            out.append("skipped")
        elif "error" in r:
            out.append(f"failed: {_short_error(r['error'])}")
        elif sp.get("status") == "failed":
            out.append("failed: " + _short_error(sp.get("error", "")))
        else:
            out.append("—")
    for P in positions:
        r = dec.get(P, {})
        out.append(
            _fmt(r["ms_per_token"]) if "ms_per_token" in r else (f"failed: {_short_error(r['error'])}" if "error" in r else "—")
        )
    return out


def width_rows(results: dict, task: str, metric: str) -> tuple[list[str], list[list[str]]]:
    """A task at every width: per cell and width, the metric over seeds, the winning rate, the steps run
    (early stopping) and the state size."""
    all_widths = sorted(
        {w for c in results["cells"].values() for w in c.get("tasks", {}).get(task, {})}, key=lambda w: int(w[1:])
    )
    header = ["cell"] + [f"{w}: {metric} (lr, steps; state)" for w in all_widths]
    rows = []
    for cell in results["cells"].values():
        by_width = cell.get("tasks", {}).get(task)
        if not by_width:
            continue
        row = [cell_name(cell)]
        for w in all_widths:
            entry = by_width.get(w)
            best = (entry or {}).get("best")
            if not best:
                row.append("" if entry is None else ("failed" if entry.get("runs") else "not run"))
                continue
            first = entry["runs"][run_key(best["lr"], best["seeds"][0])]
            tried = sum(1 for r in entry["runs"].values() if r.get("seed") == best["seeds"][0])
            row.append(
                f"{_spread_text(best['metrics'].get(metric), 4)} (lr {best['lr']:g} of {tried}, "
                f"{first.get('steps', '?')} steps; {_fmt(first.get('state_size'))})"
            )
        rows.append(row)
    return header, rows


def noise_lines(results: dict) -> list[str]:
    """Every pair of cells per backbone and task (largest width): better, worse, within noise, both solved."""
    from .claims import pairwise

    lines = []
    for task, info in task_infos(results).items():
        metric, sign = compared(info)
        for backbone, pairs in pairwise(results, task, metric, sign).items():
            if not pairs:
                continue
            words = {"better": ">", "worse": "<"}
            lines.append(f"- **{task} {metric}, {backbone} backbone** (sorted best first): " + "; ".join(
                (f"{a} {words[v]} {b}" + (" (one seed)" if single else "")) if v in words else f"{a} ≈ {b} ({v})"
                for a, b, v, single in pairs
            ))
    return lines


def ladder_lines(results: dict) -> list[str]:
    """The ablation ladder: bits/byte per row beside the paper's perplexity, and each step's direction."""
    from .claims import ladder_steps

    rows = []
    for r in ladder_steps(results):
        rows.append([
            r["name"],
            _spread_text(r["bits_per_byte"], 4),
            r.get("change", "—"),
            "—" if r["paper_perplexity"] is None else f"{r['paper_perplexity']:g}",
            r.get("paper_change", "—"),
        ])
    header = ["row", "bits/byte", "vs the row before", "paper perplexity (Table 1)", "paper, vs the row before"]
    return ["## The ablation ladder", "", markdown_table(header, rows), ""]


def claim_lines(results: dict) -> list[str]:
    lines = []
    for c in results.get("claims", []):
        lines.append(f"- **{c['claim']}** — **{c['verdict']}**")
        lines += [f"    - {e}" for e in c["evidence"]]
    return lines


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
        "task columns at each backbone's largest width, mean [min–max] over seeds where more than one ran",
        "learning rate: " + lr_policy(cfg),
        "state size: scalars per sequence after the first task's sequence length, all blocks (incl. the Mamba "
        "backbone's pre-conv)",
        "context gain: LM loss at positions 16–31 minus the mean over the window's second half",
    ]
    return "; ".join(parts)


def compare_table(results: dict):
    """A rich Table of the comparison."""
    from rich.markup import escape
    from rich.table import Table

    header, rows = compare_rows(results)
    table = Table(title="seqzoo compare", caption=escape(caption(results)), show_lines=False)
    for i, h in enumerate(header):
        table.add_column(escape(h), overflow="fold", no_wrap=i < 2)
    for row in rows:  # "[min–max]" is text, not markup
        table.add_row(*[f"[red]{escape(c)}[/red]" if c.startswith("failed") else escape(c) for c in row])
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


def _hue(cell: dict) -> str:
    """What a plot's colour tells apart: the layer (the backbone is the line style), or a variant's row."""
    return cell.get("variant") or cell["layer"]


def _colors(names: list[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(sorted(set(names)))}


def plot_accuracy_vs_state(results: dict, path: Path, task: str, metric: str) -> Path | None:
    """A task's headline metric (MQAR accuracy) against state size (log x), one line per (layer,
    backbone) over widths."""
    plt = _plt()
    cells = [c for c in results["cells"].values() if task in c.get("tasks", {})]
    if not cells:
        return None
    colors = _colors([_hue(c) for c in cells])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plotted = False
    for c in cells:
        pts = []
        for width in sorted(c["tasks"][task], key=lambda w: int(w[1:])):
            _, r = best_run(c, task, width)
            best = (task_entry(c, task, width)[1] or {}).get("best")
            if r and r.get("status") == "ok" and best and metric in best["metrics"]:
                acc = best["metrics"][metric]
                pts.append((r["state_size"], acc["mean"], acc["mean"] - acc["min"], acc["max"] - acc["mean"]))
        if not pts:
            continue
        xs, ys, lo, hi = zip(*pts)
        ax.errorbar(
            xs,
            ys,
            yerr=[lo, hi],
            capsize=3,
            marker=_MARKERS.get(c["backbone"], "^"),
            color=colors[_hue(c)],
            linestyle="-" if c["backbone"] == "transformer" else "--",
            label=c.get("variant") or f"{c['layer']} ({c['backbone']})",
        )
        plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_xlabel("state size (scalars per sequence, all blocks)")
    ax.set_ylabel(f"{task} {metric}")
    if metric == "accuracy":
        ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{task} {metric} vs state size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _savefig(fig, path)


def plot_loss_by_position(results: dict, path: Path, task: str, curve: str) -> Path | None:
    """Held-out loss at each token position (the byte LM's ``loss_by_position``), smoothed over a few
    positions."""
    plt = _plt()
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5))
    cells = list(results["cells"].values())
    colors = _colors([_hue(c) for c in cells])
    plotted = False
    for c in cells:
        _, entry = task_entry(c, task)
        best = (entry or {}).get("best")
        if not best:
            continue
        curves = [entry["runs"][run_key(best["lr"], sd)]["metrics"].get(curve) for sd in best["seeds"]]
        curves = [cv for cv in curves if cv]
        if not curves:
            continue
        y = np.mean(np.asarray(curves, dtype=float), axis=0)
        # bins of equal width on the log scale: position t has t + 1 bytes of context
        edges = np.unique(np.round(np.geomspace(1, len(y) + 1, 25)).astype(int))
        x = np.sqrt(edges[:-1] * (edges[1:] - 1).clip(min=edges[:-1]))
        smooth = np.array([y[lo - 1 : hi - 1].mean() for lo, hi in zip(edges[:-1], edges[1:])])
        ax.plot(
            x,
            smooth,
            color=colors[_hue(c)],
            linestyle="-" if c["backbone"] == "transformer" else "--",
            label=c.get("variant") or f"{c['layer']} ({c['backbone']})"
            + (f", mean of {len(curves)} seeds" if len(curves) > 1 else ""),
        )
        plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_xlabel("token position (bytes of context, log scale)")
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
    sp = results["run_config"]["preset_config"].get("speed") or {}
    return latency_plot(
        series,
        path,
        title=f"Prefill latency vs context (model d={sp.get('d_model')}, "
        f"{sp.get('n_layers')} blocks, batch 1)",
    )


def write_plots(results: dict, out: Path) -> dict[str, str]:
    """The three comparison plots as PNG files in ``out``; returns {kind: file name} of those drawn."""
    made = {}
    plots = []
    for task, info in task_infos(results).items():
        metric = compared(info)[0]
        if info.get("plot_vs_state"):
            plots.append((f"{task} {metric} vs state size", f"{task}_{metric}_vs_state.png",
                          lambda r, p, t=task, m=metric: plot_accuracy_vs_state(r, p, t, m)))
        if info.get("position_curve"):
            plots.append((f"{task} loss by token position", f"{task}_loss_by_position.png",
                          lambda r, p, t=task, c=info["position_curve"]: plot_loss_by_position(r, p, t, c)))
    plots.append(("prefill latency vs context", "latency_vs_context.png", plot_latency))
    for kind, name, fn in plots:
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
        f"- started {results.get('started')}, finished {results.get('finished', '(unfinished: continue with --resume)')}, "
        f"elapsed {results.get('elapsed_s', 0):.0f} s",
        f"- machine: {results['machine'].get('processor')} ({results['machine'].get('cpu_count')} cores, "
        f"{results['machine'].get('torch_threads')} torch threads), device `{rc['device']}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        "- recipe (identical for every cell): AdamW β (0.9, 0.95), weight decay 0.1 on matrices, grad clip 1.0, "
        f"linear warmup then cosine decay; same data, token budget and evaluation; seeds from {rc['seed']} "
        "(a seed sets the initialisation and the order of the training data; the held-out sets are fixed)",
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
                f"- `{task}`: up to {t['steps']} steps × batch {t['batch_size']}, d_model {t['d_models']}, "
                f"{t['n_layers']} blocks, data {t['task_config']}"
            )
    sp = cfg.get("speed") or {}
    if sp and any(c.get("speed") for c in results["cells"].values()):
        lines.append(
            f"- speed: model d_model {sp.get('d_model')}, {sp.get('n_layers')} blocks, batch 1, median of "
            f"{sp.get('repeats')} after {sp.get('warmup')} warm-up"
        )
    lines += [
        "",
        "## Results",
        "",
        "Task columns at each backbone's largest width; mean [min–max] over the seeds run at the winning "
        "learning rate (one value: one seed)." + "".join(
            f" {info['notes']}" for info in task_infos(results).values() if info.get("notes")),
        "",
        markdown_table(header, rows),
        "",
    ]
    if cfg.get("variants"):
        lines += ladder_lines(results)
    for task, info in task_infos(results).items():
        if cfg.get("variants") or not any(len(widths(cfg["tasks"][task], bb)) > 1 for bb in rc["backbones"]):
            continue
        h, r = width_rows(results, task, compared(info)[0])
        lines += [
            f"## {task} at every width",
            "",
            "The winning learning rate of those tried (a rate that reached the early-stopping threshold "
            "ends the sweep), the steps its first seed ran, and the state size.",
            "",
            markdown_table(h, r),
            "",
        ]
    noise = noise_lines(results)
    if noise:
        lines += [
            "## Differences and noise",
            "",
            "Every pair of cells per backbone at the largest width: `>` when the seeds' [min, max] intervals do "
            "not overlap, `≈` when they do (within noise) or when both reach the solve threshold. A cell with "
            "one seed is a point: a difference against it rests on that seed.",
            "",
            *noise,
            "",
        ]
    for title, name in plots.items():
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    failed = {k: c["errors"] for k, c in results["cells"].items() if c.get("errors")}
    if failed:
        lines += ["## Failures", ""]
        for k, errs in failed.items():
            for unit, err in errs.items():
                lines.append(f"- `{k}` {unit}: {err}")
        lines.append("")
    if results.get("claims"):
        lines += [
            "## What this run reproduces",
            "",
            "Known claims, each checked against this run's numbers (computed, see `claims` in results.json):",
            "",
            *claim_lines(results),
            "",
        ]
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
        caption="median of repeats after warm-up [IQR]; GFLOP/s from each layer's analytic count "
        "(its flops(T))",
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
