"""A GRPO micro batch, and its completions' log-probabilities with each prompt run once for its group.

A micro batch is P prompts with G sampled completions each. Laid out as P*G rows of prompt +
completion, most of every row is its prompt, recomputed for each member of the group. So the batch
keeps the prompts (P rows) and the completions (P*G rows) apart, both right-padded, and
`completion_token_logps` runs each prompt once, repeats its attention cache (gradients flow through
the copies back to the one prompt pass) to its group, and runs only the completions on top: for a
44-token prompt, 8-token completions and groups of 8, about a quarter of the tokens.

Where a shared cache cannot work, every row runs whole (prompt, then completion, then padding), with
the same log-probabilities: prefix tuning keeps its adapters in the cache, and gradient checkpointing
turns the cache off while training.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ftcluster.data.batches import right_padded
from ftcluster.evaluation.generation import cache_holds_adapters, cache_of
from ftcluster.models.chunked_loss import hidden_states_as_logits, output_head


def rollout_batch(prompts: list[list[int]], groups: list[list[list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts (P rows) and their groups' completions (P*G rows, prompt by prompt), apart."""
    prompt_ids, prompt_mask = right_padded(prompts, pad_id)
    completion_ids, completion_mask = right_padded([completion for group in groups for completion in group], pad_id)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask}


def completion_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, completion positions) booleans: the completions' real tokens, the ones GRPO trains."""
    return batch["completion_mask"].bool()


def can_share_prompts(model: torch.nn.Module) -> bool:
    """Whether a prompt's attention cache can stand in for running it in every row of its group."""
    inner = getattr(model, "module", model)  # DDP and DeepSpeed keep the real model as .module
    checkpointing = model.training and getattr(inner, "is_gradient_checkpointing", False)
    return not (checkpointing or cache_holds_adapters(inner))


def completion_token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                           share_prompts: bool | None = None) -> torch.Tensor:
    """(rows, completion positions): each completion token's log-probability given its prompt and the
    completion before it; 0 at padding. `share_prompts` None: whenever the model allows it. The output
    head is applied at the completions' tokens only (where the model has a plain one)."""
    if share_prompts is None:
        share_prompts = can_share_prompts(model)
    head = output_head(model)
    with hidden_states_as_logits(head) if head is not None else contextlib.nullcontext():
        predicting = _shared_prompt_outputs(model, batch) if share_prompts else _whole_row_outputs(model, batch)
    trained = completion_tokens(batch)
    picked = predicting[trained]
    logits = F.linear(picked, head.weight, head.bias) if head is not None else picked
    logps = logits.float().log_softmax(-1).gather(1, batch["completion_ids"][trained].unsqueeze(1)).squeeze(1)
    return torch.zeros(trained.shape, dtype=logps.dtype, device=logps.device).masked_scatter(trained, logps)


def _group_size(batch: dict[str, torch.Tensor]) -> int:
    return batch["completion_ids"].shape[0] // batch["prompt_ids"].shape[0]


def _shared_prompt_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, completion positions, features): the outputs that predict each completion token, from one
    pass over the prompts and one over the completions on their group's copy of the prompt cache."""
    prompt_mask, completion_ids = batch["prompt_mask"], batch["completion_ids"]
    group, lengths = _group_size(batch), prompt_mask.sum(dim=1)
    prompt_pass = model(input_ids=batch["prompt_ids"], attention_mask=prompt_mask, use_cache=True)
    keyword, cache = cache_of(prompt_pass)
    last = prompt_pass.logits[torch.arange(len(lengths), device=lengths.device), lengths - 1]  # predicts token 0
    cache.batch_repeat_interleave(group)
    # The prompt's padding stays in the cache, masked; positions continue from each prompt's real end.
    mask = torch.cat([prompt_mask.repeat_interleave(group, dim=0), batch["completion_mask"]], dim=1)
    positions = lengths.repeat_interleave(group).unsqueeze(1) + torch.arange(completion_ids.shape[1], device=lengths.device)
    rest = model(input_ids=completion_ids, attention_mask=mask, position_ids=positions, **{keyword: cache}).logits
    return torch.cat([last.repeat_interleave(group, dim=0).unsqueeze(1), rest[:, :-1]], dim=1)


def _whole_row_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """As `_shared_prompt_outputs`, running every row whole: its prompt, its completion, then padding."""
    group, width = _group_size(batch), batch["prompt_ids"].shape[1]
    lengths = batch["prompt_mask"].sum(dim=1).repeat_interleave(group).unsqueeze(1)
    ids = torch.cat([batch["prompt_ids"].repeat_interleave(group, dim=0), batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"].repeat_interleave(group, dim=0), batch["completion_mask"]], dim=1)
    slot = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    # Sort each row's slots: the prompt's tokens, the completion's slots, then the prompt's padding.
    key = torch.where(slot >= width, slot - width + lengths, torch.where(slot < lengths, slot, slot + ids.shape[1]))
    order = key.argsort(dim=1)
    outputs = model(input_ids=ids.gather(1, order), attention_mask=mask.gather(1, order), use_cache=False).logits
    outputs = outputs[:, -ids.shape[1]:]  # prompt tuning's virtual tokens come first
    predicting = lengths - 1 + torch.arange(batch["completion_ids"].shape[1], device=ids.device)
    return outputs.gather(1, predicting.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]))
