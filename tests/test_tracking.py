"""Throughput, MFU, cost, and W&B runs read back through W&B's own reader."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_metrics
from transformers import AutoModelForCausalLM

from ftcluster.config.spec import CostSpec, MethodSpec
from ftcluster.models.methods import apply_method
from ftcluster.track.cost import cost_per_point, run_cost
from ftcluster.track.flops import flops_per_token, peak_flops

SECRET = "wandb-key-that-must-never-appear-0123456789abcdef"


def test_flops_per_token_full_is_6n_and_lora_pays_4n_on_the_frozen_base(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    layers, width = model.config.num_hidden_layers, model.config.hidden_size
    full = flops_per_token(model, context=32)
    assert full.total == 6 * matmul + 12 * layers * width * 32
    lora = flops_per_token(apply_method(model, MethodSpec(name="lora", lora={"rank": 4}), "causal_lm"), 32)
    assert lora.frozen_matmul_params == matmul
    assert lora.total == 4 * matmul + 6 * lora.trained_matmul_params + 12 * layers * width * 32


def test_no_mfu_on_cpu():
    assert peak_flops(torch.device("cpu")) is None


def test_cost_from_price_table_and_overrides():
    spec = CostSpec(gpu_hour_usd={"H100": 2.0})
    assert run_cost(1800, 8, "H100", spec) == {"gpu_hours": 4.0, "cpu_core_hours": 0.0, "cost_usd": 8.0}
    assert run_cost(3600, 1, "A100", spec)["cost_usd"] == pytest.approx(1.79)
    assert run_cost(3600, 2, "cpu", spec)["cost_usd"] == pytest.approx(0.08)
    assert run_cost(3600, 1, "gpu", spec)["cost_usd"] is None  # an unknown GPU is not priced by guess
    assert cost_per_point(10.0, 0.20, 0.70, "max") == pytest.approx(0.2)  # 50 points of accuracy
    assert cost_per_point(10.0, 2.0, 1.5, "min") == pytest.approx(20.0)
    assert cost_per_point(10.0, 0.7, 0.6, "max") is None


def wandb_inspect(run_dir: Path, *flags: str) -> str:
    wandb = Path(sys.executable).with_name("wandb")
    return subprocess.run([str(wandb), "leet", "inspect", *flags, str(run_dir)], check=True,
                          capture_output=True, text=True).stdout


def test_wandb_offline_run_has_config_metrics_summary_and_no_key(make_job, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    job = make_job("tracked", tracking={"wandb": {"project": "ftcluster-test", "tags": ["ci"]}},
                   eval={"every": 2, "before_after": True, "generation": {"num_prompts": 2, "max_new_tokens": 4}})
    result = cli("train", job, "--no-ray")
    assert result.code == 0, result
    out = tmp_path / "runs" / "tracked"
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary = json.loads(wandb_inspect(runs[0], "--summary", "--json"))
    text = json.dumps(summary)
    assert "cost_usd" in text and "tokens_per_s" in text and "after/val_loss" in text
    assert "tracked" in text and "ftcluster-test" in text  # the job spec is the run's config
    records = wandb_inspect(runs[0], "--json")
    history = [json.loads(line) for line in records.splitlines() if '"history"' in line]
    assert len(history) >= 4  # per-step metrics
    assert "train_loss" in records and "eval/samples_after" in records
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.out + result.err


def test_auto_mode_goes_online_where_a_key_is_given(monkeypatch):
    """A cluster's pods get WANDB_API_KEY from a Secret: with the default mode their runs upload."""
    from ftcluster.config.spec import WandbSpec
    from ftcluster.track.wandb_run import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert WandbSpec().mode == "auto" and wandb_mode(WandbSpec()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert wandb_mode(WandbSpec()) == "online"
    assert wandb_mode(WandbSpec(mode="offline")) == "offline"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment's choice wins over the key (make demo, tests)
    assert wandb_mode(WandbSpec()) == "offline"


def test_online_without_key_is_a_clear_error(make_job, cli, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    job = make_job("online", tracking={"wandb": {"mode": "online"}})
    result = cli("train", job, "--no-ray")
    assert result.code == 2 and "needs WANDB_API_KEY in the environment" in result.err


def test_metrics_have_throughput_and_cost(make_job, cli, tmp_path):
    assert cli("train", make_job("costed"), "--no-ray").code == 0
    steps = [r for r in read_metrics(tmp_path / "runs" / "costed") if "train_loss" in r]
    for key in ("tokens_per_s", "tokens_per_s_per_worker", "samples_per_s", "step_time_s", "peak_memory_mb",
                "cpu_core_hours", "cost_usd"):
        assert all(r[key] is not None for r in steps), key
    assert steps[-1]["cost_usd"] > steps[0]["cost_usd"] > 0
    summary = json.loads((tmp_path / "runs" / "costed" / "summary.json").read_text())
    assert summary["mfu"] is None and summary["cost_per_million_tokens_usd"] > 0
