"""Where a worker runs: its rank in the group, and how it reports to whoever launched it.

The loop only talks to a `WorkerContext`, so it runs the same with Ray Train, with plain
torch.distributed, or as a single process (``--no-ray``, benchmarks, tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    report: Callable[[dict[str, float]], None] = field(default=lambda metrics: None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ray_context() -> WorkerContext:
    """The context of a Ray Train worker (call inside the training function)."""
    import ray.train

    context = ray.train.get_context()
    return WorkerContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        report=lambda metrics: ray.train.report(metrics),
    )
