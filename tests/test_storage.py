"""Run storage in an object store (a real S3-compatible server on 127.0.0.1): a run trained into
s3://, read back, exported, resumed on a machine that never saw it, and refused where it should be."""

from __future__ import annotations

import io
import json
import sys

import pytest
from conftest import train_losses
from run_rewind import rewind
from storage_server import loopback_store

from ftcluster.runs.paths import RunPaths


@pytest.fixture(scope="module")
def store():
    with loopback_store() as running:
        yield running


@pytest.fixture
def node_cache(tmp_path, monkeypatch):
    """This process's node-local working copies; `switch()` moves to a fresh one (another machine)."""
    caches = iter(tmp_path / f"cache-{i}" for i in range(10))

    def switch():
        folder = next(caches)
        monkeypatch.setenv("FTCLUSTER_CACHE", str(folder))
        return folder

    switch()
    return switch


def test_storage_uris_are_told_from_paths():
    from ftcluster.core.storage import is_uri, staging_dir

    assert is_uri("s3://bucket/run") and is_uri("gs://b/x") and is_uri("abfs://c@acct/x")
    assert not is_uri("runs/x") and not is_uri("/abs/runs") and not is_uri("file:///abs/runs")
    from ftcluster.core.storage import cache_root

    copy = staging_dir("s3://bucket/a/../../b/run/")  # never outside the cache, whatever the URI says
    assert copy.is_relative_to(cache_root()) and copy.parts[-5:] == ("s3", "bucket", "a", "b", "run")


def test_a_run_trained_into_s3_is_read_exported_and_loaded_from_there(store, node_cache, make_job, cli, tmp_path,
                                                                      monkeypatch):
    job = make_job("stored", training={"max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 1},
                   eval={"before_after": True})
    run = store.uri("team", "stored")
    result = cli("train", job, "--no-ray", f"output.dir={run}")
    assert result.code == 0, result
    assert f"Outputs in {run}" in result.out
    keys = store.keys("team/stored/")
    for key in ("summary.json", "metrics.jsonl", "run.yaml", "eval_before.json", "eval_after.json",
                "final/adapter/adapter_model.safetensors", "final/tokenizer/tokenizer.json",
                "checkpoints/latest", "checkpoints/step-0000004/trainer_state.json"):
        assert f"team/stored/{key}" in keys, key
    assert json.loads(store.read("team/stored/summary.json"))["steps"] == 4

    node_cache()  # a laptop that never saw the run's working copy
    out = tmp_path / "merged"
    result = cli("export", run, "--merge", "--out", out)
    assert result.code == 0, result
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    reported = cli("report", run)  # stored beside the run; the line names the URI, then the copy to open
    assert reported.code == 0 and f"wrote {run}/report.html (open the copy here: " in reported.out, reported
    assert "<html>" in store.read("team/stored/report.html").decode()
    assert cli("eval", run).code == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("add 2 and 3\n"))
    chatted = cli("chat", run, "--compare", "--max-new-tokens", "4")  # the stored run, talked to from here
    assert chatted.code == 0 and "you> add 2 and 3" in chatted.out and "fine-tuned" in chatted.out, chatted
    node_cache()
    fetched = cli("fetch", run, "--out", tmp_path / "here")  # by its URI: no cluster involved
    assert fetched.code == 0, fetched
    assert json.loads((tmp_path / "here" / "summary.json").read_text())["steps"] == 4
    assert (tmp_path / "here" / "report.html").is_file() and not (tmp_path / "here" / "checkpoints").exists()


def test_resume_from_the_store_on_another_machine_equals_an_uninterrupted_run(store, node_cache, make_job, cli):
    from ftcluster.core.storage import staging_dir

    training = {"max_steps": 6, "checkpoint_every": 2, "scheduler": "cosine", "warmup_steps": 1}
    whole = make_job("whole", training=training)
    assert cli("train", whole, "--no-ray").code == 0
    part = make_job("part", training=training)
    run = store.uri("part")
    assert cli("train", part, "--no-ray", f"output.dir={run}").code == 0
    rewind(run, 4)  # in the store: as if it had stopped after step 4's checkpoint
    node_cache()  # the resumed run starts on a machine with an empty cache: everything comes from the store
    result = cli("train", part, "--no-ray", f"output.dir={run}", "--resume")
    assert result.code == 0, result
    resumed = staging_dir(run)
    assert "Resumed from" in result.out
    assert train_losses(resumed) == pytest.approx(train_losses(make_job_dir(whole)), rel=1e-5)
    assert json.loads(store.read("part/summary.json"))["steps"] == 6


def make_job_dir(job) -> object:
    from ftcluster.config.spec import load_spec

    return RunPaths.of(load_spec(job)).local


def test_a_store_that_holds_a_run_is_not_overwritten_unless_asked(store, node_cache, make_job, cli):
    job = make_job("twice")
    run = store.uri("twice")
    assert cli("train", job, "--no-ray", f"output.dir={run}").code == 0
    before = store.read("twice/summary.json")
    again = cli("train", job, "--no-ray", f"output.dir={run}")
    assert again.code == 2 and f"output.dir: {run} already holds a run" in again.err
    assert store.read("twice/summary.json") == before
    missing = cli("train", job, "--no-ray", f"output.dir={store.uri('twice')}-nothing", "--resume")
    assert missing.code == 2 and "has no complete checkpoint to resume from" in missing.err


def test_an_unreachable_store_is_one_line(store, node_cache, make_job, cli):
    job = make_job("nowhere")
    result = cli("train", job, "--no-ray", "output.dir=s3://no-such-bucket/run")
    assert result.code == 2
    assert result.err.strip().count("\n") == 0 and "s3://no-such-bucket/run" in result.err
    assert cli("export", "s3://runs/never-trained", "--out", "x").code == 2


def test_submit_says_where_a_stored_run_lands_and_how_to_fetch_it():
    from ftcluster.cluster.jobs import output_note

    assert output_note("s3://team/runs/sub-1", "job-1") == \
        "outputs: s3://team/runs/sub-1 (when it has finished, from any machine: ftcluster fetch job-1 [--merge])"
    relative = output_note("runs/sub-1", "job-1")
    assert "is relative" in relative and "storage URI" in relative
    assert "works only where this path is mounted" in output_note("/shared/runs/sub-1", "job-1")


def test_sigterm_mid_run_into_the_store_then_resume_elsewhere_equals_an_uninterrupted_run(store, node_cache, make_job,
                                                                                            cli, tmp_path):
    """What a pod eviction does to `ftcluster train --no-ray output.dir=s3://...`: exit 143 with one line
    naming the checkpoint in the store and --resume; the resumed run, on a machine with an empty
    cache, ends with the uninterrupted run's losses."""
    import signal

    from test_reliability import TRACEBACK, start_cli, wait_for_steps

    from ftcluster.core.storage import staging_dir

    training = {"max_steps": 150, "checkpoint_every": 1000, "scheduler": "cosine", "warmup_steps": 5}
    job, run = make_job("evicted", training=training), store.uri("evicted")
    process = start_cli("train", job, "--no-ray", f"output.dir={run}", cwd=tmp_path)
    wait_for_steps(staging_dir(run), 3, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert TRACEBACK not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted (SIGTERM) at step" in lines[0] and "--resume" in lines[0], stderr
    assert f"checkpoint: {run}/checkpoints/step-" in lines[0]
    assert store.keys("evicted/checkpoints/latest") and not store.keys("evicted/summary.json")

    node_cache()  # another machine: everything comes from the store
    resumed = cli("train", job, "--no-ray", f"output.dir={run}", "--resume")
    assert resumed.code == 0, resumed
    assert cli("train", make_job("evicted-whole", training=training), "--no-ray").code == 0
    assert train_losses(staging_dir(run))[-1] == pytest.approx(
        train_losses(tmp_path / "runs" / "evicted-whole")[-1], rel=1e-6)


def test_run_files_are_pushed_only_when_they_changed(store, node_cache, make_job, monkeypatch):
    """Every checkpoint pushes the run files: what did not change since the last push stays put."""
    from ftcluster.config.spec import load_spec
    from ftcluster.core.storage import RemoteFolder
    from ftcluster.runs.mirror import push_run_files

    spec = load_spec(make_job("pushed", output={"dir": store.uri("pushed")}))
    out = RunPaths.of(spec).local
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "wandb").mkdir()
    (out / "wandb" / "run.wandb").write_text("records")
    sent: list[tuple[str, ...]] = []
    upload = RemoteFolder.upload
    monkeypatch.setattr(RemoteFolder, "upload", lambda self, local, *parts: sent.append(parts) or upload(self, local, *parts))
    push_run_files(spec)
    assert sorted(sent) == [("metrics.jsonl",), ("wandb", "run.wandb")]
    sent.clear()
    with (out / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 2}\n')
    push_run_files(spec)
    assert sent == [("metrics.jsonl",)]  # W&B's file did not change
    assert store.read("pushed/metrics.jsonl").decode().count("step") == 2
    assert store.read("pushed/wandb/run.wandb") == b"records"


@pytest.fixture
def own_ray():
    """A local Ray started inside the test, after the store's endpoint is set, and ended after it."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def test_a_sweep_into_the_store_lands_there_and_is_reported_and_resumed_from_another_machine(
        store, node_cache, own_ray, make_job, cli, tmp_path):
    import yaml

    job = make_job("swept", training={"max_steps": 6, "log_every": 2}, eval={"every": 3},
                   scaling={"cpus_per_worker": 0.5})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"training.lr": {"grid": [1e-3, 3e-2]}}))
    sweep = store.uri("sweeps", "lr")
    result = cli("tune", job, space, "--searcher", "grid", "--concurrent", "2", "--scheduler", "none", "--out", sweep)
    assert result.code == 0, result
    assert f"→ {sweep}" in result.out and f"ftcluster report {sweep}" in result.out
    assert f"Best spec: {sweep}/best.yaml (copy here: " in result.out and f"Leaderboard: {sweep}/leaderboard.csv" in result.out
    keys = store.keys("sweeps/lr/")
    board = json.loads(store.read("sweeps/lr/leaderboard.json"))
    rows = board["rows"]
    assert len(rows) == 2 and all(r["status"] == "completed" and r["steps"] == 6 for r in rows)
    for row in rows:  # each trial is a run in the store: read back as any stored run is
        trial = f"sweeps/lr/trials/{row['trial']}"
        for name in ("trial.json", "summary.json", "run.yaml", "metrics.jsonl", "final/adapter/adapter_model.safetensors"):
            assert f"{trial}/{name}" in keys, name
        summary = json.loads(store.read(f"{trial}/summary.json"))
        assert summary["after"]["val_loss"] == pytest.approx(row["metric"])
        assert yaml.safe_load(store.read(f"{trial}/run.yaml"))["output"]["dir"] == f"{sweep}/trials/{row['trial']}"
    for name in ("sweep.json", "leaderboard.csv", "best.yaml"):
        assert f"sweeps/lr/{name}" in keys, name
    assert any(key.startswith("sweeps/lr/tune/experiment_state-") for key in keys)  # Ray Tune's state, for --resume
    best = yaml.safe_load(store.read("sweeps/lr/best.yaml"))
    assert best["output"]["dir"] == f"{sweep}/best-run"

    laptop = node_cache()  # a machine that never saw the sweep
    reported = cli("report", sweep)
    assert reported.code == 0 and f"wrote {sweep}/report.html" in reported.out, reported
    assert "sweeps/lr/report.html" in store.keys("sweeps/lr/")
    page = (laptop / "runs" / "s3" / store.bucket / "sweeps" / "lr" / "report.html").read_text()
    assert all(row["trial"] in page for row in rows) and page.count("data:image/png;base64,") == 2

    summaries = [store.read(f"sweeps/lr/trials/{row['trial']}/summary.json") for row in rows]
    node_cache()  # resume the (finished) sweep elsewhere: Tune's state and the trials come from the store
    resumed = cli("tune", "--resume", sweep)
    assert resumed.code == 0, resumed
    again = json.loads(store.read("sweeps/lr/leaderboard.json"))["rows"]
    assert [(r["trial"], r["metric"], r["steps"]) for r in again] == [(r["trial"], r["metric"], r["steps"]) for r in rows]
    assert [store.read(f"sweeps/lr/trials/{row['trial']}/summary.json") for row in rows] == summaries  # none retrained
    refused = cli("tune", job, space, "--searcher", "grid", "--out", sweep)
    assert refused.code == 2 and f"{sweep}: already holds a sweep" in refused.err
