"""Set-up of one worker's run: device, data, model and method, optimizer, and the step executor.

Data loads first, so a bad file fails in a second, before any model loads. The result, `Setup`,
is everything the loop needs and never changes during training.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.console import Console

from ftcluster.config.deepspeed import deepspeed_config
from ftcluster.config.registry import METHODS, OBJECTIVES
from ftcluster.config.spec import JobSpec
from ftcluster.core.errors import FtError
from ftcluster.core.worker import WorkerContext
from ftcluster.data import build_data
from ftcluster.data.batches import StepOrder
from ftcluster.data.render import Renderer
from ftcluster.evaluation.forgetting import general_items
from ftcluster.evaluation.shard import EvalShard
from ftcluster.evaluation.suite import EvalContext, run_eval
from ftcluster.models.blocks import checkpoint_every_nth_block
from ftcluster.models.load import check_attention, load_pretrained, load_tokenizer, resolve_model, torch_dtype
from ftcluster.models.methods import (
    ParamCounts,
    UnfreezeSchedule,
    apply_method,
    count_params,
    param_breakdown,
    quantization_config,
)
from ftcluster.objectives.base import Objective, make_objective
from ftcluster.objectives.grpo.sampling import PolicyContext
from ftcluster.runs.paths import RunPaths
from ftcluster.track.tables import param_table
from ftcluster.training.backends import DeepSpeedStepper, TorchStepper, zero3_init_context
from ftcluster.training.optim import build_optimizer, lr_lambda, param_groups
from ftcluster.training.packing import check_packing_isolation


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@dataclass(kw_only=True)
class Setup:
    """What set-up built for this worker; fixed for the whole run (built by keyword: `build_setup`)."""

    spec: JobSpec
    ctx: WorkerContext
    paths: RunPaths  # the run's location, this process's folder of it, its files
    say: Callable[..., None]
    verbose: bool
    device: torch.device
    precision: str
    autocast: Callable[[], Any]
    tokenizer: Any
    bundle: Any  # ftcluster.data.DataBundle
    renderer: Renderer
    order: StepOrder
    total_steps: int
    module: torch.nn.Module  # the model being trained (a PEFT model for adapter methods)
    forward_model: Any  # what the training forward runs: the module, or its DDP/DeepSpeed/compiled wrapper
    stepper: TorchStepper | DeepSpeedStepper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: UnfreezeSchedule | None
    objective: Objective
    is_peft: bool
    counts: ParamCounts  # at the start (an unfreeze schedule adds more later)
    general: list | None  # forgetting-check texts
    rss_before_model_mb: float
    load_peak_mb: float
    label_names: list[str] | None  # the classification head's outputs (saved with the weights)

    @property
    def eval_shard(self) -> EvalShard:
        """This worker's share of every evaluation (in lockstep under ZeRO-3, where a forward pass is a collective)."""
        distributed = self.spec.distributed
        zero3 = distributed.backend == "deepspeed" and distributed.zero_stage == 3
        return EvalShard(self.ctx.rank, self.ctx.world_size, lockstep=zero3, device=self.device)

    def evaluate(self, generation: bool = True) -> dict:
        """Validation loss/metrics (and generation) of the module as it is now."""
        return run_eval(self.module, self.eval_context, generation)

    @functools.cached_property
    def eval_context(self) -> EvalContext:
        return EvalContext(self.tokenizer, self.bundle, self.renderer, self.spec.eval, self.spec.training.batch_size,
                           self.device, self.autocast, self.objective, self.general, self.eval_shard)


def build_setup(spec: JobSpec, ctx: WorkerContext, *, train_records=None, val_records=None,
                verbose: bool = True, load: Callable[..., torch.nn.Module] | None = None) -> Setup:
    """Device, data, model + method, optimizer and step executor, in the order that fails fastest.

    load: replaces `load_model` (same arguments); a shared-base pack's adds an adapter to the one base.
    """
    cfg = spec.training
    paths = RunPaths.of(spec)
    paths.local.mkdir(parents=True, exist_ok=True)
    say = print if (verbose and ctx.is_main) else (lambda *a, **k: None)
    torch.set_num_threads(cfg.threads or max(1, int(spec.scaling.cpus_per_worker)))
    seed_everything(cfg.seed)
    device = pick_device(spec, ctx)
    autocast, precision = autocast_factory(cfg.precision, device)

    resolved = resolve_model(spec.model.path)
    tokenizer = load_tokenizer(resolved, spec.model.revision)
    bundle = build_data(spec.data, tokenizer, train_records, val_records)
    for line in bundle.report.lines():
        say(line)
    say(f"tokenized data: {bundle.cache} ({'from the cache' if bundle.from_cache else 'tokenized now'})")
    if bundle.repaired:
        say(f"the tokenized data cache entry {bundle.cache} was damaged ({', '.join(bundle.repaired)} missing or "
            "changed since written); it was rebuilt")
    order = StepOrder(len(bundle.train), cfg.batch_size, cfg.grad_accum, ctx.world_size, cfg.seed)
    if order.steps_per_epoch == 0:
        raise FtError(f"data.train: {len(bundle.train)} training examples cannot fill one step of {order.per_step} "
                      "(batch_size x grad_accum x workers); lower training.batch_size")
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * order.steps_per_epoch))

    rss_before_model_mb = current_rss_mb()
    ds_config = deepspeed_config(spec, precision) if spec.distributed.backend == "deepspeed" else None
    if ds_config is not None:
        autocast = contextlib.nullcontext  # DeepSpeed casts the model itself (bf16/fp16 sections)
    label_names = head_labels(spec, bundle.label_names)
    model = (load or load_model)(spec, ctx, device, resolved, tokenizer, label_names, ds_config)
    is_peft = METHODS[spec.method.name].adapters
    context = policy_context(spec, ctx, tokenizer, bundle, device, autocast) if OBJECTIVES[spec.method.objective].online else None
    objective = make_objective(spec, model, is_peft, context=context)  # fixes a DPO/GRPO reference now
    schedule, optimizer, scheduler = _optimizer(spec, model, device, order, total_steps)
    counts = count_params(model)
    load_peak_mb = peak_memory_mb(device)  # what building the model cost this worker
    if verbose and ctx.is_main:
        Console().print(param_table(param_breakdown(model), spec.method.name))
    if ds_config is not None:
        stepper: TorchStepper | DeepSpeedStepper = DeepSpeedStepper(model, optimizer, ds_config)
    else:
        stepper = TorchStepper(model, optimizer, precision=precision, max_grad_norm=cfg.max_grad_norm,
                               world_size=ctx.world_size, device=device, bucket_size_mb=spec.distributed.bucket_size_mb)
    if spec.data.packing:
        check_packing_isolation(stepper.module, device, autocast)
    # torch.compile wraps the training forward only; evaluation and generation stay eager.
    forward_model = torch.compile(stepper.forward_model) if cfg.compile else stepper.forward_model
    renderer = Renderer(tokenizer, spec.data.max_length, spec.data.train_on_prompt)
    general = general_items(spec.eval.forgetting, renderer) if spec.eval.forgetting else None
    return Setup(spec=spec, ctx=ctx, paths=paths, say=say, verbose=verbose, device=device, precision=precision,
                 autocast=autocast, tokenizer=tokenizer, bundle=bundle, renderer=renderer, order=order,
                 total_steps=total_steps, module=stepper.module, forward_model=forward_model, stepper=stepper,
                 optimizer=optimizer, scheduler=scheduler, schedule=schedule, objective=objective, is_peft=is_peft,
                 counts=counts, general=general, rss_before_model_mb=rss_before_model_mb, load_peak_mb=load_peak_mb,
                 label_names=label_names)


def policy_context(spec: JobSpec, ctx: WorkerContext, tokenizer, bundle, device: torch.device,
                   autocast) -> PolicyContext:
    """What online RL samples and scores with: the run's tokenizer, its prompts and their references, and
    the launcher's sampler (rollout actors) if it has one."""
    return PolicyContext(tokenizer, bundle.train.example, bundle.val_examples, device, autocast, spec.training.seed,
                         ctx.sampler)


def head_labels(spec: JobSpec, data_labels: list[str] | None) -> list[str] | None:
    """The outputs of the classification head: the data's classes, or the objective's own (a reward)."""
    own = OBJECTIVES[spec.method.objective].head_labels
    return list(own) if own is not None else data_labels


def load_model(spec: JobSpec, ctx: WorkerContext, device: torch.device, resolved, tokenizer, label_names,
                ds_config: dict | None) -> torch.nn.Module:
    """The base model with the method applied (adapters, freezing, quantization), on its device."""
    cfg = spec.training
    dtype = torch_dtype(spec.model.dtype, device.type)
    quant = quantization_config(spec.method, dtype)
    zero3 = zero3_init_context(ds_config) if ds_config is not None and spec.distributed.zero_stage == 3 else None
    check_attention(spec.model.attention, device.type)
    model = load_pretrained(
        resolved, spec.model.task, dtype=dtype, label_names=label_names,
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
    return model


def _optimizer(spec: JobSpec, model: torch.nn.Module, device: torch.device, order: StepOrder, total_steps: int):
    """(unfreeze schedule or None, AdamW over the parameter groups, learning-rate schedule)."""
    cfg = spec.training
    schedule = None
    if spec.method.unfreeze is not None:
        base = {n for n, p in model.named_parameters() if p.requires_grad}
        schedule = UnfreezeSchedule(model, spec.method, order.steps_per_epoch, base)

        def include(name, p):
            return True  # every block may unfreeze later: all get optimizer slots
    else:
        def include(name, p):
            return p.requires_grad
    groups = param_groups(model, cfg.lr, cfg.weight_decay, spec.method.layerwise_lr_decay, include)
    optimizer = build_optimizer(groups, cfg.betas, device.type, spec.distributed.offload_optimizer != "none")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.scheduler, cfg.warmup_steps, total_steps))
    if schedule is not None:
        schedule.apply(0)
    return schedule, optimizer, scheduler

