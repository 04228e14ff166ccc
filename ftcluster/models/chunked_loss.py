"""Cross-entropy without the full logits tensor.

A causal LM's loss normally materialises logits of shape (batch, tokens, vocab) in float32: for
Llama-3's 128k vocabulary at 8 x 2048 tokens that is 8 GiB, plus as much again for its gradient.
Here the model returns its final hidden states instead (the output head is bypassed for that one
forward pass, through whatever wrapper — PEFT, DDP, DeepSpeed — sits around it), and the head is
applied only to the positions that are trained, a chunk at a time, with each chunk's gradients
taken right away (see LinearCrossEntropy). Peak memory for the loss drops to one chunk's logits;
responses-only training also skips the prompt positions entirely.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ftcluster.data.batches import IGNORE, model_inputs


def output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The plain nn.Linear output head under any wrapper, or None where chunking cannot apply."""
    inner = getattr(model, "module", model)  # DDP and DeepSpeed keep the real model as .module
    get_head = getattr(inner, "get_output_embeddings", None)  # PEFT forwards this to the base model
    head = get_head() if get_head else None
    # Under ZeRO-3 the weight is an empty placeholder outside the module's own forward.
    return head if type(head) is torch.nn.Linear and head.weight.numel() > 0 else None


@contextlib.contextmanager
def hidden_states_as_logits(head: torch.nn.Linear):
    """For one forward pass, the head returns its input: the model's `.logits` are hidden states."""
    vars(head)["forward"] = lambda hidden: hidden  # an instance attribute: state-dict keys stay the same
    try:
        yield
    finally:
        del head.forward


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, one chunk of rows at
    a time. Each chunk's gradients are taken during the forward pass (softmax minus one-hot, then
    the two matmuls backward would do), so no more than one chunk of logits or of their gradient
    ever exists, and nothing is recomputed: the same three matmuls as an unchunked forward and
    backward (two when the head is frozen, as under LoRA). Backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int, compute_dtype: torch.dtype,
                with_grads: bool):
        want_hidden, want_weight, want_bias = (with_grads and needed for needed in ctx.needs_input_grad[:3])
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen here, once
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            rows_in = hidden.to(compute_dtype)
            grad_hidden = torch.empty_like(hidden) if want_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                h, t = rows_in[rows], targets[rows]
                logits = F.linear(h, w, b).float()
                normalizer = torch.logsumexp(logits, dim=-1)
                total += (normalizer - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (want_hidden or want_weight or want_bias):
                    continue
                grad = logits.sub_(normalizer[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(t.shape[0], device=t.device), t] -= 1
                if grad_bias is not None:  # want_bias
                    grad_bias += grad.sum(0)
                grad = grad.to(compute_dtype)
                if grad_hidden is not None:  # want_hidden
                    grad_hidden[rows] = (grad @ w).to(hidden.dtype)
                if grad_weight is not None:  # want_weight
                    grad_weight += (grad.t() @ h).float()
        ctx.grads = (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_total):
        scaled = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.grads]
        ctx.grads = None
        return (*scaled, None, None, None, None)


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
    device_type = hidden.device.type
    # The head's matmuls run in the dtype autocast would have given them.
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_tokens, compute_dtype,
                                    torch.is_grad_enabled())
