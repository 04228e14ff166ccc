"""GPU-hours and dollars: a price table the user can override in the spec (``cost``)."""

from __future__ import annotations

import torch

from ftcluster.core.accelerators import find_accelerator, normalize

DEFAULT_CPU_CORE_HOUR_USD = 0.04


def device_kind(device: torch.device) -> str:
    """'cpu', or the GPU's name in the accelerator table ('H100', 'A100-80G', ...); 'gpu' when not in it."""
    if device.type != "cuda":
        return "cpu"
    accelerator = find_accelerator(torch.cuda.get_device_name(device))
    return accelerator.name if accelerator else "gpu"


def hourly_price(kind: str, cost_spec) -> float | None:
    """USD per hour of one GPU of that kind (cost.gpu_hour_usd first, then the table), or of one CPU core;
    None when unknown."""
    if kind == "cpu":
        return cost_spec.cpu_core_hour_usd
    accelerator = find_accelerator(kind)
    for name, price in cost_spec.gpu_hour_usd.items():
        if normalize(name) == normalize(kind) or (accelerator and find_accelerator(name) == accelerator):
            return price
    return accelerator.hour_usd if accelerator else None


def run_cost(seconds: float, units: float, kind: str, cost_spec) -> dict[str, float | None]:
    """Device-hours (GPUs, or CPU cores) for `units` devices over `seconds`, and their price."""
    hours = seconds / 3600 * units
    price = hourly_price(kind, cost_spec)
    return {
        "gpu_hours": hours if kind != "cpu" else 0.0,
        "cpu_core_hours": hours if kind == "cpu" else 0.0,
        "cost_usd": hours * price if price is not None else None,
    }


def cost_per_point(cost_usd: float | None, before: float | None, after: float | None, mode: str) -> float | None:
    """Dollars per point of improvement over the base model (a point: 0.01 of a 0-1 metric,
    1.0 of anything else, e.g. loss); None without an improvement."""
    if cost_usd is None or before is None or after is None:
        return None
    gain = (after - before) if mode == "max" else (before - after)
    if 0 <= before <= 1 and 0 <= after <= 1 and mode == "max":
        gain *= 100
    return cost_usd / gain if gain > 0 else None
