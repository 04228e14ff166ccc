"""Launching the training loop: in this process (``--no-ray``), or under Ray Train.

With no address, Ray starts embedded in this process's machine and listens on 127.0.0.1 only
(an exposed Ray dashboard or GCS lets anyone on the network run code).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftcluster.config.spec import JobSpec
from ftcluster.core.errors import FtError, io_error_line, storage_errno
from ftcluster.core.interrupts import STOP, Interrupted, signal_of
from ftcluster.core.locations import is_remote
from ftcluster.core.quiet import RAY_PROCESS_SETUP_HOOK, quiet_libraries, quiet_ray_train_worker
from ftcluster.core.storage import forwarded_settings
from ftcluster.core.worker import WorkerContext
from ftcluster.launch.group_stop import GroupStopPoll, forget_group_stop, request_group_stop
from ftcluster.launch.worker_deaths import worker_death
from ftcluster.models.load import ALIASES
from ftcluster.objectives.grpo.rewards import share_reward_code
from ftcluster.planning.capacity import worker_resources
from ftcluster.runs.checkpoints import drop_frozen_copies, frozen_copy, restore_checkpoint
from ftcluster.runs.layout import CHECKPOINTS, SUMMARY, checkpoint_step, latest_checkpoint
from ftcluster.runs.mirror import pull_checkpoint, remote_summary
from ftcluster.runs.paths import RunPaths
from ftcluster.training.loop import train

RAY_STORAGE = "ray"  # OUTPUT/ray: Ray Train's copy of reported checkpoints, unless scaling.storage_path
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's wait per placement attempt
DEFAULT_START_TIMEOUT_S = 60.0  # its default


def absolute_paths(spec: JobSpec) -> JobSpec:
    """Ray workers may start in another directory: make every local path absolute."""
    spec = spec.model_copy(deep=True)
    spec.data.train = absolute_data_path(spec.data.train)
    if spec.data.validation:
        spec.data.validation = absolute_data_path(spec.data.validation)
    if not RunPaths.of(spec).uri:
        spec.output.dir = str(RunPaths.of(spec).local)
    if spec.method.grpo is not None and spec.method.grpo.reward_model is not None:
        spec.method.grpo.reward_model.run = absolute_data_path(spec.method.grpo.reward_model.run)
    model_path = Path(spec.model.path).expanduser()
    if spec.model.path not in ALIASES and model_path.exists():
        spec.model.path = str(model_path.resolve())
    return spec


def absolute_data_path(location: str) -> str:
    """A data path (or glob) made absolute; storage URIs and hub ids as they are."""
    return location if is_remote(location) else os.path.abspath(location)


def run_in_process(spec: JobSpec, resume: bool = False) -> dict[str, Any]:
    """One worker, this process, no Ray: what `--no-ray`, benchmarks and GPU scripts use."""
    if spec.rollout_actors:
        raise FtError("method.grpo.rollout.workers: rollout actors are Ray actors; run without --no-ray, or set "
                      "method.grpo.rollout.workers=0 to sample in the training process")
    ctx = WorkerContext()
    ctx.restored = pull_checkpoint(spec, ctx, resume, launch=None)  # a run in storage: its checkpoint, fetched
    return train(spec, ctx, resume=resume)


def ray_context(checkpoint_root: Path, checkpoints_to_ray: bool = True) -> WorkerContext:
    """The context of a Ray Train worker (call inside the training function).

    checkpoints_to_ray: hand checkpoints to Ray Train, which restores a restarted worker group from
    them. A run in storage (output.dir a URI) does not: its checkpoints are in the store already
    (`runs/mirror.push_checkpoint`, every node's shards), and a restart takes them from there.
    """
    import ray.train

    context = ray.train.get_context()

    def report(metrics: dict[str, float], checkpoint: Path | None = None) -> None:
        # Every worker must call this (it is a barrier). Ray copies the checkpoint to its storage
        # in the background (training goes on) from a frozen copy that it deletes when done: pruning
        # may remove the checkpoint itself meanwhile, and our copy stays for `--resume`.
        if checkpoint is None or not checkpoints_to_ray:
            ray.train.report(metrics)
            return
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(frozen_copy(checkpoint))),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
        )

    if context.get_world_rank() == 0:
        drop_frozen_copies(checkpoint_root)  # an earlier worker group's, never to be read

    return WorkerContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        report=report,
        restored=restore_checkpoint(ray.train.get_checkpoint(), checkpoint_root),
        preemption_notice=lambda: ray.train.get_preemption_info() is not None,
    )


def _install_worker_signals(_actor) -> None:
    STOP.install_in_worker()


def handle_signals_in_this_worker() -> None:
    """SIGTERM/SIGINT to a Ray Train worker (a node drained, a pod evicted, a kill) checkpoints the group at the
    next step boundary and stops it (`Interrupted`), instead of Ray's handler ending the worker mid-step.
    Handlers can only be set from a process's main thread, which runs Ray's task loop: it is asked to."""
    import ray

    ray.get(ray.get_runtime_context().current_actor.__ray_call__.remote(_install_worker_signals))


def _ray_worker(config: dict[str, Any]) -> None:
    quiet_libraries()
    quiet_ray_train_worker()
    handle_signals_in_this_worker()
    spec = JobSpec.model_validate(config["spec"])
    ctx = ray_context(RunPaths.of(spec).local / CHECKPOINTS, checkpoints_to_ray=RunPaths.of(spec).uri is None)
    ctx.launch = config["launch"]
    ctx.stop_request = GroupStopPoll(ctx.launch)
    if RunPaths.of(spec).uri:
        ctx.restored = pull_checkpoint(spec, ctx, config["resume"], ctx.launch)
    verbose = config.get("verbose", True)
    owned: list = []
    if spec.rollout_actors:
        from ftcluster.launch.rollout_actors import start_rollout_actors

        ctx.sampler, owned = start_rollout_actors(spec, ctx, say=print if verbose else lambda *_: None)
    try:
        train(spec, ctx, resume=config["resume"], verbose=verbose)
    except Interrupted as stop:
        if stop.signum != ctx.stop_request(fresh=True):
            raise
        # The driver asked (its own Ctrl+C or SIGTERM): the checkpoint is saved and reported. Ending without an
        # error keeps Ray from restarting the group (training.max_failures); the driver reports the interrupt.
    finally:
        if owned:
            from ftcluster.launch.rollout_actors import end_rollout_actors

            end_rollout_actors(owned)


RAY_JOB_ENV = {"worker_process_setup_hook": RAY_PROCESS_SETUP_HOOK}


def init_ray(address: str | None) -> None:
    """Connect to a cluster, or start Ray locally on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=RAY_JOB_ENV)
        return
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # The dashboard (loopback only) serves the state API that Ray Train uses to clean up after runs.
    from ftcluster.launch.loopback import LOOPBACK

    # address="local": a Ray of this run's own. Without it Ray attaches to the machine's latest
    # `ray start` cluster (/tmp/ray/ray_current_cluster), someone else's and maybe not on loopback.
    ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=True, dashboard_host=LOOPBACK,
             log_to_driver=True, runtime_env=RAY_JOB_ENV)


def wrapped(exc: BaseException) -> Iterator[BaseException]:
    """An exception and every one it wraps (Ray wraps worker errors: causes, worker failures, user errors)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [getattr(current, "cause", None), getattr(current, "_base_exc", None), current.__cause__,
                    current.__context__]
        pending += list(getattr(current, "worker_failures", {}).values())


def user_error_in(exc: BaseException) -> FtError | None:
    """The FtError a worker raised, if that is what ended training (Ray wraps worker errors)."""
    for current in wrapped(exc):
        if isinstance(current, FtError):
            return current
        if storage_errno(current) is not None:
            return FtError(io_error_line(current))
    return None


def interrupt_in(exc: BaseException) -> Interrupted | None:
    """The Interrupted that stopped the workers (a signal to one of them), with its step and checkpoint."""
    return next((current for current in wrapped(exc) if isinstance(current, Interrupted)), None)


def check_cluster_capacity(spec: JobSpec) -> None:
    """Refuse, with the numbers, a job the cluster can never run (Ray would wait forever)."""
    from ftcluster.planning.capacity import CHECKED_ENV, ClusterView, capacity_problems, driver_cpus_here

    if os.environ.get(CHECKED_ENV):
        return
    problems = capacity_problems(spec, ClusterView.from_ray(), driver_cpus_here())
    if problems:
        raise FtError("\n".join(problems))


def check_output_reaches_every_node(spec: JobSpec, timeout_s: float = 120, key: str = "output.dir") -> None:
    """On a cluster of several nodes, a run folder on a path must be one every node that may run a
    worker sees (a shared mount): else rank 0 writes the run to its own disk, which the driver cannot
    read and which goes with the node. Tested for real: a probe file, looked for from each node.
    ``key`` is what the user set the folder with (a sweep's is --out)."""
    if RunPaths.of(spec).uri:
        return
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    bundle = worker_resources(spec)
    nodes = [node for node in ray.nodes() if node["Alive"]
             and all(node["Resources"].get(name, 0) >= amount for name, amount in bundle.items())]
    if len(nodes) < 2:
        return
    out = RunPaths.of(spec).local
    out.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = out / f".node-probe-{token}"
    probe.write_text(token)

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(path: str, expected: str) -> bool:
        file = Path(path)
        return file.is_file() and file.read_text() == expected

    try:
        checks = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                  .remote(str(probe), token) for node in nodes]
        seen = ray.get(checks, timeout=timeout_s)
    finally:
        probe.unlink(missing_ok=True)
    blind = [node["NodeID"][:12] for node, ok in zip(nodes, seen) if not ok]
    if blind:
        raise FtError(f"{key}: {out} is on this machine's disk, not on {len(blind)} of the {len(nodes)} nodes that "
                      f"may run workers (node {', '.join(blind)}); set {key} to a storage URI "
                      f"(s3://BUCKET/runs/{spec.name}) or to a folder on a mount every node shares")


def forwarded_env() -> dict | None:
    """The workers' runtime environment: the forwarded settings, less this node's own cache folder."""
    env = forwarded_settings(keep_here="FTCLUSTER_CACHE")
    return {"env_vars": env} if env else None


@functools.cache
def trainer_class():
    """Ray Train's TorchTrainer without its placement-group cleaner (Ray 2.60).

    The cleaner, a detached actor, polls the State API for the controller and takes a lookup that
    finds nothing for death: it then removes the running worker group's placement group and kills a
    healthy run ("A worker health check failed ... placement group was removed"; seen here under
    load, and named in Ray's own review of ray-project/ray#65447). Without it, a controller that dies
    uncleanly leaves its placement group until the job's driver exits, which `ftcluster train` does.
    """
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):  # (Train v2's method: mypy sees the v1 class)
            return [callback for callback in super()._create_default_callbacks()  # type: ignore[misc]
                    if type(callback).__name__ != "PlacementGroupCleanerCallback"]

    return Trainer


def make_trainer(spec: JobSpec, resume: bool = False, callbacks: list | None = None, verbose: bool = True):
    """A TorchTrainer running the loop on `scaling.num_workers` workers (`spec` with absolute paths)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig

    from ftcluster.launch.loopback import torch_config

    scaling = spec.scaling
    launch = ray_run_name(spec)
    return trainer_class()(
        _ray_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "resume": resume, "verbose": verbose, "launch": launch},
        torch_config=torch_config(spec.distributed.timeout_s),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=worker_resources(spec),
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=launch,
            storage_path=scaling.storage_path or ray_storage(spec),
            failure_config=failure_config(spec),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.training.keep_checkpoints),
            # Ray's typing: ray.train exports Train v2's RunConfig (which has worker_runtime_env) when v2 is enabled,
            # the default; mypy only sees the v1 RunConfig that it conditionally replaces.
            worker_runtime_env=forwarded_env(),  # type: ignore[call-arg]
            callbacks=callbacks,
        ),
    )


def failure_config(spec: JobSpec):
    """Restarts after worker failures and, counted apart, after node preemptions."""
    from ray.train import FailureConfig

    # Ray's typing: ray.train exports Train v2's FailureConfig (max_preemption_failures) when v2 is
    # enabled, the default; mypy only sees the v1 class it replaces.
    timeout = spec.scaling.placement_timeout_s
    attempts = -1 if timeout is None else max(1, math.ceil(timeout / placement_attempt_s(spec) - 1e-9))
    return FailureConfig(max_failures=spec.training.max_failures,  # type: ignore[call-arg]
                         max_preemption_failures=spec.training.max_preemption_failures,
                         controller_failure_limit=attempts - 1 if attempts > 0 else -1)


def ray_run_name(spec: JobSpec) -> str:
    """A new name per launch. Ray Train resumes a run whose name already exists in its storage: a
    fresh `train` (or one whose `--resume` should start from OUTPUT/checkpoints) must not silently
    continue an earlier launch's checkpoint. Restarts after a worker failure stay within one launch."""
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def ray_storage(spec: JobSpec) -> str:
    """Ray Train's storage when scaling.storage_path is not set: OUTPUT/ray, in the run's store for a URI."""
    return f"{RunPaths.of(spec).uri}/{RAY_STORAGE}" if RunPaths.of(spec).uri else str(RunPaths.of(spec).local / RAY_STORAGE)


def prune_ray_storage(spec: JobSpec, keep: str) -> None:
    """After a successful launch, drop earlier launches' copies in the default local storage
    (OUTPUT/ray); a user's own storage_path (and a store's) is left alone."""
    if spec.scaling.storage_path or RunPaths.of(spec).uri:
        return
    for folder in (RunPaths.of(spec).local / RAY_STORAGE).glob("*"):
        if folder.is_dir() and folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)


def fit_interruptibly(trainer, checkpoints: Path) -> None:
    """``trainer.fit()``, ended by Ctrl+C or SIGTERM with ftcluster's one-line handling.

    In the main thread Ray Train installs its own SIGINT handler (it aborts the run and exits 1);
    running fit in a helper thread keeps ours. A first signal asks the workers to save a checkpoint
    at their next step boundary and stop (launch/group_stop.py), then raises `Interrupted` with it;
    a second signal, or workers that do not stop within GROUP_STOP_GRACE_S, shut every Ray process
    this driver started (or its run on a cluster) down at once.
    """

    if threading.current_thread() is not threading.main_thread():
        trainer.fit()  # a sweep trial: its Tune actor handles stopping
        return
    outcome: dict[str, Any] = {}
    # Waited on through an Event, not Thread.join: a signal interrupting join() (Python 3.11) can leave the
    # thread marked as stopped while it still runs.
    ended = threading.Event()

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread below
            outcome["error"] = exc
        finally:
            ended.set()

    threading.Thread(target=run, name="ray-train-fit", daemon=True).start()
    launch = trainer.run_config.name
    try:
        while not ended.wait(0.2):
            pass
    except KeyboardInterrupt as first:
        stop_at_a_step_boundary(ended, launch, signal_of(first))
        if "error" not in outcome and not outcome["result"].metrics.get("completed"):
            raise stopped_run(signal_of(first), checkpoints) from None
    finally:
        forget_group_stop(launch)
    if "error" in outcome:
        raise outcome["error"]


GROUP_STOP_GRACE_S = 600.0  # the longest wait for the workers to finish their step and save a checkpoint


def stop_at_a_step_boundary(ended: threading.Event, launch: str, signum: int) -> None:
    """Ask the workers to checkpoint and stop, and wait for them; a second signal (or the grace period
    running out) shuts Ray down at once."""
    import ray

    print("stopping: the workers save a checkpoint at the next step boundary (a second signal stops at once)",
          file=sys.stderr, flush=True)
    request_group_stop(launch, signum)
    try:
        stopped = ended.wait(GROUP_STOP_GRACE_S)
    except KeyboardInterrupt:
        ray.shutdown()
        raise
    if not stopped:
        ray.shutdown()
        raise Interrupted(signum)


def stopped_run(signum: int, checkpoints: Path) -> Interrupted:
    """The interrupt of a group that stopped as asked: its step and checkpoint (the latest one saved)."""
    latest = latest_checkpoint(checkpoints)
    return Interrupted(signum, checkpoint_step(latest) if latest else None, latest)


@contextlib.contextmanager
def placement_deadline(spec: JobSpec):
    """Bound the wait for the worker group's resources: Ray Train waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    per attempt and retries without end by default (holding what it got, e.g. GPUs, until a deadline
    far away). The attempt length is passed to Ray Train's controller through the environment at fit();
    the number of attempts is the failure config's controller_failure_limit (`failure_config`)."""
    timeout = spec.scaling.placement_timeout_s
    if timeout is None or START_TIMEOUT_ENV in os.environ:
        yield
        return
    os.environ[START_TIMEOUT_ENV] = f"{placement_attempt_s(spec):g}"
    try:
        yield
    finally:
        os.environ.pop(START_TIMEOUT_ENV, None)


def placement_attempt_s(spec: JobSpec) -> float:
    """One attempt to place the worker group: the user's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, else up
    to Ray's default minute."""
    if START_TIMEOUT_ENV in os.environ:
        return float(os.environ[START_TIMEOUT_ENV])
    return min(DEFAULT_START_TIMEOUT_S, spec.scaling.placement_timeout_s or DEFAULT_START_TIMEOUT_S)


def unplaced_workers(exc: BaseException, spec: JobSpec) -> FtError | None:
    """A worker group Ray could not place within scaling.placement_timeout_s, as one line with the numbers."""
    import ray

    # Ray Train's ControllerError wraps it; the class is private to Ray, so it is matched by name.
    error = getattr(exc, "controller_failure", None)
    if type(error).__name__ != "WorkerGroupStartupTimeoutError":
        return None

    bundle = worker_resources(spec)
    free = ", ".join(f"{ray.available_resources().get(kind, 0):g} {kind}" for kind in bundle)
    one = ", ".join(f"{amount:g} {kind}" for kind, amount in bundle.items())
    return FtError(f"scaling: {spec.scaling.num_workers} workers ({one} each) could not be placed within "
                   f"{spec.scaling.placement_timeout_s:g} s; free now: {free} (other jobs hold the rest, or nodes "
                   "are still starting); raise scaling.placement_timeout_s, or free or add resources")


def fit(trainer, spec: JobSpec) -> dict[str, Any]:
    """Run the trainer; a user error on a worker comes back as that one-line error."""
    try:
        with placement_deadline(spec):
            fit_interruptibly(trainer, RunPaths.of(spec).checkpoints)
    except Exception as exc:
        interrupt = interrupt_in(exc)
        if interrupt is not None:
            raise interrupt from None
        user_error = user_error_in(exc) or unplaced_workers(exc, spec) or worker_death(exc, spec)
        if user_error is not None:
            raise FtError(str(user_error)) from None
        raise
    if RunPaths.of(spec).uri:
        return remote_summary(spec)
    return json.loads((RunPaths.of(spec).local / SUMMARY).read_text())


def run_with_ray(spec: JobSpec, resume: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run the loop under Ray Train's TorchTrainer (`scaling.num_workers` workers)."""
    # Ray Train polls workers every 2 s by default, which makes every report wait that long.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    init_ray(address)
    STOP.install()  # after Ray's own handlers: Ctrl+C and SIGTERM end the run in one line
    spec = absolute_paths(spec)
    share_reward_code(spec.method.grpo)
    check_cluster_capacity(spec)
    check_output_reaches_every_node(spec)
    trainer = make_trainer(spec, resume)
    summary = fit(trainer, spec)
    prune_ray_storage(spec, keep=trainer.run_config.name)
    return summary
