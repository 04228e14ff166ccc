"""Silent collapse: a run whose weights explode or whose loss climbs back to a uniform guess stops as a
diverged run does (one line, exit 2, no final weights), instead of "completing" with a useless model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import read_metrics
from test_reliability import TRACEBACK
from test_reliability import one_line_error as one_line


def test_exploding_weights_stop_the_run_in_one_line(make_job, cli, tmp_path):
    """lr=1e4: Adam moves every weight by ~1e4 a step; the loss sits at ln(vocab), never NaN."""
    job = make_job("collapse", training={"max_steps": 20, "checkpoint_every": 1000})
    result = cli("train", job, "--no-ray", "training.lr=1e4")
    one_line(result, "collapsed at step 1", "trainable weights", "training.max_weight_growth", "training.lr")
    assert "skip_nonfinite_steps" not in result.err
    out = tmp_path / "runs" / "collapse"
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    assert read_metrics(out)[-1]["stop_reason"] == "collapsed at step 1"


def test_healthy_runs_are_not_taken_for_collapse(make_job, cli, tmp_path):
    """A high but sane lr (full fine-tune, 1e-2) trains on; the guard can be switched off."""
    job = make_job("sane", method={"name": "full"}, training={"max_steps": 12, "lr": 1e-2})
    assert cli("train", job, "--no-ray").code == 0
    off = make_job("off", training={"max_steps": 3, "max_weight_growth": None, "lr": 1e4})
    assert cli("train", off, "--no-ray").code == 0


def test_a_loss_back_at_a_uniform_guess_after_warmup_is_collapse():
    """The loss had been below ln(vocab) (the model knew something); after warmup a window at or above
    it stops the run; before warmup, or for a model that never got below it, nothing happens."""
    from ftcluster.training.health import CollapseGuard, DivergedError

    chance = math.log(256)
    guard = CollapseGuard(max_weight_growth=100.0, warmup_steps=5, chance_loss=chance)
    guard.check_loss(1, chance + 0.1)  # a random model starts at a uniform guess: no verdict
    guard.check_loss(2, chance - 0.1)  # and wanders around it
    guard.check_loss(3, 2.0)
    guard.check_loss(4, chance + 1)  # during warmup
    guard.check_loss(6, chance - 0.01)  # worse, but below a uniform guess
    with pytest.raises(DivergedError, match=r"collapsed at step 6: the training loss 5\.55\d* is at or above"):
        guard.check_loss(6, chance + 0.01)
    resumed = CollapseGuard(100.0, 5, chance, state=guard.state())
    with pytest.raises(DivergedError):
        resumed.check_loss(7, chance)
    never = CollapseGuard(100.0, 0, chance)
    for step in range(1, 10):
        never.check_loss(step, chance + 0.05)
    assert json.loads(json.dumps(guard.state())) == guard.state()


def test_weight_growth_is_measured_against_the_start():
    from ftcluster.training.health import CollapseGuard, DivergedError

    model = torch.nn.Linear(4, 4)
    guard = CollapseGuard(max_weight_growth=10.0, warmup_steps=0, chance_loss=None)
    guard.check_weights(model, 0, torch.device("cpu"), 1)
    with torch.no_grad():
        model.weight.mul_(5)
    guard.check_weights(model, 1, torch.device("cpu"), 1)
    with torch.no_grad():
        model.weight.mul_(5)
        model.bias.mul_(25)
    with pytest.raises(DivergedError, match="collapsed at step 2: the trainable weights' RMS grew"):
        guard.check_weights(model, 2, torch.device("cpu"), 1)


@pytest.mark.integration
def test_divergence_under_ray_is_one_line_without_tracebacks(make_job, tmp_path):
    """Ray's worker and controller log a worker's error with its traceback; an ftcluster error is the
    driver's one line only."""
    import subprocess
    import sys

    from conftest import REPO

    job = make_job("ray-nan", training={"max_steps": 6, "lr": 1e30, "max_weight_growth": None})
    process = subprocess.run([sys.executable, "-m", "ftcluster.cli.app", "train", str(job)], cwd=tmp_path,
                             env={**__import__("os").environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                             timeout=300)
    assert process.returncode == 2, process.stderr[-3000:]
    assert TRACEBACK not in process.stdout + process.stderr, process.stderr[-3000:]
    mentions = [line for line in process.stderr.splitlines() if "diverged at step 2" in line]
    assert len(mentions) == 1 and mentions[0].startswith("error: training diverged at step 2"), process.stderr[-3000:]


def test_the_ray_log_filter_knows_every_user_error_class():
    """core/quiet.py drops Ray's logs of the exceptions the CLI prints as one line, by class name."""
    import importlib
    import pkgutil

    import ftcluster
    from ftcluster.core.errors import FtError
    from ftcluster.core.interrupts import Interrupted
    from ftcluster.core.quiet import USER_ERRORS

    found = {FtError.__name__, Interrupted.__name__}
    for module in pkgutil.walk_packages(ftcluster.__path__, "ftcluster."):
        try:
            loaded = importlib.import_module(module.name)
        except ImportError:  # an optional extra
            continue
        found |= {value.__name__ for value in vars(loaded).values()
                  if isinstance(value, type) and issubclass(value, (FtError, Interrupted))}
    assert found <= set(USER_ERRORS), found - set(USER_ERRORS)
