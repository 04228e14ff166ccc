"""The forgetting check: general-domain text scored (perplexity) before and after fine-tuning.

A fine-tune that teaches a narrow task can erase what the base model knew; a rising perplexity
on ordinary text is the cheap, early sign. The built-in sample (40 short general-knowledge
paragraphs written for ftcluster) ships in ftcluster/resources; users can name their own file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftcluster.data.formats import BadRow, parse_row
from ftcluster.data.readers import read_rows
from ftcluster.data.render import Encoded, Renderer
from ftcluster.errors import DataError
from ftcluster.spec import ColumnSpec, ForgettingSpec

BUILTIN = Path(__file__).parent / "resources" / "general-text.jsonl"


def general_items(spec: ForgettingSpec, renderer: Renderer) -> list[Encoded]:
    """The general texts, tokenized like plain-text training data (every token scored)."""
    path = BUILTIN if spec.data == "builtin" else Path(spec.data)
    items = []
    for row in read_rows(path)[: spec.max_texts]:
        try:
            items.append(renderer.encode(parse_row(row.values, "text", ColumnSpec(), None)))
        except BadRow as exc:
            raise DataError(f"eval.forgetting.data: bad row {row.where}: {exc}") from None
    if not items:
        raise DataError(f"eval.forgetting.data: {path} has no texts")
    return items


def verdict(before: dict[str, float], after: dict[str, float], spec: ForgettingSpec) -> dict[str, Any]:
    """How much the general-text perplexity rose, and whether that crosses the threshold."""
    start, end = before["general_perplexity"], after["general_perplexity"]
    increase = (end / start - 1) * 100
    return {
        "data": spec.data,
        "perplexity_before": start,
        "perplexity_after": end,
        "increase_pct": increase,
        "threshold_pct": spec.max_increase_pct,
        "exceeded": increase > spec.max_increase_pct,
        "action": spec.action,
    }


def message(result: dict[str, Any]) -> str:
    return (f"forgetting: general-text perplexity {result['perplexity_before']:.2f} -> {result['perplexity_after']:.2f} "
            f"({result['increase_pct']:+.1f}%, threshold {result['threshold_pct']:g}%)")
