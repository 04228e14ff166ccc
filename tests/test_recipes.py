"""Recipe tests: the real CLI on a tiny random Llama, asserting the first losses exactly.

The expected numbers were recorded from this code on CPU (torch 2.13, fp32, one thread);
a change to data rendering, masking, loss normalisation, initialisation order or the
optimizer shows up here as a different number.
"""

import json

import pytest
from conftest import train_losses

EXPECTED_FIRST_LOSSES = {
    "full": [5.599428176879883, 5.2516255378723145, 5.068015098571777, 4.898459434509277],
    "freeze": [5.599428176879883, 5.368662357330322, 5.195391654968262, 5.039308547973633],
    "lora": [5.599428176879883, 5.5540595054626465, 5.55691385269165, 5.540556907653809],
    "dora": [5.599428176879883, 5.549785614013672, 5.548558712005615, 5.528043270111084],
    "prefix": [5.582551002502441, 5.5428466796875, 5.553989887237549, 5.535799503326416],
    "qlora": [5.607100009918213, 5.564167499542236, 5.567734718322754, 5.55595064163208],
}


@pytest.mark.parametrize("method", list(EXPECTED_FIRST_LOSSES))
def test_method_recipe_first_losses(method, make_job, cli, tmp_path):
    job = make_job(name=f"recipe-{method}", method={"name": method, "freeze": {"top_blocks": 1}})
    result = cli("train", job, "--no-ray")
    assert result.code == 0, result
    run = tmp_path / "runs" / f"recipe-{method}"
    losses = train_losses(run)
    assert len(losses) == 4
    assert losses[-1] < losses[0]
    expected = EXPECTED_FIRST_LOSSES[method]
    assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stop_reason"] == "completed"
    assert (run / "final" / ("model" if method in ("full", "freeze") else "adapter")).is_dir()
    assert "Run summary" in result.out
