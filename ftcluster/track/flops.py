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

# Dense (no sparsity) peak TFLOP/s by GPU, for bf16/fp16 tensor-core math. Matched by substring
# of torch.cuda.get_device_name(); the first match wins, so specific names come first.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / NVL
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("V100", 125.0),
    ("T4", 65.0),
]


def peak_flops_of(gpu_name: str) -> float | None:
    """Peak FLOP/s of a GPU by (part of) its name; None when it is not in the table."""
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in gpu_name), None)


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
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
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
