"""`ftcluster report RUN`: a self-contained HTML page (PNG plots inlined) a person can open."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from ftcluster.atomic import write_text_atomic
from ftcluster.errors import FtError
from ftcluster.layout import METRICS, SUMMARY

REPORT = "report.html"


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def write_run_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
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
    figures = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"></figure>'
        for title, data in _plots(records)
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ftcluster report: {html.escape(summary.get('name', run.name))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}}figure{{display:inline-block;margin:0.5em}}</style>
</head><body><h1>ftcluster run: {html.escape(summary.get('name', run.name))}</h1>
<h2>Overview</h2>{overview}{comparison}<h2>Curves</h2>{figures}</body></html>
"""
    out = run / REPORT
    write_text_atomic(out, page)
    return out
