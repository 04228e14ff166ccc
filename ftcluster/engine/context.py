"""Where a worker runs: its rank in the group, and how it reports to whoever launched it.

The loop only talks to a `WorkerContext`, so it runs the same with Ray Train, with plain
torch.distributed, or as a single process (``--no-ray``, benchmarks, tests).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ftcluster.errors import FtError
from ftcluster.layout import TRAINER_STATE, checkpoint_name, checkpoint_step

# Testing hooks for fault tolerance, "RANK:STEP": that worker dies abruptly after that step
# (FAIL_AT, like a machine that goes away) or hangs there (STALL_AT, like a stuck GPU), on a
# first attempt only (not after a restart).
FAIL_AT_ENV = "FTCLUSTER_FAIL_AT"
STALL_AT_ENV = "FTCLUSTER_STALL_AT"
COLLECTIVE_FAILURE_WORDS = ("timed out", "timeout", "connection reset", "connection closed", "broken pipe")


class CollectiveError(FtError):
    """A collective operation timed out or lost a peer."""


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
        here = f"{self.rank}:{step}"
        if self.restored is not None:
            return
        if os.environ.get(FAIL_AT_ENV) == here:
            print(f"{FAIL_AT_ENV}: worker {self.rank} exits at step {step}", flush=True)
            os._exit(1)
        if os.environ.get(STALL_AT_ENV) == here:
            print(f"{STALL_AT_ENV}: worker {self.rank} hangs at step {step}", flush=True)
            time.sleep(10**6)

    @contextlib.contextmanager
    def collective(self, operation: str, step: int, timeout_s: int):
        """Turn a collective's timeout or lost peer into a one-line error naming rank and operation."""
        try:
            yield
        except RuntimeError as exc:
            text = str(exc).lower()
            if self.world_size == 1 or not any(word in text for word in COLLECTIVE_FAILURE_WORDS):
                raise
            raise CollectiveError(
                f"worker {self.rank} of {self.world_size}: {operation} at step {step} failed after waiting up to "
                f"distributed.timeout_s={timeout_s}s: a peer is stuck or gone ({str(exc).splitlines()[0][:160]})"
            ) from None


def ray_context(checkpoint_root: Path) -> WorkerContext:
    """The context of a Ray Train worker (call inside the training function)."""
    import ray.train

    context = ray.train.get_context()

    def report(metrics: dict[str, float], checkpoint: Path | None = None) -> None:
        # Every worker must call this (it is a barrier). Ray copies the checkpoint to its storage
        # in the background (training goes on) and keeps our local copy for `--resume`.
        if checkpoint is None:
            ray.train.report(metrics)
            return
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=False,
        )

    return WorkerContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        report=report,
        restored=restore_checkpoint(ray.train.get_checkpoint(), checkpoint_root),
    )


def tune_context(checkpoint_root: Path) -> WorkerContext:
    """The context of a one-worker sweep trial that runs the loop inside its Ray Tune actor."""
    from ray import tune

    def report(metrics: dict[str, float], checkpoint: Path | None = None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None)

    return WorkerContext(report=report, restored=restore_checkpoint(tune.get_checkpoint(), checkpoint_root, replace=True))


def restore_checkpoint(checkpoint, checkpoint_root: Path, replace: bool = False) -> Path | None:
    """After a restart (or a PBT exploit), copy the launcher's checkpoint into the run's checkpoints folder.

    replace: a PBT exploit brings another trial's checkpoint, which must win over this trial's own
    checkpoint of the same step (one worker, so no other process copies it at the same time).
    """
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as local:
        step = checkpoint_step(Path(local))
        target = checkpoint_root / checkpoint_name(step)
        if replace and target.exists():
            shutil.rmtree(target)
        if not (target / TRAINER_STATE).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = checkpoint_root / f".restore-{os.getpid()}"
            shutil.copytree(local, staging, dirs_exist_ok=True)
            try:
                os.replace(staging, target)
            except OSError:  # another worker on this node restored it first (checked below)
                shutil.rmtree(staging, ignore_errors=True)
    if not (target / TRAINER_STATE).is_file():
        raise FtError(f"restoring the checkpoint of step {step} into {target} failed; the folder is incomplete")
    return target
