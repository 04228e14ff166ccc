"""Reward models for RLHF: the Bradley-Terry loss by hand, real runs, export, and invariance across workers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, train_losses, write_jsonl
from test_dpo import preference_rows

from ftcluster.config.spec import load_spec
from ftcluster.objectives.reward import bradley_terry_losses

LORA = {"rank": 8, "alpha": 16, "dropout": 0.0}


def test_bradley_terry_loss_matches_a_hand_computed_example():
    # rewards: chosen 2.0, rejected 0.5 -> -log sigmoid(1.5); with margin 1.0 -> -log sigmoid(0.5)
    loss = bradley_terry_losses(torch.tensor([2.0, 0.0]), torch.tensor([0.5, 0.0]))
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-1.5)), math.log(2)])
    with_margin = bradley_terry_losses(torch.tensor([2.0]), torch.tensor([0.5]), margin=1.0)
    assert float(with_margin) == pytest.approx(math.log(1 + math.exp(-0.5)))


@pytest.fixture
def pairs(tmp_path):
    return {"train": str(write_jsonl(tmp_path / "pref-train.jsonl", preference_rows(64, 0))),
            "validation": str(write_jsonl(tmp_path / "pref-val.jsonl", preference_rows(16, 1))),
            "format": "preference"}


def reward_job(make_job, name: str, pairs: dict, method: str = "lora", **sections):
    return make_job(name, model={"task": "classification"},
                    method={"name": method, "objective": "reward", "lora": LORA},
                    data=pairs, **sections)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_reward_model_learns_to_rank_held_out_pairs_and_exports_for_plain_transformers(
        method, make_job, cli, tmp_path, pairs):
    job = reward_job(make_job, f"rm-{method}", pairs, method,
                     training={"max_steps": 40, "batch_size": 8, "lr": 3e-3 if method == "lora" else 1e-3},
                     eval={"before_after": True, "metric": "pair_accuracy", "mode": "max"})
    result = cli("train", job, "--no-ray")
    assert result.code == 0, result
    run = tmp_path / "runs" / f"rm-{method}"
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert after["pair_accuracy"] >= 0.9 and after["pair_accuracy"] > before["pair_accuracy"] + 0.2
    assert after["reward_margin"] > before["reward_margin"] + 0.5 and after["val_loss"] < before["val_loss"]

    merged = tmp_path / "exported"
    assert cli("export", str(run), "--merge", "--out", str(merged)).code == 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert model.config.num_labels == 1
    row = preference_rows(16, 1)[0]
    texts = [f"{row['prompt']} {row[reply]}" for reply in ("chosen", "rejected")]
    with torch.no_grad():
        scores = [float(model(**tokenizer(text, return_tensors="pt")).logits[0, 0]) for text in texts]
    assert all(math.isfinite(score) for score in scores)


def test_reward_model_under_deepspeed_zero2_with_two_workers_matches_one(make_job, cli, tmp_path, pairs):
    common = dict(training={"max_steps": 3, "max_grad_norm": None}, eval={"before_after": False})
    one = reward_job(make_job, "rm-one", pairs, training={**common["training"], "batch_size": 8}, eval=common["eval"])
    two = reward_job(make_job, "rm-two", pairs, training={**common["training"], "batch_size": 4}, eval=common["eval"],
                     scaling={"num_workers": 2}, distributed={"backend": "deepspeed", "zero_stage": 2})
    assert cli("train", one, "--no-ray").code == 0
    result = cli("train", two)
    assert result.code == 0, result
    assert train_losses(tmp_path / "runs" / "rm-two") == pytest.approx(train_losses(tmp_path / "runs" / "rm-one"), rel=1e-4)


def test_reward_rules_are_validation_errors(make_job, cli, pairs):
    result = cli("validate", make_job("lm-head", method={"objective": "reward"}, data=pairs))
    assert result.code == 2 and "method.objective reward needs model.task: classification" in result.err
    result = cli("validate", make_job("sft-pairs", model={"task": "classification"}, data=pairs))
    assert result.code == 2 and "method.objective reward and data.format preference go together" in result.err


def test_reward_job_is_valid():
    spec = load_spec(REPO / "jobs" / "reward-smollm2.yaml")
    assert spec.method.objective == "reward" and spec.model.task == "classification"
