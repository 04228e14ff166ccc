"""The sweep's results, read back from the trials' own folders: leaderboard (CSV, JSON), best.yaml.

Reading the trial folders (not only Ray Tune's memory) means `ftcluster report SWEEP` and a
resumed sweep see the same numbers, including for trials the scheduler stopped.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ftcluster.core.atomic import write_text_atomic
from ftcluster.core.errors import FtError
from ftcluster.runs.layout import METRICS, RUN_SPEC, SUMMARY
from ftcluster.sweep.trial import TRIAL_INFO, TRIALS
from ftcluster.track.tables import searched_keys

LEADERBOARD_JSON = "leaderboard.json"
LEADERBOARD_CSV = "leaderboard.csv"
BEST_SPEC = "best.yaml"

# A trial's outcome as the leaderboard shows it.
COMPLETED, STOPPED, ERROR, INTERRUPTED = "completed", "stopped early", "error", "interrupted"


@dataclass
class TrialRow:
    trial: str
    params: dict[str, Any]
    metric: float | None  # the last evaluation's value (what ASHA compares)
    best_metric: float | None
    steps: int
    status: str
    tokens: int
    gpu_hours: float
    cpu_core_hours: float
    cost_usd: float | None
    train_seconds: float  # wall time from the trial's first to its last record (evaluations included)
    error: str | None = None


def read_records(folder: Path) -> list[dict[str, Any]]:
    path = folder / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trial_row(folder: Path, metric: str, mode: str, sweep_finished: bool) -> TrialRow:
    info = json.loads((folder / TRIAL_INFO).read_text())
    records = read_records(folder)
    scored = [r[metric] for r in records if r.get(metric) is not None]
    progress: dict[str, Any] = next((r for r in reversed(records) if "tokens" in r), {})
    if info["status"] == "error":
        status = ERROR
    elif (folder / SUMMARY).is_file():  # the loop's last act: the trial ran to its end
        status = COMPLETED
    else:  # the scheduler ended it (or the sweep was interrupted while it ran)
        status = STOPPED if sweep_finished else INTERRUPTED
    return TrialRow(
        trial=info["trial_id"],
        params=info["params"],
        metric=scored[-1] if scored else None,
        best_metric=(min(scored) if mode == "min" else max(scored)) if scored else None,
        steps=max((r.get("step", 0) for r in records), default=0),
        status=status,
        tokens=progress.get("tokens", 0),
        gpu_hours=progress.get("gpu_hours", 0.0),
        cpu_core_hours=progress.get("cpu_core_hours", 0.0),
        cost_usd=progress.get("cost_usd"),
        train_seconds=_elapsed(records),
        error=info.get("error"),
    )


def _elapsed(records: list[dict[str, Any]]) -> float:
    times = [r["time"] for r in records if "time" in r]
    return max(times) - min(times) if len(times) > 1 else 0.0


def collect_rows(sweep_dir: Path, metric: str, mode: str, sweep_finished: bool) -> list[TrialRow]:
    """Every trial of the sweep, best first (trials without a metric last)."""
    folders = sorted(p.parent for p in (sweep_dir / TRIALS).glob(f"*/{TRIAL_INFO}"))
    rows = [trial_row(folder, metric, mode, sweep_finished) for folder in folders]
    sign = 1 if mode == "min" else -1
    return sorted(rows, key=lambda r: (r.metric is None, sign * r.metric if r.metric is not None else 0, r.trial))


def pareto_front(points: list[tuple[float, float]], mode: str) -> list[int]:
    """Indices of the (cost, metric) points no other point beats on both: cheaper-or-equal and
    better-or-equal, strictly on one. Sorted by cost."""
    sign = 1 if mode == "min" else -1
    front = []
    for i, (cost, value) in enumerate(points):
        dominated = any(
            c <= cost and sign * v <= sign * value and (c < cost or sign * v < sign * value)
            for j, (c, v) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def totals(rows: list[TrialRow]) -> dict[str, Any]:
    costs = [r.cost_usd for r in rows if r.cost_usd is not None]
    return {
        "trials": len(rows),
        "completed": sum(r.status == COMPLETED for r in rows),
        "stopped_early": sum(r.status == STOPPED for r in rows),
        "errors": sum(r.status == ERROR for r in rows),
        "steps": sum(r.steps for r in rows),
        "tokens": sum(r.tokens for r in rows),
        "gpu_hours": sum(r.gpu_hours for r in rows),
        "cpu_core_hours": sum(r.cpu_core_hours for r in rows),
        "cost_usd": sum(costs) if costs else None,
    }


def write_leaderboard(sweep_dir: Path, rows: list[TrialRow], metric: str, mode: str, extra: dict[str, Any]) -> None:
    """leaderboard.json (rows, totals, the Pareto front) and leaderboard.csv (one column per key)."""
    # Completed trials only: a trial the scheduler stopped is cheap because it stopped, and its metric is
    # that of a shorter run; it is no setup one could choose for its price.
    priced = [r for r in rows if r.status == COMPLETED and r.cost_usd is not None and r.metric is not None]
    points = [(float(r.cost_usd or 0), float(r.metric or 0)) for r in priced]  # (neither is None here)
    document = {
        "metric": metric,
        "mode": mode,
        "rows": [asdict(r) for r in rows],
        "totals": totals(rows),
        "pareto_front": [priced[i].trial for i in pareto_front(points, mode)],
        **extra,
    }
    write_text_atomic(sweep_dir / LEADERBOARD_JSON, json.dumps(document, indent=1, default=str))
    keys = searched_keys(r.params for r in rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = ["rank", "trial", *keys, metric, f"best_{metric}", "steps", "status", "tokens", "gpu_hours",
               "cpu_core_hours", "cost_usd", "train_seconds"]
    writer.writerow(columns)
    for rank, r in enumerate(rows, 1):
        writer.writerow([rank, r.trial, *(_cell(r.params.get(k)) for k in keys), r.metric, r.best_metric, r.steps,
                         r.status, r.tokens, r.gpu_hours, r.cpu_core_hours, r.cost_usd, r.train_seconds])
    write_text_atomic(sweep_dir / LEADERBOARD_CSV, buffer.getvalue())


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def read_leaderboard(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / LEADERBOARD_JSON
    if not path.is_file():
        raise FtError(f"{sweep_dir}: no {LEADERBOARD_JSON}; pass a folder written by `ftcluster tune`")
    return json.loads(path.read_text())


def write_best_spec(sweep_dir: Path, rows: list[TrialRow], sweep_name: str, run_location: str) -> Path | None:
    """best.yaml: the best completed trial's full job spec, runnable as is (into ``run_location``, a new
    folder of the sweep's: SWEEP/best-run).

    Completed trials come first: a trial the scheduler stopped would train longer when rerun.
    """
    ranked = [r for r in rows if r.metric is not None and r.status == COMPLETED]
    ranked += [r for r in rows if r.metric is not None and r.status not in (COMPLETED, ERROR)]
    best = ranked[0] if ranked else None
    if best is None:
        return None
    spec = yaml.safe_load((sweep_dir / TRIALS / best.trial / RUN_SPEC).read_text())
    spec["name"] = f"{sweep_name}-best"
    spec["output"] = {"dir": run_location, "overwrite": False}
    header = (f"# Best trial {best.trial} of sweep {sweep_name}: {best.metric} ({best.status}).\n"
              f"# Run it: ftcluster train {BEST_SPEC} (this file; its run goes to {run_location})\n")
    path = sweep_dir / BEST_SPEC
    write_text_atomic(path, header + yaml.safe_dump(spec, sort_keys=False))
    return path
