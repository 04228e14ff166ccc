"""A run-time check that the model keeps packed examples apart.

Packed batches carry no attention mask: transformers derives one from the position ids, which
restart at every example. Architectures that ignore position ids (ALiBi models such as BLOOM, or
custom code) would silently let each example attend to the ones packed before it, so a run with
``data.packing`` first asks the model itself.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from ftcluster.core.errors import FtError, first_line
from ftcluster.data.batches import collate, model_inputs
from ftcluster.data.render import Encoded
from ftcluster.evaluation.metrics import eval_mode

# Two packed rows: different first examples, the same second one.
FIRST_EXAMPLES = ([5, 6, 7], [8, 9, 10])
SECOND_EXAMPLE = [11, 12, 13]


def _packed_row(first: list[int]) -> Encoded:
    ids = first + SECOND_EXAMPLE
    positions = list(range(len(first))) + list(range(len(SECOND_EXAMPLE)))
    return Encoded(ids, [True] * len(ids), positions=positions)


@torch.no_grad()
def check_packing_isolation(model: torch.nn.Module, device: torch.device,
                            autocast: Callable[[], AbstractContextManager]) -> None:
    """Raise if the second example's logits depend on the example packed before it.

    Every worker calls this (under ZeRO-3 a forward pass is a collective).
    """
    batch = collate([_packed_row(first) for first in FIRST_EXAMPLES], pad_id=0)
    batch = {k: v.to(device) for k, v in batch.items()}
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    try:
        with eval_mode(model), autocast():
            logits = model(**model_inputs(batch)).logits.float()
    except TypeError as exc:  # a forward() without position_ids
        raise FtError(f"data.packing: this model ({kind}) cannot take packed sequences "
                      f"({first_line(exc)}); set data.packing: false") from None
    second = slice(len(FIRST_EXAMPLES[0]), None)
    difference = (logits[0, second] - logits[1, second]).abs().max()
    scale = logits[:, second].abs().max().clamp(min=1.0)
    if difference > 1e-2 * scale:
        raise FtError(f"data.packing: this model ({kind}) lets packed examples see each other (it does not read "
                      f"example boundaries from position ids); set data.packing: false")
