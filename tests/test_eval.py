"""Evaluation metrics, early stopping and the overfitting signal."""

import json

import pytest
from conftest import read_metrics

from ftcluster.evaluation.metrics import classification_metrics, normalize_answer
from ftcluster.training.monitor import EarlyStopper, OverfitDetector


def test_classification_metrics_by_hand():
    # actual:    a a a b b c
    # predicted: a a b b c c
    metrics = classification_metrics([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2], ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    per = metrics["per_class"]
    assert per["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "support": 3}
    assert per["b"]["precision"] == 0.5 and per["b"]["recall"] == 0.5
    assert per["c"]["precision"] == 0.5 and per["c"]["recall"] == 1.0
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_forgetting_verdict_reads_each_scores_direction():
    from ftcluster.config.spec import ForgettingSpec
    from ftcluster.evaluation.forgetting import HIGHER_IS_BETTER, message, verdict

    spec = ForgettingSpec(harness={"tasks": ["arc"]}, max_increase_pct=10)
    directions = {"harness/arc/acc": True, "harness/arc/word_perplexity": False}
    before = {"general_perplexity": 20.0, "harness/arc/acc": 0.50, "harness/arc/word_perplexity": 10.0,
              "harness/other/acc": 0.9, HIGHER_IS_BETTER: directions}
    after = {"general_perplexity": 21.0, "harness/arc/acc": 0.40, "harness/arc/word_perplexity": 10.5,
             "harness/other/acc": 0.1, HIGHER_IS_BETTER: directions}
    result = verdict(before, after, spec)
    assert result["increase_pct"] == pytest.approx(5.0)  # perplexity 20 -> 21
    assert result["harness"]["harness/arc/acc"]["worse_pct"] == pytest.approx(20.0)  # accuracy fell by a fifth
    assert result["harness"]["harness/arc/word_perplexity"]["worse_pct"] == pytest.approx(5.0)  # lower is better
    assert "harness/other/acc" not in result["harness"]  # not one of the check's tasks
    assert result["worst"] == "harness/arc/acc" and result["exceeded"]
    assert "harness/arc/acc 0.500 -> 0.400 (+20.0% worse)" in message(result)
    improved = verdict(before, {**before, "harness/arc/acc": 0.6}, spec)
    assert improved["harness"]["harness/arc/acc"]["worse_pct"] == pytest.approx(-20.0) and not improved["exceeded"]


def test_forgetting_needs_something_to_check(make_job):
    from ftcluster.config.spec import load_spec
    from ftcluster.core.errors import FtError

    with pytest.raises(FtError, match=r"eval\.forgetting: set data"):
        load_spec(make_job("nothing", eval={"before_after": True, "forgetting": {"data": None}}))


def test_exact_match_ignores_surrounding_whitespace_only():
    assert normalize_answer("  Maria|Lisbon \n") == "Maria|Lisbon"
    assert normalize_answer("maria|lisbon") != "Maria|Lisbon"


def test_early_stopper_patience_and_mode():
    stopper = EarlyStopper("val_loss", "min", patience=2)
    assert stopper.update({"val_loss": 1.0}, 10)
    assert not stopper.update({"val_loss": 1.1}, 20) and not stopper.should_stop
    assert not stopper.update({"val_loss": 1.0}, 30) and stopper.should_stop
    assert stopper.best_record() == {"metric": "val_loss", "value": 1.0, "step": 10}
    restored = EarlyStopper("val_loss", "min", 2, stopper.state())
    assert restored.should_stop
    strict = EarlyStopper("val_loss", "min", 1, min_delta=0.1)
    strict.update({"val_loss": 1.0}, 1)
    assert not strict.update({"val_loss": 0.95}, 2) and strict.should_stop
    maximise = EarlyStopper("accuracy", "max", None)
    assert maximise.update({"accuracy": 0.5}, 1) and maximise.update({"accuracy": 0.6}, 2)


def test_overfit_signal_needs_divergence_in_a_row():
    detector = OverfitDetector(evals=2)
    assert not detector.update(2.0, 2.0)
    assert not detector.update(1.5, 2.1)  # first divergence
    assert detector.update(1.0, 2.3)  # second in a row: overfitting
    assert not detector.update(0.9, 2.2)  # validation improved: streak broken


def test_overfitting_stops_a_run_that_memorises(make_job, cli, tmp_path):
    """Full fine-tune with a high lr on 8 examples: train loss falls, validation loss rises."""
    job = make_job(
        "overfit",
        method={"name": "full"},
        data={"val_fraction": 0},
        training={"max_steps": 60, "lr": 3e-3, "batch_size": 8},
        eval={"every": 3, "stop_on_overfit": True, "overfit_evals": 2},
    )
    from conftest import arithmetic_rows, write_jsonl

    write_jsonl(tmp_path / "few.jsonl", arithmetic_rows(8, 5))
    result = cli("train", job, "--no-ray", f"data.train={tmp_path / 'few.jsonl'}")
    assert result.code == 0, result
    summary = json.loads((tmp_path / "runs" / "overfit" / "summary.json").read_text())
    assert summary["stop_reason"].startswith("overfitting")
    assert summary["steps"] < 60
    flags = [r["overfitting"] for r in read_metrics(tmp_path / "runs" / "overfit") if "overfitting" in r]
    assert flags[-1] == 1


def test_early_stopping_on_a_plateau(make_job, cli, tmp_path):
    job = make_job("plateau", training={"max_steps": 40, "lr": 1e-9}, eval={"every": 2, "early_stopping_patience": 2, "min_delta": 1e-3})
    result = cli("train", job, "--no-ray")
    assert result.code == 0, result
    summary = json.loads((tmp_path / "runs" / "plateau" / "summary.json").read_text())
    assert summary["stop_reason"].startswith("early stopping")
    assert summary["steps"] < 40
