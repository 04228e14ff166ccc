"""What each worker holds at the end of training, by role, and its peak RSS: the numbers the
planner's per-device model states are checked against.

Counted from the objects themselves, not from estimates: every tensor storage reachable from the
model's parameters (a ZeRO-3 worker's partition included), their gradients, the optimizer's own
parameters (DeepSpeed's 32-bit master copy) and its state (Adam's moments), and the gradient
buffers DeepSpeed keeps on its optimizer wrapper. Each storage is counted once, under the first
role that reaches it, so a view into a flat buffer is not counted twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ftcluster.core.worker import WorkerContext
from ftcluster.training.setup import Setup, peak_memory_mb

ROLES = ("weights", "gradients", "master weights", "optimizer states")


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Tensors directly in an attribute: a tensor, or a list/tuple/dict of them (one level deep, and
    lists of lists, as DeepSpeed keeps per-group buffers)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item) if isinstance(item, (torch.Tensor, list, tuple)) else ()
    elif isinstance(value, dict):
        for item in value.values():
            if isinstance(item, torch.Tensor):
                yield item


def _inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that does the update (DeepSpeed wraps it; its params are the master copy)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def held_bytes(module: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes of distinct tensor storages this process holds, by role (ROLES)."""
    seen: set[int] = set()
    held = dict.fromkeys(ROLES, 0)

    def count(role: str, tensors: Iterator[torch.Tensor | None]) -> None:
        for tensor in tensors:
            if tensor is None or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            held[role] += storage.nbytes()

    params = list(module.parameters())
    count("weights", (getattr(p, "ds_tensor", None) for p in params))  # a ZeRO-3 worker's partition
    count("weights", (p for p in params))
    inner = _inner_optimizer(optimizer)
    masters = [p for group in inner.param_groups for p in group["params"]]
    count("gradients", (p.grad for p in params + masters))
    wrapper = vars(optimizer) if inner is not optimizer else {}
    count("gradients", (t for name, value in wrapper.items() if "grad" in name for t in _tensors_in(value)))
    count("master weights", iter(masters))
    # DeepSpeed keeps the 32-bit master copy in flat buffers of its own (the inner optimizer's groups
    # may be empty between steps): every other 32-bit tensor on the wrapper is that copy.
    count("master weights", (t for value in wrapper.values() for t in _tensors_in(value) if t.dtype == torch.float32))
    count("optimizer states", (t for state in inner.state.values() for t in state.values()
                               if isinstance(t, torch.Tensor)))
    return held


def worker_memory(setup: Setup) -> list[dict[str, Any]]:
    """Every worker's held bytes and peak RSS so far, gathered to every worker (a collective)."""
    optimizer = getattr(setup.stepper, "optimizer", None) or setup.optimizer  # DeepSpeed's wrapper, if any
    own = {"rank": setup.ctx.rank, "peak_rss_mb": round(peak_memory_mb(torch.device("cpu")), 1),
           "held_bytes": held_bytes(setup.module, optimizer)}
    return gather(setup.ctx, own)


def gather(ctx: WorkerContext, own: dict[str, Any]) -> list[dict[str, Any]]:
    if ctx.world_size == 1 or not torch.distributed.is_initialized():
        return [own]
    everyone: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(everyone, own)
    return everyone
