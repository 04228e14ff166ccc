"""Read local data files into rows, each tagged with where it came from (for error messages)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcluster.core.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    """One record and its origin: ``file:line`` (jsonl/csv) or ``file:row`` (json/parquet)."""

    where: str
    values: Any


def read_rows(path: str | Path, name: str | None = None) -> list[Row]:
    """Every row of a .jsonl, .json, .csv or .parquet file (see `iter_rows`)."""
    return list(iter_rows(path, name))


def iter_rows(path: str | Path, name: str | None = None) -> Iterator[Row]:
    """The rows of a .jsonl, .json, .csv or .parquet file, one at a time (jsonl and parquet are
    streamed); an unreadable file is a one-line DataError. ``name``: how origins show the file
    (a URI for a file fetched from a store)."""
    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise DataError(f"{name}: data file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path, name)
    elif suffix == ".json":
        yield from _read_json(path, name)
    elif suffix == ".csv":
        yield from _read_csv(path, name)
    elif suffix == ".parquet":
        yield from _read_parquet(path, name)
    else:
        raise DataError(f"{name}: unsupported data file type {suffix!r} (use {', '.join(SUFFIXES)})")


def rows_from_records(records: Iterable[Any], name: str = "<python>") -> list[Row]:
    """Rows from Python objects: a list of dicts or a `datasets.Dataset` (which iterates dicts)."""
    return [Row(f"{name}:{index}", record) for index, record in enumerate(records)]


def _read_jsonl(path: Path, name: str) -> Iterator[Row]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            # A broken line is a bad row, not a broken file: the caller decides skip/fail.
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Row(f"{name}:{number}", _Unparsable(f"invalid UTF-8 at byte {exc.start} of the line"))
                continue
            if not line.strip():
                continue
            try:
                yield Row(f"{name}:{number}", json.loads(line))
            except json.JSONDecodeError as exc:
                yield Row(f"{name}:{number}", _Unparsable(f"invalid JSON: {exc.msg}"))


def _read_text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text (invalid byte at offset {exc.start}); is it the right file?") from None


def _read_json(path: Path, name: str) -> list[Row]:
    try:
        data = json.loads(_read_text(path, name))
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of records (or {{\"data\": [...]}})")
    return [Row(f"{name}:record {index}", item) for index, item in enumerate(data)]


def _read_csv(path: Path, name: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(_read_text(path, name), newline=""))
    if not reader.fieldnames:
        raise DataError(f"{name}: empty CSV file (no header row)")
    # Line 1 is the header, so data rows start at line 2.
    try:
        return [Row(f"{name}:{reader.line_num}", dict(record)) for record in reader]
    except csv.Error as exc:
        raise DataError(f"{name}:{reader.line_num}: unreadable CSV ({exc})") from None


def _read_parquet(path: Path, name: str) -> Iterator[Row]:
    """Row groups one batch at a time: a large shard is never held whole."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        index = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield Row(f"{name}:row {index}", record)
                index += 1
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several error types for corrupt files
        raise DataError(f"{name}: cannot read parquet: {str(exc).splitlines()[0]}") from None


@dataclass(frozen=True)
class _Unparsable:
    reason: str


def unparsable_reason(values: Any) -> str | None:
    return values.reason if isinstance(values, _Unparsable) else None
