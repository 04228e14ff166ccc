"""Memory and cost planner: will this job fit, and what will an epoch cost, before paying for it.

Everything is derived from the model's config built on the meta device (real shapes, no
weights), the method, precision, ZeRO stage and offload, sequence length, micro batch and
world size. Model states (weights, gradients, optimizer) follow DeepSpeed's own accounting for
mixed precision (a test holds them to DeepSpeed's estimators); activations use the standard
per-layer estimate for SDPA attention (34 x width bytes per token per layer at 16 bits; with
checkpointing only each layer's input is kept and one layer is recomputed at a time).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch

from ftcluster.config.registry import METHODS, precision_family
from ftcluster.config.spec import JobSpec
from ftcluster.core.accelerators import find_accelerator
from ftcluster.core.errors import FtError
from ftcluster.models.methods import apply_method, count_params, full_precision
from ftcluster.track.cost import hourly_price
from ftcluster.track.flops import flops_per_token, peak_flops_of

GB = 1e9
RUNTIME_GPU_BYTES = 1.5 * GB  # CUDA context, NCCL buffers, allocator slack
RUNTIME_HOST_BYTES_PER_WORKER = 3 * GB  # Python, torch, Ray worker
RUNTIME_CPU_WORKER_BYTES = 1.0 * GB  # the same on a CPU worker (no CUDA libraries): measured 0.8-0.9 GB
CHECKPOINT_SHARD_BYTES = 5 * GB  # transformers loads one safetensors shard at a time
OFFLOAD_SPEED = {"none": 1.0, "optimizer": 0.7, "optimizer+params": 0.45}  # assumed MFU multipliers
DS_HOST_BUFFER = 1.5  # DeepSpeed estimators' additional_buffer_factor
DS_MAX_LIVE_PARAMETERS = 1e9  # ZeRO-3's stage3_max_live_parameters default: gathered weights it may keep


@dataclass
class Setup:
    """One way to run the job: what the planner varies for --suggest."""

    method: str
    backend: str
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    nodes: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def offload(self) -> str:
        if self.offload_params:
            return "optimizer+params"
        return "optimizer" if self.offload_optimizer else "none"

    def label(self) -> str:
        backend = "ddp" if self.backend == "ddp" else f"ZeRO-{self.zero_stage}"
        offload = "" if self.offload == "none" else f" + offload {self.offload}"
        return f"{self.method}, {backend}{offload}, {self.nodes} x {self.gpus_per_node} GPUs"


@dataclass
class Plan:
    setup: Setup
    gpu_type: str
    total_params: int
    trainable_params: int
    largest_tensor: int
    gpu_bytes: dict[str, float]
    gpu_capacity: float
    host_bytes_per_node: dict[str, float]
    host_capacity: float
    tokens_per_epoch: int
    tokens_estimated: bool
    flops_per_token: int
    mfu: float
    hours_per_epoch: float | None
    cost_per_epoch: float | None
    cpu: bool = False  # CPU workers: the "GPU" figures are each worker's share of host RAM

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu_bytes.values())

    @property
    def model_states(self) -> float:
        """Per device: weights, gradients and optimizer states (what `held_memory` counts in a worker)."""
        return sum(value for key, value in self.gpu_bytes.items()
                   if key not in ("activations", "logits", "runtime", "optimizer step"))

    @property
    def host_total(self) -> float:
        return sum(self.host_bytes_per_node.values())

    @property
    def fits(self) -> bool:
        return self.gpu_total <= self.gpu_capacity and self.host_total <= self.host_capacity


# --- model shapes --------------------------------------------------------------------------------


def meta_model_for(spec: JobSpec):
    """The job's model with its method applied, on the meta device."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    from ftcluster.models.load import resolve_model
    from ftcluster.models.shapes import known_shape, meta_model

    shape = known_shape(spec.model.path)
    if shape is not None:
        model = meta_model(shape)
    else:
        resolved = resolve_model(spec.model.path)
        if not resolved.local:
            from ftcluster.models.shapes import LLAMA_SHAPES

            raise FtError(f"plan: no local config for {spec.model.path} (known offline: {', '.join(LLAMA_SHAPES)})")
        config = AutoConfig.from_pretrained(resolved.source)
        auto = AutoModelForSequenceClassification if spec.model.task == "classification" else AutoModelForCausalLM
        if spec.model.task == "classification":
            config.num_labels = 2
        with torch.device("meta"):
            model = auto.from_config(config)
    return model


def with_method(model, spec: JobSpec, method: str):
    """Apply the method's structure (QLoRA's adapters are LoRA's; its base is counted at 4 bits)."""
    structural = full_precision(spec.method.model_copy(update={"name": method, "unfreeze": None}))
    with torch.device("meta"):  # adapters too: shapes only, no memory, no initialisation work
        return apply_method(model, structural, spec.model.task)


# --- the estimate --------------------------------------------------------------------------------


def _bytes_per_weight(precision: str) -> int:
    return 4 if precision == "fp32" else 2


# bitsandbytes 4-bit: half a byte per weight plus one absmax per block of 64 (fp32, or 8-bit with
# a second level of fp32 constants per 256 blocks when the constants are quantized too).
FOUR_BIT_BYTES = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64 + 4 / (64 * 256)}


def quantized_weights(model) -> int:
    """Weights QLoRA stores in 4 bits: frozen nn.Linear weights other than the output head, which
    transformers keeps in 16 bits along with the embeddings and norms."""
    head = model.get_output_embeddings()
    return sum(module.weight.numel() for module in model.modules()
               if type(module) is torch.nn.Linear and module is not head and not module.weight.requires_grad)


def frozen_weight_bytes(frozen: int, quantized: int, precision: str, double_quant: bool) -> float:
    """Frozen weights: `quantized` of them in 4 bits (QLoRA; 0 otherwise), the rest in the weights' dtype."""
    return quantized * FOUR_BIT_BYTES[double_quant] + (frozen - quantized) * _bytes_per_weight(precision)


def model_state_bytes(setup: Setup, total: int, trainable: int, largest: int, precision: str,
                      quantized: int = 0, double_quant: bool = True) -> dict[str, float]:
    """Per-GPU weights, gradients and optimizer states.

    DeepSpeed (mixed precision): 16-bit weights, and per trained parameter 18 bytes of 16-bit and
    32-bit gradients, 32-bit master weights and two Adam moments, partitioned by ZeRO stage; ZeRO-3
    also holds the largest layer gathered in 32 bits, and keeps its weights in the training precision
    (32-bit ones when training in fp32, as CPU workers do by default). torch (DDP): weights, gradients and both
    AdamW moments in the weights' dtype. QLoRA's `quantized` weights cost about half a byte each.
    """
    w = setup.world
    weight = _bytes_per_weight(precision)
    frozen_bytes = frozen_weight_bytes(total - trainable, quantized, precision, double_quant)
    if setup.backend == "ddp":
        return {
            "weights": frozen_bytes + trainable * weight,
            "gradients": trainable * weight,
            "optimizer": trainable * 2 * weight,
        }
    stage = setup.zero_stage
    if stage == 3:
        weights = (frozen_bytes + trainable * weight) / w if not setup.offload_params else 0.0
        return {
            "weights": weights,
            "gathered layer": 4 * largest,
            "gradients + optimizer": 0.0 if setup.offload_optimizer else 16 * trainable / w,
        }
    weights = frozen_bytes + trainable * 2
    if setup.offload_optimizer:
        return {"weights": weights, "gradients + optimizer": 0.0}
    if stage == 2:
        return {"weights": weights, "gradients + optimizer": 18 * trainable / w}
    return {"weights": weights, "gradients": 2 * trainable + 4 * trainable / w, "optimizer": 12 * trainable / w}


def zero3_working_bytes(setup: Setup, total: int, trainable: int, precision: str, fused_adam: bool) -> dict[str, float]:
    """What ZeRO-3 holds beyond its partitioned states, measured on CPU (bench/zero3_scale.py): the
    gathered 16-bit weights it keeps between uses (up to stage3_max_live_parameters: a whole model
    below 1B parameters), and during the optimizer step a 32-bit copy of the gradient partition plus,
    unless AdamW is fused (ftcluster fuses it on GPUs), torch AdamW's two 32-bit temporaries per
    trained parameter of the partition. Nothing here when the optimizer is offloaded (its step runs in
    DeepSpeed's CPU Adam, in host RAM)."""
    if setup.backend != "deepspeed" or setup.zero_stage != 3:
        return {}
    out = {"live gathered weights": min(total, DS_MAX_LIVE_PARAMETERS) * _bytes_per_weight(precision)}
    if not setup.offload_optimizer:
        out["optimizer step"] = trainable / setup.world * (4 + (0 if fused_adam else 8))
    return out


def chunked_loss_for(spec: JobSpec, setup: Setup) -> bool:
    """Whether this setup's loss runs chunked (the loop's own rule, for the setup's method and
    backend): then only one chunk of logits exists at a time."""
    from ftcluster.objectives.sft import use_chunked_loss

    candidate = spec.model_copy(update={
        "method": spec.method.model_copy(update={"name": setup.method}),
        "distributed": spec.distributed.model_copy(update={"backend": setup.backend, "zero_stage": setup.zero_stage}),
    })
    return use_chunked_loss(candidate)


def activation_bytes(spec: JobSpec, config, context: int, precision: str, chunked_loss: bool = False) -> dict[str, float]:
    """Per-GPU activations and logits for one micro batch."""
    batch, layers, width = spec.training.batch_size, config.num_hidden_layers, config.hidden_size
    scale = 2 if precision == "fp32" else 1
    tokens = batch * context
    if spec.training.gradient_checkpointing:
        recomputed = math.ceil(layers / spec.training.gradient_checkpointing_every)  # blocks 0, every, 2*every, ...
        kept = layers - recomputed
        activations = (recomputed * 2 * width + kept * 34 * width + 34 * width) * tokens * scale
    else:
        activations = layers * 34 * width * tokens * scale
    vocab = getattr(config, "vocab_size", 0) if spec.model.task == "causal_lm" else 0
    # 16-bit logits, their 32-bit upcast for the loss, and its gradient: for every token, or one chunk
    logit_rows = min(tokens, spec.training.loss_chunk_tokens) if chunked_loss else tokens
    return {"activations": activations, "logits": logit_rows * vocab * 10}


def host_bytes(setup: Setup, total: int, trainable: int, largest: int, precision: str,
               quantized: int = 0, double_quant: bool = True, cpu_workers: bool = False) -> dict[str, float]:
    """Host RAM per node: workers' runtime, loading, saving, and what CPU offload keeps there.
    ``cpu_workers``: the workers train on the CPU (no CUDA runtime in their processes)."""
    per_node = setup.gpus_per_node
    weight = _bytes_per_weight(precision)
    out = {"runtime": per_node * (RUNTIME_CPU_WORKER_BYTES if cpu_workers else RUNTIME_HOST_BYTES_PER_WORKER)}
    if setup.backend == "deepspeed" and setup.zero_stage == 3:
        out["loading"] = 2 * 4 * largest  # rank 0 streams one tensor at a time (zero3_load)
        # At the end rank 0 gathers the whole model in host memory to save it (DeepSpeed's
        # 16-bit consolidated state dict), while every worker still holds its states.
        out["saving (rank 0's node)"] = frozen_weight_bytes(total - trainable, quantized, precision,
                                                           double_quant) + trainable * weight
    else:
        out["loading"] = per_node * min(total * weight, CHECKPOINT_SHARD_BYTES)
    if setup.offload_optimizer:
        # DeepSpeed's accounting: 16 bytes per trained parameter (18 with parameters offloaded),
        # spread over the nodes, times its buffer factor.
        per_param = 18 if setup.offload_params else 16
        out["offloaded states"] = trainable * per_param / setup.nodes * DS_HOST_BUFFER
        if setup.offload_params:
            frozen = frozen_weight_bytes(total - trainable, quantized, precision, double_quant)
            out["offloaded states"] += frozen / setup.nodes
    return out


def count_tokens(spec: JobSpec) -> tuple[int, bool]:
    """Training tokens per epoch: exact with the model's tokenizer when it is local, else ~4 chars/token."""
    from ftcluster.models.load import locate_model

    try:
        local = locate_model(spec.model.path) is not None
    except FtError:
        local = False
    if local:
        from ftcluster.data import build_data
        from ftcluster.data.token_cache import EncodedSequences
        from ftcluster.models.load import load_tokenizer, resolve_model

        train = build_data(spec.data, load_tokenizer(resolve_model(spec.model.path))).train
        assert isinstance(train, EncodedSequences)  # (what build_data returns: read from the cache files)
        return train.total_tokens(), False
    from ftcluster.data.sources import Source

    size = sum(shard.path.stat().st_size for shard in Source(spec.data.train, spec.data.split).shards())
    return round(size * (1 - spec.data.val_fraction) / 4), True


@dataclass(frozen=True)
class ModelFacts:
    """What the planner needs to know about the model with a method applied."""

    total: int
    trainable: int
    largest: int
    config: Any
    flops_per_token: int
    quantized: int  # QLoRA: weights stored in 4 bits (0 for other methods)


def model_facts(spec: JobSpec, method: str, meta=None) -> ModelFacts:
    model = meta if meta is not None else meta_model_for(spec)
    model = with_method(model, spec, method)
    counts = count_params(model)
    return ModelFacts(counts.total, counts.trainable, max(p.numel() for p in model.parameters()), model.config,
                      flops_per_token(model, spec.data.max_length).total,
                      quantized_weights(model) if METHODS[method].quantized_base else 0)


def training_precision(spec: JobSpec) -> str:
    """The precision the loop trains in: `auto` is bf16 on GPUs and fp32 on CPU workers."""
    if spec.training.precision != "auto":
        return spec.training.precision
    return "bf16" if spec.scaling.use_gpu else "fp32"


def plan_setup(spec: JobSpec, setup: Setup, *, mfu: float, tokens: tuple[int, bool], facts: ModelFacts) -> Plan:
    """The setup's memory, time and cost. CPU workers (scaling.use_gpu false) hold their model states
    and activations in host RAM: the per-device figures are then part of each node's host RAM."""
    precision = training_precision(spec)
    cpu = not spec.scaling.use_gpu
    double_quant = spec.method.quant.double_quant
    gpu = model_state_bytes(setup, facts.total, facts.trainable, facts.largest, precision, facts.quantized, double_quant)
    gpu.update(zero3_working_bytes(setup, facts.total, facts.trainable, precision, fused_adam=not cpu))
    gpu.update(activation_bytes(spec, facts.config, spec.data.max_length, precision, chunked_loss_for(spec, setup)))
    host = host_bytes(setup, facts.total, facts.trainable, facts.largest, precision, facts.quantized, double_quant,
                      cpu_workers=cpu)
    if cpu:
        # The final save comes after the last optimizer step: rank 0 needs the larger of the two, not both.
        saving = "saving (rank 0's node)"
        if saving in host:
            host[saving] = max(0.0, host[saving] - gpu.get("optimizer step", 0.0))
        host = {f"training ({setup.gpus_per_node} workers)": setup.gpus_per_node * sum(gpu.values()), **host}
        capacity = spec.scaling.node_ram_gb * GB / setup.gpus_per_node
    else:
        gpu["runtime"] = RUNTIME_GPU_BYTES
        capacity_gb = spec.scaling.gpu_memory_gb
        if not capacity_gb:
            accelerator = find_accelerator(spec.scaling.gpu_type)
            assert accelerator is not None, "ScalingSpec validates gpu_type"
            capacity_gb = accelerator.memory_gb
        capacity = capacity_gb * GB
    peak = peak_flops_of(spec.scaling.gpu_type)
    effective = mfu * OFFLOAD_SPEED[setup.offload]
    hours = tokens[0] * facts.flops_per_token / (effective * peak * setup.world) / 3600 if peak else None
    price = hourly_price(spec.scaling.gpu_type, spec.cost)
    cost = hours * setup.world * price if hours is not None and price is not None else None
    return Plan(
        setup=setup, gpu_type=spec.scaling.gpu_type, total_params=facts.total, trainable_params=facts.trainable,
        largest_tensor=facts.largest, gpu_bytes=gpu, gpu_capacity=capacity, host_bytes_per_node=host,
        host_capacity=spec.scaling.node_ram_gb * GB, tokens_per_epoch=tokens[0], tokens_estimated=tokens[1],
        flops_per_token=facts.flops_per_token, mfu=effective, hours_per_epoch=hours, cost_per_epoch=cost,
        cpu=cpu,
    )


def setup_of(spec: JobSpec) -> Setup:
    """The setup the job spec itself describes."""
    gpus_per_node = min(spec.scaling.gpus_per_node, spec.scaling.num_workers)
    return Setup(
        method=spec.method.name,
        backend=spec.distributed.backend,
        zero_stage=spec.distributed.zero_stage,
        offload_optimizer=spec.distributed.offload_optimizer != "none",
        offload_params=spec.distributed.offload_params != "none",
        nodes=math.ceil(spec.scaling.num_workers / gpus_per_node),
        gpus_per_node=gpus_per_node,
    )


def plan_job(spec: JobSpec, mfu: float = 0.4) -> Plan:
    setup = setup_of(spec)
    return plan_setup(spec, setup, mfu=mfu, tokens=count_tokens(spec), facts=model_facts(spec, setup.method))


def memory_plan(spec: JobSpec) -> Plan:
    """The job's memory alone (its time and cost left out: no data is read): what a capacity check needs."""
    setup = setup_of(spec)
    return plan_setup(spec, setup, mfu=0.4, tokens=(0, True), facts=model_facts(spec, setup.method))


def suggest(spec: JobSpec, mfu: float = 0.4, max_nodes: int = 8) -> list[Plan]:
    """Every feasible way to run the job (method family, backend, ZeRO stage, offload, nodes),
    cheapest first."""
    import copy

    tokens = count_tokens(spec)
    meta = meta_model_for(spec)
    methods = precision_family(spec.method.name)  # lora and qlora are compared
    facts = {method: model_facts(spec, method, copy.deepcopy(meta)) for method in methods}
    backends = [("ddp", 0, False, False)] + [
        ("deepspeed", stage, off_opt, off_par)
        for stage, off_opt, off_par in itertools.product((1, 2, 3), (False, True), (False, True))
        if not (off_par and (stage != 3 or not off_opt))
    ]
    nodes_options = [n for n in (1, 2, 4, 8, 16) if n <= max_nodes]
    plans = []
    for method, (backend, stage, off_opt, off_par), nodes in itertools.product(methods, backends, nodes_options):
        if backend == "deepspeed" and not METHODS[method].deepspeed:
            continue
        setup = Setup(method, backend, stage, off_opt, off_par, nodes, spec.scaling.gpus_per_node)
        plan = plan_setup(spec, setup, mfu=mfu, tokens=tokens, facts=facts[method])
        if plan.fits:
            plans.append(plan)
    return sorted(plans, key=lambda p: (p.cost_per_epoch if p.cost_per_epoch is not None else math.inf,
                                        p.hours_per_epoch or math.inf))
