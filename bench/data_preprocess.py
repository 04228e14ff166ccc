"""Tokenizing a large data set: ftcluster's one process against a Ray Data job on this machine.

On the synthetic instruction rows and SmolLM2-135M-Instruct tokenizer of bench/data_scale.py
(jsonl shards of 100k rows), in the same run:

  (a) one process   `build_data` on an empty cache, in a fresh process, as data_scale.py times it:
                    hash the shards, count the rows, split, render, tokenize, write train.arrow
                    and val.arrow; also timed apart: the hash and the counting pass alone
  (b) Ray Data      `ray.data.read_json` on the shards, `map_batches` with one actor per CPU Ray has
                    (each loads the tokenizer once and encodes rows with ftcluster's parser and
                    `_Encoder`), the batches streamed in row order into one Arrow file with the
                    cache's schema (what `EncodedSequences` opens); Ray's start-up timed apart

A sample of rows is checked to hold the same token ids and loss mask in both outputs.

    .venv/bin/python bench/data_preprocess.py                  # 1M rows
    .venv/bin/python bench/data_preprocess.py --rows 20000     # smoke run (add --stats: Ray Data's per-operator times)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.data_scale import in_fresh_process, write_rows  # noqa: E402
from ftcluster.config.spec import DataSpec  # noqa: E402

VAL_FRACTION = 0.001  # as data_scale.build
ROWS_PER_BLOCK = 10_000  # Ray Data blocks: small enough for every actor to have work at 20k rows
BATCH_ROWS = 2048  # rows per map_batches call
SAMPLE = 500  # rows whose tokens are compared


class Tokenize:
    """A Ray Data actor: parses and encodes a batch of rows as `build_data` does (instruction
    format), into the cache's columns."""

    def __init__(self, spec: DataSpec) -> None:
        sys.path.insert(0, str(REPO))
        from bench.data_scale import tokenizer_of
        from ftcluster.data.dataset import DataReport, _Encoder

        self.spec = spec
        self.encoder = _Encoder(spec, tokenizer_of("smollm2"), None, DataReport())

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ftcluster.data.formats import BadRow, parse_row
        from ftcluster.data.token_cache import _schema

        encoded = []
        for values in batch.to_pylist():
            try:
                example = parse_row(values, self.spec.format, self.spec.columns, self.spec.system_prompt)
            except BadRow:
                continue
            if (item := self.encoder.encode(example)) is not None:
                encoded.append(item)
        nulls = [None] * len(encoded)
        return pa.table({"input_ids": [item.input_ids for item in encoded],
                         "trained": [[int(t) for t in item.trained] for item in encoded],
                         "label": nulls, "positions": nulls, "rejected_input_ids": nulls, "rejected_trained": nulls},
                        schema=_schema(False))


def one_process(data: Path, cache: Path) -> dict[str, float]:
    """(a): `build_data` in a fresh process; then, here, its hash and counting pass alone."""
    from ftcluster.data.dataset import _examples
    from ftcluster.data.sources import Source

    seconds = in_fresh_process(str(data), str(cache), "smollm2")["seconds"]
    start = time.perf_counter()
    source = Source(str(data))
    source.fingerprint()
    sum(1 for _ in _examples(source, DataSpec(train=str(data)), None))
    return {"seconds": seconds, "hash_count_s": time.perf_counter() - start}


def ray_data(data: Path, rows: int, out: Path) -> dict[str, Any]:
    """(b): Ray started on loopback, then the Ray Data job, writing ``out``."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from ftcluster.data.token_cache import BATCH_ROWS as CACHE_BATCH_ROWS
    from ftcluster.data.token_cache import _schema

    start = time.perf_counter()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    started = time.perf_counter() - start
    actors = int(ray.cluster_resources()["CPU"])
    DataContext.get_current().execution_options.preserve_order = True  # output rows in input order
    DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    shards = sorted(str(path) for path in data.glob("*.jsonl"))
    # Reading claims no CPU: the actors hold every CPU Ray has, and a read task waiting for one never starts.
    dataset = ray.data.read_json(shards, lines=True, num_cpus=0,
                                 override_num_blocks=max(len(shards), rows // ROWS_PER_BLOCK))
    dataset = dataset.map_batches(Tokenize, fn_constructor_args=(DataSpec(train=str(data)),), batch_size=BATCH_ROWS,
                                  batch_format="pyarrow", compute=ActorPoolStrategy(size=actors))
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, _schema(False)) as writer:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.write_table(batch, max_chunksize=CACHE_BATCH_ROWS)
    seconds = time.perf_counter() - start
    stats = dataset.stats()
    ray.shutdown()
    return {"seconds": seconds, "startup_s": started, "actors": actors, "stats": stats}


def check_same(baseline: Path, ray_file: Path, rows: int) -> None:
    """The Ray output holds every row; a sample of rows has the same tokens and mask as `build_data`'s."""
    from ftcluster.data.dataset import split_indices
    from ftcluster.data.token_cache import EncodedSequences

    held_out = split_indices(rows, VAL_FRACTION, DataSpec(train="-").seed)
    train_rows = [index for index in range(rows) if index not in held_out]  # build_data's train.arrow, in order
    ours, theirs = EncodedSequences(baseline), EncodedSequences(ray_file)
    assert len(ours) == len(train_rows) and len(theirs) == rows, (len(ours), len(train_rows), len(theirs), rows)
    for position in random.Random(0).sample(range(len(ours)), min(SAMPLE, len(ours))):
        assert ours[position] == theirs[train_rows[position]], position


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, help="Scratch folder (default: a temporary one).")
    parser.add_argument("--stats", action="store_true", help="Also print Ray Data's per-operator statistics.")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="data-preprocess-", dir=args.out) as scratch:
        root = Path(scratch)
        data = root / "rows"
        write_rows(data, args.rows)
        a = one_process(data, root / "cache")
        b = ray_data(data, args.rows, root / "ray-train.arrow")
        check_same(next((root / "cache").rglob("train.arrow")), root / "ray-train.arrow", args.rows)
    if args.stats:
        print(b["stats"])
    rows = args.rows
    print(f"\n{rows:,} rows; (b) with {b['actors']} actors; token ids of {min(SAMPLE, rows)} rows checked identical\n")
    print("| rows | (a) one process | rows/s | of which hash + count pass | (b) Ray Data | rows/s | "
          "Ray start-up | (b)/(a) | (b)+start-up/(a) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {rows:,} | {a['seconds']:.1f} s | {rows / a['seconds']:,.0f} | {a['hash_count_s']:.1f} s | "
          f"{b['seconds']:.1f} s | {rows / b['seconds']:,.0f} | {b['startup_s']:.1f} s | "
          f"{b['seconds'] / a['seconds']:.2f} | {(b['seconds'] + b['startup_s']) / a['seconds']:.2f} |")


if __name__ == "__main__":
    main()
