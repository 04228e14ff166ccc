"""A pack: several LoRA/DoRA trials trained in one process over one frozen base model.

Why: at 7B-70B the frozen base is most of a LoRA run's memory, and a sweep's trials each load
their own copy. A pack loads it once and gives each trial an adapter of its own (PEFT's named
adapters, models/adapter_set.py).

Each trial is an ordinary run of the loop (training/loop.py): its own `Setup` (data order, seed,
optimizer over its adapter only, schedule, batch size), `RunState`, folder, metrics, checkpoints
and W&B run. The trials take turns one step at a time; during a trial's turn only its adapter is
active and the process's random-number state is its own (its dropout masks), so each computes
what it would alone. The turn's wall time counts as the trial's training time. A round gives a
turn to the trials furthest behind, so trials resumed from checkpoints a step apart line up.

Population based training inside a pack (`exploits`): after a round, a trial may continue from
another's checkpoint of the same step with new values, its adapter replaced by a copy of the other's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ftcluster.config.spec import JobSpec
from ftcluster.core.interrupts import STOP, Interrupted
from ftcluster.core.worker import WorkerContext
from ftcluster.models.adapter_set import activate, add_adapter_like, remove_adapter, renamed_adapter
from ftcluster.runs.checkpoints import copy_checkpoint, restore_rng, rng_state
from ftcluster.runs.layout import latest_checkpoint
from ftcluster.training.loop import (
    RunState,
    advance,
    checkpoint,
    evaluate_base_model,
    start_run,
    tracker_ended_on_exit,
    wrap_up,
)
from ftcluster.training.setup import Setup, build_setup, load_model, seed_everything

PLACEHOLDER = "default"  # the adapter `load_model` adds with the base: removed once every trial has its own
RUNNING, COMPLETED, STOPPED = "running", "completed", "stopped"


@dataclass
class PackTrial:
    """One trial of a pack. ``stop_requested`` is set by whoever reads its reports (a sweep's scheduler)."""

    spec: JobSpec
    ctx: WorkerContext
    adapter: str
    resume: bool = False
    stop_requested: bool = False
    outcome: str = RUNNING
    summary: dict[str, Any] | None = None
    setup: Setup | None = None
    state: RunState | None = None
    rng: Any = None  # its random-number state between turns (runs/checkpoints.rng_state)
    paused_at: float = 0.0


class SharedBase:
    """`build_setup`'s model loader for a pack: the first trial loads the base (as its own run would, with an
    adapter named "default"), then every trial adds its adapter, initialized from its own seed as its own
    run's would be. Adapters keep their trial's name, so a trial's checkpoint loads into a pack of others."""

    def __init__(self) -> None:
        self.model: Any = None

    def loader(self, adapter: str) -> Callable[..., Any]:
        def load(spec: JobSpec, *args: Any) -> Any:
            if self.model is None:
                self.model = load_model(spec, *args)
            seed_everything(spec.training.seed)
            add_adapter_like(self.model, adapter, spec.method)
            activate(self.model, adapter)  # its optimizer covers only its own adapter
            return self.model

        return load


@contextlib.contextmanager
def turn(trial: PackTrial) -> Iterator[None]:
    """The trial's adapter active, its random-number state in place, its training clock running."""
    assert trial.setup is not None
    activate(trial.setup.module, trial.adapter)
    restore_rng(*trial.rng)
    if trial.state is not None:  # the other trials' turns are not this trial's training time
        trial.state.window.started += time.perf_counter() - trial.paused_at
    try:
        yield
    finally:
        trial.rng = rng_state()
        trial.paused_at = time.perf_counter()


@dataclass(frozen=True)
class Exploit:
    """PBT's exploit inside a pack: ``recipient`` continues from ``donor``'s latest checkpoint as ``spec``
    (the donor's values, explored)."""

    recipient: PackTrial
    donor: PackTrial
    spec: JobSpec
    done: Callable[[], None] = lambda: None  # called once the recipient continues from the copy


def train_pack(trials: list[PackTrial], on_leave: Callable[[PackTrial], None] = lambda trial: None,
               exploits: Callable[[list[PackTrial]], list[Exploit]] = lambda running: []) -> None:
    """Train every trial to its end (or until its scheduler stops it); ``on_leave`` as each one leaves;
    after each round, the ``exploits`` a population based scheduler asks for, given the running trials."""
    shared = SharedBase()
    for trial in trials:
        trial.setup = build_setup(trial.spec, trial.ctx, verbose=False, load=shared.loader(trial.adapter))
        trial.rng = rng_state()
    remove_adapter(shared.model, PLACEHOLDER)
    with contextlib.ExitStack() as open_trackers:
        for trial in trials:
            setup = trial.setup
            assert setup is not None
            with turn(trial):
                trial.state = start_run(setup, trial.resume)
                open_trackers.enter_context(tracker_ended_on_exit(trial.state))
                evaluate_base_model(setup, trial.state)
                setup.forward_model.train()
                trial.state.window.restart_clock()
        with STOP.at_step_boundaries():  # a signal waits for the step in flight (one trial's)
            try:
                while running := [trial for trial in trials if trial.outcome == RUNNING]:
                    behind = min(step_of(trial) for trial in running)
                    for trial in (trial for trial in running if step_of(trial) == behind):
                        take_turn(trial)
                        if trial.outcome != RUNNING:
                            leave(trial, on_leave)
                    for exploit in exploits([trial for trial in trials if trial.outcome == RUNNING]):
                        take_over(exploit, shared, open_trackers)
            except Interrupted:
                checkpoint_the_others(trials)
                raise


def step_of(trial: PackTrial) -> int:
    assert trial.state is not None
    return trial.state.step


def take_over(exploit: Exploit, shared: SharedBase, open_trackers: contextlib.ExitStack) -> None:
    """The recipient's adapter, optimizer, schedule and random-number state become copies of the donor's
    latest checkpoint (in the donor's adapter shape), with the exploit's values; its run goes on: the same
    folder, metrics and W&B run (resumed), as Ray Tune's PBT restarts a trial from another's checkpoint."""
    recipient, donor = exploit.recipient, exploit.donor
    assert recipient.setup is not None and recipient.state is not None and donor.setup is not None
    source = latest_checkpoint(donor.setup.paths.checkpoints)
    assert source is not None, "a PBT exploit copies a checkpoint (sweeps with pbt require training.checkpoint_every)"
    copy_checkpoint(source, recipient.setup.paths.checkpoints, renamed_adapter(donor.adapter, recipient.adapter))
    recipient.state.tracker.end_early({"step": recipient.state.step, **recipient.state.latest_scores,
                                       "stop_reason": f"pbt: continues from {donor.spec.name}"}, failed=False)
    remove_adapter(shared.model, recipient.adapter)
    recipient.spec = exploit.spec
    recipient.setup = build_setup(exploit.spec, recipient.ctx, verbose=False, load=shared.loader(recipient.adapter))
    recipient.state = start_run(recipient.setup, resume=True)  # (restores the donor's random-number state)
    open_trackers.enter_context(tracker_ended_on_exit(recipient.state))
    evaluate_base_model(recipient.setup, recipient.state)
    recipient.setup.forward_model.train()
    recipient.rng = rng_state()
    recipient.paused_at = time.perf_counter()
    recipient.state.window.restart_clock()
    exploit.done()


def checkpoint_the_others(trials: list[PackTrial]) -> None:
    """After a signal stopped the pack at one trial's step boundary: every other running trial is at one
    of its own too, and is checkpointed there (training.checkpoint_on_preempt), so a resume loses no step."""
    for trial in trials:
        setup, state = trial.setup, trial.state
        if trial.outcome == RUNNING and setup is not None and state is not None and trial.spec.training.checkpoint_on_preempt:
            with turn(trial):
                checkpoint(setup, state)  # (the interrupted trial's exists already: kept)


def take_turn(trial: PackTrial) -> None:
    """One step of the trial (and what is due after it); its end, or its stop by the scheduler."""
    setup, state = trial.setup, trial.state
    assert setup is not None and state is not None
    with turn(trial):
        going = state.step < setup.total_steps and advance(setup, state)
        if trial.stop_requested:
            state.tracker.end_early({"step": state.step, **state.latest_scores,
                                     "stop_reason": "stopped by the sweep's scheduler"}, failed=False)
            trial.outcome = STOPPED
        elif not going:
            state.progress.close()
            trial.summary = wrap_up(setup, state)
            trial.outcome = COMPLETED


def leave(trial: PackTrial, on_leave: Callable[[PackTrial], None]) -> None:
    """The trial's adapter, optimizer state and data leave memory; the others go on."""
    assert trial.setup is not None
    remove_adapter(trial.setup.module, trial.adapter)
    trial.setup = trial.state = None
    on_leave(trial)
