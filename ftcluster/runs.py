"""A run folder: what `train` writes there, and how `eval` / `export` read it back.

    OUTPUT/run.yaml          the resolved job spec the run used
    OUTPUT/metrics.jsonl     one JSON object per log / evaluation step
    OUTPUT/checkpoints/      resumable checkpoints (step-N/, latest)
    OUTPUT/final/            adapter/ (PEFT) or model/ (full, freeze), and tokenizer/
    OUTPUT/eval_before.json, eval_after.json, summary.json
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ftcluster.atomic import write_text_atomic
from ftcluster.engine.checkpoint import latest_checkpoint
from ftcluster.errors import FtError
from ftcluster.layout import (
    CHECKPOINTS,
    EVAL_AFTER,
    EVAL_BEFORE,
    FINAL,
    METRICS,
    RUN_SPEC,
    SUMMARY,
)
from ftcluster.spec import JobSpec, dump_spec, load_spec


def check_output(spec: JobSpec, resume: bool) -> Path:
    """Check (without writing) that the run folder may be used.

    A fresh run never writes over a folder that holds another run's results or checkpoints,
    unless ``output.overwrite`` is set.
    """
    out = spec.output_dir
    if resume:
        if latest_checkpoint(out / CHECKPOINTS) is None:
            raise FtError(f"--resume: {out}/checkpoints has no complete checkpoint to resume from")
    elif not spec.output.overwrite and ((out / SUMMARY).exists() or (out / CHECKPOINTS).exists()):
        raise FtError(
            f"output.dir: {out} already holds a run; use --resume to continue it, "
            f"output.overwrite=true to replace it, or another output.dir"
        )
    return out


def start_output(spec: JobSpec, resume: bool) -> Path:
    """Called once data and model have loaded: clear a replaced run's results, record the spec.

    Doing this only after the inputs proved good means a bad input never damages earlier outputs.
    """
    out = spec.output_dir
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in (SUMMARY, EVAL_BEFORE, EVAL_AFTER, METRICS):
            (out / name).unlink(missing_ok=True)
        for name in (FINAL, CHECKPOINTS):
            shutil.rmtree(out / name, ignore_errors=True)
    write_text_atomic(out / RUN_SPEC, dump_spec(spec))
    return out


def load_run_spec(run_dir: str | Path) -> JobSpec:
    """The spec a run (finished or not) was started with."""
    run = Path(run_dir)
    if not (run / RUN_SPEC).is_file():
        raise FtError(f"{run}: not a run folder (no {RUN_SPEC}); pass the output.dir of a `ftcluster train` run")
    return load_spec(run / RUN_SPEC)


def load_run(run_dir: str | Path) -> tuple[Path, JobSpec, dict[str, Any]]:
    """The spec and summary of a finished run."""
    run = Path(run_dir)
    spec = load_run_spec(run)
    summary_path = run / SUMMARY
    if not summary_path.is_file():
        raise FtError(f"{run}: the run has not finished (no {SUMMARY}); resume it with `ftcluster train --resume`")
    return run, spec, json.loads(summary_path.read_text())


def final_weights(run: Path) -> tuple[Path, bool]:
    """The fine-tuned weights folder and whether it is a PEFT adapter."""
    adapter, model = run / FINAL / "adapter", run / FINAL / "model"
    if adapter.is_dir():
        return adapter, True
    if model.is_dir():
        return model, False
    raise FtError(f"{run}/final: no adapter/ or model/ folder; the run did not save its weights")
