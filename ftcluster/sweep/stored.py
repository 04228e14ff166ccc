"""A sweep whose folder is a storage URI (`ftcluster tune --out s3://bucket/sweeps/x`).

Everything lands in the store: each trial is a run with its own URI (SWEEP/trials/<id>, mirrored
by the trial as any run in storage is), Ray Tune keeps its experiment state in SWEEP/tune, and
the driver pushes sweep.json at the start and the leaderboards, best.yaml and its W&B summary run
at the end. The driver (and `report`, and `tune --resume` on another machine) works in a local
copy under the cache (`storage.staging_dir`), pulling the trials' files into it to read them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ftcluster.core.errors import FtError
from ftcluster.core.storage import RemoteFolder, is_uri, local_path, staging_dir
from ftcluster.runs.mirror import LOCAL_ONLY
from ftcluster.sweep.trial import TRIALS

SWEEP_FILE = "sweep.json"
TUNE_DIR = "tune"
# Files of the sweep itself (the trials' are pushed by the trials): what the driver sends at the end.
SWEEP_RESULTS = ("leaderboard.json", "leaderboard.csv", "best.yaml", "wandb")


def sweep_remote(location: str) -> RemoteFolder | None:
    """The sweep's folder in its store, or None for a sweep on a path."""
    return RemoteFolder(location) if is_uri(location) else None


def sweep_location(location: str | Path) -> str:
    """A URI as given (no trailing slash), a path made absolute (Tune's actors may start elsewhere)."""
    text = str(location)
    return text.rstrip("/") if is_uri(text) else str(local_path(text).resolve())


def working_folder(location: str) -> Path:
    """Where this machine reads and writes the sweep: the folder itself, or its copy of a URI's."""
    return staging_dir(location) if is_uri(location) else Path(location)


def pull_sweep(remote: RemoteFolder, local: Path) -> None:
    """The sweep's own files and every trial's run files (not their checkpoints) into ``local``."""
    for name in remote.names():
        if name not in (TRIALS, TUNE_DIR) and not name.startswith("."):
            remote.download(local / name, name)
    for trial in remote.names(TRIALS):
        for name in remote.names(TRIALS, trial):
            if name not in LOCAL_ONLY:
                remote.download(local / TRIALS / trial / name, TRIALS, trial, name)


def push_sweep_results(remote: RemoteFolder, local: Path) -> None:
    """The leaderboards, best.yaml and the W&B summary run, from the local copy to the store."""
    for name in SWEEP_RESULTS:
        if (local / name).exists():
            remote.upload(local / name, name)


def open_sweep(location: str) -> Path:
    """A sweep to read (`report`): a local folder as it is, a URI's fetched to this machine's copy."""
    remote = sweep_remote(location)
    if remote is None:
        return local_path(location)
    if not remote.exists(SWEEP_FILE):
        raise FtError(f"{remote}: no {SWEEP_FILE}; pass the --out of a `ftcluster tune` sweep")
    local = working_folder(remote.uri)
    pull_sweep(remote, local)
    return local


def clear_sweep(location: str) -> None:
    """A sweep replaced (--force): its folder, in the store and on this machine."""
    remote = sweep_remote(location)
    if remote is not None:
        for name in remote.names():
            remote.delete(name)
    shutil.rmtree(working_folder(location), ignore_errors=True)


def is_sweep(location: str) -> bool:
    """Whether ``location`` holds a sweep (rather than a run)."""
    remote = sweep_remote(location)
    return remote.exists(SWEEP_FILE) if remote is not None else (local_path(location) / SWEEP_FILE).is_file()
