"""The forgetting check: what the base model could do, scored again after fine-tuning.

A fine-tune that teaches a narrow task can erase what the base model knew. A rising perplexity on
ordinary text is the cheap, early sign: the built-in sample (40 short general-knowledge paragraphs
written for ftcluster) ships in ftcluster/resources, and users can name their own file. Standard
benchmarks (`eval.forgetting.harness`, lm-evaluation-harness tasks) are the direct one: a score that
falls is a skill lost.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ftcluster.config.spec import ColumnSpec, ForgettingSpec
from ftcluster.core.errors import DataError
from ftcluster.data.formats import BadRow, parse_row
from ftcluster.data.readers import read_rows
from ftcluster.data.render import Encoded, Renderer

BUILTIN = Path(__file__).parents[1] / "resources" / "general-text.jsonl"


HIGHER_IS_BETTER = "harness_higher_is_better"  # run_eval's map of harness metric -> direction


def general_items(spec: ForgettingSpec, renderer: Renderer) -> list[Encoded] | None:
    """The general texts, tokenized like plain-text training data (every token scored); None without them."""
    if spec.data is None:
        return None
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


def worse_pct(before: float, after: float, higher_is_better: bool) -> float:
    """How much worse `after` is than `before`, in percent of `before` (negative: better)."""
    if before == after:
        return 0.0
    change = (after - before) / abs(before) * 100 if before else math.copysign(100.0, after - before)
    return -change if higher_is_better else change


def harness_keys(spec: ForgettingSpec, scores: dict[str, Any]) -> list[str]:
    """The `harness/TASK/METRIC` scores of the forgetting check's tasks."""
    tasks = spec.harness.tasks if spec.harness else []
    return [key for key in scores if any(key.startswith(f"harness/{task}/") for task in tasks)]


def verdict(before: dict[str, Any], after: dict[str, Any], spec: ForgettingSpec) -> dict[str, Any]:
    """How much worse each check got (general-text perplexity, the harness scores), and whether the
    worst of them crosses the threshold."""
    result: dict[str, Any] = {"data": spec.data, "threshold_pct": spec.max_increase_pct, "action": spec.action}
    worse: dict[str, float] = {}
    if "general_perplexity" in before and "general_perplexity" in after:
        start, end = before["general_perplexity"], after["general_perplexity"]
        result.update(perplexity_before=start, perplexity_after=end, increase_pct=worse_pct(start, end, False))
        worse["general_perplexity"] = result["increase_pct"]
    directions = {**before.get(HIGHER_IS_BETTER, {}), **after.get(HIGHER_IS_BETTER, {})}
    harness = {}
    for key in harness_keys(spec, before):
        if key in after:
            change = worse_pct(before[key], after[key], directions.get(key, True))
            harness[key] = {"before": before[key], "after": after[key], "worse_pct": change}
            worse[key] = change
    if harness:
        result["harness"] = harness
    worst = max(worse, key=lambda name: worse[name]) if worse else None
    result["worst"] = worst
    result["exceeded"] = worst is not None and worse[worst] > spec.max_increase_pct
    return result


def changes(result: dict[str, Any]) -> list[str]:
    """One phrase per check: 'general-text perplexity 29.30 -> 28.06 (-4.2%)', 'harness/arc/acc 0.50 -> 0.40 (20.0% worse)'."""
    phrases = []
    if "perplexity_before" in result:
        phrases.append(f"general-text perplexity {result['perplexity_before']:.2f} -> {result['perplexity_after']:.2f} "
                       f"({result['increase_pct']:+.1f}%)")
    for key, check in result.get("harness", {}).items():
        phrases.append(f"{key} {check['before']:.3f} -> {check['after']:.3f} ({check['worse_pct']:+.1f}% worse)")
    return phrases


def message(result: dict[str, Any]) -> str:
    return f"forgetting: {'; '.join(changes(result))} (threshold {result['threshold_pct']:g}%)"
