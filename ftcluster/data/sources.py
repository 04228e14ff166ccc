"""Where a job's rows come from: `data.train` / `data.validation` name one of

    a file (.jsonl .json .csv .parquet)       data/train.jsonl
    a folder of such files, or a glob         data/shards/   data/shards/part-*.parquet
    the same in an object store               s3://bucket/data/part-*.jsonl   s3://bucket/data/
    a `datasets.save_to_disk` folder          data/reviews-hf          (`data.split` picks the split)
    a Hugging Face hub dataset                hf:stanfordnlp/imdb      (online only; `data.split` too)

Each row keeps its origin (file:line, or shard:row) for error messages. A source's `fingerprint`
is a hash of its content (not of names or dates): the tokenized-data cache is keyed by it.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ftcluster.core.errors import DataError, first_line
from ftcluster.core.locations import HUB_PREFIX, is_glob, is_remote
from ftcluster.core.storage import URI, RemoteFolder, cache_root, is_uri
from ftcluster.data.readers import SUFFIXES, Row, iter_rows

SAVED_DATASET_FILES = ("dataset_dict.json", "dataset_info.json", "state.json")  # what save_to_disk writes


@dataclass(frozen=True)
class Shard:
    """One data file: ``name`` as messages show it (a path or URI), ``path`` where it is read (a
    URI's shard is fetched to this machine's cache first)."""

    name: str
    path: Path


class Source:
    """The rows of one `data.train` / `data.validation` value."""

    def __init__(self, location: str, split: str = "train") -> None:
        self.location = location
        self.split = split
        self._shards: list[Shard] | None = None  # found once (a URI's: listed and fetched once)

    def rows(self) -> Iterator[Row]:
        if not self.is_files():
            yield from self._dataset_rows()
            return
        for shard in self.shards():
            yield from iter_rows(shard.path, shard.name)

    def fingerprint(self) -> str:
        """A hash of the rows' content (and, for a `datasets` source, the split)."""
        digest = hashlib.blake2b(digest_size=16)
        if self._is_hub():
            digest.update(f"{self.location}[{self.split}]{self._dataset()._fingerprint}".encode())
            return digest.hexdigest()
        files = sorted(p for p in Path(self.location).rglob("*") if p.is_file()) if self._is_saved_dataset() else [
            shard.path for shard in self.shards()]
        digest.update(self.split.encode() if self._is_saved_dataset() else b"")
        for path in files:
            digest.update(_file_digest(path))
        return digest.hexdigest()

    # --- files, folders, globs, URIs ----------------------------------------------------------------

    def shards(self) -> list[Shard]:
        """The data files, in name order; a URI's are fetched to the cache."""
        if self._shards is None:
            self._shards = self._find_shards()
        return self._shards

    def _find_shards(self) -> list[Shard]:
        if is_uri(self.location):
            return _remote_shards(self.location)
        path = Path(self.location)
        if is_glob(self.location):
            paths = [Path(p) for p in sorted(glob.glob(self.location, recursive=True)) if Path(p).is_file()]
        elif path.is_dir():
            paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            return [Shard(str(path), path)]
        else:
            raise DataError(f"{self.location}: data file not found")
        if not paths:
            raise DataError(f"{self.location}: no data files ({', '.join(SUFFIXES)}) match")
        return [Shard(str(p), p) for p in paths]

    # --- Hugging Face datasets ---------------------------------------------------------------------

    def _is_hub(self) -> bool:
        return self.location.startswith(HUB_PREFIX)

    def is_files(self) -> bool:
        """Data files (one, a folder's, a glob's, a URI's), as opposed to a `datasets` source."""
        return not (self._is_hub() or self._is_saved_dataset())

    def _is_saved_dataset(self) -> bool:
        folder = Path(self.location)
        return not is_uri(self.location) and folder.is_dir() and any((folder / n).is_file() for n in SAVED_DATASET_FILES)

    def _dataset(self):
        import datasets  # type: ignore[import-untyped]

        try:
            if self._is_hub():
                return datasets.load_dataset(self.location[len(HUB_PREFIX):], split=self.split)
            loaded = datasets.load_from_disk(self.location)
        except Exception as exc:  # datasets raises many kinds (offline, missing split, corrupt files)
            raise DataError(f"{self.location}: cannot load the dataset ({first_line(exc)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if self.split not in loaded:
                raise DataError(f"{self.location}: no split {self.split!r} (it has {', '.join(loaded)}); set data.split")
            return loaded[self.split]
        return loaded

    def _dataset_rows(self) -> Iterator[Row]:
        name = f"{self.location}[{self.split}]"
        for index, record in enumerate(self._dataset()):
            yield Row(f"{name}:row {index}", record)


def is_local_file(location: str) -> bool:
    """A single file on this machine (what `submit` and `render k8s` can ship with the job)."""
    return not is_remote(location) and Path(location).is_file()


def _file_digest(path: Path) -> bytes:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "blake2b").digest()


def _remote_shards(location: str) -> list[Shard]:
    """A URI of one object, of a folder (every data file under it), or a glob in its last part."""
    found = URI.match(location)
    assert found is not None
    head, _, last = location.rstrip("/").rpartition("/")
    if is_glob(last):
        folder, pattern = RemoteFolder(head), last
    else:
        whole = RemoteFolder(location)
        kind = whole.kind()
        if kind == "file":
            return [_fetch(whole, location)]
        if kind == "missing":
            raise DataError(f"{location}: no such object or folder in the store")
        folder, pattern = whole, "*"
    names = [n for n in folder.names() if fnmatch.fnmatch(n, pattern) and Path(n).suffix.lower() in SUFFIXES]
    if not names:
        raise DataError(f"{location}: no data files ({', '.join(SUFFIXES)}) match")
    return [_fetch(RemoteFolder(folder.child(name)), folder.child(name)) for name in names]


def _fetch(remote: RemoteFolder, uri: str) -> Shard:
    """One object into the cache, fetched again only when its size or modification time changed."""
    found = URI.match(uri)
    assert found is not None
    local = cache_root() / "data" / "fetched" / found.group("scheme") / found.group("rest")
    stamp = local.with_name(local.name + ".stamp")
    size, mtime_ns = remote.stat()
    wanted = json.dumps({"size": size, "mtime_ns": mtime_ns})
    if not (local.is_file() and stamp.is_file() and stamp.read_text() == wanted):
        remote.download(local)
        stamp.write_text(wanted)
    return Shard(uri, local)
