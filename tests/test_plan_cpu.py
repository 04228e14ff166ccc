"""The planner for CPU workers and ZeRO-3's working memory (what bench/zero3_scale.py measured), and the
capacity check that refuses a CPU job whose worker cannot fit the nodes' memory, in one line."""

import pytest
from conftest import REPO

from ftcluster.config.spec import build_spec
from ftcluster.planning.capacity import ClusterView, capacity_problems
from ftcluster.planning.plan import GB, memory_plan

DATA = str(REPO / "jobs" / "data" / "quickstart-train.jsonl")


def cpu_job(workers: int, **training) -> dict:
    """Full fine-tuning of the Llama-3.2-1B shape under ZeRO-3 on CPU workers, one per node."""
    return build_spec({
        "name": "cpu", "model": {"path": "llama-3.2-1b"}, "method": {"name": "full"},
        "data": {"train": DATA, "max_length": 64}, "training": {"batch_size": 1, **training},
        "scaling": {"num_workers": workers, "gpus_per_node": 1, "node_ram_gb": 64},
        "distributed": {"backend": "deepspeed", "zero_stage": 3},
    })


def test_cpu_workers_train_in_fp32_by_default_and_zero3_keeps_32_bit_weights():
    total = memory_plan(cpu_job(2)).total_params
    auto = memory_plan(cpu_job(2))
    bf16 = memory_plan(cpu_job(2, precision="bf16"))
    assert auto.gpu_bytes["weights"] == pytest.approx(total * 4 / 2)  # the loop's `auto` on CPU: fp32
    assert bf16.gpu_bytes["weights"] == pytest.approx(total * 2 / 2)
    assert "runtime" not in auto.gpu_bytes and auto.cpu  # no CUDA context on a CPU worker


def test_zero3_working_memory_live_weights_and_the_optimizer_step():
    plan = memory_plan(cpu_job(2, precision="bf16"))
    total = plan.total_params
    assert total > 1e9 and plan.gpu_bytes["live gathered weights"] == pytest.approx(1e9 * 2)  # DeepSpeed's limit
    assert plan.gpu_bytes["optimizer step"] == pytest.approx(total / 2 * 12)  # fp32 gradient + AdamW temporaries
    gpu = build_spec({**cpu_job(2, precision="bf16").model_dump(mode="json"),
                      "scaling": {"num_workers": 2, "use_gpu": True, "gpus_per_node": 1}})
    assert memory_plan(gpu).gpu_bytes["optimizer step"] == pytest.approx(total / 2 * 4)  # fused AdamW on GPUs
    host = plan.host_bytes_per_node
    assert host["training (1 workers)"] == pytest.approx(plan.gpu_total)  # a CPU worker's device is its host
    assert host["saving (rank 0's node)"] == 0  # the final save comes after the step, which needs more


def test_a_cpu_job_whose_worker_outgrows_every_node_is_refused_in_one_line():
    nodes = ClusterView([{"CPU": 1.0, "memory": 16 * GB}] * 2)
    one = memory_plan(cpu_job(1, precision="bf16"))
    problems = capacity_problems(cpu_job(1, precision="bf16"), nodes)
    assert problems == [problems[0]] and "\n" not in problems[0]
    assert problems[0].startswith(f"plan: one CPU worker needs {one.host_total / GB:.1f} GB of host RAM")
    assert "offers 16.0 GB to Ray" in problems[0] and "more workers (scaling.num_workers)" in problems[0]
    roomy = ClusterView([{"CPU": 1.0, "memory": 64 * GB}] * 2)
    assert capacity_problems(cpu_job(2, precision="bf16"), roomy) == []
    small_cpu = ClusterView([{"CPU": 1.0}] * 2)  # nodes that say nothing of their memory: nothing to check
    assert capacity_problems(cpu_job(1, precision="bf16"), small_cpu) == []


def test_a_worker_killed_from_outside_is_told_in_one_line():
    from ftcluster.launch.worker_deaths import DEAD_ACTOR, worker_death

    ray_text = (f"Training failed due to worker errors:\nA worker health check failed.\n  distributed_context="
                f"DistributedContext(world_rank=1, world_size=2)\n{DEAD_ACTOR}. Worker exit type: SYSTEM_ERROR")
    error = worker_death(RuntimeError(ray_text), cpu_job(2, precision="bf16"))
    assert error is not None and "\n" not in str(error)
    assert str(error).startswith("worker 1 of 2 died without an error: it was killed from outside, most likely by "
                                 "the kernel for memory")
    assert "the plan gives each worker" in str(error) and "GB of host RAM" in str(error)
    assert worker_death(RuntimeError("a bug in the loss"), cpu_job(2)) is None
