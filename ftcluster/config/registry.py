"""What each method, objective and data format is, allows and is implemented by, in one torch-free place.

The spec's allowed names (`config/spec.py`), its cross-field rules, the loop, export and the planner
read these entries instead of testing names. Each entry names its implementation as
``"module:function"``, imported when first used, so this table stays free of torch and of the layers
above it. Adding a method, objective or data format is `register(entry)` plus its implementation
(see the README's "Extending ftcluster"). GPU types have their own table in `core/accelerators.py`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TASKS = ("causal_lm", "classification")


@dataclass(frozen=True)
class Method:
    name: str
    apply: str  # "module:function" (model, MethodSpec, task, gradient_checkpointing) -> the model to train
    adapters: bool  # trains added adapter weights on a frozen base (saved as a PEFT adapter; reference = adapters off)
    tasks: tuple[str, ...] = TASKS
    packing: bool = True  # can train on packed rows
    deepspeed: bool = True  # runs under DeepSpeed ZeRO
    mergeable: bool = True  # `export --merge` can fold it into plain weights
    quantized_base: bool = False  # the frozen base is 4-bit
    virtual_tokens: bool = False  # prepends learned positions (prefix tuning): no chunked loss or shared caches
    full_precision: str | None = None  # the method whose adapters it trains, on an unquantized base (qlora: lora)
    why_not: str = ""  # the reason behind its limits, for error messages


@dataclass(frozen=True)
class Objective:
    name: str
    build: str  # "module:function" (spec, model, is_peft, base_model, context) -> an objectives.base.Objective
    formats: tuple[str, ...]  # data formats it trains on
    tasks: tuple[str, ...] = TASKS
    packing: bool = True
    methods: tuple[str, ...] | None = None  # None: every method
    needs_reference: bool = False  # compares against the starting model (adapters off, or a frozen copy)
    online: bool = False  # samples completions from the policy as it trains (needs a grpo.sampling.PolicyContext)
    head_labels: tuple[str, ...] | None = None  # the outputs of a classification head it trains (None: the data's labels)


@dataclass(frozen=True)
class DataFormat:
    name: str
    parse: str  # "module:function" (row, ColumnSpec, system_prompt) -> data.formats.Example, or raises BadRow
    tasks: tuple[str, ...]  # the model.task values it feeds
    fields: str  # the row fields, for messages and docs
    generation: bool  # prompts with reference answers: generation eval and few-shot baselines apply


_METHODS = "ftcluster.models.methods"
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("full", f"{_METHODS}:train_all", adapters=False),
    Method("freeze", f"{_METHODS}:train_chosen_blocks", adapters=False),
    Method("lora", f"{_METHODS}:add_lora", adapters=True),
    Method("dora", f"{_METHODS}:add_dora", adapters=True),
    Method("qlora", f"{_METHODS}:add_qlora", adapters=True, quantized_base=True, full_precision="lora"),
    Method("prefix", f"{_METHODS}:add_prefix", adapters=True, tasks=("causal_lm",), packing=False, deepspeed=False,
           mergeable=False, virtual_tokens=True, why_not="its virtual tokens ride in the attention cache"),
)}

_FORMATS = "ftcluster.data.formats"
FORMATS: dict[str, DataFormat] = {f.name: f for f in (
    DataFormat("instruction", f"{_FORMATS}:parse_instruction", ("causal_lm",), "instruction, optional input, output",
               generation=True),
    DataFormat("chat", f"{_FORMATS}:parse_chat", ("causal_lm",), "messages: [{role, content}, ...]", generation=True),
    DataFormat("text", f"{_FORMATS}:parse_text", ("causal_lm",), "text", generation=False),
    DataFormat("classification", f"{_FORMATS}:parse_classification", ("classification",), "text, label",
               generation=False),
    # A reward model (classification head with one output) trains on the same pairs as DPO.
    DataFormat("preference", f"{_FORMATS}:parse_preference", ("causal_lm", "classification"),
               "prompt, chosen, rejected", generation=False),
    DataFormat("prompts", f"{_FORMATS}:parse_prompts", ("causal_lm",), "prompt, optional reference", generation=False),
)}

_PREFERENCE_METHODS = ("full", "freeze", "lora", "dora", "qlora")  # prefix tuning's cache holds no reference view
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("sft", "ftcluster.objectives.sft:build", formats=("instruction", "chat", "text", "classification")),
    Objective("dpo", "ftcluster.objectives.dpo:build", formats=("preference",), tasks=("causal_lm",), packing=False,
              methods=_PREFERENCE_METHODS, needs_reference=True),
    Objective("reward", "ftcluster.objectives.reward:build", formats=("preference",), tasks=("classification",),
              packing=False, methods=_PREFERENCE_METHODS, head_labels=("reward",)),
    Objective("grpo", "ftcluster.objectives.grpo.objective:build", formats=("prompts",), tasks=("causal_lm",),
              packing=False, methods=_PREFERENCE_METHODS, needs_reference=True, online=True),
)}

TABLES: dict[type, dict[str, Any]] = {Method: METHODS, DataFormat: FORMATS, Objective: OBJECTIVES}


def register(entry: Method | DataFormat | Objective) -> None:
    """Add (or replace) a method, data format or objective: the spec accepts its name from now on."""
    TABLES[type(entry)][entry.name] = entry


@functools.cache
def implementation(path: str) -> Callable[..., Any]:
    """The function an entry names as "module:function"."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def precision_family(method: str) -> tuple[str, ...]:
    """The methods that train the same weights as `method`, on a full-precision or a quantized base
    (lora, qlora): the planner compares them."""
    root = METHODS[method].full_precision or method
    return tuple(name for name, entry in METHODS.items() if (entry.full_precision or name) == root)


def adapter_methods() -> tuple[str, ...]:
    return tuple(name for name, method in METHODS.items() if method.adapters)
