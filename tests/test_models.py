"""Model references: aliases of offline-installed models, GGUF conversion cached by file hash."""

import shutil
import time
from pathlib import Path

import pytest

from ftcluster.core.errors import ModelError
from ftcluster.models.load import locate_model, resolve_alias, resolve_model


def test_minilm_alias_is_a_folder():
    path = locate_model("minilm-l6")
    assert (path / "config.json").is_file()


def test_unknown_paths_are_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match=r"model\.path: not found: \./missing"):
        resolve_model("./missing")
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"has no config\.json"):
        resolve_model(str(tmp_path / "empty"))
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").local is False  # a hub id


@pytest.mark.slow
@pytest.mark.integration  # converts the real 135M GGUF (over a minute on 2 cores)
def test_gguf_converts_once_and_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "cache"))
    first = resolve_model("smollm2-135m-instruct")
    assert Path(first.source).parent == tmp_path / "cache" / "gguf"
    copy = tmp_path / "renamed.gguf"
    shutil.copy(resolve_alias("smollm2-135m-instruct"), copy)
    started = time.perf_counter()
    again = resolve_model("smollm2-135m-instruct")
    assert again == first and time.perf_counter() - started < 5
    # The cache key is the content hash, not the name (the folder name carries the stem for people).
    assert resolve_model(str(copy)).source.split("-")[-1] == first.source.split("-")[-1]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(first.source)
    model = AutoModelForCausalLM.from_pretrained(first.source)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        answer = tokenizer.decode(model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert "Paris" in answer
