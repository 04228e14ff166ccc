"""Fine-tuning methods: decide which weights train (full, freeze), or add adapters (PEFT).

Each method's registry entry (`config/registry.py`) names its function here; `apply_method` calls it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

from ftcluster.config.registry import METHODS, implementation
from ftcluster.config.spec import MethodSpec
from ftcluster.models.blocks import depth_from_top, find_blocks, is_head_param


def quantization_config(method: MethodSpec, compute_dtype):
    """bitsandbytes 4-bit settings for a method on a quantized base (qlora; None for other methods)."""
    if not METHODS[method.name].quantized_base:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant.quant_type,
        bnb_4bit_use_double_quant=method.quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
    )


def full_precision(method: MethodSpec) -> MethodSpec:
    """The method on an unquantized base: QLoRA's adapters are LoRA's (for merging and planning)."""
    twin = METHODS[method.name].full_precision
    return method.model_copy(update={"name": twin}) if twin else method


def _peft_task(task: str) -> str:
    return "SEQ_CLS" if task == "classification" else "CAUSAL_LM"


def add_prefix(model: nn.Module, method: MethodSpec, task: str, gradient_checkpointing: bool = False) -> nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type=_peft_task(task), num_virtual_tokens=method.prefix.num_virtual_tokens)
    return get_peft_model(model, config)


def _add_low_rank(model: nn.Module, method: MethodSpec, task: str, dora: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = method.lora
    config = LoraConfig(
        task_type=_peft_task(task),
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft's annotation says int; it only divides it (alpha / r)
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=dora,
    )
    return get_peft_model(model, config)


def add_lora(model: nn.Module, method: MethodSpec, task: str, gradient_checkpointing: bool = False) -> nn.Module:
    return _add_low_rank(model, method, task, dora=False)


def add_dora(model: nn.Module, method: MethodSpec, task: str, gradient_checkpointing: bool = False) -> nn.Module:
    """Weight-decomposed LoRA: each adapted weight's direction by LoRA, its magnitude trained apart."""
    return _add_low_rank(model, method, task, dora=True)


def add_qlora(model: nn.Module, method: MethodSpec, task: str, gradient_checkpointing: bool = False) -> nn.Module:
    """LoRA on a 4-bit base (loaded with `quantization_config`): norms in fp32, inputs that need gradients."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return _add_low_rank(model, method, task, dora=False)


def _freeze_plan(model: nn.Module, method: MethodSpec, task: str) -> set[str]:
    """Names of the parameters that the `freeze` method trains."""
    prefix, blocks = find_blocks(model)
    patterns = [re.compile(p) for p in method.freeze.modules]
    chosen = set()
    for name, _ in model.named_parameters():
        depth = depth_from_top(name, prefix, len(blocks))
        head = depth == 0 and is_head_param(name)
        if (
            (head and (method.freeze.train_head or task == "classification"))  # a fresh head must train
            or 1 <= depth <= method.freeze.top_blocks
            or any(p.fullmatch(name) for p in patterns)
        ):
            chosen.add(name)
    return chosen


def _train_only(model: nn.Module, trained: set[str]) -> nn.Module:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trained)
    return model


def train_all(model: nn.Module, method: MethodSpec, task: str, gradient_checkpointing: bool = False) -> nn.Module:
    """Every weight trains; with gradual unfreezing, the head first (`UnfreezeSchedule` adds the rest)."""
    if method.unfreeze is None:
        return model.requires_grad_(True)
    return _train_only(model, {name for name, _ in model.named_parameters() if is_head_param(name)})


def train_chosen_blocks(model: nn.Module, method: MethodSpec, task: str,
                        gradient_checkpointing: bool = False) -> nn.Module:
    """The `freeze` method: the top blocks, the head and the named modules train; the rest stays frozen."""
    return _train_only(model, _freeze_plan(model, method, task))


def apply_method(model: nn.Module, method: MethodSpec, task: str, gradient_checkpointing: bool = False) -> nn.Module:
    """Return the model to train, with requires_grad set for exactly what the method trains."""
    return implementation(METHODS[method.name].apply)(model, method, task, gradient_checkpointing)


@dataclass
class ParamCounts:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def logical_size(parameter) -> int:
    """Number of weights a parameter stands for: 4-bit weights are stored packed, and under
    ZeRO-3 a worker holds only a partition (DeepSpeed keeps the full size in ds_numel)."""
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None:
        return quant_state.shape.numel()
    return getattr(parameter, "ds_numel", None) or parameter.numel()


def count_params(model: nn.Module) -> ParamCounts:
    """Trainable vs total parameters, counting 4-bit weights at their logical size."""
    trainable = total = 0
    for parameter in model.parameters():
        n = logical_size(parameter)
        total += n
        trainable += n if parameter.requires_grad else 0
    return ParamCounts(trainable, total)


class UnfreezeSchedule:
    """ULMFiT gradual unfreezing: groups of blocks become trainable from the top, one per period.

    Group 0 is the head (always trainable); group g >= 1 holds the g-th `blocks_per_group` blocks
    counted from the top; the last group is everything below the blocks (embeddings).
    """

    def __init__(self, model: nn.Module, method: MethodSpec, steps_per_epoch: int, base_trainable: set[str]):
        spec = method.unfreeze
        assert spec is not None, "UnfreezeSchedule needs method.unfreeze"
        prefix, blocks = find_blocks(model)
        self.period_steps = spec.every * (steps_per_epoch if spec.unit == "epochs" else 1)
        self.initial_groups = spec.initial_groups
        self.base = base_trainable
        self.group_of: dict[str, int] = {}
        for name, _ in model.named_parameters():
            depth = depth_from_top(name, prefix, len(blocks))
            self.group_of[name] = 0 if depth == 0 else (depth - 1) // spec.blocks_per_group + 1
        self.num_groups = max(self.group_of.values()) + 1
        self.model = model
        self.current = -1

    def may_train(self, name: str) -> bool:
        return name in self.group_of

    def groups_at(self, step: int) -> int:
        """How many groups below the head are trainable at this step."""
        return min(self.initial_groups + step // self.period_steps, self.num_groups - 1)

    def apply(self, step: int) -> bool:
        """Set requires_grad for this step; True when something was newly unfrozen."""
        groups = self.groups_at(step)
        if groups == self.current:
            return False
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(name in self.base or self.group_of[name] <= groups)
        changed = self.current >= 0
        self.current = groups
        return changed


ADAPTER_MARKERS = ("lora_", "prompt_encoder", "modules_to_save")


def param_breakdown(model: nn.Module) -> dict[str, ParamCounts]:
    """Trainable vs total parameters by part: embeddings, blocks, head, and added adapters."""
    prefix, blocks = find_blocks(model)
    parts: dict[str, ParamCounts] = {}
    for name, parameter in model.named_parameters():
        n = logical_size(parameter)
        if any(marker in name for marker in ADAPTER_MARKERS):
            part = "adapters (added)"
        else:
            depth = depth_from_top(name, prefix, len(blocks))
            part = "head + final norm" if depth == 0 else ("blocks" if depth <= len(blocks) else "embeddings + other")
        counts = parts.setdefault(part, ParamCounts(0, 0))
        counts.total += n
        counts.trainable += n if parameter.requires_grad else 0
    return parts
