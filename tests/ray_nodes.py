"""Several Ray nodes on this machine, for real: Ray's own `ray.cluster_utils.Cluster`, one raylet per
node on 127.0.0.1, each with its own CPU and node-local cache folder, and (optionally) its own RAM.

With `memory_bytes`, each worker node advertises that much `memory` to Ray (what the capacity check
reads) and its processes run in a memory cgroup of that size (`memory_cage`): a node of that size,
whose workers cannot take memory from anything else on the machine. The driver's node (the head)
runs no worker, so rank 0 is never on it.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
from memory_cage import MemoryCage

WORKER_RESOURCE = "trainer"  # only the worker nodes have it: the workers never land on the driver's node


class Nodes:
    """The test cluster: a head (the driver's node) and worker nodes, each with its own cache."""

    def __init__(self, root: Path, workers: int = 2, memory_bytes: int | None = None) -> None:
        from ray.cluster_utils import Cluster

        self.root = root
        self.count = 0
        self.memory_bytes = memory_bytes
        self.cages: dict[str, MemoryCage] = {}  # node id -> its cgroup
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1",
            "env_vars": {"FTCLUSTER_CACHE": str(root / "head")}})
        self.workers = [self.add() for _ in range(workers)]

    def add(self):
        self.count += 1
        cache = self.root / f"node-{self.count}"
        sized = {"memory": self.memory_bytes} if self.memory_bytes else {}
        node = self.cluster.add_node(num_cpus=1, resources={WORKER_RESOURCE: 1}, node_ip_address="127.0.0.1",
                                     env_vars={"FTCLUSTER_CACHE": str(cache)}, **sized)
        node.cache = cache
        if self.memory_bytes:
            self.cages[node.node_id] = cage = MemoryCage(self.memory_bytes, f"node-{self.count}")
            for _ in range(2):  # the raylet, then whatever it started while the first pass ran
                for process in [raylet(node), *raylet(node).children(recursive=True)]:
                    cage.add(process.pid)
                time.sleep(0.2)
        return node

    def replace(self, node) -> None:
        """Remove a node (every process on it dies) and add a fresh one with an empty cache."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)
        self.workers.append(self.add())

    def holding(self, name: str, file: str = "metrics.jsonl"):
        """The worker node whose working copy of run `name` has `file` (rank 0's node, for run files)."""
        for node in self.workers:
            if next(node.cache.glob(f"runs/s3/*/{name}/{file}"), None) is not None:
                return node
        return None

    def shutdown(self) -> None:
        self.cluster.shutdown()
        for cage in self.cages.values():
            cage.close()


def raylet(node) -> psutil.Process:
    """A cluster_utils node's raylet process (every worker process of the node descends from it)."""
    return psutil.Process(node.all_processes["raylet"][0].process.pid)
