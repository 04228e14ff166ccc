"""Signals under Ray Train, from outside: SIGTERM to one worker of two (a drained node, an evicted pod)
checkpoints the group at the next step boundary and stops it in one line, exit 143; with max_failures,
the group restarts from that checkpoint instead and the run completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, read_metrics

pytestmark = pytest.mark.integration
TRACEBACK = "Traceback"


def start_train(job, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ftcluster.cli.app", "train", str(job)], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def train_workers(process: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(process.pid).children(recursive=True) if p.name().startswith("ray::RayTrainWorker")]


def wait_for_steps(out: Path, steps: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if (out / "metrics.jsonl").is_file() and sum(1 for r in read_metrics(out) if "train_loss" in r) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {steps} logged steps within {timeout}s")


def test_sigterm_to_one_of_two_workers_checkpoints_and_stops_in_one_line(make_job, tmp_path):
    job = make_job("one-worker", training={"max_steps": 100000, "checkpoint_every": 1000}, scaling={"num_workers": 2})
    process = start_train(job, tmp_path)
    out = tmp_path / "runs" / "one-worker"
    wait_for_steps(out, 3, process)
    train_workers(process)[-1].send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 143, stderr[-3000:]
    assert TRACEBACK not in stdout + stderr, stderr[-3000:]
    ours = [line for line in stderr.splitlines() if "SIGTERM" in line or line.startswith("error")]
    assert len(ours) == 1 and ours[0].startswith("interrupted (SIGTERM) at step "), stderr[-3000:]
    step = int(ours[0].split("at step ")[1].split(";")[0])
    checkpoint = out / "checkpoints" / f"step-{step:07d}"
    assert f"checkpoint: {checkpoint}" in ours[0] and (checkpoint / "trainer_state.json").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step


@pytest.mark.slow
def test_sigterm_to_one_worker_with_max_failures_restarts_from_its_checkpoint(make_job, tmp_path):
    job = make_job("restart", training={"max_steps": 60, "checkpoint_every": 1000, "max_failures": 1},
                   scaling={"num_workers": 2})
    process = start_train(job, tmp_path)
    out = tmp_path / "runs" / "restart"
    wait_for_steps(out, 3, process)
    train_workers(process)[-1].send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and 3 <= summary["resumed_from_step"] < 60

