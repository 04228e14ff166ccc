"""`train --resume` with a changed spec: a change the checkpoint cannot carry (model, method, DeepSpeed layout)
is refused in one line naming the keys, the run left as it was; any other goes on, named in one line."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from conftest import train_losses

TRACEBACK = "Traceback"


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def interrupted(make_job, cli, tmp_path):
    """A run stopped after 4 of its steps (max_steps=4, then resumed with more), with a checkpoint."""
    job = make_job("changing", training={"max_steps": 4, "checkpoint_every": 2})
    assert cli("train", job, "--no-ray").code == 0
    return job, tmp_path / "runs" / "changing"


@pytest.mark.parametrize("change, keys", [
    (["method.lora.rank=8"], ["method.lora.rank (4 -> 8)"]),
    (["method.name=dora"], ["method.name ('lora' -> 'dora')"]),
    (["model.path=OTHER"], ["model.path"]),
    (["method.lora.alpha=4", "method.lora.rank=2"], ["method.lora.alpha (8.0 -> 4.0)", "method.lora.rank (4 -> 2)"]),
])
def test_a_change_the_checkpoint_cannot_carry_is_refused_naming_the_keys(change, keys, interrupted, cli, tmp_path):
    job, out = interrupted
    if "model.path=OTHER" in change:
        from ftcluster.models.tiny import make_tiny_llama

        change = [f"model.path={make_tiny_llama(tmp_path / 'other-llama')}"]
    before = snapshot(out)
    result = cli("train", job, "--no-ray", "--resume", "training.max_steps=6", *change)
    assert result.code == 2, result
    assert TRACEBACK not in result.out + result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --resume:"), lines
    for key in keys:
        assert key in lines[0], (key, lines[0])
    assert "training.max_steps" not in lines[0]
    assert snapshot(out) == before


def test_a_change_it_can_carry_goes_on_and_is_named(interrupted, cli):
    job, out = interrupted
    result = cli("train", job, "--no-ray", "--resume", "training.max_steps=6", "training.lr=0.002",
                 "training.batch_size=2")
    assert result.code == 0, result
    named = [line for line in result.out.splitlines() if line.startswith("--resume: continuing with values")]
    assert len(named) == 1, result.out
    for key in ("training.lr (0.001 -> 0.002)", "training.batch_size (4 -> 2)", "training.max_steps (4 -> 6)"):
        assert key in named[0], named[0]
    assert len(train_losses(out)) == 6


def test_the_same_spec_resumes_without_a_word(interrupted, cli):
    job, _ = interrupted
    result = cli("train", job, "--no-ray", "--resume", "--force")
    assert result.code == 0, result
    assert "--resume: continuing with values" not in result.out


def test_paths_made_absolute_by_the_launch_are_no_change(tiny_model, tiny_data):
    from ftcluster.config.spec import build_spec
    from ftcluster.runs.resume_spec import changed_keys

    raw = {"name": "p", "model": {"path": str(tiny_model)}, "data": {"train": str(tiny_data["train"])},
           "output": {"dir": "runs/p"}}
    relative = build_spec({**raw, "data": {"train": os.path.relpath(tiny_data["train"])}})
    assert changed_keys(build_spec(raw), relative) == {}
