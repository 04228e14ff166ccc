"""Divergence: a NaN or infinite loss, gradient norm or weight stops training before it is saved; so
does silent collapse (exploding weights, a loss back at a uniform guess), which never shows a NaN.

Every worker reaches the same decision: the per-step flag is all-reduced (MAX) across the group,
so no worker steps while another stops. The check costs one small host sync per step.
"""

from __future__ import annotations

import math

import torch

from ftcluster.core.errors import FtError


class DivergedError(FtError):
    """Training produced non-finite numbers; nothing from the diverged model was saved as a result."""


class CollapsedError(DivergedError):
    """Training destroyed the model without a non-finite number (see CollapseGuard); handled as divergence."""


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


def weight_numbers(model: torch.nn.Module, device: torch.device, world_size: int) -> tuple[bool, float]:
    """Whether every trainable weight is finite, and their RMS, over the whole group (a collective).

    Under ZeRO-3 each worker holds a partition (``ds_tensor``) and the sums add up to the whole; replicated
    weights (DDP) add up to world_size copies, which leaves the RMS as it is.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # non-finite weights, sum of squares, count
    with torch.no_grad():  # summed where the weights are: one host sync in all
        for parameter in model.parameters():
            values = getattr(parameter, "ds_tensor", parameter)
            if parameter.requires_grad and values.numel():
                values = values.detach().to(device)
                sums[0] += (~torch.isfinite(values)).any().double()
                sums[1] += values.double().square().sum()
                sums[2] += values.numel()
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    bad, squares, count = sums.tolist()
    return bad == 0, math.sqrt(squares / count) if count and bad == 0 else 0.0


def check_weights_finite(model: torch.nn.Module, step: int, device: torch.device, world_size: int) -> float:
    """Raise DivergedError if any trainable weight is NaN/inf (before a checkpoint or the final save); their RMS."""
    finite, rms = weight_numbers(model, device, world_size)
    if not finite:
        raise DivergedError(f"training diverged by step {step}: trainable weights hold NaN or inf values")
    return rms


LEARNED = 0.9  # a logged loss under this fraction of a uniform guess's shows that the model knows something


class CollapseGuard:
    """Silent collapse: training that never produces a NaN yet destroys the model.

    Two signs, both checked on numbers every worker shares, so the group decides as one:
    the trainable weights' RMS grows past ``max_weight_growth`` times its value at the start (an lr far
    too high: Adam moves every weight by about lr a step), or, after ``warmup_steps``, a logged training
    loss at or above ``chance_loss`` (a uniform guess over the classes) once it had been well below it,
    under LEARNED times that level (a random model starts at the level and wanders around it while it
    learns little, so only a loss that came back counts). ``max_weight_growth`` None switches both off.
    """

    def __init__(self, max_weight_growth: float | None, warmup_steps: int, chance_loss: float | None,
                 state: dict | None = None):
        self.max_growth, self.warmup_steps = max_weight_growth, warmup_steps
        self.chance_loss = chance_loss if max_weight_growth is not None else None
        state = state or {}
        self.start_rms: float | None = state.get("start_rms")
        self.learned: bool = state.get("learned", False)  # a logged loss was under LEARNED * chance_loss

    def state(self) -> dict:
        return {"start_rms": self.start_rms, "learned": self.learned}

    def check_loss(self, step: int, loss: float) -> None:
        if self.chance_loss is None:
            return
        if loss < LEARNED * self.chance_loss:
            self.learned = True
        elif loss >= self.chance_loss and self.learned and step > self.warmup_steps:
            raise CollapsedError(f"training collapsed at step {step}: the training loss {loss:.4f} is at or above a "
                                f"uniform guess's ({self.chance_loss:.4f}) after it had been below it")

    def check_weights(self, model: torch.nn.Module, step: int, device: torch.device, world_size: int) -> None:
        """The finite check, and the weights' growth since the start (the first call records the start)."""
        rms = check_weights_finite(model, step, device, world_size)
        if self.start_rms is None:
            self.start_rms = rms
        if self.max_growth is None or not self.start_rms or rms <= self.max_growth * self.start_rms:
            return
        raise CollapsedError(f"training collapsed at step {step}: the trainable weights' RMS grew {rms / self.start_rms:.3g}x "
                            f"since the start ({self.start_rms:.3g} -> {rms:.3g}; training.max_weight_growth="
                            f"{self.max_growth:g})")
