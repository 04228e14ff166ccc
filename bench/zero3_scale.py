"""A model whose training state does not fit one worker trains when ZeRO-3 shards it over two nodes;
measured per worker against `ftcluster plan` for the same job.

Everything runs through the product: a job spec, `ftcluster train --address` (the launcher, Ray Train,
DeepSpeed ZeRO-3, the partitioned load, checkpoints mirrored to object storage, `--resume`). The
cluster is Ray's own `ray.cluster_utils` on this machine: a head for the driver and two worker nodes,
each a memory cgroup of `--cap-gb` that it also advertises to Ray as its `memory` (tests/ray_nodes.py),
with run storage in a loopback S3 server (tests/storage_server.py). The model is a random-init Llama
of a named size with a byte-level vocabulary (no download), stored in bfloat16; training is full
fine-tuning with AdamW in bf16 mixed precision (16-bit weights and gradients, 32-bit master weights
and moments).

Steps: the planner's figures for the 2-worker job and for the same job on one worker; the one-worker
job on the cluster (refused by the capacity check, one line); the 2-worker job (a checkpoint at half
of the steps, in the store), rewound to that checkpoint, then `--resume` from it to the end again:
its losses must be the first launch's. Measured per worker:
peak RSS over each launch (VmHWM of every process in the node's cgroup, polled), the bytes of
weights, gradients, master weights and optimizer states it holds at the end (summary.json's
`workers`, counted from the tensors), the cap's OOM kills (must be 0).

    .venv/bin/python bench/zero3_scale.py --size 300m --cap-gb 8 --steps 4 --store folder   # RESULTS.md
    .venv/bin/python bench/zero3_scale.py --size tiny --cap-gb 3 --steps 2   # the plumbing, S3 store, a minute
    # --size 1b: the plan gives it 17.9 GB per worker over two workers: a machine with ~40 GB free
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from memory_cage import MemoryCage, unavailable  # noqa: E402
from ray_nodes import WORKER_RESOURCE, Nodes  # noqa: E402
from run_rewind import rewind  # noqa: E402
from storage_server import loopback_store  # noqa: E402

GB = 1e9
MODEL_CACHE = Path(tempfile.gettempdir()) / "ftcluster-bench-models"

# Llama shapes with a byte-level vocabulary (259 tokens): the 1B is Llama-3.2-1B's body.
SIZES: dict[str, dict[str, int]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, layers=16, heads=32, kv_heads=8),
    "500m": dict(hidden_size=1536, intermediate_size=6144, layers=14, heads=24, kv_heads=8),
    "300m": dict(hidden_size=1024, intermediate_size=4096, layers=20, heads=16, kv_heads=4),
    "120m": dict(hidden_size=768, intermediate_size=3072, layers=14, heads=12, kv_heads=4),
    "tiny": dict(hidden_size=256, intermediate_size=1024, layers=4, heads=4, kv_heads=2),
}


def random_model(size: str) -> Path:
    """The random-init model of that size, written once (bfloat16 safetensors + byte tokenizer)."""
    from ftcluster.models.tiny import make_tiny_llama

    folder = MODEL_CACHE / f"llama-bytes-{size}"
    if not (folder / "config.json").is_file():
        make_tiny_llama(folder, **SIZES[size], dtype="bfloat16")
    return folder


def job_spec(name: str, model: Path, data: dict[str, Path], workers: int, cap_gb: float, steps: int,
             store_uri: str) -> dict[str, Any]:
    """Full fine-tuning with AdamW under ZeRO-3, one worker per node, run storage in the store."""
    return {
        "name": name,
        "model": {"path": str(model), "dtype": "bfloat16"},
        "method": {"name": "full"},
        "data": {"train": str(data["train"]), "validation": str(data["val"]), "format": "instruction",
                 "max_length": 64},
        "training": {"max_steps": steps, "batch_size": 2, "lr": 2e-5, "scheduler": "constant", "warmup_steps": 0,
                     "precision": "bf16", "threads": 1, "log_every": 1, "checkpoint_every": max(1, steps // 2)},
        "eval": {"before_after": False, "max_batches": 1},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1, "resources_per_worker": {WORKER_RESOURCE: 1},
                    "gpus_per_node": 1, "node_ram_gb": cap_gb},
        "distributed": {"backend": "deepspeed", "zero_stage": 3},
        "tracking": {"wandb": {"mode": "disabled"}},
        "output": {"dir": store_uri},
    }


def planned(job: Path) -> dict[str, float]:
    """`ftcluster plan`'s figures for the job: per worker (one worker per node here) and its parts."""
    from ftcluster.config.spec import load_spec
    from ftcluster.planning.plan import memory_plan

    plan = memory_plan(load_spec(job))
    return {"per_worker_gb": plan.host_total / GB, "model_states_gb": plan.model_states / GB,
            "parts_gb": {key: value / GB for key, value in {**plan.gpu_bytes, **plan.host_bytes_per_node}.items()}}


class PeakRss:
    """The peak RSS (VmHWM) of every process in each node's cgroup, polled while a launch runs."""

    def __init__(self, cages: dict[str, MemoryCage]) -> None:
        self.cages = cages
        self.peaks: dict[str, dict[int, int]] = {node: {} for node in cages}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.wait(0.5):
            for node, cage in self.cages.items():
                for pid in cage.pids():
                    try:
                        status = Path(f"/proc/{pid}/status").read_text()
                    except OSError:
                        continue
                    for line in status.splitlines():
                        if line.startswith("VmHWM:"):
                            kib = int(line.split()[1])
                            self.peaks[node][pid] = max(self.peaks[node].get(pid, 0), kib * 1024)

    def stop(self) -> dict[str, float]:
        """Each node's largest process peak (its training worker), in bytes."""
        self.done.set()
        self.thread.join()
        return {node: max(peaks.values(), default=0) for node, peaks in self.peaks.items()}


def ftcluster(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("ftcluster")), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})


@dataclass
class Launch:
    seconds: float
    peak_rss: dict[str, float]  # node id -> bytes


def launch(nodes: Nodes, job: Path, *args: str) -> Launch:
    """`ftcluster train JOB --address CLUSTER ARGS`, its workers' peak RSS watched; fails loudly."""
    watch = PeakRss(nodes.cages)
    start = time.perf_counter()
    done = ftcluster("train", str(job), "--address", nodes.cluster.address, *args)
    seconds = time.perf_counter() - start
    peaks = watch.stop()
    if done.returncode != 0:
        raise SystemExit(f"zero3_scale: `ftcluster train {job.name} {' '.join(args)}` failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}\n{done.stdout[-3000:]}")
    return Launch(seconds, peaks)


def stored_json(store, key: str) -> Any:
    return json.loads(store.read(key))


def stored_losses(store, name: str) -> list[tuple[int, float]]:
    lines = store.read(f"{name}/metrics.jsonl").decode().splitlines()
    return [(r["step"], r["train_loss"]) for r in map(json.loads, lines) if "train_loss" in r]


def free_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / GB


class SharedFolder:
    """Run storage in a folder every node of this machine sees (a shared mount, as far as the nodes
    know): for sizes whose checkpoint files the loopback S3 server cannot hold (moto assembles each
    multipart upload in memory, twice over: 7.4 GB in the driver for the 300M model's two shards)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def uri(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.glob(prefix + "**/*") if p.is_file())

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()


@contextlib.contextmanager
def run_storage(kind: str, work: Path) -> Iterator[Any]:
    if kind == "s3":
        with loopback_store() as store:
            yield store
    else:
        yield SharedFolder(work / "shared")


def run(size: str, cap_gb: float, steps: int, work: Path, storage: str = "s3") -> dict[str, Any]:
    import ray

    from ftcluster.models.tiny import arithmetic_rows

    need = 2 * cap_gb + 3  # two capped nodes, the driver, Ray's own processes and the store
    if free_gb() < need:
        raise SystemExit(f"zero3_scale: {need:.0f} GB must be free for two {cap_gb:g} GB nodes, "
                         f"{free_gb():.1f} GB is; try a smaller --size")
    model = random_model(size)
    data = {}
    for split, (count, seed) in {"train": (64, 0), "val": (8, 1)}.items():
        data[split] = work / f"{split}.jsonl"
        data[split].write_text("".join(json.dumps(row) + "\n" for row in arithmetic_rows(count, seed)))
    cap = int(cap_gb * GB)
    with run_storage(storage, work) as store:
        jobs = {}
        for workers in (1, 2):
            name = f"zero3-{size}-{workers}w"
            jobs[workers] = work / f"{name}.yaml"
            jobs[workers].write_text(yaml.safe_dump(job_spec(name, model, data, workers, cap_gb, steps,
                                                             store.uri(name))))
        plans = {workers: planned(job) for workers, job in jobs.items()}
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
        nodes = Nodes(work / "nodes", workers=2, memory_bytes=cap)
        try:
            ray.init(address=nodes.cluster.address)  # (only to read the node ids below)
            ids = {node.node_id: f"node-{index + 1}" for index, node in enumerate(nodes.workers)}
            ray.shutdown()
            refused = ftcluster("train", str(jobs[1]), "--address", nodes.cluster.address, timeout=300)
            first = launch(nodes, jobs[2])  # all the steps, a checkpoint at half of them
            first_losses = stored_losses(store, f"zero3-{size}-2w")
            rewind(store.uri(f"zero3-{size}-2w"), max(1, steps // 2))
            second = launch(nodes, jobs[2], "--resume")  # from the store's half-way checkpoint, to the end
            oom_kills = {ids[node]: cage.oom_kills() for node, cage in nodes.cages.items()}
        finally:
            nodes.shutdown()
        name = f"zero3-{size}-2w"
        summary = stored_json(store, f"{name}/summary.json")
        checkpoints = [key for key in store.keys(f"{name}/checkpoints/") if "optim_states" in key]
        losses = stored_losses(store, name)
    workers = summary["workers"]
    return {
        "size": size, "storage": storage, "params": summary["total_params"], "cap_gb": cap_gb, "steps": steps,
        "plan": {str(w): p for w, p in plans.items()},
        "refusal": {"code": refused.returncode, "stderr": refused.stderr.strip().splitlines()},
        "launches": [{"seconds": round(x.seconds, 1), "peak_rss_gb": {ids[n]: b / GB for n, b in x.peak_rss.items()}}
                     for x in (first, second)],
        "workers": [{"rank": w["rank"], "peak_rss_gb_at_end_of_training": w["peak_rss_mb"] * 2**20 / GB,
                     "held_gb": {role: b / GB for role, b in w["held_bytes"].items()}} for w in workers],
        "losses": losses, "first_launch_losses": first_losses, "resumed_from_step": summary["resumed_from_step"], "stored_optimizer_shards": checkpoints,
        "oom_kills": oom_kills,
    }


def table(result: dict[str, Any]) -> str:
    plan2, plan1 = result["plan"]["2"], result["plan"]["1"]
    peak = max(max(x["peak_rss_gb"].values()) for x in result["launches"])
    rows = [
        (f"model: random Llama, {result['params']:,} parameters, bf16 weights, full fine-tuning (AdamW), "
        f"ZeRO-3 over 2 nodes of {result['cap_gb']:g} GB (cgroup), {result['steps']} steps"),
        "",
        "| per worker | planner (GB) | measured (GB) | measured / planner |",
        "|---|---|---|---|",
    ]
    for launch_index, launch_result in enumerate(result["launches"]):
        for node, gb in sorted(launch_result["peak_rss_gb"].items()):
            rows.append(f"| peak RSS, launch {launch_index + 1}, {node} | {plan2['per_worker_gb']:.2f} | {gb:.2f} | "
                        f"{gb / plan2['per_worker_gb']:.2f} |")
    for worker in result["workers"]:
        held = sum(worker["held_gb"].values())
        parts = ", ".join(f"{role} {gb:.2f}" for role, gb in worker["held_gb"].items())
        rows.append(f"| model states held, rank {worker['rank']} ({parts}) | {plan2['model_states_gb']:.2f} | "
                    f"{held:.2f} | {held / plan2['model_states_gb']:.2f} |")
    rows += [
        "",
        f"one worker (same job, num_workers=1): planner {plan1['per_worker_gb']:.2f} GB per worker, cap "
        f"{result['cap_gb']:g} GB; exit {result['refusal']['code']}: "
        + " / ".join(line for line in result["refusal"]["stderr"] if line.startswith("error:")),
        f"largest peak RSS {peak:.2f} GB of the {result['cap_gb']:g} GB cap; cgroup OOM kills {result['oom_kills']}",
        (f"losses {', '.join(f'{step}: {loss:.3f}' for step, loss in result['losses'])}; resumed from step "
        f"{result['resumed_from_step']} (store: {len(result['stored_optimizer_shards'])} optimizer shards)"),
        f"launch times: {', '.join(str(x['seconds']) + ' s' for x in result['launches'])}",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="300m")
    parser.add_argument("--cap-gb", type=float, default=8.0, help="memory of each node (cgroup and Ray's memory)")
    parser.add_argument("--steps", type=int, default=4, help="training steps; a checkpoint at half, then --resume")
    parser.add_argument("--store", choices=["s3", "folder"], default="s3",
                        help="run storage: the loopback S3 server, or a folder all nodes see (large sizes)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    if (why := unavailable()) is not None:
        raise SystemExit(f"zero3_scale: {why}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the nodes on 127.0.0.1, not the machine's address
    with tempfile.TemporaryDirectory(prefix="zero3-scale-") as work:
        result = run(args.size, args.cap_gb, args.steps, Path(work), args.store)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
