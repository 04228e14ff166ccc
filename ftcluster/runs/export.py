"""Export a run's fine-tuned weights to a folder plain `peft` or `transformers` loads."""

from __future__ import annotations

import shutil
from pathlib import Path

from ftcluster.core.atomic import atomic_directory
from ftcluster.core.errors import FtError
from ftcluster.models.load import load_pretrained, load_tokenizer, resolve_model
from ftcluster.models.methods import apply_method, full_precision
from ftcluster.runs.checkpoints import DEEPSPEED_TAG
from ftcluster.runs.folder import final_weights, load_run, load_run_spec
from ftcluster.runs.layout import CHECKPOINTS, FINAL, LABELS, LATEST, TRAINER_STATE, latest_checkpoint
from ftcluster.runs.mirror import open_run


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def load_finetuned(run_dir: str | Path, *, merged: bool = False):
    """(model, tokenizer, spec) of a finished run: base + adapter (merged on request) or full model."""
    import torch

    run, spec, _summary = load_run(open_run(run_dir))
    weights, is_adapter = final_weights(run)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / FINAL / "tokenizer")
    if not is_adapter:
        return _auto_class(spec.model.task).from_pretrained(weights, dtype=torch.float32), tokenizer, spec
    from peft import PeftModel

    base = load_base(spec, labels_file=run / FINAL / LABELS)
    model = PeftModel.from_pretrained(base, weights)
    return (merge_adapters(model, spec) if merged else model), tokenizer, spec


def merge_adapters(model, spec):
    """Fold LoRA/DoRA adapters into the base weights (prefix tuning has nothing to fold)."""
    from ftcluster.config.registry import METHODS

    if not METHODS[spec.method.name].mergeable:
        raise FtError(f"export --merge: {spec.method.name} adapters cannot be merged into the weights; "
                      "export without --merge")
    return model.merge_and_unload()


def load_base(spec, labels_file: Path | None = None):
    """The unquantized base model of a spec, in float32 (merging into 4-bit weights loses precision)."""
    import json

    import torch

    labels = None
    if spec.model.task == "classification" and labels_file is not None:
        labels = json.loads(labels_file.read_text())
    resolved = resolve_model(spec.model.path)
    tokenizer = load_tokenizer(resolved, spec.model.revision)
    return load_pretrained(resolved, spec.model.task, dtype=torch.float32, label_names=labels,
                           pad_token_id=tokenizer.pad_token_id, revision=spec.model.revision)


def model_from_checkpoint(run: Path, checkpoint: str):
    """(model, tokenizer, spec) rebuilt from a training checkpoint: base weights + method +
    the checkpoint's trained weights. DeepSpeed ZeRO shards are consolidated into full fp32 tensors."""
    spec = load_run_spec(run)
    path: Path | None = run / CHECKPOINTS / checkpoint
    if checkpoint == LATEST:
        path = latest_checkpoint(run / CHECKPOINTS)
    if path is None or not (path / TRAINER_STATE).is_file():
        raise FtError(f"export --checkpoint: no complete checkpoint {checkpoint!r} in {run / CHECKPOINTS}")
    labels = run / FINAL / LABELS
    base = load_base(spec, labels_file=labels if labels.is_file() else None)
    model = apply_method(base, full_precision(spec.method), spec.model.task)
    if (path / DEEPSPEED_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DEEPSPEED_TAG)
    else:
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise FtError(f"export --checkpoint: {path} does not match the run's model ({unexpected[0]} ...)")
    tokenizer = load_tokenizer(resolve_model(spec.model.path), spec.model.revision)
    return model, tokenizer, spec


def export_run(run_dir: str | Path, out: str | Path, *, merge: bool = False, force: bool = False,
               checkpoint: str | None = None) -> Path:
    """Write the adapter (or, with merge, a merged full model) and the tokenizer to ``out``.

    By default the run's final weights; with ``checkpoint`` (a step-N folder name or "latest")
    the weights of that training checkpoint, consolidated from ZeRO shards where needed.
    """
    run = open_run(run_dir, checkpoint)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FtError(f"export: {out} exists and is not empty; pass --force to replace it")
    if checkpoint is None:
        weights, is_adapter = final_weights(load_run(run)[0])
    with atomic_directory(out) as staging:
        if checkpoint is None and not (is_adapter and merge):  # the saved folders are already the export
            shutil.copytree(weights, staging, dirs_exist_ok=True)
            shutil.copytree(run / FINAL / "tokenizer", staging, dirs_exist_ok=True)
            return out
        if checkpoint is not None:
            model, tokenizer, spec = model_from_checkpoint(run, checkpoint)
            if merge and hasattr(model, "merge_and_unload"):
                model = merge_adapters(model, spec)
        else:
            model, tokenizer, _ = load_finetuned(run, merged=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out
