"""A run folder: what `train` writes there, and how `eval` / `export` read it back.

    OUTPUT/run.yaml          the resolved job spec the run used
    OUTPUT/metrics.jsonl     one JSON object per log / evaluation step
    OUTPUT/checkpoints/      resumable checkpoints (step-N/, latest)
    OUTPUT/final/            adapter/ (PEFT) or model/ (full, freeze), and tokenizer/
    OUTPUT/eval_before.json, eval_after.json, summary.json
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftcluster.config.spec import JobSpec, dump_spec, load_spec
from ftcluster.core.atomic import write_text_atomic
from ftcluster.core.checksums import safetensors_problem
from ftcluster.core.errors import FtError
from ftcluster.runs.layout import (
    CHECKPOINTS,
    EVAL_AFTER,
    EVAL_BEFORE,
    FINAL,
    METRICS,
    RUN_SPEC,
    SUMMARY,
    latest_checkpoint,
)
from ftcluster.runs.mirror import clear_remote_run, open_run, push_run_files, remote_latest, remote_of
from ftcluster.runs.paths import RunPaths

# A run that replaces an earlier one (output.overwrite) parks the earlier run's files here until it
# completes; a failed replacement puts them back and keeps its own attempt in OUTPUT/failed.
PREVIOUS = ".previous"
FAILED = "failed"
RUN_FILES = (RUN_SPEC, SUMMARY, EVAL_BEFORE, EVAL_AFTER, METRICS, FINAL, CHECKPOINTS)


def check_output(spec: JobSpec, resume: bool, force: bool = False) -> Path:
    """Check that the run folder may be used (it is created, and probed for writing, if need be).

    A fresh run never writes over a folder that holds another run's results or checkpoints,
    unless ``output.overwrite`` is set; ``--resume`` of a finished run needs ``force``.
    """
    out = RunPaths.of(spec).local
    remote = remote_of(spec)
    if remote is not None:  # a run in storage: the store is what counts, not this machine's copy
        remote.probe_writable()
        summary = remote.read_text(SUMMARY)
        _check_reuse(spec, remote.uri, resume, force, has_checkpoint=remote_latest(remote) is not None,
                     summary=summary, has_checkpoints=remote.exists(CHECKPOINTS))
        return out
    _check_writable(out)
    summary_path = out / SUMMARY
    _check_reuse(spec, str(out), resume, force, has_checkpoint=latest_checkpoint(out / CHECKPOINTS) is not None,
                 summary=summary_path.read_text() if summary_path.is_file() else None,
                 has_checkpoints=(out / CHECKPOINTS).exists())
    return out


def _check_reuse(spec: JobSpec, where: str, resume: bool, force: bool, *, has_checkpoint: bool, summary: str | None,
                 has_checkpoints: bool) -> None:
    """--resume needs a complete checkpoint (and, for a finished run, more steps or ``force``); a fresh
    run refuses a folder that holds a run unless ``output.overwrite``."""
    if resume:
        if not has_checkpoint:
            raise FtError(f"--resume: {where}/checkpoints has no complete checkpoint to resume from")
        if summary is not None and not force:
            done = json.loads(summary)
            wanted = spec.training.max_steps
            if wanted is None or wanted <= done.get("steps", 0):
                raise FtError(f"--resume: {where} holds a finished run ({done.get('steps')} steps, "
                              f"{done.get('stop_reason')}); raise training.max_steps to train further, "
                              "or add --force to retrain from its last checkpoint")
    elif not spec.output.overwrite and (summary is not None or has_checkpoints):
        raise FtError(
            f"output.dir: {where} already holds a run; use --resume to continue it (`ftcluster submit`: "
            "--resume JOB_ID), "
            f"output.overwrite=true to replace it, or another output.dir"
        )


def _check_writable(out: Path) -> None:
    """output.dir must be a folder this process can write: one line instead of a traceback later."""
    if out.exists() and not out.is_dir():
        raise FtError(f"output.dir: {out} is a file, not a folder; choose another output.dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise FtError(f"output.dir: cannot write in {out} ({exc.strerror}); choose a writable output.dir") from None


@contextlib.contextmanager
def replacing_earlier_run(spec: JobSpec, resume: bool) -> Iterator[None]:
    """Run a launch that may replace an earlier run (output.overwrite) without losing it if the new one fails.

    The earlier run's files move to OUTPUT/.previous; they are dropped once the new run completes,
    and put back (the failed attempt moving to OUTPUT/failed) if it ends with an error. An interrupt
    leaves the new attempt in place for --resume.
    """
    out = RunPaths.of(spec).local
    previous = out / PREVIOUS
    if resume or not spec.output.overwrite or RunPaths.of(spec).uri:  # (a URI's earlier run is replaced at the start)
        yield
        return
    present = [name for name in RUN_FILES if (out / name).exists()]
    if present and not previous.exists():  # (if it exists, the folder holds an unfinished replacement)
        previous.mkdir()
        for name in present:
            os.replace(out / name, previous / name)
    try:
        yield
    except Exception as exc:
        if not previous.exists():
            raise
        _put_back(out, previous)
        if not isinstance(exc, FtError):
            raise
        raise type(exc)(f"{exc} (the earlier run in {out} is kept as it was; this attempt is in {out / FAILED})") from None
    shutil.rmtree(previous, ignore_errors=True)


def _put_back(out: Path, previous: Path) -> None:
    failed = out / FAILED
    shutil.rmtree(failed, ignore_errors=True)
    failed.mkdir()
    for name in RUN_FILES:
        if (out / name).exists():
            os.replace(out / name, failed / name)
    for item in previous.iterdir():
        os.replace(item, out / item.name)
    previous.rmdir()


def start_output(spec: JobSpec, resume: bool) -> Path:
    """Called once data and model have loaded: clear a replaced run's results, record the spec.

    Doing this only after the inputs proved good means a bad input never damages earlier outputs.
    """
    out = RunPaths.of(spec).local
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in RUN_FILES:
            if name == RUN_SPEC:
                continue  # rewritten atomically below
            path = out / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    write_text_atomic(out / RUN_SPEC, dump_spec(spec))
    if not resume:
        clear_remote_run(spec)
    push_run_files(spec)
    return out


def load_run_spec(run_dir: str | Path) -> JobSpec:
    """The spec a run (finished or not) was started with."""
    run = open_run(run_dir)
    if not (run / RUN_SPEC).is_file():
        raise FtError(f"{run}: not a run folder (no {RUN_SPEC}); pass the output.dir of a `ftcluster train` run")
    return load_spec(run / RUN_SPEC)


def load_run(run_dir: str | Path) -> tuple[Path, JobSpec, dict[str, Any]]:
    """The spec and summary of a finished run (a local folder, or a storage URI fetched to this machine)."""
    run = open_run(run_dir)
    spec = load_run_spec(run)
    summary_path = run / SUMMARY
    if not summary_path.is_file():
        raise FtError(f"{run}: the run has not finished (no {SUMMARY}); resume it with `ftcluster train --resume`")
    return run, spec, json.loads(summary_path.read_text())


def final_weights(run: Path) -> tuple[Path, bool]:
    """The fine-tuned weights folder and whether it is a PEFT adapter."""
    adapter, model = run / FINAL / "adapter", run / FINAL / "model"
    if adapter.is_dir():
        _require_weights(adapter, "adapter_config.json", "adapter_model.safetensors")
        return adapter, True
    if model.is_dir():
        _require_weights(model, "config.json", "model.safetensors")
        return model, False
    raise FtError(f"{run}/final: no adapter/ or model/ folder; the run did not save its weights")


def _require_weights(folder: Path, config: str, weights: str) -> None:
    """A weights folder with its files missing or damaged is an error here, not a hub lookup of the folder's
    name or a safetensors traceback."""
    files = sorted(folder.glob(weights.replace(".safetensors", "*.safetensors")))
    for name, present in ((config, (folder / config).is_file()), (weights, bool(files))):
        if not present:
            raise FtError(f"{folder}: {name} is missing; the run's weights are incomplete "
                          f"(re-run it, or export a checkpoint with --checkpoint)")
    for file in files:
        problem = safetensors_problem(file)
        if problem is not None:
            raise FtError(f"{file}: damaged, {problem}; the run's weights cannot be read "
                          "(re-run it, or export a checkpoint with --checkpoint)")
