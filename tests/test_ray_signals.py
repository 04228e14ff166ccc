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


def stopped_by_sigterm_in_one_line(process: subprocess.Popen, out: Path) -> int:
    """The run ended with exit 143 and one line naming the step and its checkpoint (no traceback): that step."""
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 143, stderr[-3000:]
    assert TRACEBACK not in stdout + stderr, stderr[-3000:]
    ours = [line for line in stderr.splitlines() if "SIGTERM" in line or line.startswith("error")]
    assert len(ours) == 1 and ours[0].startswith("interrupted (SIGTERM) at step "), stderr[-3000:]
    step = int(ours[0].split("at step ")[1].split(";")[0])
    checkpoint = out / "checkpoints" / f"step-{step:07d}"
    assert f"checkpoint: {checkpoint}" in ours[0] and (checkpoint / "trainer_state.json").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step
    return step


def logged_steps(out: Path) -> int:
    return sum(1 for record in read_metrics(out) if "train_loss" in record)


def test_sigterm_to_one_of_two_workers_checkpoints_and_stops_in_one_line(make_job, tmp_path):
    job = make_job("one-worker", training={"max_steps": 100000, "checkpoint_every": 1000}, scaling={"num_workers": 2})
    process = start_train(job, tmp_path)
    out = tmp_path / "runs" / "one-worker"
    wait_for_steps(out, 3, process)
    train_workers(process)[-1].send_signal(signal.SIGTERM)
    stopped_by_sigterm_in_one_line(process, out)


def test_sigterm_to_the_whole_process_group_checkpoints_and_stops_in_one_line(make_job, tmp_path):
    """What `kill -TERM -PGID`, a terminal or some container inits send: every process of the command's
    group. Ray's services, in the driver's session, never get it; the driver stops the workers at the
    next step boundary with a checkpoint, and --resume continues from it."""
    training = {"max_steps": 100000, "checkpoint_every": 1000}
    job = make_job("group", training=training, scaling={"num_workers": 2})
    process = start_train(job, tmp_path)
    out = tmp_path / "runs" / "group"
    wait_for_steps(out, 3, process)
    signalled_at = time.time()
    os.killpg(process.pid, signal.SIGTERM)  # (start_train's process leads its own group)
    step = stopped_by_sigterm_in_one_line(process, out)
    [last] = [record for record in read_metrics(out) if record.get("step") == step and "train_loss" in record]
    assert last["time"] - signalled_at < 5.0  # a step boundary soon after (workers ask once a second), not minutes on
    resumed = subprocess.run([sys.executable, "-m", "ftcluster.cli.app", "train", str(job), "--resume",
                              f"training.max_steps={step + 2}"], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stdout and logged_steps(out) == step + 2


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

