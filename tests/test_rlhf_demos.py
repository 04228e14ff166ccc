"""The RLHF demo jobs end to end on the real SmolLM2-135M-Instruct, as the README runs them (slow tier:
minutes each on 2 CPU cores). Their numbers are recorded in bench/RESULTS.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO


def run_demo(cli, job: str, run: Path) -> tuple[dict, dict]:
    """`ftcluster train jobs/JOB` into `run`: the summary's before and after metrics."""
    result = cli("train", REPO / "jobs" / job, f"output.dir={run}")
    assert result.code == 0, result
    summary = json.loads((run / "summary.json").read_text())
    return summary["before"], summary["after"]


@pytest.mark.slow
def test_the_reward_model_demo_ranks_held_out_pairs(cli, tmp_path):
    before, after = run_demo(cli, "reward-smollm2.yaml", tmp_path / "reward")
    assert before["pair_accuracy"] < 0.75 and after["pair_accuracy"] >= 0.9, (before, after)
    assert after["reward_margin"] > before["reward_margin"]


@pytest.mark.slow
def test_the_grpo_demo_learns_to_answer_with_the_answer_alone(cli, tmp_path):
    run = tmp_path / "grpo"
    before, after = run_demo(cli, "grpo-smollm2.yaml", run)
    assert before["val_reward"] < 0.3 and after["val_reward"] > 0.8, (before, after)
    samples = json.loads((run / "eval_after.json").read_text())["samples"]
    assert sum(sample["reward"] == 1.0 for sample in samples) >= len(samples) // 2  # most answers are the answer alone
