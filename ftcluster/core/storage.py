"""Run storage: a run folder on this disk, on a shared mount, or in an object store (s3://, gs://, abfs://).

A run whose ``output.dir`` is a URI is written to a local working copy on each node (under the
cache, `staging_dir`) and mirrored to the store by the workers: every checkpoint (each node
uploads the shards it wrote, then rank 0 its own files, the trainer state last and `latest` after
it), then at the end `final/`, the evaluations and `summary.json` last. An object is only visible
once it is complete, and a reader trusts a checkpoint only once `latest` names it and a run only
once `summary.json` exists, so a crash at any moment leaves the last complete state readable.

The filesystems are pyarrow's (what Ray Train uses for its own storage). S3-compatible stores
(MinIO, Ceph, a loopback test server) take their endpoint from ``AWS_ENDPOINT_URL``; credentials come
from the usual places (environment, instance role, ~/.aws).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ftcluster.core.errors import FtError, first_line

URI = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<rest>.*)$")
# Settings of the store that are not secrets: they travel from the driver to every Ray worker.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def forwarded_settings(keep_here: str) -> dict[str, str]:
    """What travels from this shell to the processes a run starts elsewhere: ftcluster's own settings
    (FTCLUSTER_*, but not ``keep_here``, which names something of this machine) and the storage's
    endpoint and region; never credentials (the nodes have their own)."""
    return {key: value for key, value in os.environ.items()
            if (key.startswith("FTCLUSTER_") and key != keep_here) or key in STORAGE_ENV}


def is_uri(location: str | os.PathLike) -> bool:
    """An object-store URI (s3://bucket/run), as opposed to a local or mounted path (file:// counts as local)."""
    found = URI.match(str(location))
    return found is not None and found.group("scheme").lower() != "file"


def local_path(location: str) -> Path:
    """A local location as a Path (file:///x → /x)."""
    return Path(location.removeprefix("file://"))


def cache_root() -> Path:
    """Where working copies of remote runs live on this node: $FTCLUSTER_CACHE, else ~/.cache/ftcluster."""
    return Path(os.environ.get("FTCLUSTER_CACHE") or Path.home() / ".cache" / "ftcluster").expanduser()


def staging_dir(uri: str) -> Path:
    """This node's working copy of the run at ``uri`` (the same path on every node, each on its own disk)."""
    found = URI.match(uri.rstrip("/"))
    assert found, uri
    parts = [part for part in found.group("rest").split("/") if part not in ("", ".", "..")]
    return cache_root() / "runs" / found.group("scheme").lower() / Path(*parts)


class RemoteFolder:
    """A folder in an object store, by URI; paths below it are given as parts ("checkpoints", "latest")."""

    def __init__(self, uri: str) -> None:
        import pyarrow.fs as pafs

        self.uri = uri.rstrip("/")
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        except (OSError, ValueError) as exc:  # (pyarrow's ArrowInvalid is a ValueError)
            raise FtError(f"{self.uri}: not a storage location this machine can open ({first_line(exc)})") from None

    def __str__(self) -> str:
        return self.uri

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def child(self, *parts: str) -> str:
        """The URI of a path below this folder."""
        return "/".join([self.uri, *parts])

    def _call(self, what: str, function, *args):
        try:
            return function(*args)
        except OSError as exc:
            raise FtError(f"{self.uri}: {what} failed ({first_line(exc)}); check the store, its credentials "
                          "and AWS_ENDPOINT_URL for S3-compatible stores") from None

    def kind(self, *parts: str) -> str:
        """"file", "dir" or "missing"."""
        import pyarrow.fs as pafs

        info = self._call("reading", self.fs.get_file_info, self.path(*parts))
        if info.type == pafs.FileType.File:
            return "file"
        return "dir" if info.type == pafs.FileType.Directory else "missing"

    def stat(self, *parts: str) -> tuple[int, int]:
        """A file's size and modification time (nanoseconds; 0 where the store keeps none)."""
        info = self._call("reading", self.fs.get_file_info, self.path(*parts))
        return info.size or 0, info.mtime_ns or 0

    def exists(self, *parts: str) -> bool:
        return self.kind(*parts) != "missing"

    def read_text(self, *parts: str) -> str | None:
        """A small file's text, or None when it does not exist."""
        if self.kind(*parts) != "file":
            return None

        def read() -> str:
            with self.fs.open_input_stream(self.path(*parts)) as stream:
                return stream.read().decode()

        return self._call("reading", read)

    def write_text(self, text: str, *parts: str) -> None:
        """One object, written whole (an object store shows it only once it is complete)."""

        def write() -> None:
            with self.fs.open_output_stream(self.path(*parts)) as stream:
                stream.write(text.encode())

        self._call("writing", write)

    def names(self, *parts: str) -> list[str]:
        """The entries directly below a folder (empty when it does not exist)."""
        import pyarrow.fs as pafs

        if self.kind(*parts) != "dir":
            return []
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(info.base_name for info in self._call("listing", self.fs.get_file_info, selector))

    def upload(self, local: Path, *parts: str) -> None:
        """A local file or folder (its whole tree) to this path; existing objects are overwritten."""
        import pyarrow.fs as pafs

        self._call("uploading", pafs.copy_files, str(local), self.path(*parts), pafs.LocalFileSystem(), self.fs)

    def download(self, local: Path, *parts: str) -> Path:
        """This path (a file or a whole folder) to ``local``, through a temporary name: a reader of
        ``local`` never sees half a download, and two processes fetching the same thing both succeed."""
        import pyarrow.fs as pafs

        local.parent.mkdir(parents=True, exist_ok=True)
        incoming = local.parent / f".incoming-{os.getpid()}-{local.name}"
        shutil.rmtree(incoming, ignore_errors=True)
        source = self.path(*parts)
        if self.kind(*parts) == "dir":  # pyarrow does not create the local folders: one file at a time
            selector = pafs.FileSelector(source, recursive=True)
            for info in self._call("listing", self.fs.get_file_info, selector):
                if info.type == pafs.FileType.File:
                    target = incoming / info.path[len(source):].lstrip("/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self._call("downloading", pafs.copy_files, info.path, str(target), self.fs, pafs.LocalFileSystem())
        else:
            self._call("downloading", pafs.copy_files, source, str(incoming), self.fs, pafs.LocalFileSystem())
        if local.is_dir():
            shutil.rmtree(local)
        elif local.exists():
            local.unlink()
        try:
            os.replace(incoming, local)
        except OSError:  # another process put it there first
            shutil.rmtree(incoming, ignore_errors=True)
        return local

    def delete(self, *parts: str) -> None:
        """A file or a folder's whole tree; nothing when it does not exist."""
        kind = self.kind(*parts)
        if kind == "dir":
            self._call("deleting", self.fs.delete_dir, self.path(*parts))
        elif kind == "file":
            self._call("deleting", self.fs.delete_file, self.path(*parts))

    def probe_writable(self) -> None:
        """Write and remove a small object: a store that refuses writes fails now, not at the first checkpoint."""
        name = f".write-probe-{os.getpid()}"
        self.write_text("ok", name)
        self.delete(name)
