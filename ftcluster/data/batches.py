"""Batches: a deterministic, resumable order over examples, and padding into tensors."""

from __future__ import annotations

import torch

from ftcluster.data.render import Encoded

IGNORE = -100  # label value that cross-entropy skips


class StepOrder:
    """Which examples each optimizer step reads, derived from (seed, step) alone.

    Every step takes ``per_step = micro_batch * grad_accum * world_size`` examples from a seeded
    permutation of the epoch, so a run resumed at step k reads exactly what an uninterrupted run
    would, and batch 8 x accumulation 1 reads the same examples as batch 4 x accumulation 2.
    The tail of an epoch that does not fill a whole step is left out of that epoch.
    """

    def __init__(self, num_examples: int, micro_batch: int, grad_accum: int, world_size: int, seed: int):
        self.num_examples = num_examples
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.seed = seed
        self.per_step = micro_batch * grad_accum * world_size
        self.steps_per_epoch = num_examples // self.per_step
        self._cached_epoch: tuple[int, list[int]] | None = None

    def _permutation(self, epoch: int) -> list[int]:
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._cached_epoch = (epoch, torch.randperm(self.num_examples, generator=generator).tolist())
        return self._cached_epoch[1]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Example indices of each micro batch this rank runs at ``step`` (0-based)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        chunk = self._permutation(epoch)[offset * self.per_step : (offset + 1) * self.per_step]
        mine = chunk[rank :: self.world_size]
        return [mine[i * self.micro_batch : (i + 1) * self.micro_batch] for i in range(self.grad_accum)]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as a right-padded (rows, longest) tensor and its attention mask."""
    width = max(1, max(len(row) for row in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[index, :len(row)] = 1
    return ids, mask


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into model inputs; labels hold IGNORE where not trained.

    Packed sequences get position ids (restarting at each example) and no attention mask:
    transformers then builds the mask its attention kernel wants from the position ids (a
    block-diagonal causal mask for sdpa/eager, a block-sparse mask for flex_attention that skips
    cross-example blocks, variable-length sequences for flash_attention_2), on the device, rather
    than a (batch, 1, length, length) tensor built here and copied over every step.
    """
    input_ids, attention = right_padded([item.input_ids for item in items], pad_id)
    length = input_ids.shape[1]
    labels = torch.full_like(input_ids, IGNORE)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        labels[row, :n] = torch.where(torch.tensor(item.trained), input_ids[row, :n], IGNORE)
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if items[0].label is not None:
        batch["labels"] = torch.tensor([item.label for item in items])
    else:
        batch["labels"] = labels
    if items[0].positions is not None:
        # The padding tail counts as one more (untrained) sequence of its own.
        positions = torch.arange(length).repeat(len(items), 1)
        for row, item in enumerate(items):
            assert item.positions is not None  # a batch is packed all through or not at all
            positions[row, : len(item.positions)] = torch.tensor(item.positions)
            positions[row, len(item.positions) :] -= len(item.positions)
        batch["position_ids"] = positions
        del batch["attention_mask"]
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """A batch as forward() keywords: no labels (losses are computed outside), and for language
    models no KV cache: training never reuses it, and transformers only reads packed sequences
    from the position ids when there is none."""
    inputs: dict[str, torch.Tensor | bool] = {k: v for k, v in batch.items() if k != "labels"}
    if batch["labels"].dim() == 2:
        inputs["use_cache"] = False
    return inputs


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Number of loss terms in a batch: predicted tokens (LM) or examples (classification)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != IGNORE).sum())
