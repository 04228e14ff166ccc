"""The quickstart (`make demo`) end to end: under Ray, on CPU, in minutes, and it really learns."""

import json
import time

import pytest
from conftest import REPO


@pytest.mark.slow
@pytest.mark.timed  # "in minutes" is measured alone: beside another test on 2 cores it took 839 s
def test_quickstart_learns_the_format(cli, tmp_path):
    started = time.perf_counter()
    result = cli("train", REPO / "jobs" / "quickstart.yaml", f"output.dir={tmp_path / 'qs'}")
    elapsed = time.perf_counter() - started
    assert result.code == 0, result
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["before"]["exact_match"] < 0.3
    assert summary["after"]["exact_match"] > 0.7
    assert "Base model vs fine-tuned" in result.out
    assert elapsed < 300
    # the summary answers "would prompting have been enough?" and "did it forget?"
    assert summary["few_shot"]["shots"] == 3 and summary["after"]["exact_match"] > summary["few_shot"]["exact_match"]
    assert "Fine-tune vs prompt: base model with 3 examples in the prompt" in result.out
    assert not summary["forgetting"]["exceeded"] and "Forgetting check" in result.out
