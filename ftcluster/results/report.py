"""`ftcluster report RUN`: a self-contained HTML page (PNG plots inlined) a person can open."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from ftcluster.core.atomic import write_text_atomic
from ftcluster.core.errors import FtError
from ftcluster.core.storage import RemoteFolder, is_uri
from ftcluster.runs.layout import METRICS, SUMMARY
from ftcluster.runs.mirror import open_run
from ftcluster.track.tables import searched_keys

REPORT = "report.html"


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plots(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    plt = _pyplot()

    steps = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    panels = [
        ("Loss", [("train", steps, "train_loss"), ("validation", evals, "val_loss")], "loss"),
        ("Throughput", [("tokens/s", steps, "tokens_per_s")], "tokens / s"),
        ("Memory", [("peak", steps, "peak_memory_mb")], "MB"),
        ("Cost over time", [("cumulative", steps, "cost_usd")], "USD"),
    ]
    images = []
    for title, series, unit in panels:
        figure, axis = plt.subplots(figsize=(6, 3.2))
        plotted = False
        for label, rows, key in series:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", markersize=3, label=label)
                plotted = True
        if not plotted:
            axis.text(0.5, 0.5, "not recorded in this run", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_ylabel(unit)
        axis.grid(alpha=0.3)
        if len(series) > 1 and plotted:
            axis.legend()
        images.append((title, _png(figure)))
        plt.close(figure)
    return images


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.4g}"
    return str(value)


def write_report(location: str) -> tuple[str, Path]:
    """report.html for a run or a sweep (a folder or a storage URI): where it is stored, and the file here.

    A URI's report goes into the store beside the run's other files, and the copy it was written in
    stays on this machine: a browser opens a file, not an s3:// URI.
    """
    from ftcluster.sweep.stored import is_sweep, open_sweep

    local = write_sweep_report(open_sweep(location)) if is_sweep(location) else write_run_report(location)
    if not is_uri(location):
        return str(local), local
    remote = RemoteFolder(location.rstrip("/"))
    remote.upload(local, REPORT)
    return remote.child(REPORT), local


def write_run_report(run_dir: str | Path) -> Path:
    run = open_run(run_dir)
    if not (run / METRICS).is_file():
        raise FtError(f"{run}: no {METRICS}; pass the output.dir of a `ftcluster train` run")
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines() if line.strip()]
    summary = json.loads((run / SUMMARY).read_text()) if (run / SUMMARY).is_file() else {}
    keys = ("name", "method", "model", "steps", "stop_reason", "tokens", "tokens_per_s", "mfu", "peak_memory_mb",
            "gpu_hours", "cpu_core_hours", "cost_usd", "cost_per_million_tokens_usd", "cost_per_point_usd")
    overview = _table([(k, summary[k]) for k in keys if k in summary]) if summary else "<p>Run not finished.</p>"
    comparison = ""
    if summary.get("before"):
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{summary['before'][k]:.4f}</td><td>{v:.4f}</td></tr>"
            for k, v in summary["after"].items() if k in summary["before"]
        )
        comparison = f"<h2>Base vs fine-tuned</h2><table><tr><th></th><th>base</th><th>fine-tuned</th></tr>{rows}</table>"
    figures = "".join(_figure(title, data) for title, data in _plots(records))
    out = run / REPORT
    write_text_atomic(out, _page(f"ftcluster run: {summary.get('name', run.name)}",
                                 f"<h2>Overview</h2>{overview}{comparison}<h2>Curves</h2>{figures}"))
    return out


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}}figure{{display:inline-block;margin:0.5em;max-width:100%}}
img{{max-width:100%}}.wide{{overflow-x:auto;max-width:100%}}.wide table{{font-size:0.9em}}
.wide td{{white-space:nowrap;padding:3px 6px}}.wide th{{padding:3px 6px;vertical-align:bottom}}</style>
</head><body><h1>{html.escape(title)}</h1>
{body}</body></html>
"""


def _figure(title: str, data: str) -> str:
    return f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"></figure>'


def _sweep_plots(sweep_dir: Path, board: dict[str, Any]) -> list[tuple[str, str]]:
    """Metric vs dollars per trial with the Pareto front; the metric over steps for every trial."""
    from ftcluster.sweep.leaderboard import read_records
    from ftcluster.sweep.trial import TRIALS

    plt = _pyplot()
    metric, rows = board["metric"], board["rows"]
    front = set(board["pareto_front"])
    images = []
    figure, axis = plt.subplots(figsize=(6, 3.8))
    priced = [r for r in rows if r["cost_usd"] is not None and r["metric"] is not None]
    for status, marker in (("completed", "o"), ("stopped early", "x"), ("interrupted", "s")):
        points = [(r["cost_usd"], r["metric"]) for r in priced if r["status"] == status]
        if points:
            axis.scatter(*zip(*points), marker=marker, label=status)
    on_front = sorted((r["cost_usd"], r["metric"]) for r in priced if r["trial"] in front)
    if on_front:
        axis.step(*zip(*on_front), where="post", color="black", linewidth=1, label="Pareto front (completed trials)")
    if not priced:
        axis.text(0.5, 0.5, "no priced trials", ha="center", va="center", transform=axis.transAxes)
    axis.set_title(f"{metric} vs cost per trial")
    axis.set_xlabel("USD")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    axis.legend()
    images.append(("Quality vs cost", _png(figure)))
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(6, 3.8))
    for row in rows:
        points = [(r["step"], r[metric]) for r in read_records(sweep_dir / TRIALS / row["trial"]) if r.get(metric) is not None]
        if points:
            axis.plot(*zip(*points), marker="o", markersize=3, label=row["trial"])
    axis.set_title(f"{metric} over steps (trials the scheduler stopped end early)")
    axis.set_xlabel("step")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    if len(rows) <= 12:
        axis.legend(fontsize=7)
    images.append(("Metric over steps", _png(figure)))
    plt.close(figure)
    return images


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """SWEEP/report.html: totals, the leaderboard, quality vs dollars with the Pareto front, curves."""
    from ftcluster.sweep.leaderboard import read_leaderboard

    sweep = Path(sweep_dir)
    board = read_leaderboard(sweep)
    metric, rows = board["metric"], board["rows"]
    keys = searched_keys(r["params"] for r in rows)
    # Dotted keys may break after each dot: the table stays within a laptop's window (it scrolls beyond).
    head = "".join(f"<th>{'.<wbr>'.join(html.escape(part) for part in c.split('.'))}</th>" for c in (
        "#", "trial", *keys, metric, "steps", "outcome", "tokens", "GPU-h", "CPU core-h", "USD", "Pareto"))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in (
            rank, r["trial"], *(r["params"].get(k) for k in keys), r["metric"], r["steps"], r["status"], r["tokens"],
            r["gpu_hours"], r["cpu_core_hours"], r["cost_usd"], "yes" if r["trial"] in board["pareto_front"] else ""))
        + "</tr>"
        for rank, r in enumerate(rows, 1)
    )
    overview = _table([*board["totals"].items(), ("interrupted", board.get("interrupted")),
                       ("budget reached", board.get("budget_reached"))])
    figures = "".join(_figure(title, data) for title, data in _sweep_plots(sweep, board))
    out = sweep / REPORT
    write_text_atomic(out, _page(f"ftcluster sweep: {board.get('sweep', sweep.name)}",
                                 f"<h2>Totals</h2>{overview}<h2>Leaderboard ({board['mode']} {html.escape(metric)})</h2>"
                                 f"<div class=\"wide\"><table><tr>{head}</tr>{body}</table></div><h2>Plots</h2>{figures}"))
    return out
