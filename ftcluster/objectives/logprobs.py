"""Log-probabilities of a batch's trained tokens under a model, and the reference models that
preference tuning and online RL measure the policy against (online RL's own log-probabilities are
in evaluation/shared_prompt.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ftcluster.data.batches import IGNORE, model_inputs
from ftcluster.evaluation.metrics import base_model_view, eval_mode

Scores = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
ReferenceFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, positions): at position t, the log-probability of the trained token t + 1; 0 elsewhere."""
    labels = batch["labels"]
    logits = model(**model_inputs(batch)).logits[:, -labels.shape[1]:]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                            reduction="none").view(targets.shape)


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row: the summed log-probability of its trained (response) tokens."""
    return token_logps(model, batch).sum(dim=1)


def adapters_off_reference(model: torch.nn.Module, scores: Scores = sequence_logps) -> ReferenceFn:
    """The base model as reference: the same module with its adapters disabled (no extra memory)."""

    @torch.no_grad()
    def reference(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with eval_mode(model), base_model_view(model):
            return scores(model, batch)

    return reference


def frozen_copy_reference(model: torch.nn.Module, scores: Scores = sequence_logps) -> ReferenceFn:
    """For full / freeze fine-tunes: a frozen copy of the starting weights (twice the weight memory)."""
    frozen = copy.deepcopy(model).eval()
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)

    @torch.no_grad()
    def reference(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return scores(frozen, batch)

    return reference


def starting_model_reference(model: torch.nn.Module, is_peft: bool, base_model: torch.nn.Module | None,
                             scores: Scores) -> ReferenceFn:
    """The starting model as reference, fixed before any training step: the adapters off for adapter
    methods, else a frozen copy of `base_model` (after training: the starting weights) or of `model`."""
    return adapters_off_reference(model, scores) if is_peft else frozen_copy_reference(base_model or model, scores)
