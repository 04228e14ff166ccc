"""The benchmarks still run (a tiny smoke run; the real numbers live in bench/RESULTS.md)."""

import json
import subprocess
import sys

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
