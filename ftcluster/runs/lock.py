"""One `train` per run folder at a time: the folder (or the store's run) is locked for the run's length.

Two trains into one output.dir would interleave metrics.jsonl, prune each other's checkpoints and
overwrite each other's results. The first claims the run; any other is refused in one line naming the
holder. On a path the claim is an OS lock on OUTPUT/.lock (flock: the kernel drops it when the
process ends, however it ends). In an object store, which has no locks, it is a lease: OUTPUT/.lock
names its holder and an expiry that a thread renews; a crashed holder's lease runs out after
LEASE_S, and two claims racing each other are settled by reading the lease back after SETTLE_S.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ftcluster.config.spec import JobSpec
from ftcluster.core.errors import FtError
from ftcluster.core.storage import RemoteFolder
from ftcluster.runs.layout import RUN_LOCK as LOCK
from ftcluster.runs.mirror import remote_of
from ftcluster.runs.paths import RunPaths

LEASE_S = 90.0  # a store lease's life; renewed every LEASE_S / 3
SETTLE_S = 1.0  # after writing a lease, wait this long and read it back: a racing claim has landed by then


def holder_record(expires: float | None = None) -> dict:
    return {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
            "expires": expires}


def in_use(where: str, holder: dict | None) -> FtError:
    who = (f" by pid {holder.get('pid')} on {holder.get('host')}, since "
           f"{time.strftime('%H:%M:%S', time.localtime(holder.get('since', 0)))}") if holder else ""
    return FtError(f"output.dir: {where} is in use{who} (another `ftcluster train` writes there); wait for it to end, "
                   "or choose another output.dir")


@contextlib.contextmanager
def run_lock(spec: JobSpec) -> Iterator[None]:
    """Hold the run's folder (and, for a URI, the store's run) while the block runs."""
    paths, remote = RunPaths.of(spec), remote_of(spec)
    with folder_lock(paths.local, paths.location):
        if remote is None:
            yield
        else:
            with store_lease(remote):
                yield


@contextlib.contextmanager
def folder_lock(out: Path, where: str) -> Iterator[None]:
    """flock on OUT/.lock, removed when released (an earlier run's folder is left as it was); where the
    folder cannot hold one (a file, read-only), the output checks that follow say why."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = _locked(out / LOCK, where)
    except OSError:
        yield
        return
    with handle:
        handle.truncate()
        handle.write(json.dumps(holder_record()))
        handle.flush()
        try:
            yield
        finally:
            (out / LOCK).unlink(missing_ok=True)  # before unlocking: a waiter then finds no file, or a new one
            fcntl.flock(handle, fcntl.LOCK_UN)


def _locked(path: Path, where: str) -> IO[str]:
    """The lock file, opened and flocked; the file a releasing holder removed is not the lock (retried)."""
    while True:
        handle = open(path, "a+")  # noqa: SIM115 (returned locked, closed by the caller)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _parsed(handle.read())
            handle.close()
            raise in_use(where, holder) from None
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            handle.seek(0)
            return handle
        handle.close()


def _parsed(text: str | None) -> dict | None:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


@contextlib.contextmanager
def store_lease(remote: RemoteFolder) -> Iterator[None]:
    """A lease on the store's run: refused while another holder's lease is current; renewed while held."""
    current = _parsed(remote.read_text(LOCK))
    if current is not None and (current.get("expires") or 0) > time.time():
        raise in_use(remote.uri, current)
    mine = holder_record(time.time() + LEASE_S)
    remote.write_text(json.dumps(mine), LOCK)
    time.sleep(SETTLE_S)
    landed = _parsed(remote.read_text(LOCK))
    if landed is None or landed.get("owner") != mine["owner"]:
        raise in_use(remote.uri, landed)
    done = threading.Event()

    def renew() -> None:
        while not done.wait(LEASE_S / 3):
            with contextlib.suppress(FtError):
                remote.write_text(json.dumps({**mine, "expires": time.time() + LEASE_S}), LOCK)

    renewer = threading.Thread(target=renew, name="run-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join()
        with contextlib.suppress(FtError):
            if (_parsed(remote.read_text(LOCK)) or {}).get("owner") == mine["owner"]:
                remote.delete(LOCK)
