"""Sampling a GRPO rollout: each prompt's group of completions, drawn so that a completion depends on
its prompt's seed alone (the training seed, the rollout and the prompt's index), never on which worker
or actor samples it or which rows share its batch. Rollout actors (launch/rollout_actors.py) run the
same `GroupSampler` with older weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ftcluster.data.formats import Example
from ftcluster.evaluation.generation import cache_holds_adapters, cache_of
from ftcluster.evaluation.metrics import eval_mode


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
