"""Divergence: a NaN or infinite loss, gradient norm or weight stops training before it is saved.

Every worker reaches the same decision: the per-step flag is all-reduced (MAX) across the group,
so no worker steps while another stops. The check costs one small host sync per step.
"""

from __future__ import annotations

import torch

from ftcluster.core.errors import FtError


class DivergedError(FtError):
    """Training produced non-finite numbers; nothing from the diverged model was saved as a result."""


def _any_rank(flag: bool, device: torch.device, world_size: int) -> bool:
    """True when ``flag`` is true on any worker (a collective under torch.distributed)."""
    if world_size == 1:
        return flag
    value = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class DivergenceGuard:
    """Decides, once per step and before the optimizer update, whether the step's numbers are finite.

    allowed_skips: non-finite steps that may be skipped (no update) before training counts as diverged.
    """

    def __init__(self, allowed_skips: int, skipped: int = 0):
        self.allowed_skips = allowed_skips
        self.skipped = skipped

    def should_skip(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, world_size: int) -> bool:
        """False for a healthy step; True for a bad step that may be skipped; raises DivergedError otherwise.

        ``grad_norm`` is None where the norm is not known before the update (DeepSpeed, fp16 loss scaling,
        which skips overflowing steps itself).
        """
        numbers = loss.detach().float().reshape(1)
        if grad_norm is not None:
            numbers = torch.cat([numbers, grad_norm.detach().float().reshape(1).to(numbers.device)])
        bad = _any_rank(not bool(torch.isfinite(numbers).all()), loss.device, world_size)
        if not bad:
            return False
        if self.skipped < self.allowed_skips:
            self.skipped += 1
            return True
        what, value = ("loss", numbers[0]) if not torch.isfinite(numbers[0]) else ("gradient norm", numbers[1])
        raise DivergedError(f"training diverged at step {step}: the {what} is {value.item()}"
                            + (f" after {self.skipped} skipped non-finite steps" if self.skipped else ""))


def check_weights_finite(model: torch.nn.Module, step: int, device: torch.device, world_size: int) -> None:
    """Raise DivergedError if any trainable weight is NaN/inf (before a checkpoint or the final save).

    Under ZeRO-3 each worker checks its own partition (``ds_tensor``); the verdict is shared.
    """
    bad = False
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.requires_grad:
                continue
            values = getattr(parameter, "ds_tensor", parameter)
            if values.numel() and not bool(torch.isfinite(values).all()):
                bad = True
                break
    if _any_rank(bad, device, world_size):
        raise DivergedError(f"training diverged by step {step}: trainable weights hold NaN or inf values")
