"""Supervised fine-tuning: the next-token loss on the trained tokens (replies, or whole texts)."""

from __future__ import annotations

import math

import torch

from ftcluster.config.registry import METHODS
from ftcluster.data.batches import collate, count_targets
from ftcluster.data.render import Encoded
from ftcluster.evaluation.metrics import loss_sum
from ftcluster.models.chunked_loss import chunked_loss_sum, output_head
from ftcluster.objectives.base import Batch, FixedDataObjective, LossFn


class SFTObjective(FixedDataObjective):
    """Next-token loss; with `head`, computed chunk by chunk (see chunked_loss)."""

    name = "sft"
    scores_answer_choices = True

    def __init__(self, head: torch.nn.Linear | None = None, chunk_tokens: int = 2048, classes: int | None = None):
        self.head = head
        self.chunk_tokens = chunk_tokens
        self.chance_loss = math.log(classes) if classes and classes > 1 else None

    def collate(self, items: list[Encoded], pad_id: int) -> Batch:
        return collate(items, pad_id)

    def count(self, batch: Batch) -> int:
        return count_targets(batch)

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        if self.head is not None and model.training and batch["labels"].dim() == 2:
            return chunked_loss_sum(model, batch, self.head, self.chunk_tokens)
        return loss_sum(model, batch)

    def scoring_loss(self, model: torch.nn.Module) -> LossFn:
        """Chunked where training is (the output head only at the scored positions), on `model`'s own head."""
        head = output_head(model) if self.head is not None else None
        if head is None:
            return loss_sum
        return lambda model, batch: chunked_loss_sum(model, batch, head, self.chunk_tokens)


def use_chunked_loss(spec) -> bool:
    """auto: chunked wherever it can run. With gradients taken in the forward pass it is no slower
    than the standard loss on CPU either (bench/RESULTS.md), and never builds the full logits."""
    training = spec.training
    if spec.model.task != "causal_lm" or METHODS[spec.method.name].virtual_tokens or training.compile:
        return False  # prefix tuning prepends positions; compiled graphs must not see the head swapped
    if spec.distributed.backend == "deepspeed" and spec.distributed.zero_stage == 3:
        return False  # the head's weight exists only inside ZeRO-3's forward
    return training.loss_impl in ("chunked", "auto")


def build(spec, model: torch.nn.Module, is_peft: bool, base_model=None, context=None) -> SFTObjective:
    head = output_head(model) if use_chunked_loss(spec) else None
    return SFTObjective(head, spec.training.loss_chunk_tokens, output_classes(model, spec.model.task))


def output_classes(model: torch.nn.Module, task: str) -> int | None:
    """How many classes the loss picks among: the vocabulary (next token) or the labels (classification)."""
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size" if task == "causal_lm" else "num_labels", None)
