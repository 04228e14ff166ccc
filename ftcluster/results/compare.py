"""`ftcluster eval RUN`: the base model and the fine-tuned one, evaluated the same way."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from ftcluster.config.registry import METHODS
from ftcluster.config.spec import build_spec
from ftcluster.data import build_data
from ftcluster.data.render import Renderer
from ftcluster.evaluation.forgetting import general_items
from ftcluster.evaluation.metrics import base_model_view, scalar_metrics
from ftcluster.evaluation.suite import EvalContext, few_shot_baseline, run_eval
from ftcluster.objectives.base import make_objective
from ftcluster.runs.export import load_base, load_finetuned
from ftcluster.runs.layout import FINAL, LABELS
from ftcluster.runs.mirror import open_run


def compare_run(run_dir: str | Path, few_shot: int | None = None, harness: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate base and fine-tuned models of a finished run on its validation data (CPU, fp32);
    `few_shot`: also the base model prompted with that many training examples; `harness`: an
    eval.harness section to run instead of the run's own."""
    run = open_run(run_dir)
    model, tokenizer, spec = load_finetuned(run)
    if few_shot or harness:  # the spec's own rules decide whether the run allows them
        raw = spec.model_dump(mode="json")
        if few_shot:
            raw["eval"]["few_shot_baseline"] = few_shot
        if harness:
            raw["eval"]["harness"] = {**(raw["eval"].get("harness") or {}), **harness}
        spec = build_spec(raw, "--baseline/--harness")
    bundle = build_data(spec.data, tokenizer)
    renderer = Renderer(tokenizer, spec.data.max_length, spec.data.train_on_prompt)
    device = torch.device("cpu")
    is_peft = METHODS[spec.method.name].adapters
    base = None if is_peft else load_base(spec, labels_file=run / FINAL / LABELS)
    objective = make_objective(spec, model, is_peft, base_model=base)
    general = general_items(spec.eval.forgetting, renderer) if spec.eval.forgetting else None

    context = EvalContext(tokenizer, bundle, renderer, spec.eval, spec.training.batch_size, device,
                          contextlib.nullcontext, objective=objective, general=general)

    def evaluate(candidate) -> dict:
        return run_eval(candidate, context)

    after = evaluate(model)
    with base_model_view(model) if is_peft else contextlib.nullcontext():
        base_model = model if is_peft else base
        before = evaluate(base_model)
        if few_shot:
            before["few_shot"] = few_shot_baseline(base_model, tokenizer, bundle, renderer, spec.eval, device,
                                                   contextlib.nullcontext)
    return {
        "before": scalar_metrics(before),
        "after": scalar_metrics(after),
        "samples_before": before.get("samples", []),
        "samples_after": after.get("samples", []),
        "few_shot": before.get("few_shot"),
    }
