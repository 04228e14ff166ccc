"""Export: adapters that plain `peft` loads, merged folders that plain `transformers` loads."""

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)


def logits_of(model, tokenizer, text="<|im_start|>user\nadd 2 and 3<|im_end|>\n"):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_adapter_and_merged_exports_load_in_plain_libraries(method, make_job, cli, tmp_path, tiny_model):
    job = make_job(f"exp-{method}", method={"name": method}, training={"max_steps": 3, "lr": 1e-2})
    assert cli("train", job, "--no-ray").code == 0
    run = tmp_path / "runs" / f"exp-{method}"
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    assert cli("export", run, "--out", adapter_dir).code == 0
    assert cli("export", run, "--merge", "--out", merged_dir).code == 0

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with_adapter = PeftModel.from_pretrained(base, adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    adapted_logits = logits_of(with_adapter, tokenizer)
    torch.testing.assert_close(logits_of(merged, tokenizer), adapted_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits_of(plain, tokenizer), adapted_logits, atol=1e-3)  # training changed it


def test_full_export_is_a_transformers_folder(make_job, cli, tmp_path):
    job = make_job("exp-full", method={"name": "full"}, training={"max_steps": 2})
    assert cli("train", job, "--no-ray").code == 0
    out = tmp_path / "full-export"
    assert cli("export", tmp_path / "runs" / "exp-full", "--out", out).code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "exp-full" / "final" / "model")
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.testing.assert_close(logits_of(model, tokenizer), logits_of(trained, tokenizer))


def test_export_refuses_to_overwrite_and_prefix_cannot_merge(make_job, cli, tmp_path):
    job = make_job("exp-prefix", method={"name": "prefix"}, training={"max_steps": 2})
    assert cli("train", job, "--no-ray").code == 0
    run = tmp_path / "runs" / "exp-prefix"
    result = cli("export", run, "--merge", "--out", tmp_path / "m")
    assert result.code == 2 and "prefix adapters cannot be merged" in result.err
    assert not (tmp_path / "m").exists()
    assert cli("export", run, "--out", tmp_path / "a").code == 0
    again = cli("export", run, "--out", tmp_path / "a")
    assert again.code == 2 and "exists and is not empty" in again.err
    assert cli("export", tmp_path / "nope").code == 2


def test_minilm_classification_lora_end_to_end(cli, tmp_path):
    """Real MiniLM weights, a fresh 4-way head, LoRA; eval and merged export agree."""
    from conftest import REPO

    out = tmp_path / "cls"
    job = REPO / "jobs" / "classify-minilm.yaml"
    result = cli("train", job, "--no-ray", f"output.dir={out}", "method.name=lora", "method.lora.rank=8",
                 "training.lr=1e-3", "training.epochs=1", "eval.every=null", "training.threads=2")
    assert result.code == 0, result
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["accuracy"] > 0.8 > summary["before"]["accuracy"]
    assert json.loads((out / "final" / "labels.json").read_text()) == ["food", "sports", "technology", "weather"]
    evaluated = cli("eval", out)
    assert evaluated.code == 0 and "macro_f1" in evaluated.out
    merged = tmp_path / "cls-merged"
    assert cli("export", out, "--merge", "--out", merged).code == 0
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    batch = tokenizer(["Breaking: the striker scored twice in the final.", "The storm caused flooding in the valley."],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in predicted] == ["sports", "weather"]


def test_lora_checkpoint_exports_like_a_run_stopped_there(make_job, cli, tmp_path, tiny_model):
    training = {"max_steps": 4, "checkpoint_every": 2}
    assert cli("train", make_job("ck4", training=training), "--no-ray").code == 0
    assert cli("train", make_job("ck2", training={**training, "max_steps": 2}), "--no-ray").code == 0
    out = tmp_path / "ck-export"
    assert cli("export", tmp_path / "runs" / "ck4", "--checkpoint", "step-0000002", "--merge", "--out", out).code == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    stopped = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                        tmp_path / "runs" / "ck2" / "final" / "adapter").eval()
    torch.testing.assert_close(logits_of(exported, tokenizer), logits_of(stopped, tokenizer), atol=1e-5, rtol=1e-5)
    missing = cli("export", tmp_path / "runs" / "ck4", "--checkpoint", "step-9", "--out", tmp_path / "x")
    assert missing.code == 2 and "no complete checkpoint 'step-9'" in missing.err
