"""Which trials of a sweep share one base model (`ftcluster tune --shared-base N`), in packs of up to N.

Why: LoRA trials that load the same frozen base can train in one process with an adapter each
(training/shared_base.py), so a device holds the base once. Trials share when everything that
shapes the base in memory is equal: the model section, the method's name and quantization, the
dropout/precision/checkpointing/compile settings applied to the base, scaling and distributed.
Everything else (rank, alpha, dropout and targets of the adapter, learning rate, schedule, batch
size, seed, data, evaluation) stays per trial. What cannot share runs as ordinary trials; each
group is said in one line before the sweep starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ftcluster.config.spec import JobSpec
from ftcluster.core.atomic import write_text_atomic
from ftcluster.sweep.searchers import make_searcher
from ftcluster.sweep.space import SearchSpace, trial_spec

PACKS_FILE = "packs.json"  # in the sweep folder: the trials' values and their packs (what --resume reuses)
ADAPTER_METHODS = ("lora", "dora", "qlora")  # one named PEFT adapter per trial on the shared base
BASE_TRAINING = ("dropout", "precision", "gradient_checkpointing", "gradient_checkpointing_every", "compile", "threads")


@dataclass
class Pack:
    """One Ray Tune trial of a shared-base sweep: its trials' searched values; ``shared`` False for an
    ordinary trial (one member) that cannot share a base."""

    members: list[dict[str, Any]]
    shared: bool


def unshareable(spec: JobSpec) -> str | None:
    """Why this trial cannot share its base with others (None: it can)."""
    if spec.method.name not in ADAPTER_METHODS:
        return f"method.name={spec.method.name} has no per-trial adapter ({', '.join(ADAPTER_METHODS)} share)"
    if spec.method.objective == "grpo":
        return "method.objective=grpo samples with its own policy copy"
    if spec.scaling.num_workers > 1:
        return f"scaling.num_workers={spec.scaling.num_workers} starts a worker group per trial"
    if spec.distributed.backend == "deepspeed":
        return "distributed.backend=deepspeed partitions one model per trial"
    if spec.training.compile:
        return "training.compile compiles one model per trial"
    return None


def base_key(spec: JobSpec) -> dict[str, Any]:
    """What must be equal for two trials to share a base (flattened to dotted keys)."""
    training = spec.training.model_dump(mode="json")
    shaped = {"model": spec.model.model_dump(mode="json"), "method.name": spec.method.name,
              "method.quant": spec.method.quant.model_dump(mode="json"),
              "scaling": spec.scaling.model_dump(mode="json"), "distributed": spec.distributed.model_dump(mode="json"),
              **{f"training.{key}": training[key] for key in BASE_TRAINING}}
    return _flatten(shaped)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def draw_trials(space: SearchSpace, searcher: str, count: int, seed: int) -> list[dict[str, Any]]:
    """The sweep's trials' values, drawn up front by the sweep's searcher (random or grid)."""
    drawn = make_searcher(searcher, space, "", "min", seed)
    values: list[dict[str, Any]] = []
    while len(values) < count:
        chosen = drawn.suggest(f"trial-{len(values)}")
        if not isinstance(chosen, dict):  # the grid is done
            break
        values.append(chosen)
    return values


def make_packs(space: SearchSpace, base: dict[str, Any], drawn: list[dict[str, Any]],
               size: int) -> tuple[list[Pack], list[str]]:
    """Group the trials by base, cut each group into packs of up to ``size``; one line per group."""
    groups: dict[str, list[dict[str, Any]]] = {}
    keys: dict[str, dict[str, Any]] = {}
    alone: dict[str, list[dict[str, Any]]] = {}
    for chosen in drawn:
        spec = trial_spec(space, base, chosen)
        reason = unshareable(spec)
        if reason is not None:
            alone.setdefault(reason, []).append(chosen)
            continue
        key = base_key(spec)
        name = json.dumps(key, sort_keys=True)
        groups.setdefault(name, []).append(chosen)
        keys[name] = key
    varying = sorted({k for key in keys.values() for k in key if len({json.dumps(o.get(k)) for o in keys.values()}) > 1})
    packs, lines = [], []
    for name, members in groups.items():
        chunks = [members[i:i + size] for i in range(0, len(members), size)]
        packs += [Pack(chunk, shared=True) for chunk in chunks]
        which = ", ".join(f"{k}={keys[name][k]}" for k in varying)
        lines.append(f"{_trials(len(members))} share a base{f' ({which})' if which else ''}: "
                     f"{len(chunks)} pack{'s' if len(chunks) > 1 else ''} of up to {size}")
    for reason, members in alone.items():
        packs += [Pack([chosen], shared=False) for chosen in members]
        lines.append(f"{_trials(len(members))} run as ordinary trials: {reason}")
    return packs, lines


def _trials(count: int) -> str:
    return f"{count} trial{'s' if count != 1 else ''}"


def write_packs(folder: Path, packs: list[Pack]) -> None:
    write_text_atomic(folder / PACKS_FILE, json.dumps([asdict(pack) for pack in packs], indent=1, default=str))


def read_packs(folder: Path) -> list[Pack] | None:
    path = folder / PACKS_FILE
    if not path.is_file():
        return None
    return [Pack(**pack) for pack in json.loads(path.read_text())]
