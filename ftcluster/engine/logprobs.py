"""Log-probabilities of a batch's trained tokens under a model, and the reference models that
preference tuning and online RL measure the policy against."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ftcluster.data.batches import IGNORE, model_inputs
from ftcluster.engine.chunked_loss import hidden_states_as_logits, output_head
from ftcluster.evaluate import base_model_view, eval_mode

Scores = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
ReferenceFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
# Batch keys that are not model inputs: targets, and what online RL carries along with each rollout.
NOT_INPUTS = ("advantages", "old_logps", "ref_logps")


def token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, positions): at position t, the log-probability of the trained token t + 1; 0 elsewhere."""
    inputs = model_inputs({k: v for k, v in batch.items() if k not in NOT_INPUTS})
    labels = batch["labels"]
    logits = model(**inputs).logits[:, -labels.shape[1]:]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                            reduction="none").view(targets.shape)


def completion_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`token_logps`, with the output head applied at the trained positions only: online RL's prompts
    are most of each row, and the full (rows, positions, vocabulary) logits would cost their memory
    and time for nothing. Falls back to the full logits for a model without a plain head."""
    head = output_head(model)
    if head is None:
        return token_logps(model, batch)
    inputs = model_inputs({k: v for k, v in batch.items() if k not in NOT_INPUTS})
    labels = batch["labels"]
    with hidden_states_as_logits(head):
        hidden = model(**inputs).logits[:, -labels.shape[1]:]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    trained = targets != IGNORE
    logits = F.linear(hidden[trained], head.weight, head.bias).float()
    picked = logits.log_softmax(-1).gather(1, targets[trained].unsqueeze(1)).squeeze(1)
    return torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).masked_scatter(trained, picked)


def trained_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, positions) booleans: where `token_logps` holds a trained token's log-probability."""
    return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE) != IGNORE


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
