"""Tokenized data kept as Arrow files that every process opens instead of tokenizing again.

    CACHE/<key>/train.arrow    one row per training sequence: input_ids, trained, label, ...
    CACHE/<key>/val.arrow      the same for validation, plus each example as JSON (for generation)
    CACHE/<key>/meta.json      label names, the data report, few-shot examples, answer counts, the
                               files' checksums; written last, so a folder with it is complete

An entry whose files no longer match their checksums (truncated, overwritten, deleted) is rebuilt.

The key hashes what the tokens depend on (see `dataset.cache_key`). A process reads a sequence
only when the training loop asks for it, with positional reads of just its bytes (see `_Column`):
its resident memory does not grow with the data set.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from ftcluster.core.checksums import damaged, digests
from ftcluster.data.formats import Example
from ftcluster.data.render import Encoded

TRAIN_FILE, VAL_FILE, META_FILE = "train.arrow", "val.arrow", "meta.json"
CHECKSUMS = "checksums"  # meta.json: each file's digest when written
EXAMPLE = "example"  # val.arrow: each validation example, as JSON
BATCH_ROWS = 8192  # sequences per Arrow record batch on write


def _schema(with_examples: bool):
    import pyarrow as pa

    fields = [
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("trained", pa.list_(pa.int8())),
        pa.field("label", pa.int32()),
        pa.field("positions", pa.list_(pa.int32())),
        pa.field("rejected_input_ids", pa.list_(pa.int32())),
        pa.field("rejected_trained", pa.list_(pa.int8())),
    ]
    if with_examples:
        fields.append(pa.field(EXAMPLE, pa.string()))
    return pa.schema(fields)


class SequenceWriter:
    """Appends encoded sequences (and, for validation, their examples) to an Arrow IPC file in batches."""

    def __init__(self, path: Path, with_examples: bool = False) -> None:
        import pyarrow as pa

        self.schema = _schema(with_examples)
        self.with_examples = with_examples
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._pending: list[tuple[Encoded, Example | None]] = []

    def add(self, encoded: Encoded, example: Example | None = None) -> None:
        self._pending.append((encoded, example))
        if len(self._pending) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._pending:
            return
        items = [item for item, _ in self._pending]
        columns: dict[str, Any] = {
            "input_ids": [item.input_ids for item in items],
            "trained": [[int(t) for t in item.trained] for item in items],
            "label": [item.label for item in items],
            "positions": [item.positions for item in items],
            "rejected_input_ids": [item.rejected.input_ids if item.rejected else None for item in items],
            "rejected_trained": [[int(t) for t in item.rejected.trained] if item.rejected else None for item in items],
        }
        if self.with_examples:
            columns[EXAMPLE] = [json.dumps(example.__dict__) if example else None for _, example in self._pending]
        self._writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self._pending = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()


class _Column:
    """One column of every record batch, read with positional reads at its buffers' places in the file.

    Only the file's structure is memory-mapped (to find the buffers). Reading a row's values through
    the map would leave the pages around it (the kernel maps 64 KiB per fault) resident in every
    worker, growing with the data set; a read of just the row's bytes does not.
    """

    def __init__(self, file: int, base: int, chunks: list, dtype: type) -> None:
        self.file, self.dtype = file, np.dtype(dtype)
        import pyarrow as pa

        kind = chunks[0].type
        self.nested = pa.types.is_list(kind) or pa.types.is_string(kind)  # offsets, then values
        self.offsets_at: list[int] = []
        self.values_at: list[int] = []
        self.valid: list[Any] = []  # per chunk: None (no nulls), False (all null) or the validity bitmap
        for chunk in chunks:
            nulls = chunk.null_count
            self.valid.append(None if nulls == 0 else False if nulls == len(chunk) else chunk.is_valid())
            buffers = chunk.buffers()
            if self.valid[-1] is False:  # (no values to find)
                self.offsets_at.append(0)
                self.values_at.append(0)
            elif self.nested:
                self.offsets_at.append(buffers[1].address - base + chunk.offset * 4)
                data = buffers[3] if len(buffers) > 3 else buffers[2]  # list's child values, or the string bytes
                self.values_at.append(data.address - base if data is not None else 0)
            else:
                self.values_at.append(buffers[1].address - base + chunk.offset * self.dtype.itemsize)

    def _present(self, chunk: int, row: int) -> bool:
        valid = self.valid[chunk]
        return valid is None or (valid is not False and valid[row].as_py())

    def _read(self, at: int, count: int, dtype: np.dtype) -> np.ndarray:
        return np.frombuffer(os.pread(self.file, count * dtype.itemsize, at), dtype=dtype)

    def values(self, chunk: int, row: int) -> np.ndarray | None:
        """A list row's values (a string row's bytes), or None for a null."""
        if not self._present(chunk, row):
            return None
        start, end = self._read(self.offsets_at[chunk] + row * 4, 2, np.dtype(np.int32))
        return self._read(self.values_at[chunk] + int(start) * self.dtype.itemsize, int(end - start), self.dtype)

    def scalar(self, chunk: int, row: int) -> int | None:
        if not self._present(chunk, row):
            return None
        return int(self._read(self.values_at[chunk] + row * self.dtype.itemsize, 1, self.dtype)[0])


# Each column's element type in the file.
COLUMN_TYPES = {"input_ids": np.int32, "trained": np.int8, "label": np.int32, "positions": np.int32,
                "rejected_input_ids": np.int32, "rejected_trained": np.int8, EXAMPLE: np.uint8}


class EncodedSequences(Sequence[Encoded]):
    """The sequences of one cache file, read on access (index or slice), in write order."""

    def __init__(self, path: Path) -> None:
        import mmap

        import pyarrow as pa

        self.path = path
        self._file = os.open(path, os.O_RDONLY)
        with open(path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        whole = pa.py_buffer(self._map)
        reader = pa.ipc.open_file(whole)
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self._starts = list(np.cumsum([0, *[b.num_rows for b in batches]]).tolist())
        self._length = self._starts[-1]
        self._columns = {name: _Column(self._file, whole.address, [b.column(name) for b in batches], COLUMN_TYPES[name])
                         for name in reader.schema.names} if batches else {}
        self._token_count = sum(len(b.column("input_ids").values) for b in batches)

    def __del__(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            os.close(self._file)

    def __len__(self) -> int:
        return self._length

    def _locate(self, index: int) -> tuple[int, int]:
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(index)
        chunk = bisect.bisect_right(self._starts, index) - 1
        return chunk, index - self._starts[chunk]

    def _list(self, name: str, chunk: int, row: int) -> list[int] | None:
        values = self._columns[name].values(chunk, row)
        return values.tolist() if values is not None else None

    @overload
    def __getitem__(self, index: int) -> Encoded: ...

    @overload
    def __getitem__(self, index: slice) -> list[Encoded]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        chunk, row = self._locate(index)
        encoded = Encoded(self._list("input_ids", chunk, row) or [],
                          [bool(t) for t in self._list("trained", chunk, row) or []],
                          label=self._columns["label"].scalar(chunk, row),
                          positions=self._list("positions", chunk, row))
        rejected = self._list("rejected_input_ids", chunk, row)
        if rejected is not None:
            encoded.rejected = Encoded(rejected, [bool(t) for t in self._list("rejected_trained", chunk, row) or []])
        return encoded

    def example(self, index: int) -> Example:
        assert EXAMPLE in self._columns, f"{self.path} holds no examples"
        raw = self._columns[EXAMPLE].values(*self._locate(index))
        assert raw is not None
        return Example(**json.loads(raw.tobytes()))

    def labels(self) -> list[int]:
        """Every sequence's class id (classification)."""
        column = self._columns["label"] if self._length else None
        return [label for index in range(self._length)
                if column is not None and (label := column.scalar(*self._locate(index))) is not None]

    def total_tokens(self) -> int:
        return self._token_count


class ExampleSequence(Sequence[Example]):
    """The validation examples stored beside their sequences."""

    def __init__(self, sequences: EncodedSequences) -> None:
        self._sequences = sequences

    def __len__(self) -> int:
        return len(self._sequences)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._sequences.example(i) for i in range(*index.indices(len(self)))]
        return self._sequences.example(index)


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """meta.json last: the entry is complete. It records the digests of the files it describes."""
    names = [name for name in (TRAIN_FILE, VAL_FILE) if (folder / name).is_file()]
    (folder / META_FILE).write_text(json.dumps({**meta, CHECKSUMS: digests(folder, names)}))


def damaged_files(folder: Path, meta: dict[str, Any]) -> list[str]:
    """The entry's files that are missing or changed since it was written (all of them if unrecorded)."""
    recorded = meta.get(CHECKSUMS)
    return damaged(folder, recorded) if isinstance(recorded, dict) and recorded else [TRAIN_FILE, VAL_FILE]


def read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def building(root: Path, key: str, damage: list[str] | None = None) -> Iterator[Path | None]:
    """Hold the key's lock; yields a fresh folder to build in, or None when the entry is complete and
    intact (another process may have built it while this one waited). A damaged entry is built again,
    its damaged files added to ``damage``. The built folder is moved into place atomically, so a crash
    leaves no half entry."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = read_meta(root / key)
        bad = damaged_files(root / key, meta) if meta is not None else []
        if meta is not None and not bad:
            yield None
            return
        if damage is not None:
            damage += bad
        incoming = root / f".incoming-{key}-{os.getpid()}"
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir()
        try:
            yield incoming
            shutil.rmtree(root / key, ignore_errors=True)
            os.replace(incoming, root / key)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
