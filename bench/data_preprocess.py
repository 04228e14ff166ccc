"""Tokenizing a large data set: ftcluster's one process against a Ray Data job on this machine.

On the synthetic instruction rows and SmolLM2-135M-Instruct tokenizer of bench/data_scale.py
(jsonl shards of 100k rows), in the same run, each `build_data` on an empty cache in a fresh process:

  (a) one process   data.preprocess: process, as data_scale.py times it: hash the shards, count the
                    rows, split, render, tokenize, write train.arrow and val.arrow; also timed apart:
                    the hash and the counting pass alone
  (b) Ray Data      data.preprocess: ray (ftcluster/data/ray_tokenize.py, what users run): the same,
                    with the encoding pass on Ray Data actors, one per CPU Ray has (read tasks on this
                    node, results in row order); Ray started on loopback first, its start-up timed apart

The two cache entries are checked to have the same key and byte-identical files.

    .venv/bin/python bench/data_preprocess.py                  # 1M rows
    .venv/bin/python bench/data_preprocess.py --rows 20000     # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.data_scale import in_fresh_process, write_rows  # noqa: E402
from ftcluster.spec import DataSpec  # noqa: E402

VAL_FRACTION = 0.001  # as data_scale.build


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


def ray_data(data: Path, cache: Path) -> dict[str, Any]:
    """(b): in a fresh process, Ray started on loopback, then `build_data` with data.preprocess: ray."""
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from bench.data_preprocess import ray_build; "
            f"print(json.dumps(ray_build({str(data)!r}, {str(cache)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ray_build(data: str, cache: str) -> dict[str, Any]:
    """Ray on loopback (start-up timed apart), then the build with data.preprocess: ray."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    from bench.data_scale import tokenizer_of
    from ftcluster.data import build_data

    start = time.perf_counter()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    started = time.perf_counter() - start
    actors = int(ray.available_resources()["CPU"])
    tokenizer = tokenizer_of("smollm2")
    start = time.perf_counter()
    bundle = build_data(DataSpec(train=data, val_fraction=VAL_FRACTION, preprocess="ray", cache_dir=cache), tokenizer)
    seconds = time.perf_counter() - start
    ray.shutdown()
    assert not bundle.from_cache
    return {"seconds": seconds, "startup_s": started, "actors": actors}


def check_same(baseline: Path, ray_cache: Path) -> None:
    """The Ray-built entry has the one process's key and byte-identical files."""
    ours, theirs = [next(root.glob("*/meta.json")).parent for root in (baseline, ray_cache)]
    assert ours.name == theirs.name, (ours, theirs)
    for name in ("train.arrow", "val.arrow", "meta.json"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, help="Scratch folder (default: a temporary one).")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="data-preprocess-", dir=args.out) as scratch:
        root = Path(scratch)
        data = root / "rows"
        write_rows(data, args.rows)
        a = one_process(data, root / "cache")
        b = ray_data(data, root / "ray-cache")
        check_same(root / "cache" / "data" / "tokenized", root / "ray-cache")
    rows = args.rows
    print(f"\n{rows:,} rows; (b) with {b['actors']} actors; cache entries checked identical (key and files)\n")
    print("| rows | (a) one process | rows/s | of which hash + count pass | (b) Ray Data | rows/s | "
          "Ray start-up | (b)/(a) | (b)+start-up/(a) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {rows:,} | {a['seconds']:.1f} s | {rows / a['seconds']:,.0f} | {a['hash_count_s']:.1f} s | "
          f"{b['seconds']:.1f} s | {rows / b['seconds']:,.0f} | {b['startup_s']:.1f} s | "
          f"{b['seconds'] / a['seconds']:.2f} | {(b['seconds'] + b['startup_s']) / a['seconds']:.2f} |")


if __name__ == "__main__":
    main()
