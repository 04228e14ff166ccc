"""Standard benchmarks: EleutherAI's lm-evaluation-harness, run on the model being evaluated.

The model in memory is handed to the harness as it is (the base with adapters switched off, or the
fine-tuned one with them on), so nothing is written or merged for it. Each task's metrics come back
as `harness/TASK/METRIC` and join the before/after table. Offline, tasks are YAML files in
`eval.harness.include_path` whose data are local files; online, any task of the harness.
"""

from __future__ import annotations

import functools
from typing import Any

from ftcluster.core.errors import FtError, first_line
from ftcluster.evaluation.forgetting import HIGHER_IS_BETTER


def _harness():
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise FtError("eval.harness needs lm-evaluation-harness: pip install 'ftcluster[harness]'") from None
    return simple_evaluate, HFLM, TaskManager


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """The harness's index of tasks (its own several hundred plus include_path's): seconds to build, so
    built once per process for the base and the fine-tuned model alike."""
    return _harness()[2](include_path=include_path, verbosity="ERROR")


def run_harness(model, tokenizer, settings, device) -> dict[str, Any]:
    """The harness's scores of ``model`` on ``settings.tasks`` (an `eval.harness` section), and which way each improves."""
    simple_evaluate, HFLM, _ = _harness()
    manager = _task_manager(settings.include_path)
    unknown = [task for task in settings.tasks if task not in manager.all_tasks]
    if unknown:
        where = f" (nor in include_path {settings.include_path})" if settings.include_path else ""
        raise FtError(f"eval.harness.tasks: lm-evaluation-harness has no task {unknown[0]!r}{where}")
    padding_side = tokenizer.padding_side  # (the harness sets its own)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, device=str(device), batch_size=settings.batch_size)
        results = simple_evaluate(model=lm, tasks=list(settings.tasks), num_fewshot=settings.num_fewshot,
                                  limit=settings.limit, task_manager=manager, log_samples=False, bootstrap_iters=0,
                                  verbosity="ERROR")
    except (OSError, ValueError, KeyError) as exc:  # a task's data missing or malformed
        raise FtError(f"eval.harness: {first_line(exc)}") from None
    finally:
        tokenizer.padding_side = padding_side
    if not results:
        return {}
    return {**harness_scores(results["results"]), HIGHER_IS_BETTER: harness_directions(results.get("higher_is_better", {}))}


def harness_scores(results: dict[str, dict]) -> dict[str, float]:
    """{task: {"acc,none": 0.5, "acc_stderr,none": ...}} → {"harness/task/acc": 0.5} (errors left out)."""
    scores = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            scores[f"harness/{task}/{name}"] = float(value)
    return scores


def harness_directions(higher_is_better: dict[str, dict]) -> dict[str, bool]:
    """{task: {"acc": True}} → {"harness/task/acc": True}: which way each score improves."""
    return {f"harness/{task}/{metric}": bool(value) for task, metrics in higher_is_better.items()
            for metric, value in metrics.items()}
