"""The benchmarks still run (a tiny smoke run; the real numbers live in bench/RESULTS.md)."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


def test_overhead_benchmark_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "overhead.py"), "--model", "tiny", "--steps", "6",
                    "--warmup", "2", "--threads", "1", "--json", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    runners = [row["runner"] for row in result["rows"]]
    assert runners[0].startswith("hand-written") and len(runners) == 3
    assert all(row["tokens_per_s"] > 0 for row in result["rows"])


def test_sweep_efficiency_benchmark_smoke(tmp_path):
    out = tmp_path / "sweep.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "sweep_efficiency.py"), "--smoke", "--json", str(out)],
                   check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["grid"]["steps"] == 4 * 8  # 4 trials run to completion
    assert 0 < result["asha"]["steps_to_target"] <= result["asha"]["steps_total"] <= result["grid"]["steps"]


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
