"""A run whose output.dir is a storage URI: mirroring it there as it trains, and reading it back.

Writers work in a local copy (`RunPaths.local`, under the cache on every node) and push:
`push_checkpoint` after every checkpoint (each node's shards, then rank 0's files, the trainer
state, `latest`), `push_run_files` after every checkpoint and at the end (`summary.json` last).
Readers (`eval`, `export`, `report`, `train --resume`, a restarted worker) pull what they need
into the same local copy. See ftcluster/core/storage.py for the storage itself.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ftcluster.config.spec import JobSpec
from ftcluster.core.errors import FtError
from ftcluster.core.storage import RemoteFolder, is_uri, local_path, staging_dir
from ftcluster.core.worker import WorkerContext
from ftcluster.runs.layout import CHECKPOINTS, LATEST, RUN_LOCK, SUMMARY, TRAINER_STATE
from ftcluster.runs.paths import RunPaths

# Not mirrored with the run files: checkpoints go by push_checkpoint; Ray's own storage, a replaced
# run's parked files, temporary names and write probes stay local.
LOCAL_ONLY = {CHECKPOINTS, "ray", ".previous", "failed"}
UPLOAD_CLAIM = ".uploading"


def remote_of(spec: JobSpec) -> RemoteFolder | None:
    """The run's folder in its store, or None for a run on a path."""
    uri = RunPaths.of(spec).uri
    return _remote_folder(uri, os.environ.get("AWS_ENDPOINT_URL")) if uri else None


@functools.lru_cache(maxsize=8)
def _remote_folder(uri: str, endpoint: str | None) -> RemoteFolder:
    """One per URI (and S3 endpoint) per process: opening an S3 filesystem may ask the store for the
    bucket's region, and the run's folder is looked up at every checkpoint."""
    del endpoint  # (part of the cache key only: RemoteFolder reads it from the environment)
    return RemoteFolder(uri)


def push_checkpoint(spec: JobSpec, ctx: WorkerContext, folder: Path) -> None:
    """Every worker, after `save_checkpoint`: the checkpoint of this step, complete, in the store.

    Under DeepSpeed every worker wrote its shard in its own node's copy; the nodes other than rank
    0's still hold them in the staging folder, which one worker of that node uploads. Rank 0 then
    uploads its files with the trainer state last, then the run files (metrics up to this step), and
    `latest` after all of them: whoever resumes from the store's latest finds everything it needs.
    """
    remote = remote_of(spec)
    if remote is None:
        return
    if not ctx.is_main:
        _upload_node_shards(remote, folder.parent / f".tmp-{folder.name}", folder.name)
    ctx.barrier()
    if ctx.is_main:
        for item in sorted(folder.iterdir()):
            if item.name != TRAINER_STATE:
                remote.upload(item, CHECKPOINTS, folder.name, item.name)
        remote.upload(folder / TRAINER_STATE, CHECKPOINTS, folder.name, TRAINER_STATE)
        push_run_files(spec)
        remote.write_text(folder.name + "\n", CHECKPOINTS, LATEST)
        steps = [name for name in remote.names(CHECKPOINTS) if name.startswith("step-")]
        for old in steps[:-spec.training.keep_checkpoints]:
            remote.delete(CHECKPOINTS, old)
    ctx.barrier()


def _upload_node_shards(remote: RemoteFolder, shards: Path, name: str) -> None:
    """The shards this node's workers wrote, uploaded once: the worker that claims the folder first
    does it (by the disk, not by Ray's local rank, which counts nodes by IP address)."""
    try:
        os.close(os.open(shards / UPLOAD_CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except (FileExistsError, FileNotFoundError):  # another worker of this node has it, or this is rank 0's node
        return
    for item in sorted(shards.iterdir()):
        if item.name != UPLOAD_CLAIM:
            remote.upload(item, CHECKPOINTS, name, item.name)
    shutil.rmtree(shards, ignore_errors=True)


# What push_run_files last sent from each local file: (size, modification time). A file that has
# not changed since is not sent again (W&B's files and the evaluations grow once, metrics every step).
_pushed: dict[Path, tuple[int, int]] = {}


def push_run_files(spec: JobSpec, finished: bool = False) -> None:
    """Rank 0: the run's files other than checkpoints, those changed since the last push;
    `summary.json` (the run is finished) last."""
    remote = remote_of(spec)
    if remote is None:
        return
    out = RunPaths.of(spec).local
    for item in sorted(out.iterdir()):
        if item.name in LOCAL_ONLY or item.name == SUMMARY or item.name.startswith("."):
            continue
        for file in sorted(item.rglob("*")) if item.is_dir() else [item]:
            stat = file.stat() if file.is_file() else None
            if stat is not None and _pushed.get(file) != (stat.st_size, stat.st_mtime_ns):
                remote.upload(file, *file.relative_to(out).parts)
                _pushed[file] = (stat.st_size, stat.st_mtime_ns)
    if finished:
        remote.upload(out / SUMMARY, SUMMARY)


def clear_remote_run(spec: JobSpec) -> None:
    """A fresh run (output.overwrite) into a URI that holds an earlier one: its files go first.
    The summary goes first of all, so the folder never looks like a finished run with missing parts."""
    remote = remote_of(spec)
    if remote is None:
        return
    for file in [file for file in _pushed if RunPaths.of(spec).local in file.parents]:
        del _pushed[file]  # deleted there: send them again
    remote.delete(SUMMARY)
    for name in remote.names():
        if name not in ("ray", RUN_LOCK):  # (the lock is this run's own)
            remote.delete(name)


def remote_latest(remote: RemoteFolder) -> tuple[str, dict[str, Any]] | None:
    """The newest complete checkpoint in the store: its folder name and trainer state."""
    name = (remote.read_text(CHECKPOINTS, LATEST) or "").strip()
    state = remote.read_text(CHECKPOINTS, name, TRAINER_STATE) if name else None
    return (name, json.loads(state)) if state else None


def pull_checkpoint(spec: JobSpec, ctx: WorkerContext, resume: bool, launch: str | None) -> Path | None:
    """Every worker, before training: the checkpoint this worker resumes from, fetched to its node.

    With --resume, the store's latest; in a worker group that Ray restarted after a failure, the
    latest written by this launch (``launch``; a fresh launch does not continue an older run).
    A fresh start clears stale checkpoints from this node's copy.
    """
    remote = remote_of(spec)
    if remote is None:
        return None
    root = RunPaths.of(spec).local / CHECKPOINTS
    latest = remote_latest(remote)
    wanted = latest is not None and (resume or (launch is not None and latest[1].get("launch") == launch))
    if not wanted:
        if resume:
            raise FtError(f"--resume: {remote.child(CHECKPOINTS)} has no complete checkpoint to resume from")
        if ctx.local_rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        return None
    assert latest is not None
    name = latest[0]
    if not (root / name / TRAINER_STATE).is_file():
        remote.download(root / name, CHECKPOINTS, name)
    if ctx.is_main:
        for item in remote.names():
            if item not in LOCAL_ONLY and item != SUMMARY:
                remote.download(RunPaths.of(spec).local / item, item)
    ctx.barrier()
    return root / name


def remote_summary(spec: JobSpec) -> dict[str, Any]:
    """The summary a finished run wrote to its store (the driver may run on another node than rank 0)."""
    remote = remote_of(spec)
    assert remote is not None
    text = remote.read_text(SUMMARY)
    if text is None:
        raise FtError(f"{remote}: training ended but {SUMMARY} is not in the store")
    return json.loads(text)


def open_run(location: str | Path, checkpoint: str | None = None) -> Path:
    """A run folder to read: a local path as it is, a URI's run fetched to this machine's copy.

    What is fetched: everything but the checkpoints (and Ray's files), plus the one ``checkpoint``
    asked for (a step-N name or "latest"). A copy whose summary equals the store's is reused.
    """
    if not is_uri(location):
        return local_path(str(location))
    remote = RemoteFolder(str(location))
    local = staging_dir(remote.uri)
    if not remote.exists():
        raise FtError(f"{remote}: nothing there; pass the output.dir of a `ftcluster train` run")
    summary = remote.read_text(SUMMARY)
    fresh = summary is not None and (local / SUMMARY).is_file() and (local / SUMMARY).read_text() == summary
    if not fresh:
        for name in remote.names():
            if name not in LOCAL_ONLY:
                remote.download(local / name, name)
    if checkpoint is not None:
        name = checkpoint
        if checkpoint == "latest":
            latest = remote_latest(remote)
            name = latest[0] if latest else checkpoint
        if remote.exists(CHECKPOINTS, name, TRAINER_STATE):
            remote.download(local / CHECKPOINTS / name, CHECKPOINTS, name)
            (local / CHECKPOINTS / LATEST).write_text(name + "\n")
    return local


def display_checkpoint(spec: JobSpec, local: Path | None) -> str | None:
    """How to name a checkpoint to the user: its URI when the run lives in a store (where the
    store's latest counts, since rank 0 may have run on another node than this one)."""
    remote = remote_of(spec)
    if remote is None:
        return str(local) if local else None
    latest = remote_latest(remote)
    return remote.child(CHECKPOINTS, latest[0]) if latest else None

