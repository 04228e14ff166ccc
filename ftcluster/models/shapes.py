"""Architectures of well-known models, for planning and checks without downloading anything.

`meta_model` builds one on PyTorch's meta device: every shape and parameter count is real, no
memory is allocated. Hub ids map to these shapes so offline tools can reason about a job that
names a model they cannot fetch.
"""

from __future__ import annotations

from typing import Any

LLAMA_SHAPES: dict[str, dict[str, int]] = {
    # name: LlamaConfig fields (original LLaMA / Llama 2 shapes)
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000),
    "llama-33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                      num_key_value_heads=52, vocab_size=32000),
    "llama-65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=64, vocab_size=32000),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000),
    # Llama 3 shapes (128k vocabulary; the 1B ties its input and output embeddings)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
}

HUB_IDS: dict[str, str] = {
    "meta-llama/Llama-2-7b-hf": "llama-7b",
    "huggyllama/llama-7b": "llama-7b",
    "meta-llama/Llama-2-13b-hf": "llama-13b",
    "huggyllama/llama-13b": "llama-13b",
    "huggyllama/llama-30b": "llama-33b",
    "huggyllama/llama-65b": "llama-65b",
    "meta-llama/Llama-2-70b-hf": "llama-70b",
    "meta-llama/Llama-3.2-1B": "llama-3.2-1b",
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
}


def known_shape(reference: str) -> str | None:
    """The shape name for a model reference (a shape name itself, or a known hub id)."""
    if reference in LLAMA_SHAPES:
        return reference
    return HUB_IDS.get(reference)


def meta_model(shape: str):
    """A Llama model of that shape on the meta device (no weights allocated)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    fields: dict[str, Any] = {"tie_word_embeddings": False, **LLAMA_SHAPES[shape]}  # LlamaConfig's keywords have many types
    config = LlamaConfig(**fields, max_position_embeddings=4096)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
