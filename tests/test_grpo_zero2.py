"""GRPO learners under DeepSpeed ZeRO-2: two workers sample and train as one worker with twice the batch
(the DDP case is in test_grpo)."""

from __future__ import annotations

import json

import pytest
import test_grpo
from conftest import read_metrics
from test_grpo import grpo_job

prompts = test_grpo.prompts  # the fixture: 40 training prompts, 8 held out


@pytest.mark.integration
def test_two_zero2_workers_sample_and_train_as_one_with_twice_the_batch(make_job, cli, tmp_path, prompts):
    """Under Ray with DeepSpeed ZeRO-2 (gradients and optimizer state partitioned, every worker holding
    the whole model and sampling with it): each prompt's group is seeded by its index, so the rollouts,
    the losses, the logged rewards and the held-out greedy reward (each worker scoring its share) equal
    a single plain-torch worker's with twice the batch. ZeRO-2 steps the job's AdamW on each worker's
    partition and matches the plain run to rel 1e-4, so no 1-worker ZeRO-2 run is needed. Gradient
    clipping is off, as in the other ZeRO-2 comparisons (DeepSpeed clips by its own norm)."""
    rewards = [{"function": "test_grpo:ascii_share"}]
    training = {"max_steps": 3, "max_grad_norm": None}
    one = grpo_job(make_job, "grpo-one", prompts, rewards, training={"batch_size": 4, **training})
    two = grpo_job(make_job, "grpo-zero2", prompts, rewards, training={"batch_size": 2, **training},
                   scaling={"num_workers": 2}, distributed={"backend": "deepspeed", "zero_stage": 2})
    assert cli("train", one, "--no-ray").code == 0
    result = cli("train", two)
    assert result.code == 0, result
    runs = {name: tmp_path / "runs" / name for name in ("grpo-one", "grpo-zero2")}
    logged = {name: [r for r in read_metrics(run) if "reward" in r] for name, run in runs.items()}
    assert len(logged["grpo-zero2"]) == len(logged["grpo-one"]) == 3
    for key in ("train_loss", "reward", "kl", "completion_length"):
        assert [r[key] for r in logged["grpo-zero2"]] == pytest.approx([r[key] for r in logged["grpo-one"]],
                                                                       rel=1e-4, abs=1e-7), key
    after = {name: json.loads((run / "summary.json").read_text())["after"] for name, run in runs.items()}
    assert "val_reward" in after["grpo-one"] and after["grpo-zero2"] == pytest.approx(after["grpo-one"], rel=1e-4)
