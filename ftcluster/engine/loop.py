"""The per-worker training loop: a plain function that Ray Train launches, or you call directly.

Read it top to bottom: set-up (device, data, model, method, optimizer), the base-model
evaluation, the step loop (accumulate → clip → step → log → evaluate → checkpoint), and the
wrap-up (final evaluation, saving the fine-tuned weights, the summary).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from ftcluster.atomic import atomic_directory, write_text_atomic
from ftcluster.data import build_data
from ftcluster.data.batches import StepOrder
from ftcluster.data.render import Renderer
from ftcluster.engine.backends import DeepSpeedStepper, TorchStepper, zero3_init_context
from ftcluster.engine.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ftcluster.engine.context import WorkerContext
from ftcluster.engine.ds_config import deepspeed_config
from ftcluster.engine.health import DivergedError, DivergenceGuard, check_weights_finite
from ftcluster.engine.monitor import EarlyStopper, OverfitDetector
from ftcluster.engine.objectives import make_objective
from ftcluster.engine.optim import build_optimizer, keep_spec_learning_rates, lr_lambda, param_groups
from ftcluster.engine.packing import check_packing_isolation
from ftcluster.engine.progress import Progress
from ftcluster.errors import FtError
from ftcluster.evaluate import base_model_view, few_shot_baseline, run_eval, scalar_metrics
from ftcluster.forgetting import general_items
from ftcluster.forgetting import message as forgetting_message
from ftcluster.forgetting import verdict as forgetting_verdict
from ftcluster.interrupts import STOP
from ftcluster.layout import (
    CHECKPOINTS,
    EVAL_AFTER,
    EVAL_BEFORE,
    FINAL,
    LABELS,
    METRICS,
    SUMMARY,
)
from ftcluster.models.blocks import checkpoint_every_nth_block
from ftcluster.models.load import (
    check_attention,
    load_pretrained,
    load_tokenizer,
    resolve_model,
    torch_dtype,
)
from ftcluster.models.methods import (
    PEFT_METHODS,
    UnfreezeSchedule,
    apply_method,
    count_params,
    param_breakdown,
    quantization_config,
)
from ftcluster.runs import start_output
from ftcluster.spec import JobSpec
from ftcluster.tables import param_table
from ftcluster.track.cost import cost_per_point, device_kind, run_cost
from ftcluster.track.flops import flops_per_token, model_flops_utilization, peak_flops
from ftcluster.track.wandb_run import make_tracker


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(spec: JobSpec, ctx: WorkerContext) -> torch.device:
    if spec.scaling.use_gpu:
        if not torch.cuda.is_available():
            raise FtError("scaling.use_gpu is true but this worker sees no CUDA GPU (set scaling.use_gpu=false)")
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def autocast_factory(precision: str, device: torch.device):
    """A no-argument context factory for the forward pass: bf16/fp16 autocast, or nothing."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision


def set_dropout(model: torch.nn.Module, probability: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = probability


def tokens_in(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a host-side batch; packed batches have no padding to speak of."""
    if "position_ids" in batch:
        return batch["input_ids"].numel()
    return int(batch["attention_mask"].sum())


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class MetricsLog:
    """Appends one JSON object per line to OUTPUT/metrics.jsonl (main worker only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path = path
        self.enabled = enabled
        if enabled and resume_step is not None and path.is_file():
            # Drop what the interrupted run logged after the checkpoint we resume from.
            kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def save_final_model(model, tokenizer, out_dir: Path, is_peft: bool, label_names: list[str] | None,
                     state_dict: dict | None = None) -> Path:
    """Write the fine-tuned weights (adapter or full model) + tokenizer atomically to OUT/final."""
    final = out_dir / FINAL
    with atomic_directory(final) as staging:
        model.save_pretrained(staging / ("adapter" if is_peft else "model"), state_dict=state_dict)
        tokenizer.save_pretrained(staging / "tokenizer")
        if label_names is not None:
            (staging / LABELS).write_text(json.dumps(label_names))
    return final


def train(spec: JobSpec, ctx: WorkerContext | None = None, **options: Any) -> dict[str, Any]:
    """Fine-tune as the spec says; returns the run summary (also written to OUTPUT/summary.json).

    A run that diverges ends with a DivergedError naming its last good checkpoint; nothing from
    the diverged model is saved as a result.
    """
    ctx = ctx or WorkerContext()
    try:
        return _train(spec, ctx, **options)
    except DivergedError as exc:
        checkpoint = latest_checkpoint(spec.output_dir.resolve() / CHECKPOINTS)
        MetricsLog(spec.output_dir.resolve() / METRICS, ctx.is_main, None).write(
            {"time": time.time(), "stop_reason": str(exc).split(":")[0].removeprefix("training ")})
        where = f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written before it"
        raise DivergedError(
            f"{exc}; no final weights were saved ({where}). Lower training.lr (now {spec.training.lr:g}) or set "
            "training.max_grad_norm, then resume with --resume, or allow training.skip_nonfinite_steps"
        ) from None


def _train(
    spec: JobSpec,
    ctx: WorkerContext,
    *,
    resume: bool = False,
    train_records=None,
    val_records=None,
    verbose: bool = True,
) -> dict[str, Any]:
    main = ctx.is_main
    say = print if (verbose and main) else (lambda *a, **k: None)
    out_dir = spec.output_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = spec.training

    torch.set_num_threads(cfg.threads or max(1, int(spec.scaling.cpus_per_worker)))
    seed_everything(cfg.seed)
    device = pick_device(spec, ctx)
    autocast, precision = autocast_factory(cfg.precision, device)

    # --- data first: a bad file fails in a second, before any model loads ---------------------
    resolved = resolve_model(spec.model.path)
    tokenizer = load_tokenizer(resolved, spec.model.revision)
    bundle = build_data(spec.data, tokenizer, train_records, val_records)
    for line in bundle.report.lines():
        say(line)
    order = StepOrder(len(bundle.train), cfg.batch_size, cfg.grad_accum, ctx.world_size, cfg.seed)
    if order.steps_per_epoch == 0:
        raise FtError(
            f"data.train: {len(bundle.train)} training examples cannot fill one step of "
            f"{order.per_step} (batch_size x grad_accum x workers); lower training.batch_size"
        )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * order.steps_per_epoch))

    # --- model and method --------------------------------------------------------------------
    rss_before_model_mb = current_rss_mb()
    dtype = torch_dtype(spec.model.dtype, device.type)
    quant = quantization_config(spec.method, dtype)
    use_deepspeed = spec.distributed.backend == "deepspeed"
    ds_config = deepspeed_config(spec, precision) if use_deepspeed else None
    if use_deepspeed:
        autocast = contextlib.nullcontext  # DeepSpeed casts the model itself (bf16/fp16 sections)
    zero3 = zero3_init_context(ds_config) if use_deepspeed and spec.distributed.zero_stage == 3 else None
    check_attention(spec.model.attention, device.type)
    model = load_pretrained(
        resolved, spec.model.task, dtype=dtype, label_names=bundle.label_names,
        pad_token_id=tokenizer.pad_token_id, quantization_config=quant, revision=spec.model.revision,
        zero3_rank=ctx.rank if zero3 is not None else None, attention=spec.model.attention,
    )
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(model, spec.method, spec.model.task, cfg.gradient_checkpointing)
    if cfg.gradient_checkpointing and cfg.gradient_checkpointing_every > 1:
        checkpoint_every_nth_block(model, cfg.gradient_checkpointing_every)
    if quant is None and zero3 is None:
        model.to(device)
    is_peft = spec.method.name in PEFT_METHODS
    objective = make_objective(spec, model, is_peft)  # fixes a DPO reference now
    schedule = None
    if spec.method.unfreeze is not None:
        base = {n for n, p in model.named_parameters() if p.requires_grad}
        schedule = UnfreezeSchedule(model, spec.method, order.steps_per_epoch, base)
        include = lambda name, p: True  # every block may unfreeze later: all get optimizer slots
    else:
        include = lambda name, p: p.requires_grad
    groups = param_groups(model, cfg.lr, cfg.weight_decay, spec.method.layerwise_lr_decay, include)
    optimizer = build_optimizer(groups, cfg.betas, device.type, spec.distributed.offload_optimizer != "none")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.scheduler, cfg.warmup_steps, total_steps))
    if schedule is not None:
        schedule.apply(0)
    counts = count_params(model)
    load_peak_mb = peak_memory_mb(device)  # what building the model cost this worker
    if verbose and main:
        Console().print(param_table(param_breakdown(model), spec.method.name))
    if use_deepspeed:
        stepper = DeepSpeedStepper(model, optimizer, ds_config)
    else:
        stepper = TorchStepper(model, optimizer, precision=precision, max_grad_norm=cfg.max_grad_norm,
                               world_size=ctx.world_size, device=device, bucket_size_mb=spec.distributed.bucket_size_mb)
    trained_model, model = stepper.module, stepper.forward_model
    if spec.data.packing:
        check_packing_isolation(trained_model, device, autocast)
    if cfg.compile:
        model = torch.compile(model)  # the training forward only; evaluation and generation stay eager

    renderer = Renderer(tokenizer, spec.data.max_length, spec.data.train_on_prompt)
    eval_batch = cfg.batch_size
    pad_id = tokenizer.pad_token_id

    general = general_items(spec.eval.forgetting, renderer) if spec.eval.forgetting else None

    def evaluate(generation: bool = True) -> dict:
        return run_eval(trained_model, tokenizer, bundle, renderer, spec.eval, eval_batch, device, autocast, generation,
                        objective, general)

    # --- resume -------------------------------------------------------------------------------
    start_step = 0
    state: dict[str, Any] = {}
    checkpoint_root = out_dir / CHECKPOINTS
    resume = resume or ctx.restored is not None  # a restarted worker group continues its run
    if resume:
        checkpoint = ctx.restored or latest_checkpoint(checkpoint_root)
        if checkpoint is None:
            raise FtError(f"--resume: no checkpoint in {checkpoint_root}")
        if schedule is not None:
            schedule.apply(json.loads((checkpoint / "trainer_state.json").read_text())["step"])
        spec_lrs = list(scheduler.base_lrs)
        state = load_checkpoint(checkpoint, trained_model, optimizer, scheduler, engine=stepper.engine)
        keep_spec_learning_rates(scheduler, spec_lrs)
        start_step = state["step"]
        say(f"Resumed from {checkpoint} at step {start_step}")
    if main:
        start_output(spec, resume)
    log = MetricsLog(out_dir / METRICS, main, start_step if resume else None)
    tracker = make_tracker(spec, out_dir, main, resume)
    mean_length = sum(len(item.input_ids) for item in bundle.train) / len(bundle.train)
    flops = flops_per_token(trained_model, round(mean_length))
    device_flops = peak_flops(device)
    kind = device_kind(device)
    devices = ctx.world_size * (spec.scaling.gpus_per_worker if kind != "cpu" else spec.scaling.cpus_per_worker)

    # --- the base model, evaluated the same way as the fine-tuned one later ------------------
    before: dict = {}
    before_path = out_dir / EVAL_BEFORE
    if spec.eval.before_after:
        if resume and before_path.is_file():
            before = json.loads(before_path.read_text())
        else:  # every worker evaluates: under ZeRO-3 each forward pass is a collective
            say("Evaluating the base model ...")
            with base_model_view(trained_model):
                before = evaluate()
                if spec.eval.few_shot_baseline:
                    before["few_shot"] = few_shot_baseline(trained_model, tokenizer, bundle, renderer, spec.eval,
                                                           device, autocast)
            if main:
                write_text_atomic(before_path, json.dumps(before, indent=1))

    say(f"Training {total_steps} steps: {counts.trainable:,} of {counts.total:,} parameters "
        f"({counts.percent:.2f}%), {order.per_step} examples/step "
        f"(batch {cfg.batch_size} x accum {cfg.grad_accum} x {ctx.world_size} workers), precision {precision}")

    # --- the loop -----------------------------------------------------------------------------
    stopper = EarlyStopper(spec.eval.metric, spec.eval.mode, spec.eval.early_stopping_patience,
                           state.get("stopper"), spec.eval.min_delta)
    overfit = OverfitDetector(spec.eval.overfit_evals, state.get("overfit"))
    guard = DivergenceGuard(cfg.skip_nonfinite_steps, state.get("skipped_nonfinite_steps", 0))
    tokens_seen = state.get("tokens_seen", 0)
    train_seconds = state.get("train_seconds", 0.0)
    progress = Progress(total_steps, start_step, enabled=verbose and main)
    model.train()
    window_loss = torch.zeros((), device=device)
    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
    since_eval_loss, since_eval_steps = 0.0, 0
    # What every report to the launcher carries (a sweep's scheduler and budget read these).
    progress_fields: dict[str, Any] = {}
    latest_scores: dict[str, float] = {}
    stop_reason = "completed"
    timeout = spec.distributed.timeout_s
    step = start_step

    def checkpoint(at_step: int) -> Path:
        check_weights_finite(trained_model, at_step, device, ctx.world_size)  # never checkpoint a diverged model
        latest = latest_checkpoint(checkpoint_root)
        if latest is not None and latest.name == checkpoint_name(at_step):
            return latest
        trainer_state = {
            "skipped_nonfinite_steps": guard.skipped,
            "tokens_seen": tokens_seen,
            "train_seconds": train_seconds,
            "stopper": stopper.state(),
            "overfit": overfit.state(),
        }
        return save_checkpoint(checkpoint_root, at_step, trained_model, optimizer, scheduler, trainer_state,
                               cfg.keep_checkpoints, engine=stepper.engine, is_main=main, barrier=ctx.barrier)

    with STOP.at_step_boundaries():  # a signal waits for the step in flight, then checkpoints
        while step < total_steps:
            if schedule is not None and schedule.apply(step):
                progress.message(f"step {step}: unfroze block group {schedule.current} "
                                 f"({count_params(trained_model).trainable:,} trainable)")
            micro = [objective.collate([bundle.train[i] for i in ids], pad_id) for ids in order.micro_batches(step, ctx.rank)]
            # Count on the host before the copy: counting device tensors would wait for the GPU every step.
            step_targets = sum(objective.count(b) for b in micro)
            window_tokens += sum(tokens_in(b) for b in micro)
            micro = [{k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in micro]
            targets = torch.tensor(float(step_targets), device=device)
            if ctx.world_size > 1:
                with ctx.collective("all_reduce of the step's target count", step + 1, timeout):
                    torch.distributed.all_reduce(targets)
            step_loss = torch.zeros((), device=device)
            for index, batch in enumerate(micro):
                with stepper.micro_context(last=index == len(micro) - 1):
                    with autocast():
                        loss = objective.loss_sum(model, batch) / targets
                    # Workers' gradients are averaged; scale so the step sees the global sum / targets.
                    with ctx.collective("gradient all-reduce (backward)", step + 1, timeout):
                        stepper.backward(loss * ctx.world_size)
                step_loss += loss.detach() * ctx.world_size
            grad_norm = stepper.clip_gradients()
            with ctx.collective("divergence check", step + 1, timeout):
                skip = guard.should_skip(step + 1, step_loss, grad_norm, ctx.world_size)
            if skip:
                stepper.skip()
                step_loss.zero_()
                progress.message(f"step {step + 1}: non-finite loss or gradients, update skipped "
                                 f"({guard.skipped} of training.skip_nonfinite_steps={guard.allowed_skips})")
            else:
                with ctx.collective("optimizer step", step + 1, timeout):
                    stepper.step()
            scheduler.step()
            step += 1
            window_loss += step_loss
            window_steps += 1

            if step % cfg.log_every == 0 or step == total_steps:
                if ctx.world_size > 1:
                    with ctx.collective("all_reduce of the logged loss", step, timeout):
                        torch.distributed.all_reduce(window_loss)
                    window_loss /= ctx.world_size
                elapsed = time.perf_counter() - window_start
                train_seconds += elapsed
                tokens_seen += window_tokens * ctx.world_size
                train_loss = float(window_loss) / window_steps
                tokens_per_s = window_tokens * ctx.world_size / elapsed
                record = {
                    "step": step,
                    "time": time.time(),
                    "epoch": round(order.epoch_of(step), 4),
                    "train_loss": train_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens_per_s,
                    "tokens_per_s_per_worker": tokens_per_s / ctx.world_size,
                    "samples_per_s": window_steps * order.per_step / elapsed,
                    "step_time_s": elapsed / window_steps,
                    "tokens": tokens_seen,
                    "peak_memory_mb": peak_memory_mb(device),
                    "mfu": model_flops_utilization(tokens_per_s, flops.total, device_flops, ctx.world_size),
                    "skipped_nonfinite_steps": guard.skipped,
                    **run_cost(train_seconds, devices, kind, spec.cost),
                }
                log.write(record)
                tracker.log(record)
                progress.update(step, record)
                progress_fields = {k: record[k] for k in ("tokens", "gpu_hours", "cpu_core_hours", "cost_usd")}
                progress_fields["train_seconds"] = train_seconds
                since_eval_loss += train_loss * window_steps
                since_eval_steps += window_steps
                window_loss.zero_()
                window_steps, window_tokens, window_start = 0, 0, time.perf_counter()

            at_eval = spec.eval.every is not None and step % spec.eval.every == 0 and step < total_steps
            if at_eval:
                scores = scalar_metrics(evaluate(generation=False))
                train_avg = since_eval_loss / max(since_eval_steps, 1)
                since_eval_loss, since_eval_steps = 0.0, 0
                diverging = overfit.update(train_avg, scores.get("val_loss"))
                improved = stopper.update(scores, step)
                record = {"step": step, "time": time.time(), **scores, "overfitting": int(diverging)}
                latest_scores = scores
                log.write(record)
                tracker.log(record)
                ctx.report({**progress_fields, **record})
                progress.message(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                                 + (" (best)" if improved else "") + (" [overfitting]" if diverging else ""))
                if stopper.should_stop:
                    stop_reason = f"early stopping: no {spec.eval.metric} improvement in {stopper.patience} evaluations"
                elif diverging and spec.eval.stop_on_overfit:
                    stop_reason = "overfitting: validation loss rising while training loss falls"
                window_start = time.perf_counter()  # evaluation time is not training time

            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                saved = checkpoint(step)
                ctx.report({**progress_fields, **latest_scores, "step": step}, saved if main else None)
                window_start = time.perf_counter()
            ctx.maybe_fail(step)
            STOP.raise_if_requested(step, lambda: checkpoint(step) if cfg.checkpoint_on_preempt
                                    else latest_checkpoint(checkpoint_root))
            if stop_reason != "completed":
                progress.message(f"Stopping at step {step}: {stop_reason}")
                break
    progress.close()

    # --- wrap-up ------------------------------------------------------------------------------
    check_weights_finite(trained_model, step, device, ctx.world_size)  # never save a diverged model as the result
    after = evaluate()
    final_scores = scalar_metrics(after)
    if main:
        log.write({"step": step, "time": time.time(), **final_scores})
        tracker.log({"step": step, **final_scores})
    summary: dict[str, Any] = {
        "name": spec.name,
        "method": spec.method.name,
        "model": spec.model.path,
        "steps": step,
        "total_steps": total_steps,
        "epochs": round(order.epoch_of(step), 4),
        "stop_reason": stop_reason,
        "tokens": tokens_seen,
        "train_seconds": round(train_seconds, 3),
        "tokens_per_s": tokens_seen / train_seconds if train_seconds else 0.0,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "world_size": ctx.world_size,
        "precision": precision,
        "device": str(device),
        "peak_memory_mb": peak_memory_mb(device),
        "load_peak_memory_mb": load_peak_mb,
        "rss_before_model_mb": rss_before_model_mb,
        "before": scalar_metrics(before),
        "after": final_scores,
        "samples": {"before": before.get("samples", []), "after": after.get("samples", [])},
        "best": stopper.best_record(),
        "resumed_from_step": start_step if resume else None,
        "flops_per_token": flops.total,
        "mfu": model_flops_utilization(tokens_seen / train_seconds, flops.total, device_flops, ctx.world_size)
        if train_seconds else None,
        "device_kind": kind,
        **run_cost(train_seconds, devices, kind, spec.cost),
    }
    summary["cost_per_million_tokens_usd"] = (
        summary["cost_usd"] / tokens_seen * 1e6 if summary["cost_usd"] is not None and tokens_seen else None
    )
    metric = spec.eval.metric
    summary["cost_per_point_usd"] = cost_per_point(
        summary["cost_usd"], summary["before"].get(metric), final_scores.get(metric), spec.eval.mode
    )
    if before.get("few_shot"):
        summary["few_shot"] = {k: v for k, v in before["few_shot"].items() if k != "samples"}
    if spec.eval.forgetting and "general_perplexity" in before:
        summary["forgetting"] = forgetting_verdict(before, after, spec.eval.forgetting)
        if summary["forgetting"]["exceeded"]:
            say(f"WARNING {forgetting_message(summary['forgetting'])}")
    if bundle.label_names is not None and "confusion_matrix" in after:
        summary["confusion"] = {"labels": bundle.label_names, "matrix": after["confusion_matrix"]}
    # Kept in the summary so a sweep can replay it if Tune never saw it (interrupted right after).
    final_report = {**progress_fields, "step": step, **final_scores, "completed": 1}
    summary["final_report"] = final_report
    summary["skipped_nonfinite_steps"] = guard.skipped
    full_state = stepper.full_state_dict()  # collective under ZeRO-3
    if main:
        final = save_final_model(trained_model, tokenizer, out_dir, is_peft, bundle.label_names, full_state)
        summary["final"] = str(final)
        write_text_atomic(out_dir / EVAL_AFTER, json.dumps(after, indent=1))
        write_text_atomic(out_dir / SUMMARY, json.dumps(summary, indent=1))
        tracker.samples_table("eval/samples_before", before.get("samples", []))
        tracker.samples_table("eval/samples_after", after.get("samples", []))
        tracker.finish(summary)
    # Last, once everything is on disk: a sweep scheduler may end the trial as soon as it sees this.
    ctx.report(final_report)
    forgetting = summary.get("forgetting")
    if forgetting and forgetting["exceeded"] and forgetting["action"] == "fail":
        raise FtError(f"{forgetting_message(forgetting)} (eval.forgetting.action: fail); the fine-tuned weights are "
                      f"kept in {out_dir / FINAL} for inspection")
    return summary
