"""Choice scoring: options ranked by their log-likelihood after the prompt, checked by hand and end to end."""

from __future__ import annotations

import contextlib
import json
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import load_causal_lm, write_jsonl

from ftcluster.data.dataset import DataBundle, DataReport
from ftcluster.data.formats import Example
from ftcluster.data.render import Renderer
from ftcluster.evaluation.choices import answer_choices, evaluate_choices, score_options, scored_text
from ftcluster.models.load import load_tokenizer, resolve_model


def qa(question: str, answer: str, system: str | None = None) -> Example:
    turns = [{"role": "system", "content": system}] if system else []
    return Example(messages=[*turns, {"role": "user", "content": question}, {"role": "assistant", "content": answer}])


@torch.no_grad()
def by_hand(model, prompt: list[int], option: list[int]) -> float:
    """One unpadded sequence, no cache: the sum of the option's token log-probabilities."""
    logprob = F.log_softmax(model(input_ids=torch.tensor([prompt + option])).logits[0].float(), -1)
    return sum(float(logprob[len(prompt) - 1 + j, token]) for j, token in enumerate(option))


@pytest.mark.parametrize("adapter", ["none", "lora", "prefix"])
def test_choice_scores_equal_a_by_hand_computation(tiny_model, adapter):
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    model, tokenizer = load_causal_lm(str(tiny_model))
    torch.manual_seed(0)
    if adapter == "lora":  # random adapter weights, so the adapters change every score
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    elif adapter == "prefix":  # its virtual tokens ride in the cache: the whole-sequence path
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.eval()
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [encode(text) for text in ("add 1 and 2 =", "add 10 and 20, then say it =", "x")]
    options = [encode(text) for text in ("3", "thirty", "not sure at all")]
    expected = torch.tensor([[by_hand(model, p, o) for o in options] for p in prompts])
    paths = [None] if adapter == "prefix" else [True, False]  # (None: the path the model calls for)
    for shared in paths:
        scores = score_options(model, prompts, options, torch.device("cpu"), tokenizer.pad_token_id, shared)
        assert scores.logprob == pytest.approx(expected, abs=1e-4), shared
        assert scores.tokens.tolist() == [len(o) for o in options]


def test_answer_choices_are_found_only_in_a_closed_set():
    def bundle(answers: list[str], val: list[str]) -> DataBundle:
        return DataBundle([], [], [qa("q", a) for a in val], None, DataReport(), answer_counts=dict(Counter(answers)))

    closed = SimpleNamespace(choices=None, max_choices=20)
    assert answer_choices(bundle(["yes", "no ", "no", "yes"], ["no"]), closed) == ["no", "yes"]
    assert answer_choices(bundle(["yes", "no", "yes"], ["no"]), closed) is None  # "no" seen once
    assert answer_choices(bundle(["yes", "no"] * 3, ["maybe"]), closed) is None  # a validation answer outside
    assert answer_choices(bundle([str(i) for i in range(30)] * 2, ["1"]), closed) is None  # too many
    assert answer_choices(bundle(["yes", "no"] * 3, ["no"]), SimpleNamespace(choices=None, max_choices=0)) is None
    given = SimpleNamespace(choices=[" positive", "negative"], max_choices=0)
    assert answer_choices(bundle([], ["x"]), given) == ["positive", "negative"]


def test_end_of_turn_is_scored_only_where_a_choice_begins_another(tiny_model):
    tokenizer = load_tokenizer(resolve_model(str(tiny_model)), None)
    renderer = Renderer(tokenizer, 256)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    _, ends = renderer.prompt_and_replies(qa("q", "a"), ["yes", "no"])
    assert ends == ["yes<|im_end|>\n", "no<|im_end|>\n"]  # what training scores for each reply
    assert scored_text(ends, ["yes", "no"], encode) == ["yes", "no"]
    _, ends = renderer.prompt_and_replies(qa("q", "a"), ["pos", "positive"])
    assert scored_text(ends, ["pos", "positive"], encode) == ends


def test_a_base_model_that_answers_in_prose_ranks_the_right_choice():
    """SmolLM2-135M-Instruct answers "This movie review is positive." (no exact match) yet, asked for its
    likelihoods, ranks the right word first."""
    from ftcluster.evaluation.metrics import evaluate_generation

    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    reviews = [("an absolute delight from start to finish", "positive"), ("I loved every minute of it", "positive"),
               ("a wonderful, moving film", "positive"), ("brilliant acting and a great story", "positive"),
               ("the best movie I have seen this year", "positive"), ("funny, warm and beautifully shot", "positive"),
               ("a boring mess that wasted my evening", "negative"), ("I hated it and walked out", "negative"),
               ("terrible acting and a dull plot", "negative"), ("the worst film of the year", "negative"),
               ("painfully slow and badly written", "negative"), ("an awful, forgettable disaster", "negative")]
    examples = [qa(f"Is this movie review positive or negative?\n\nReview: {text}.", label) for text, label in reviews]
    renderer = Renderer(tokenizer, 256)
    device = torch.device("cpu")
    generated = evaluate_generation(model, tokenizer, renderer, examples, len(examples), 8, device)
    settings = SimpleNamespace(choice_score="sum")
    chosen = evaluate_choices(model, tokenizer, renderer, examples, ["positive", "negative"], settings, device,
                              contextlib.nullcontext, batch_size=8)
    assert generated["exact_match"] <= 0.25, [s["output"] for s in generated["samples"]]
    assert chosen["choice_accuracy"] >= 0.75 and chosen["choice_accuracy"] >= generated["exact_match"] + 0.5
    assert chosen["choice"]["examples"] == 12 and sum(map(sum, chosen["choice"]["confusion_matrix"])) == 12


def test_a_closed_set_task_is_choice_scored_before_and_after_training(make_job, cli, tmp_path):
    rng = random.Random(0)
    words = {"good": "positive", "great": "positive", "fun": "positive", "bad": "negative", "dull": "negative",
             "awful": "negative"}

    def rows(count: int) -> list[dict]:
        picked = [rng.choice(sorted(words)) for _ in range(count)]
        return [{"instruction": f"review: a {word} film", "output": words[word]} for word in picked]

    train, val = write_jsonl(tmp_path / "train.jsonl", rows(48)), write_jsonl(tmp_path / "val.jsonl", rows(12))
    job = make_job("choices", data={"train": str(train), "validation": str(val)}, method={"name": "full"}, training={"max_steps": 60, "lr": 3e-3},
                   eval={"before_after": True, "few_shot_baseline": 2,
                         "generation": {"num_prompts": 4, "max_new_tokens": 4}})
    result = cli("train", job, "--no-ray")
    assert result.code == 0, result
    out = tmp_path / "runs" / "choices"
    summary = json.loads((out / "summary.json").read_text())
    for when in ("before", "after"):  # found in the data: no eval.choices needed
        assert 0 <= summary[when]["choice_accuracy"] <= 1 and "choice_accuracy_norm" in summary[when]
    assert summary["after"]["choice_accuracy"] >= 0.9  # six words, two answers: learnt in 60 steps
    assert "choice_accuracy" in summary["few_shot"]
    details = json.loads((out / "eval_after.json").read_text())["choice"]
    assert details["choices"] == ["negative", "positive"] and details["examples"] == 12
    assert "Fine-tune vs prompt" in result.out and "choice accuracy" in result.out
    evaluated = cli("eval", out)
    assert evaluated.code == 0 and "choice_accuracy" in evaluated.out


def test_choices_need_prompts_with_answers(make_job, cli):
    result = cli("validate", make_job("nochoice", data={"format": "text"}, eval={"choices": ["a", "b"]}))
    assert result.code == 2 and "eval.choices scores answers to prompts" in result.err
    twice = cli("validate", make_job("twice", eval={"choices": ["a", "a "]}))
    assert twice.code == 2 and "each choice must differ" in twice.err
