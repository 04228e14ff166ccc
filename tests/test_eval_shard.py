"""Evaluation split over workers: each scores its share, every worker ends with the whole set's metrics.

Two real processes in a gloo group (a file store, sockets on the loopback interface), no Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load_causal_lm

from ftcluster.data.formats import Example
from ftcluster.data.render import Renderer
from ftcluster.evaluation.choices import evaluate_choices
from ftcluster.evaluation.generation import Generator
from ftcluster.evaluation.metrics import evaluate_generation, evaluate_loss, loss_sum, replies_after
from ftcluster.evaluation.shard import WHOLE, EvalShard, longest_first
from ftcluster.evaluation.suite import loss_and_answers

SYSTEM = "You are a careful calculator. Answer with the number only, nothing else."
SETTINGS = SimpleNamespace(choice_score="sum")
GENERATION = SimpleNamespace(generation=SimpleNamespace(num_prompts=7, max_new_tokens=4), batch_size=2)


def examples() -> list[Example]:
    """Seven sums of different lengths (shares of 4 and 3 under two workers)."""
    pairs = [(1, 2), (10, 20), (3, 4), (100, 200), (5, 5), (1000, 2000), (7, 1)]
    return [Example(messages=[{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": f"add {a} and {b} ="},
                              {"role": "assistant", "content": str(a + b)}]) for a, b in pairs]


def evaluate_everything(model_path: str, shard: EvalShard) -> dict:
    """Loss, generation and choice scoring of `examples()` on this worker's share; and what it ran."""
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(model_path)
    renderer = Renderer(tokenizer, 128, False)
    data = examples()
    calls: list[tuple[int, bool]] = []  # rows of every forward pass, and whether it was a loss's (no cache kept)
    model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(
        (kwargs["input_ids"].shape[0], kwargs.get("use_cache") is False)), with_kwargs=True)
    device = torch.device("cpu")
    nothing = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    loss = evaluate_loss(model, [renderer.encode(e) for e in data], 2, tokenizer.pad_token_id, device, nothing,
                         shard=shard)
    loss_rows = sum(rows for rows, scored in calls if scored)
    generated = evaluate_generation(model, tokenizer, renderer, data, len(data), 4, device, batch_size=2, shard=shard)
    choices = sorted({e.reference for e in data})[:4]
    chosen = evaluate_choices(model, tokenizer, renderer, [e for e in data if e.reference in choices], choices,
                              SETTINGS, device, nothing, 4, shard=shard)
    both = loss_and_answers(model, tokenizer, renderer, [renderer.encode(e) for e in data], data, GENERATION, device,
                            nothing, 2, shard, loss_sum)
    return {"loss": loss, "outputs": [s["output"] for s in generated["samples"]], "exact_match": generated["exact_match"],
            "choice": chosen["choice"]["confusion_matrix"], "choice_accuracy": chosen["choice_accuracy"],
            "loss_rows": loss_rows, "forward_calls": len(calls),
            "both": {"val_loss": both["val_loss"], "outputs": [s["output"] for s in both["samples"]]}}


def worker(rank: int, world: int, store: str, lockstep: bool, model_path: str, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(store, world), rank=rank,
                                         world_size=world)
    try:
        result = evaluate_everything(model_path, EvalShard(rank, world, lockstep=lockstep))
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("lockstep", [False, True])
def test_two_workers_score_their_shares_and_get_the_whole_sets_metrics(lockstep, tiny_model, tmp_path):
    whole = evaluate_everything(str(tiny_model), WHOLE)
    torch.multiprocessing.spawn(worker, args=(2, str(tmp_path / "store"), lockstep, str(tiny_model), str(tmp_path)),
                                nprocs=2)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["loss"]["val_loss"] == pytest.approx(whole["loss"]["val_loss"], rel=1e-5)
        assert result["outputs"] == whole["outputs"] and result["exact_match"] == whole["exact_match"]
        assert result["choice"] == whole["choice"] and result["choice_accuracy"] == whole["choice_accuracy"]
        # Loss and answers from one prompt pass: the same as each on its own (sharded too).
        assert result["both"]["val_loss"] == pytest.approx(whole["loss"]["val_loss"], rel=1e-5)
        assert result["both"]["outputs"] == whole["outputs"]
    # Each worker ran the loss on its own share only: 4 and 3 of the 7 examples.
    assert sorted(r["loss_rows"] for r in results) == [3, 4] and whole["loss_rows"] == 7
    if lockstep:  # ZeRO-3: every forward pass is a collective, so both ran as many
        assert results[0]["forward_calls"] == results[1]["forward_calls"]


def test_a_shared_prompt_beginning_is_run_once_and_changes_nothing(tiny_model, monkeypatch):
    import ftcluster.evaluation.generation as generation
    import ftcluster.evaluation.metrics as evaluate
    from ftcluster.models.chunked_loss import chunked_loss_sum, output_head

    model, tokenizer = load_causal_lm(str(tiny_model))
    renderer = Renderer(tokenizer, 128, False)
    prompts = [tokenizer(renderer.prompt_text(e)[0], add_special_tokens=False)["input_ids"] for e in examples()]
    items = [renderer.encode(e) for e in examples()]
    chunked = lambda model, batch: chunked_loss_sum(model, batch, output_head(model))  # noqa: E731
    nothing = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731

    def run() -> tuple:
        shared = Generator(model, tokenizer, 6, torch.device("cpu"))
        shared.share_prefix(prompts)
        outputs = [shared(batch) for batch in longest_first(prompts, 3, len)]
        losses = [evaluate_loss(model, items, 3, tokenizer.pad_token_id, torch.device("cpu"), nothing, loss_fn=fn)
                  for fn in (evaluate.loss_sum, chunked)]
        return shared.prefix, outputs, losses

    prefix, outputs, losses = run()
    assert prefix is not None and prefix.length >= generation.MIN_SHARED_PREFIX  # the system prompt, at least
    used = []
    monkeypatch.setattr(generation.PrefixCache, "continued", lambda self, batch, real=generation.PrefixCache.continued:
                        used.append(1) or real(self, batch))
    assert run()[2] == losses and used  # the loss ran on the tails after the cached prefix
    monkeypatch.setattr(generation, "MIN_SHARED_PREFIX", 10**6)  # nothing shared: every token computed per batch
    unshared, plain_outputs, plain_losses = run()
    assert unshared is None and plain_outputs == outputs
    for shared_loss, plain_loss in zip(losses, plain_losses):
        assert shared_loss["val_loss"] == pytest.approx(plain_loss["val_loss"], rel=1e-5)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_one_prompt_pass_serves_the_loss_and_the_answers(shared_prefix, tiny_model, monkeypatch):
    import ftcluster.evaluation.generation as generation
    from ftcluster.models.chunked_loss import chunked_loss_sum, output_head

    if not shared_prefix:
        monkeypatch.setattr(generation, "MIN_SHARED_PREFIX", 10**6)
    model, tokenizer = load_causal_lm(str(tiny_model))
    renderer = Renderer(tokenizer, 128, False)
    data, cpu = examples(), torch.device("cpu")
    items = [renderer.encode(e) for e in data]
    nothing = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    chunked = lambda model, batch: chunked_loss_sum(model, batch, output_head(model))  # noqa: E731
    tokens: list[int] = []  # tokens every forward pass computed (cached ones not counted)
    model.register_forward_pre_hook(lambda _, args, kwargs: tokens.append(kwargs["input_ids"].numel()),
                                    with_kwargs=True)
    settings = SimpleNamespace(generation=SimpleNamespace(num_prompts=5, max_new_tokens=4), batch_size=3)
    for loss_fn in (loss_sum, chunked):
        tokens.clear()
        apart = {**evaluate_loss(model, items, 3, tokenizer.pad_token_id, cpu, nothing, loss_fn=loss_fn),
                 **evaluate_generation(model, tokenizer, renderer, data, 5, 4, cpu, batch_size=3)}
        separate_tokens = sum(tokens)
        tokens.clear()
        # Five of the seven examples are prompted: their loss comes from the prompt pass, the rest's on its own.
        both = loss_and_answers(model, tokenizer, renderer, items, data, settings, cpu, nothing, 3, WHOLE, loss_fn)
        assert both["val_loss"] == pytest.approx(apart["val_loss"], rel=1e-5)
        assert both["val_perplexity"] == pytest.approx(apart["val_perplexity"], rel=1e-5)
        assert both["samples"] == apart["samples"] and both["exact_match"] == apart["exact_match"]
        # What the loss no longer recomputes: the prompts' own tokens (after the shared prefix, if any).
        prompts = [tokenizer(renderer.prompt_text(e)[0], add_special_tokens=False)["input_ids"] for e in data[:5]]
        shared = next((i for i, column in enumerate(zip(*prompts)) if len(set(column)) > 1), 0) if shared_prefix else 0
        assert separate_tokens - sum(tokens) > 0.8 * sum(len(ids) - shared for ids in prompts)


def test_the_prompt_pass_is_shared_only_where_each_example_is_its_prompt_and_a_reply(tiny_model):
    _, tokenizer = load_causal_lm(str(tiny_model))
    renderer = Renderer(tokenizer, 128, False)
    data = examples()[:3]
    prompts = [tokenizer(renderer.prompt_text(e)[0], add_special_tokens=False)["input_ids"] for e in data]
    replies = replies_after(prompts, [renderer.encode(e) for e in data])
    assert replies is not None
    # Each reply is what training scores after the prompt: the answer and the end of the turn.
    assert [tokenizer.decode([t for t, trained in zip(r.input_ids, r.trained) if trained]) for r in replies] == [
        f"{e.reference}<|im_end|>\n" for e in data]
    two_turns = [Example(messages=[*e.messages, {"role": "user", "content": "and again?"},
                                   {"role": "assistant", "content": e.reference}]) for e in data]
    # A second assistant turn: the prompt asks for the last one, the loss scores the first one too.
    assert replies_after([tokenizer(renderer.prompt_text(e)[0], add_special_tokens=False)["input_ids"]
                          for e in two_turns], [renderer.encode(e) for e in two_turns]) is None
    assert replies_after(prompts, [renderer.encode(e) for e in data[:2]]) is None  # fewer items than prompts
    assert replies_after(prompts, [renderer.encode(e) for e in reversed(data)]) is None  # another example's prompt


def test_batches_are_length_sorted_longest_first():
    batches = longest_first(["a", "bbbb", "cc", "ddd", "e"], 2, len)
    assert batches == [["bbbb", "ddd"], ["cc", "a"], ["e"]]


def test_max_examples_and_batch_size_bound_every_evaluation(tiny_model):
    from ftcluster.config.spec import EvalSpec
    from ftcluster.data.dataset import DataBundle, DataReport
    from ftcluster.evaluation.suite import EvalContext, run_eval

    model, tokenizer = load_causal_lm(str(tiny_model))
    renderer = Renderer(tokenizer, 128, False)
    data = examples()
    bundle = DataBundle(train=[], val=[renderer.encode(e) for e in data], val_examples=data, label_names=None,
                        report=DataReport(), answer_counts={e.reference: 2 for e in data})
    settings = EvalSpec(generation={"num_prompts": 7, "max_new_tokens": 2}, max_examples=3, batch_size=2,
                        choices=sorted({e.reference for e in data}))
    batches: list[int] = []
    model.register_forward_pre_hook(lambda _, args, kwargs: batches.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    metrics = run_eval(model, EvalContext(tokenizer, bundle, renderer, settings, 8, torch.device("cpu"),
                                          lambda: torch.autocast("cpu", enabled=False)))
    assert len(metrics["samples"]) == 3 and metrics["choice"]["examples"] == 3  # the first 3 examples only
    assert max(batches) <= 2 * len(settings.choices)  # (choice scoring runs batch x choices rows)
    # Loss and answers: the shared prefix once, then 2 of the 3 examples (prompts, their replies, decoding).
    assert batches[:4] == [1, 2, 2, 2]


def test_generation_batch_default_is_larger_on_cpu_and_changes_no_answer(tiny_model, monkeypatch):
    import ftcluster.evaluation.suite as suite
    from ftcluster.config.spec import EvalSpec

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    defaults = EvalSpec(generation={"num_prompts": 7, "max_new_tokens": 6})
    assert suite.generation_batch_size(defaults, cpu) == suite.CPU_GENERATION_BATCH >= 48  # the quickstart's, at once
    assert suite.generation_batch_size(defaults, gpu) == suite.GENERATION_BATCH == 16
    assert suite.generation_batch_size(defaults.model_copy(update={"batch_size": 3}), cpu) == 3  # the setting wins

    model, tokenizer = load_causal_lm(str(tiny_model))
    renderer = Renderer(tokenizer, 128, False)
    rows: list[int] = []
    model.register_forward_pre_hook(lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    nothing = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731

    def answers(settings) -> list[str]:
        rows.clear()
        return [s["output"] for s in suite.generate_and_match(model, tokenizer, renderer, examples(), settings, cpu,
                                                              nothing)["samples"]]

    whole = answers(defaults)
    assert max(rows) == len(examples())  # every prompt in one batch on CPU
    for batch in (1, 2, 3):  # the same greedy answers, however the prompts are batched
        assert answers(defaults.model_copy(update={"batch_size": batch})) == whole
        assert max(rows) == batch
    monkeypatch.setattr(suite, "CPU_GENERATION_BATCH", 2)  # the default is what generation uses
    assert answers(defaults) == whole and max(rows) == 2


def test_answers_that_have_ended_leave_the_batch_and_the_others_are_unchanged(tiny_model, monkeypatch):
    import ftcluster.evaluation.generation as generation

    model, tokenizer = load_causal_lm(str(tiny_model))
    renderer = Renderer(tokenizer, 128, False)
    prompts = [tokenizer(renderer.prompt_text(e)[0], add_special_tokens=False)["input_ids"] for e in examples()]
    cpu = torch.device("cpu")
    rows: list[int] = []
    model.register_forward_pre_hook(lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)

    def answer(round_tokens: int) -> list[str]:
        monkeypatch.setattr(generation, "ROUND_TOKENS", round_tokens)
        rows.clear()
        generator = generation.Generator(model, tokenizer, 8, cpu)
        return generator(prompts)

    # The random model's end-of-answer token: one it writes early in some answers, not in all.
    monkeypatch.setattr(model.generation_config, "eos_token_id", None)
    written = [model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist() for ids in prompts]
    counts = {token: sum(token in answer[:4] for answer in written) for answer in written for token in answer[:4]}
    stop = next(token for token, count in sorted(counts.items(), key=lambda kv: kv[1]) if 0 < count < len(prompts))
    monkeypatch.setattr(model.generation_config, "eos_token_id", stop)
    whole = answer(10**6)  # one generate() call: every row runs until the last one ends
    assert set(rows[1:]) == {len(prompts)}
    assert answer(2) == whole  # rounds of 2 tokens: the same answers
    assert min(rows) < len(prompts)  # after the first round, the rows that had ended were gone
