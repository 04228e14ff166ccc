"""Data at scale: tokenizing once, starting from the cache, and what each worker holds in memory.

For each size (synthetic instruction rows, jsonl shards of 100k rows, SmolLM2-135M-Instruct's
tokenizer and chat template):

  first tokenization   `build_data` on an empty cache: read, check, split, render, tokenize,
                       write the Arrow files; rows/s
  cache-hit start      `build_data` again in a fresh process (hash the shards, open the memory
                       map): target under 5 s at 1M rows
  per-worker memory    two worker processes open the cached data and read their part of 500
                       steps' batches (batch 8); the growth of each one's resident memory over
                       its baseline after loading the tokenizer (target under 300 MB at 2M rows)

Baseline, measured in the same run at the smallest size: the in-memory build this cache replaced
(every sequence a Python list in each worker), its time and its resident memory growth.

    .venv/bin/python bench/data_scale.py                       # 100k, 1M, 2M rows (about 25 min on 2 cores)
    .venv/bin/python bench/data_scale.py --sizes 2000 --tokenizer tiny   # smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARD_ROWS = 100_000
STEPS, BATCH, WORKERS = 500, 8, 2
WORDS = ["model", "data", "cluster", "token", "batch", "worker", "node", "memory", "cache", "shard", "value",
         "answer", "question", "review", "summary", "budget", "report", "metric", "train", "learn"]


def write_rows(folder: Path, count: int, seed: int = 0) -> None:
    """Synthetic instruction rows, in jsonl shards of SHARD_ROWS."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, count, SHARD_ROWS):
        with (folder / f"part-{start // SHARD_ROWS:04d}.jsonl").open("w") as handle:
            for index in range(start, min(count, start + SHARD_ROWS)):
                instruction = f"Task {index}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
                output = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15)))
                handle.write(json.dumps({"instruction": instruction, "output": output}) + "\n")


def tokenizer_of(name: str):
    from ftcluster.models.load import load_tokenizer, resolve_model
    from ftcluster.models.tiny import byte_tokenizer

    return byte_tokenizer() if name == "tiny" else load_tokenizer(resolve_model("smollm2-135m-instruct"))


def rss_mb() -> float:
    """This process's resident memory, and its private (anonymous) part, from /proc."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024


def build(data: str, cache: str, tokenizer_name: str) -> dict:
    """One `build_data` call in this process: its time, and whether the cache had the data."""
    os.environ["FTCLUSTER_CACHE"] = cache
    from ftcluster.config.spec import DataSpec
    from ftcluster.data import build_data

    tokenizer = tokenizer_of(tokenizer_name)
    start = time.perf_counter()
    bundle = build_data(DataSpec(train=data, val_fraction=0.001), tokenizer)
    return {"seconds": time.perf_counter() - start, "from_cache": bundle.from_cache, "train": len(bundle.train)}


def worker_memory(data: str, cache: str, tokenizer_name: str, rank: int, in_memory: bool, queue) -> None:
    """A worker's resident memory growth: open the data, then read its part of STEPS steps."""
    os.environ["FTCLUSTER_CACHE"] = cache
    from ftcluster.config.spec import DataSpec
    from ftcluster.data import build_data
    from ftcluster.data.batches import StepOrder, collate

    tokenizer = tokenizer_of(tokenizer_name)
    before = rss_mb()
    bundle = build_data(DataSpec(train=data, val_fraction=0.001), tokenizer)
    train = list(bundle.train) if in_memory else bundle.train  # in memory: what every worker held before the cache
    opened = rss_mb()
    order = StepOrder(len(train), BATCH, 1, WORKERS, seed=0)
    for step in range(min(STEPS, order.steps_per_epoch)):
        for ids in order.micro_batches(step, rank):
            collate([train[i] for i in ids], tokenizer.pad_token_id or 0)
    queue.put({"rank": rank, "open_mb": opened - before, "after_steps_mb": rss_mb() - before})


def measure_workers(data: str, cache: str, tokenizer_name: str, in_memory: bool = False) -> float:
    """The largest growth of the WORKERS workers (started together, as Ray Train starts them)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=worker_memory, args=(data, cache, tokenizer_name, rank, in_memory, queue))
               for rank in range(WORKERS)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=3600) for _ in workers]
    for worker in workers:
        worker.join()
    return max(r["after_steps_mb"] for r in results)


def in_fresh_process(data: str, cache: str, tokenizer_name: str) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from bench.data_scale import build; "
            f"print(json.dumps(build({data!r}, {cache!r}, {tokenizer_name!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000,2000000", help="Row counts, comma-separated.")
    parser.add_argument("--tokenizer", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="data-scale-") as scratch:
        root = Path(scratch)
        for position, size in enumerate(sizes):
            data, cache = root / f"rows-{size}", str(root / f"cache-{size}")
            write_rows(data, size)
            first = in_fresh_process(str(data), cache, args.tokenizer)
            hit = in_fresh_process(str(data), cache, args.tokenizer)
            assert not first["from_cache"] and hit["from_cache"], (first, hit)
            row = {"rows": size, "first_s": first["seconds"], "rows_per_s": size / first["seconds"],
                   "cache_hit_s": hit["seconds"], "worker_rss_growth_mb": measure_workers(str(data), cache, args.tokenizer)}
            if position == 0:  # the baseline: every worker building and holding the sequences in memory
                row["baseline_worker_rss_growth_mb"] = measure_workers(str(data), cache, args.tokenizer, in_memory=True)
            results.append(row)
            print(json.dumps(row), flush=True)
    print("\n| rows | first tokenization | rows/s | cache-hit start | worker RSS growth (cache) | "
          "worker RSS growth (in memory, baseline) |")
    print("|---|---|---|---|---|---|")
    for row in results:
        baseline = row.get("baseline_worker_rss_growth_mb")
        print(f"| {row['rows']:,} | {row['first_s']:.1f} s | {row['rows_per_s']:,.0f} | {row['cache_hit_s']:.2f} s | "
              f"{row['worker_rss_growth_mb']:.0f} MB | {f'{baseline:.0f} MB' if baseline else '-'} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
