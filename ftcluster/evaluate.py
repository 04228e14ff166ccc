"""Evaluation: validation loss/perplexity, classification metrics, generation exact match."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ftcluster.data.batches import IGNORE, collate, count_targets, model_inputs
from ftcluster.data.render import Encoded, Renderer
from ftcluster.eval_shard import WHOLE, EvalShard, longest_first


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of per-target cross-entropy terms (tokens for LM, examples for classification)."""
    inputs = model_inputs(batch)
    logits = model(**inputs).logits
    labels = batch["labels"]
    if labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    # Prefix tuning and similar methods may prepend virtual tokens; score only the real ones.
    logits = logits[:, -labels.shape[1] :]
    # Shift the labels, not the logits: slicing the logits would copy the whole (B, T, vocab) tensor.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def item_length(item: Encoded) -> int:
    """Tokens of an example (of its longer reply, for a preference pair): what sets a batch's padded width."""
    return max(len(item.input_ids), len(item.rejected.input_ids) if item.rejected is not None else 0)


def eval_batches(items: list[Encoded], batch_size: int, pad_id: int, device, limit: int | None = None,
                 collate_fn: Callable = collate, shard: EvalShard = WHOLE) -> Iterator[tuple[dict, bool]]:
    """(batch, real) over this worker's share of the first `limit` batches' worth of items, similar
    lengths batched together; real=False marks a batch run only to keep ZeRO-3 workers in lockstep."""
    if limit is not None:
        items = items[: limit * batch_size]
    batches = longest_first(shard.part(items), batch_size, item_length)
    for chunk, real in shard.batches(batches, spare=lambda: items[:1]):
        batch = collate_fn(chunk, pad_id)
        yield {k: v.to(device) for k, v in batch.items()}, real


@torch.no_grad()
def evaluate_loss(model, items: list[Encoded], batch_size: int, pad_id: int, device, autocast, limit=None,
                  shard: EvalShard = WHOLE, loss_fn: Callable = loss_sum) -> dict[str, float]:
    """Mean loss per target over `items` (every worker its share; the sums are added up). The tokens
    every item begins with, when none of them is scored (a system prompt, an instruction), run once."""
    if limit is not None:
        items = items[: limit * batch_size]
    prefix = _unscored_prefix(model, items, device, shard)
    if prefix is not None:
        items = [Encoded(item.input_ids[prefix.length :], item.trained[prefix.length :]) for item in items]
    total, count = 0.0, 0.0
    for batch, real in eval_batches(items, batch_size, pad_id, device, shard=shard):
        with autocast():
            loss = float(loss_fn(model, prefix.continued(batch) if prefix is not None else batch))
        if real:
            total, count = total + loss, count + count_targets(batch)
    total, count = shard.total([total, count])
    if count == 0:
        return {}
    loss = total / count
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def _unscored_prefix(model, items: list[Encoded], device, shard: EvalShard) -> PrefixCache | None:
    """A cache of the tokens all items begin with, up to the position that predicts the first scored one."""
    if not items or items[0].label is not None or items[0].positions is not None or items[0].rejected is not None:
        return None
    first_scored = min((item.trained.index(True) if True in item.trained else len(item.trained)) for item in items)
    limit = min(first_scored - 1, min(len(item.input_ids) for item in items) - 1)
    return shared_prefix(model, [item.input_ids for item in items], limit, device, shard.in_lockstep)


def classification_metrics(predicted: list[int], actual: list[int], label_names: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix."""
    n = len(label_names)
    confusion = [[0] * n for _ in range(n)]  # rows: actual, columns: predicted
    for p, a in zip(predicted, actual):
        confusion[a][p] += 1
    per_class = {}
    f1s = []
    for k, name in enumerate(label_names):
        tp = confusion[k][k]
        predicted_k = sum(confusion[r][k] for r in range(n))
        actual_k = sum(confusion[k])
        precision = tp / predicted_k if predicted_k else 0.0
        recall = tp / actual_k if actual_k else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual_k}
        f1s.append(f1)
    correct = sum(confusion[k][k] for k in range(n))
    return {
        "accuracy": correct / max(len(actual), 1),
        "macro_precision": sum(c["precision"] for c in per_class.values()) / n,
        "macro_recall": sum(c["recall"] for c in per_class.values()) / n,
        "macro_f1": sum(f1s) / n,
        "per_class": per_class,
        "confusion_matrix": confusion,
    }


@torch.no_grad()
def evaluate_classification(model, items, batch_size, pad_id, device, autocast, label_names, limit=None,
                            shard: EvalShard = WHOLE) -> dict:
    predicted, actual = [], []
    for batch, real in eval_batches(items, batch_size, pad_id, device, limit, shard=shard):
        with autocast():
            logits = model(**model_inputs(batch)).logits
        if real:
            predicted += logits.argmax(-1).tolist()
            actual += batch["labels"].tolist()
    pairs = shard.gather(list(zip(predicted, actual)))
    return classification_metrics([p for p, _ in pairs], [a for _, a in pairs], label_names)


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


@torch.no_grad()
def evaluate_generation(model, tokenizer, renderer: Renderer, examples, num_prompts: int, max_new_tokens: int, device,
                        batch_size: int = 16, shots: list | None = None, shard: EvalShard = WHOLE) -> dict:
    """Greedy generation on held-out prompts; exact match against the reference responses.
    With `shots`, every prompt starts with those worked examples (a few-shot prompt)."""
    pairs = [renderer.prompt_text(e, shots) for e in examples[:num_prompts]]
    if not pairs:
        return {"exact_match": 0.0, "samples": []}
    prompts = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt, _ in pairs]
    outputs = generate_texts(model, tokenizer, prompts, max_new_tokens, device, batch_size, shard)
    matches = [normalize_answer(o) == normalize_answer(ref) for o, (_, ref) in zip(outputs, pairs)]
    samples = [
        {"prompt": p, "reference": r, "output": o, "match": m} for (p, r), o, m in zip(pairs, outputs, matches)
    ]
    return {"exact_match": sum(matches) / len(matches), "samples": samples}


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device, batch_size: int = 16,
                   shard: EvalShard = WHOLE) -> list[str]:
    """Greedy continuations of every prompt (token ids), in order: each worker answers its share."""
    mine = [(index, prompts[index]) for index in shard.part(range(len(prompts)))]
    generator = Generator(model, tokenizer, max_new_tokens, device, synced=shard.in_lockstep)
    generator.share_prefix([ids for _, ids in mine])
    # Prompts of similar length together: left padding is compute spent on nothing.
    batches = longest_first(mine, batch_size, lambda indexed: len(indexed[1]))
    generated: list[tuple[int, str]] = []
    for chunk, real in shard.batches(batches, spare=lambda: mine[:1] or [(0, prompts[0])]):
        texts = generator([ids for _, ids in chunk])
        if real:
            generated += [(index, text) for (index, _), text in zip(chunk, texts)]
    by_index = dict(shard.gather(generated))
    return [by_index[index] for index in range(len(prompts))]


MIN_SHARED_PREFIX = 16  # tokens; a shorter common beginning is not worth a cache copy per batch


class PrefixCache:
    """The attention cache of a token prefix, computed once and copied into every batch that continues it.

    Held-out prompts often begin alike (system prompt, instruction, few-shot examples): that common
    beginning runs once, and each batch computes only the rest of its sequences. The results are the
    same; the few-shot baseline's prompts cost a third.
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
        pad_id = self.tokenizer.pad_token_id
        shared = self.prefix.tokens if self.prefix is not None else []
        tails = [ids[len(shared) :] for ids in prompts]
        width = max(len(tail) for tail in tails)
        ids = [shared + [pad_id] * (width - len(tail)) + tail for tail in tails]
        mask = [[1] * len(shared) + [0] * (width - len(tail)) + [1] * len(tail) for tail in tails]
        cache = self.prefix.copies(len(prompts)) if self.prefix is not None else {}
        generated = self.model.generate(
            input_ids=torch.tensor(ids, device=self.device), attention_mask=torch.tensor(mask, device=self.device),
            max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id, synced_gpus=self.synced, **cache)
        return self.tokenizer.batch_decode(generated[:, len(shared) + width :], skip_special_tokens=True)


def cache_of(output) -> tuple[str, Any]:
    """A forward pass's attention cache, and the keyword that hands it back to the model: `cache` since
    transformers renamed `past_key_values` (the old name still works there, with a warning)."""
    keyword = "cache" if "cache" in output else "past_key_values"
    return keyword, output[keyword]


def cache_holds_adapters(model) -> bool:
    """Prefix tuning keeps its virtual tokens in the attention cache: a copied prompt cache would lose them."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """model.eval() for the block, then back to whichever mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The numeric top-level metrics (what goes into logs and comparison tables)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextlib.contextmanager
def base_model_view(model):
    """Evaluate the base model: adapters disabled for PEFT models, unchanged otherwise.

    Re-entrant: PEFT re-enables adapters when its context exits, so an inner use (a DPO reference
    inside the base-model evaluation) must not switch them back on under the outer one.
    """
    disable = getattr(model, "disable_adapter", None)
    if disable is None or getattr(model, "_ftcluster_base_view", False):
        yield model
        return
    model._ftcluster_base_view = True
    try:
        with disable():
            yield model
    finally:
        model._ftcluster_base_view = False
