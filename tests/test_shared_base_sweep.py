"""`ftcluster tune --shared-base N` under Ray Tune: packs of LoRA trials over one base, each trial still
its own folder, metrics, checkpoints, W&B run, leaderboard row; trials that cannot share run alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import read_metrics
from test_sweep import SPACE, sweep_job  # noqa: F401  (the fixture)
from test_tracking import wandb_inspect


def test_shared_base_sweep_packs_lora_trials_and_runs_full_ones_alone(sweep_job, cli, tmp_path):  # noqa: F811
    # (max_weight_growth: null: the tiny random model's full trials hover at a uniform guess's loss, which the
    # collapse check would stop)
    job, space = sweep_job(tracking={"wandb": {"project": "ftcluster-test"}}, training={"max_weight_growth": None, "checkpoint_every": 4})
    space.write_text(yaml.safe_dump({**SPACE, "method.name": {"choice": ["lora", "full"]},
                                     "training.seed": {"choice": [0, 1, 2]}}))
    out = tmp_path / "sweep"
    result = cli("tune", job, space, "--trials", "6", "--concurrent", "2", "--shared-base", "4", "--seed", "19",
                 "--out", out)  # seed 19: 4 LoRA trials (one pack), 2 full ones
    assert result.code == 0, result
    packs = json.loads((out / "packs.json").read_text())
    shared = [p for p in packs if p["shared"]]
    alone = [p for p in packs if not p["shared"]]
    lora = sum(len(p["members"]) for p in shared)
    assert (lora, len(shared), len(alone)) == (4, 1, 2)
    assert "4 trials share a base: 1 pack of up to 4" in result.out
    assert "2 trials run as ordinary trials: method.name=full" in result.out

    rows = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert len(rows) == 6 and all(r["metric"] is not None for r in rows)
    members = [r for r in rows if (out / "trials" / r["trial"] / "shared_base.json").is_file()]
    assert len(members) == lora and all(r["params"]["method.name"] == "lora" for r in members)
    assert {"completed", "stopped early"} <= {r["status"] for r in members}, rows  # ASHA ranked the pack's trials
    for row in members:
        folder = out / "trials" / row["trial"]
        shared_base = json.loads((folder / "shared_base.json").read_text())
        assert shared_base["base"] == yaml.safe_load((folder / "run.yaml").read_text())["model"]["path"]
        checkpoint = next((folder / "checkpoints").glob("step-*"))  # its adapter's weights and optimizer only
        from safetensors.torch import load_file

        names = set(load_file(str(checkpoint / "model.safetensors")))
        assert names and all(f".{shared_base['adapter']}." in name and "lora_" in name for name in names)
        run_dir = next((folder / "wandb").glob("offline-run-*"))  # its own W&B run, closed as it ended
        summary = json.dumps(json.loads(wandb_inspect(run_dir, "--summary", "--json")))
        if row["status"] == "completed":
            assert "after/val_loss" in summary and (folder / "final" / "adapter" / "adapter_config.json").is_file()
        else:
            assert "stopped by the sweep's scheduler" in summary and row["steps"] < 16

    # a completed pack member, trained again alone from its run.yaml, gives its metric
    member = next(r for r in members if r["status"] == "completed")
    rerun = cli("train", out / "trials" / member["trial"] / "run.yaml", "--no-ray", f"output.dir={tmp_path / 'again'}")
    assert rerun.code == 0, rerun
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["after"]["val_loss"] == pytest.approx(member["metric"], rel=1e-4)
    assert (out / "best.yaml").is_file()


def test_shared_base_refuses_what_it_cannot_do(sweep_job, cli, tmp_path):  # noqa: F811
    job, space = sweep_job(training={"checkpoint_every": 4})
    result = cli("tune", job, space, "--shared-base", "4", "--searcher", "grid", "--out", tmp_path / "s")
    assert result.code != 0 and "--searcher grid needs at least one" in result.err
    result = cli("tune", job, space, "--shared-base", "0", "--out", tmp_path / "s")
    assert result.code != 0 and "--shared-base: must be at least 1" in result.err


def test_pbt_inside_a_pack_copies_the_best_adapters_into_the_worst(sweep_job, cli, tmp_path):  # noqa: F811
    """`tune --scheduler pbt --shared-base 4`: at each checkpoint the pack's worst trial continues from its best
    one's checkpoint (its adapter copied, rank included) with that trial's values explored; every exploit is
    logged; the trial's folder, trial.json, W&B run and final adapter follow its new values."""
    from safetensors.torch import load_file

    job, space = sweep_job(tracking={"wandb": {"project": "ftcluster-test"}},
                           training={"checkpoint_every": 4, "keep_checkpoints": 8})
    out = tmp_path / "sweep"
    result = cli("tune", job, space, "--trials", "4", "--shared-base", "4", "--scheduler", "pbt", "--out", out)
    assert result.code == 0, result
    (pack,) = json.loads((out / "packs.json").read_text())
    (log,) = (out / "trials").glob("*.pbt.jsonl")  # <pack id>.pbt.jsonl; its members are <pack id>-<index>
    values = {f"{log.name.split('.')[0]}-{index}": chosen for index, chosen in enumerate(pack["members"])}
    exploits = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["step"] for e in exploits] == [4, 8, 12]  # 4 trials: the bottom quarter (one) copies the top one
    for exploit in exploits:
        donor, recipient = exploit["from"], exploit["member"]
        assert donor != recipient and exploit["chosen"]["method.lora.rank"] == values[donor]["method.lora.rank"]
        step = f"step-{exploit['step']:07d}"  # the recipient's checkpoint of the step is the donor's adapter
        copied = load_file(str(out / "trials" / recipient / "checkpoints" / step / "model.safetensors"))
        original = load_file(str(out / "trials" / donor / "checkpoints" / step / "model.safetensors"))
        shared = json.loads((out / "trials" / donor / "shared_base.json").read_text())["adapter"]
        mine = json.loads((out / "trials" / recipient / "shared_base.json").read_text())["adapter"]
        assert {name.replace(f".{mine}.", f".{shared}."): tensor for name, tensor in copied.items()}.keys() == original.keys()
        assert all((copied[name.replace(f".{shared}.", f".{mine}.")] == tensor).all() for name, tensor in original.items())
        values[recipient] = exploit["chosen"]
    rows = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["status"] == "completed" and r["steps"] == 16 for r in rows)
    for row in rows:
        chosen = values[row["trial"]]
        assert row["params"]["training.lr"] == pytest.approx(chosen["training.lr"])
        assert row["params"]["method.lora.alpha"] == 2 * chosen["method.lora.rank"]
        adapter = json.loads((out / "trials" / row["trial"] / "final" / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == chosen["method.lora.rank"]
    recipient = out / "trials" / exploits[-1]["member"]
    steps = [r["step"] for r in read_metrics(recipient) if "train_loss" in r]
    assert steps == list(range(2, 17, 2))  # one history, continued across the exploits
    run_dir = sorted((recipient / "wandb").glob("offline-run-*"))[-1]  # its W&B run resumed, completed
    assert "after/val_loss" in json.dumps(json.loads(wandb_inspect(run_dir, "--summary", "--json")))


def test_interrupted_shared_base_sweep_resumes_every_trial_exactly(sweep_job, tmp_path):  # noqa: F811
    """Ctrl+C while a pack trains, then `tune --resume`: the pack restarts from its trials' checkpoints and
    each trial's losses are those of the same trial trained alone, uninterrupted."""
    from conftest import read_metrics

    from ftcluster.config.spec import load_spec
    from ftcluster.core.worker import WorkerContext
    from ftcluster.training.loop import train

    job, space = sweep_job(training={"max_steps": 24, "log_every": 2, "checkpoint_every": 4})
    out = tmp_path / "sweep"
    ftcluster = Path(sys.executable).with_name("ftcluster")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [str(ftcluster), "tune", str(job), str(space), "--trials", "3", "--concurrent", "1",
               "--scheduler", "none", "--shared-base", "3", "--out", str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "trials").glob("*/checkpoints/step-0000008")):
        time.sleep(0.3)
    assert list((out / "trials").glob("*/checkpoints/step-0000008")), "no pack trial reached step 8 in time"
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 130, output[-3000:]
    assert not list((out / "trials").glob("*/summary.json"))  # stopped mid-pack
    resumed = subprocess.run([str(ftcluster), "tune", "--resume", str(out)], env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert len(rows) == 3 and all(r["status"] == "completed" and r["steps"] == 24 for r in rows)
    for row in rows:
        folder = out / "trials" / row["trial"]
        spec = load_spec(folder / "run.yaml", [f"output.dir={tmp_path / 'alone' / row['trial']}"])
        train(spec, WorkerContext(), verbose=False)
        got = [(r["step"], r["train_loss"]) for r in read_metrics(folder) if "train_loss" in r]
        want = [(r["step"], r["train_loss"]) for r in read_metrics(tmp_path / "alone" / row["trial"]) if "train_loss" in r]
        assert [s for s, _ in got] == [s for s, _ in want] == list(range(2, 25, 2))
        assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-4)
