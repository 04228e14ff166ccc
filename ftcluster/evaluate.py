"""Evaluation: validation loss/perplexity, classification metrics, generation exact match."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ftcluster.data.batches import IGNORE, collate, count_targets, model_inputs
from ftcluster.data.render import Encoded, Renderer


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


def iter_batches(items: list[Encoded], batch_size: int, pad_id: int, device, limit: int | None = None,
                 collate_fn: Callable = collate) -> Iterator[dict]:
    for number, start in enumerate(range(0, len(items), batch_size)):
        if limit is not None and number >= limit:
            return
        batch = collate_fn(items[start : start + batch_size], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model, items: list[Encoded], batch_size: int, pad_id: int, device, autocast, limit=None) -> dict[str, float]:
    total, count = 0.0, 0
    for batch in iter_batches(items, batch_size, pad_id, device, limit):
        with autocast():
            total += float(loss_sum(model, batch))
        count += count_targets(batch)
    if count == 0:
        return {}
    loss = total / count
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


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
def evaluate_classification(model, items, batch_size, pad_id, device, autocast, label_names, limit=None) -> dict:
    predicted, actual = [], []
    for batch in iter_batches(items, batch_size, pad_id, device, limit):
        with autocast():
            logits = model(**model_inputs(batch)).logits
        predicted += logits.argmax(-1).tolist()
        actual += batch["labels"].tolist()
    return classification_metrics(predicted, actual, label_names)


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


@torch.no_grad()
def evaluate_generation(model, tokenizer, renderer: Renderer, examples, num_prompts: int, max_new_tokens: int, device,
                        batch_size: int = 16, shots: list | None = None) -> dict:
    """Greedy generation on held-out prompts; exact match against the reference responses.
    With `shots`, every prompt starts with those worked examples (a few-shot prompt)."""
    pairs = [renderer.prompt_text(e, shots) for e in examples[:num_prompts]]
    outputs: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of each prompt
    try:
        for start in range(0, len(pairs), batch_size):
            prompts = [p for p, _ in pairs[start : start + batch_size]]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            generated = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    matches = [normalize_answer(o) == normalize_answer(ref) for o, (_, ref) in zip(outputs, pairs)]
    samples = [
        {"prompt": p, "reference": r, "output": o, "match": m} for (p, r), o, m in zip(pairs, outputs, matches)
    ]
    return {"exact_match": sum(matches) / max(len(matches), 1), "samples": samples}


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
