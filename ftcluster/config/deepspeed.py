"""The DeepSpeed config, generated from the job spec (pure: no DeepSpeed import needed).

Users pass extra keys through ``distributed.deepspeed_overrides``; a key the spec already sets
to a different value is a contradiction and is reported at validation, never silently won.
"""

from __future__ import annotations

from typing import Any

MB = 2**20


def generated_config(spec, precision: str | None = None) -> dict[str, Any]:
    """DeepSpeed keys the spec determines. ``precision`` (fp32/bf16/fp16) once it is resolved."""
    dist, cfg = spec.distributed, spec.training
    zero: dict[str, Any] = {
        "stage": dist.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": dist.bucket_size_mb * MB,
    }
    if dist.zero_stage < 3:
        zero["allgather_bucket_size"] = dist.bucket_size_mb * MB
    else:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if dist.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(dist.offload_optimizer, dist.nvme_path)
    if dist.offload_params != "none":
        zero["offload_param"] = _offload(dist.offload_params, dist.nvme_path)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision is not None:
        config["bf16"] = {"enabled": precision == "bf16"}
        config["fp16"] = {"enabled": precision == "fp16"}
    return config


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        entry["nvme_path"] = nvme_path
    return entry


def contradictions(generated: dict[str, Any], overrides: dict[str, Any], prefix: str = "") -> list[str]:
    """Leaves that overrides set to a value different from the generated one."""
    found = []
    for key, value in overrides.items():
        if key not in generated:
            continue
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(generated[key], dict):
            found += contradictions(generated[key], value, path + ".")
        elif value != generated[key]:
            found.append(f"{path}={value!r} contradicts {generated[key]!r} from the spec")
    return found


def merged(generated: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(generated)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def deepspeed_config(spec, precision: str) -> dict[str, Any]:
    return merged(generated_config(spec, precision), spec.distributed.deepspeed_overrides)
