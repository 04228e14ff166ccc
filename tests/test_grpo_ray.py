"""GRPO under Ray: sampling in rollout actors (equal to sampling in the training worker; older weights
corrected by the actors' own log-probabilities; SIGTERM and --resume) and a sweep ranked by the held-out
reward. Apart from test_grpo.py so that the test processes share the Ray-heavy tests out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import test_grpo
from conftest import REPO, read_metrics
from test_grpo import grpo_job
from test_reliability import TRACEBACK, wait_for_steps

prompts = test_grpo.prompts  # the fixture: 40 training prompts, 8 held out


@pytest.mark.integration
def test_a_rollout_actor_samples_as_the_training_worker_would(make_job, cli, tmp_path, prompts):
    """One learner and one Ray rollout actor that gets the policy's weights before every rollout
    (sync_every 1): the same rollouts, losses and rewards as sampling in the training process."""
    rewards = [{"function": "test_grpo:ascii_share"}]
    here = grpo_job(make_job, "grpo-here", prompts, rewards, training={"max_steps": 3})
    actor = grpo_job(make_job, "grpo-actor", prompts, rewards, training={"max_steps": 3},
                     grpo={"rollout": {"workers": 1, "cpus_per_worker": 1}})
    assert cli("train", here, "--no-ray").code == 0
    result = cli("train", actor)
    assert result.code == 0, result
    assert "rollout: 1 actor(s) on 1 node(s)" in result.out
    logged = {name: [r for r in read_metrics(tmp_path / "runs" / name) if "reward" in r] for name in ("grpo-here", "grpo-actor")}
    assert len(logged["grpo-actor"]) == 3
    for key in ("train_loss", "reward", "kl", "completion_length"):
        assert [r[key] for r in logged["grpo-actor"]] == pytest.approx([r[key] for r in logged["grpo-here"]], rel=1e-4, abs=1e-7)


@pytest.mark.integration
def test_rollout_actors_with_older_weights_are_corrected_by_their_own_log_probabilities(make_job, cli, tmp_path, prompts):
    """sync_every 2: every second rollout is sampled with weights one update old. The ratio to the
    actor's own log-probabilities then moves away from 1 (clipping at a small clip_eps); a ratio taken
    against the learner's current weights would be exactly 1 and clip nothing."""
    job = grpo_job(make_job, "grpo-stale", prompts, [{"function": "test_grpo:ascii_share"}],
                   grpo={"clip_eps": 0.05, "rollout": {"workers": 1, "sync_every": 2, "cpus_per_worker": 1}},
                   training={"max_steps": 4, "log_every": 1})
    result = cli("train", job)
    assert result.code == 0, result
    clipped = [r["clip_fraction"] for r in read_metrics(tmp_path / "runs" / "grpo-stale") if "reward" in r]
    assert len(clipped) == 4 and clipped[0] == 0 and clipped[2] == 0  # rollouts 0 and 2: fresh weights
    assert clipped[1] > 0 and clipped[3] > 0, clipped


@pytest.mark.integration
def test_a_grpo_sweep_ranks_trials_by_the_held_out_reward(make_job, cli, tmp_path, prompts):
    """ftcluster tune over beta, lr, group size and temperature: each trial is a GRPO run, and the
    leaderboard orders them by their final val_reward, highest first."""
    import yaml

    job = grpo_job(make_job, "grpo-sweep", prompts, [{"function": "test_grpo:share_of_x"}],
                   training={"max_steps": 4, "log_every": 2}, eval={"every": 2}, scaling={"cpus_per_worker": 1})
    space = tmp_path / "grpo-space.yaml"
    space.write_text(yaml.safe_dump({"method.grpo.beta": {"choice": [0.0, 0.05]}, "training.lr": {"choice": [1e-4, 2e-2]},
                                     "method.grpo.group_size": {"choice": [2, 4]},
                                     "method.grpo.temperature": {"choice": [0.5, 1.0]}}))
    out = tmp_path / "grpo-sweep-out"
    result = cli("tune", job, space, "--trials", "2", "--concurrent", "2", "--scheduler", "none", "--out", out)
    assert result.code == 0, result
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["metric"] == "val_reward" and len(board["rows"]) == 2
    metrics = [row["metric"] for row in board["rows"]]
    assert metrics == sorted(metrics, reverse=True)
    for row in board["rows"]:
        summary = json.loads((out / "trials" / row["trial"] / "summary.json").read_text())
        assert summary["after"]["val_reward"] == pytest.approx(row["metric"])
        trial_spec = yaml.safe_load((out / "trials" / row["trial"] / "run.yaml").read_text())
        assert trial_spec["method"]["grpo"]["group_size"] == row["params"]["method.grpo.group_size"]


@pytest.mark.integration
def test_sigterm_with_a_rollout_actor_is_one_line_and_resume_matches_an_uninterrupted_run(make_job, cli, tmp_path,
                                                                                          prompts):

    rewards, training = [{"function": "test_grpo:ascii_share"}], {"max_steps": 30, "checkpoint_every": 2}
    job = grpo_job(make_job, "grpo-sig", prompts, rewards, training=training,
                   grpo={"rollout": {"workers": 1, "cpus_per_worker": 1}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}  # the reward's module
    process = subprocess.Popen([sys.executable, "-m", "ftcluster.cli.app", "train", str(job)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "runs" / "grpo-sig"
    wait_for_steps(out, 5, process, timeout=240)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert TRACEBACK not in stdout + stderr
    ours = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert len(ours) == 1 and "(SIGTERM)" in ours[0] and "--resume" in ours[0], stderr[-3000:]
    assert not (out / "summary.json").exists()

    resumed = cli("train", job, "--resume")
    assert resumed.code == 0 and "rollout: 1 actor(s)" in resumed.out, resumed
    whole = grpo_job(make_job, "grpo-sig-whole", prompts, rewards, training=training)
    assert cli("train", whole, "--no-ray").code == 0
    logged = {name: {r["step"]: r for r in read_metrics(tmp_path / "runs" / name) if "reward" in r}
              for name in ("grpo-sig", "grpo-sig-whole")}
    assert sorted(logged["grpo-sig"]) == list(range(1, 31))
    for key in ("train_loss", "reward"):
        assert [logged["grpo-sig"][step][key] for step in range(1, 31)] == pytest.approx(
            [logged["grpo-sig-whole"][step][key] for step in range(1, 31)], rel=1e-4, abs=1e-7)
