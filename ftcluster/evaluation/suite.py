"""Every evaluation a job asks for, on its validation data: what the loop and `ftcluster eval` run.

The pieces live in `metrics.py` (loss, classification, generation), `generation.py` (batched answers
from shared prompt caches) and `choices.py` (choice scoring).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ftcluster.config.spec import EvalSpec
from ftcluster.data.dataset import DataBundle
from ftcluster.data.render import Encoded, Renderer
from ftcluster.evaluation.choices import answer_choices, evaluate_choices
from ftcluster.evaluation.generation import can_share_prompt_pass
from ftcluster.evaluation.harness import run_harness
from ftcluster.evaluation.metrics import (
    answer_prompts,
    eval_mode,
    evaluate_classification,
    evaluate_generation,
    evaluate_loss,
    held_out_prompts,
    loss_sum,
    loss_totals,
    match_answers,
    mean_loss,
    replies_after,
)
from ftcluster.evaluation.shard import WHOLE, EvalShard


class ObjectiveView(Protocol):
    """What evaluation asks of a training objective (objectives.base.Objective has all of it)."""

    scores_answer_choices: bool

    def evaluate(self, model: torch.nn.Module, items: list[Encoded], batch_size: int, pad_id: int, device,
                 autocast, limit: int | None = None, shard: EvalShard = WHOLE) -> dict[str, Any] | None: ...

    def scoring_loss(self, model: torch.nn.Module) -> Callable: ...


@dataclass(frozen=True)
class EvalContext:
    """What every evaluation of one run shares: its data and how it is rendered, the eval settings, where
    and how the model runs, and this worker's share of the examples."""

    tokenizer: Any
    bundle: DataBundle
    renderer: Renderer
    settings: EvalSpec
    batch_size: int  # the training batch: the scoring batch unless eval.batch_size says otherwise
    device: torch.device
    autocast: Callable
    objective: ObjectiveView | None = None  # one with its own held-out metrics (DPO, reward, GRPO) scores them
    general: list[Encoded] | None = None  # the forgetting check's general text
    shard: EvalShard = WHOLE


def run_eval(model, context: EvalContext, generation: bool = True) -> dict:
    """Every metric the job asks for, on the validation set.

    generation=False (evaluations during training) skips the slow parts: generation, choice scoring,
    the harness and the forgetting check (`general`, scored before and after only). Each worker of a
    group scores its `shard` of the examples; every worker gets the metrics of the whole set.
    """
    tokenizer, bundle, renderer, eval_spec = context.tokenizer, context.bundle, context.renderer, context.settings
    device, autocast, objective, shard = context.device, context.autocast, context.objective, context.shard
    pad_id = tokenizer.pad_token_id
    scoring_batch = eval_spec.batch_size or context.batch_size
    val, examples = list(bundle.val[: eval_spec.max_examples]), list(bundle.val_examples[: eval_spec.max_examples])
    loss_fn = objective.scoring_loss(model) if objective is not None else loss_sum

    def loss_of(items: list[Encoded]) -> dict[str, float]:
        return evaluate_loss(model, items, scoring_batch, pad_id, device, autocast, eval_spec.max_batches, shard,
                             loss_fn)

    with eval_mode(model):
        if bundle.label_names is not None:
            metrics = loss_of(val)
            metrics.pop("val_perplexity", None)
            metrics.update(evaluate_classification(model, val, scoring_batch, pad_id, device, autocast,
                                                   bundle.label_names, eval_spec.max_batches, shard))
            return metrics
        answers = generation and eval_spec.generation is not None and bool(examples)
        own = None if objective is None else objective.evaluate(model, val, scoring_batch, pad_id, device, autocast,
                                                                 eval_spec.max_batches, shard)
        if own is not None:  # DPO and reward models score their held-out pairs, GRPO answers its prompts
            metrics = own
            if answers:
                metrics.update(generate_and_match(model, tokenizer, renderer, examples, eval_spec, device, autocast,
                                                  shard))
        elif answers:
            limit = eval_spec.max_batches * scoring_batch if eval_spec.max_batches is not None else None
            metrics = loss_and_answers(model, tokenizer, renderer, val[:limit], examples, eval_spec, device, autocast,
                                       scoring_batch, shard, loss_fn)
        else:
            metrics = loss_of(val)
        if not generation:
            return metrics
        choices = answer_choices(bundle, eval_spec) if objective is None or objective.scores_answer_choices else None
        if choices:
            metrics.update(evaluate_choices(model, tokenizer, renderer, examples, choices, eval_spec, device,
                                            autocast, scoring_batch, shard=shard))
        for harness in harness_sections(eval_spec):
            with autocast():
                metrics.update(run_harness(model, tokenizer, harness, device))
        if context.general:
            general_scores = evaluate_loss(model, context.general, scoring_batch, pad_id, device, autocast, shard=shard,
                                           loss_fn=loss_fn)
            metrics["general_loss"] = general_scores["val_loss"]
            metrics["general_perplexity"] = general_scores["val_perplexity"]
    return metrics


def harness_sections(eval_spec) -> list:
    """The harness runs a job asks for: eval.harness, and the forgetting check's tasks (once each)."""
    sections = [eval_spec.harness, eval_spec.forgetting.harness if eval_spec.forgetting else None]
    sections = [section for section in sections if section is not None]
    if len(sections) == 2 and sections[0] == sections[1]:
        return sections[:1]
    return sections


GENERATION_BATCH = 16  # prompts per generate() call on an accelerator, without eval.batch_size
CPU_GENERATION_BATCH = 64  # on CPU, where a decoding step of a few rows costs nearly as much as one of many


def generation_batch_size(eval_spec, device) -> int:
    """Prompts generated together: eval.batch_size, else 64 on CPU (the quickstart's 48 held-out prompts in
    one batch: a third of the decoding steps, each reading the weights once for every row; same answers)
    and 16 on an accelerator (where a larger batch's attention cache may not fit)."""
    if eval_spec.batch_size:
        return eval_spec.batch_size
    return CPU_GENERATION_BATCH if torch.device(device).type == "cpu" else GENERATION_BATCH


def generate_and_match(model, tokenizer, renderer: Renderer, examples, eval_spec, device, autocast,
                       shard: EvalShard = WHOLE, shots=None) -> dict:
    """eval.generation: greedy answers to held-out prompts, exact match against the references."""
    settings = eval_spec.generation
    with eval_mode(model), autocast():
        return evaluate_generation(model, tokenizer, renderer, examples, settings.num_prompts,
                                   settings.max_new_tokens, device, generation_batch_size(eval_spec, device),
                                   shots, shard)


def loss_and_answers(model, tokenizer, renderer: Renderer, val: list[Encoded], examples, eval_spec, device,
                     autocast: Callable, scoring_batch: int, shard: EvalShard, loss_fn: Callable) -> dict:
    """The validation loss and eval.generation's exact match. Where each held-out prompt begins its
    validation example (single-turn data), the prompts run once for both: the reference replies are
    scored on a copy of the prompts' attention cache, then the answers are generated from it."""
    settings = eval_spec.generation
    pairs, prompts = held_out_prompts(tokenizer, renderer, examples[: settings.num_prompts])
    replies = replies_after(prompts, val) if can_share_prompt_pass(model, shard) else None
    with autocast():
        outputs, scored = answer_prompts(model, tokenizer, prompts, settings.max_new_tokens, device,
                                         generation_batch_size(eval_spec, device), shard, replies, loss_fn)
    unscored = val[len(prompts) :] if replies is not None else val  # apart: multi-turn, ZeRO-3, prefix tuning
    rest = loss_totals(model, unscored, scoring_batch, tokenizer.pad_token_id, device, autocast, shard, loss_fn)
    return {**mean_loss(*shard.total([scored[0] + rest[0], scored[1] + rest[1]])), **match_answers(pairs, outputs)}


def few_shot_baseline(model, tokenizer, bundle: DataBundle, renderer: Renderer, eval_spec, device, autocast,
                      batch_size: int = 8, shard: EvalShard = WHOLE) -> dict:
    """The base model prompted with the first K training examples, scored like the fine-tuned model
    (exact match with eval.generation; choice accuracy where the answers are choices)."""
    shots = bundle.shots[: eval_spec.few_shot_baseline]
    examples = list(bundle.val_examples[: eval_spec.max_examples])
    result: dict = {"shots": len(shots)}
    if eval_spec.generation is not None:
        generated = generate_and_match(model, tokenizer, renderer, examples, eval_spec, device, autocast, shard, shots)
        result.update(exact_match=generated["exact_match"], samples=generated["samples"][:3])
    choices = answer_choices(bundle, eval_spec)
    if choices:
        scored = evaluate_choices(model, tokenizer, renderer, examples, choices, eval_spec, device, autocast,
                                  eval_spec.batch_size or batch_size, shots=shots, shard=shard)
        result.update({k: v for k, v in scored.items() if k != "choice"})
    return result
