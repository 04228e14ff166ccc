"""Every evaluation a job asks for, on its validation data: what the loop and `ftcluster eval` run.

The pieces live in `evaluate.py` (loss, classification, generation) and `choices.py` (choice scoring).
"""

from __future__ import annotations

from collections.abc import Callable

from ftcluster.choices import answer_choices, evaluate_choices
from ftcluster.data.dataset import DataBundle
from ftcluster.data.render import Encoded, Renderer
from ftcluster.evaluate import (
    eval_mode,
    evaluate_classification,
    evaluate_generation,
    evaluate_loss,
)
from ftcluster.harness import run_harness


def run_eval(model, tokenizer, bundle: DataBundle, renderer: Renderer, eval_spec, batch_size: int, device,
             autocast: Callable, generation: bool = True, objective=None, general: list[Encoded] | None = None) -> dict:
    """Every metric the job asks for, on the validation set (`objective`: DPO scores its pairs itself).

    generation=False (evaluations during training) skips the slow parts: generation, choice scoring
    and the general-text perplexity of the forgetting check (`general`, scored before and after only).
    """
    pad_id = tokenizer.pad_token_id
    with eval_mode(model):
        if bundle.label_names is not None:
            metrics = evaluate_loss(model, bundle.val, batch_size, pad_id, device, autocast, eval_spec.max_batches)
            metrics.pop("val_perplexity", None)
            metrics.update(evaluate_classification(model, bundle.val, batch_size, pad_id, device, autocast,
                                                   bundle.label_names, eval_spec.max_batches))
            return metrics
        if objective is not None and objective.name == "dpo":
            metrics = objective.evaluate(model, bundle.val, batch_size, pad_id, device, autocast, eval_spec.max_batches)
        else:
            metrics = evaluate_loss(model, bundle.val, batch_size, pad_id, device, autocast, eval_spec.max_batches)
        if not generation:
            return metrics
        if eval_spec.generation and bundle.val_examples:
            gen = eval_spec.generation
            with autocast():
                metrics.update(evaluate_generation(model, tokenizer, renderer, bundle.val_examples, gen.num_prompts,
                                                   gen.max_new_tokens, device))
        choices = answer_choices(bundle, eval_spec) if objective is None or objective.name == "sft" else None
        if choices:
            metrics.update(evaluate_choices(model, tokenizer, renderer, bundle.val_examples, choices, eval_spec, device,
                                            autocast, batch_size))
        if eval_spec.harness is not None:
            with autocast():
                metrics.update(run_harness(model, tokenizer, eval_spec.harness, device))
        if general:
            general_scores = evaluate_loss(model, general, batch_size, pad_id, device, autocast)
            metrics["general_loss"] = general_scores["val_loss"]
            metrics["general_perplexity"] = general_scores["val_perplexity"]
    return metrics


def few_shot_baseline(model, tokenizer, bundle: DataBundle, renderer: Renderer, eval_spec, device, autocast,
                      batch_size: int = 8) -> dict:
    """The base model prompted with the first K training examples, scored like the fine-tuned model
    (exact match with eval.generation; choice accuracy where the answers are choices)."""
    shots = bundle.shots[: eval_spec.few_shot_baseline]
    result: dict = {"shots": len(shots)}
    gen = eval_spec.generation
    if gen is not None:
        with eval_mode(model), autocast():
            generated = evaluate_generation(model, tokenizer, renderer, bundle.val_examples, gen.num_prompts,
                                            gen.max_new_tokens, device, shots=shots)
        result.update(exact_match=generated["exact_match"], samples=generated["samples"][:3])
    choices = answer_choices(bundle, eval_spec)
    if choices:
        scored = evaluate_choices(model, tokenizer, renderer, bundle.val_examples, choices, eval_spec, device, autocast,
                                  batch_size, shots=shots)
        result.update({k: v for k, v in scored.items() if k != "choice"})
    return result
