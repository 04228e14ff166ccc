"""Online RL with GRPO (Shao et al., 2024): the policy answers each prompt several times, the answers
are scored, and those that beat their group's mean are made more likely.

Per prompt, `group_size` completions are sampled; each gets a reward (the weighted sum of the job's
reward functions and reward model) and the advantage A = (r - mean(group)) / (std(group) + eps).
Every completion token t then costs

    -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A) + beta * KL_t,

where ratio_t = p(t) / p_sampling(t) and KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (the
unbiased k3 estimator) against the starting model. The loss is summed over completion tokens and
normalised by their total across the step's workers, as the SFT loss is.

A prompt's group is sampled from a generator seeded by (training seed, rollout, prompt index), so
the same prompt gets the same completions whichever worker samples it: two workers train exactly
as one worker with twice the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ftcluster.data.render import Encoded
from ftcluster.evaluation.metrics import eval_mode, generate_texts, loss_sum
from ftcluster.evaluation.shard import WHOLE, EvalShard
from ftcluster.evaluation.shared_prompt import completion_token_logps, completion_tokens, rollout_batch
from ftcluster.objectives.base import LossFn
from ftcluster.objectives.grpo.rewards import RewardScorer
from ftcluster.objectives.grpo.sampling import GroupSampler, LocalSampler, PolicyContext, Sampled, Sampler, prompt_seed
from ftcluster.objectives.logprobs import ReferenceFn, starting_model_reference

ADVANTAGE_EPS = 1e-4  # keeps a group whose rewards barely differ from blowing its advantages up


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(prompts, group) rewards -> advantages relative to each group (all 0 where a group agrees)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + ADVANTAGE_EPS)


def grpo_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
                      ref_logps: torch.Tensor | None = None, beta: float = 0.0) -> dict[str, torch.Tensor]:
    """Per token (rows, positions): the clipped policy-gradient loss plus beta * KL; `advantages` per row.
    Also the KL term and where the clip took the gradient away (for logging)."""
    ratio = torch.exp(logps - old_logps)
    advantage = advantages.unsqueeze(1)
    unclipped, clipped = ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage
    losses = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        losses = losses + beta * kl
    return {"losses": losses, "kl": kl, "clipped": (clipped < unclipped).float()}


class RolloutStats:
    """Sums over a logging window (completions, tokens, rewards per source, KL, clipping, sampling time),
    added up across workers when the window closes."""

    def __init__(self, sources: list[str]):
        self.sources = sources
        self.keys = ["completions", "groups", "group_std", "reward", "reward_sq", "length", "cut_short", "tokens",
                     "kl", "clipped", "sampling_seconds", *(f"reward/{name}" for name in sources)]
        self.sums = dict.fromkeys(self.keys, 0.0)

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.sums[key] += value

    def close(self, world_size: int, all_reduce: Callable[[torch.Tensor], None]) -> dict[str, float]:
        """The window's means (over every worker), and a fresh window."""
        totals = torch.tensor([self.sums[key] for key in self.keys], dtype=torch.float64)
        if world_size > 1:
            all_reduce(totals)
        sums = dict(zip(self.keys, totals.tolist()))
        self.sums = dict.fromkeys(self.keys, 0.0)
        completions, tokens = max(sums["completions"], 1.0), max(sums["tokens"], 1.0)
        mean = sums["reward"] / completions
        record = {"reward": mean, "reward_std": sums["group_std"] / max(sums["groups"], 1.0),
                  "reward_spread": max(sums["reward_sq"] / completions - mean**2, 0.0) ** 0.5,
                  "completion_length": sums["length"] / completions, "cut_short": sums["cut_short"] / completions,
                  "kl": sums["kl"] / tokens, "clip_fraction": sums["clipped"] / tokens,
                  "sampling_seconds": sums["sampling_seconds"] / world_size}
        record |= {f"reward/{name}": sums[f"reward/{name}"] / completions for name in self.sources}
        return record


class GRPOObjective:
    """The loop's objective for online RL: a step's prompts become rollouts (sampled, scored, with their
    advantages and reference log-probabilities), trained on for `steps_per_rollout` optimizer steps."""

    name = "grpo"
    scores_answer_choices = False
    chance_loss = None  # a policy-gradient loss: no uniform-guess level

    def __init__(self, settings, model: torch.nn.Module, context: PolicyContext, scorer: RewardScorer,
                 reference: ReferenceFn | None):
        self.settings, self.model, self.context, self.scorer = settings, model, context, scorer
        self.reference = reference if settings.beta > 0 else None
        self.group_sampler = GroupSampler(context.tokenizer, settings, context.device)
        self.sampler: Sampler = context.sampler or LocalSampler(self.group_sampler)
        self.stats = RolloutStats(scorer.names)
        self._rollouts: tuple[int, list[dict[str, torch.Tensor]]] | None = None

    def data_step(self, step: int) -> int:
        """Which step's prompts an optimizer step trains on: one rollout serves `steps_per_rollout` steps."""
        return step // self.settings.steps_per_rollout

    def step_batches(self, items: list[list[Encoded]], indices: list[list[int]], step: int,
                     pad_id: int) -> list[dict[str, torch.Tensor]]:
        """The micro batches of an optimizer step: new rollouts at the first step of each rollout."""
        rollout = self.data_step(step)
        if self._rollouts is None or self._rollouts[0] != rollout:
            self._rollouts = (rollout, self._rollout(items, indices, rollout, pad_id))
        return self._rollouts[1]

    def _rollout(self, items: list[list[Encoded]], indices: list[list[int]], rollout: int,
                 pad_id: int) -> list[dict[str, torch.Tensor]]:
        """Sample every micro batch's groups (rows: prompt x group), then score and prepare each."""
        started = time.perf_counter()
        requests = [([prompt.input_ids for prompt in prompts], [prompt_seed(self.context.seed, rollout, index)
                                                                 for index in ids]) for prompts, ids in zip(items, indices)]
        sampled = self.sampler(self.model, requests, rollout)
        self.stats.add(sampling_seconds=time.perf_counter() - started)
        return [self._prepared(prompts, ids, result, pad_id) for (prompts, _), ids, result in zip(requests, indices, sampled)]

    def _prepared(self, prompts: list[list[int]], indices: list[int], sampled: Sampled,
                  pad_id: int) -> dict[str, torch.Tensor]:
        """One micro batch's rollout (prompts and completions) with the completions' advantages, reference
        and sampling log-probabilities."""
        groups = sampled.groups
        rewards = self._score(groups, indices)
        advantages = group_advantages(self.scorer.total(rewards).view(len(groups), -1))
        batch = rollout_batch(prompts, groups, pad_id)
        batch["advantages"] = advantages.flatten()
        with torch.no_grad():
            on_device = {k: v.to(self.context.device) for k, v in batch.items()}
            if self.reference is not None:
                batch["ref_logps"] = self.reference(on_device).cpu()
            if sampled.behaviour_logps is not None:  # sampled by a policy older than this model
                batch["old_logps"] = sampled.behaviour_logps
            elif self.settings.steps_per_rollout > 1:  # the sampling policy's, before this rollout's updates
                batch["old_logps"] = completion_token_logps(self.model, on_device).cpu()
        self._record(rewards, advantages.shape, groups)
        return batch

    def _score(self, groups: list[list[list[int]]], indices: list[int]) -> torch.Tensor:
        """(completions, sources) raw rewards of every completion, in prompt then group order."""
        decode = self.context.tokenizer.decode
        examples = [self.context.examples(index) for index in indices]
        per_completion = [(example, index, decode(completion, skip_special_tokens=True))
                          for example, index, group in zip(examples, indices, groups) for completion in group]
        return self.scorer.score([e.prompt for e, _, _ in per_completion], [text for _, _, text in per_completion],
                                 [e.reference for e, _, _ in per_completion], [i for _, i, _ in per_completion])

    def _record(self, rewards: torch.Tensor, shape: torch.Size, groups: list[list[list[int]]]) -> None:
        total = self.scorer.total(rewards)
        lengths = [len(completion) for group in groups for completion in group]
        eos = self.group_sampler.eos
        self.stats.add(completions=len(lengths), groups=shape[0], group_std=float(total.view(shape).std(dim=1, unbiased=False).sum()),
                       reward=float(total.sum()), reward_sq=float((total**2).sum()), length=sum(lengths),
                       cut_short=sum(1 for group in groups for c in group if not c or c[-1] != eos),
                       **{f"reward/{name}": float(rewards[:, k].sum()) for k, name in enumerate(self.scorer.names)})

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Completion tokens: the loss is a mean over every completion token of the step."""
        return int(completion_tokens(batch).sum())

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logps = completion_token_logps(model, batch)
        mask = completion_tokens(batch).float()
        old = batch.get("old_logps", logps.detach())  # one step per rollout: the sampling policy is this one
        terms = grpo_token_losses(logps, old, batch["advantages"], self.settings.clip_eps, batch.get("ref_logps"),
                                  self.settings.beta)
        self.stats.add(tokens=float(mask.sum()), kl=float((terms["kl"].detach() * mask).sum()),
                       clipped=float((terms["clipped"] * mask).sum()))
        return (terms["losses"] * mask).sum()

    def window_stats(self, world_size: int, all_reduce: Callable[[torch.Tensor], None]) -> dict[str, float]:
        return self.stats.close(world_size, all_reduce)

    def scoring_loss(self, model: torch.nn.Module) -> LossFn:
        return loss_sum

    @torch.no_grad()
    def evaluate(self, model, items: list[Encoded], batch_size: int, pad_id: int, device, autocast,
                 limit: int | None = None, shard: EvalShard = WHOLE) -> dict[str, Any]:
        """The held-out prompts answered greedily and scored: val_reward (the mean total reward), each
        source's mean, the answers' length in characters, and the answers themselves as samples."""
        count = min(self.settings.eval_prompts, len(items), len(self.context.val_examples))
        if count == 0:
            return {}
        examples = [self.context.val_examples[index] for index in range(count)]
        with eval_mode(model), autocast():
            answers = generate_texts(model, self.context.tokenizer, [item.input_ids for item in items[:count]],
                                     self.settings.max_new_tokens, device, batch_size, shard)
        scores = self.scorer.score([e.prompt for e in examples], answers, [e.reference for e in examples],
                                   list(range(count)))
        total = self.scorer.total(scores)
        metrics: dict[str, Any] = {"val_reward": float(total.mean())}
        metrics |= {f"val_reward/{name}": float(scores[:, k].mean()) for k, name in enumerate(self.scorer.names)}
        metrics["val_completion_chars"] = sum(len(answer) for answer in answers) / count
        metrics["samples"] = [{"prompt": e.prompt, "reference": e.reference or "", "output": answer,
                               "reward": float(reward)} for e, answer, reward in zip(examples, answers, total)]
        return metrics


def build(spec, model: torch.nn.Module, is_peft: bool, base_model: torch.nn.Module | None = None,
          context: PolicyContext | None = None) -> GRPOObjective:
    """GRPO samples and scores with `context`; its KL reference (beta > 0) is the starting model."""
    assert context is not None, "grpo samples completions: it needs the run's PolicyContext"
    settings = spec.method.grpo
    scorer = RewardScorer(settings, context.device, context.autocast)
    reference = starting_model_reference(model, is_peft, base_model, completion_token_logps) if settings.beta > 0 else None
    return GRPOObjective(settings, model, context, scorer, reference)
