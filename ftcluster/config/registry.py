"""What each method, objective and data format is and allows, in one torch-free place.

Spec validation (`spec.py`), the loop (`training/setup.py`), export and the planner read these
entries instead of testing names. Adding a method or a data format is one entry here plus its
implementation (see the README's "Extending ftcluster"). GPU types have their own table in
`accelerators.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("causal_lm", "classification")


@dataclass(frozen=True)
class Method:
    name: str
    adapters: bool  # trains added adapter weights on a frozen base (saved as a PEFT adapter; reference = adapters off)
    tasks: tuple[str, ...] = TASKS
    packing: bool = True  # can train on packed rows
    deepspeed: bool = True  # runs under DeepSpeed ZeRO
    mergeable: bool = True  # `export --merge` can fold it into plain weights
    quantized_base: bool = False  # the frozen base is 4-bit
    why_not: str = ""  # the reason behind its limits, for error messages


@dataclass(frozen=True)
class Objective:
    name: str
    formats: tuple[str, ...]  # data formats it trains on
    tasks: tuple[str, ...] = TASKS
    packing: bool = True
    methods: tuple[str, ...] | None = None  # None: every method
    needs_reference: bool = False  # compares against the starting model (adapters off, or a frozen copy)
    head_labels: tuple[str, ...] | None = None  # the outputs of a classification head it trains (None: the data's labels)


@dataclass(frozen=True)
class DataFormat:
    name: str
    tasks: tuple[str, ...]  # the model.task values it feeds
    fields: str  # the row fields, for messages and docs
    generation: bool  # prompts with reference answers: generation eval and few-shot baselines apply


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("full", adapters=False),
    Method("freeze", adapters=False),
    Method("lora", adapters=True),
    Method("dora", adapters=True),
    Method("qlora", adapters=True, quantized_base=True),
    Method("prefix", adapters=True, tasks=("causal_lm",), packing=False, deepspeed=False, mergeable=False,
           why_not="its virtual tokens ride in the attention cache"),
)}

FORMATS: dict[str, DataFormat] = {f.name: f for f in (
    DataFormat("instruction", ("causal_lm",), "instruction, optional input, output", generation=True),
    DataFormat("chat", ("causal_lm",), "messages: [{role, content}, ...]", generation=True),
    DataFormat("text", ("causal_lm",), "text", generation=False),
    DataFormat("classification", ("classification",), "text, label", generation=False),
    # A reward model (classification head with one output) trains on the same pairs as DPO.
    DataFormat("preference", ("causal_lm", "classification"), "prompt, chosen, rejected", generation=False),
    DataFormat("prompts", ("causal_lm",), "prompt, optional reference", generation=False),
)}

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("sft", formats=("instruction", "chat", "text", "classification")),
    Objective("dpo", formats=("preference",), tasks=("causal_lm",), packing=False,
              methods=("full", "freeze", "lora", "dora", "qlora"), needs_reference=True),
    Objective("reward", formats=("preference",), tasks=("classification",), packing=False,
              methods=("full", "freeze", "lora", "dora", "qlora"), head_labels=("reward",)),
    Objective("grpo", formats=("prompts",), tasks=("causal_lm",), packing=False,
              methods=("full", "freeze", "lora", "dora", "qlora"), needs_reference=True),
)}


def adapter_methods() -> tuple[str, ...]:
    return tuple(name for name, method in METHODS.items() if method.adapters)
