"""DPO (Rafailov et al., 2023): the policy's log-probabilities of the chosen and rejected replies are
compared with a frozen reference's: loss = -log sigmoid(beta * ((pc - rc) - (pr - rr))), with
conservative label smoothing eps mixing in the flipped term. For adapter methods the reference is the
same model with its adapters off, so no second copy of the weights is held."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftcluster.data.render import Encoded
from ftcluster.evaluation.shard import WHOLE, EvalShard
from ftcluster.objectives.base import FixedDataObjective
from ftcluster.objectives.logprobs import ReferenceFn, sequence_logps, starting_model_reference
from ftcluster.objectives.pairs import collate_pairs, count_pairs, held_out_pair_means


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
               reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per pair DPO loss (sigmoid form, with conservative label smoothing)."""
    logits = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


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


def build(spec, model: torch.nn.Module, is_peft: bool, base_model=None, context=None) -> DPOObjective:
    reference = starting_model_reference(model, is_peft, base_model, sequence_logps)
    return DPOObjective(spec.method.dpo.beta, spec.method.dpo.label_smoothing, reference)
