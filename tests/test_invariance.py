"""Settings that must give the same training curve do: accumulation, and resume vs uninterrupted."""

import json

import pytest
import torch
from conftest import read_metrics, train_losses
from run_rewind import rewind
from safetensors.torch import load_file


def run(cli, job, *extra):
    result = cli("train", job, "--no-ray", *extra)
    assert result.code == 0, result
    return result


def test_batch8_accum1_equals_batch4_accum2(make_job, cli, tmp_path):
    method = {"name": "full"}
    run(cli, make_job("b8", method=method, training={"batch_size": 8, "grad_accum": 1, "max_steps": 5}))
    run(cli, make_job("b4x2", method=method, training={"batch_size": 4, "grad_accum": 2, "max_steps": 5}))
    big, small = train_losses(tmp_path / "runs" / "b8"), train_losses(tmp_path / "runs" / "b4x2")
    assert big == pytest.approx(small, rel=1e-5)
    assert big[-1] < big[0] - 0.3  # it really trained
    first = load_file(str(tmp_path / "runs" / "b8" / "final" / "model" / "model.safetensors"))
    second = load_file(str(tmp_path / "runs" / "b4x2" / "final" / "model" / "model.safetensors"))
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_matches_uninterrupted_run(method, make_job, cli, tmp_path):
    training = {"max_steps": 6, "checkpoint_every": 3, "scheduler": "cosine", "warmup_steps": 2}
    lora = {"name": "lora", "lora": {"rank": 4, "dropout": 0.1}}  # dropout: RNG state must resume too
    job = make_job("whole", method=lora if method == "lora" else {"name": "full"}, training=training,
                   eval={"every": 2})
    run(cli, job)
    out = tmp_path / "runs" / "whole"
    uninterrupted = read_metrics(out)
    final_weights = {p.name: load_file(str(p)) for p in (out / "final").rglob("*.safetensors")}
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000003", "step-0000006"]

    rewind(str(out), 3)  # as if it had crashed after step 3's checkpoint
    result = run(cli, job, "--resume")
    assert "Resumed from" in result.out and "at step 3" in result.out
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    for a, b in zip(resumed, uninterrupted):
        for key in ("train_loss", "val_loss", "lr"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6), (a["step"], key)
    for path in (out / "final").rglob("*.safetensors"):
        again = load_file(str(path))
        for name, value in final_weights[path.name].items():
            torch.testing.assert_close(again[name], value, atol=1e-6, rtol=1e-6)


def test_fresh_run_refuses_to_overwrite_a_finished_run(make_job, cli, tmp_path):
    job = make_job("once")
    run(cli, job)
    summary = (tmp_path / "runs" / "once" / "summary.json").read_bytes()
    result = cli("train", job, "--no-ray")
    assert result.code == 2
    assert "already holds a run" in result.err and len(result.err.strip().splitlines()) == 1
    assert (tmp_path / "runs" / "once" / "summary.json").read_bytes() == summary


def test_gradient_checkpointing_does_not_change_the_curve(make_job, cli, tmp_path):
    method = {"name": "lora", "lora": {"rank": 4, "dropout": 0.0}}
    run(cli, make_job("plain", method=method))
    run(cli, make_job("ckpt", method=method, training={"gradient_checkpointing": True}))
    assert train_losses(tmp_path / "runs" / "plain") == pytest.approx(train_losses(tmp_path / "runs" / "ckpt"), rel=1e-5)


def test_bf16_autocast_is_one_switch(make_job, cli, tmp_path):
    run(cli, make_job("bf16", training={"precision": "bf16"}))
    summary = json.loads((tmp_path / "runs" / "bf16" / "summary.json").read_text())
    assert summary["precision"] == "bf16"
    losses = train_losses(tmp_path / "runs" / "bf16")
    assert losses[-1] < losses[0]


def test_python_records_instead_of_files(make_job, tmp_path):
    """The loop takes rows from Python (a list of dicts, or a `datasets.Dataset`)."""
    from conftest import arithmetic_rows

    from ftcluster.config.spec import load_spec
    from ftcluster.training.loop import train

    spec = load_spec(make_job("records"))
    summary = train(spec, train_records=arithmetic_rows(32, 3), val_records=arithmetic_rows(8, 4), verbose=False)
    assert summary["steps"] == 4
    assert read_metrics(tmp_path / "runs" / "records")[0]["step"] == 1
