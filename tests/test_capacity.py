"""Can a cluster ever hold a job: totals, whole worker bundles per node, the driver's CPUs, and the
most an autoscaling cluster's `ray up` config lets it grow to."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO

from ftcluster.config.spec import load_spec
from ftcluster.core.errors import FtError
from ftcluster.planning.capacity import ClusterView, capacity_problems, rollout_actor_resources, workers_that_fit


def cpu_job(make_job, workers: int, cpus: float = 1, strategy: str = "PACK"):
    return load_spec(make_job("fit", scaling={"num_workers": workers, "cpus_per_worker": cpus,
                                              "placement_strategy": strategy}))


def test_workers_are_placed_whole_on_one_node(make_job):
    nodes = [{"CPU": 3.0}, {"CPU": 3.0}]  # 6 CPUs in all, but a 2-CPU worker fits once per node
    spec = cpu_job(make_job, 3, cpus=2)
    assert workers_that_fit(spec, nodes) == 2
    problems = capacity_problems(spec, ClusterView(nodes))
    assert len(problems) == 1 and "hold 2 of the 3 workers (2 CPU each, whole on one node, PACK)" in problems[0]


def test_the_drivers_cpu_counts_against_the_node_it_takes():
    """The README's old KubeRay shape: 2 pods of 8 CPUs and 8 GPUs, 16 one-GPU workers, a driver of 1 CPU."""
    spec = load_spec(REPO / "jobs" / "llama-7b-lora-ddp.yaml",
                     ["scaling.num_workers=16", "scaling.cpus_per_worker=1", "scaling.use_gpu=true"])
    pods = [{"CPU": 0.0}] + [{"CPU": 8.0, "GPU": 8.0}] * 2
    assert workers_that_fit(spec, pods) == 16
    assert workers_that_fit(spec, pods, driver_cpus=1) == 15
    problems = capacity_problems(spec, ClusterView(pods), driver_cpus=1)
    assert problems and "needs 17 CPU (16 workers + 1 for the job's driver), the Ray cluster has 16" in problems[0]


def test_strict_strategies(make_job):
    nodes = [{"CPU": 4.0}, {"CPU": 2.0}]
    assert workers_that_fit(cpu_job(make_job, 3, strategy="STRICT_SPREAD"), nodes) == 2
    assert workers_that_fit(cpu_job(make_job, 3, strategy="STRICT_PACK"), nodes) == 4
    assert capacity_problems(cpu_job(make_job, 5, strategy="STRICT_PACK"), ClusterView([*nodes, {"CPU": 1.0}]))


def test_an_autoscaling_config_is_checked_at_its_largest():
    config = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    largest = ClusterView.at_most(config, "aws-gpu.yaml")
    assert len(largest.nodes) == 1 + 4 + 4 and largest.totals["GPU"] == 64
    header_job = load_spec(REPO / "jobs" / "llama-7b-lora-ddp.yaml")  # the job its header submits
    assert capacity_problems(header_job, largest, driver_cpus=0.25) == []
    assert capacity_problems(header_job, ClusterView([{"CPU": 0.0}]), driver_cpus=0.25)  # only the head is up
    config["max_workers"] = 1
    assert ClusterView.at_most(config, "aws-gpu.yaml").totals["GPU"] == 16  # each pool capped at 1 node
    del config["available_node_types"]["a100x8"]["resources"]
    with pytest.raises(FtError, match=r"aws-gpu.yaml: available_node_types.a100x8: set resources"):
        ClusterView.at_most(config, "aws-gpu.yaml")


def test_grpo_rollout_actors_count_against_the_cluster():
    """Two learners and two rollout actors with a GPU each need 4 GPUs; CPU-only actors fit beside them."""
    overrides = ["scaling.num_workers=2", "scaling.use_gpu=true", "scaling.gpu_type=L4", "method.grpo.rollout.workers=2"]
    cluster = ClusterView([{"CPU": 16.0, "GPU": 3.0}])
    problems = capacity_problems(load_spec(REPO / "jobs" / "grpo-smollm2.yaml", overrides), cluster)
    assert problems and "needs 4 GPU (2 workers + 2 rollout actors), the Ray cluster has 3" in problems[0]
    cpu_actors = load_spec(REPO / "jobs" / "grpo-smollm2.yaml", [*overrides, "method.grpo.rollout.gpus_per_worker=0"])
    assert not capacity_problems(cpu_actors, cluster)
    # Pinned to nodes with a custom resource (method.grpo.rollout.resources_per_worker) the cluster has too few of.
    pinned = load_spec(REPO / "jobs" / "grpo-smollm2.yaml", [*overrides, "method.grpo.rollout.gpus_per_worker=0",
                                                            "method.grpo.rollout.resources_per_worker={rollout_node: 1}"])
    assert rollout_actor_resources(pinned) == {"CPU": 2, "rollout_node": 1}
    problems = capacity_problems(pinned, ClusterView([{"CPU": 16.0, "GPU": 3.0, "rollout_node": 1.0}]))
    assert problems and "needs 2 rollout_node (2 workers + 2 rollout actors), the Ray cluster has 1" in problems[0]
