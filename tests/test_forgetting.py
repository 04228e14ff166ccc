"""Forgetting checks (general-text perplexity before/after) and the few-shot prompting baseline."""

from __future__ import annotations

import json
import shutil

import pytest

from ftcluster.data.formats import Example
from ftcluster.data.render import Renderer
from ftcluster.evaluation.forgetting import BUILTIN
from ftcluster.models.load import load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def knowing_model(tiny_model, tmp_path_factory):
    """The tiny model after learning the general texts: now it has something to forget."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    folder = tmp_path_factory.mktemp("pretrain")
    job = {
        "name": "pretrain", "model": {"path": str(tiny_model)}, "method": {"name": "full"},
        "data": {"train": str(BUILTIN), "format": "text", "max_length": 160, "val_fraction": 0.0},
        "training": {"max_steps": 150, "batch_size": 8, "lr": 3e-3, "threads": 1, "log_every": 50,
                     "scheduler": "constant"},
        "eval": {"before_after": False}, "output": {"dir": str(folder / "run")},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    ftcluster = Path(sys.executable).with_name("ftcluster")
    subprocess.run([str(ftcluster), "train", str(folder / "job.yaml"), "--no-ray"], check=True, capture_output=True)
    model = folder / "run" / "final" / "model"
    for path in (folder / "run" / "final" / "tokenizer").iterdir():
        shutil.copy(path, model / path.name)
    return model


def finetune(make_job, cli, tmp_path, model, name, method, lr, **eval_extra):
    job = make_job(name, model={"path": str(model)}, method=method,
                   training={"max_steps": 60, "batch_size": 8, "lr": lr},
                   eval={"before_after": True, "forgetting": {"max_increase_pct": 10, **eval_extra}})
    result = cli("train", job, "--no-ray")
    summary_path = tmp_path / "runs" / name / "summary.json"
    return result, json.loads(summary_path.read_text()) if summary_path.is_file() else None


def test_aggressive_full_finetune_forgets_more_than_lora(knowing_model, make_job, cli, tmp_path):
    full, full_summary = finetune(make_job, cli, tmp_path, knowing_model, "full", {"name": "full"}, 1e-2)
    assert full.code == 0, full
    lora_method = {"name": "lora", "lora": {"rank": 2, "alpha": 4, "dropout": 0.0}}
    lora, lora_summary = finetune(make_job, cli, tmp_path, knowing_model, "lora", lora_method, 1e-3)
    assert lora.code == 0, lora
    full_change = full_summary["forgetting"]["increase_pct"]
    lora_change = lora_summary["forgetting"]["increase_pct"]
    assert full_summary["before"]["general_perplexity"] < 20  # the model knew the texts
    assert full_change > 50 and full_summary["forgetting"]["exceeded"]  # measurable forgetting
    assert lora_change < full_change / 3
    assert "Forgetting check: general-text perplexity" in full.out and "ABOVE the 10% threshold" in full.out
    assert "general_perplexity" in full_summary["after"]


def test_forgetting_can_fail_the_run_and_keeps_its_outputs(knowing_model, make_job, cli, tmp_path):
    result, summary = finetune(make_job, cli, tmp_path, knowing_model, "strict", {"name": "full"}, 1e-2, action="fail")
    assert result.code == 2
    assert "forgetting: general-text perplexity" in result.err and "eval.forgetting.action: fail" in result.err
    assert summary["forgetting"]["exceeded"] and (tmp_path / "runs" / "strict" / "final" / "model").is_dir()


def test_bad_forgetting_file_is_one_line(make_job, cli, tmp_path):
    bad = tmp_path / "general.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    job = make_job("badgeneral", eval={"before_after": True, "forgetting": {"data": str(bad)}})
    result = cli("train", job, "--no-ray")
    assert result.code == 2 and "eval.forgetting.data: bad row" in result.err and "general.jsonl:2" in result.err


def test_few_shot_prompt_holds_the_worked_examples(tiny_model):
    renderer = Renderer(load_tokenizer(resolve_model(str(tiny_model))), 256)
    shots = [Example(messages=[{"role": "user", "content": f"add {a} and 1"}, {"role": "assistant", "content": str(a + 1)}])
             for a in (2, 5)]
    target = Example(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 7 and 1"},
                               {"role": "assistant", "content": "8"}])
    prompt, reference = renderer.prompt_text(target, shots)
    assert reference == "8"
    assert prompt.index("Be brief.") < prompt.index("add 2 and 1") < prompt.index("3") < prompt.index("add 7 and 1")
    assert prompt.count("Be brief.") == 1
    alone, _ = renderer.prompt_text(target)
    assert "add 2 and 1" not in alone


def test_few_shot_baseline_in_summary_and_eval(make_job, cli, tmp_path):
    job = make_job("fewshot", eval={"before_after": True, "few_shot_baseline": 2,
                                    "generation": {"num_prompts": 4, "max_new_tokens": 3}})
    result = cli("train", job, "--no-ray")
    assert result.code == 0, result
    summary = json.loads((tmp_path / "runs" / "fewshot" / "summary.json").read_text())
    assert summary["few_shot"]["shots"] == 2 and 0 <= summary["few_shot"]["exact_match"] <= 1
    assert "Fine-tune vs prompt: base model with 2 examples in the prompt" in result.out
    evaluated = cli("eval", tmp_path / "runs" / "fewshot", "--baseline", "few-shot:3")
    assert evaluated.code == 0, evaluated
    assert "base model with 3 examples in the prompt" in evaluated.out
    bad = cli("eval", tmp_path / "runs" / "fewshot", "--baseline", "zero-shot")
    assert bad.code == 2 and "expected few-shot:K" in bad.err


def test_few_shot_needs_generation(make_job, cli):
    result = cli("validate", make_job("nogen", eval={"few_shot_baseline": 3}))
    assert result.code == 2 and "eval.few_shot_baseline needs eval.generation" in result.err
