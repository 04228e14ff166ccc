"""Can this Ray cluster ever run the job? Checked before training starts (inside the cluster) and
before `ftcluster submit` (from outside, through the dashboard), so a request the cluster can never
meet is refused with the numbers instead of waiting PENDING forever.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftcluster.spec import JobSpec


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


def worker_resources(spec: JobSpec) -> dict[str, float]:
    """What one Ray Train worker reserves: CPUs, GPUs (GPU jobs), and the spec's custom resources."""
    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return {**resources, **scaling.resources_per_worker}


def capacity_problems(spec: JobSpec, view: ClusterView, driver_cpus: float = 0.0) -> list[str]:
    """What the job needs that the cluster does not have: counts, one worker's bundle on some node,
    and (GPU jobs) the planner's memory estimate against the cluster's GPU type and node RAM."""
    scaling = spec.scaling
    have = view.totals
    bundle = worker_resources(spec)
    needs = {kind: scaling.num_workers * amount for kind, amount in bundle.items()}
    needs["CPU"] += driver_cpus
    problems = [
        f"scaling: the job needs {amount:g} {kind} ({scaling.num_workers} workers"
        + (f" + {driver_cpus:g} for the job's driver" if kind == "CPU" and driver_cpus else "")
        + f"), the Ray cluster has {have.get(kind, 0):g}"
        for kind, amount in needs.items() if amount > have.get(kind, 0)
    ]
    if not problems and view.nodes and not any(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in view.nodes):
        problems.append(f"scaling: no node can hold one worker ({', '.join(f'{v:g} {k}' for k, v in bundle.items())}); "
                        "lower scaling.cpus_per_worker / gpus_per_worker")
    if scaling.use_gpu and not problems:
        problems += _plan_problems(spec, view)
    return problems


def _plan_problems(spec: JobSpec, view: ClusterView) -> list[str]:
    """The planner's estimates against what the cluster reports: the memory of its GPU type,
    and the RAM of its smallest GPU node."""
    from ftcluster.accelerators import find_accelerator
    from ftcluster.plan import GB, plan_job

    kinds = [key.split(":", 1)[1] for key in view.totals if key.startswith("accelerator_type:")]
    found = [find_accelerator(kind) for kind in kinds]
    memory = [accelerator.memory_gb for accelerator in found if accelerator is not None]
    node_ram = [node.get("memory", 0) / GB for node in view.nodes if node.get("GPU")]
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
