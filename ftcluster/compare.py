"""`ftcluster eval RUN`: the base model and the fine-tuned one, evaluated the same way."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from ftcluster.data import build_data
from ftcluster.data.render import Renderer
from ftcluster.evaluate import base_model_view, run_eval, scalar_metrics
from ftcluster.export import load_base, load_finetuned
from ftcluster.layout import FINAL, LABELS


def compare_run(run_dir: str | Path) -> dict[str, Any]:
    """Evaluate base and fine-tuned models of a finished run on its validation data (CPU, fp32)."""
    run = Path(run_dir)
    model, tokenizer, spec = load_finetuned(run)
    bundle = build_data(spec.data, tokenizer)
    renderer = Renderer(tokenizer, spec.data.max_length, spec.data.train_on_prompt)
    device = torch.device("cpu")

    def evaluate(candidate) -> dict:
        return run_eval(candidate, tokenizer, bundle, renderer, spec.eval, spec.training.batch_size, device,
                        contextlib.nullcontext)

    after = evaluate(model)
    if hasattr(model, "disable_adapter"):
        with base_model_view(model):
            before = evaluate(model)
    else:
        before = evaluate(load_base(spec, labels_file=run / FINAL / LABELS))
    return {
        "before": scalar_metrics(before),
        "after": scalar_metrics(after),
        "samples_before": before.get("samples", []),
        "samples_after": after.get("samples", []),
    }
