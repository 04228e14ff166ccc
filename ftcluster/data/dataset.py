"""Build the train/validation sets of a job: read → check rows → split → encode → balance/pack."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ftcluster.data.formats import BadRow, Example, parse_row
from ftcluster.data.readers import Row, read_rows, rows_from_records
from ftcluster.data.render import Encoded, Renderer
from ftcluster.errors import DataError
from ftcluster.spec import DataSpec

MAX_LISTED_BAD_ROWS = 20


@dataclass
class DataReport:
    """What happened to the rows: counts, bad rows with their file:line, truncations."""

    rows_read: int = 0
    bad_rows: list[tuple[str, str]] = field(default_factory=list)
    truncated: int = 0
    dropped_no_target: int = 0

    def lines(self) -> list[str]:
        out = [f"{self.rows_read} rows read, {len(self.bad_rows)} bad, {self.truncated} truncated to max_length"]
        for where, reason in self.bad_rows[:MAX_LISTED_BAD_ROWS]:
            out.append(f"  bad row {where}: {reason}")
        if len(self.bad_rows) > MAX_LISTED_BAD_ROWS:
            out.append(f"  ... and {len(self.bad_rows) - MAX_LISTED_BAD_ROWS} more bad rows")
        if self.dropped_no_target:
            out.append(f"  {self.dropped_no_target} examples dropped: truncation removed every trained token")
        return out


@dataclass
class DataBundle:
    train: list[Encoded]
    val: list[Encoded]
    val_examples: list[Example]
    label_names: list[str] | None
    report: DataReport
    shots: list[Example] = field(default_factory=list)  # first training examples, for few-shot prompts
    answers: list[str] = field(default_factory=list)  # the training examples' reference replies (choice detection)


def _parse_all(rows: list[Row], spec: DataSpec, report: DataReport) -> list[Example]:
    examples = []
    for row in rows:
        try:
            examples.append(parse_row(row.values, spec.format, spec.columns, spec.system_prompt))
        except BadRow as exc:
            report.bad_rows.append((row.where, str(exc)))
            if spec.on_bad_row == "fail":
                raise DataError(f"bad row {row.where}: {exc} (data.on_bad_row: fail; use skip to drop such rows)") from None
    report.rows_read += len(rows)
    return examples


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(examples) * fraction)
    if fraction > 0 and len(examples) > 1:
        n_val = max(n_val, 1)
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


def _label_names(train: list[Example], declared: list[str | int] | None) -> list[str]:
    if declared:
        return [str(label) for label in declared]
    labels = sorted({e.label for e in train if e.label is not None})
    # Integer-like labels sort numerically (so "10" comes after "9").
    return sorted(labels, key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s))


def _drop_unknown_labels(examples: list[Example], known: set[str], where: str, spec: DataSpec, report: DataReport) -> list[Example]:
    kept = []
    for index, example in enumerate(examples):
        if example.label in known:
            kept.append(example)
            continue
        reason = f"unknown label {example.label!r} (known: {', '.join(sorted(known))})"
        report.bad_rows.append((f"{where} example {index}", reason))
        if spec.on_bad_row == "fail":
            raise DataError(f"bad row {where} example {index}: {reason}")
    return kept


def balance_classes(encoded: list[Encoded], seed: int) -> list[Encoded]:
    """Oversample each class (with a seeded draw) up to the majority class count."""
    by_label: dict[int, list[Encoded]] = {}
    for item in encoded:
        assert item.label is not None  # classification examples carry their label id
        by_label.setdefault(item.label, []).append(item)
    target = max(len(items) for items in by_label.values())
    rng = random.Random(seed)
    out = []
    for label in sorted(by_label):
        items = by_label[label]
        out += items + [rng.choice(items) for _ in range(target - len(items))]
    rng.shuffle(out)
    return out


def pack(encoded: list[Encoded], max_length: int) -> list[Encoded]:
    """Greedily concatenate examples into sequences of at most max_length tokens.

    Each packed sequence carries position ids that restart at every example, which is how the
    attention layers know where one example ends (no attention across examples).
    """
    packed: list[Encoded] = []
    ids: list[int] = []
    trained: list[bool] = []
    positions: list[int] = []
    for item in encoded:
        if ids and len(ids) + len(item.input_ids) > max_length:
            packed.append(Encoded(ids, trained, positions=positions))
            ids, trained, positions = [], [], []
        ids += item.input_ids
        trained += [False, *item.trained[1:]]  # never predict an example's first token from the last one
        positions += list(range(len(item.input_ids)))
    if ids:
        packed.append(Encoded(ids, trained, positions=positions))
    return packed


def build_data(
    spec: DataSpec,
    tokenizer,
    train_records: Iterable[Any] | None = None,
    val_records: Iterable[Any] | None = None,
) -> DataBundle:
    """Everything a run needs from its data. Records given in Python replace the spec's files."""
    report = DataReport()
    train_rows = rows_from_records(train_records, "train") if train_records is not None else read_rows(spec.train)
    examples = _parse_all(train_rows, spec, report)
    if val_records is not None:
        train_examples, val_examples = examples, _parse_all(rows_from_records(val_records, "validation"), spec, report)
    elif spec.validation:
        train_examples, val_examples = examples, _parse_all(read_rows(spec.validation), spec, report)
    else:
        train_examples, val_examples = _split(examples, spec.val_fraction, spec.seed)
    if not train_examples:
        raise DataError(f"{spec.train}: no usable training rows ({len(report.bad_rows)} bad rows)")

    label_names = None
    label_ids = None
    if spec.format == "classification":
        label_names = _label_names(train_examples, spec.labels)
        known = set(label_names)
        train_examples = _drop_unknown_labels(train_examples, known, "train", spec, report)
        val_examples = _drop_unknown_labels(val_examples, known, "validation", spec, report)
        label_ids = {name: index for index, name in enumerate(label_names)}

    renderer = Renderer(tokenizer, spec.max_length, spec.train_on_prompt)

    def encode_all(items: list[Example]) -> tuple[list[Encoded], list[Example]]:
        kept_encoded, kept_examples = [], []
        for example in items:
            encoded = renderer.encode(example, label_ids)
            report.truncated += encoded.truncated
            pair_empty = encoded.rejected is not None and not any(encoded.rejected.trained[1:])
            if encoded.label is None and (not any(encoded.trained[1:]) or pair_empty):
                report.dropped_no_target += 1
                continue
            kept_encoded.append(encoded)
            kept_examples.append(example)
        return kept_encoded, kept_examples

    train, _ = encode_all(train_examples)
    val, val_examples = encode_all(val_examples)
    if spec.balance_classes and label_names:
        train = balance_classes(train, spec.seed)
    if spec.packing and label_names is None:
        train = pack(train, spec.max_length)
    answers = [e.reference for e in train_examples if e.reference is not None]
    return DataBundle(train, val, val_examples, label_names, report, shots=train_examples[:16], answers=answers)
