"""Make a run look as if it had stopped right after one of its checkpoints (tests and benchmarks of
`--resume`): a finished run's own last checkpoint is its end, with nothing left to train."""

from __future__ import annotations

import shutil
from pathlib import Path

from ftcluster.core.storage import RemoteFolder, is_uri
from ftcluster.runs.layout import CHECKPOINTS, LATEST, checkpoint_name

FINISHED = ("final", "summary.json", "eval_after.json")  # what a run writes once its steps are done


def rewind(run: str, step: int) -> None:
    """A run (a folder or a storage URI) as if it had stopped right after its checkpoint of `step`: later
    checkpoints, the final weights and evaluation and the summary go; `latest` names that step."""
    keep = checkpoint_name(step)
    if is_uri(run):
        remote = RemoteFolder(run)
        for name in remote.names(CHECKPOINTS):
            if name.startswith("step-") and name > keep:
                remote.delete(CHECKPOINTS, name)
        for name in FINISHED:
            remote.delete(name)
        remote.write_text(keep + "\n", CHECKPOINTS, LATEST)
        return
    folder = Path(run)
    for later in (p for p in (folder / CHECKPOINTS).glob("step-*") if p.name > keep):
        shutil.rmtree(later)
    shutil.rmtree(folder / "final", ignore_errors=True)
    for name in FINISHED[1:]:
        (folder / name).unlink(missing_ok=True)
    (folder / CHECKPOINTS / LATEST).write_text(keep + "\n")
