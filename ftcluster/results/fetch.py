"""Bring a finished run to this machine: its final weights, summary, metrics, evaluations and a report.

The copy is a run folder of its own (without the training checkpoints), so `ftcluster eval`,
`export` and `report` work on it offline; `--merge` adds `merged/`, a folder plain `transformers`
loads.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ftcluster.core.atomic import atomic_directory
from ftcluster.core.errors import FtError
from ftcluster.runs.folder import final_weights, load_run
from ftcluster.runs.mirror import LOCAL_ONLY

MERGED = "merged"


@dataclass
class Fetched:
    folder: Path
    weights: Path  # final/adapter or final/model, or merged/ with --merge
    report: Path
    size_bytes: int


def fetch_run(location: str | Path, out: Path, *, merge: bool = False, force: bool = False) -> Fetched:
    """Copy the finished run at ``location`` (a folder or a storage URI) to ``out``, then write its report."""
    from ftcluster.results.report import write_run_report
    from ftcluster.runs.export import export_run

    run, _spec, _summary = load_run(location)
    final_weights(run)  # a run whose weights are incomplete is refused before anything is copied
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise FtError(f"fetch: --out {out} is inside the run it would copy ({run}); pick another folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise FtError(f"fetch: {out} exists and is not empty; pass --force to replace it")
    with atomic_directory(out) as staging:
        for item in sorted(run.iterdir()):
            if item.name in LOCAL_ONLY or item.name == MERGED or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, staging / item.name)
            else:
                shutil.copy2(item, staging / item.name)
    report = write_run_report(out)
    weights = final_weights(out)[0]
    if merge:
        weights = export_run(out, out / MERGED, merge=True, force=True)
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    return Fetched(out, weights, report, size)
