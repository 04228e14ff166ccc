"""Can this Ray cluster ever run the job? Checked before training starts (inside the cluster) and
before `ftcluster submit` (from outside, through the dashboard), so a request the cluster can never
meet is refused with the numbers instead of waiting PENDING forever.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ftcluster.config.spec import JobSpec

DRIVER_CPUS_ENV = "FTCLUSTER_DRIVER_CPUS"  # CPUs the job's driver holds (a submitted job's entrypoint)
# Set by `submit` when it checked against an autoscaling cluster's limits (or was told not to check):
# the nodes alive inside the cluster then say nothing; scaling.placement_timeout_s bounds the wait.
CHECKED_ENV = "FTCLUSTER_CAPACITY_CHECKED_BY_SUBMIT"


@dataclass
class ClusterView:
    """The alive nodes' total resources, as Ray names them (CPU, GPU, memory, accelerator_type:H100)."""

    nodes: list[dict[str, float]]

    @property
    def totals(self) -> dict[str, float]:
        summed: dict[str, float] = {}
        for node in self.nodes:
            for key, value in node.items():
                summed[key] = summed.get(key, 0.0) + value
        return summed

    @classmethod
    def from_ray(cls) -> ClusterView:
        """From inside a Ray driver (ray.init done)."""
        import ray

        return cls([dict(n["Resources"]) for n in ray.nodes() if n["Alive"]])

    @classmethod
    def from_state_api(cls, nodes: list[dict]) -> ClusterView:
        """From the dashboard's /api/v0/nodes rows (outside the cluster)."""
        return cls([dict(n["resources_total"]) for n in nodes if n.get("state") == "ALIVE"])

    @classmethod
    def at_most(cls, config: dict, source: str) -> ClusterView:
        """The largest cluster a `ray up` config lets the autoscaler build: the head plus every worker
        node type at its max_workers (each capped by the config's global max_workers). What is alive
        now says nothing about an autoscaling cluster, whose worker pools may stand at zero."""
        from ftcluster.core.errors import FtError

        types = config.get("available_node_types") or {}
        head = config.get("head_node_type")
        if head not in types:
            raise FtError(f"{source}: no head_node_type among available_node_types (a `ray up` cluster config?)")
        cap = config.get("max_workers")
        nodes = []
        for name, node_type in types.items():
            resources = node_type.get("resources")
            if resources is None:
                raise FtError(f"{source}: available_node_types.{name}: set resources (CPU, GPU, ...) so the "
                              "job can be checked against it")
            count = 1 if name == head else min(node_type.get("max_workers", 0), cap if cap is not None else 10**6)
            nodes += [{key: float(value) for key, value in resources.items()} for _ in range(count)]
        return cls(nodes)


def worker_resources(spec: JobSpec) -> dict[str, float]:
    """What one Ray Train worker reserves: CPUs, GPUs (GPU jobs), and the spec's custom resources."""
    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return {**resources, **scaling.resources_per_worker}


def rollout_actor_resources(spec: JobSpec) -> dict[str, float]:
    """What one GRPO rollout actor reserves (method.grpo.rollout): its CPUs, GPUs if it has any, and its
    custom resources."""
    if not spec.rollout_actors or spec.method.grpo is None:
        return {}
    rollout = spec.method.grpo.rollout
    scaling = spec.scaling
    gpus = rollout.gpus_per_worker if rollout.gpus_per_worker is not None else (
        scaling.gpus_per_worker if scaling.use_gpu else 0.0)
    resources = {"CPU": rollout.cpus_per_worker or scaling.cpus_per_worker}
    return resources | ({"GPU": gpus} if gpus else {}) | rollout.resources_per_worker


def driver_cpus_here() -> float:
    """The CPUs this driver holds in the cluster: what `ftcluster submit` reserved for its entrypoint."""
    return float(os.environ.get(DRIVER_CPUS_ENV, 0))


def _fits(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many whole bundles one node holds."""
    return int(min((node.get(kind, 0.0) + 1e-9) // amount for kind, amount in bundle.items() if amount > 0))


def workers_that_fit(spec: JobSpec, nodes: list[dict[str, float]], driver_cpus: float = 0.0) -> int:
    """How many of the job's workers the nodes can hold at once (Ray places each worker's bundle whole
    on one node, under the spec's placement strategy), after the driver's CPUs are taken from the node
    where they cost the fewest workers."""
    bundle = worker_resources(spec)
    strategy = spec.scaling.placement_strategy

    def held(counts: list[int]) -> int:
        if strategy == "STRICT_PACK":
            return max(counts, default=0)
        if strategy == "STRICT_SPREAD":
            return sum(min(count, 1) for count in counts)
        return sum(counts)

    counts = [_fits(node, bundle) for node in nodes]
    if not driver_cpus:
        return held(counts)
    options = [held([*counts[:i], _fits({**node, "CPU": node.get("CPU", 0.0) - driver_cpus}, bundle), *counts[i + 1:]])
               for i, node in enumerate(nodes) if node.get("CPU", 0.0) + 1e-9 >= driver_cpus]
    return max(options, default=0)


def capacity_problems(spec: JobSpec, view: ClusterView, driver_cpus: float = 0.0) -> list[str]:
    """What the job needs that the cluster does not have: counts, the workers' bundles on its nodes,
    and (GPU jobs) the planner's memory estimate against the cluster's GPU type and node RAM."""
    scaling = spec.scaling
    have = view.totals
    bundle = worker_resources(spec)
    needs = {kind: scaling.num_workers * amount for kind, amount in bundle.items()}
    needs["CPU"] += driver_cpus
    actors = spec.rollout_actors
    for kind, amount in rollout_actor_resources(spec).items():
        needs[kind] = needs.get(kind, 0.0) + actors * amount
    problems = [
        f"scaling: the job needs {amount:g} {kind} ({scaling.num_workers} workers"
        + (f" + {driver_cpus:g} for the job's driver" if kind == "CPU" and driver_cpus else "")
        + (f" + {actors} rollout actors" if actors else "")
        + f"), the Ray cluster has {have.get(kind, 0):g}" + (_fewer_cpus_hint(spec, have, needs) if kind == "CPU" else "")
        for kind, amount in needs.items() if amount > have.get(kind, 0) + 1e-9
    ]
    one_worker = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    if not problems and view.nodes and not any(_fits(node, bundle) for node in view.nodes):
        problems.append(f"scaling: no node can hold one worker ({one_worker}); "
                        "lower scaling.cpus_per_worker / gpus_per_worker")
    elif not problems and view.nodes:
        fit = workers_that_fit(spec, view.nodes, driver_cpus)
        if fit < scaling.num_workers:
            per_node = ", ".join(f"{node.get('CPU', 0):g} CPU/{node.get('GPU', 0):g} GPU" for node in view.nodes)
            driver = f" and the driver's {driver_cpus:g} CPU" if driver_cpus else ""
            problems.append(f"scaling: the nodes ({per_node}) hold {fit} of the {scaling.num_workers} workers "
                            f"({one_worker} each, whole on one node, {scaling.placement_strategy}){driver}; "
                            "lower scaling.cpus_per_worker or num_workers, or add nodes")
    if scaling.use_gpu and not problems:
        problems += _plan_problems(spec, view)
    elif not problems:
        problems += _cpu_memory_problems(spec, view)
    return problems


def _fewer_cpus_hint(spec: JobSpec, have: dict[str, float], needs: dict[str, float]) -> str:
    """What to set so the workers' CPUs fit what the cluster has beside the driver's and actors' (in quarters)."""
    scaling = spec.scaling
    spare = have.get("CPU", 0.0) - (needs["CPU"] - scaling.num_workers * scaling.cpus_per_worker)
    fitting = math.floor(4 * spare / scaling.num_workers + 1e-9) / 4
    return f"; set scaling.cpus_per_worker={fitting:g} or fewer, or add nodes" if fitting > 0 else ""


def _cpu_memory_problems(spec: JobSpec, view: ClusterView) -> list[str]:
    """CPU workers hold their weights, gradients, optimizer states and activations in host RAM: one
    worker's planned memory against the `memory` the nodes that can run it offer to Ray. (Ray does not
    reserve memory for Train workers: a worker that outgrows its node is killed, without a word from us.)"""
    from ftcluster.core.errors import FtError
    from ftcluster.planning.plan import GB, memory_plan

    bundle = worker_resources(spec)
    offers = [node["memory"] for node in view.nodes if node.get("memory") and _fits(node, bundle)]
    if not offers:
        return []
    try:
        plan = memory_plan(spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"gpus_per_node": 1})}))
    except (FtError, OSError, ValueError):
        return []  # no config to plan from here (the workers will say what is wrong with the model)
    if plan.host_total <= max(offers):
        return []
    sharded = spec.distributed.backend == "deepspeed" and spec.distributed.zero_stage == 3
    advice = ("more workers (scaling.num_workers)" if sharded else
              "workers with distributed.backend=deepspeed, zero_stage=3 (more of them: less each)")
    return [(f"plan: one CPU worker needs {plan.host_total / GB:.1f} GB of host RAM (model states "
            f"{plan.model_states / GB:.1f} GB, activations, runtime), the largest node that can run it offers "
            f"{max(offers) / GB:.1f} GB to Ray; shard the model states over {advice}, or use larger nodes "
            "(see `ftcluster plan`)")]


def _plan_problems(spec: JobSpec, view: ClusterView) -> list[str]:
    """The planner's estimates against what the cluster reports: the memory of its GPU type,
    and the RAM of its smallest GPU node."""
    from ftcluster.core.accelerators import find_accelerator
    from ftcluster.planning.plan import GB, plan_job

    kinds = [key.split(":", 1)[1] for key in view.totals if key.startswith("accelerator_type:")]
    found = [find_accelerator(kind) for kind in kinds]
    memory = [accelerator.memory_gb for accelerator in found if accelerator is not None]
    node_ram = [node["memory"] / GB for node in view.nodes if node.get("GPU") and node.get("memory")]
    if not memory and not node_ram:
        return []
    update = {"gpu_memory_gb": min(memory) if memory else spec.scaling.gpu_memory_gb}
    if node_ram:
        update["node_ram_gb"] = min(node_ram)
    plan = plan_job(spec.model_copy(update={"scaling": spec.scaling.model_copy(update=update)}))
    problems = []
    if memory and plan.gpu_total > plan.gpu_capacity:
        problems.append(f"plan: {plan.gpu_total / GB:.1f} GB per GPU needed, the cluster's {', '.join(kinds)} GPUs "
                        f"have {min(memory)} GB (see `ftcluster plan --suggest`)")
    if node_ram and plan.host_total > plan.host_capacity:
        problems.append(f"plan: {plan.host_total / GB:.1f} GB of host RAM per node needed, the smallest GPU node "
                        f"offers {min(node_ram):.1f} GB to Ray (see `ftcluster plan`)")
    return problems
