"""Atomic writes: a reader sees the old file/folder or the complete new one, never a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ftcluster.core.errors import naming


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a crash or power loss keeps it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and every folder entry to disk (before renaming it into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(folder))


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file under a temporary name, flush it to disk, then rename it into place (durably)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give it a normal file's mode
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; when the block succeeds it replaces
    ``target`` by a rename, when it fails it is removed and ``target`` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield staging
        fsync_tree(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        fsync_directory(target.parent)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        named = naming(exc, target)
        if named is exc:
            raise
        raise named from exc
