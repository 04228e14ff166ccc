"""AdamW with decoupled weight decay and layer-wise learning rates; warmup + decay schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from ftcluster.models.blocks import depth_from_top, find_blocks


def _no_decay(name: str, parameter: torch.Tensor) -> bool:
    """Biases and norm weights (the 1-D tensors) are not decayed."""
    return parameter.ndim < 2 or name.endswith(".bias")


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layerwise_decay: float | None,
    include: Callable[[str, torch.Tensor], bool],
) -> list[dict]:
    """Group parameters by (depth from the top, decayed or not); depth d trains at lr * decay**d."""
    if layerwise_decay is not None:
        prefix, blocks = find_blocks(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not include(name, parameter):
            continue
        depth = depth_from_top(name, prefix, len(blocks)) if layerwise_decay is not None else 0
        decayed = not _no_decay(name, parameter)
        key = (depth, decayed)
        if key not in groups:
            scale = layerwise_decay**depth if layerwise_decay is not None else 1.0
            groups[key] = {
                "params": [],
                "names": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decayed else 0.0,
            }
        groups[key]["params"].append(parameter)
        groups[key]["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(groups: list[dict], betas: tuple[float, float], device_type: str,
                    cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over the groups: fused on GPU; DeepSpeed's CPU Adam when optimizer states live on CPU."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(clean, lr=clean[0]["lr"], betas=betas, adamw_mode=True)
    return torch.optim.AdamW(clean, betas=betas, fused=(device_type == "cuda") or None)


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of each group's lr at a step: linear warmup, then constant/linear/cosine decay."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def keep_spec_learning_rates(scheduler: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float | torch.Tensor]) -> None:
    """After loading a checkpoint, use this spec's peak learning rates, not the checkpoint's.

    The same for a plain resume; different after a PBT exploit, which mutates the learning rate
    and continues from another trial's checkpoint.
    """
    scheduler.base_lrs = list(base_lrs)
    for group, base, factor in zip(scheduler.optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
