"""One sweep trial: a full ftcluster training run in its own folder, reporting to Ray Tune.

A one-worker trial runs the loop inside its Tune actor (no second process to start, and PBT can
hand it another trial's checkpoint); a trial with `scaling.num_workers > 1` starts its own Ray
Train worker group, whose reports reach Tune through `TuneReportCallback`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcluster.config.spec import JobSpec
from ftcluster.core.atomic import write_text_atomic
from ftcluster.core.errors import first_line
from ftcluster.core.worker import WorkerContext
from ftcluster.runs.checkpoints import restore_checkpoint
from ftcluster.runs.layout import CHECKPOINTS, SUMMARY
from ftcluster.runs.mirror import remote_of
from ftcluster.runs.paths import RunPaths
from ftcluster.sweep.space import SearchSpace, trial_spec

TRIALS = "trials"  # SWEEP/trials/<trial id>/ is each trial's run folder
TRIAL_INFO = "trial.json"  # in a trial folder: its id, values and status
# Set when this actor's trial function has returned or raised (its W&B run and files closed).
TRIAL_ENDED = threading.Event()
CLOSE_TIMEOUT_S = 30.0
# What a trial that starts a worker group of its own reserves for itself (the group reserves the workers'),
# and the custom resource of a node kept for such trial drivers (the KubeRay head `render k8s --tune`
# writes): where a cluster has one, the drivers go there and leave the workers' nodes whole.
TRIAL_DRIVER_CPUS = 0.25
TRIAL_DRIVER_RESOURCE = "ftcluster_trial_driver"


def trial_driver_bundle() -> dict[str, float]:
    """A multi-worker trial's own reservation: a share of a CPU, on the trial-driver node if the cluster has one
    (without it Ray may take the share from a node whose CPUs the trial's workers need)."""
    import ray

    bundle = {"CPU": TRIAL_DRIVER_CPUS}
    if ray.is_initialized() and ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE):
        bundle[TRIAL_DRIVER_RESOURCE] = 1
    return bundle


@dataclass
class SweepSetup:
    """Everything a trial needs, shipped to it once through Ray's object store."""

    name: str
    location: str  # the sweep's folder: an absolute path, or a storage URI
    base: dict[str, Any]  # the job spec (absolute paths) every trial starts from
    space: SearchSpace
    # The storage's endpoint and ftcluster's settings from the driver's shell, for trials on other nodes.
    settings: dict[str, str] = field(default_factory=dict)

    def trial_location(self, trial_id: str) -> str:
        """The trial's run folder: SWEEP/trials/<id>, a path or a URI like the sweep's."""
        return f"{self.location}/{TRIALS}/{trial_id}"

    def spec_for(self, trial_id: str, chosen: dict[str, Any]) -> JobSpec:
        """The trial's job spec: the searched values, its own folder, the sweep's W&B group."""
        spec = trial_spec(self.space, self.base, chosen)
        update: dict[str, Any] = {
            "name": f"{self.name}-{trial_id}",
            "output": spec.output.model_copy(update={"dir": self.trial_location(trial_id), "overwrite": True}),
        }
        if spec.tracking.wandb is not None:
            wandb = spec.tracking.wandb.model_copy(update={"group": self.name, "tags": [*spec.tracking.wandb.tags, "sweep"]})
            update["tracking"] = spec.tracking.model_copy(update={"wandb": wandb})
        return spec.model_copy(update=update)

    def resources(self, chosen: dict[str, Any]):
        """What Ray reserves for the trial: its one worker's share, or a small driver share when it
        starts a worker group of its own (the group reserves the workers' resources)."""
        from ray.tune import PlacementGroupFactory

        scaling = trial_spec(self.space, self.base, chosen).scaling
        if scaling.num_workers > 1:
            return PlacementGroupFactory([trial_driver_bundle()])
        bundle = {"CPU": scaling.cpus_per_worker}
        if scaling.use_gpu:
            bundle["GPU"] = scaling.gpus_per_worker
        return PlacementGroupFactory([bundle])


def write_trial_info(spec: JobSpec, trial_id: str, values: dict[str, Any], status: str, error: str | None = None) -> None:
    """SWEEP/trials/<id>/trial.json, in the store too for a sweep in one (the driver reads it there)."""
    folder = RunPaths.of(spec).local
    folder.mkdir(parents=True, exist_ok=True)
    info = {"trial_id": trial_id, "params": values, "status": status, "error": error}
    write_text_atomic(folder / TRIAL_INFO, json.dumps(info, indent=1, default=str))
    remote = remote_of(spec)
    if remote is not None:
        remote.upload(folder / TRIAL_INFO, TRIAL_INFO)


def pull_trial_outcome(spec: JobSpec) -> None:
    """A trial in a store: its trial.json and summary.json into this node's copy, for `finished_report`
    (a resumed sweep may restart the trial on a node that never ran it)."""
    remote = remote_of(spec)
    if remote is None:
        return
    for name in (TRIAL_INFO, SUMMARY):
        text = remote.read_text(name)
        if text is not None:
            RunPaths.of(spec).local.mkdir(parents=True, exist_ok=True)
            write_text_atomic(RunPaths.of(spec).local / name, text)


def finished_report(folder: Path, values: dict[str, Any]) -> dict[str, Any] | None:
    """The final report of a run this trial already finished with these values, if any.

    A sweep interrupted just after a trial wrote its summary, but before Tune recorded the trial
    as done, restarts that trial on `--resume`: it replays the report instead of training again.
    """
    try:
        info = json.loads((folder / TRIAL_INFO).read_text())
        summary = json.loads((folder / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    same_values = info.get("params") == json.loads(json.dumps(values, default=str))  # as trial.json stores them
    return summary.get("final_report") if same_values else None


def tune_context(checkpoint_root: Path) -> WorkerContext:
    """The context of a one-worker sweep trial that runs the loop inside its Ray Tune actor."""
    from ray import tune

    def report(metrics: dict[str, float], checkpoint: Path | None = None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None)

    # A PBT exploit brings another trial's checkpoint: it replaces this trial's own of that step.
    return WorkerContext(report=report, restored=restore_checkpoint(tune.get_checkpoint(), checkpoint_root, replace=True))


def trial_trainable(setup: SweepSetup, function: Callable[..., None] | None = None, **parameters: Any):
    """`run_trial` (or ``function``, e.g. a shared-base pack's, with ``parameters``) as a Tune trainable
    whose stop waits (a bounded time) for the trial to close up.

    When a scheduler stops a trial, Tune ends the trial's thread by raising SystemExit in its
    `tune.report` and terminates the actor right after, taking W&B's writer process with it: the
    trial's run file would keep nothing. Waiting here lets the loop end its W&B run first.
    """
    from ray import tune
    from ray.tune.trainable import wrap_function

    function_trainable = wrap_function(tune.with_parameters(function or run_trial, setup=setup, **parameters),
                                       name="run_trial")

    class Trial(function_trainable):  # type: ignore[valid-type,misc]
        def cleanup(self) -> None:
            try:
                super().cleanup()  # (releases the trial's thread: SystemExit in its tune.report)
            finally:
                wait_for_trial_end()

    Trial.__name__ = "run_trial"
    return Trial


def wait_for_trial_end() -> None:
    """(A module function: the trainable class is pickled by value, and an Event cannot be.)"""
    TRIAL_ENDED.wait(CLOSE_TIMEOUT_S)


def run_trial(config: dict[str, Any], setup: SweepSetup) -> None:
    """The Tune function: build this trial's spec from its values, train, mark the outcome."""
    TRIAL_ENDED.clear()
    try:
        _run_trial(config, setup)
    finally:
        TRIAL_ENDED.set()


def _run_trial(config: dict[str, Any], setup: SweepSetup) -> None:
    from ray import tune

    from ftcluster.core.quiet import quiet_libraries, quiet_ray_train_worker
    from ftcluster.launch.launcher import fit, make_trainer
    from ftcluster.training.loop import train

    quiet_libraries()
    quiet_ray_train_worker()
    for key, value in setup.settings.items():
        os.environ.setdefault(key, value)
    trial_id = tune.get_context().get_trial_id()
    searched = {p.path for p in setup.space.params}
    chosen = {key: value for key, value in config.items() if key in searched}
    spec = setup.spec_for(trial_id, chosen)
    folder = RunPaths.of(spec).local
    values = setup.space.resolve(chosen, setup.base)
    pull_trial_outcome(spec)
    replay = finished_report(folder, values)
    if replay is not None:
        write_trial_info(spec, trial_id, values, "completed")
        tune.report(replay)
        return
    write_trial_info(spec, trial_id, values, "running")
    try:
        if spec.scaling.num_workers == 1:
            train(spec, tune_context(folder / CHECKPOINTS), verbose=False)
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            fit(make_trainer(spec, callbacks=[TuneReportCallback()], verbose=False), spec)
    except Exception as exc:
        write_trial_info(spec, trial_id, values, "error", first_line(exc))
        raise
    write_trial_info(spec, trial_id, values, "completed")
