"""Terminal tables: parameter counts, the end-of-run summary, before/after comparisons."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from ftcluster.evaluation.forgetting import changes as forgetting_changes

# Metrics where lower is better (for the arrow in the change column).
LOWER_IS_BETTER = ("loss", "perplexity")


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def param_table(parts: dict, method: str) -> Table:
    """Trainable vs total parameters by model part, for the method in use."""
    table = Table(title=f"Parameters ({method})")
    table.add_column("part", style="bold")
    table.add_column("trainable", justify="right")
    table.add_column("total", justify="right")
    table.add_column("%", justify="right")
    trainable = sum(c.trainable for c in parts.values())
    total = sum(c.total for c in parts.values())
    for name, counts in [*parts.items(), ("all", type(next(iter(parts.values())))(trainable, total))]:
        table.add_row(name, f"{counts.trainable:,}", f"{counts.total:,}", f"{counts.percent:.2f}")
    return table


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"Run summary: {summary['name']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    rows = [
        ("method", summary["method"]),
        ("trainable params", (f"{summary['trainable_params']:,} of {summary['total_params']:,} "
                              f"({100 * summary['trainable_params'] / max(summary['total_params'], 1):.2f}%)")),
        ("steps", f"{summary['steps']} of {summary['total_steps']} ({summary['epochs']} epochs)"),
        ("stopped", summary["stop_reason"]),
        ("tokens", summary["tokens"]),
        ("train time", format_duration(summary["train_seconds"])),
        ("evaluation time", format_duration(summary.get("eval_seconds", 0.0))),
        ("tokens/s", f"{summary['tokens_per_s']:,.0f}"),
        ("peak memory (MB)", f"{summary['peak_memory_mb']:,.0f}"),
        ("workers x device", f"{summary['world_size']} x {summary['device']} ({summary['precision']})"),
    ]
    hours = (f"{summary['gpu_hours']:.4f} GPU-hours" if summary.get("device_kind", "cpu") != "cpu"
             else f"{summary.get('cpu_core_hours', 0):.4f} CPU core-hours")
    rows.append(("compute", f"{hours} ({summary.get('device_kind', 'cpu')})"))
    if summary.get("cost_usd") is not None:
        rows.append(("cost", f"${summary['cost_usd']:.4f} (${summary['cost_per_million_tokens_usd']:.4f} per M tokens)"))
    rows.append(("MFU", f"{100 * summary['mfu']:.1f}%" if summary.get("mfu") else "n/a (no known peak FLOPs for this device)"))
    if summary.get("best", {}).get("value") is not None:
        best = summary["best"]
        rows.append((f"best {best['metric']}", f"{best['value']:.4f} at step {best['step']}"))
    for key, value in rows:
        table.add_row(key, _fmt(value))
    return table


def before_after_table(before: dict[str, float], after: dict[str, float], title: str = "Base model vs fine-tuned") -> Table:
    table = Table(title=title)
    table.add_column("metric", style="bold")
    table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    table.add_column("change", justify="right")
    for key in after:
        if key not in before:
            continue
        change = after[key] - before[key]
        better = change < 0 if any(word in key for word in LOWER_IS_BETTER) else change > 0
        style = "green" if better else ("red" if change else "")
        table.add_row(key, _fmt(before[key]), _fmt(after[key]), f"[{style}]{change:+.4f}[/]" if style else "0")
    return table


def samples_table(before: list[dict], after: list[dict], show: int) -> Table | None:
    if not after or show <= 0:
        return None
    table = Table(title="Held-out generations", show_lines=True)
    table.add_column("reference")
    table.add_column("base")
    table.add_column("fine-tuned")
    old = {s["prompt"]: s for s in before}
    for sample in after[:show]:
        base = old.get(sample["prompt"], {})
        table.add_row(sample["reference"], _mark(base), _mark(sample))
    return table


def confusion_table(labels: list[str], matrix: list[list[int]]) -> Table:
    table = Table(title="Confusion matrix (rows: actual, columns: predicted)")
    table.add_column("actual \\ predicted", style="bold")
    for label in labels:
        table.add_column(label, justify="right")
    for label, row in zip(labels, matrix):
        table.add_row(label, *[f"[green]{n}[/]" if i == labels.index(label) else str(n) for i, n in enumerate(row)])
    return table


def _mark(sample: dict) -> str:
    if not sample:
        return ""
    text = sample["output"].strip().replace("\n", " ")[:120]
    return f"{'[green]✓[/]' if sample['match'] else '[red]✗[/]'} {text}"


def print_run_tables(summary: dict[str, Any], show_samples: int = 3, console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(summary))
    if summary.get("before"):
        console.print(before_after_table(summary["before"], summary["after"]))
    if summary.get("confusion"):
        console.print(confusion_table(summary["confusion"]["labels"], summary["confusion"]["matrix"]))
    samples = samples_table(summary["samples"]["before"], summary["samples"]["after"], show_samples)
    if samples is not None:
        console.print(samples)
    for line in (few_shot_line(summary), forgetting_line(summary)):
        if line:
            console.print(line)


def few_shot_line(summary: dict[str, Any]) -> str | None:
    """Did fine-tuning beat prompting the base model with a few examples? (By choice accuracy where the
    answers are choices: exact match would count a right answer put in other words as wrong.)"""
    few, after = summary.get("few_shot"), summary.get("after", {})
    if not few:
        return None
    key = next((k for k in ("choice_accuracy", "exact_match") if k in few and after.get(k) is not None), None)
    if key is None:
        return None
    gap = (after[key] - few[key]) * 100
    if gap > 2:
        verdict = f"fine-tuning wins by {gap:.0f} points"
    elif gap >= -2:
        verdict = "prompting is about as good: fine-tuning may not be needed"
    else:
        verdict = f"[yellow]prompting wins by {-gap:.0f} points[/]"
    label = key.replace("_", " ")
    return (f"Fine-tune vs prompt: base model with {few['shots']} examples in the prompt: {label} "
            f"{few[key]:.2f}; fine-tuned: {after[key]:.2f} — {verdict}")


def forgetting_line(summary: dict[str, Any]) -> str | None:
    result = summary.get("forgetting")
    if not result:
        return None
    colour = "red" if result["exceeded"] else "green"
    state = "ABOVE" if result["exceeded"] else "within"
    return (f"Forgetting check: {'; '.join(forgetting_changes(result))} "
            f"([{colour}]{state} the {result['threshold_pct']:g}% threshold[/])")


def _gb(value: float) -> str:
    return f"{value / 1e9:,.1f} GB"


def plan_tables(plan) -> list[Table]:
    """The planner's per-GPU and per-node memory, and time and cost per epoch."""
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    device = "CPU worker" if plan.cpu else "GPU"
    memory = Table(title=f"Plan: {plan.setup.label()} on {'CPU' if plan.cpu else plan.gpu_type} — {verdict}")
    memory.add_column(f"per {device}", style="bold")
    memory.add_column("bytes", justify="right")
    for key, value in plan.gpu_bytes.items():
        memory.add_row(key, _gb(value))
    memory.add_row("[bold]total[/] (capacity)", f"{_gb(plan.gpu_total)} ({_gb(plan.gpu_capacity)})")
    host = Table(title="Host RAM per node")
    host.add_column("per node", style="bold")
    host.add_column("bytes", justify="right")
    for key, value in plan.host_bytes_per_node.items():
        host.add_row(key, _gb(value))
    host.add_row("[bold]total[/] (capacity)", f"{_gb(plan.host_total)} ({_gb(plan.host_capacity)})")
    epoch = Table(title="Per epoch", show_header=False)
    epoch.add_column("what", style="bold")
    epoch.add_column("value")
    approx = " (estimated at 4 characters per token)" if plan.tokens_estimated else ""
    epoch.add_row("parameters", f"{plan.trainable_params:,} trainable of {plan.total_params:,}")
    epoch.add_row("tokens", f"{plan.tokens_per_epoch:,}{approx}")
    epoch.add_row("FLOPs per token", f"{plan.flops_per_token:,}")
    if plan.hours_per_epoch is not None:
        epoch.add_row("time", f"{plan.hours_per_epoch:,.2f} h at {100 * plan.mfu:.0f}% MFU")
    if plan.cost_per_epoch is not None:
        epoch.add_row("cost", f"${plan.cost_per_epoch:,.2f} ({plan.hours_per_epoch * plan.setup.world:,.1f} GPU-hours)")
    return [memory, host, epoch]


def suggestions_table(plans: list, top: int) -> Table:
    table = Table(title=f"Feasible setups, cheapest first ({len(plans)} fit)")
    for column in ("#", "setup", "GPU memory", "host RAM/node", "hours/epoch", "$ / epoch"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    for rank, plan in enumerate(plans[:top], start=1):
        table.add_row(
            str(rank), plan.setup.label(), f"{_gb(plan.gpu_total)} / {_gb(plan.gpu_capacity)}", _gb(plan.host_total),
            f"{plan.hours_per_epoch:,.2f}" if plan.hours_per_epoch is not None else "?",
            f"{plan.cost_per_epoch:,.2f}" if plan.cost_per_epoch is not None else "?",
        )
    return table


def searched_keys(params: Iterable[Mapping[str, Any]]) -> list[str]:
    """A sweep's searched keys, from its trials' values, in the order they first appear (a sweep
    table's columns: terminal, CSV, HTML and W&B alike)."""
    return list(dict.fromkeys(key for values in params for key in values))


def leaderboard_table(rows: list, metric: str, title: str, limit: int = 20) -> Table:
    """Sweep trials, best first: values, metric, steps, outcome, tokens and cost."""
    keys = searched_keys(r.params for r in rows)
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(keys):  # two keys end alike: show them whole
        short = {k: k for k in keys}
    hours = [("GPU-h", "gpu_hours"), ("CPU-h", "cpu_core_hours")]
    hours = [(label, attr) for label, attr in hours if any(getattr(r, attr) for r in rows)]
    table = Table(title=title)
    for column in ("#", "trial", *short.values(), metric, "steps", "outcome", "tokens", *(h for h, _ in hours), "USD"):
        table.add_column(column, justify="left" if column in ("trial", "outcome") else "right")
    for rank, r in enumerate(rows[:limit], 1):
        values = [_short_value(r.params.get(k)) for k in keys]
        table.add_row(str(rank), r.trial, *values, _fmt(r.metric) if r.metric is not None else "-", str(r.steps),
                      r.status, f"{r.tokens:,}", *(f"{getattr(r, attr):.4f}" for _, attr in hours),
                      f"{r.cost_usd:.4f}" if r.cost_usd is not None else "-")
    return table


def _short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    return text if len(text) <= 30 else text[:27] + "..."


def _clock(milliseconds: int | None) -> str:
    import datetime

    if not milliseconds:
        return "-"
    return datetime.datetime.fromtimestamp(milliseconds / 1000).strftime("%Y-%m-%d %H:%M:%S")


def job_status_table(info: dict[str, Any], summary: dict[str, Any] | None) -> Table:
    table = Table(title=f"Job {info['job_id']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for label, value in (("status", info["status"]), ("name", info["name"]), ("spec sha256", info["spec_sha256"]),
                         ("entrypoint", info["entrypoint"]), ("started", _clock(info["start_time"])),
                         ("ended", _clock(info["end_time"]))):
        table.add_row(label, str(value) if value is not None else "-")
    for key, value in (summary or {}).items():
        if isinstance(value, dict):
            for metric, number in value.items():
                table.add_row(f"{key} {metric}", _fmt(number))
        elif value is not None:
            table.add_row(key, _fmt(value))
    return table


def jobs_table(rows: list[dict[str, Any]], address: str) -> Table:
    table = Table(title=f"Jobs on {address}")
    for column in ("job id", "status", "name", "started", "entrypoint"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["job_id"], row["status"], row["name"], _clock(row["start_time"]), row["entrypoint"])
    return table
