"""Read local data files into rows, each tagged with where it came from (for error messages)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcluster.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    """One record and its origin: ``file:line`` (jsonl/csv) or ``file:row`` (json/parquet)."""

    where: str
    values: Any


def read_rows(path: str | Path) -> list[Row]:
    """Read a .jsonl, .json, .csv or .parquet file; unreadable files are a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(_read_jsonl(path))
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported data file type {suffix!r} (use {', '.join(SUFFIXES)})")


def rows_from_records(records: Iterable[Any], name: str = "<python>") -> list[Row]:
    """Rows from Python objects: a list of dicts or a `datasets.Dataset` (which iterates dicts)."""
    return [Row(f"{name}:{index}", record) for index, record in enumerate(records)]


def _read_jsonl(path: Path) -> Iterable[Row]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            # A broken line is a bad row, not a broken file: the caller decides skip/fail.
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Row(f"{path}:{number}", _Unparsable(f"invalid UTF-8 at byte {exc.start} of the line"))
                continue
            if not line.strip():
                continue
            try:
                yield Row(f"{path}:{number}", json.loads(line))
            except json.JSONDecodeError as exc:
                yield Row(f"{path}:{number}", _Unparsable(f"invalid JSON: {exc.msg}"))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); is it the right file?") from None


def _read_json(path: Path) -> list[Row]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
    return [Row(f"{path}:record {index}", item) for index, item in enumerate(data)]


def _read_csv(path: Path) -> list[Row]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}: empty CSV file (no header row)")
    # Line 1 is the header, so data rows start at line 2.
    try:
        return [Row(f"{path}:{reader.line_num}", dict(record)) for record in reader]
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: unreadable CSV ({exc})") from None


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several error types for corrupt files
        raise DataError(f"{path}: cannot read parquet: {str(exc).splitlines()[0]}") from None
    return [Row(f"{path}:row {index}", record) for index, record in enumerate(table.to_pylist())]


@dataclass(frozen=True)
class _Unparsable:
    reason: str


def unparsable_reason(values: Any) -> str | None:
    return values.reason if isinstance(values, _Unparsable) else None
