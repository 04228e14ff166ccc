"""Several Ray nodes on this machine, for real (Ray's own `ray.cluster_utils.Cluster`: one raylet per
node on 127.0.0.1, each with its own CPU and its own node-local cache folder), with run storage in an
S3-compatible server on loopback. The driver's node runs no worker, so rank 0 is never on it.

- DDP and ZeRO-3 with one worker on each of two nodes equal one worker with the double batch, and
  every output is in the store (ZeRO-3: both nodes' shards in each checkpoint).
- A node removed mid-run (a worker's, then rank 0's), a replacement added: the group restarts from
  the store's last checkpoint and the losses equal the uninterrupted run's.
- GRPO's rollout actor on another node than the learner samples as the learner would; with the actor's
  node removed mid-run, the group restarts from the store with a new actor and the losses match.
- A local output.dir that a node cannot see is refused before training, in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import test_grpo
from conftest import train_losses
from ray_nodes import WORKER_RESOURCE, Nodes
from storage_server import loopback_store

from ftcluster.runs.paths import RunPaths

pytestmark = pytest.mark.multinode
TRAINING = {"max_steps": 12, "checkpoint_every": 2, "max_failures": 1, "batch_size": 4}


@pytest.fixture(scope="module")
def store():
    with loopback_store() as running:
        yield running


@pytest.fixture(scope="module")
def nodes(store, tmp_path_factory):
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.2"  # how often Ray Train looks for drained nodes
    ray.shutdown()  # an earlier module's in-process `ftcluster train` leaves its local Ray running
    cluster = Nodes(tmp_path_factory.mktemp("nodes"))
    ray.init(address=cluster.cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def run_on_nodes(make_job, store, name: str, **sections):
    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_with_ray

    scaling = {"num_workers": 2, "cpus_per_worker": 1, "resources_per_worker": {WORKER_RESOURCE: 1}}
    job = make_job(name, scaling=scaling, output={"dir": store.uri(name)}, **sections)
    return run_with_ray(load_spec(job))


def stored_losses(store, name: str) -> list[float]:
    lines = store.read(f"{name}/metrics.jsonl").decode().splitlines()
    return [record["train_loss"] for record in map(json.loads, lines) if "train_loss" in record]


def single_worker_losses(make_job, name: str, **sections) -> list[float]:
    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_in_process

    training = {**sections.pop("training"), "batch_size": 8, "max_failures": 0}
    spec = load_spec(make_job(name, training=training, **sections))
    run_in_process(spec)
    return train_losses(RunPaths.of(spec).local)


def test_nodes_are_separate_and_on_loopback(nodes):
    import ray

    alive = [node for node in ray.nodes() if node["Alive"]]
    assert len(alive) == 3 and {node["NodeManagerAddress"] for node in alive} == {"127.0.0.1"}
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")


@pytest.fixture(scope="module")
def ddp_reference() -> dict:
    """The uninterrupted 2-node DDP run's losses, which the node-loss tests compare with (set by the first test)."""
    return {}


def test_ddp_across_nodes_equals_one_node_and_lands_in_the_store(nodes, store, make_job, ddp_reference):
    method = {"name": "full"}
    summary = run_on_nodes(make_job, store, "ddp-nodes", method=method, training=TRAINING)
    assert summary["world_size"] == 2 and summary["steps"] == 12
    rank0 = nodes.holding("ddp-nodes", "summary.json")
    assert rank0 is not None  # rank 0 ran on a worker node (its working copy is there), not the driver's
    keys = store.keys("ddp-nodes/")
    assert {"ddp-nodes/summary.json", "ddp-nodes/final/model/model.safetensors", "ddp-nodes/checkpoints/latest"} <= set(keys)
    losses = stored_losses(store, "ddp-nodes")
    assert losses == pytest.approx(single_worker_losses(make_job, "ddp-one", method=method, training=TRAINING), rel=1e-4)
    ddp_reference["losses"] = losses


def test_zero3_across_nodes_stores_every_nodes_shards_and_equals_one_node(nodes, store, make_job, cli, tmp_path):
    method, training = {"name": "full"}, {"max_steps": 4, "checkpoint_every": 2, "max_grad_norm": None}
    distributed = {"backend": "deepspeed", "zero_stage": 3}
    summary = run_on_nodes(make_job, store, "zero3-nodes", method=method, training=training, distributed=distributed)
    assert summary["world_size"] == 2
    shards = [key for key in store.keys("zero3-nodes/checkpoints/step-0000002/") if "optim_states" in key]
    assert any("rank_0_" in key for key in shards) and any("rank_1_" in key for key in shards), shards
    one = single_worker_losses(make_job, "zero3-one", method=method, training=training)
    assert stored_losses(store, "zero3-nodes") == pytest.approx(one, rel=1e-4)
    out = tmp_path / "exported"
    assert cli("export", store.uri("zero3-nodes"), "--checkpoint", "latest", "--out", out).code == 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


class BackgroundRun:
    """A run on the nodes in a thread, while the test's main thread acts on the cluster (nodes are
    started from the main thread: Ray's Node sets signal handlers)."""

    def __init__(self, train: Callable[[], dict]) -> None:
        self.outcome: dict = {}
        self.thread = threading.Thread(target=self._train, args=(train,), daemon=True)
        self.thread.start()

    def _train(self, train: Callable[[], dict]) -> None:
        try:
            self.outcome["summary"] = train()
        except BaseException as exc:
            self.outcome["error"] = exc

    def summary(self) -> dict:
        """Wait for the run; its summary, or its error raised here."""
        self.thread.join(timeout=600)
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["summary"]


def remove_mid_run(nodes, store, make_job, name: str, pick) -> dict:
    """Train in the background; once the store has a checkpoint, replace the node `pick(nodes, rank0_node)` chooses."""
    run = BackgroundRun(lambda: run_on_nodes(make_job, store, name, method={"name": "full"}, training=TRAINING))
    removed = False
    while run.thread.is_alive() and not removed:
        rank0 = nodes.holding(name)
        if rank0 is not None and store.keys(f"{name}/checkpoints/latest"):
            nodes.replace(pick(nodes, rank0))
            removed = True
        time.sleep(0.05)
    run.thread.join(timeout=600)
    assert removed, "the run ended before a node could be removed"
    return run.summary()


@pytest.mark.parametrize("which", ["rank0", pytest.param("worker", marks=pytest.mark.slow)])
def test_a_lost_node_restarts_from_the_store_and_matches(which, nodes, store, make_job, ddp_reference):
    if "losses" not in ddp_reference:
        pytest.skip("needs the uninterrupted run of test_ddp_across_nodes_...")

    def pick(cluster, rank0):
        return rank0 if which == "rank0" else next(node for node in cluster.workers if node is not rank0)

    name = f"lost-{which}"
    summary = remove_mid_run(nodes, store, make_job, name, pick)
    assert summary["steps"] == 12
    assert summary["resumed_from_step"] in range(2, 12, 2)  # the new group continued from the store
    assert stored_losses(store, name) == pytest.approx(ddp_reference["losses"], rel=1e-5)


def working_copy(node, name: str, file: str = "metrics.jsonl") -> Path:
    return next(node.cache.glob(f"runs/s3/*/{name}/{file}"))


def drain_for_preemption(node) -> None:
    """What a cloud's spot reclaim does through Ray's autoscaler: drain the node, with a deadline."""
    import ray

    ray_cli = Path(sys.executable).with_name("ray")
    address = ray.get_runtime_context().gcs_address
    subprocess.run([str(ray_cli), "drain-node", "--address", address, "--node-id", node.node_id, "--reason",
                    "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaimed",
                    "--deadline-remaining-seconds", "60"], check=True, capture_output=True, timeout=60)


@pytest.mark.slow  # (75 s: two 300-step runs on the nodes)
def test_a_preemption_notice_saves_a_checkpoint_in_time_and_the_run_resumes_there(nodes, store, make_job):
    """Rank 0's node is drained for preemption mid-run, with no periodic checkpoint due: the workers
    save one at the next step boundary and keep training; the node is then reclaimed (removed) and a
    fresh one joins; the group resumes from that checkpoint and ends with the uninterrupted losses."""
    # (max_failures: the surviving worker's collective fails as the node goes, which Ray may count as a failure)
    name, training = "preempted", {**TRAINING, "max_steps": 300, "checkpoint_every": 1000}
    run = BackgroundRun(lambda: run_on_nodes(make_job, store, name, method={"name": "full"}, training=training))
    deadline = time.monotonic() + 300
    while (rank0 := nodes.holding(name)) is None or "train_loss" not in working_copy(rank0, name).read_text():
        assert run.thread.is_alive() and time.monotonic() < deadline, run.outcome  # until a step is logged
        time.sleep(0.05)
    drain_for_preemption(rank0)
    while not store.keys(f"{name}/checkpoints/latest"):  # the just-in-time checkpoint
        assert run.thread.is_alive() and time.monotonic() < deadline, run.outcome
        time.sleep(0.05)
    saved = int(store.read(f"{name}/checkpoints/latest").decode().strip().removeprefix("step-"))
    nodes.replace(rank0)  # the reclaim
    summary = run.summary()
    assert summary["steps"] == 300 and 0 < summary["resumed_from_step"] < 300, summary["resumed_from_step"]
    assert summary["resumed_from_step"] >= saved  # no periodic checkpoint was due: this one saved the steps
    run_on_nodes(make_job, store, "preempted-whole", method={"name": "full"}, training=training)
    assert stored_losses(store, name) == pytest.approx(stored_losses(store, "preempted-whole"), rel=1e-5)


prompts = test_grpo.prompts  # the fixture: 40 training prompts, 8 held out


def actor_nodes(class_name: str, state: str, ignore: frozenset[str] = frozenset()) -> set[str]:
    """The nodes of the cluster's actors of a class in a state (not those in `ignore`, by actor id), from
    the GCS's actor table (Ray's state API would need the dashboard, which a test cluster may lack)."""
    import ray

    return {actor["Address"]["NodeID"] for actor_id, actor in ray._private.state.actors().items()
            if actor["ActorClassName"] == class_name and actor["State"] == state and actor_id not in ignore}


def test_a_grpo_rollout_actor_on_another_node_samples_as_the_learner_would(nodes, store, make_job, prompts):
    """GRPO with its rollout actor on another node than the learner (the learner's node has no CPU left
    for it): the policy's weights reach it before every rollout, and the losses and rewards are those of
    sampling in the learner's own process; every output is in the store."""
    import ray

    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_in_process, run_with_ray

    rewards = [{"function": "test_grpo:ascii_share"}]
    here = load_spec(test_grpo.grpo_job(make_job, "grpo-here", prompts, rewards, training={"max_steps": 3}))
    run_in_process(here)
    scaling = {"num_workers": 1, "cpus_per_worker": 1, "resources_per_worker": {WORKER_RESOURCE: 1}}
    actor_job = test_grpo.grpo_job(make_job, "grpo-nodes", prompts, rewards, training={"max_steps": 3},
                                   grpo={"rollout": {"workers": 1, "cpus_per_worker": 1}}, scaling=scaling,
                                   output={"dir": store.uri("grpo-nodes")})
    earlier = frozenset(ray._private.state.actors())
    summary = run_with_ray(load_spec(actor_job))
    assert summary["steps"] == 3
    learner, actor = (actor_nodes(name, "DEAD", earlier) for name in ("RayTrainWorker", "RolloutWorker"))
    assert len(learner) == 1 and len(actor) == 1 and learner != actor
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    assert {"grpo-nodes/summary.json", "grpo-nodes/metrics.jsonl"} <= set(store.keys("grpo-nodes/"))
    stored = [json.loads(line) for line in store.read("grpo-nodes/metrics.jsonl").decode().splitlines()]
    local = [json.loads(line) for line in (RunPaths.of(here).local / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "reward", "kl"):
        ours, theirs = ([r[key] for r in records if "reward" in r] for records in (stored, local))
        assert len(ours) == 3 and ours == pytest.approx(theirs, rel=1e-4, abs=1e-7)


def test_a_lost_rollout_node_restarts_the_run_from_the_store_with_a_new_actor(nodes, store, make_job, prompts):
    """The rollout actor pinned to a worker node (rollout.resources_per_worker), the learner on the other:
    the actor's node removed once the store has a checkpoint, the group restarts from it with a new actor
    (on the replacement node), and the losses equal an uninterrupted run's."""
    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_in_process, run_with_ray

    rewards, training = [{"function": "test_grpo:ascii_share"}], {"max_steps": 8, "checkpoint_every": 2}
    here = load_spec(test_grpo.grpo_job(make_job, "grpo-whole", prompts, rewards, training=training))
    run_in_process(here)
    scaling = {"num_workers": 1, "cpus_per_worker": 1, "resources_per_worker": {WORKER_RESOURCE: 1}}
    rollout = {"workers": 1, "cpus_per_worker": 1, "resources_per_worker": {WORKER_RESOURCE: 1}}
    job = load_spec(test_grpo.grpo_job(make_job, "grpo-lost", prompts, rewards, training={**training, "max_failures": 1},
                                       grpo={"rollout": rollout}, scaling=scaling,
                                       output={"dir": store.uri("grpo-lost")}))
    run = BackgroundRun(lambda: run_with_ray(job))
    removed = None
    while run.thread.is_alive() and removed is None:
        alive = actor_nodes("RolloutWorker", "ALIVE")
        if alive and store.keys("grpo-lost/checkpoints/latest"):
            removed = next(node for node in nodes.workers if node.node_id in alive)
            nodes.replace(removed)
        time.sleep(0.05)
    summary = run.summary()
    assert removed is not None, "the run ended before the rollout node could be removed"
    assert summary["steps"] == 8 and summary["resumed_from_step"] in range(2, 8, 2)
    stored = [json.loads(line) for line in store.read("grpo-lost/metrics.jsonl").decode().splitlines()]
    local = [json.loads(line) for line in (RunPaths.of(here).local / "metrics.jsonl").read_text().splitlines()]
    by_step = {record["step"]: record for record in stored if "reward" in record}  # a step may be logged twice
    assert sorted(by_step) == list(range(1, 9))
    for key in ("train_loss", "reward"):
        assert [by_step[r["step"]][key] for r in local if "reward" in r] == pytest.approx(
            [r[key] for r in local if "reward" in r], rel=1e-4, abs=1e-7)


def test_a_local_output_dir_a_node_cannot_see_is_refused(nodes, make_job, tmp_path):
    """A node in its own mount namespace, with an empty tmpfs where the driver's run folder is: the
    run is refused before it starts, naming output.dir and what to set instead."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give a node its own disk")
    from ftcluster.config.spec import load_spec
    from ftcluster.core.errors import FtError
    from ftcluster.launch.launcher import run_with_ray
    from ftcluster.sweep.driver import SweepOptions, prepare_sweep, run_sweep

    disk = tmp_path / "node-local-disk"
    disk.mkdir()
    trial = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if trial.returncode != 0:
        pytest.skip(f"this machine does not allow a private mount namespace: {trial.stderr.strip()[:200]}")
    starter = Path(__file__).parent / "namespaced_node.py"
    script = f"mount -t tmpfs tmpfs {disk} && exec {sys.executable} {starter} {nodes.cluster.address} blind"
    node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        import ray

        deadline = time.monotonic() + 60
        while not any(n["Alive"] and n["Resources"].get("blind") for n in ray.nodes()):
            assert node.poll() is None, node.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the namespaced node did not join"
            time.sleep(0.5)
        job = make_job("blind", scaling={"num_workers": 1, "cpus_per_worker": 1},
                       output={"dir": str(disk / "run")})
        with pytest.raises(FtError, match=r"output.dir: .+ is on this machine's disk, not on 1 of the \d nodes .+ "
                                          r"set output.dir to a storage URI"):
            run_with_ray(load_spec(job))
        assert not (disk / "run" / "summary.json").exists()
        space = tmp_path / "space.yaml"  # a sweep's folder likewise
        space.write_text("training.lr: {grid: [0.001]}\n")
        options = SweepOptions(searcher="grid", scheduler="none")
        sweep = prepare_sweep(load_spec(job), space, options, str(disk / "sweep"), force=False)
        with pytest.raises(FtError, match=r"--out: .+ is on this machine's disk, not on 1 of the \d nodes .+ "
                                          r"set --out to a storage URI"):
            run_sweep(sweep)
        assert not (disk / "sweep" / "trials").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, 15)
        node.wait(timeout=60)
