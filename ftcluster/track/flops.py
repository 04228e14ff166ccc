"""Model FLOPs per trained token, and MFU against the device's peak.

Per token, a matmul with N weights costs 2N FLOPs forward. Backward costs 2N more for the
gradient with respect to its input (always needed to reach earlier layers) and 2N for the
gradient with respect to its weights (only where the weights train). So a full fine-tune is the
familiar 6N, while LoRA pays 4N on its frozen base plus 6N on the adapters. Attention scores and
their backward add 12 * layers * width * context per token (no weights involved, nothing to skip).
Recomputation from gradient checkpointing is not counted: MFU measures useful model FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftcluster.core.accelerators import find_accelerator


def peak_flops_of(gpu_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by name (see ftcluster.core.accelerators); None when unknown."""
    accelerator = find_accelerator(gpu_name)
    return accelerator.peak_tflops * 1e12 if accelerator else None


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of the device; None for CPUs and unknown GPUs (no guessing)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


@dataclass(frozen=True)
class FlopsPerToken:
    frozen_matmul_params: int
    trained_matmul_params: int
    attention: int

    @property
    def total(self) -> int:
        return 4 * self.frozen_matmul_params + 6 * self.trained_matmul_params + self.attention


def _matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen, trained) weights used in matmuls per token: 2-D weights (and 4-bit packed ones),
    including the output head, excluding embedding lookups."""
    from ftcluster.models.methods import logical_size

    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    get_output_embeddings = getattr(model, "get_output_embeddings", None)  # a transformers model's method
    head = get_output_embeddings() if get_output_embeddings is not None else None
    counted: list[torch.Tensor] = []
    for parameter in model.parameters():
        packed = getattr(parameter, "quant_state", None) is not None
        dims = len(getattr(parameter, "ds_shape", parameter.shape))  # ZeRO-3 keeps the full shape aside
        if id(parameter) not in lookups and (dims == 2 or packed):
            counted.append(parameter)
    if head is not None and id(head.weight) in lookups:  # tied head: the lookup table is also a matmul
        counted.append(head.weight)
    frozen = sum(logical_size(p) for p in counted if not p.requires_grad)
    trained = sum(logical_size(p) for p in counted if p.requires_grad)
    return frozen, trained


def flops_per_token(model: torch.nn.Module, context: int) -> FlopsPerToken:
    """Training FLOPs per token for sequences of length ``context``."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", 0)
    width = getattr(config, "hidden_size", 0)
    frozen, trained = _matmul_params(model)
    return FlopsPerToken(frozen, trained, 12 * layers * width * context)


def model_flops_utilization(tokens_per_s: float, flops_per_token: int, peak_per_device: float | None,
                            devices: int) -> float | None:
    """Achieved model FLOP/s over the devices' peak; None where the peak is unknown."""
    if not peak_per_device:
        return None
    return tokens_per_s * flops_per_token / (peak_per_device * devices)
