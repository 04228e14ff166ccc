"""Under Ray Train, checkpoints are copied to Ray's storage in the background while training goes on:
pruning old checkpoints (training.keep_checkpoints) must never delete one that is still being copied."""

from __future__ import annotations

import pytest
from conftest import train_losses

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from ftcluster.launch.launcher import init_ray

    init_ray(None)
    yield ray
    ray.shutdown()


def test_many_short_checkpoint_intervals_never_race_the_background_copy(local_ray, make_job, tmp_path):
    """A checkpoint every step, keeping one: each is pruned while Ray may still be copying it."""
    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_with_ray

    job = make_job("race", training={"max_steps": 40, "checkpoint_every": 1, "keep_checkpoints": 1, "batch_size": 16})
    summary = run_with_ray(load_spec(job))
    out = tmp_path / "runs" / "race"
    assert summary["steps"] == 40 and len(train_losses(out)) == 40
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step-0000040"], kept  # what keep_checkpoints says (the last step is one), and no copy left behind
