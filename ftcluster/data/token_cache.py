"""Tokenized data kept as Arrow files that every process memory-maps instead of tokenizing again.

    CACHE/<key>/train.arrow    one row per training sequence: input_ids, trained, label, ...
    CACHE/<key>/val.arrow      the same for validation, plus each example as JSON (for generation)
    CACHE/<key>/meta.json      label names, the data report, few-shot examples, answer counts;
                               written last, so a folder with it is complete

The key hashes what the tokens depend on (see `dataset.cache_key`). A process reads a sequence
only when the training loop asks for it: its resident memory holds the pages it touched, not the
data set (the offsets index is itself memory-mapped).
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

from ftcluster.data.formats import Example
from ftcluster.data.render import Encoded

TRAIN_FILE, VAL_FILE, META_FILE = "train.arrow", "val.arrow", "meta.json"
EXAMPLE = "example"  # val.arrow: each validation example, as JSON
BATCH_ROWS = 2048  # sequences per Arrow record batch on write


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
        self.count = 0
        self.tokens = 0

    def add(self, encoded: Encoded, example: Example | None = None) -> None:
        self._pending.append((encoded, example))
        self.count += 1
        self.tokens += len(encoded.input_ids)
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
    """A list<int> column of every record batch, read as NumPy views over the memory map."""

    def __init__(self, chunks: list) -> None:
        self.offsets = [np.asarray(chunk.offsets) for chunk in chunks]
        self.values = [np.asarray(chunk.values) for chunk in chunks]
        self.valid = [chunk.is_valid() if chunk.null_count else None for chunk in chunks]

    def get(self, chunk: int, row: int) -> list[int] | None:
        valid = self.valid[chunk]
        if valid is not None and not valid[row].as_py():
            return None
        offsets = self.offsets[chunk]
        return self.values[chunk][offsets[row]:offsets[row + 1]].tolist()


class EncodedSequences(Sequence[Encoded]):
    """The sequences of one cache file, read on access (index or slice), in write order."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        self.path = path
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self._starts = list(np.cumsum([0, *[b.num_rows for b in batches]]).tolist())
        self._length = self._starts[-1]
        columns = {name: [b.column(name) for b in batches] for name in reader.schema.names}
        self._lists = {name: _Column(columns[name]) for name in
                       ("input_ids", "trained", "positions", "rejected_input_ids", "rejected_trained")}
        self._labels = [chunk.to_numpy(zero_copy_only=False) if chunk.null_count == 0 else None
                        for chunk in columns["label"]]
        self._examples = columns.get(EXAMPLE)

    def __len__(self) -> int:
        return self._length

    def _locate(self, index: int) -> tuple[int, int]:
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(index)
        chunk = bisect.bisect_right(self._starts, index) - 1
        return chunk, index - self._starts[chunk]

    @overload
    def __getitem__(self, index: int) -> Encoded: ...

    @overload
    def __getitem__(self, index: slice) -> list[Encoded]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        chunk, row = self._locate(index)
        ids = self._lists["input_ids"].get(chunk, row)
        trained = [bool(t) for t in self._lists["trained"].get(chunk, row) or []]
        labels = self._labels[chunk]
        encoded = Encoded(ids or [], trained, label=int(labels[row]) if labels is not None else None,
                          positions=self._lists["positions"].get(chunk, row))
        rejected = self._lists["rejected_input_ids"].get(chunk, row)
        if rejected is not None:
            encoded.rejected = Encoded(rejected, [bool(t) for t in self._lists["rejected_trained"].get(chunk, row) or []])
        return encoded

    def example(self, index: int) -> Example:
        assert self._examples is not None, f"{self.path} holds no examples"
        chunk, row = self._locate(index)
        return Example(**json.loads(self._examples[chunk][row].as_py()))

    def labels(self) -> list[int]:
        """Every sequence's class id (classification)."""
        return [int(label) for chunk in self._labels if chunk is not None for label in chunk]

    def total_tokens(self) -> int:
        return int(sum(offsets[-1] - offsets[0] for offsets in self._lists["input_ids"].offsets))


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
    """meta.json last: the entry is complete."""
    (folder / META_FILE).write_text(json.dumps(meta))


def read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def building(root: Path, key: str) -> Iterator[Path | None]:
    """Hold the key's lock; yields a fresh folder to build in, or None when the entry is complete
    (another process may have built it while this one waited). The built folder is moved into
    place atomically, so a crash leaves no half entry."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if read_meta(root / key) is not None:
            yield None
            return
        incoming = root / f".incoming-{key}-{os.getpid()}"
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir()
        try:
            yield incoming
            shutil.rmtree(root / key, ignore_errors=True)
            os.replace(incoming, root / key)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
