"""A reward function that never returns: each call is bounded by method.grpo.reward_timeout_s (one line
naming the function and the prompt), and SIGTERM stops a run that waits on it (one line, exit 143)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, write_jsonl

TRACEBACK = "Traceback"
HANGING = '''
import os, time

def hangs(prompt, completion, reference):
    if os.environ.get("HANG_MARKER"):
        open(os.environ["HANG_MARKER"], "w").close()
    time.sleep(1e9)
'''


@pytest.fixture
def hung_job(make_job, tmp_path):
    (tmp_path / "hanging_rewards.py").write_text(HANGING)
    words = ["apple", "river", "cloud", "stone"]
    data = {"train": str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"write {w}", "reference": w} for w in words * 2])),
            "format": "prompts"}

    def make(timeout_s: float):
        grpo = {"group_size": 2, "max_new_tokens": 4, "beta": 0.0, "eval_prompts": 2, "reward_timeout_s": timeout_s,
                "rewards": [{"function": "hanging_rewards:hangs"}]}
        return make_job("hung", method={"name": "lora", "objective": "grpo", "grpo": grpo}, data=data,
                        training={"max_steps": 3, "batch_size": 2, "checkpoint_every": 1})

    return make


def test_a_reward_that_never_returns_ends_the_run_in_one_line(hung_job, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    result = cli("train", hung_job(1.0), "--no-ray")
    assert time.monotonic() - started < 60
    assert result.code == 2, result
    assert TRACEBACK not in result.out + result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert re.search(r"reward hanging_rewards:hangs did not return within method\.grpo\.reward_timeout_s=1 s "
                     r"\(prompt \d+: 'write \w+'\)", lines[0]), lines[0]


@pytest.mark.integration
def test_sigterm_stops_a_run_waiting_on_a_hung_reward(hung_job, tmp_path):
    marker = tmp_path / "hanging-now"
    process = subprocess.Popen([sys.executable, "-m", "ftcluster.cli.app", "train", str(hung_job(600)), "--no-ray"],
                               cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "HANG_MARKER": str(marker)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 143, stderr[-3000:]
    assert TRACEBACK not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGTERM)"), lines
