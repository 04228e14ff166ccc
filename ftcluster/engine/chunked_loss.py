"""Cross-entropy without the full logits tensor.

A causal LM's loss normally materialises logits of shape (batch, tokens, vocab) in float32: for
Llama-3's 128k vocabulary at 8 x 2048 tokens that is 8 GiB, plus as much again for its gradient.
Here the model returns its final hidden states instead (the output head is bypassed for that one
forward pass, through whatever wrapper — PEFT, DDP, DeepSpeed — sits around it), and the head is
applied only to the positions that are trained, a chunk at a time, each chunk recomputed during
backward. Peak memory for the loss drops to one chunk's logits; responses-only training also skips
the prompt positions entirely.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftcluster.data.batches import IGNORE, model_inputs


def output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The plain nn.Linear output head under any wrapper, or None where chunking cannot apply."""
    inner = getattr(model, "module", model)  # DDP and DeepSpeed keep the real model as .module
    get_head = getattr(inner, "get_output_embeddings", None)  # PEFT forwards this to the base model
    head = get_head() if get_head else None
    return head if type(head) is torch.nn.Linear else None


@contextlib.contextmanager
def hidden_states_as_logits(head: torch.nn.Linear):
    """For one forward pass, the head returns its input: the model's `.logits` are hidden states."""
    head.forward = lambda hidden: hidden  # an instance attribute: state-dict keys stay the same
    try:
        yield
    finally:
        del head.forward


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], head: torch.nn.Linear,
                     chunk_tokens: int = 2048) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions, one chunk of logits at a time."""
    inputs = model_inputs(batch)
    labels = batch["labels"]
    with hidden_states_as_logits(head):
        hidden = model(**inputs).logits[:, -labels.shape[1]:]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).flatten()
    # The one host sync of this loss: how many positions are trained decides the chunks' shapes.
    keep = (targets != IGNORE).nonzero().squeeze(1)
    hidden, targets = hidden.flatten(0, 1)[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss, hidden[piece], targets[piece], head.weight, head.bias,
                                   use_reentrant=False)
    return total
