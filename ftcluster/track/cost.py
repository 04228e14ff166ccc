"""GPU-hours and dollars: a price table the user can override in the spec (``cost``)."""

from __future__ import annotations

import torch

# On-demand USD per GPU-hour, rough 2026 cloud list prices; override with cost.gpu_hour_usd.
DEFAULT_GPU_HOUR_USD: dict[str, float] = {
    "H200": 3.80, "H100": 2.99, "A100": 1.79, "L40S": 1.20, "A10G": 1.01, "A10": 0.75, "L4": 0.70,
    "V100": 0.90, "T4": 0.35,
}
DEFAULT_CPU_CORE_HOUR_USD = 0.04


def device_kind(device: torch.device) -> str:
    """'cpu' or the GPU family in the price table ('H100', ...); 'gpu' when not in the table."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    for kind in sorted(DEFAULT_GPU_HOUR_USD, key=len, reverse=True):
        if kind in name:
            return kind
    return "gpu"


def hourly_price(kind: str, cost_spec) -> float | None:
    """USD per hour of one GPU of that kind, or of one CPU core; None when unknown."""
    if kind == "cpu":
        return cost_spec.cpu_core_hour_usd
    table = {**DEFAULT_GPU_HOUR_USD, **cost_spec.gpu_hour_usd}
    return table.get(kind)


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
