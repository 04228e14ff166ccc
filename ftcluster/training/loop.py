"""The per-worker training loop: a plain function that Ray Train launches, or you call directly.

`train` reads as its phases: set-up (training/setup.py) → resume → base evaluation → the steps
(step → log window → evaluate → checkpoint) → wrap-up (final evaluation, the fine-tuned weights,
the summary). Each phase is a function over the `Setup` (fixed) and the `RunState` (what moves).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftcluster.config.spec import JobSpec
from ftcluster.core.atomic import atomic_directory, write_text_atomic
from ftcluster.core.errors import FtError, first_line
from ftcluster.core.interrupts import STOP
from ftcluster.core.worker import WorkerContext
from ftcluster.evaluation.forgetting import message as forgetting_message
from ftcluster.evaluation.metrics import base_model_view, scalar_metrics
from ftcluster.evaluation.suite import few_shot_baseline
from ftcluster.models.adapter_set import save_weights
from ftcluster.models.methods import count_params
from ftcluster.runs.checkpoints import load_checkpoint, save_checkpoint
from ftcluster.runs.folder import start_output
from ftcluster.runs.layout import (
    LABELS,
    checkpoint_name,
    checkpoint_step,
    latest_checkpoint,
)
from ftcluster.runs.mirror import display_checkpoint, push_checkpoint, push_run_files
from ftcluster.runs.paths import RunPaths
from ftcluster.track.cost import device_kind, run_cost
from ftcluster.track.flops import flops_per_token, model_flops_utilization, peak_flops
from ftcluster.track.wandb_run import make_tracker
from ftcluster.training.health import CollapsedError, CollapseGuard, DivergedError, DivergenceGuard
from ftcluster.training.held_memory import worker_memory
from ftcluster.training.monitor import EarlyStopper, OverfitDetector
from ftcluster.training.optim import keep_spec_learning_rates
from ftcluster.training.progress import Progress
from ftcluster.training.records import LogWindow, MetricsLog, tokens_in
from ftcluster.training.setup import Setup, build_setup, peak_memory_mb
from ftcluster.training.summary import run_summary


@dataclass
class RunState:
    """What moves during training: the step, the counters, the monitors, the outputs being written."""

    step: int
    start_step: int
    resumed: bool
    log: MetricsLog
    tracker: Any
    progress: Progress
    window: LogWindow
    stopper: EarlyStopper
    overfit: OverfitDetector
    guard: DivergenceGuard
    collapse: CollapseGuard
    flops: Any  # FlopsPerToken of the trained model
    device_flops: float | None
    kind: str  # "cpu" or the GPU's accelerator name (prices)
    devices: float  # GPUs (or CPU cores) the run occupies, for cost
    before: dict = field(default_factory=dict)
    latest_scores: dict[str, float] = field(default_factory=dict)
    # What every report to the launcher carries (a sweep's scheduler and budget read these).
    report_fields: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = "completed"
    eval_seconds: float = 0.0  # wall time spent evaluating (base, during training, final)
    preemption_noticed: bool = False  # a node of the group is being drained for preemption (Ray)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Count the block's wall time as evaluation time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.eval_seconds += time.perf_counter() - start


def train(spec: JobSpec, ctx: WorkerContext | None = None, *, resume: bool = False, train_records=None,
          val_records=None, verbose: bool = True) -> dict[str, Any]:
    """Fine-tune as the spec says; returns the run summary (also written to OUTPUT/summary.json).

    A run that diverges ends with a DivergedError naming its last good checkpoint; nothing from
    the diverged model is saved as a result.
    """
    ctx = ctx or WorkerContext()
    try:
        setup = build_setup(spec, ctx, train_records=train_records, val_records=val_records, verbose=verbose)
        state = start_run(setup, resume or ctx.restored is not None)  # a restarted worker group continues its run
        with tracker_ended_on_exit(state):
            evaluate_base_model(setup, state)
            run_steps(setup, state)
            return wrap_up(setup, state)
    except DivergedError as exc:
        raise diverged(spec, ctx, exc) from None


@contextlib.contextmanager
def tracker_ended_on_exit(state: RunState) -> Iterator[None]:
    """The W&B run ends with what it logged however training ends: a sweep scheduler stopping the trial
    (Ray Tune raises SystemExit in `tune.report`), an error, a signal. A run left open loses its history
    when the process goes, since the tracker writes its file only as it finishes."""
    try:
        yield
    except BaseException as exc:
        stopped = isinstance(exc, SystemExit) and not exc.code
        if stopped:
            reason = "stopped by the sweep's scheduler"
        elif isinstance(exc, Exception):
            reason = f"failed: {first_line(exc)}"
        else:
            reason = f"interrupted ({type(exc).__name__})"
        state.tracker.end_early({"step": state.step, **state.latest_scores, "stop_reason": reason}, failed=not stopped)
        raise


def run_steps(setup: Setup, state: RunState) -> None:
    """The loop: step, then (when due) log, evaluate, checkpoint; a signal stops it at a step boundary."""
    setup.forward_model.train()
    state.window.restart_clock()
    with STOP.at_step_boundaries():  # a signal waits for the step in flight, then checkpoints
        while state.step < setup.total_steps and advance(setup, state):
            pass
    state.progress.close()


def advance(setup: Setup, state: RunState) -> bool:
    """One step and what is then due (log, evaluate, checkpoint); False when the run stops before its end.

    A shared-base pack (training/shared_base.py) advances each of its trials with this, in turn.
    """
    cfg, eval_every = setup.spec.training, setup.spec.eval.every
    unfreeze_due_blocks(setup, state)
    train_step(setup, state)
    step, last = state.step, state.step == setup.total_steps
    if step % cfg.log_every == 0 or last:
        log_window(setup, state)
    if eval_every is not None and step % eval_every == 0 and not last:
        evaluate_during_training(setup, state)
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not last:
        checkpoint_and_report(setup, state)
    elif cfg.checkpoint_every and last:
        # The end too (as HF's Trainer does), so `--resume training.max_steps=MORE` trains on from it. Not
        # reported: a sweep's scheduler would take it for a result at max_t and stop the trial before its
        # final evaluation, which the final report carries.
        checkpoint(setup, state)
    elif cfg.checkpoint_on_preempt and not last and preemption_notice_arrived(setup, state):
        saved = checkpoint_and_report(setup, state)  # just in time: a restart loses no step
        if setup.ctx.is_main:
            state.progress.message(f"step {step}: a node of this run is being preempted; checkpoint saved "
                                   f"({display_checkpoint(setup.spec, saved)}), training goes on until it goes")
    STOP.raise_if_requested(step, lambda: checkpoint_to_stop(setup, state),
                            lambda signum: group_signal(setup, step, signum or setup.ctx.stop_request()))
    if state.stop_reason != "completed":
        state.progress.message(f"Stopping at step {step}: {state.stop_reason}")
        return False
    return True


def checkpoint_and_report(setup: Setup, state: RunState) -> Path:
    """A checkpoint of this step, handed to the launcher with the latest metrics."""
    saved = checkpoint(setup, state)
    setup.ctx.report({**state.report_fields, **state.latest_scores, "step": state.step},
                     saved if setup.ctx.is_main else None)
    state.window.restart_clock()
    return saved


def checkpoint_to_stop(setup: Setup, state: RunState) -> Path | None:
    """On a signal: this step's checkpoint (handed to the launcher too, which restarts a Ray worker group
    from it), unless training.checkpoint_on_preempt is off; else the latest one."""
    latest = latest_checkpoint(setup.paths.checkpoints)
    if not setup.spec.training.checkpoint_on_preempt or (latest is not None and latest.name == checkpoint_name(state.step)):
        return latest
    return checkpoint_and_report(setup, state)


def group_signal(setup: Setup, step: int, signum: int) -> int:
    """The signal any worker of the group got (0: none); every worker asks at every step boundary."""
    if setup.ctx.world_size == 1:
        return signum
    value = torch.tensor(float(signum), device=setup.device)
    with setup.ctx.collective("signal check", step, setup.spec.distributed.timeout_s):
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value.item())


def preemption_notice_arrived(setup: Setup, state: RunState) -> bool:
    """True once, at the first step boundary after Ray learns that a node of this run will be reclaimed
    (asked every step by every worker: the question is a barrier)."""
    if state.preemption_noticed or not setup.ctx.preemption_notice():
        return False
    state.preemption_noticed = True
    return True


# --- phases --------------------------------------------------------------------------------------


def start_run(setup: Setup, resume: bool) -> RunState:
    """Resume from a checkpoint if asked, claim the output folder, and start the counters and monitors."""
    spec, ctx = setup.spec, setup.ctx
    checkpoint_state = resume_from_checkpoint(setup) if resume else {}
    start_step = checkpoint_state.get("step", 0)
    if ctx.is_main:
        start_output(spec, resume)
    train = setup.bundle.train
    kind = device_kind(setup.device)
    per_worker = spec.scaling.gpus_per_worker if kind != "cpu" else spec.scaling.cpus_per_worker
    state = RunState(
        step=start_step, start_step=start_step, resumed=resume,
        log=MetricsLog(setup.paths.metrics, ctx.is_main, start_step if resume else None),
        tracker=make_tracker(spec, setup.paths.local, ctx.is_main, resume),
        progress=Progress(setup.total_steps, start_step, enabled=setup.verbose and ctx.is_main),
        window=LogWindow(setup.device, checkpoint_state.get("tokens_seen", 0), checkpoint_state.get("train_seconds", 0.0)),
        stopper=EarlyStopper(spec.eval.metric, spec.eval.mode, spec.eval.early_stopping_patience,
                             checkpoint_state.get("stopper"), spec.eval.min_delta),
        overfit=OverfitDetector(spec.eval.overfit_evals, checkpoint_state.get("overfit")),
        guard=DivergenceGuard(spec.training.skip_nonfinite_steps, checkpoint_state.get("skipped_nonfinite_steps", 0)),
        collapse=CollapseGuard(spec.training.max_weight_growth, spec.training.warmup_steps, setup.objective.chance_loss,
                               checkpoint_state.get("collapse")),
        flops=flops_per_token(setup.module, round(sum(len(item.input_ids) for item in train) / len(train))),
        device_flops=peak_flops(setup.device), kind=kind, devices=ctx.world_size * per_worker,
    )
    state.collapse.check_weights(setup.module, start_step, setup.device, ctx.world_size)  # the start's RMS
    return state


def resume_from_checkpoint(setup: Setup) -> dict[str, Any]:
    """Load the latest checkpoint (or the one a restarted worker group was handed); its trainer state."""
    checkpoint = setup.ctx.restored or latest_checkpoint(setup.paths.checkpoints)
    if checkpoint is None:
        raise FtError(f"--resume: no checkpoint in {setup.paths.checkpoints}")
    if setup.schedule is not None:
        setup.schedule.apply(checkpoint_step(checkpoint))
    spec_lrs = list(setup.scheduler.base_lrs)
    state = load_checkpoint(checkpoint, setup.module, setup.optimizer, setup.scheduler, engine=setup.stepper.engine)
    keep_spec_learning_rates(setup.scheduler, spec_lrs)
    setup.say(f"Resumed from {checkpoint} at step {state['step']}")
    return state


def evaluate_base_model(setup: Setup, state: RunState) -> None:
    """The base model, evaluated the same way as the fine-tuned one will be (once; kept across resumes)."""
    spec, cfg, counts = setup.spec, setup.spec.training, setup.counts
    before_path = setup.paths.eval_before
    if spec.eval.before_after:
        if state.resumed and before_path.is_file():
            state.before = json.loads(before_path.read_text())
        else:  # every worker evaluates its share of the examples (see evaluation/shard.py)
            setup.say("Evaluating the base model ...")
            with base_model_view(setup.module), state.evaluating():
                state.before = setup.evaluate()
                if spec.eval.few_shot_baseline:
                    state.before["few_shot"] = few_shot_baseline(setup.module, setup.tokenizer, setup.bundle,
                                                                 setup.renderer, spec.eval, setup.device, setup.autocast,
                                                                 shard=setup.eval_shard)
            if setup.ctx.is_main:
                write_text_atomic(before_path, json.dumps(state.before, indent=1))
    setup.say(f"Training {setup.total_steps} steps: {counts.trainable:,} of {counts.total:,} parameters "
              f"({counts.percent:.2f}%), {setup.order.per_step} examples/step (batch {cfg.batch_size} x accum "
              f"{cfg.grad_accum} x {setup.ctx.world_size} workers), precision {setup.precision}")


def unfreeze_due_blocks(setup: Setup, state: RunState) -> None:
    if setup.schedule is not None and setup.schedule.apply(state.step):
        state.progress.message(f"step {state.step}: unfroze block group {setup.schedule.current} "
                               f"({count_params(setup.module).trainable:,} trainable)")


def train_step(setup: Setup, state: RunState) -> None:
    """One optimizer step over this worker's micro batches: forward, backward, divergence check, update."""
    ctx, objective, device, stepper = setup.ctx, setup.objective, setup.device, setup.stepper
    number, timeout = state.step + 1, setup.spec.distributed.timeout_s
    pad_id = setup.tokenizer.pad_token_id
    indices = setup.order.micro_batches(objective.data_step(state.step), ctx.rank)
    items = [[setup.bundle.train[i] for i in ids] for ids in indices]
    micro = objective.step_batches(items, indices, state.step, pad_id)  # online RL samples its rollouts here
    # Count on the host before the copy: counting device tensors would wait for the GPU every step.
    targets = torch.tensor(float(sum(objective.count(batch) for batch in micro)), device=device)
    state.window.tokens += sum(tokens_in(batch) for batch in micro)
    micro = [{k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in micro]
    if ctx.world_size > 1:
        with ctx.collective("all_reduce of the step's target count", number, timeout):
            torch.distributed.all_reduce(targets)
    step_loss = torch.zeros((), device=device)
    for index, batch in enumerate(micro):
        # DDP's forward broadcasts buffers and its backward all-reduces gradients: both wait on every peer.
        with (stepper.micro_context(last=index == len(micro) - 1),
              ctx.collective("forward and backward (gradient all-reduce)", number, timeout)):
            with setup.autocast():
                loss = objective.loss_sum(setup.forward_model, batch) / targets
            # Workers' gradients are averaged; scale so the step sees the global sum / targets.
            stepper.backward(loss * ctx.world_size)
        step_loss += loss.detach() * ctx.world_size
    grad_norm = stepper.clip_gradients()
    with ctx.collective("divergence check", number, timeout):
        skip = state.guard.should_skip(number, step_loss, grad_norm, ctx.world_size)
    if skip:
        stepper.skip()
        step_loss.zero_()
        state.progress.message(f"step {number}: non-finite loss or gradients, update skipped "
                               f"({state.guard.skipped} of training.skip_nonfinite_steps={state.guard.allowed_skips})")
    else:
        with ctx.collective("optimizer step", number, timeout):
            stepper.step()
    setup.scheduler.step()
    state.step = number
    state.window.add_step(step_loss)


def log_window(setup: Setup, state: RunState) -> None:
    """One log line: the window's loss and speed over every worker, memory, MFU and cost so far."""
    ctx, window, step = setup.ctx, state.window, state.step

    def all_reduce(tensor: torch.Tensor) -> None:
        with ctx.collective("all_reduce of the logged loss", step, setup.spec.distributed.timeout_s):
            torch.distributed.all_reduce(tensor)

    numbers = window.close(ctx.world_size, all_reduce)
    state.collapse.check_loss(step, numbers["train_loss"])  # the same numbers on every worker
    with ctx.collective("all_reduce of the weights' health check", step, setup.spec.distributed.timeout_s):
        state.collapse.check_weights(setup.module, step, setup.device, ctx.world_size)
    elapsed, tokens_per_s = numbers["elapsed"], numbers["tokens_per_s"]
    record = {
        "step": step, "time": time.time(), "epoch": round(setup.order.epoch_of(step), 4),
        "train_loss": numbers["train_loss"], "lr": setup.scheduler.get_last_lr()[0],
        "tokens_per_s": tokens_per_s, "tokens_per_s_per_worker": tokens_per_s / ctx.world_size,
        "samples_per_s": numbers["steps"] * setup.order.per_step / elapsed, "step_time_s": elapsed / numbers["steps"],
        "tokens": window.tokens_seen, "peak_memory_mb": peak_memory_mb(setup.device),
        "mfu": model_flops_utilization(tokens_per_s, state.flops.total, state.device_flops, ctx.world_size),
        "skipped_nonfinite_steps": state.guard.skipped,
        **run_cost(window.train_seconds, state.devices, state.kind, setup.spec.cost),
    }
    record |= setup.objective.window_stats(ctx.world_size, all_reduce)  # online RL: rewards, KL, clipping, ...
    state.log.write(record)
    state.tracker.log(record)
    state.progress.update(step, record)
    state.report_fields = {k: record[k] for k in ("tokens", "gpu_hours", "cpu_core_hours", "cost_usd")}
    state.report_fields["train_seconds"] = window.train_seconds


def evaluate_during_training(setup: Setup, state: RunState) -> None:
    """Validation metrics; early stopping and the overfitting signal decide whether to stop."""
    spec, step = setup.spec, state.step
    with state.evaluating():
        scores = scalar_metrics(setup.evaluate(generation=False))
    diverging = state.overfit.update(state.window.mean_loss_since_eval(), scores.get("val_loss"))
    improved = state.stopper.update(scores, step)
    record = {"step": step, "time": time.time(), **scores, "overfitting": int(diverging)}
    state.latest_scores = scores
    state.log.write(record)
    state.tracker.log(record)
    setup.ctx.report({**state.report_fields, **record})
    state.progress.message(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                           + (" (best)" if improved else "") + (" [overfitting]" if diverging else ""))
    if state.stopper.should_stop:
        state.stop_reason = f"early stopping: no {spec.eval.metric} improvement in {state.stopper.patience} evaluations"
    elif diverging and spec.eval.stop_on_overfit:
        state.stop_reason = "overfitting: validation loss rising while training loss falls"
    state.window.restart_clock()  # evaluation time is not training time


def checkpoint(setup: Setup, state: RunState) -> Path:
    """A resumable checkpoint of this step (every worker calls this), unless it exists already."""
    state.collapse.check_weights(setup.module, state.step, setup.device, setup.ctx.world_size)  # never checkpoint divergence
    latest = latest_checkpoint(setup.paths.checkpoints)
    if latest is not None and latest.name == checkpoint_name(state.step):
        return latest
    trainer_state = {
        "skipped_nonfinite_steps": state.guard.skipped,
        "tokens_seen": state.window.tokens_seen,
        "train_seconds": state.window.train_seconds,
        "stopper": state.stopper.state(),
        "overfit": state.overfit.state(),
        "collapse": state.collapse.state(),
        "launch": setup.ctx.launch,
    }
    saved = save_checkpoint(setup.paths.checkpoints, state.step, setup.module, setup.optimizer, setup.scheduler,
                            trainer_state, setup.spec.training.keep_checkpoints, engine=setup.stepper.engine,
                            is_main=setup.ctx.is_main, barrier=setup.ctx.barrier)
    push_checkpoint(setup.spec, setup.ctx, saved)  # to run storage, when output.dir is a URI
    return saved


def wrap_up(setup: Setup, state: RunState) -> dict[str, Any]:
    """Final evaluation, the fine-tuned weights (atomically), the summary; then the last report."""
    ctx, paths = setup.ctx, setup.paths
    state.collapse.check_weights(setup.module, state.step, setup.device, ctx.world_size)  # never save a diverged model
    with state.evaluating():
        after = setup.evaluate()
    final_scores = scalar_metrics(after)
    state.log.write({"step": state.step, "time": time.time(), **final_scores})
    state.tracker.log({"step": state.step, **final_scores})
    summary = run_summary(setup, state, state.before, after)
    summary["workers"] = worker_memory(setup)  # collective: every worker's held bytes and peak RSS
    forgetting = summary.get("forgetting")
    if forgetting and forgetting["exceeded"]:
        setup.say(f"WARNING {forgetting_message(forgetting)}")
    full_state = setup.stepper.full_state_dict()  # collective under ZeRO-3
    if ctx.is_main:
        final = save_final_model(setup.module, setup.tokenizer, paths.final, setup.is_peft, setup.label_names,
                                 full_state)
        summary["final"] = str(final)
        write_text_atomic(paths.eval_after, json.dumps(after, indent=1))
        write_text_atomic(paths.summary, json.dumps(summary, indent=1))
        state.tracker.samples_table("eval/samples_before", state.before.get("samples", []))
        state.tracker.samples_table("eval/samples_after", after.get("samples", []))
        state.tracker.finish(summary)
        push_run_files(setup.spec, finished=True)  # to run storage, when output.dir is a URI; summary last
    # Last, once everything is on disk: a sweep scheduler may end the trial as soon as it sees this.
    ctx.report(summary["final_report"])
    if forgetting and forgetting["exceeded"] and forgetting["action"] == "fail":
        raise FtError(f"{forgetting_message(forgetting)} (eval.forgetting.action: fail); the fine-tuned weights are "
                      f"kept in {paths.final} for inspection")
    return summary


def save_final_model(model, tokenizer, final: Path, is_peft: bool, label_names: list[str] | None,
                     state_dict: dict | None = None) -> Path:
    """Write the fine-tuned weights (adapter or full model) + tokenizer atomically to `final` (OUT/final)."""
    with atomic_directory(final) as staging:
        save_weights(model, staging / ("adapter" if is_peft else "model"), state_dict)
        tokenizer.save_pretrained(staging / "tokenizer")
        if label_names is not None:
            (staging / LABELS).write_text(json.dumps(label_names))
    return final


def diverged(spec: JobSpec, ctx: WorkerContext, exc: DivergedError) -> DivergedError:
    """The one-line error of a diverged run, naming its last good checkpoint; the stop goes in metrics.jsonl."""
    paths = RunPaths.of(spec)
    checkpoint_path = latest_checkpoint(paths.checkpoints)
    MetricsLog(paths.metrics, ctx.is_main, None).write(
        {"time": time.time(), "stop_reason": str(exc).split(":")[0].removeprefix("training ")})
    if ctx.is_main:
        push_run_files(spec)
    where = f"last good checkpoint: {display_checkpoint(spec, checkpoint_path)}" if checkpoint_path else "no checkpoint was written before it"
    other = ("or set training.max_weight_growth: null to train on regardless" if isinstance(exc, CollapsedError)
             else "or allow training.skip_nonfinite_steps")
    return DivergedError(f"{exc}; no final weights were saved ({where}). Lower training.lr (now {spec.training.lr:g}) "
                         f"or set training.max_grad_norm, then resume with --resume, {other}")
