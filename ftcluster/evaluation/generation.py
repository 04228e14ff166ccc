"""Greedy generation for evaluation, and the attention caches that let prompts run once.

Held-out prompts often begin alike (system prompt, instruction, few-shot examples): `PrefixCache`
runs that common beginning once and copies its cache into every batch. `Generator` answers batches
of prompts; `Generator.answer_and_score` also scores each prompt's reference reply (the validation
loss) on a copy of the same prompt cache, so an evaluation that wants both runs its prompts once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ftcluster.data.batches import IGNORE, collate, count_targets
from ftcluster.data.render import Encoded
from ftcluster.evaluation.shard import EvalShard

MIN_SHARED_PREFIX = 16  # tokens; a shorter common beginning is not worth a cache copy per batch


def cache_of(output) -> tuple[str, Any]:
    """A forward pass's attention cache, and the keyword that hands it back to the model: `cache` since
    transformers renamed `past_key_values` (the old name still works there, with a warning)."""
    keyword = "cache" if "cache" in output else "past_key_values"
    return keyword, output[keyword]


def cache_holds_adapters(model) -> bool:
    """Prefix tuning keeps its virtual tokens in the attention cache: a copied prompt cache would lose them."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def can_share_prompt_pass(model, shard: EvalShard) -> bool:
    """Whether `Generator.answer_and_score` may serve loss and answers from one prompt pass: not in
    lockstep (ZeRO-3 workers must run the forward passes generate runs, no others), not for prefix
    tuning (its virtual tokens live in the cache)."""
    return not shard.in_lockstep and not cache_holds_adapters(model)


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded batch from its attention mask (as transformers' generate computes them):
    each row counts its own tokens; padding gets a harmless 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


class PrefixCache:
    """The attention cache of a token prefix, computed once and copied into every batch that continues it.

    The results are the same as running every sequence whole; the few-shot baseline's prompts cost a third.
    """

    def __init__(self, model, tokens: list[int], device):
        self.tokens = tokens
        out = model(input_ids=torch.tensor([tokens], device=device), use_cache=True)
        self.keyword, self._cache = cache_of(out)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def copies(self, rows: int) -> dict[str, Any]:
        """The cache repeated for a batch of `rows` (a copy: a forward pass appends to it), as a keyword."""
        cache = copy.deepcopy(self._cache)
        cache.batch_repeat_interleave(rows)
        return {self.keyword: cache}

    def continued(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A right-padded batch of continuations, as forward() inputs after the prefix."""
        rows, width = batch["input_ids"].shape
        device = batch["input_ids"].device
        ones = torch.ones(rows, self.length, dtype=batch["attention_mask"].dtype, device=device)
        return {**batch, "attention_mask": torch.cat([ones, batch["attention_mask"]], dim=1),
                "position_ids": (self.length + torch.arange(width, device=device)).expand(rows, -1),
                **self.copies(rows)}


def shared_prefix(model, sequences: list[list[int]], limit: int, device, lockstep: bool) -> PrefixCache | None:
    """The cache of the first tokens (at most `limit`) every sequence shares, if they are worth it. Not in
    lockstep (ZeRO-3 workers must run equal forward passes) nor for prefix tuning (its virtual tokens
    live in the cache)."""
    if lockstep or cache_holds_adapters(model) or not sequences:
        return None
    length, first = 0, sequences[0]
    while length < limit and all(sequence[length] == first[length] for sequence in sequences):
        length += 1
    return PrefixCache(model, first[:length], device) if length >= MIN_SHARED_PREFIX else None


class Generator:
    """Greedy continuations of batches of prompts (token ids), left-padded; with `share_prefix`, the
    prompts' common beginning is run once and each batch padded between it and its own tokens."""

    def __init__(self, model, tokenizer, max_new_tokens: int, device, synced: bool = False):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_new_tokens, self.synced = max_new_tokens, synced
        self.prefix: PrefixCache | None = None

    @torch.no_grad()
    def share_prefix(self, prompts: list[list[int]]) -> None:
        """Cache what every prompt begins with, leaving each at least one token of its own."""
        limit = min((len(ids) for ids in prompts), default=1) - 1
        self.prefix = shared_prefix(self.model, prompts, limit, self.device, self.synced)

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]]) -> list[str]:
        ids, mask = self._left_padded(prompts)
        return self._generate(ids, mask, self.prefix.copies(len(prompts)) if self.prefix is not None else {})

    @torch.no_grad()
    def answer_and_score(self, prompts: list[list[int]], replies: list[Encoded],
                         loss_fn: Callable) -> tuple[list[str], float, int]:
        """Greedy answers to `prompts`, and `loss_fn`'s sum over the trained tokens of each prompt's
        reference reply (with their count). The prompts run once: their cache, up to the last token, is
        copied to score the replies and then handed to generate (which runs that last token itself)."""
        ids, mask = self._left_padded(prompts)
        cache = self._prompt_cache(ids, mask)
        scored = self._reply_batch(ids, mask, replies, copy.deepcopy(cache))
        loss = float(loss_fn(self.model, scored))
        return self._generate(ids, mask, cache), loss, count_targets(scored)

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's token ids and attention mask: the shared prefix, padding, each prompt's own tokens."""
        pad_id = self.tokenizer.pad_token_id
        shared = self.prefix.tokens if self.prefix is not None else []
        tails = [ids[len(shared) :] for ids in prompts]
        width = max(len(tail) for tail in tails)
        ids = [shared + [pad_id] * (width - len(tail)) + tail for tail in tails]
        mask = [[1] * len(shared) + [0] * (width - len(tail)) + [1] * len(tail) for tail in tails]
        return torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device)

    def _prompt_cache(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        """The attention cache of every column but the last, as a keyword (empty when there is none)."""
        cache = self.prefix.copies(len(ids)) if self.prefix is not None else {}
        done, stop = (self.prefix.length if self.prefix is not None else 0), ids.shape[1] - 1
        if stop <= done:
            return cache
        out = self.model(input_ids=ids[:, done:stop], attention_mask=mask[:, :stop],
                         position_ids=positions_of(mask[:, :stop])[:, done:], use_cache=True, **cache)
        keyword, computed = cache_of(out)
        return {keyword: computed}

    def _reply_batch(self, ids: torch.Tensor, mask: torch.Tensor, replies: list[Encoded],
                     cache: dict[str, Any]) -> dict[str, Any]:
        """forward() inputs and labels after the prompt cache: each prompt's last token, then its reply."""
        after = collate(replies, self.tokenizer.pad_token_id)
        after = {key: value.to(self.device) for key, value in after.items()}
        rows = ids.shape[0]
        first = torch.full((rows, 1), IGNORE, dtype=after["labels"].dtype, device=self.device)
        attention = torch.cat([mask, after["attention_mask"].to(mask.dtype)], dim=1)
        width = 1 + after["input_ids"].shape[1]
        return {"input_ids": torch.cat([ids[:, -1:], after["input_ids"]], dim=1),
                "attention_mask": attention, "position_ids": positions_of(attention)[:, -width:],
                "labels": torch.cat([first, after["labels"]], dim=1), **cache}

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, cache: dict[str, Any]) -> list[str]:
        """generate()'s greedy answers, a round of ROUND_TOKENS at a time: rows that have ended leave the
        batch between rounds (with their part of the cache), so the longest answer no longer makes every
        row compute until it ends. One round in lockstep, where workers must run equal forward passes."""
        pad_id, stops = self.tokenizer.pad_token_id, stop_tokens(self.model)
        answers: list[list[int]] = [[] for _ in range(len(ids))]
        rows, budget = list(range(len(ids))), self.max_new_tokens
        while True:
            size = budget if self.synced or not stops else min(budget, ROUND_TOKENS)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=size, do_sample=False, pad_token_id=pad_id,
                synced_gpus=self.synced, return_dict_in_generate=True, **cache)
            new = out.sequences[:, ids.shape[1] :]
            for row, tokens in zip(rows, new.tolist()):
                answers[row] += tokens
            budget -= new.shape[1]
            going = [k for k, tokens in enumerate(new.tolist()) if not stops.intersection(tokens)]
            if budget <= 0 or not going or new.shape[1] < size:  # (fewer: generate's own criteria ended every row)
                break
            keyword, kept = cache_of(out)
            if len(going) < len(rows):  # the cache has every token but the last one generated
                kept.batch_select_indices(torch.tensor(going, device=ids.device))
            ids, mask = out.sequences[going], torch.cat([mask, torch.ones_like(new)], dim=1)[going]
            rows, cache = [rows[k] for k in going], {keyword: kept}
        return self.tokenizer.batch_decode(answers, skip_special_tokens=True)


ROUND_TOKENS = 3  # tokens generated between two checks for rows that have ended


def stop_tokens(model) -> set[int]:
    """The token ids that end an answer (generation_config.eos_token_id: one id, several, or none)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
