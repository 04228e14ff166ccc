"""Job submission against a real Ray head this module starts on 127.0.0.1 with token auth."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, read_metrics
from storage_server import loopback_store
from test_grpo import grpo_job, prompt_files

from ftcluster.cluster.package import build_package
from ftcluster.cluster.target import resolve_target
from ftcluster.config.spec import load_spec
from ftcluster.core.errors import FtError

TOKEN = secrets.token_hex(16)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def store():
    """Run storage on loopback, started before the head: the cluster has the store's credentials (as a real
    cluster has its own, from an instance role or a Secret); a submission never carries them."""
    with loopback_store() as running:
        yield running


@pytest.fixture(scope="module")
def ray_head(store):
    """`ray start --head --block` on free loopback ports; terminating it stops this cluster only."""
    bin_dir = Path(sys.executable).parent
    dashboard = free_port()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    env.pop("RAY_ADDRESS", None)
    # Ray's socket paths must stay under 107 bytes: a short folder of its own, not pytest's deep tmp path.
    temp = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    command = [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--port", str(free_port()), "--dashboard-port", str(dashboard),
               "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
               "--metrics-export-port", str(free_port()), "--num-cpus", "2", "--temp-dir", str(temp)]
    # Its own process group: teardown ends the head and every Ray process it started at once (a polite
    # SIGTERM to `ray start --block` takes half a minute to wind the cluster down).
    log = temp / "head.log"
    with log.open("wb") as sink:
        head = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    import requests

    while time.time() < deadline and head.poll() is None:
        try:
            reply = requests.get(f"{address}/api/v0/nodes?detail=1", headers={"Authorization": f"Bearer {TOKEN}"},
                                 timeout=5)
            if reply.ok and reply.json()["data"]["result"]["result"]:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail(f"the Ray head did not come up: {log.read_text()[-3000:]}")
    yield address
    os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=60)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def on_cluster(ray_head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ray_head


def test_head_listens_on_loopback_only(on_cluster):
    import requests

    nodes = requests.get(f"{on_cluster}/api/v0/nodes?detail=1", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert [n["node_ip"] for n in nodes["data"]["result"]["result"]] == ["127.0.0.1"]


def test_submit_follow_and_fetch_the_run(on_cluster, store, make_job, cli, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from ftcluster.cluster.jobs import job_info

    monkeypatch.setenv("WANDB_API_KEY", "local-wandb-key-never-uploaded")
    monkeypatch.setenv("FTCLUSTER_EXAMPLE_SETTING", "1")
    job = make_job("remote", training={"max_steps": 6, "checkpoint_every": 3}, eval={"every": 3},
                   output={"dir": store.uri("runs", "{name}")})
    result = cli("submit", job, "--address", on_cluster, "--wait")
    assert result.code == 0, result
    assert "SUCCEEDED" in result.out and "after val_loss" in result.out
    listed = cli("jobs", "--address", on_cluster)
    assert "remote" in listed.out and "SUCCEEDED" in listed.out
    rows = json.loads(cli("jobs", "--address", on_cluster, "--json").out)
    assert any(row["name"] == "remote" and row["status"] == "SUCCEEDED" for row in rows)
    submitted = [line.strip() for line in result.out.splitlines() if line.strip().startswith("ftcluster-remote-")]
    job_id = submitted[-1]
    status = cli("status", job_id, "--address", on_cluster)
    assert status.code == 0 and "steps" in status.out and "SUCCEEDED" in status.out
    as_json = json.loads(cli("status", job_id, "--address", on_cluster, "--json").out)
    assert as_json["status"] == "SUCCEEDED" and as_json["summary"]["steps"] == 6
    full = cli("logs", job_id, "--address", on_cluster).out
    last = cli("logs", job_id, "--address", on_cluster, "--tail", "3").out
    assert last.splitlines() == full.splitlines()[-3:]
    followed = cli("logs", job_id, "--address", on_cluster, "--tail", "3", "--follow").out
    assert followed == last  # an ended job: the tail, and the stream adds nothing twice
    info = resolve_target(on_cluster, None).client().get_job_info(job_id)
    run_name = info.metadata["run_name"]  # NAME-YYYYmmdd-HHMMSS: each submission a run of its own
    assert run_name.startswith("remote-") and f"outputs: {store.uri('runs', run_name)}" in result.out
    env = info.runtime_env["env_vars"]
    assert env["FTCLUSTER_EXAMPLE_SETTING"] == "1" and env["AWS_ENDPOINT_URL"] == store.endpoint
    assert "WANDB_API_KEY" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert "local-wandb-key-never-uploaded" not in json.dumps(info.runtime_env)
    assert info.metadata["spec_sha256"] and info.metadata["ftcluster_job"] == "remote"
    for text in (result.out, result.err, listed.out, status.out):
        assert TOKEN not in text

    # The weights come back to this machine, from the store the job wrote to, and load with plain transformers.
    here = tmp_path / "fetched"
    fetched = cli("fetch", job_id, "--address", on_cluster, "--merge", "--out", here)
    assert fetched.code == 0, fetched
    assert json.loads((here / "summary.json").read_text())["steps"] == 6
    assert (here / "report.html").is_file() and (here / "final" / "adapter" / "adapter_config.json").is_file()
    assert not (here / "checkpoints").exists()
    AutoModelForCausalLM.from_pretrained(here / "merged")
    assert cli("fetch", job_id, "--address", on_cluster, "--out", here).code == 2  # never over a folder unasked
    assert cli("eval", here).code == 0  # the copy is a run folder of its own

    resumed = cli("submit", job, "training.max_steps=8", "--address", on_cluster, "--resume", job_id, "--wait")
    assert resumed.code == 0, resumed
    summary = json.loads(store.read(f"runs/{run_name}/summary.json"))
    assert summary["steps"] == 8 and summary["resumed_from_step"] in (3, 6)  # the same run, continued
    again = cli("submit", job, f"output.dir={tmp_path / 'runs' / '{name}'}", "--address", on_cluster)
    assert again.code == 0, again  # the same spec again: a new run, not "already holds a run"
    again_id = again.out.strip().splitlines()[-1]
    target = resolve_target(on_cluster, None)
    assert job_info(target, again_id)["run_name"] not in (run_name, None)
    cli("stop", again_id, "--address", on_cluster)
    unfinished = cli("fetch", again_id, "--address", on_cluster)
    assert unfinished.code == 2 and "is STOPPED: its run has not finished" in unfinished.err
    unknown = cli("submit", job, "--address", on_cluster, "--resume", "ftcluster-no-such-job")
    assert unknown.code == 2 and "no job ftcluster-no-such-job" in unknown.err


def test_failing_job_reports_failed_with_its_error_line(on_cluster, make_job, cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "add 1 and 2", "output": "3"}\n{"instruction": 5}\n')
    job = make_job("broken", data={"train": str(bad), "on_bad_row": "fail"})
    result = cli("submit", job, "--address", on_cluster, "--wait")
    assert result.code == 1, result
    assert "FAILED" in result.out
    assert "error:" in result.err and "train-bad.jsonl:2" in result.err


def test_stop_a_long_job(on_cluster, make_job, cli):
    from ftcluster.cluster.jobs import job_info, wait

    job = make_job("long", training={"max_steps": 100000, "log_every": 50}, output={"dir": "runs/{name}"})
    result = cli("submit", job, "--address", on_cluster)
    assert result.code == 0, result
    job_id = next(line.strip() for line in result.out.splitlines() if line.strip().startswith("ftcluster-long-"))
    target = resolve_target(on_cluster, None)
    deadline = time.time() + 120
    while job_info(target, job_id)["status"] != "RUNNING" and time.time() < deadline:
        time.sleep(1)
    stopped = cli("stop", job_id, "--address", on_cluster)
    assert stopped.code == 0 and "STOPPED" in stopped.out
    assert wait(target, job_id, 10) == "STOPPED"
    fetched = cli("fetch", job_id, "--address", on_cluster)
    assert fetched.code == 2 and "inside its working directory on the cluster's head node" in fetched.err


def test_job_the_cluster_cannot_run_is_refused_with_numbers(on_cluster, make_job, cli):
    result = cli("submit", make_job("gpu", scaling={"use_gpu": True, "num_workers": 2}), "--address", on_cluster)
    assert result.code == 2
    assert "the job needs 2 GPU (2 workers), the Ray cluster has 0" in result.err


@pytest.mark.slow
def test_sweep_submitted_to_the_cluster(on_cluster, make_job, cli, tmp_path):
    job = make_job("remote-sweep", training={"max_steps": 8}, eval={"every": 4}, scaling={"cpus_per_worker": 0.5},
                   output={"dir": str(tmp_path / "runs" / "remote-sweep")})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"training.lr": {"loguniform": [1e-4, 1e-2]}}))
    result = cli("submit", job, "--tune", space, "--tune-options", f"--trials 2 --out {tmp_path / 'sweep'}",
                 "--address", on_cluster, "--wait")
    assert result.code == 0, result
    board = json.loads((tmp_path / "sweep" / "leaderboard.json").read_text())
    assert len(board["rows"]) == 2


def test_profiles_and_bad_tokens(on_cluster, make_job, cli, tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    profiles = tmp_path / "clusters.yaml"
    profiles.write_text(yaml.safe_dump({"local": {"address": on_cluster, "token_file": str(token_file)}}))
    monkeypatch.setenv("FTCLUSTER_CLUSTERS", str(profiles))
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setattr("ftcluster.cluster.target.RAY_TOKEN_FILE", tmp_path / "no-such-token")
    assert cli("jobs", "--cluster", "local").code == 0
    missing = cli("jobs", "--cluster", "prod")
    assert missing.code == 2 and "no cluster profile 'prod' (profiles: local)" in missing.err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    wrong = cli("jobs", "--address", on_cluster)
    assert wrong.code == 2 and "authentication failed" in wrong.err and "not-the-token" not in wrong.err + wrong.out


def test_upload_is_limited_and_never_carries_secrets(make_job, tmp_path):
    spec = load_spec(make_job("pkg"))
    package = build_package(spec, tmp_path / "pkg-out", None, max_upload_mb=10)
    names = sorted(p.relative_to(package.folder).as_posix() for p in package.folder.rglob("*") if p.is_file())
    assert names == ["data/train-train.jsonl", "data/validation-val.jsonl", "job.yaml"]
    assert yaml.safe_load((package.folder / "job.yaml").read_text())["data"]["train"] == "data/train-train.jsonl"
    with pytest.raises(FtError, match=r"MB is over the 1e-05 MB limit .* put the data on shared storage"):
        build_package(spec, tmp_path / "small", None, max_upload_mb=0.00001)
    secret = tmp_path / "prod.env"
    secret.write_text("WANDB_API_KEY=abc\n")
    leaky = spec.model_copy(update={"data": spec.data.model_copy(update={"train": str(secret)})})
    with pytest.raises(FtError, match=r"prod\.env looks like a credentials file"):
        build_package(leaky, tmp_path / "leak", None, max_upload_mb=10)


def test_shards_a_glob_and_a_datasets_folder_travel_as_folders_and_uris_stay(make_job, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("part-0.jsonl", "part-1.jsonl"):
        (shards / name).write_text('{"instruction": "q", "output": "a"}\n')
    (shards / "notes.txt").write_text("not data")
    job = make_job("pkg", data={"train": str(shards / "part-*.jsonl"), "validation": str(shards)})
    package = build_package(load_spec(job), tmp_path / "pkg-out", None, max_upload_mb=10)
    names = sorted(p.relative_to(package.folder).as_posix() for p in package.folder.rglob("*") if p.is_file())
    assert names == ["data/train-part-_.jsonl/part-0.jsonl", "data/train-part-_.jsonl/part-1.jsonl",
                     "data/validation-shards/part-0.jsonl", "data/validation-shards/part-1.jsonl", "job.yaml"]
    (shards / "id_rsa").write_text("key")
    saved = tmp_path / "saved"
    shutil.copytree(shards, saved)
    (saved / "state.json").write_text("{}")  # a `datasets` folder travels whole: its secrets are refused
    job = make_job("pkg2", data={"train": str(saved), "validation": "s3://bucket/val/part-*.jsonl"})
    with pytest.raises(FtError, match=r"data.train: id_rsa looks like a credentials file"):
        build_package(load_spec(job), tmp_path / "pkg-2", None, max_upload_mb=10)
    (saved / "id_rsa").unlink()
    package = build_package(load_spec(job), tmp_path / "pkg-3", None, max_upload_mb=10)
    data = yaml.safe_load((package.folder / "job.yaml").read_text())["data"]
    assert data["validation"] == "s3://bucket/val/part-*.jsonl" and (package.folder / data["train"] / "state.json").is_file()


def test_pinned_requirements_leave_torch_to_the_image():
    from ftcluster.cluster.jobs import pinned_requirements

    pins = pinned_requirements()
    assert "ray[default,train,tune]==2.60.0" in pins
    assert all("==" in pin for pin in pins) and not any(pin.startswith("torch==") for pin in pins)


def test_address_is_required(cli, make_job, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("FTCLUSTER_CLUSTERS", str(tmp_path / "none.yaml"))
    result = cli("jobs")
    assert result.code == 2 and "no cluster address" in result.err


def test_an_autoscaling_cluster_takes_what_its_config_allows(on_cluster, make_job, cli, tmp_path):
    """Only the 2-CPU head is up; its `ray up` config lets the autoscaler add a 4-CPU node. A 3-worker job
    is refused against the nodes up now, accepted against the config; in the cluster (no node ever
    comes here) it fails after scaling.placement_timeout_s with the numbers, not after a day."""
    from ftcluster.cluster.jobs import job_info, job_logs, wait

    job = make_job("autoscaled", scaling={"num_workers": 3, "cpus_per_worker": 1, "placement_timeout_s": 5})
    refused = cli("submit", job, "--address", on_cluster)
    assert refused.code == 2 and "the job needs 3.25 CPU" in refused.err and "--cluster-config" in refused.err
    config = tmp_path / "autoscaling.yaml"
    config.write_text(yaml.safe_dump({
        "cluster_name": "t", "max_workers": 2, "head_node_type": "head", "provider": {"type": "local"},
        "available_node_types": {"head": {"resources": {"CPU": 2}, "node_config": {}},
                                 "cpu4": {"resources": {"CPU": 4}, "max_workers": 1, "node_config": {}}}}))
    accepted = cli("submit", job, "--address", on_cluster, "--cluster-config", config)
    assert accepted.code == 0, accepted
    job_id = accepted.out.strip().splitlines()[-1]
    target = resolve_target(on_cluster, None)
    assert wait(target, job_id, 240) == "FAILED", job_info(target, job_id)
    assert "scaling: 3 workers (1 CPU each) could not be placed within 5 s" in job_logs(target, job_id)
    unchecked = cli("submit", make_job("unchecked", scaling={"num_workers": 3}), "--address", on_cluster,
                    "--no-capacity-check")
    assert unchecked.code == 0, unchecked
    cli("stop", unchecked.out.strip().splitlines()[-1], "--address", on_cluster)


def test_the_entrypoint_names_what_the_clusters_python_lacks(tmp_path):
    """A head whose Python lacks ftcluster's dependencies: one line naming them, not a traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    bare = subprocess.run([sys.executable, "-S", "-m", "ftcluster", "train", "job.yaml"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # -S: no site-packages
    assert bare.returncode == 2 and bare.stderr.count("\n") == 1, bare.stderr
    assert "lacks torch, transformers" in bare.stderr and "--pip" in bare.stderr
    full = subprocess.run([sys.executable, "-m", "ftcluster", "--help"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert full.returncode == 0 and "submit" in full.stdout


def test_the_shipped_local_cluster_config_submits_and_a_short_head_says_what_to_set(on_cluster, cli):
    """cluster/local.yaml lists fixed machines (no node types to scale): the job is checked against the nodes
    up now. The quickstart's 2 CPUs per worker and the entrypoint's 0.25 do not fit this 2-CPU head: the
    refusal says what to set, and with it the job is submitted."""
    quickstart, config = REPO / "jobs" / "quickstart.yaml", REPO / "cluster" / "local.yaml"
    refused = cli("submit", quickstart, "--address", on_cluster, "--cluster-config", config)
    assert refused.code == 2 and "no head_node_type" not in refused.err, refused
    assert "the job needs 2.25 CPU" in refused.err and "set scaling.cpus_per_worker=1.75 or fewer" in refused.err
    accepted = cli("submit", quickstart, "scaling.cpus_per_worker=1.75", "--address", on_cluster,
                   "--cluster-config", config)
    assert accepted.code == 0, accepted
    assert cli("stop", accepted.out.strip().splitlines()[-1], "--address", on_cluster).code == 0


# --- the user's own code the spec names travels with the job ------------------------------------------

def write_module(path: Path, function: str = "x_share") -> Path:
    """A reward module: how much of a completion is the letter x."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"def {function}(prompt, completion, reference):\n"
                    "    return completion.count('x') / max(len(completion), 1)\n")
    return path


def test_a_reward_module_in_the_submitting_folder_runs_on_the_cluster(on_cluster, make_job, cli, tmp_path, monkeypatch):
    """my_rewards.py beside the user travels in the job's working directory: the run imports it there (the
    local file is deleted once submitted) and logs its reward."""
    from ftcluster.cluster.jobs import job_logs, wait

    module = write_module(tmp_path / "project" / "cluster_rewards.py")
    monkeypatch.chdir(module.parent)
    monkeypatch.delenv("FTCLUSTER_CODE_PATH", raising=False)  # no folder of this machine is named to the job
    job = grpo_job(make_job, "own-reward", prompt_files(tmp_path), [{"function": "cluster_rewards:x_share"}],
                   training={"max_steps": 2})
    result = cli("submit", job, "--address", on_cluster)
    assert result.code == 0, result
    assert "code: cluster_rewards (cluster_rewards.py) shipped with the job" in result.out
    module.unlink()
    target = resolve_target(on_cluster, None)
    job_id = result.out.strip().splitlines()[-1]
    assert wait(target, job_id, 300) == "SUCCEEDED", job_logs(target, job_id)[-3000:]
    logged = [record for record in read_metrics(tmp_path / "runs" / "own-reward") if "reward/x_share" in record]
    assert len(logged) == 2


def test_a_reward_module_not_here_is_refused_before_any_upload(on_cluster, make_job, cli, tmp_path, monkeypatch):
    from ftcluster.cluster.jobs import list_jobs

    monkeypatch.chdir(tmp_path)
    rewards = [{"function": "ftcluster.rewards:exact_answer"}, {"function": "absent_rewards:f"}]
    job = grpo_job(make_job, "absent-reward", prompt_files(tmp_path), rewards)
    result = cli("submit", job, "--address", on_cluster)
    assert result.code == 2 and result.err.count("\n") == 1 and "Traceback" not in result.err, result
    assert ("method.grpo.rewards[1].function: module absent_rewards is not importable from here; run ftcluster from "
            "the folder that holds absent_rewards.py") in result.err
    assert not any(row["name"] == "absent-reward" for row in list_jobs(resolve_target(on_cluster, None)))


def test_a_reward_package_travels_without_caches_secrets_or_links_out(make_job, tmp_path, monkeypatch):
    """A package folder travels whole at the upload's root (no __pycache__ or dot-folders), counted against
    the upload limit; installed modules are noted for the image; credentials-like files, links out of the
    folder and a package named like the upload's own data/ are refused, naming the spec key."""
    package = tmp_path / "project" / "team_rewards"
    write_module(package / "scoring.py")
    (package / "__init__.py").write_text("")
    (package / "__pycache__" / "scoring.cpython-311.pyc").parent.mkdir()
    (package / "__pycache__" / "scoring.cpython-311.pyc").write_bytes(b"\0")
    (package / ".git").mkdir()
    (package / ".git" / "config").write_text("[core]\n")
    monkeypatch.chdir(package.parent)
    rewards = [{"function": "team_rewards.scoring:x_share"}, {"function": "yaml:safe_load"},
               {"function": "ftcluster.rewards:exact_answer"}, {"function": "math:fabs"}]
    spec = load_spec(grpo_job(make_job, "pkg", prompt_files(tmp_path), rewards))
    built = build_package(spec, tmp_path / "out", None, max_upload_mb=10)
    names = sorted(p.relative_to(built.folder).as_posix() for p in built.folder.rglob("*") if p.is_file())
    assert [name for name in names if name.startswith("team_rewards")] == ["team_rewards/__init__.py",
                                                                           "team_rewards/scoring.py"]
    assert any(note.startswith("method.grpo.rewards[1].function: yaml is installed here") for note in built.notes)
    assert "code: team_rewards (2 files) shipped with the job" in " ".join(built.notes)

    (package / "weights.txt").write_text("x" * 2**20)
    with pytest.raises(FtError, match=r"over the 0.5 MB limit \(largest: weights.txt.*install big code in the"):
        build_package(spec, tmp_path / "big", None, max_upload_mb=0.5)
    (package / "weights.txt").unlink()
    (package / "deploy.pem").write_text("-----BEGIN PRIVATE KEY-----")
    with pytest.raises(FtError, match=r"method\.grpo\.rewards\[0\]\.function: .*deploy\.pem looks like a credentials"):
        build_package(spec, tmp_path / "leak", None, max_upload_mb=10)
    (package / "deploy.pem").unlink()
    (tmp_path / "aws_keys").write_text("AKIA...")
    (package / "keys.txt").symlink_to(tmp_path / "aws_keys")
    with pytest.raises(FtError, match=r"keys\.txt is a link to .*aws_keys, outside .*team_rewards"):
        build_package(spec, tmp_path / "link", None, max_upload_mb=10)
    write_module(tmp_path / "project" / "data" / "__init__.py")
    clash = load_spec(grpo_job(make_job, "clash", prompt_files(tmp_path), [{"function": "data:x_share"}]))
    with pytest.raises(FtError, match=r"rewards\[0\]\.function: the package data/ has the name of the upload's own"):
        build_package(clash, tmp_path / "clash", None, max_upload_mb=10)
