"""How many LoRA trials fit on one device: as separate trials, and as a shared-base pack.

Why: a separate trial holds everything the planner counts; a pack (training/shared_base.py) holds
the frozen base, the runtime and one step's transient memory (activations, logits, gradients:
its trials step one at a time and free their gradients after each step) once, and per trial only
its adapter's weights and its optimizer states (two AdamW moments).
"""

from __future__ import annotations

from dataclasses import dataclass

from ftcluster.config.spec import JobSpec
from ftcluster.planning.plan import GB, Plan, plan_job

ADAPTER_METHODS = ("lora", "dora", "qlora")


@dataclass(frozen=True)
class PackMemory:
    shared: float  # bytes held once per pack
    per_trial: float  # bytes each trial of the pack adds
    separate: float  # bytes of one separate trial
    capacity: float  # per device

    def fit_separate(self) -> int:
        return int(self.capacity // self.separate)

    def fit_shared(self) -> int:
        return max(0, int((self.capacity - self.shared) // self.per_trial))


def pack_memory(spec: JobSpec, plan: Plan | None = None) -> PackMemory | None:
    """The job's memory split into shared and per-trial parts (None: its trials cannot share a base)."""
    if spec.method.name not in ADAPTER_METHODS or spec.scaling.num_workers > 1 or spec.distributed.backend != "ddp":
        return None
    plan = plan or plan_job(spec)
    # Under torch the adapter's weights take the bytes its gradients do; AdamW keeps two moments of each.
    per_trial = plan.gpu_bytes["gradients"] + plan.gpu_bytes["optimizer"]
    # A CPU worker's process (Python, torch, Ray) is counted in host RAM; on a GPU, "runtime" is the CUDA context.
    process = plan.host_bytes_per_node["runtime"] / plan.setup.gpus_per_node if plan.cpu else 0.0
    separate = plan.gpu_total + process
    return PackMemory(shared=separate - per_trial, per_trial=per_trial, separate=separate, capacity=plan.gpu_capacity)


def trials_per_device_line(spec: JobSpec, plan: Plan) -> str | None:
    """`ftcluster plan`'s line: trials per device either way."""
    memory = pack_memory(spec, plan)
    if memory is None:
        return None
    device = "CPU worker" if plan.cpu else "GPU"
    return (f"Sweep trials per {device}: {memory.fit_separate()} as separate trials ({memory.separate / GB:.2f} GB "
            f"each), {memory.fit_shared()} sharing one base (`ftcluster tune --shared-base N`: "
            f"{memory.shared / GB:.2f} GB once + {memory.per_trial / GB:.3f} GB per trial)")


def pack_problem(specs: list[JobSpec]) -> str | None:
    """One line when a pack of these trials does not fit one device by the planner's count: the first
    trial's shared part once, every trial's own part."""
    parts = [pack_memory(spec) for spec in specs]
    if any(part is None for part in parts):
        return None
    first = parts[0]
    assert first is not None
    needed = first.shared + sum(part.per_trial for part in parts if part is not None)
    if needed <= first.capacity:
        return None
    return (f"--shared-base: a pack of {len(specs)} trials needs {needed / GB:.1f} GB per device by the planner's "
            f"count, {first.capacity / GB:.1f} GB are there; about {first.fit_shared()} fit (lower --shared-base, "
            "or see `ftcluster plan`)")
