"""What a batch is and what its loss is: next-token SFT, DPO on preference pairs, or a reward model.

The loop asks an objective to collate items into a batch, to count the batch's units (target
tokens for SFT, pairs for DPO and reward models: the loss is normalised by the step's total across
workers) and for the batch's summed loss. Objectives with an `evaluate` method score their own
held-out data.

DPO (Rafailov et al., 2023) compares the policy's log-probabilities of the chosen and rejected
replies with a frozen reference's: loss = -log sigmoid(beta * ((pc - rc) - (pr - rr))), with
conservative label smoothing eps mixing in the flipped term. For adapter methods the reference is
the same model with its adapters off, so no second copy of the weights is held.

A reward model (Ouyang et al., 2022) is a classification head with one output read at the last
token; on each pair, loss = -log sigmoid(r(chosen) - r(rejected) - margin) (Bradley-Terry).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ftcluster.data.batches import collate, count_targets, model_inputs
from ftcluster.data.render import Encoded
from ftcluster.evaluation.metrics import eval_batches, loss_sum
from ftcluster.evaluation.shard import WHOLE, EvalShard
from ftcluster.evaluation.shared_prompt import completion_token_logps
from ftcluster.models.chunked_loss import chunked_loss_sum, output_head
from ftcluster.objectives.grpo.objective import GRPOObjective, PolicyContext
from ftcluster.objectives.grpo.rewards import RewardScorer
from ftcluster.objectives.logprobs import (
    ReferenceFn,
    adapters_off_reference,
    frozen_copy_reference,
    sequence_logps,
)


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
               reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per pair DPO loss (sigmoid form, with conservative label smoothing)."""
    logits = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def collate_pairs(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen replies in the first half of the batch, their rejected partners in the second."""
    rejected = [item.rejected for item in items if item.rejected is not None]
    assert len(rejected) == len(items), "this objective's batches hold preference pairs only"
    return collate(items + rejected, pad_id)


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0] // 2


class FixedDataObjective:
    """An objective that trains on the data as it is: each step reads its own examples, collated."""

    def collate(self, items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def data_step(self, step: int) -> int:
        return step

    def step_batches(self, items: list[list[Encoded]], indices: list[list[int]], step: int,
                     pad_id: int) -> list[dict[str, torch.Tensor]]:
        return [self.collate(group, pad_id) for group in items]


class SFTObjective(FixedDataObjective):
    """Next-token loss; with `head`, computed chunk by chunk (see chunked_loss)."""

    name = "sft"

    def __init__(self, head: torch.nn.Linear | None = None, chunk_tokens: int = 2048):
        self.head = head
        self.chunk_tokens = chunk_tokens

    def collate(self, items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(items, pad_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return count_targets(batch)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.head is not None and model.training and batch["labels"].dim() == 2:
            return chunked_loss_sum(model, batch, self.head, self.chunk_tokens)
        return loss_sum(model, batch)


class DPOObjective(FixedDataObjective):
    name = "dpo"

    def __init__(self, beta: float, label_smoothing: float, reference: ReferenceFn):
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.reference = reference

    collate = staticmethod(collate_pairs)
    count = staticmethod(count_pairs)

    def terms(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        reference = self.reference(batch)
        policy = sequence_logps(model, batch)
        half = policy.shape[0] // 2
        chosen, rejected = policy[:half], policy[half:]
        reference_chosen, reference_rejected = reference[:half], reference[half:]
        return {
            "losses": dpo_losses(chosen, rejected, reference_chosen, reference_rejected, self.beta, self.label_smoothing),
            "chosen": chosen,
            "rejected": rejected,
            "chosen_reward": self.beta * (chosen - reference_chosen),
            "rejected_reward": self.beta * (rejected - reference_rejected),
        }

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.terms(model, batch)["losses"].sum()

    @torch.no_grad()
    def evaluate(self, model, items: list[Encoded], batch_size: int, pad_id: int, device, autocast,
                 limit: int | None = None, shard: EvalShard = WHOLE) -> dict[str, float]:
        """On held-out pairs: DPO loss, how often the model itself prefers the chosen reply
        (pref_accuracy: log p(chosen) > log p(rejected)), reward accuracy and margin."""

        def sums(terms: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            margin = terms["chosen_reward"] - terms["rejected_reward"]
            return [terms["losses"].sum(), (terms["chosen"] > terms["rejected"]).sum(), (margin > 0).sum(),
                    margin.sum(), terms["chosen"].sum(), terms["rejected"].sum()]

        names = ("val_loss", "pref_accuracy", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp")
        return held_out_pair_means(self, model, items, batch_size, pad_id, device, autocast, limit, shard,
                                   names, sums)


def held_out_pair_means(objective: DPOObjective | RewardObjective, model, items: list[Encoded], batch_size: int,
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


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per pair: -log P(chosen beats rejected) under the Bradley-Terry model, with a margin to clear."""
    return -F.logsigmoid(chosen - rejected - margin)


def sequence_rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row: the reward head's score (its one output, read by the model at the last real token)."""
    return model(**model_inputs(batch)).logits.squeeze(-1).float()


class RewardObjective(FixedDataObjective):
    """Train a scalar reward head to score each pair's chosen reply above its rejected one."""

    name = "reward"
    collate = staticmethod(collate_pairs)
    count = staticmethod(count_pairs)

    def __init__(self, margin: float):
        self.margin = margin

    def terms(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rewards = sequence_rewards(model, batch)
        half = rewards.shape[0] // 2
        chosen, rejected = rewards[:half], rewards[half:]
        return {"losses": bradley_terry_losses(chosen, rejected, self.margin), "chosen": chosen, "rejected": rejected}

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.terms(model, batch)["losses"].sum()

    @torch.no_grad()
    def evaluate(self, model, items: list[Encoded], batch_size: int, pad_id: int, device, autocast,
                 limit: int | None = None, shard: EvalShard = WHOLE) -> dict[str, float]:
        """On held-out pairs: the loss, how often the chosen reply scores higher (pair_accuracy), the
        mean margin r(chosen) - r(rejected), and the mean rewards (a base model's head is untrained)."""

        def sums(terms: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            margin = terms["chosen"] - terms["rejected"]
            return [terms["losses"].sum(), (margin > 0).sum(), margin.sum(), terms["chosen"].sum(),
                    terms["rejected"].sum()]

        names = ("val_loss", "pair_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
        return held_out_pair_means(self, model, items, batch_size, pad_id, device, autocast, limit, shard,
                                   names, sums)


def use_chunked_loss(spec) -> bool:
    """auto: chunked wherever it can run. With gradients taken in the forward pass it is no slower
    than the standard loss on CPU either (bench/RESULTS.md), and never builds the full logits."""
    training = spec.training
    if spec.model.task != "causal_lm" or spec.method.name == "prefix" or training.compile:
        return False  # prefix tuning prepends positions; compiled graphs must not see the head swapped
    if spec.distributed.backend == "deepspeed" and spec.distributed.zero_stage == 3:
        return False  # the head's weight exists only inside ZeRO-3's forward
    return training.loss_impl in ("chunked", "auto")


def make_objective(spec, model: torch.nn.Module, is_peft: bool, base_model: torch.nn.Module | None = None,
                   context: PolicyContext | None = None):
    """The job's objective; a DPO or GRPO reference is fixed here, before any training step (or, after
    training, from `base_model`: the starting weights of a full / freeze fine-tune). GRPO samples and
    scores with `context`."""
    objective = spec.method.objective
    if objective == "sft":
        head = output_head(model) if use_chunked_loss(spec) else None
        return SFTObjective(head, spec.training.loss_chunk_tokens)
    if objective == "reward":
        return RewardObjective(spec.method.reward.margin)
    scores = completion_token_logps if objective == "grpo" else sequence_logps
    reference = adapters_off_reference(model, scores) if is_peft else frozen_copy_reference(base_model or model, scores)
    if objective == "dpo":
        return DPOObjective(spec.method.dpo.beta, spec.method.dpo.label_smoothing, reference)
    assert context is not None, "grpo samples completions: it needs the run's PolicyContext"
    settings = spec.method.grpo
    scorer = RewardScorer(settings, context.device, context.autocast)
    return GRPOObjective(settings, model, context, scorer, reference if settings.beta > 0 else None)
