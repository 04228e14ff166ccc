"""What DPO and reward models share: batches of preference pairs (chosen replies in the first half,
their rejected partners in the second) and per-pair means over held-out pairs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ftcluster.data.batches import collate
from ftcluster.data.render import Encoded
from ftcluster.evaluation.metrics import eval_batches
from ftcluster.evaluation.shard import EvalShard
from ftcluster.objectives.base import Batch


class PairObjective(Protocol):
    def collate(self, items: list[Encoded], pad_id: int) -> Batch: ...

    def terms(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]: ...


def collate_pairs(items: list[Encoded], pad_id: int) -> Batch:
    """Chosen replies in the first half of the batch, their rejected partners in the second."""
    rejected = [item.rejected for item in items if item.rejected is not None]
    assert len(rejected) == len(items), "this objective's batches hold preference pairs only"
    return collate(items + rejected, pad_id)


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0] // 2


def held_out_pair_means(objective: PairObjective, model, items: list[Encoded], batch_size: int,
                        pad_id: int, device, autocast, limit: int | None, shard: EvalShard, names: tuple[str, ...],
                        batch_sums: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]) -> dict[str, float]:
    """Per pair means over held-out pairs (every worker its share, the sums added up): `batch_sums`
    gives a batch's sums of the terms named `names`, from the objective's terms; {} without pairs."""
    sums = [0.0] * len(names)
    pairs = 0.0
    for batch, real in eval_batches(items, batch_size, pad_id, device, limit, objective.collate, shard):
        with autocast():
            terms = objective.terms(model, batch)
        if not real:
            continue
        sums = [total + float(value) for total, value in zip(sums, batch_sums(terms), strict=True)]
        pairs += terms["losses"].shape[0]
    *sums, pairs = shard.total([*sums, pairs])
    if pairs == 0:
        return {}
    return {name: total / pairs for name, total in zip(names, sums, strict=True)}
