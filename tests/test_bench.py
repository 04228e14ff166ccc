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
