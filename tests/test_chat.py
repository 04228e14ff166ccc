"""`ftcluster chat RUN`: the fine-tuned model answers as evaluation saw it, the base model beside it
with --compare, conversations keep their turns, and piped input is read a message per line."""

from __future__ import annotations

import io
import json
import sys

import pytest
import yaml
from conftest import deep_update

EVAL = {"before_after": True, "generation": {"num_prompts": 1, "max_new_tokens": 8}}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model, tiny_data):
    """A LoRA run whose evaluation generated one held-out answer before and after training (module-scoped,
    so built here: conftest's make_job is per test)."""
    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import run_in_process

    folder = tmp_path_factory.mktemp("chat")
    spec = {"name": "chat", "model": {"path": str(tiny_model)},
            "method": {"name": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}},
            "data": {"train": str(tiny_data["train"]), "validation": str(tiny_data["val"]), "format": "instruction",
                     "max_length": 64, "system_prompt": "Answer with the number."},
            "training": {"max_steps": 6, "batch_size": 4, "lr": 3e-2, "threads": 1, "scheduler": "constant"},
            "output": {"dir": str(folder / "run")}}
    deep_update(spec, {"eval": EVAL})
    (folder / "chat.yaml").write_text(yaml.safe_dump(spec))
    job = load_spec(folder / "chat.yaml")
    summary = run_in_process(job)
    return folder / "run", job, summary


def first_question(job) -> str:
    """The user's turn of the first held-out example, as the data format wrote it."""
    from pathlib import Path

    from ftcluster.data.formats import parse_row

    row = json.loads(Path(job.data.validation).read_text().splitlines()[0])
    example = parse_row(row, job.data.format, job.data.columns, job.data.system_prompt)
    return next(m["content"] for m in example.messages if m["role"] == "user")


def test_answers_equal_what_evaluation_generated_before_and_after(finished_run):
    from ftcluster.results.chat import ChatOptions, chat_loop, open_chat

    run, job, summary = finished_run
    samples = summary["samples"]
    assert samples["before"][0]["output"] != samples["after"][0]["output"]  # training changed the answer
    chats = open_chat(run, ChatOptions(max_new_tokens=8, compare=True, single_turn=True), device="cpu")
    [exchange] = chat_loop(chats, [first_question(job)], print)
    assert exchange.answers == [("base", samples["before"][0]["output"].strip()),
                                ("fine-tuned", samples["after"][0]["output"].strip())]


def test_a_conversation_keeps_its_turns_until_reset(finished_run):
    from ftcluster.results.chat import ChatOptions, chat_loop, open_chat

    run, job, _ = finished_run
    [chat] = open_chat(run, ChatOptions(max_new_tokens=4), device="cpu")
    notices: list[str] = []
    question = first_question(job)
    exchanges = list(chat_loop([chat], [question, "and then?", "/reset", question, "/exit", "never read"],
                               notices.append))
    assert [e.message for e in exchanges] == [question, "and then?", question]
    assert notices == ["(conversation forgotten)"] and len(chat.turns) == 2  # only the exchange after /reset
    fresh = open_chat(run, ChatOptions(max_new_tokens=4, single_turn=True), device="cpu")[0].reply(question)
    assert exchanges[0].answers == exchanges[2].answers == [("fine-tuned", fresh)]  # reset means a fresh start


def test_the_prompt_drops_the_oldest_exchanges_when_it_outgrows_the_model(finished_run):
    from ftcluster.core.errors import FtError
    from ftcluster.results.chat import ChatOptions, context_length, open_chat

    run, _, _ = finished_run
    [chat] = open_chat(run, ChatOptions(max_new_tokens=8), device="cpu")
    long_turn = "seven " * (context_length(chat.model) // 4)
    chat.turns = [{"role": "user", "content": long_turn}, {"role": "assistant", "content": "7"}] * 3
    chat.reply("2+2?")
    assert len(chat.turns) < 8 and chat.turns[-2]["content"] == "2+2?"
    with pytest.raises(FtError, match="send a shorter one"):
        chat.reply("seven " * context_length(chat.model))


def test_piped_messages_through_the_cli(finished_run, cli, monkeypatch):
    run, job, summary = finished_run
    question = first_question(job)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{question}\n\n/exit\n"))
    result = cli("chat", run, "--single-turn", "--max-new-tokens", "8")
    assert result.code == 0, result
    assert f"you> {question}" in result.out
    assert f"fine-tuned> {summary['samples']['after'][0]['output'].strip()}" in result.out
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{question}\n"))
    compared = cli("chat", run, "--compare", "--max-new-tokens", "8")
    assert compared.code == 0 and "base" in compared.out and "fine-tuned" in compared.out, compared


def test_a_run_that_is_not_there_is_one_line(cli, tmp_path):
    result = cli("chat", tmp_path / "nothing")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result
    assert json.dumps(str(tmp_path / "nothing"))[1:-1] in result.err
