"""A hard memory cap for a group of processes on this machine: a child of this process's own memory
cgroup (v1 `memory.limit_in_bytes` or v2 `memory.max`), so a test "node" has the RAM it says it has.

Why a cgroup: `setrlimit` caps address space, not memory (torch and Ray map far more than they
touch), and Linux ignores RLIMIT_RSS. A process the cap stops is killed inside its cgroup only:
whatever overruns it, the machine's other processes keep their memory. Processes started by a caged
process (Ray's raylet starting workers) are caged too.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def own_memory_cgroup() -> Path | None:
    """This process's memory cgroup folder, if it can have children here (root, writable)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = ROOT / "memory" / path.lstrip("/")
        elif controllers == "" and (ROOT / "cgroup.controllers").is_file():  # a pure v2 machine
            folder = ROOT / path.lstrip("/")
        else:
            continue
        if folder.is_dir() and os.access(folder, os.W_OK):
            return folder
    return None


def unavailable() -> str | None:
    """Why no cage can be made here (None: it can)."""
    if os.geteuid() != 0:
        return "memory caps need root (cgroups)"
    if own_memory_cgroup() is None:
        return "no writable memory cgroup for this process"
    return None


class MemoryCage:
    """A memory cgroup with a limit; processes join it with `add`."""

    def __init__(self, limit_bytes: int, name: str = "") -> None:
        parent = own_memory_cgroup()
        if parent is None:
            raise RuntimeError(unavailable() or "no memory cgroup")
        self.folder = parent / f"ftcluster-{name or 'cage'}-{uuid.uuid4().hex[:8]}"
        self.folder.mkdir()
        self.v1 = (self.folder / "memory.limit_in_bytes").exists()
        self.limit = limit_bytes
        (self.folder / ("memory.limit_in_bytes" if self.v1 else "memory.max")).write_text(str(limit_bytes))

    def add(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # gone meanwhile
            (self.folder / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        return [int(pid) for pid in (self.folder / "cgroup.procs").read_text().split()]

    def oom_kills(self) -> int:
        """How many processes the cap killed (the kernel's count for this cgroup)."""
        events = self.folder / ("memory.oom_control" if self.v1 else "memory.events")
        for line in events.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def close(self) -> None:
        """Remove the cgroup once its processes are gone (those left move back to the parent)."""
        parent = self.folder.parent / "cgroup.procs"
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, OSError):
                parent.write_text(str(pid))
        with contextlib.suppress(OSError):
            self.folder.rmdir()
