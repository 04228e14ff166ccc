"""Evaluation: validation loss/perplexity, classification metrics, generation exact match."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ftcluster.data.batches import IGNORE, collate, count_targets, model_inputs
from ftcluster.data.render import Encoded, Renderer
from ftcluster.evaluation.generation import Generator, PrefixCache, shared_prefix
from ftcluster.evaluation.shard import WHOLE, EvalShard, longest_first


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


def evaluate_loss(model, items: list[Encoded], batch_size: int, pad_id: int, device, autocast, limit=None,
                  shard: EvalShard = WHOLE, loss_fn: Callable = loss_sum) -> dict[str, float]:
    """Mean loss per target over `items` (every worker its share; the sums are added up)."""
    if limit is not None:
        items = items[: limit * batch_size]
    return mean_loss(*shard.total(loss_totals(model, items, batch_size, pad_id, device, autocast, shard, loss_fn)))


def mean_loss(total: float, count: float) -> dict[str, float]:
    """val_loss and val_perplexity from a loss sum and its number of terms (nothing when there are none)."""
    if count == 0:
        return {}
    loss = total / count
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def loss_totals(model, items: list[Encoded], batch_size: int, pad_id: int, device, autocast,
                shard: EvalShard = WHOLE, loss_fn: Callable = loss_sum) -> list[float]:
    """[sum of loss terms, their count] over this worker's share of `items`. The tokens every item begins
    with, when none of them is scored (a system prompt, an instruction), run once."""
    prefix = _unscored_prefix(model, items, device, shard)
    if prefix is not None:
        items = [Encoded(item.input_ids[prefix.length :], item.trained[prefix.length :]) for item in items]
    total, count = 0.0, 0.0
    for batch, real in eval_batches(items, batch_size, pad_id, device, shard=shard):
        with autocast():
            loss = float(loss_fn(model, prefix.continued(batch) if prefix is not None else batch))
        if real:
            total, count = total + loss, count + count_targets(batch)
    return [total, count]


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
    pairs, prompts = held_out_prompts(tokenizer, renderer, examples[:num_prompts], shots)
    return match_answers(pairs, generate_texts(model, tokenizer, prompts, max_new_tokens, device, batch_size, shard))


def held_out_prompts(tokenizer, renderer: Renderer, examples, shots: list | None = None
                     ) -> tuple[list[tuple[str, str]], list[list[int]]]:
    """Each example's (generation prompt, reference answer), and the prompt's token ids."""
    pairs = [renderer.prompt_text(e, shots) for e in examples]
    return pairs, [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt, _ in pairs]


def match_answers(pairs: list[tuple[str, str]], outputs: list[str]) -> dict:
    """Exact match of the outputs against the references, and every (prompt, reference, output) sample."""
    if not pairs:
        return {"exact_match": 0.0, "samples": []}
    matches = [normalize_answer(o) == normalize_answer(ref) for o, (_, ref) in zip(outputs, pairs)]
    samples = [
        {"prompt": p, "reference": r, "output": o, "match": m} for (p, r), o, m in zip(pairs, outputs, matches)
    ]
    return {"exact_match": sum(matches) / len(matches), "samples": samples}


def replies_after(prompts: list[list[int]], items: list[Encoded]) -> list[Encoded] | None:
    """What each item adds after its prompt (the reference reply, as training scores it), if every item
    is its prompt followed by trained tokens; None otherwise (then the two cannot share a pass)."""
    if len(items) < len(prompts):
        return None
    replies = []
    for prompt, item in zip(prompts, items):
        n = len(prompt)
        if item.input_ids[:n] != prompt or any(item.trained[:n]) or not any(item.trained[n:]) or item.label is not None:
            return None
        replies.append(Encoded(item.input_ids[n:], item.trained[n:]))
    return replies


def generate_texts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device, batch_size: int = 16,
                   shard: EvalShard = WHOLE) -> list[str]:
    """Greedy continuations of every prompt (token ids), in order: each worker answers its share."""
    return answer_prompts(model, tokenizer, prompts, max_new_tokens, device, batch_size, shard)[0]


@torch.no_grad()
def answer_prompts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device, batch_size: int = 16,
                   shard: EvalShard = WHOLE, replies: list[Encoded] | None = None,
                   loss_fn: Callable = loss_sum) -> tuple[list[str], list[float]]:
    """Greedy continuations of every prompt, in order (each worker answers its share); with `replies`
    (one per prompt), also this worker's [loss sum, count] over them, scored on the prompts' cache."""
    mine = [(index, prompts[index]) for index in shard.part(range(len(prompts)))]
    generator = Generator(model, tokenizer, max_new_tokens, device, synced=shard.in_lockstep)
    generator.share_prefix([ids for _, ids in mine])
    # Prompts of similar length together: left padding is compute spent on nothing.
    batches = longest_first(mine, batch_size, lambda indexed: len(indexed[1]))
    generated: list[tuple[int, str]] = []
    totals = [0.0, 0.0]
    for chunk, real in shard.batches(batches, spare=lambda: mine[:1] or [(0, prompts[0])]):
        chunk_prompts = [ids for _, ids in chunk]
        if replies is None:
            texts = generator(chunk_prompts)
        else:
            texts, loss, count = generator.answer_and_score(chunk_prompts, [replies[i] for i, _ in chunk], loss_fn)
            if real:
                totals = [totals[0] + loss, totals[1] + count]
        if real:
            generated += [(index, text) for (index, _), text in zip(chunk, texts)]
    by_index = dict(shard.gather(generated))
    return [by_index[index] for index in range(len(prompts))], totals


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
