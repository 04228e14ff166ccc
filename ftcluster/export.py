"""Export a run's fine-tuned weights to a folder plain `peft` or `transformers` loads."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ftcluster.errors import FtError
from ftcluster.models.load import load_pretrained, load_tokenizer, resolve_model
from ftcluster.layout import FINAL, LABELS
from ftcluster.runs import final_weights, load_run


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def load_finetuned(run_dir: str | Path, *, merged: bool = False):
    """(model, tokenizer, spec) of a finished run: base + adapter (merged on request) or full model."""
    import torch

    run, spec, summary = load_run(run_dir)
    weights, is_adapter = final_weights(run)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / FINAL / "tokenizer")
    if not is_adapter:
        return _auto_class(spec.model.task).from_pretrained(weights, dtype=torch.float32), tokenizer, spec
    from peft import PeftModel

    base = load_base(spec, labels_file=run / FINAL / LABELS)
    model = PeftModel.from_pretrained(base, weights)
    if merged:
        if spec.method.name == "prefix":
            raise FtError("export --merge: prefix-tuning adapters cannot be merged into the weights; export without --merge")
        model = model.merge_and_unload()
    return model, tokenizer, spec


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


def export_run(run_dir: str | Path, out: str | Path, *, merge: bool = False, force: bool = False) -> Path:
    """Write the adapter (or, with merge, a merged full model) and the tokenizer to ``out``."""
    run = Path(run_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FtError(f"export: {out} exists and is not empty; pass --force to replace it")
    weights, is_adapter = final_weights(load_run(run)[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        if is_adapter and merge:
            model, tokenizer, _ = load_finetuned(run, merged=True)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        else:
            shutil.copytree(weights, staging, dirs_exist_ok=True)
            shutil.copytree(run / FINAL / "tokenizer", staging, dirs_exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
