"""A training worker that died without an error of its own, told in one line.

A worker process killed from outside (the kernel's out-of-memory killer in its node's memory
cgroup, Ray's memory monitor) raises nothing: Ray Train reports a failed health check of a dead
actor, with a page of its own text. This says which worker died, the likely cause, and what the
planner gives each worker, so the fix (more memory per node, more workers to shard over) is in
the line itself.
"""

from __future__ import annotations

import re

from ftcluster.config.spec import JobSpec
from ftcluster.core.errors import FtError

DEAD_ACTOR = "The actor is dead because its worker process has died"
RAY_OOM = "low on memory"


def worker_death(exc: BaseException, spec: JobSpec) -> FtError | None:
    """The one-line error for a worker that died without raising (None: not that)."""
    text = str(exc)
    if DEAD_ACTOR not in text and RAY_OOM not in text:
        return None
    rank = re.search(r"world_rank=(\d+)", text)
    who = f"worker {rank.group(1)}" if rank else "a training worker"
    cause = ("Ray's memory monitor killed it (its node ran low on memory)" if RAY_OOM in text else
             "it was killed from outside, most likely by the kernel for memory (see dmesg on its node)")
    return FtError(f"{who} of {spec.scaling.num_workers} died without an error: {cause}; "
                   f"{planned_memory(spec)}give its nodes more memory or shard over more workers "
                   "(distributed.backend=deepspeed, zero_stage=3)")


def planned_memory(spec: JobSpec) -> str:
    """What the planner gives each worker, as the start of a clause (empty when it cannot plan)."""
    from ftcluster.planning.plan import GB, memory_plan

    try:
        plan = memory_plan(spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"gpus_per_node": 1})}))
    except (FtError, OSError, ValueError):
        return ""
    where = "host RAM" if plan.cpu else "GPU memory"
    figure = plan.host_total if plan.cpu else plan.gpu_total
    return f"the plan gives each worker {figure / GB:.1f} GB of {where} (`ftcluster plan`); "
