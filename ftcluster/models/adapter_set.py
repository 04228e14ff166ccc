"""Several LoRA/DoRA adapters on one PEFT model: one per trial of a shared-base pack.

Why: the frozen base is most of a LoRA run's memory; trials that differ only in their adapters
and training settings can keep one base and an adapter each (see training/shared_base.py). PEFT
holds the adapters by name; only the active one runs in a forward pass and trains.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ftcluster.config.spec import MethodSpec


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters a PEFT model holds (none for a plain model)."""
    return list(getattr(model, "peft_config", {}))


def add_adapter_like(model: nn.Module, name: str, method: MethodSpec) -> None:
    """Add adapter ``name`` with this method's rank, alpha, dropout and target modules; everything else in
    its configuration (task, DoRA, ...) as the model's first adapter, which `apply_method` built from the
    same method name. Its initial weights come from the global RNG, as `apply_method`'s do."""
    first: Any = model.peft_config[adapter_names(model)[0]]  # type: ignore[index]  # a LoraConfig
    lora = method.lora
    config = dataclasses.replace(first, r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules)
    model.add_adapter(name, config)  # type: ignore[operator]


def activate(model: nn.Module, name: str) -> None:
    """Only adapter ``name`` runs in the forward pass and has requires_grad (PEFT's set_adapter)."""
    if getattr(model, "active_adapter", None) != name:
        model.set_adapter(name)  # type: ignore[operator]


def remove_adapter(model: nn.Module, name: str) -> None:
    """Free a trial's adapter (it left the pack); the last adapter stays (PEFT needs one)."""
    others = [other for other in adapter_names(model) if other != name]
    if others:
        activate(model, others[0])  # (PEFT warns when the active adapter is deleted)
        model.delete_adapter(name)  # type: ignore[operator]


def renamed_adapter(old: str, new: str) -> Callable[[str], str]:
    """Parameter names of adapter ``old`` as adapter ``new``'s (PEFT puts the adapter's name in each of
    its parameters' names: ...q_proj.lora_A.<name>.weight)."""

    def rename(parameter: str) -> str:
        return ".".join(new if part == old else part for part in parameter.split("."))

    return rename


def save_weights(model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``model.save_pretrained(folder)``; a pack's model (adapters named by trial) saves only its active
    adapter, laid out as a one-adapter run's (adapter_config.json and weights in ``folder`` itself)."""
    if adapter_names(model) in ([], ["default"]):
        model.save_pretrained(folder, state_dict=state_dict)  # type: ignore[operator]
        return
    active = str(model.active_adapter)
    staging = folder.with_name(folder.name + ".all")
    model.save_pretrained(staging, selected_adapters=[active])  # type: ignore[operator]
    # PEFT writes a non-default adapter into a sub-folder of its name.
    os.replace(staging if active == "default" else staging / active, folder)
    shutil.rmtree(staging, ignore_errors=True)
