"""How one optimizer step is executed: plain / DDP (torch) or DeepSpeed ZeRO.

The loop calls the same four things on either: `forward_model` for the forward pass,
`micro_context(last)` around each micro batch, `backward(loss)`, then `clip_gradients()` and `step()`
(or `skip()` for a non-finite step) once per step.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


class TorchStepper:
    """One process, or torch DDP across workers (gloo on CPU, nccl on GPU)."""

    def __init__(self, model, optimizer, *, precision: str, max_grad_norm: float | None, world_size: int,
                 device: torch.device, bucket_size_mb: int):
        self.module = model
        self.optimizer = optimizer
        self.engine = None
        self.max_grad_norm = max_grad_norm
        self.forward_model = model
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # gradient_as_bucket_view: gradients live inside the all-reduce buckets, not in a second copy.
            self.forward_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=bucket_size_mb,
                gradient_as_bucket_view=True,
            )
        # fp16 needs loss scaling against gradient underflow; otherwise this is a pass-through.
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def micro_context(self, last: bool):
        """DDP all-reduces gradients only on the last micro batch of a step."""
        if last or self.forward_model is self.module:
            return contextlib.nullcontext()
        return self.forward_model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def clip_gradients(self) -> torch.Tensor | None:
        """Clip (when max_grad_norm is set) and return the gradient norm for the divergence check; None
        under fp16, where an infinite norm is the loss scaler's business (it skips that update)."""
        if self.max_grad_norm is None:
            return None
        self.scaler.unscale_(self.optimizer)
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm)
        return None if self.scaler.is_enabled() else norm

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        """Drop this step's gradients without updating (a non-finite step under skip_nonfinite_steps)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():  # back off as after an overflow, with a fresh per-step state
            self.scaler = torch.amp.GradScaler(self.device_type, init_scale=self.scaler.get_scale() / 2)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """None: the module's own state dict is complete on every worker."""
        return None


def skip_unused_deepspeed_ops() -> None:
    """Off CUDA, keep DeepSpeed from compiling its shared-memory all-reduce (about 3 minutes of g++ on
    first use): only its inference all-reduce uses it, training collectives go through gloo."""
    import torch

    if torch.cuda.is_available():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedStepper:
    """DeepSpeed ZeRO 1/2/3: the engine owns accumulation, clipping, loss scaling and partitioning."""

    def __init__(self, model, optimizer, config: dict[str, Any]):
        import deepspeed

        skip_unused_deepspeed_ops()
        self.config = config
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.module = self.engine.module
        self.forward_model = self.engine

    def micro_context(self, last: bool):
        return contextlib.nullcontext()  # the engine knows the accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divides by the step's target count, so DeepSpeed must not divide by
        # the accumulation steps again; engine.step() only updates at the accumulation boundary.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def clip_gradients(self) -> None:
        return None  # the engine clips inside its own step

    def step(self) -> None:
        pass

    def skip(self) -> None:
        raise AssertionError("DeepSpeed cannot skip a step it has taken (spec validation forbids skip_nonfinite_steps)")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Under ZeRO-3 each worker holds a shard: gather a full state dict (collective; full on rank 0)."""
        if self.config["zero_optimization"]["stage"] != 3:
            return None
        return self.engine._zero3_consolidated_16bit_state_dict()


def zero3_init_context(config: dict[str, Any]):
    """Register the DeepSpeed config with transformers so `from_pretrained` builds the model
    partitioned from the start (zero.Init): each worker materialises only its shard."""
    from transformers.integrations import HfDeepSpeedConfig

    skip_unused_deepspeed_ops()

    return HfDeepSpeedConfig(config)  # must stay referenced until the model is built
