"""Where a worker runs: its rank in the group, and how it reports to whoever launched it.

The loop only talks to a `WorkerContext`, so it runs the same with Ray Train, with plain
torch.distributed, or as a single process (``--no-ray``, benchmarks, tests). The Ray-specific
contexts are built where Ray is launched: `launch.launcher.ray_context` and `sweep.trial.tune_context`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ftcluster.core.errors import FtError

COLLECTIVE_FAILURE_WORDS = ("timed out", "timeout", "connection reset", "connection closed", "broken pipe")


class CollectiveError(FtError):
    """A collective operation timed out or lost a peer."""


class Reporter(Protocol):
    """WorkerContext.report: metrics, and optionally a checkpoint folder."""

    def __call__(self, metrics: dict[str, float], checkpoint: Path | None = None, /) -> None: ...


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # report(metrics, checkpoint_dir): tell the launcher; checkpoint_dir only from the main worker.
    report: Reporter = field(default=lambda metrics, checkpoint=None: None)
    # After a worker-group restart: the launcher's latest checkpoint to resume from.
    restored: Path | None = None
    # The launch this worker belongs to (Ray Train's run name), recorded in checkpoints: a worker group
    # that Ray restarts continues its own launch's checkpoint in run storage, never an older one.
    launch: str | None = None
    # Whether a node of the worker group has a preemption notice (Ray's drain of a spot node, with a
    # deadline): every worker asks at every step boundary, and gets the same answer.
    preemption_notice: Callable[[], bool] = field(default=lambda: False)
    # The signal the launcher asked this worker group to stop for (0: none): its driver's own Ctrl+C or SIGTERM
    # (launch/group_stop.py). Asked at every step boundary; fresh=True asks again instead of a recent answer.
    stop_request: Callable[..., int] = field(default=lambda fresh=False: 0)
    # Online RL's sampler when the launcher runs it elsewhere (Ray rollout actors); None: this worker samples.
    sampler: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

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
