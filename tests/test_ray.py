"""Under Ray Train (embedded local Ray): the same loop, on loopback only, same losses as --no-ray."""

import contextlib

import pytest
from conftest import read_metrics, train_losses


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from ftcluster.launch.launcher import init_ray

    init_ray(None)
    yield ray
    ray.shutdown()


def test_local_ray_listens_on_loopback_only(local_ray):
    nodes = local_ray.nodes()
    assert nodes and all(node["NodeManagerAddress"] == "127.0.0.1" for node in nodes)
    assert local_ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    from ray._private.worker import global_worker

    dashboard = global_worker.node.address_info.get("webui_url") or ""
    assert dashboard == "" or dashboard.startswith("127.0.0.1:")


def test_rays_transient_warnings_are_quiet_in_every_process_of_the_job(local_ray):
    """Ray Train's controller runs as an actor with runtime_env env_vars of its own; the job's setup
    hook still runs there, so a busy CPU's coordinator timeout does not print a traceback."""
    import logging

    from ftcluster.core.quiet import TRANSIENT_RAY_WARNINGS

    @local_ray.remote(num_cpus=0)
    class LikeTheTrainController:
        def levels(self) -> list[int]:
            return [logging.getLogger(name).getEffectiveLevel() for name in TRANSIENT_RAY_WARNINGS]

    probe = LikeTheTrainController.options(runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}}).remote()
    assert local_ray.get(probe.levels.remote()) == [logging.ERROR] * len(TRANSIENT_RAY_WARNINGS)


def test_no_socket_of_a_local_run_listens_beyond_loopback(local_ray, make_job):
    """Every listening socket of this process tree during a 2-worker run (Ray's services, the
    workers' torch store and gloo) is bound to loopback; torch's default store binds *:PORT."""
    import threading
    import time

    import psutil

    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_with_ray

    seen: set[tuple[str, str]] = set()
    running = True

    def watch() -> None:
        me = psutil.Process()
        while running:
            tree = {me.pid} | {child.pid for child in me.children(recursive=True)}
            for conn in psutil.net_connections("inet"):
                if conn.status == psutil.CONN_LISTEN and conn.pid in tree:
                    with contextlib.suppress(psutil.Error):
                        seen.add((conn.laddr.ip, psutil.Process(conn.pid).name()))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_with_ray(load_spec(make_job("sockets", training={"max_steps": 8}, scaling={"num_workers": 2, "cpus_per_worker": 0.5})))
    finally:
        running = False
        watcher.join()
    assert any("RayTrainWorker" in name or "_join_group" in name for _, name in seen), seen  # the workers were seen
    assert {ip for ip, _ in seen} <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, seen


def test_train_under_ray_matches_in_process_and_a_new_launch_starts_over(local_ray, make_job, tmp_path):
    """Under Ray the same losses as in this process; and a second launch of the same spec trains again:
    Ray Train resumes a run whose name exists in its storage, so `make demo` twice must not continue."""
    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_in_process, run_with_ray

    job = make_job("ray", training={"max_steps": 4, "checkpoint_every": 2}, output={"overwrite": True},
                   eval={"every": 2, "before_after": True})
    spec = load_spec(job)
    first = run_with_ray(spec)
    assert first["steps"] == 4 and first["world_size"] == 1
    assert first["before"]["val_loss"] > first["after"]["val_loss"]
    second = run_with_ray(spec)
    assert first["resumed_from_step"] is None and second["resumed_from_step"] is None
    steps = [r["step"] for r in read_metrics(tmp_path / "runs" / "ray") if "train_loss" in r]
    assert steps == [1, 2, 3, 4]  # one history, not the first run's steps plus the second's
    assert len(list((tmp_path / "runs" / "ray" / "ray").iterdir())) == 1  # the earlier launch's copy pruned
    local = load_spec(job, [f"output.dir={tmp_path / 'runs' / 'local'}"])
    run_in_process(local)
    assert train_losses(tmp_path / "runs" / "ray") == train_losses(tmp_path / "runs" / "local")


def test_the_trainer_leaves_out_rays_placement_group_cleaner(make_job):
    """Ray 2.60's cleaner takes a State API miss for the controller's death and kills a healthy run;
    this fails when a Ray upgrade renames the hook ftcluster overrides (then re-check the cleaner)."""
    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import make_trainer

    names = [type(c).__name__ for c in make_trainer(load_spec(make_job("pg")))._create_default_callbacks()]
    assert "BackendSetupCallback" in names and "PlacementGroupCleanerCallback" not in names


def test_worker_user_error_reaches_the_driver_as_one_line(local_ray, make_job):
    from ftcluster.config.spec import load_spec
    from ftcluster.core.errors import FtError
    from ftcluster.launch.launcher import run_with_ray

    spec = load_spec(make_job("ray-bad", eval={"every": 2, "metric": "nope"}))
    with pytest.raises(FtError, match=r"eval\.metric: 'nope' is not computed"):
        run_with_ray(spec)


def test_a_job_the_cluster_can_never_run_is_refused_with_numbers(local_ray, make_job):
    from ftcluster.config.spec import load_spec
    from ftcluster.core.errors import FtError
    from ftcluster.launch.launcher import run_with_ray

    cpus = local_ray.cluster_resources()["CPU"]
    spec = load_spec(make_job("too-big", scaling={"num_workers": int(cpus) + 2, "cpus_per_worker": 1}))
    with pytest.raises(FtError, match=rf"needs {int(cpus) + 2} CPU \({int(cpus) + 2} workers\), the Ray cluster has {cpus:g}"):
        run_with_ray(spec)
    gpu = load_spec(make_job("needs-gpu", scaling={"use_gpu": True}))
    with pytest.raises(FtError, match=r"needs 1 GPU .* the Ray cluster has 0"):
        run_with_ray(gpu)


def test_a_group_that_cannot_be_placed_fails_in_bounded_time_with_numbers(local_ray, make_job):
    """The cluster has the CPUs in total (the capacity check passes), but another holder keeps all
    but one: Ray Train would retry placing the group forever; the job ends after placement_timeout_s."""
    import time

    from ftcluster.config.spec import load_spec
    from ftcluster.core.errors import FtError
    from ftcluster.launch.launcher import run_with_ray

    cpus = local_ray.cluster_resources()["CPU"]

    @local_ray.remote(num_cpus=cpus - 1)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    local_ray.get(holder.ready.remote())
    spec = load_spec(make_job("unplaced", scaling={"num_workers": 2, "cpus_per_worker": 1, "placement_timeout_s": 3}))
    started = time.monotonic()
    try:
        with pytest.raises(FtError, match=r"scaling: 2 workers \(1 CPU each\) could not be placed within 3 s; "
                                          r"free now: 1 CPU"):
            run_with_ray(spec)
    finally:
        local_ray.kill(holder)
    assert time.monotonic() - started < 60


def test_the_embedded_ray_is_this_runs_own():
    """With no address, ftcluster starts its own Ray even where another is announced (RAY_ADDRESS, or the
    machine's latest `ray start`), which Ray's own default would join."""
    import os
    import subprocess
    import sys

    probe = ("from ftcluster.launch.launcher import init_ray; init_ray(None); import ray; "
             "print(ray.get_runtime_context().gcs_address)")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # nothing listens there
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    address = result.stdout.strip().splitlines()[-1]
    assert address.startswith("127.0.0.1:") and address != "127.0.0.1:1"
