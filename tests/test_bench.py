"""The benchmarks still run (a tiny smoke run; the real numbers live in bench/RESULTS.md)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_overhead_benchmark_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "overhead.py"), "--model", "tiny", "--steps", "6",
                    "--warmup", "2", "--threads", "1", "--json", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    runners = [row["runner"] for row in result["rows"]]
    assert runners[0].startswith("hand-written") and len(runners) == 3
    assert all(row["tokens_per_s"] > 0 for row in result["rows"])


@pytest.mark.slow
def test_sweep_efficiency_benchmark_smoke(tmp_path):
    out = tmp_path / "sweep.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "sweep_efficiency.py"), "--smoke", "--json", str(out)],
                   check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["grid"]["steps"] == 4 * 8  # 4 trials run to completion
    assert 0 < result["asha"]["steps_to_target"] <= result["asha"]["steps_total"] <= result["grid"]["steps"]


@pytest.mark.slow
def test_gpu_throughput_benchmark_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "gpu_throughput.py"), "--smoke", "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["runner"]) for r in rows] == [("lora", "baseline"), ("lora", "ftcluster"),
                                                          ("full", "baseline"), ("full", "ftcluster")]
    for baseline, ours in zip(rows[::2], rows[1::2]):  # same model, same batches, same loss: same numbers
        assert ours["final_loss"] == pytest.approx(baseline["final_loss"], rel=1e-4)
        assert ours["tokens_per_s"] > 0

    # variable-length documents: the baseline pads each batch, ftcluster packs the same documents
    subprocess.run([sys.executable, str(REPO / "bench" / "gpu_throughput.py"), "--smoke", "--lengths", "documents",
                    "--cases", "lora", "--json", str(out)], check=True, capture_output=True, timeout=300)
    baseline, ours = json.loads(out.read_text())["rows"]
    assert ours["steps"] < baseline["steps"] / 2  # packed rows hold several documents each
    assert ours["tokens_per_s"] > 0 and baseline["tokens_per_s"] > 0


def test_llama3_shapes_match_published_sizes():
    from ftcluster.models.methods import count_params
    from ftcluster.models.shapes import known_shape, meta_model

    assert count_params(meta_model(known_shape("meta-llama/Llama-3.2-1B"))).total == 1_235_814_400
    assert count_params(meta_model(known_shape("meta-llama/Llama-3.1-8B"))).total == 8_030_261_248


def run_gpu_script(name: str, out, *args: str, timeout: int):
    """bench/gpu/NAME.sh --smoke ARGS OUT with this interpreter; returns the process and its JSON."""
    env = {**os.environ, "FTC_PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu" / f"{name}.sh"), "--smoke", *args, str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert (out / f"{name}.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
def test_gpu_run_script_smoke(tmp_path):
    """bench/gpu/run.sh --smoke: the GPU throughput script's rehearsal on CPU, without Ray, W&B, Optuna,
    DeepSpeed or gguf importable (as on the GPU machine); the wheel step is skipped (all importable)."""
    done, result = run_gpu_script("run", tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert result["smoke"] and result["state"] == "finished"
    steps = {step["name"]: step for step in result["steps"]}
    assert steps["wheels"]["status"] == "skipped" and "already importable" in steps["wheels"]["note"]
    assert steps["throughput"]["status"] == steps["documents"]["status"] == "ok"
    assert {"ray", "wandb", "optuna", "deepspeed"} <= set(result["no_ray"]["blocked"])
    assert result["no_ray"]["violations"] == []
    summary = result["summary"]
    assert set(summary["cases"]) == {"lora", "full", "qlora"}
    assert all(case["ftcluster_tokens_per_s"] > 0 for case in summary["cases"].values())
    assert summary["targets"]["lora"]["target"] == 1.5 and summary["targets"]["full"]["target"] == 0.5
    # no MFU on CPU: the full case cannot show its target met, so its kernel table is taken
    assert "full/ftcluster" in summary["profiled"]
    assert "## full / ftcluster" in (tmp_path / "run-profile.txt").read_text()
    assert summary["documents"]["steps"]["packed"] < summary["documents"]["steps"]["padded"]
    assert (tmp_path / "run.log").read_text().count("=====") == 2  # one section per sub-step that ran


@pytest.mark.slow
def test_gpu_memory_script_smoke(tmp_path):
    """bench/gpu/memory.sh --smoke (about 90 s on 2 cores, hence slow): planner against measured memory
    on tiny models, DeepSpeed ZeRO-2/3 in one process without Ray, bf16 against fp32; the GPU tests skip."""
    done, result = run_gpu_script("memory", tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    statuses = {step["name"]: step["status"] for step in result["steps"]}
    assert statuses == {"wheels": "skipped", "planner_1b": "ok", "qlora_8b": "ok", "pytest_gpu": "ok", "zero2": "ok",
                        "zero3": "ok", "bf16_vs_fp32": "ok"}
    summary = result["summary"]
    assert summary["pytest_gpu"]["skipped"] >= 4 and summary["pytest_gpu"]["passed"] == 0  # no CUDA here
    assert set(summary["planner_1b"]) == {"full:2", "lora:2", "lora+gc:2", "qlora:2"}
    assert summary["qlora_8b_fits_and_trains"] and len(summary["qlora_8b"]["qlora+gc:2"]["losses"]) == 3
    assert summary["zero2"]["passed"] and summary["zero3"]["passed"] and summary["bf16_vs_fp32"]["passed"]
    assert result["no_ray"]["violations"] == []


def test_gpu_script_steps_record_failures_timeouts_and_the_budget(tmp_path):
    """The scripts' step runner: a failing or timed-out sub-step is recorded and the script goes on;
    a sub-step's own JSON lands in the record; past the budget a sub-step is skipped, not started."""
    script = f"""
source {REPO}/bench/gpu/setup.sh
gpu_init robust --smoke {tmp_path}
step fails 20 bash -c 'echo boom; exit 3'
step slow 1 sleep 30
step fine 20 bash -c 'echo "{{\\"answer\\": 42}}" > "$0"' "$WORK/fine.json"
DEADLINE=$(date +%s)
step late 20 true
gpu_finish
"""
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FTC_PYTHON": sys.executable})
    assert done.returncode == 1, done.stdout + done.stderr  # a step failed
    result = json.loads((tmp_path / "robust.json").read_text())
    steps = {step["name"]: step for step in result["steps"]}
    assert steps["fails"]["status"] == "failed" and steps["fails"]["exit_code"] == 3
    assert "boom" in steps["fails"]["output_tail"]
    assert steps["slow"]["status"] == "timeout" and steps["slow"]["seconds"] < 20
    assert steps["fine"]["status"] == "ok" and steps["fine"]["result"] == {"answer": 42}
    assert steps["late"]["status"] == "skipped" and "out of time" in steps["late"]["note"]
    assert result["status_counts"] == {"ok": 1, "failed": 1, "timeout": 1, "skipped": 1}


@pytest.mark.slow
def test_eval_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "eval.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "eval_speed.py"), "--prompts", "32", "--model", "tiny",
                    "--no-quickstart", "--json", str(out)], check=True, capture_output=True, timeout=300)
    row = json.loads(out.read_text())["comparison"]
    assert row["ftcluster_s"] > 0 and row["plain_s"] > 0
    assert row["same_answers"] == row["prompts"] and row["val_loss"]["ftcluster"] == pytest.approx(row["val_loss"]["plain"], rel=1e-4)


@pytest.mark.slow
def test_gpu_shared_base_script_smoke(tmp_path):
    """bench/gpu/shared_base.sh --smoke: packs against separate trials in processes of their own, without
    Ray (as on the GPU machine); the pack holds the base once, so it needs less memory than the two alone."""
    done, result = run_gpu_script("shared_base", tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    steps = {step["name"]: step for step in result["steps"]}
    assert {name: step["status"] for name, step in steps.items()} == {"wheels": "skipped", "shared_base_1b": "ok"}
    measured = steps["shared_base_1b"]["result"]["2"]
    assert measured["memory_pack_mb"] < measured["memory_separate_mb"] and measured["tokens"] > 0
    assert measured["largest_rel_loss_diff"] < 1e-4  # same threads in both arms here: the same losses
    assert result["no_ray"]["violations"] == []
