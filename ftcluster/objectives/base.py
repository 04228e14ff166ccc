"""What the training loop and the evaluation suite ask of an objective (`Objective`), and the base of
the objectives that train on the data as it is (SFT, DPO, reward models).

The loop asks an objective which step's examples a step trains on, to turn them into micro batches,
to count each batch's units (target tokens for SFT, pairs for DPO and reward models, completion tokens
for GRPO: the loss is normalised by the step's total across workers) and for a batch's summed loss.
Evaluation asks it for its own held-out metrics (DPO and reward models score pairs, GRPO answers
prompts) or, for SFT, leaves the validation loss and answers to the suite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from ftcluster.config.registry import OBJECTIVES, implementation
from ftcluster.data.render import Encoded
from ftcluster.evaluation.metrics import loss_sum
from ftcluster.evaluation.shard import WHOLE, EvalShard

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


class Objective(Protocol):
    """One training objective, as the loop (training/loop.py) and evaluation (evaluation/suite.py) use it."""

    name: str
    scores_answer_choices: bool  # held-out prompts with a closed set of answers are also scored by choice
    # The per-unit training loss of a uniform guess (ln of the classes a cross-entropy loss picks among), or
    # None where the loss has no such level: a run back at it after warmup has collapsed (training/health.py).
    chance_loss: float | None

    def data_step(self, step: int) -> int:
        """Which step's examples optimizer step `step` trains on."""
        ...

    def step_batches(self, items: list[list[Encoded]], indices: list[list[int]], step: int,
                     pad_id: int) -> list[Batch]:
        """The micro batches of a step, from each micro batch's examples and their indices in the data."""
        ...

    def count(self, batch: Batch) -> int:
        """The units a batch's loss sums over (the step's loss is divided by their total across workers)."""
        ...

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        ...

    def window_stats(self, world_size: int, all_reduce: Callable[[torch.Tensor], None]) -> dict[str, float]:
        """What the objective measured over a logging window (e.g. rewards), summed over workers; {} if nothing."""
        ...

    def evaluate(self, model: torch.nn.Module, items: list[Encoded], batch_size: int, pad_id: int, device,
                 autocast, limit: int | None = None, shard: EvalShard = WHOLE) -> dict[str, Any] | None:
        """The objective's own held-out metrics, or None: the suite scores the validation loss (and answers)."""
        ...

    def scoring_loss(self, model: torch.nn.Module) -> LossFn:
        """The summed loss evaluation scores validation items with."""
        ...


class FixedDataObjective:
    """An objective that trains on the data as it is: each step reads its own examples, collated."""

    name = ""
    scores_answer_choices = False
    chance_loss: float | None = None

    def collate(self, items: list[Encoded], pad_id: int) -> Batch:
        raise NotImplementedError

    def data_step(self, step: int) -> int:
        return step

    def step_batches(self, items: list[list[Encoded]], indices: list[list[int]], step: int,
                     pad_id: int) -> list[Batch]:
        return [self.collate(group, pad_id) for group in items]

    def window_stats(self, world_size: int, all_reduce: Callable[[torch.Tensor], None]) -> dict[str, float]:
        return {}

    def evaluate(self, model: torch.nn.Module, items: list[Encoded], batch_size: int, pad_id: int, device,
                 autocast, limit: int | None = None, shard: EvalShard = WHOLE) -> dict[str, Any] | None:
        return None

    def scoring_loss(self, model: torch.nn.Module) -> LossFn:
        return loss_sum


def make_objective(spec, model: torch.nn.Module, is_peft: bool, base_model: torch.nn.Module | None = None,
                   context=None) -> Objective:
    """The job's objective, built by its registry entry; a DPO or GRPO reference is fixed here, before any
    training step (or, after training, from `base_model`: the starting weights of a full / freeze
    fine-tune). GRPO samples and scores with `context` (a grpo.sampling.PolicyContext)."""
    return implementation(OBJECTIVES[spec.method.objective].build)(spec, model, is_peft, base_model, context)
