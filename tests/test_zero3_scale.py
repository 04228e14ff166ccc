"""ZeRO-3 where it matters, on CPU: a model whose training state does not fit one capped node trains when
sharded over two, and the one-worker job is refused before it starts, in one line.

The benchmark itself (bench/zero3_scale.py) at 121M parameters, on two `ray.cluster_utils` nodes of
4 GB each (memory cgroups, and what they advertise to Ray), with run storage in a folder the nodes share
(with the loopback S3 server the run stalled here, its driver busy for minutes, not yet diagnosed):
the planner's per-worker figure for one worker is above the nodes' memory, for two below it; the
sharded job trains with falling loss, checkpoints to the store and resumes from it with the same
losses; no process is killed by the cap; each worker's peak RSS is within the planner's figure.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import psutil
import pytest
from conftest import REPO
from memory_cage import unavailable

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
SIZE, CAP_GB, STEPS = "120m", 4.0, 2


def zero3_bench():
    location = REPO / "bench" / "zero3_scale.py"
    spec = importlib.util.spec_from_file_location("zero3_scale", location)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_model_too_big_for_one_node_trains_sharded_over_two_and_one_worker_is_refused(tmp_path, monkeypatch):
    if (why := unavailable()) is not None:
        pytest.skip(why)
    if psutil.virtual_memory().available < (2 * CAP_GB + 4) * 1e9:
        pytest.skip("needs two 4 GB nodes' worth of free memory")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.shutdown()  # an earlier module's in-process `ftcluster train` (same test process) leaves its local Ray running
    result = zero3_bench().run(SIZE, CAP_GB, STEPS, tmp_path, "folder")

    one, two = result["plan"]["1"]["per_worker_gb"], result["plan"]["2"]["per_worker_gb"]
    assert two < CAP_GB < one, (two, one)  # the planner: fits sharded, not on one worker
    refusal = result["refusal"]
    errors = [line for line in refusal["stderr"] if line.startswith("error:")]
    assert refusal["code"] == 2 and not any("Traceback" in line for line in refusal["stderr"]), refusal
    assert len(errors) == 1 and "plan: one CPU worker needs" in errors[0] and f"offers {CAP_GB:.1f} GB" in errors[0]

    assert set(result["oom_kills"].values()) == {0}  # nothing outgrew its node
    losses = [loss for _, loss in result["losses"]]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert result["resumed_from_step"] == STEPS // 2
    first = [loss for _, loss in result["first_launch_losses"]]
    assert losses == pytest.approx(first, rel=1e-4)  # the resumed launch logs the uninterrupted one's losses
    assert {"rank_0_", "rank_1_"} <= {part for key in result["stored_optimizer_shards"]
                                      for part in ("rank_0_", "rank_1_") if part in key}
    for launch in result["launches"]:
        for peak in launch["peak_rss_gb"].values():
            assert 0.6 * two <= peak <= two * 1.15, (peak, two)
