"""Several workers on CPU (gloo): DDP and DeepSpeed ZeRO give the curve of one big-batch worker."""

import contextlib

import pytest
from conftest import read_metrics, train_losses
from run_rewind import rewind


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from ftcluster.launch.launcher import init_ray

    init_ray(None)
    yield ray
    ray.shutdown()


def two_worker_run(make_job, name, **sections):
    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_with_ray

    job = make_job(name, scaling={"num_workers": 2, "cpus_per_worker": 1}, **sections)
    return run_with_ray(load_spec(job))


@pytest.mark.slow
def test_ddp_two_workers_equal_one_worker_with_double_batch(local_ray, make_job, tmp_path):
    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_in_process

    method = {"name": "full"}
    summary = two_worker_run(make_job, "ddp", method=method, training={"batch_size": 4, "max_steps": 4})
    assert summary["world_size"] == 2
    run_in_process(load_spec(make_job("single", method=method, training={"batch_size": 8, "max_steps": 4})))
    two, one = train_losses(tmp_path / "runs" / "ddp"), train_losses(tmp_path / "runs" / "single")
    assert two == pytest.approx(one, rel=1e-4)
    assert two[-1] < two[0]


@pytest.mark.parametrize("stage, packing", [pytest.param(2, False, marks=pytest.mark.slow), (3, True)])  # ZeRO-3 also runs the packing check
def test_deepspeed_zero_two_workers_equal_one_worker_with_double_batch(stage, packing, local_ray, make_job, tmp_path):
    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_in_process

    method = {"name": "full"}
    training = {"max_steps": 4, "max_grad_norm": None}
    data = {"packing": packing}
    # Each worker evaluates its share (in lockstep under ZeRO-3, where every forward pass is a collective).
    evaluation = {"before_after": True, "generation": {"num_prompts": 7, "max_new_tokens": 4}}
    summary = two_worker_run(make_job, f"zero{stage}", method=method, training={"batch_size": 4, **training},
                             distributed={"backend": "deepspeed", "zero_stage": stage}, data=data, eval=evaluation)
    assert summary["world_size"] == 2
    single = run_in_process(load_spec(make_job("single", method=method, training={"batch_size": 8, **training},
                                               data=data, eval=evaluation)))
    two, one = train_losses(tmp_path / "runs" / f"zero{stage}"), train_losses(tmp_path / "runs" / "single")
    assert two == pytest.approx(one, rel=1e-4)
    for when in ("before", "after"):
        assert summary[when]["val_loss"] == pytest.approx(single[when]["val_loss"], rel=1e-4)
        assert summary[when]["exact_match"] == single[when]["exact_match"]
    assert [s["output"] for s in summary["samples"]["before"]] == [s["output"] for s in single["samples"]["before"]]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / f"zero{stage}" / "final" / "model")


def ray_train_workers() -> list:
    """The Ray Train worker processes of the local Ray this test process started."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.name().startswith("ray::RayTrainWorker")]


def ray_registered_a_checkpoint(out) -> bool:
    """Ray Train's controller has registered a reported checkpoint (its snapshot in OUT/ray names one).

    A checkpoint reaches the controller only at its next poll of the workers (every ~2 s): one
    reported just before a worker dies is lost with it, and the restart begins at step 0."""
    import json

    for snapshot in (out / "ray").glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except ValueError:  # being written
            pass
    return False


def while_training(out, steps: int, action, timeout: float = 180.0, registered: bool = False):
    """Run `action(workers)` from another thread once OUT/metrics.jsonl shows `steps` logged steps
    (and, with `registered`, Ray has registered a checkpoint)."""
    import threading
    import time

    def watch() -> None:
        deadline = time.monotonic() + timeout
        metrics = out / "metrics.jsonl"
        while time.monotonic() < deadline:
            if (metrics.is_file() and sum('"train_loss"' in line for line in metrics.read_text().splitlines()) >= steps
                    and (not registered or ray_registered_a_checkpoint(out))):
                action(ray_train_workers())
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def kill_and_compare(make_job, tmp_path, name, steps: int, kill_after: int, **sections):
    """A worker process is killed (SIGKILL, from outside) mid-run; Ray restarts the group, which
    resumes from the latest checkpoint Ray has registered; the final losses equal an uninterrupted run's."""
    training = {"max_steps": steps, "checkpoint_every": 2, "max_failures": 1, "batch_size": 4}
    two_worker_run(make_job, f"{name}-whole", training=training, **sections)
    out = tmp_path / "runs" / f"{name}-killed"
    watcher = while_training(out, kill_after, lambda workers: workers[-1].kill(), registered=True)
    summary = two_worker_run(make_job, f"{name}-killed", training=training, **sections)
    watcher.join()
    assert summary["steps"] == steps
    assert summary["resumed_from_step"] in range(2, steps, 2)  # the group really restarted from a checkpoint
    metrics_steps = [r["step"] for r in read_metrics(out) if "train_loss" in r]
    assert metrics_steps == list(range(1, steps + 1))  # the failed attempt's extra steps were rolled back
    whole = train_losses(tmp_path / "runs" / f"{name}-whole")
    assert train_losses(out) == pytest.approx(whole, rel=1e-5)


@pytest.mark.slow
def test_worker_killed_mid_run_restarts_and_matches(local_ray, make_job, tmp_path):
    kill_and_compare(make_job, tmp_path, "ddp-ft", 12, 4, method={"name": "full"})


@pytest.mark.slow
def test_lora_under_deepspeed_resumes_after_a_worker_dies(local_ray, make_job, tmp_path):
    kill_and_compare(make_job, tmp_path, "ds-lora", 24, 3, distributed={"backend": "deepspeed", "zero_stage": 2})


@pytest.mark.slow
def test_stuck_peer_ends_the_attempt_with_rank_and_operation(local_ray, make_job, tmp_path):
    """A worker frozen with SIGSTOP (a hung GPU, from the others' point of view): its peer's next
    collective times out and the run ends with one line naming that worker and the operation."""
    import signal

    from ftcluster.core.errors import FtError

    stopped: list = []

    def freeze(workers) -> None:
        stopped.append(workers[-1])
        workers[-1].send_signal(signal.SIGSTOP)

    watcher = while_training(tmp_path / "runs" / "stuck", 2, freeze)
    try:
        with pytest.raises(FtError, match=r"worker [01] of 2: .+ at step \d+ failed after waiting up to "
                                          r"distributed.timeout_s=10s: a peer is stuck or gone"):
            two_worker_run(make_job, "stuck", method={"name": "full"}, training={"max_steps": 400},
                           distributed={"timeout_s": 10})
    finally:
        watcher.join()
        for process in stopped:
            with contextlib.suppress(Exception):
                process.kill()


@pytest.mark.slow
def test_zero3_save_resume_export_round_trip(local_ray, make_job, cli, tmp_path):
    """ZeRO-3 sharded checkpoints: resume equals uninterrupted; a checkpoint consolidates into a
    plain transformers folder with the same logits as a run that stopped at that step."""

    import torch
    from transformers import AutoModelForCausalLM

    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_with_ray

    zero3 = {"backend": "deepspeed", "zero_stage": 3}
    training = {"max_steps": 4, "checkpoint_every": 2, "batch_size": 4}
    job = make_job("z3", method={"name": "full"}, training=training, distributed=zero3)
    run_with_ray(load_spec(job))
    out = tmp_path / "runs" / "z3"
    whole = train_losses(out)
    assert (out / "checkpoints" / "step-0000002" / "deepspeed").is_dir()  # DeepSpeed's sharded form
    rewind(str(out), 2)  # as if it had stopped after step 2's checkpoint
    summary = run_with_ray(load_spec(job), resume=True)
    assert summary["resumed_from_step"] == 2
    assert train_losses(out) == pytest.approx(whole, rel=1e-5)

    exported = tmp_path / "z3-step2"
    assert cli("export", out, "--checkpoint", "step-0000002", "--out", exported).code == 0
    stopped = make_job("z3-two", method={"name": "full"}, training={**training, "max_steps": 2}, distributed=zero3)
    run_with_ray(load_spec(stopped))
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        from_checkpoint = AutoModelForCausalLM.from_pretrained(exported)(ids).logits
        from_run = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "z3-two" / "final" / "model")(ids).logits
    torch.testing.assert_close(from_checkpoint, from_run, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_zero3_workers_never_hold_a_full_copy(local_ray, make_job, tmp_path_factory):
    """2 ZeRO-3 workers load a ~800 MB model: each worker's peak while loading stays well below
    its runtime plus one full copy (a plain load under ZeRO-3 costs a full copy per worker);
    the expected cost is half the model (its shard) plus about 100 MB of gathering buffers."""
    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_with_ray
    from ftcluster.models.tiny import make_tiny_llama

    folder = make_tiny_llama(tmp_path_factory.mktemp("big") / "llama-200m", hidden_size=1024, layers=16,
                             heads=16, kv_heads=16, intermediate_size=2816)
    model_mb = (folder / "model.safetensors").stat().st_size / 2**20
    assert model_mb > 750
    job = make_job("z3-memory", model={"path": str(folder)}, method={"name": "full"},
                   training={"max_steps": 1, "batch_size": 4}, distributed={"backend": "deepspeed", "zero_stage": 3})
    summary = run_with_ray(load_spec(job, ["scaling.num_workers=2"]))
    load_cost = summary["load_peak_memory_mb"] - summary["rss_before_model_mb"]
    assert load_cost < 0.8 * model_mb, (load_cost, model_mb)  # measured here: 0.66


@pytest.mark.slow
def test_zero3_with_cpu_offload_trains(local_ray, make_job, tmp_path):
    """Optimizer and parameter offload (DeepSpeed's CPU Adam is compiled on first use)."""
    summary = two_worker_run(make_job, "offload", method={"name": "full"}, training={"max_steps": 4, "batch_size": 4},
                             distributed={"backend": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu",
                                          "offload_params": "cpu"})
    losses = train_losses(tmp_path / "runs" / "offload")
    assert summary["steps"] == 4 and losses[-1] < losses[0]


@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow), "qlora"])
def test_adapters_under_zero3(method, local_ray, make_job, tmp_path, tiny_model):
    """LoRA, and QLoRA (4-bit storage dtype = compute dtype, as ZeRO-3 needs), on 2 ZeRO-3 workers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = two_worker_run(make_job, f"z3-{method}", method={"name": method}, training={"max_steps": 3},
                             distributed={"backend": "deepspeed", "zero_stage": 3})
    assert summary["steps"] == 3 and summary["trainable_params"] < summary["total_params"] / 2
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                              tmp_path / "runs" / f"z3-{method}" / "final" / "adapter")


@pytest.mark.slow
def test_zero3_counts_and_flops_see_whole_parameters(local_ray, make_job, tmp_path):
    """Under ZeRO-3 a worker holds partitions; parameter counts and FLOPs must use full sizes."""
    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_in_process

    sharded = two_worker_run(make_job, "z3-count", method={"name": "full"}, training={"max_steps": 1},
                             distributed={"backend": "deepspeed", "zero_stage": 3})
    whole = run_in_process(load_spec(make_job("one-count", method={"name": "full"}, training={"max_steps": 1})))
    assert sharded["total_params"] == whole["total_params"] == sharded["trainable_params"]
    assert sharded["flops_per_token"] == whole["flops_per_token"]
