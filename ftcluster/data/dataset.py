"""Build the train/validation sets of a job: read → check rows → split → encode → balance/pack,
once per (data, tokenizer, settings): the result is cached as Arrow files (data/token_cache.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftcluster.config.spec import DataSpec
from ftcluster.core.errors import DataError
from ftcluster.core.storage import cache_root
from ftcluster.data.formats import BadRow, Example, parse_row
from ftcluster.data.readers import Row, rows_from_records
from ftcluster.data.render import Encoded, Renderer
from ftcluster.data.sources import Source
from ftcluster.data.token_cache import (
    TRAIN_FILE,
    VAL_FILE,
    EncodedSequences,
    ExampleSequence,
    SequenceWriter,
    building,
    read_meta,
    write_meta,
)

MAX_LISTED_BAD_ROWS = 20
MAX_KEPT_BAD_ROWS = 1000  # bad rows kept with their origin; beyond that, only counted


@dataclass
class DataReport:
    """What happened to the rows: counts, bad rows with their file:line, truncations."""

    rows_read: int = 0
    bad_rows: list[tuple[str, str]] = field(default_factory=list)  # the first MAX_KEPT_BAD_ROWS
    truncated: int = 0
    dropped_no_target: int = 0
    dropped_long_prompts: int = 0  # prompts format: longer than max_length
    bad_count: int = 0

    def add_bad(self, where: str, reason: str) -> None:
        self.bad_count += 1
        if len(self.bad_rows) < MAX_KEPT_BAD_ROWS:
            self.bad_rows.append((where, reason))

    def lines(self) -> list[str]:
        out = [f"{self.rows_read} rows read, {self.bad_count} bad, {self.truncated} truncated to max_length"]
        for where, reason in self.bad_rows[:MAX_LISTED_BAD_ROWS]:
            out.append(f"  bad row {where}: {reason}")
        if self.bad_count > MAX_LISTED_BAD_ROWS:
            out.append(f"  ... and {self.bad_count - MAX_LISTED_BAD_ROWS} more bad rows")
        if self.dropped_no_target:
            out.append(f"  {self.dropped_no_target} examples dropped: truncation removed every trained token")
        if self.dropped_long_prompts:
            out.append(f"  {self.dropped_long_prompts} prompts dropped: longer than data.max_length")
        return out


@dataclass
class DataBundle:
    train: Sequence[Encoded]
    val: Sequence[Encoded]
    val_examples: Sequence[Example]
    label_names: list[str] | None
    report: DataReport
    shots: list[Example] = field(default_factory=list)  # first training examples, for few-shot prompts
    # How often each reference reply occurs in the training data (choice detection); None: too many distinct ones.
    answer_counts: dict[str, int] | None = None
    cache: Path | None = None  # the tokenized data's cache entry
    from_cache: bool = False  # whether it was there already (nothing was tokenized)
    repaired: list[str] = field(default_factory=list)  # the cache entry's files found damaged (it was rebuilt)


def split_indices(count: int, fraction: float, seed: int) -> set[int]:
    """Which of ``count`` examples are held out for validation (a seeded draw)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_val = round(count * fraction)
    if fraction > 0 and count > 1:
        n_val = max(n_val, 1)
    return set(order[:n_val])


def _label_names(train_labels: Iterable[str], declared: list[str | int] | None) -> list[str]:
    if declared:
        return [str(label) for label in declared]
    labels = set(train_labels)
    # Integer-like labels sort numerically (so "10" comes after "9").
    return sorted(labels, key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s))


def balanced_order(labels: list[int], seed: int) -> list[int]:
    """Indices that oversample each class (a seeded draw) up to the majority class's count, shuffled."""
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    target = max(len(items) for items in by_label.values())
    rng = random.Random(seed)
    out = []
    for label in sorted(by_label):
        items = by_label[label]
        out += items + [rng.choice(items) for _ in range(target - len(items))]
    rng.shuffle(out)
    return out


def balance_classes(encoded: list[Encoded], seed: int) -> list[Encoded]:
    """Oversample each class (with a seeded draw) up to the majority class count."""
    labels = [item.label for item in encoded]
    assert all(label is not None for label in labels)  # classification examples carry their label id
    return [encoded[i] for i in balanced_order(labels, seed)]  # type: ignore[arg-type]


class Packer:
    """Greedily concatenates examples into sequences of at most max_length tokens, as they come.

    Each packed sequence carries position ids that restart at every example, which is how the
    attention layers know where one example ends (no attention across examples).
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.ids: list[int] = []
        self.trained: list[bool] = []
        self.positions: list[int] = []

    def add(self, item: Encoded) -> Encoded | None:
        """Adds ``item``; returns the sequence it closed, if it did not fit in it."""
        full = None
        if self.ids and len(self.ids) + len(item.input_ids) > self.max_length:
            full = self.finish()
        self.ids += item.input_ids
        self.trained += [False, *item.trained[1:]]  # never predict an example's first token from the last one
        self.positions += list(range(len(item.input_ids)))
        return full

    def finish(self) -> Encoded | None:
        if not self.ids:
            return None
        packed = Encoded(self.ids, self.trained, positions=self.positions)
        self.ids, self.trained, self.positions = [], [], []
        return packed


def pack(encoded: Iterable[Encoded], max_length: int) -> list[Encoded]:
    """Pack a list of examples (see `Packer`)."""
    packer = Packer(max_length)
    packed = [full for item in encoded if (full := packer.add(item)) is not None]
    last = packer.finish()
    return packed + ([last] if last is not None else [])


class RecordSource:
    """Rows given in Python (a list of dicts or a `datasets.Dataset`) instead of files."""

    def __init__(self, records: Iterable[Any], name: str) -> None:
        self.records = records if hasattr(records, "__len__") else list(records)  # read twice: not a one-shot iterator
        self.location = name

    def rows(self) -> Iterator[Row]:
        return iter(rows_from_records(self.records, self.location))

    def fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for record in self.records:
            digest.update(json.dumps(record, sort_keys=True, default=str).encode())
            digest.update(b"\n")
        return digest.hexdigest()


def _examples(source: Source | RecordSource, spec: DataSpec, report: DataReport | None) -> Iterator[Example]:
    """The source's usable examples; bad rows are counted in ``report`` (skipped or fatal), or, when
    ``report`` is None (a second pass), skipped silently."""
    for row in source.rows():
        try:
            example = parse_row(row.values, spec.format, spec.columns, spec.system_prompt)
        except BadRow as exc:
            if report is None:
                continue
            report.rows_read += 1
            report.add_bad(row.where, str(exc))
            if spec.on_bad_row == "fail":
                raise DataError(f"bad row {row.where}: {exc} (data.on_bad_row: fail; use skip to drop such rows)") from None
            continue
        if report is not None:
            report.rows_read += 1
        yield example


def build_data(
    spec: DataSpec,
    tokenizer,
    train_records: Iterable[Any] | None = None,
    val_records: Iterable[Any] | None = None,
) -> DataBundle:
    """Everything a run needs from its data, tokenized once: the first process to need a given
    (data, tokenizer, settings) writes the cache entry, every later one opens it. Records
    given in Python replace the spec's files."""
    train: Source | RecordSource = (RecordSource(train_records, "train") if train_records is not None
                                    else Source(spec.train, spec.split))
    val: Source | RecordSource | None = None
    if val_records is not None:
        val = RecordSource(val_records, "validation")
    elif spec.validation:
        val = Source(spec.validation, spec.validation_split)
    key = cache_key(spec, tokenizer, train, val)
    root = tokenized_root(spec)
    damage: list[str] = []
    with building(root, key, damage) as fresh:
        if fresh is not None:
            _tokenize(spec, tokenizer, train, val, fresh)
    bundle = open_tokenized(root / key, from_cache=fresh is None)
    bundle.repaired = damage
    return bundle


def tokenized_root(spec: DataSpec) -> Path:
    """Where tokenized data is kept: data.cache_dir, else the node's cache ($FTCLUSTER_CACHE/data)."""
    return Path(spec.cache_dir).expanduser() if spec.cache_dir else cache_root() / "data" / "tokenized"


# The code that turns rows into tokens: a change to it is a change of the tokens.
RENDERING_CODE = ("formats.py", "render.py", "dataset.py", "readers.py", "token_cache.py")


def cache_key(spec: DataSpec, tokenizer, train: Source | RecordSource, val: Source | RecordSource | None) -> str:
    """A hash of everything the tokens depend on: the rows' content, the tokenizer, every data
    setting, and the rendering code; and of the sources' names, which the data report quotes."""
    digest = hashlib.blake2b(digest_size=12)
    settings = spec.model_dump(mode="json", exclude={"cache_dir"})
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(train.fingerprint().encode())
    digest.update((val.fingerprint() if val is not None else "split").encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    for name in RENDERING_CODE:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's vocabulary, rules, special tokens and chat template, hashed."""
    digest = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    for part in (type(tokenizer).__name__, rules, getattr(tokenizer, "chat_template", None) or "",
                 json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str), str(tokenizer.eos_token_id)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _tokenize(spec: DataSpec, tokenizer, train_source: Source | RecordSource, val_source: Source | RecordSource | None,
              folder: Path) -> None:
    """Two passes over the rows, holding no more than one example at a time (plus, for
    classification, each example's label): count the usable examples (the validation split and
    the label set need the whole set), then encode each and append it to the cache files."""
    report = DataReport()
    count, labels = 0, []
    for example in _examples(train_source, spec, report):
        count += 1
        if example.label is not None:
            labels.append(example.label)
    held_out = split_indices(count, spec.val_fraction, spec.seed) if val_source is None else set()
    if count == len(held_out):
        raise DataError(f"{train_source.location}: no usable training rows ({report.bad_count} bad rows)")
    label_names = None
    if spec.format == "classification":
        label_names = _label_names((label for i, label in enumerate(labels) if i not in held_out), spec.labels)
    encoder = _Encoder(spec, tokenizer, label_names, report)
    val_writer = SequenceWriter(folder / VAL_FILE, with_examples=True)
    with _TrainWriter(folder / TRAIN_FILE, spec, label_names is not None) as train_writer:
        position = {"train": 0, "validation": 0}  # an example's index within its split (for messages)
        for index, example in enumerate(_examples(train_source, spec, None)):
            split = "validation" if index in held_out else "train"
            known = encoder.knows_label(example, split, position[split])
            position[split] += 1
            encoded = encoder.encode(example) if known else None
            if split == "validation" and encoded is not None:
                val_writer.add(encoded, example)
            elif split == "train" and known:
                train_writer.add(example, encoded)
        for index, example in enumerate(_examples(val_source, spec, report) if val_source is not None else []):
            encoded = encoder.encode(example) if encoder.knows_label(example, "validation", index) else None
            if encoded is not None:
                val_writer.add(encoded, example)
    val_writer.close()
    write_meta(folder, {"label_names": label_names, "report": asdict(report),
                        "shots": [shot.__dict__ for shot in train_writer.shots],
                        "answer_counts": train_writer.answer_counts, "examples": count})


class _Encoder:
    """Checks an example's label and encodes it; what it drops is counted (an unknown label, nothing to train)."""

    def __init__(self, spec: DataSpec, tokenizer, label_names: list[str] | None, report: DataReport) -> None:
        self.spec, self.report = spec, report
        self.renderer = Renderer(tokenizer, spec.max_length, spec.train_on_prompt)
        self.label_ids = {name: index for index, name in enumerate(label_names)} if label_names else None

    def knows_label(self, example: Example, where: str, index: int) -> bool:
        """False (reported as a bad row, or fatal) for a classification example with an unknown label."""
        if self.label_ids is None or example.label in self.label_ids:
            return True
        reason = f"unknown label {example.label!r} (known: {', '.join(sorted(self.label_ids))})"
        self.report.add_bad(f"{where} example {index}", reason)
        if self.spec.on_bad_row == "fail":
            raise DataError(f"bad row {where} example {index}: {reason}")
        return False

    def encode(self, example: Example) -> Encoded | None:
        """The example's sequence, or None when truncation left nothing to train."""
        encoded = self.renderer.encode(example, self.label_ids)
        self.report.truncated += encoded.truncated
        if example.prompt_only and encoded.truncated:  # it lost the turn header the model answers after
            self.report.dropped_long_prompts += 1
            return None
        if example.prompt_only:
            return encoded
        pair_empty = encoded.rejected is not None and not any(encoded.rejected.trained[1:])
        if encoded.label is None and (not any(encoded.trained[1:]) or pair_empty):
            self.report.dropped_no_target += 1
            return None
        return encoded


# Distinct reference replies counted for choice detection; beyond this many the answers form no closed set.
ANSWER_COUNT_LIMIT = 1000
SHOTS = 16  # training examples kept for few-shot prompts


class _TrainWriter:
    """The training sequences into the cache: packed (data.packing) or oversampled (data.balance_classes)
    on the way; the first examples kept as shots, the reference replies counted."""

    def __init__(self, path: Path, spec: DataSpec, classification: bool) -> None:
        self.path, self.seed = path, spec.seed
        self.balance = spec.balance_classes and classification
        self.writer = SequenceWriter(path, with_examples=spec.format == "prompts")  # rewards read the prompts
        self.packer = Packer(spec.max_length) if spec.packing and not classification else None
        self.shots: list[Example] = []
        self.answer_counts: dict[str, int] | None = {}

    def add(self, example: Example, encoded: Encoded | None) -> None:
        """A training example and its sequence (None when it has nothing to train)."""
        if len(self.shots) < SHOTS:
            self.shots.append(example)
        reference = example.reference
        if self.answer_counts is not None and reference is not None:
            self.answer_counts[reference] = self.answer_counts.get(reference, 0) + 1
            if len(self.answer_counts) > ANSWER_COUNT_LIMIT:
                self.answer_counts = None
        if encoded is None:
            return
        if self.packer is None:
            self.writer.add(encoded, example if self.writer.with_examples else None)
        elif (full := self.packer.add(encoded)) is not None:
            self.writer.add(full)

    def __enter__(self) -> _TrainWriter:
        return self

    def __exit__(self, *failure: object) -> None:
        last = self.packer.finish() if self.packer is not None else None
        if last is not None:
            self.writer.add(last)
        self.writer.close()
        if self.balance and failure[0] is None:
            self._balance()

    def _balance(self) -> None:
        """Rewrite the (classification-sized) training file in oversampled order."""
        written = EncodedSequences(self.path)
        balanced = self.path.with_name("balanced-" + self.path.name)
        writer = SequenceWriter(balanced)
        for index in balanced_order(written.labels(), self.seed):
            writer.add(written[index])
        writer.close()
        os.replace(balanced, self.path)


def open_tokenized(folder: Path, from_cache: bool) -> DataBundle:
    """A complete cache entry as a DataBundle whose sequences are read from the files on access."""
    meta = read_meta(folder)
    assert meta is not None, f"{folder}: incomplete tokenized data"
    report = DataReport(**{**meta["report"], "bad_rows": [tuple(bad) for bad in meta["report"]["bad_rows"]]})
    val = EncodedSequences(folder / VAL_FILE)
    return DataBundle(EncodedSequences(folder / TRAIN_FILE), val, ExampleSequence(val), meta["label_names"], report,
                      shots=[Example(**shot) for shot in meta["shots"]], answer_counts=meta["answer_counts"],
                      cache=folder, from_cache=from_cache)
