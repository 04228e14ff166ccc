"""lm-evaluation-harness on the base and the fine-tuned model: a local task, before and after training."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import write_jsonl

from ftcluster.evaluation.harness import harness_scores
from ftcluster.models.tiny import arithmetic_rows


def local_task(folder: Path) -> Path:
    """A multiple-choice task over local files, as a user writes one: the sums the tiny model trains on."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": row["instruction"], "label": int(row["output"])} for row in arithmetic_rows(16, 5)]
    data = write_jsonl(folder / "sums.jsonl", rows)
    task = {"task": "tiny_sums", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}} =",
            "doc_to_choice": [str(n) for n in range(19)], "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    (folder / "tiny_sums.yaml").write_text(yaml.safe_dump(task))
    return folder


def test_harness_results_become_flat_scores():
    results = {"arc": {"alias": "arc", "sample_len": 10, "acc,none": 0.5, "acc_stderr,none": 0.1,
                       "exact_match,strict-match": 0.25}}
    assert harness_scores(results) == {"harness/arc/acc": 0.5, "harness/arc/exact_match_strict-match": 0.25}


def test_a_local_harness_task_before_and_after_training(make_job, cli, tmp_path):
    tasks = local_task(tmp_path / "tasks")
    harness = {"tasks": ["tiny_sums"], "include_path": str(tasks), "limit": 8}
    # The same task is the forgetting check (run once for both): did the score fall?
    job = make_job("harnessed", training={"max_steps": 8}, eval={
        "before_after": True, "harness": harness, "forgetting": {"data": None, "harness": harness}})
    result = cli("train", job, "--no-ray")
    assert result.code == 0, result
    summary = json.loads((tmp_path / "runs" / "harnessed" / "summary.json").read_text())
    for when in ("before", "after"):
        assert 0 <= summary[when]["harness/tiny_sums/acc"] <= 1
    assert "harness/tiny_sums/acc" in result.out  # in the before/after table
    check = summary["forgetting"]["harness"]["harness/tiny_sums/acc"]
    assert (check["before"], check["after"]) == (summary["before"]["harness/tiny_sums/acc"],
                                                 summary["after"]["harness/tiny_sums/acc"])
    assert summary["forgetting"]["exceeded"] == (check["worse_pct"] > 10) and "perplexity_before" not in summary["forgetting"]
    assert "Forgetting check: harness/tiny_sums/acc" in result.out
    evaluated = cli("eval", tmp_path / "runs" / "harnessed", "--harness", "tiny_sums", "--harness-include", tasks,
                    "--harness-limit", "4")
    assert evaluated.code == 0 and "harness/tiny_sums/acc" in evaluated.out
    unknown = cli("eval", tmp_path / "runs" / "harnessed", "--harness", "no_such_task")
    assert unknown.code == 2 and "has no task 'no_such_task'" in unknown.err and unknown.err.count("\n") == 1
