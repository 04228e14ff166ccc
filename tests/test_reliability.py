"""Reliability, driven from outside the loop: real signals, real corrupt files, real full or read-only
filesystems, a real diverging run. Every failure is one line, exit 2 (or 128 + signal), and no
broken result is ever saved or put in place of an earlier one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, train_losses, write_jsonl

TRACEBACK = "Traceback"


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def one_line_error(result, *needles: str) -> None:
    assert result.code == 2, result
    assert TRACEBACK not in result.err + result.out, result
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in result.err, (needle, result.err)


# --- numbers: refused at validation, and divergence at run time --------------------------------


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_numbers_are_refused_at_validation(value, make_job, cli):
    one_line_error(cli("validate", make_job("finite"), f"training.lr={value}"), "training.lr")


def test_divergence_stops_saves_nothing_and_keeps_the_earlier_run(make_job, cli, tmp_path):
    # (max_weight_growth off: the weights' growth would stop it as collapse at step 1, before any NaN)
    job = make_job("diverge", training={"max_steps": 6, "checkpoint_every": 1, "max_weight_growth": None},
                   output={"overwrite": True})
    assert cli("train", job, "--no-ray").code == 0
    out = tmp_path / "runs" / "diverge"
    earlier = snapshot(out)

    # Adam moves every weight by about lr per step: 1e30 overflows the next forward pass.
    result = cli("train", job, "--no-ray", "training.lr=1e30")
    one_line_error(result, "diverged at step 2", "the loss is nan", "earlier run", "kept as it was")
    now = snapshot(out)
    assert {k: v for k, v in now.items() if k.parts[0] != "failed"} == earlier  # byte-identical, nothing added
    failed = out / "failed"
    assert not (failed / "final").exists() and not (failed / "summary.json").exists()
    assert (failed / "checkpoints" / "latest").read_text().strip() == "step-0000001"  # the last good one
    stop = [json.loads(line) for line in (failed / "metrics.jsonl").read_text().splitlines()][-1]
    assert stop["stop_reason"] == "diverged at step 2"


def test_divergence_of_a_fresh_run_names_its_last_good_checkpoint(make_job, cli, tmp_path):
    job = make_job("fresh-diverge", training={"max_steps": 6, "checkpoint_every": 1, "lr": 1e30, "max_weight_growth": None})
    result = cli("train", job, "--no-ray")
    one_line_error(result, "diverged at step 2", "step-0000001", "--resume")
    out = tmp_path / "runs" / "fresh-diverge"
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoints" / "step-0000001" / "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_guard_skips_up_to_the_allowed_steps_then_stops():
    from ftcluster.training.health import DivergedError, DivergenceGuard

    guard = DivergenceGuard(allowed_skips=2)
    finite, nan = torch.tensor(1.5), torch.tensor(float("nan"))
    assert guard.should_skip(1, finite, torch.tensor(0.3), world_size=1) is False
    assert guard.should_skip(2, nan, None, world_size=1) is True
    assert guard.should_skip(3, finite, torch.tensor(float("inf")), world_size=1) is True
    assert guard.skipped == 2
    with pytest.raises(DivergedError, match="diverged at step 4: the loss is nan after 2 skipped"):
        guard.should_skip(4, nan, None, world_size=1)


def test_a_skipped_step_leaves_weights_and_optimizer_untouched():
    from ftcluster.training.backends import TorchStepper

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    stepper = TorchStepper(model, optimizer, precision="fp32", max_grad_norm=1.0, world_size=1,
                           device=torch.device("cpu"), bucket_size_mb=25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stepper.backward(model(torch.ones(1, 3)).sum() * float("nan"))
    assert not torch.isfinite(stepper.clip_gradients())
    stepper.skip()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state


# --- bad inputs: one line, exit 2 ----------------------------------------------------------------


def test_binary_garbage_as_jsonl(make_job, cli, tmp_path):
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(bytes(range(256)) * 40)
    one_line_error(cli("train", make_job("g1", data={"train": str(garbage), "validation": None}), "--no-ray"),
                   "no usable training rows")
    one_line_error(cli("train", make_job("g2", data={"train": str(garbage), "validation": None, "on_bad_row": "fail"}),
                       "--no-ray"), f"bad row {garbage}:1: invalid JSON")


def test_one_invalid_utf8_row_is_skipped_with_its_line(make_job, cli, tmp_path):
    data = write_jsonl(tmp_path / "mixed.jsonl", [{"instruction": "a", "output": "b"}] * 20)
    with data.open("ab") as handle:
        handle.write(b'{"instruction": "caf\xe9", "output": "x"}\n')
    result = cli("train", make_job("utf8", data={"train": str(data), "validation": None}), "--no-ray")
    assert result.code == 0, result
    assert f"bad row {data}:21: invalid UTF-8" in result.out


def test_binary_csv_and_json(make_job, cli, tmp_path):
    for suffix in ("csv", "json"):
        path = tmp_path / f"garbage.{suffix}"
        path.write_bytes(b"\xff\xfe\x00garbage" * 10)
        job = make_job(f"bin-{suffix}", data={"train": str(path), "validation": None})
        one_line_error(cli("train", job, "--no-ray"), str(path), "not UTF-8")


def damaged_model(tiny_model: Path, tmp_path: Path, name: str, damage) -> Path:
    import shutil

    copy = tmp_path / name
    shutil.copytree(tiny_model, copy)
    damage(copy)
    return copy


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_corrupt_model_files(make_job, cli, tmp_path, tiny_model):
    broken_config = damaged_model(tiny_model, tmp_path, "bad-config", lambda d: (d / "config.json").write_text("{oops"))
    one_line_error(cli("train", make_job("m1", model={"path": str(broken_config)}), "--no-ray"), "model.path", "bad-config")
    cut_weights = damaged_model(tiny_model, tmp_path, "cut-weights", lambda d: truncate(d / "model.safetensors", 1000))
    one_line_error(cli("train", make_job("m2", model={"path": str(cut_weights)}), "--no-ray"), "model.path", "cut-weights")


def test_truncated_gguf(make_job, cli, tmp_path, monkeypatch):
    from ftcluster.models.load import resolve_alias

    gguf = resolve_alias("smollm2-135m-instruct")
    with gguf.open("rb") as handle:
        head = handle.read(1 << 20)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "cache"))
    one_line_error(cli("train", make_job("gguf", model={"path": str(cut)}), "--no-ray"), "cut.gguf", "not a readable GGUF")
    assert not any((tmp_path / "cache" / "gguf").glob("cut-*/config.json"))  # no half conversion cached


def test_output_dir_that_is_a_file(make_job, cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line_error(cli("train", make_job("f", output={"dir": str(blocker)}), "--no-ray"), "is a file, not a folder")


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a real tmpfs (needs root and mount(2); skipped where the machine forbids it)."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_read_only_output_dir(make_job, cli, mount_tmpfs):
    read_only = mount_tmpfs("ro", "size=1m,ro")
    one_line_error(cli("train", make_job("ro", output={"dir": str(read_only / "run")}), "--no-ray"),
                   "cannot write in", "Read-only file system")


def test_full_disk_mid_run(make_job, cli, mount_tmpfs):
    small = mount_tmpfs("full", "size=96k")
    out = small / "run"
    result = cli("train", make_job("full", training={"max_steps": 4, "checkpoint_every": 2},
                                   output={"dir": str(out)}), "--no-ray")
    one_line_error(result, "No space left on device", "--resume", str(out))  # the line names where
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written checkpoint was removed


def test_eval_of_a_run_whose_adapter_was_deleted(make_job, cli, tmp_path):
    assert cli("train", make_job("gone"), "--no-ray").code == 0
    out = tmp_path / "runs" / "gone"
    (out / "final" / "adapter" / "adapter_model.safetensors").unlink()
    one_line_error(cli("eval", out), "adapter_model.safetensors is missing")
    one_line_error(cli("export", out, "--out", tmp_path / "x"), "adapter_model.safetensors is missing")


def test_resume_of_a_finished_run_needs_force_or_more_steps(make_job, cli, tmp_path):
    job = make_job("finished", training={"max_steps": 4, "checkpoint_every": 2})
    assert cli("train", job, "--no-ray").code == 0
    one_line_error(cli("train", job, "--no-ray", "--resume"), "holds a finished run", "--force")
    longer = cli("train", job, "--no-ray", "--resume", "training.max_steps=6")
    assert longer.code == 0 and "at step 4" in longer.out, longer  # the run's end was checkpointed: no step redone
    steps = [record["step"] for record in read_metrics(tmp_path / "runs" / "finished") if "train_loss" in record]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_expression_bombs_are_refused_at_once():
    from ftcluster.core.errors import SpecError
    from ftcluster.sweep.space import evaluate_expression

    for text in ("9 ** 9 ** 9 ** 9", "2 ** 100000", "10.0 ** 400", "(10 ** 10) ** 10"):
        started = time.perf_counter()
        with pytest.raises(SpecError, match="failed"):
            evaluate_expression(text, {}, {}, "space.yaml: training.lr")
        assert time.perf_counter() - started < 1.0
    assert evaluate_expression("2 ** 10 * 3", {}, {}, "x") == 3072


def test_tune_refuses_an_expression_bomb_in_one_line(make_job, cli, tmp_path):
    space = tmp_path / "space-bomb.yaml"
    space.write_text('method.lora.alpha: {expr: "9 ** 9 ** 9 ** 9"}\n')
    started = time.perf_counter()
    one_line_error(cli("tune", make_job("bomb"), space), "method.lora.alpha", "larger than 2**64")
    assert time.perf_counter() - started < 10  # mostly imports; the expression itself is refused at once


# --- signals: one line, 128 + signal, a checkpoint to resume from ---------------------------------


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "ftcluster.cli.app", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(out: Path, steps: int, process: subprocess.Popen, timeout: float = 120) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if metrics.is_file() and sum(1 for line in metrics.read_text().splitlines() if "train_loss" in line) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {steps} logged steps within {timeout}s")


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_checkpoints_and_resume_matches_an_uninterrupted_run(signum, make_job, cli, tmp_path):
    training = {"max_steps": 150, "checkpoint_every": 1000, "scheduler": "cosine", "warmup_steps": 5}
    job = make_job("sig", training=training)
    process = start_cli("train", job, "--no-ray", cwd=tmp_path)
    out = tmp_path / "runs" / "sig"
    wait_for_steps(out, 3, process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert TRACEBACK not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"interrupted ({signum.name}) at step" in lines[0], stderr
    checkpoint = lines[0].split("checkpoint: ")[1].split(";")[0]
    assert Path(checkpoint).parent == out / "checkpoints" and "--resume" in lines[0]
    assert not (out / "summary.json").exists()

    resumed = cli("train", job, "--no-ray", "--resume")
    assert resumed.code == 0, resumed
    whole = make_job("sig-whole", training=training)
    assert cli("train", whole, "--no-ray").code == 0
    assert train_losses(out)[-1] == pytest.approx(train_losses(tmp_path / "runs" / "sig-whole")[-1], rel=1e-6)


@pytest.mark.integration
def test_ctrl_c_under_ray_is_one_line_and_exit_130(make_job, tmp_path):
    job = make_job("ray-sig", training={"max_steps": 100000, "checkpoint_every": 2})
    process = start_cli("train", job, cwd=tmp_path)
    wait_for_steps(tmp_path / "runs" / "ray-sig", 3, process, timeout=240)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert TRACEBACK not in stdout + stderr
    ours = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert len(ours) == 1 and "(SIGINT)" in ours[0] and "--resume" in ours[0], stderr[-3000:]


@pytest.mark.integration
@pytest.mark.parametrize("logged_steps", [2, pytest.param(7, marks=pytest.mark.slow)])
def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint(logged_steps, make_job, cli, tmp_path):
    """SIGKILL while a checkpoint is written every step: --resume always finds a complete one and
    finishes with the loss of an uninterrupted run."""
    training = {"max_steps": 40, "checkpoint_every": 1, "keep_checkpoints": 2}
    job = make_job("killed", training=training)
    process = start_cli("train", job, "--no-ray", cwd=tmp_path)
    out = tmp_path / "runs" / "killed"
    wait_for_steps(out, logged_steps, process)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    resumed = cli("train", job, "--no-ray", "--resume")
    assert resumed.code == 0 and "Resumed from" in resumed.out, resumed
    assert cli("train", make_job("unkilled", training=training), "--no-ray").code == 0
    assert train_losses(out)[-1] == pytest.approx(train_losses(tmp_path / "runs" / "unkilled")[-1], rel=1e-6)
