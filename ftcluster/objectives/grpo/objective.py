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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ftcluster.data.formats import Example
from ftcluster.data.render import Encoded
from ftcluster.evaluation.generation import cache_holds_adapters, cache_of
from ftcluster.evaluation.metrics import eval_mode, generate_texts
from ftcluster.evaluation.shard import WHOLE, EvalShard
from ftcluster.evaluation.shared_prompt import completion_token_logps, completion_tokens, rollout_batch
from ftcluster.objectives.grpo.rewards import RewardScorer
from ftcluster.objectives.logprobs import ReferenceFn

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


def prompt_seed(seed: int, rollout: int, prompt_index: int) -> int:
    """The seed of one prompt's group in one rollout: independent of which worker samples it."""
    return ((seed * 1_000_003 + rollout) * 10_000_019 + prompt_index) % 2**62


PromptBatch = tuple[list[list[int]], list[int]]  # a micro batch's prompts (token ids) and their groups' seeds


@dataclass
class Sampled:
    """One micro batch's groups (per prompt, `group_size` completions as token ids) and, when the
    sampling policy is not the learner's model as it is now (rollout actors with older weights), that
    policy's log-probabilities of the completions (as `completion_token_logps` lays them out)."""

    groups: list[list[list[int]]]
    behaviour_logps: torch.Tensor | None = None


class Sampler(Protocol):
    """Samples every micro batch of a rollout: in this worker (`LocalSampler`) or in Ray rollout actors."""

    def __call__(self, model: torch.nn.Module, batches: list[PromptBatch], rollout: int) -> list[Sampled]: ...


@dataclass
class PolicyContext:
    """What sampling and scoring need besides the model: the training run's tokenizer, data and device."""

    tokenizer: Any
    examples: Callable[[int], Example]  # a training prompt's example (its text and reference), by index
    val_examples: Sequence[Example]  # the held-out prompts' examples, in the order of the evaluated items
    device: torch.device
    autocast: Callable[[], Any]
    seed: int
    sampler: Sampler | None = None  # where groups are sampled (rollout actors); None: this worker, with its model


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Each row's smallest set of tokens holding `top_p` of the mass, renormalised (the rest 0)."""
    ordered, order = probs.sort(dim=-1, descending=True)
    outside = ordered.cumsum(dim=-1) - ordered >= top_p  # the mass before a token already reaches top_p
    kept = ordered.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, kept / kept.sum(dim=-1, keepdim=True))


class SeededSampling:
    """A transformers logits processor that samples each row's next token with that row's own generator
    (temperature, then nucleus) and leaves all the mass on it, so greedy decoding takes it: a row's
    completion depends on its seed alone, not on the rows batched with it or the global RNG."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = (scores.float() / self.temperature).softmax(dim=-1)
        if self.top_p < 1.0:
            probs = nucleus(probs, self.top_p)
        rows = probs.cpu()
        chosen = torch.cat([torch.multinomial(row, 1, generator=gen) for row, gen in zip(rows, self.generators)])
        picked = torch.full_like(scores, float("-inf"))
        picked[torch.arange(len(chosen)), chosen.to(scores.device)] = 0.0
        return picked


class GroupSampler:
    """Samples a group of completions for each prompt of a micro batch, in one batched generate call
    (token ids, each ending at EOS or cut at the limit); member m of a prompt's group draws from a
    generator seeded by the prompt's seed and m.

    A group's members share their prompt: it is run once per prompt (all but its last token) and that
    attention cache repeated to the group, so the prompt costs 1/group_size of running every row
    (prefix tuning, whose adapters live in the cache, runs every row whole)."""

    def __init__(self, tokenizer, settings, device):
        self.tokenizer, self.settings, self.device = tokenizer, settings, device
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    @torch.no_grad()
    def __call__(self, model, prompts: list[list[int]], seeds: list[int]) -> list[list[list[int]]]:
        settings, group = self.settings, self.settings.group_size
        width = max(len(prompt) for prompt in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        generators = [torch.Generator().manual_seed((seed * group + member) % 2**63) for seed in seeds
                      for member in range(group)]
        sampling = SeededSampling(generators, settings.temperature, settings.top_p)
        with eval_mode(model):
            cache = self._prompt_cache(model, ids, mask)
            out = model.generate(input_ids=ids.repeat_interleave(group, 0), attention_mask=mask.repeat_interleave(group, 0),
                                 do_sample=False, temperature=None, top_p=None, top_k=None, logits_processor=[sampling],
                                 max_new_tokens=settings.max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad,
                                 **cache)
        completions = [self._until_eos(row) for row in out[:, width:].tolist()]
        return [completions[start:start + group] for start in range(0, len(completions), group)]

    def _prompt_cache(self, model, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        """The attention cache of each (left-padded) prompt but its last token, repeated for every member of
        its group, as generate's keyword; generate then runs only the last prompt token of each row."""
        if ids.shape[1] < 2 or cache_holds_adapters(model):
            return {}
        head = mask[:, :-1]
        positions = (head.cumsum(-1) - 1).masked_fill(head == 0, 1)  # as generate numbers left-padded rows
        keyword, cache = cache_of(model(input_ids=ids[:, :-1], attention_mask=head, position_ids=positions,
                                        use_cache=True))
        cache.batch_repeat_interleave(self.settings.group_size)
        return {keyword: cache}

    def _until_eos(self, tokens: list[int]) -> list[int]:
        return tokens[: tokens.index(self.eos) + 1] if self.eos in tokens else tokens


class LocalSampler:
    """Sampling in the training worker, with the model being trained (it is the sampling policy)."""

    def __init__(self, sample_groups: GroupSampler):
        self.sample_groups = sample_groups

    def __call__(self, model: torch.nn.Module, batches: list[PromptBatch], rollout: int) -> list[Sampled]:
        return [Sampled(self.sample_groups(model, prompts, seeds)) for prompts, seeds in batches]


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
