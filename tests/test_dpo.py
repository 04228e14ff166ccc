"""Preference tuning: the DPO loss by hand, the adapter reference, and real runs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import REPO, write_jsonl

from ftcluster.config.spec import DataSpec, MethodSpec, load_spec
from ftcluster.data import build_data
from ftcluster.models.load import load_pretrained, load_tokenizer, resolve_model
from ftcluster.models.methods import apply_method
from ftcluster.objectives.dpo import DPOObjective, dpo_losses
from ftcluster.objectives.logprobs import adapters_off_reference, sequence_logps


def test_dpo_loss_matches_a_hand_computed_example():
    # policy log-probs: chosen -2.0, rejected -5.0; reference: chosen -3.0, rejected -4.0
    # logits = beta * ((-2 - -3) - (-5 - -4)) = 0.5 * (1 + 1) = 1.0
    loss = dpo_losses(torch.tensor([-2.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), torch.tensor([-4.0]), beta=0.5)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1.0)))  # -log sigmoid(1)
    smoothed = dpo_losses(torch.tensor([-2.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), torch.tensor([-4.0]),
                          beta=0.5, label_smoothing=0.2)
    expected = 0.8 * math.log(1 + math.exp(-1.0)) + 0.2 * math.log(1 + math.exp(1.0))
    assert float(smoothed) == pytest.approx(expected)
    # policy == reference: every pair costs log 2, whatever beta
    same = dpo_losses(torch.tensor([-1.0, -7.0]), torch.tensor([-3.0, -2.0]), torch.tensor([-1.0, -7.0]),
                      torch.tensor([-3.0, -2.0]), beta=3.0)
    assert same.tolist() == pytest.approx([math.log(2)] * 2)


def preference_rows(count: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        # A systematic preference the tiny model can carry to unseen prompts, against its bias for
        # shorter replies (so the base model's own preference starts low).
        rows.append({"prompt": f"add {a} and {b}", "chosen": f"{a + b}!", "rejected": str(a + b)})
    return rows


@pytest.fixture
def preference_data(tmp_path):
    return {"train": write_jsonl(tmp_path / "pref-train.jsonl", preference_rows(64, 0)),
            "val": write_jsonl(tmp_path / "pref-val.jsonl", preference_rows(16, 1))}


def test_sequence_logps_score_only_the_reply(tiny_model, preference_data):
    tokenizer = load_tokenizer(resolve_model(str(tiny_model)))
    spec = DataSpec(train=str(preference_data["train"]), validation=str(preference_data["val"]), format="preference",
                    max_length=64)
    bundle = build_data(spec, tokenizer)
    pair = bundle.train[0]
    assert pair.rejected is not None and pair.input_ids != pair.rejected.input_ids
    model = load_pretrained(resolve_model(str(tiny_model)), "causal_lm", dtype=torch.float32)
    objective = DPOObjective(0.1, 0.0, reference=lambda batch: torch.zeros(batch["input_ids"].shape[0]))
    batch = objective.collate(bundle.train[:3], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and objective.count(batch) == 3
    logps = sequence_logps(model, batch)
    # by hand for row 0: log-softmax at each trained position, summed
    logits = model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1]).logits[0]
    labels = batch["labels"][0]
    by_hand = sum(torch.log_softmax(logits[t - 1], -1)[labels[t]] for t in range(1, labels.shape[0]) if labels[t] >= 0)
    assert float(logps[0]) == pytest.approx(float(by_hand), rel=1e-5)


def test_adapter_reference_equals_an_explicit_frozen_copy(tiny_model, preference_data):
    resolved = resolve_model(str(tiny_model))
    tokenizer = load_tokenizer(resolved)
    bundle = build_data(DataSpec(train=str(preference_data["train"]), format="preference", max_length=64,
                                 val_fraction=0.0), tokenizer)
    torch.manual_seed(0)
    base = load_pretrained(resolved, "causal_lm", dtype=torch.float32)
    frozen = copy.deepcopy(base).eval()
    lora = apply_method(base, MethodSpec(name="lora", lora={"rank": 4, "alpha": 8, "dropout": 0.0}), "causal_lm")
    with torch.no_grad():  # make the adapters matter: the policy now differs from the base
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    batch = DPOObjective(0.1, 0.0, None).collate(bundle.train[:4], tokenizer.pad_token_id)
    lora.train()
    reference = adapters_off_reference(lora)(batch)
    assert lora.training  # the reference ran in eval mode and put the training mode back
    with torch.no_grad():
        explicit = sequence_logps(frozen, batch)
        policy = sequence_logps(lora, batch)
    torch.testing.assert_close(reference, explicit, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy, explicit)  # the adapters are back on for the policy


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_run_raises_held_out_preference_accuracy(method, make_job, cli, tmp_path, preference_data):
    lora = {"rank": 8, "alpha": 16, "dropout": 0.0}
    job = make_job(f"dpo-{method}", method={"name": method, "objective": "dpo", "dpo": {"beta": 0.1}, "lora": lora},
                   data={"train": str(preference_data["train"]), "validation": str(preference_data["val"]),
                         "format": "preference"},
                   training={"max_steps": 60, "batch_size": 8, "lr": 3e-3 if method == "lora" else 1e-3},
                   eval={"before_after": True, "metric": "pref_accuracy", "mode": "max"})
    result = cli("train", job, "--no-ray")
    assert result.code == 0, result
    summary = json.loads((tmp_path / "runs" / f"dpo-{method}" / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-4)  # base == reference before training
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert after["reward_margin"] > 0.2 and after["reward_accuracy"] >= 0.75
    # the model's own log-prob gap moved towards the chosen replies on unseen prompts
    gap_before = before["chosen_logp"] - before["rejected_logp"]
    gap_after = after["chosen_logp"] - after["rejected_logp"]
    assert gap_after > gap_before + 2.0 and after["pref_accuracy"] >= before["pref_accuracy"]
    assert after["val_loss"] < before["val_loss"] - 0.1


@pytest.mark.slow
def test_dpo_under_ray_with_two_workers_matches_one(make_job, cli, tmp_path, preference_data):
    common = dict(method={"name": "lora", "objective": "dpo", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}},
                  data={"train": str(preference_data["train"]), "validation": str(preference_data["val"]),
                        "format": "preference"}, eval={"before_after": False})
    one = make_job("dpo-one", training={"max_steps": 4, "batch_size": 8}, **common)
    two = make_job("dpo-two", training={"max_steps": 4, "batch_size": 4}, scaling={"num_workers": 2}, **common)
    assert cli("train", one, "--no-ray").code == 0
    result = cli("train", two)
    assert result.code == 0, result
    from conftest import train_losses

    assert train_losses(tmp_path / "runs" / "dpo-two") == pytest.approx(train_losses(tmp_path / "runs" / "dpo-one"), rel=1e-4)


@pytest.mark.parametrize("method", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_dpo_under_deepspeed_zero2_matches_one_worker(method, make_job, cli, tmp_path, preference_data):
    # lora: the reference is the engine's module with adapters off; full: a frozen copy taken before
    # DeepSpeed wraps the model.
    common = dict(data={"train": str(preference_data["train"]), "validation": str(preference_data["val"]),
                        "format": "preference"}, eval={"before_after": False})
    chosen = {"name": method, "objective": "dpo", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}}
    training = {"max_steps": 3, "max_grad_norm": None}
    one = make_job(f"ds-one-{method}", method=chosen, training={"batch_size": 8, **training}, **common)
    two = make_job(f"ds-two-{method}", method=chosen, training={"batch_size": 4, **training},
                   scaling={"num_workers": 2}, distributed={"backend": "deepspeed", "zero_stage": 2}, **common)
    assert cli("train", one, "--no-ray").code == 0
    result = cli("train", two)
    assert result.code == 0, result
    from conftest import train_losses

    two_losses = train_losses(tmp_path / "runs" / f"ds-two-{method}")
    assert two_losses == pytest.approx(train_losses(tmp_path / "runs" / f"ds-one-{method}"), rel=1e-4)


def test_preference_rules_are_validation_errors(make_job, cli):
    result = cli("validate", make_job("mismatch", method={"objective": "dpo"}))
    assert result.code == 2 and "method.objective dpo and data.format preference go together" in result.err
    result = cli("validate", make_job("prefix", method={"name": "prefix", "objective": "dpo"},
                                      data={"format": "preference"}))
    assert result.code == 2 and "not prefix" in result.err


def test_dpo_job_is_valid():
    spec = load_spec(REPO / "jobs" / "dpo-smollm2.yaml")
    assert spec.method.objective == "dpo" and spec.data.format == "preference" and spec.eval.metric == "pref_accuracy"
    rows = [json.loads(line) for line in (REPO / "jobs" / "data" / "preferences-val.jsonl").read_text().splitlines()]
    train_prompts = {json.loads(line)["prompt"] for line in
                     (REPO / "jobs" / "data" / "preferences-train.jsonl").read_text().splitlines()}
    assert rows and not train_prompts & {r["prompt"] for r in rows}  # held-out prompts are unseen
    assert all(r["chosen"] == r["chosen"].upper() and r["chosen"].lower() == r["rejected"].lower() for r in rows)


@pytest.mark.slow
def test_dpo_smollm2_job_raises_preference_accuracy(cli, tmp_path):
    result = cli("train", REPO / "jobs" / "dpo-smollm2.yaml", "--no-ray", f"output.dir={tmp_path / 'dpo'}")
    assert result.code == 0, result
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert summary["before"]["pref_accuracy"] <= 0.2 and summary["after"]["pref_accuracy"] >= 0.9
