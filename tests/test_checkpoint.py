"""Checkpoints: atomic writes (a failed save never becomes `latest`), pruning, safetensors only."""

import pytest
import torch

from ftcluster.runs import checkpoints as ckpt
from ftcluster.runs.layout import latest_checkpoint
from ftcluster.training.optim import lr_lambda


def small_setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("linear", 0, 10))
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_failed_save_leaves_previous_latest(tmp_path, monkeypatch):
    model, optimizer, scheduler = small_setup()
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, keep=3)
    real_save = ckpt.save_file

    def crash(tensors, path):
        if path.endswith("optimizer.safetensors"):
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {}, keep=3)
    assert latest_checkpoint(tmp_path).name == "step-0000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000001"]


def test_round_trip_and_pruning(tmp_path):
    model, optimizer, scheduler = small_setup()
    for step in (1, 2, 3):
        torch.manual_seed(5)
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, scheduler, {"tokens_seen": step}, keep=2)
    draw_after_save = torch.rand(3)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000002", "step-0000003"]
    assert all(p.suffix in (".safetensors", ".json") for p in (tmp_path / "step-0000003").iterdir())

    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, fresh_optimizer, fresh_scheduler = small_setup()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    state = ckpt.load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_optimizer, fresh_scheduler)
    assert state["step"] == 3 and state["tokens_seen"] == 3
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, expected[name])
    assert fresh_scheduler.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
    torch.testing.assert_close(fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), draw_after_save)  # the RNG continues where the saved run was
