"""Evaluation split over a run's workers: each scores its share of the examples, and the shares are
put back together (sums all-reduced, per-example results gathered), so every worker ends with the
metrics of the whole set after evaluating 1/N of it.

Under DeepSpeed ZeRO-3 every forward pass is a collective (each layer's parameters are gathered from
all workers as it runs), so there every worker must run as many forward passes as the others: a
worker with fewer batches repeats one, and drops its result (`EvalShard.batches`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")
B = TypeVar("B")


@dataclass(frozen=True)
class EvalShard:
    """Which share of the evaluation set this worker scores. The default is one worker, the whole set."""

    rank: int = 0
    world_size: int = 1
    lockstep: bool = False  # every forward pass is a collective (ZeRO-3): equal batch counts on every worker
    device: torch.device | None = None  # where the collectives' tensors live (NCCL needs them on the GPU)

    @property
    def split(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_initialized()

    @property
    def in_lockstep(self) -> bool:
        """Split over workers that must run equal forward passes (nothing may be skipped or run once)."""
        return self.lockstep and self.split

    def part(self, items: Sequence[T]) -> list[T]:
        """Every world_size-th item from this worker's rank: shares differ in size by at most one."""
        return list(items[self.rank :: self.world_size]) if self.split else list(items)

    def batches(self, batches: list[B], spare: Callable[[], B]) -> Iterator[tuple[B, bool]]:
        """(batch, real) for each batch; in lockstep, as many as the busiest worker has, the missing
        ones a repeat of the last batch (or `spare()` when this worker has none) with real=False."""
        count = len(batches)
        if self.in_lockstep:
            count = int(self._reduce([float(count)], torch.distributed.ReduceOp.MAX)[0])
        for index in range(count):
            if index < len(batches):
                yield batches[index], True
            else:
                yield (batches[-1] if batches else spare()), False

    def total(self, values: Sequence[float]) -> list[float]:
        """The sums of `values` over every worker."""
        return self._reduce(values, torch.distributed.ReduceOp.SUM) if self.split else list(values)

    def gather(self, values: list[T]) -> list[T]:
        """Every worker's list, concatenated in rank order (the same result on every worker)."""
        if not self.split:
            return values
        shares: list[list[T] | None] = [None] * self.world_size
        torch.distributed.all_gather_object(shares, values)
        return [value for share in shares for value in share or []]

    def _reduce(self, values: Sequence[float], op) -> list[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=op)
        return tensor.tolist()


WHOLE = EvalShard()


def longest_first(items: Sequence[T], batch_size: int, length: Callable[[T], int]) -> list[list[T]]:
    """Batches of items of similar length (little padding), the longest batch first (it shows at once
    whether the largest batch fits in memory)."""
    ordered = sorted(items, key=length, reverse=True)
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
