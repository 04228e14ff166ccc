"""GPU-only paths: run wherever a CUDA GPU is present (`pytest -m gpu`); skipped elsewhere."""

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bf16_lora_on_gpu(make_job, cli, tmp_path):
    job = make_job("gpu-bf16", scaling={"use_gpu": True}, training={"precision": "bf16", "max_steps": 4})
    result = cli("train", job, "--no-ray")
    assert result.code == 0, result
    summary = json.loads((tmp_path / "runs" / "gpu-bf16" / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["precision"] == "bf16"


def test_fp16_full_fine_tune_with_loss_scaling(make_job, cli, tmp_path):
    job = make_job("gpu-fp16", method={"name": "full"}, scaling={"use_gpu": True},
                   training={"precision": "fp16", "max_steps": 4})
    assert cli("train", job, "--no-ray").code == 0


def test_qlora_on_gpu(make_job, cli, tmp_path):
    job = make_job("gpu-qlora", method={"name": "qlora"}, scaling={"use_gpu": True}, training={"max_steps": 4})
    assert cli("train", job, "--no-ray").code == 0


def test_packed_flex_attention_trains_like_sdpa(make_job, cli, tmp_path):
    from conftest import train_losses

    losses = {}
    for attention in ("sdpa", "flex_attention"):
        job = make_job(f"gpu-packed-{attention}", model={"attention": attention}, scaling={"use_gpu": True},
                       data={"packing": True, "max_length": 128},
                       training={"precision": "fp32", "max_steps": 4, "batch_size": 2})
        assert cli("train", job, "--no-ray").code == 0
        losses[attention] = train_losses(tmp_path / "runs" / f"gpu-packed-{attention}")
    assert losses["flex_attention"] == pytest.approx(losses["sdpa"], rel=1e-3)
