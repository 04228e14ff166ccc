"""Where a worker runs: its rank in the group, and how it reports to whoever launched it.

The loop only talks to a `WorkerContext`, so it runs the same with Ray Train, with plain
torch.distributed, or as a single process (``--no-ray``, benchmarks, tests).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Testing hook for fault tolerance: "RANK:STEP" makes that worker die abruptly after that step,
# on a first attempt only (not after a restart), like a machine that goes away.
FAIL_AT_ENV = "FTCLUSTER_FAIL_AT"


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # report(metrics, checkpoint_dir): tell the launcher; checkpoint_dir only from the main worker.
    report: Callable[[dict[str, float], Path | None], None] = field(default=lambda metrics, checkpoint=None: None)
    # After a worker-group restart: the launcher's latest checkpoint to resume from.
    restored: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def maybe_fail(self, step: int) -> None:
        target = os.environ.get(FAIL_AT_ENV)
        if target and self.restored is None and target == f"{self.rank}:{step}":
            print(f"{FAIL_AT_ENV}: worker {self.rank} exits at step {step}", flush=True)
            os._exit(1)


def ray_context(checkpoint_root: Path) -> WorkerContext:
    """The context of a Ray Train worker (call inside the training function)."""
    import ray.train

    context = ray.train.get_context()

    def report(metrics: dict[str, float], checkpoint: Path | None = None) -> None:
        # Every worker must call this (it is a barrier); Ray persists the checkpoint to storage.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None)

    return WorkerContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        report=report,
        restored=_restore_reported_checkpoint(checkpoint_root),
    )


def _restore_reported_checkpoint(checkpoint_root: Path) -> Path | None:
    """After a restart, fetch Ray's latest reported checkpoint into the run's checkpoints folder."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as local:
        step = json.loads((Path(local) / "trainer_state.json").read_text())["step"]
        target = checkpoint_root / f"step-{step:07d}"
        if not (target / "trainer_state.json").is_file():
            staging = checkpoint_root / f".restore-{os.getpid()}"
            shutil.copytree(local, staging, dirs_exist_ok=True)
            try:
                os.replace(staging, target)
            except OSError:  # another worker on this node restored it first
                shutil.rmtree(staging, ignore_errors=True)
    return target
