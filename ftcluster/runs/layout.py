"""File names inside a run folder (shared by the loop that writes them and the commands that read them)."""

import json
from pathlib import Path

RUN_SPEC = "run.yaml"  # the resolved job spec the run used
METRICS = "metrics.jsonl"  # one JSON object per log / evaluation step
SUMMARY = "summary.json"  # written last: its presence means the run finished
EVAL_BEFORE = "eval_before.json"
EVAL_AFTER = "eval_after.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"  # adapter/ or model/, tokenizer/, labels.json
LABELS = "labels.json"  # class names of a classification run, in head order
RUN_LOCK = ".lock"  # held by the one `train` writing the run (runs/lock.py)

# Inside OUTPUT/checkpoints: step-0000120/ folders and a `latest` file naming the newest complete one.
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its presence means complete


def checkpoint_name(step: int) -> str:
    """The folder name of a step's checkpoint: step-0000120."""
    return f"step-{step:07d}"


def checkpoint_step(folder: Path) -> int:
    """The step a complete checkpoint folder holds."""
    return json.loads((folder / TRAINER_STATE).read_text())["step"]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (OUTPUT/checkpoints), or None."""
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    return path if (path / TRAINER_STATE).is_file() else None
