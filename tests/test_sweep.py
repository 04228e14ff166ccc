"""Sweeps: search spaces checked against the spec, searchers and budget, and real Ray Tune sweeps."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, deep_update, read_metrics

from ftcluster.config.spec import load_spec
from ftcluster.core.errors import FtError
from ftcluster.sweep.leaderboard import pareto_front
from ftcluster.sweep.searchers import BudgetLimiter, GridSearcher, RandomSearcher
from ftcluster.sweep.space import evaluate_expression, load_space, parse_space
from ftcluster.sweep.trial import finished_report

# Which job each shipped space is meant for.
SHIPPED = {"lora.yaml": "quickstart.yaml", "unfreeze.yaml": "classify-minilm.yaml", "full.yaml": "classify-minilm.yaml",
           "grpo.yaml": "grpo-smollm2.yaml"}
SPACE = {
    "training.lr": {"loguniform": [1.0e-5, 3.0e-2]},
    "method.lora.rank": {"choice": [2, 4, 8]},
    "method.lora.alpha": {"expr": "2 * method.lora.rank"},
}


def base_spec(job: str = "quickstart.yaml") -> dict:
    return load_spec(REPO / "jobs" / job).model_dump(mode="json")


def test_every_shipped_space_is_valid_for_its_job():
    shipped = {p.name for p in (REPO / "tune_spaces").glob("*.yaml")}
    assert shipped == set(SHIPPED)
    for space_file, job in SHIPPED.items():
        base = base_spec(job)
        space = load_space(REPO / "tune_spaces" / space_file, base)
        values = space.resolve(space.random_sample(random.Random(0)), base)
        assert values and all("." in key for key in values)


def test_tied_expression_and_whole_block_choices():
    base = base_spec()
    space = parse_space({**SPACE, "method.name": {"choice": ["lora", "dora"]}}, "s.yaml", base)
    chosen = {"training.lr": 1e-4, "method.lora.rank": 8, "method.name": "dora"}
    raw = space.trial_raw(base, chosen)
    assert raw["method"]["lora"]["alpha"] == 16 and raw["method"]["name"] == "dora"
    minilm = base_spec("classify-minilm.yaml")
    schedule = {"every": 5, "unit": "steps", "blocks_per_group": 1, "initial_groups": 0}
    space = parse_space({"method.unfreeze": {"choice": [None, schedule]}}, "s.yaml", minilm)
    assert space.trial_raw(minilm, {"method.unfreeze": schedule})["method"]["unfreeze"] == schedule
    assert evaluate_expression("max(4, training.batch_size // 2)", {}, base, "x") == 4


@pytest.mark.parametrize("entry, message", [
    ({"training.lrr": {"choice": [1e-4]}}, "s.yaml: training.lrr: unknown key (valid keys: epochs"),
    ({"training.lr": {"loguniform": [0, 1]}}, "s.yaml: training.lr: loguniform: bounds must be positive"),
    ({"training.lr": {"uniform": [1]}}, "s.yaml: training.lr: uniform: expected [low, high] of numbers"),
    ({"method.lora.rank": {"choice": [4, "big"]}}, "s.yaml: method.lora.rank: value 'big': method.lora.rank: Input should be a valid integer"),
    ({"training.batch_size": {"quniform": [1, 10, 2]}}, "s.yaml: training.batch_size: quniform: Your lower variable bound 1"),
    ({"method.lora.alpha": {"expr": "2 * method.lora.rnk"}}, "method.lora.rnk is neither searched nor set in the job spec"),
    ({"method.lora.alpha": {"expr": "__import__('os').system('true')"}}, "is not allowed"),
    ({"method.unfreeze": {"choice": [None, {"every": 3}]}}, "unfreeze schedules apply to full and freeze, not lora"),
    ({"output.dir": {"choice": ["a", "b"]}}, "s.yaml: output.dir: set by the sweep for every trial"),
    ({"training.warmup_steps": 3}, "s.yaml: no distributions"),
])
def test_bad_space_is_one_line_naming_file_and_key(entry, message):
    with pytest.raises(FtError) as caught:
        parse_space(entry, "s.yaml", base_spec())
    text = str(caught.value)
    assert message in text and len(text.splitlines()) == 1, text


def test_searchers_grid_random_and_budget():
    base = base_spec()
    space = parse_space({"training.lr": {"grid": [1e-4, 1e-3]}, "method.lora.rank": {"grid": [4, 8]},
                         "training.warmup_steps": {"randint": [0, 5]}}, "s.yaml", base)
    grid = GridSearcher(space, seed=0)
    points = [grid.suggest(str(i)) for i in range(5)]
    assert points[4] == "FINISHED"
    assert {(p["training.lr"], p["method.lora.rank"]) for p in points[:4]} == {(1e-4, 4), (1e-4, 8), (1e-3, 4), (1e-3, 8)}
    assert all(0 <= p["training.warmup_steps"] <= 5 for p in points[:4])
    first = [RandomSearcher(space, seed=3).suggest(str(i)) for i in range(1)]
    assert first == [RandomSearcher(space, seed=3).suggest("0")]  # same seed, same trials

    limited = BudgetLimiter(RandomSearcher(space, seed=0), max_gpu_hours=None, max_cost_usd=1.0)
    assert isinstance(limited.suggest("a"), dict)
    limited.on_trial_result("a", {"cost_usd": 0.6, "step": 4})
    assert isinstance(limited.suggest("b"), dict)
    limited.on_trial_result("b", {"cost_usd": 0.5, "step": 4})  # 1.1 spent across trials
    assert limited.suggest("c") == "FINISHED" and limited.exhausted


def test_pareto_front():
    points = [(1.0, 0.50), (2.0, 0.40), (3.0, 0.45), (0.5, 0.90), (4.0, 0.40)]
    assert pareto_front(points, "min") == [3, 0, 1]
    assert pareto_front([(1.0, 0.2), (2.0, 0.9), (3.0, 0.5)], "max") == [0, 1]


def test_the_sweep_report_fronts_completed_trials_and_fits_a_laptop_window(tmp_path):
    """A trial the scheduler stopped is cheap because it stopped: it is never on the Pareto front. The
    leaderboard of many searched keys wraps its dotted headers and scrolls inside its own box."""
    from ftcluster.results.report import write_sweep_report
    from ftcluster.sweep.leaderboard import TrialRow, write_leaderboard

    keys = {f"method.lora.setting_{i}": i / 3 for i in range(8)}
    rows = [TrialRow(name, keys, metric, metric, steps, status, 100, 0.0, 0.01, cost, 1.0)
            for name, metric, steps, status, cost in (("done-a", 0.50, 16, "completed", 0.020),
                                                      ("done-b", 0.40, 16, "completed", 0.030),
                                                      ("cut", 0.45, 4, "stopped early", 0.005))]
    for row in rows:
        (tmp_path / "trials" / row.trial).mkdir(parents=True)
    write_leaderboard(tmp_path, rows, "val_loss", "min", {})
    board = json.loads((tmp_path / "leaderboard.json").read_text())
    assert board["pareto_front"] == ["done-a", "done-b"]  # the stopped trial would have led it
    page = write_sweep_report(tmp_path).read_text()
    assert '<div class="wide"><table>' in page and "method.<wbr>lora.<wbr>setting_7" in page
    assert "img{max-width:100%}" in page


# --- real sweeps on the tiny model ----------------------------------------------------------------


@pytest.fixture
def sweep_job(make_job, tmp_path):
    def make(**extra) -> tuple[Path, Path]:
        sections = deep_update({"training": {"max_steps": 16, "log_every": 2}, "eval": {"every": 4},
                                "scaling": {"cpus_per_worker": 0.5}}, extra)
        job = make_job("tiny", **sections)
        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump(SPACE))
        return job, space

    return make


def test_asha_sweep_stops_some_trials_and_writes_leaderboard_and_best(sweep_job, cli, tmp_path):
    job, space = sweep_job(tracking={"wandb": {"project": "ftcluster-test"}})
    out = tmp_path / "sweep"
    result = cli("tune", job, space, "--trials", "6", "--concurrent", "3", "--out", out)
    assert result.code == 0, result
    board = json.loads((out / "leaderboard.json").read_text())
    rows = board["rows"]
    assert len(rows) == 6 and board["metric"] == "val_loss"
    statuses = [r["status"] for r in rows]
    assert "stopped early" in statuses and "completed" in statuses  # ASHA cut some trials short
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert all(r["steps"] < 16 for r in stopped)
    metrics = [r["metric"] for r in rows]
    assert all(m is not None for m in metrics)
    assert [r["metric"] for r in rows if r["status"] == "completed"] == sorted(
        r["metric"] for r in rows if r["status"] == "completed")
    for row in rows:  # tied expression applied, every trial in its own folder
        assert row["params"]["method.lora.alpha"] == 2 * row["params"]["method.lora.rank"]
        trial_spec = yaml.safe_load((out / "trials" / row["trial"] / "run.yaml").read_text())
        assert trial_spec["output"]["dir"] == str(out / "trials" / row["trial"])
        assert trial_spec["method"]["lora"]["rank"] == row["params"]["method.lora.rank"]
    for row in rows:  # a finished trial that Tune restarts (resume after Ctrl+C) replays its report
        folder = out / "trials" / row["trial"]
        replay = finished_report(folder, row["params"])
        if row["status"] == "completed":
            assert replay["completed"] == 1 and replay["val_loss"] == pytest.approx(row["metric"])
            assert replay["step"] == 16 and replay["tokens"] > 0
        else:
            assert replay is None
        assert finished_report(folder, {**row["params"], "training.lr": 1.0}) is None
    csv_lines = (out / "leaderboard.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and "method.lora.rank" in csv_lines[0]
    assert "Sweep tiny-sweep" in result.out and "stopped early" in result.out

    # W&B: every trial's run in the sweep's group, plus a summary run with the cost table
    from test_tracking import wandb_inspect

    trial_runs = list((out / "trials").glob("*/wandb/offline-run-*"))
    assert len(trial_runs) == 6
    for row in rows:  # stopped trials too: config, history and summary, with how the run ended
        run_dir = next((out / "trials" / row["trial"] / "wandb").glob("offline-run-*"))
        records = wandb_inspect(run_dir, "--json")
        assert '"tiny-sweep"' in records and "train_loss" in records, row
        summary = json.dumps(json.loads(wandb_inspect(run_dir, "--summary", "--json")))
        if row["status"] == "stopped early":
            assert "stopped by the sweep's scheduler" in summary, row
        else:
            assert "after/val_loss" in summary, row
    summary_runs = list((out / "wandb").glob("offline-run-*"))
    assert len(summary_runs) == 1
    records = wandb_inspect(summary_runs[0], "--json")
    assert "sweep/cost_table" in records and "tiny-sweep" in records
    table = json.loads(next(summary_runs[0].rglob("cost_table*.table.json")).read_text())
    assert {"training.lr", "method.lora.rank", "method.lora.alpha", "val_loss", "cost_usd"} <= set(table["columns"])
    assert len(table["data"]) == 6  # each searched value a column of its own, one row per trial

    # best.yaml: a valid spec of the best completed trial that reproduces its metric
    best_row = next(r for r in rows if r["status"] == "completed")
    assert cli("validate", out / "best.yaml").code == 0
    rerun = cli("train", out / "best.yaml", "--no-ray")
    assert rerun.code == 0, rerun
    summary = json.loads((out / "best-run" / "summary.json").read_text())
    assert summary["after"]["val_loss"] == pytest.approx(best_row["metric"], rel=1e-4)

    assert set(board["pareto_front"]) <= {r["trial"] for r in rows if r["status"] == "completed"}
    assert cli("report", out).code == 0
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "Pareto" in page
    import base64
    import re

    for encoded in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page):
        image = base64.b64decode(encoded)
        assert image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 5000  # real plots, not placeholders
    for row in rows:  # every trial is in the table
        assert row["trial"] in page


def test_budget_stops_launching_new_trials(sweep_job, cli, tmp_path):
    job, space = sweep_job()
    out = tmp_path / "sweep"
    result = cli("tune", job, space, "--trials", "8", "--concurrent", "1", "--scheduler", "none",
                 "--max-cost-usd", "1e-9", "--out", out)
    assert result.code == 0, result
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["budget_reached"] and len(board["rows"]) < 8
    assert all(r["status"] == "completed" for r in board["rows"])  # running trials finish
    assert "Budget reached" in result.out


def test_resume_loads_only_tune_state_this_machine_signed(sweep_job, cli, tmp_path, monkeypatch):
    """Ray Tune's saved state is pickles (code runs as they load): `--resume` loads it only as this
    machine's key signed it when the sweep ended, unless --trust-state."""
    from test_reliability import one_line_error

    monkeypatch.setenv("FTCLUSTER_STATE_KEY", str(tmp_path / "this-machine.key"))
    job, space = sweep_job(training={"max_steps": 4})
    out = tmp_path / "sweep"
    assert cli("tune", job, space, "--trials", "1", "--concurrent", "1", "--scheduler", "none", "--out", out).code == 0
    signed = json.loads((out / "tune-signature.json").read_text())["files"]
    pickled = next((out / "tune").glob("*.pkl"))
    assert pickled.name in signed
    original = pickled.read_bytes()
    pickled.write_bytes(original + b"\0")  # someone who can write to the sweep's folder
    one_line_error(cli("tune", "--resume", out), "changed since the sweep signed it", pickled.name, "--trust-state")
    pickled.write_bytes(original)
    monkeypatch.setenv("FTCLUSTER_STATE_KEY", str(tmp_path / "another-machine.key"))
    one_line_error(cli("tune", "--resume", out), "not made with this machine's key")
    resumed = cli("tune", "--resume", out, "--trust-state")  # a finished sweep: its results, nothing rerun
    assert resumed.code == 0 and "1 completed" in resumed.out, resumed


@pytest.mark.slow
def test_optuna_and_pbt_run(sweep_job, cli, tmp_path):
    job, space = sweep_job(training={"max_steps": 12, "log_every": 2, "checkpoint_every": 4})
    result = cli("tune", job, space, "--trials", "3", "--concurrent", "3", "--searcher", "optuna",
                 "--scheduler", "none", "--out", tmp_path / "optuna")
    assert result.code == 0, result
    assert len(json.loads((tmp_path / "optuna" / "leaderboard.json").read_text())["rows"]) == 3
    result = cli("tune", job, space, "--trials", "2", "--concurrent", "2", "--scheduler", "pbt",
                 "--out", tmp_path / "pbt")
    assert result.code == 0, result
    rows = json.loads((tmp_path / "pbt" / "leaderboard.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["steps"] == 12 for r in rows)


def test_bad_sweep_options_are_refused_before_launch(sweep_job, cli, tmp_path):
    job, space = sweep_job(eval={"every": None})
    result = cli("tune", job, space, "--out", tmp_path / "s")
    assert result.code == 2 and "eval.every: the asha scheduler compares trials at evaluations" in result.err
    job, space = sweep_job()
    result = cli("tune", job, space, "--scheduler", "pbt", "--out", tmp_path / "s")
    assert result.code == 2 and "training.checkpoint_every: pbt copies checkpoints" in result.err
    result = cli("tune", job, space, "--searcher", "grid", "--out", tmp_path / "s")
    assert result.code == 2 and "--searcher grid needs at least one {grid: [...]} key" in result.err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["path", "store"])
def test_interrupted_sweep_resumes(sweep_job, tmp_path, monkeypatch, where):
    """Ctrl+C mid-sweep, then `tune --resume`: into a folder, and into an S3 store on loopback
    (resumed by a machine with an empty cache, so everything it continues from is in the store)."""
    from storage_server import loopback_store

    from ftcluster.core.storage import staging_dir

    with contextlib.ExitStack() as stack:
        if where == "store":
            store = stack.enter_context(loopback_store())
            location = store.uri("sweeps", "interrupted")
            monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "cache-first"))
            out = staging_dir(location)  # the driver's copy, where this machine's trials write too
        else:
            location = str(tmp_path / "sweep")
            out = Path(location)
        interrupt_then_resume(sweep_job, tmp_path, monkeypatch, location, out)
        if where == "store":
            board = json.loads(store.read("sweeps/interrupted/leaderboard.json"))
            assert not board["interrupted"] and len(board["rows"]) == 4


def interrupt_then_resume(sweep_job, tmp_path, monkeypatch, location: str, out: Path) -> None:
    job, space = sweep_job(training={"max_steps": 40, "log_every": 4})
    ftcluster = Path(sys.executable).with_name("ftcluster")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [str(ftcluster), "tune", str(job), str(space), "--trials", "4", "--concurrent", "1",
               "--scheduler", "none", "--out", location]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "trials").glob("*/summary.json"))) < 1:
        time.sleep(0.5)
    first = list((out / "trials").glob("*/summary.json"))
    assert first, "no trial finished in time"
    first_summary = first[0].read_text()
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 130, output[-3000:]
    assert f"ftcluster tune --resume {location}" in output
    assert json.loads((out / "leaderboard.json").read_text())["interrupted"]

    if location != str(out):  # a store: resume on a machine with an empty cache
        env["FTCLUSTER_CACHE"] = str(tmp_path / "cache-second")
        from ftcluster.core.storage import staging_dir

        monkeypatch.setenv("FTCLUSTER_CACHE", env["FTCLUSTER_CACHE"])
        out = staging_dir(location)
    resumed = subprocess.run([str(ftcluster), "tune", "--resume", location], env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    board = json.loads((out / "leaderboard.json").read_text())
    assert not board["interrupted"] and len(board["rows"]) == 4
    assert all(r["status"] == "completed" and r["steps"] == 40 for r in board["rows"])
    finished = out / "trials" / first[0].parent.name / "summary.json"
    assert finished.read_text() == first_summary  # a finished trial is not run again
    for row in board["rows"]:
        steps = [r["step"] for r in read_metrics(out / "trials" / row["trial"]) if "train_loss" in r]
        assert steps == sorted(set(steps))  # one history per trial, no restarts mixed in


@pytest.mark.slow
def test_multi_worker_trials_get_their_own_train_group(sweep_job, cli, tmp_path):
    job, space = sweep_job(training={"max_steps": 4, "log_every": 2}, eval={"every": 2},
                           scaling={"num_workers": 2, "cpus_per_worker": 0.5})
    out = tmp_path / "sweep"
    result = cli("tune", job, space, "--trials", "2", "--concurrent", "1", "--scheduler", "none", "--out", out)
    assert result.code == 0, result
    rows = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["status"] == "completed" and r["metric"] is not None for r in rows)
    for row in rows:
        summary = json.loads((out / "trials" / row["trial"] / "summary.json").read_text())
        assert summary["world_size"] == 2  # a Ray Train group of two workers inside the trial
        assert (out / "trials" / row["trial"] / "ray").is_dir()
