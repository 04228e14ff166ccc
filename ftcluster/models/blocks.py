"""Find a model's stack of transformer blocks and its head, whatever the architecture."""

from __future__ import annotations

import torch.nn as nn

from ftcluster.core.errors import ModelError

HEAD_NAMES = ("lm_head", "classifier", "score")
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The largest ModuleList whose children are all the same class: the transformer blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(child) for child in module}) == 1
                and (best is None or len(module) > len(best[1]))):
            best = (name, module)
    if best is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    return best


def is_head_param(name: str) -> bool:
    """Output head, pooler and final norm: depth 0 from the top."""
    parts = name.split(".")
    return any(p in HEAD_NAMES or p in FINAL_NORM_NAMES or p == "pooler" for p in parts)


def depth_from_top(name: str, blocks_prefix: str, num_blocks: int) -> int:
    """0 for the head, 1 for the top block, ..., num_blocks + 1 for embeddings and the rest below."""
    if is_head_param(name) and not name.startswith(blocks_prefix + "."):
        return 0
    if name.startswith(blocks_prefix + "."):
        index = int(name[len(blocks_prefix) + 1 :].split(".")[0])
        return num_blocks - index
    return num_blocks + 1


def checkpoint_every_nth_block(model: nn.Module, every: int) -> int:
    """Selective activation checkpointing: blocks 0, every, 2*every, ... keep recomputing in backward,
    the others keep their activations. Call after checkpointing is enabled; returns how many blocks
    recompute."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    _, blocks = find_blocks(model)
    if not isinstance(blocks[0], GradientCheckpointingLayer):
        raise ModelError(f"training.gradient_checkpointing_every: {type(blocks[0]).__name__} blocks cannot be checkpointed "
                         f"one by one; leave it at 1")
    layers = [block for block in blocks if isinstance(block, GradientCheckpointingLayer)]
    assert len(layers) == len(blocks)  # find_blocks: every block has blocks[0]'s class
    for index, block in enumerate(layers):
        block.gradient_checkpointing = block.gradient_checkpointing and index % every == 0
    return sum(block.gradient_checkpointing for block in layers)
