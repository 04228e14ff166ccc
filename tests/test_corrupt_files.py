"""Damaged files found before they are used: a truncated final adapter (eval, export --merge), a damaged
tokenized-data cache entry (rebuilt, saying so), a checkpoint changed since it was saved (refused)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import train_losses
from test_reliability import TRACEBACK
from test_reliability import one_line_error as one_line


def zero_bytes_mid_file(path: Path, count: int = 4) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(count) if any(data[middle:middle + count]) else b"\xff" * count
    path.write_bytes(bytes(data))


def truncate(path: Path, by: int) -> None:
    os.truncate(path, path.stat().st_size - by)


@pytest.fixture
def finished(make_job, cli, tmp_path):
    job = make_job("done", data={"cache_dir": str(tmp_path / "cache")}, training={"max_steps": 4, "checkpoint_every": 2})
    assert cli("train", job, "--no-ray").code == 0
    return job, tmp_path / "runs" / "done"


def test_a_truncated_final_adapter_is_one_line_in_eval_and_export(finished, cli, tmp_path):
    _, run = finished
    adapter = run / "final" / "adapter" / "adapter_model.safetensors"
    truncate(adapter, 100)
    one_line(cli("eval", run), str(adapter), "damaged")
    one_line(cli("export", run, "--merge", "--out", tmp_path / "merged"), str(adapter), "damaged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("damage", ["truncated", "random", "zeroed", "missing val"])
def test_a_damaged_cache_entry_is_rebuilt_saying_so(damage, finished, cli, tmp_path):
    job, run = finished
    losses = train_losses(run)
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    train, val = entry / "train.arrow", entry / "val.arrow"
    if damage == "truncated":
        truncate(train, 64)
    elif damage == "random":
        train.write_bytes(os.urandom(train.stat().st_size))
    elif damage == "zeroed":
        zero_bytes_mid_file(train)
    else:
        val.unlink()
    result = cli("train", job, "--no-ray", "output.overwrite=true")
    assert result.code == 0, result
    assert TRACEBACK not in result.out + result.err
    said = [line for line in result.out.splitlines() if "was damaged" in line]
    assert len(said) == 1 and ("val.arrow" if damage == "missing val" else "train.arrow") in said[0], result.out
    assert train_losses(run) == losses  # the same tokens as before the damage
    again = cli("train", job, "--no-ray", "output.overwrite=true")
    assert again.code == 0 and "was damaged" not in again.out and "from the cache" in again.out


def test_a_checkpoint_changed_since_it_was_saved_is_refused(finished, cli):
    job, run = finished
    weights = run / "checkpoints" / "step-0000002" / "model.safetensors"
    zero_bytes_mid_file(weights)
    (run / "checkpoints" / "latest").write_text("step-0000002\n")
    one_line(cli("train", job, "--no-ray", "--resume", "--force"), str(weights.parent), "model.safetensors",
             "checksum")
