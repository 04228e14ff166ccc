"""One `train` per output.dir: a second one, started while the first runs, is refused in one line and the
first run's files are its own (metrics.jsonl holds one line per step); in a store, by a lease."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, read_metrics

TRACEBACK = "Traceback"


def start_train(job, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ftcluster.cli.app", "train", str(job), "--no-ray"], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.integration
def test_two_trains_into_one_output_dir_half_a_second_apart(make_job, tmp_path):
    job = make_job("twice", training={"max_steps": 120, "checkpoint_every": 10})
    first = start_train(job, tmp_path)
    time.sleep(0.5)
    second = start_train(job, tmp_path)
    results = [(p.returncode, out, err) for p in (first, second) for out, err in [p.communicate(timeout=300)]]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(code, err[-2000:]) for code, _, err in results]
    _, out, err = next(result for result in results if result[0] == 2)
    assert TRACEBACK not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "is in use by pid" in lines[0] and "output.dir" in lines[0], lines
    run = tmp_path / "runs" / "twice"
    assert [r["step"] for r in read_metrics(run) if "train_loss" in r] == list(range(1, 121))
    assert json.loads((run / "summary.json").read_text())["steps"] == 120
    assert not (run / ".lock").exists()  # released with the run


def test_the_folder_lock_is_held_for_the_block_and_released_after(tmp_path):
    from ftcluster.core.errors import FtError
    from ftcluster.runs.lock import folder_lock

    with folder_lock(tmp_path / "run", "runs/run"):
        holder = json.loads((tmp_path / "run" / ".lock").read_text())
        assert holder["pid"] == os.getpid()
        code = ("from pathlib import Path; from ftcluster.runs.lock import folder_lock\n"
                f"with folder_lock(Path({str(tmp_path / 'run')!r}), 'runs/run'): pass")
        probe = subprocess.run([sys.executable, "-c", code],
                               env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        assert probe.returncode == 1 and "runs/run is in use by pid" in probe.stderr, probe.stderr[-2000:]
        with pytest.raises(FtError, match="is in use"), folder_lock(tmp_path / "run", "runs/run"):
            pass  # (flock is per open file: this process is refused too)
    assert not (tmp_path / "run" / ".lock").exists()
    with folder_lock(tmp_path / "run", "runs/run"):
        pass


@pytest.mark.integration
def test_a_run_in_a_store_is_held_by_a_lease(monkeypatch, tmp_path):
    from storage_server import loopback_store

    from ftcluster.core.errors import FtError
    from ftcluster.core.storage import RemoteFolder
    from ftcluster.runs import lock

    monkeypatch.setattr(lock, "SETTLE_S", 0.1)
    with loopback_store() as store:
        remote = RemoteFolder(store.uri("leased"))
        with lock.store_lease(remote):
            assert json.loads(store.read("leased/.lock"))["pid"] == os.getpid()
            refused = f"output.dir: {store.uri('leased')} is in use by pid {os.getpid()}"
            with pytest.raises(FtError, match=refused), lock.store_lease(remote):
                pass
        assert "leased/.lock" not in store.keys("leased/")
        # A holder that died leaves its lease; once it has run out the run can be taken.
        remote.write_text(json.dumps({**lock.holder_record(time.time() - 1), "pid": 1}), ".lock")
        with lock.store_lease(remote):
            assert json.loads(store.read("leased/.lock"))["pid"] == os.getpid()
