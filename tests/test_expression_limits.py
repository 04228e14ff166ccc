"""A sweep expression that would exhaust Python's parser (100,000 unary minus signs) is one SpecError,
quickly, not a MemoryError traceback; nesting within the length limit still evaluates."""

from __future__ import annotations

import time

import pytest


@pytest.mark.parametrize("text", ["-" * 100_000 + "1", "(" * 50_000 + "1" + ")" * 50_000])
def test_a_huge_expression_is_refused_in_one_line(text):
    from ftcluster.core.errors import SpecError
    from ftcluster.sweep.space import evaluate_expression

    started = time.perf_counter()
    with pytest.raises(SpecError) as refused:
        evaluate_expression(text, {}, {}, "space.yaml: training.lr")
    assert time.perf_counter() - started < 1.0
    message = str(refused.value)
    assert "\n" not in message and len(message) < 300 and "space.yaml: training.lr" in message


def test_nesting_within_the_limit_still_evaluates():
    from ftcluster.sweep.space import MAX_EXPRESSION_CHARS, evaluate_expression

    assert evaluate_expression("-" * 400 + "1", {}, {}, "x") == 1
    assert evaluate_expression("-" * (MAX_EXPRESSION_CHARS - 1) + "1", {}, {}, "x") == -1
