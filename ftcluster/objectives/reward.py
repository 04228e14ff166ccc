"""A reward model (Ouyang et al., 2022): a classification head with one output read at the last token;
on each pair, loss = -log sigmoid(r(chosen) - r(rejected) - margin) (Bradley-Terry)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftcluster.data.batches import model_inputs
from ftcluster.data.render import Encoded
from ftcluster.evaluation.shard import WHOLE, EvalShard
from ftcluster.objectives.base import FixedDataObjective
from ftcluster.objectives.pairs import collate_pairs, count_pairs, held_out_pair_means


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


def build(spec, model: torch.nn.Module, is_peft: bool, base_model=None, context=None) -> RewardObjective:
    return RewardObjective(spec.method.reward.margin)
