"""Online RL with GRPO: the objective by hand, rewards' contract and errors, real runs whose held-out
reward rises, and two workers equal to one with twice the batch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, read_metrics, write_jsonl

from ftcluster.config.spec import load_spec
from ftcluster.objectives.grpo.objective import group_advantages, grpo_token_losses
from ftcluster.objectives.grpo.sampling import SeededSampling, nucleus, prompt_seed
from ftcluster.rewards import answer_tags, exact_answer, number_answer

# --- reward functions the runs below name as test_grpo:FUNCTION -----------------------------------

def share_of_x(prompt: str, completion: str, reference: str | None) -> float:
    """Learnable by a tiny random model: how much of the answer is the letter x."""
    return completion.count("x") / max(len(completion), 1)


def ascii_share(prompt: str, completion: str, reference: str | None) -> float:
    """Differs between a tiny random model's samples from the first step on: a reward with signal."""
    return sum(char.isascii() for char in completion) / max(len(completion), 1)


def explodes(prompt: str, completion: str, reference: str | None) -> float:
    raise ValueError("boom")


def says_words(prompt: str, completion: str, reference: str | None) -> str:
    return "high"


# --- the objective by hand --------------------------------------------------------------------------

def test_group_advantages_are_relative_to_the_group_and_zero_when_it_agrees():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    advantages = group_advantages(rewards)
    assert advantages[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-3)  # mean 0.5, std 0.5
    assert advantages[1].tolist() == [0.0] * 4


def test_grpo_token_losses_match_a_hand_computation():
    # one row, two tokens; advantage +2; old log-probs such that ratios are 1.5 and 0.5
    logps = torch.tensor([[math.log(0.3), math.log(0.2)]])
    old = torch.tensor([[math.log(0.2), math.log(0.4)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.2)]])
    terms = grpo_token_losses(logps, old, torch.tensor([2.0]), clip_eps=0.2, ref_logps=ref, beta=0.1)
    # token 1: ratio 1.5 clipped to 1.2 (positive advantage): -min(3.0, 2.4) = -2.4; token 2: ratio 0.5, -min(1.0, 1.6)
    kl1 = 0.25 / 0.3 - math.log(0.25 / 0.3) - 1
    assert terms["losses"][0].tolist() == pytest.approx([-2.4 + 0.1 * kl1, -1.0 + 0.0])
    assert terms["kl"][0].tolist() == pytest.approx([kl1, 0.0], abs=1e-7)
    assert terms["clipped"][0].tolist() == [1.0, 0.0]
    # a negative advantage clips the other side: ratio 0.5 -> 0.8, -min(-1.0, -1.6) = 1.6
    negative = grpo_token_losses(logps, old, torch.tensor([-2.0]), clip_eps=0.2)
    assert negative["losses"][0].tolist() == pytest.approx([3.0, 1.6])


def test_equal_rewards_in_a_group_give_zero_policy_gradient(tiny_model):
    from conftest import load_causal_lm

    from ftcluster.evaluation.shared_prompt import completion_token_logps, completion_tokens, rollout_batch

    model, tokenizer = load_causal_lm(str(tiny_model))
    batch = rollout_batch([[5, 6]], [[[7, 8 + k] for k in range(4)]], tokenizer.pad_token_id)
    logps = completion_token_logps(model.train(), batch)
    advantages = group_advantages(torch.full((1, 4), 0.7)).flatten()
    terms = grpo_token_losses(logps, logps.detach(), advantages, clip_eps=0.2)
    (terms["losses"] * completion_tokens(batch)).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    terms = grpo_token_losses(completion_token_logps(model, batch), logps.detach(),
                              group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]])).flatten(), clip_eps=0.2)
    (terms["losses"] * completion_tokens(batch)).sum().backward()
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())


def _ragged_rollout(pad_id: int) -> dict[str, torch.Tensor]:
    """Two prompts of different lengths, groups of 3 with completions of different lengths."""
    from ftcluster.evaluation.shared_prompt import rollout_batch

    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    groups = [[[20, 21, 22], [23], [24, 25, 26, 27, 28]], [[29, 30], [31, 32, 33, 34], [35]]]
    return rollout_batch(prompts, groups, pad_id)


def test_completion_logps_equal_a_by_hand_computation_of_each_unpadded_row(tiny_model):
    from conftest import load_causal_lm

    from ftcluster.evaluation.shared_prompt import completion_token_logps

    model, tokenizer = load_causal_lm(str(tiny_model))
    batch = _ragged_rollout(tokenizer.pad_token_id)
    ours = completion_token_logps(model.eval(), batch)
    for row in range(6):
        prompt = batch["prompt_ids"][row // 3][batch["prompt_mask"][row // 3].bool()]
        completion = batch["completion_ids"][row][batch["completion_mask"][row].bool()]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt, completion]).unsqueeze(0)).logits[0].float()
        by_hand = logits[len(prompt) - 1:-1].log_softmax(-1).gather(1, completion.unsqueeze(1)).squeeze(1)
        assert ours[row, :len(completion)].tolist() == pytest.approx(by_hand.tolist(), abs=1e-5)
        assert not ours[row, len(completion):].any()  # padding holds 0


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_shared_prompt_pass_gives_the_log_probabilities_and_gradients_of_running_every_row(tiny_model, method):
    """Each prompt runs once and its cache (with gradients) is repeated to its group: the same values
    and the same gradients as running every row's prompt and completion whole."""
    from conftest import load_causal_lm

    from ftcluster.evaluation.shared_prompt import completion_token_logps

    model, tokenizer = load_causal_lm(str(tiny_model))
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = _ragged_rollout(tokenizer.pad_token_id)
    weights = torch.linspace(-1.0, 1.0, 6).unsqueeze(1)  # a loss that weighs every row differently

    def values_and_gradients(share: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logps = completion_token_logps(model.train(), batch, share_prompts=share)
        (logps * weights).sum().backward()
        return logps.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    shared, shared_grads = values_and_gradients(True)
    whole, whole_grads = values_and_gradients(False)
    assert torch.allclose(shared, whole, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(shared_grads, whole_grads))
    assert any(g.abs().sum() > 0 for g in shared_grads)


def test_prompts_are_shared_unless_the_cache_holds_adapters_or_training_recomputes_it(tiny_model):
    from conftest import load_causal_lm
    from peft import PrefixTuningConfig, get_peft_model

    from ftcluster.evaluation.shared_prompt import can_share_prompts

    model, _ = load_causal_lm(str(tiny_model))
    assert can_share_prompts(model.train())
    model.gradient_checkpointing_enable()
    assert not can_share_prompts(model.train()) and can_share_prompts(model.eval())
    model.gradient_checkpointing_disable()
    prefix = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert not can_share_prompts(prefix)


def test_a_prompts_group_seed_does_not_depend_on_the_worker():
    assert prompt_seed(0, 3, 17) == prompt_seed(0, 3, 17) != prompt_seed(0, 3, 18) != prompt_seed(0, 4, 17)


def test_nucleus_keeps_the_smallest_set_holding_top_p():
    kept = nucleus(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]]), 0.8)
    assert kept.tolist() == [pytest.approx([0.625, 0.375, 0.0, 0.0]), pytest.approx([1.0, 0.0, 0.0, 0.0])]


def test_a_rows_sample_depends_on_its_seed_not_on_the_rows_beside_it():
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    def draws(seeds: list[int], rows: torch.Tensor) -> list[int]:
        sampling = SeededSampling([torch.Generator().manual_seed(seed) for seed in seeds], temperature=1.0, top_p=0.9)
        picked = sampling(torch.zeros(len(seeds), 1, dtype=torch.long), rows)
        assert (picked == 0).sum(dim=1).tolist() == [1] * len(seeds)  # all the mass on one token per row
        return picked.argmax(dim=1).tolist()

    together = draws([7, 8, 9], scores)
    assert draws([8], scores[1:2]) == together[1:2] and draws([9, 7], scores[[2, 0]]) == [together[2], together[0]]


def test_a_group_sampled_from_one_prompt_pass_equals_sampling_every_row_whole(tiny_model, monkeypatch):
    """The group's members share their prompt's attention cache: the same completions as running every
    row's prompt on its own, for prompts of different lengths (left padding)."""
    from types import SimpleNamespace

    from conftest import load_causal_lm

    from ftcluster.objectives.grpo.sampling import GroupSampler

    model, tokenizer = load_causal_lm(str(tiny_model))
    settings = SimpleNamespace(group_size=3, temperature=1.0, top_p=1.0, max_new_tokens=6)
    sampler = GroupSampler(tokenizer, settings, torch.device("cpu"))
    prompts, seeds = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], [101, 202]
    shared = sampler(model, prompts, seeds)
    monkeypatch.setattr(GroupSampler, "_prompt_cache", lambda self, model, ids, mask: {})
    whole = sampler(model, prompts, seeds)
    alone = [sampler(model, [prompt], [seed])[0] for prompt, seed in zip(prompts, seeds)]
    assert shared == whole == alone
    assert len({tuple(c) for group in shared for c in group}) > 2  # the members really differ


def test_built_in_rewards_check_verifiable_answers():
    assert exact_answer("q", " Paris. ", "paris") == 1.0 and exact_answer("q", "It is Paris", "Paris") == 0.0
    assert exact_answer("q", "x", None) == 0.0
    assert number_answer("q", "3 + 4 = 7", "7") == 1.0 and number_answer("q", "7 or 8", "7") == 0.0
    assert answer_tags("q", "so <answer> 42 </answer>", "42") == 1.0
    assert answer_tags("q", "<answer>41</answer>", "42") == 0.5 and answer_tags("q", "42", "42") == 0.0


def test_the_demo_reward_pays_the_answer_alone_and_not_the_answer_glued_to_other_words():
    import sys

    sys.path.insert(0, str(REPO))
    from jobs.rewards import concise_answer

    assert concise_answer("q", " Dublin. ", "Dublin") == 1.0
    assert concise_answer("q", "The capital of Ireland is Dublin.", "Dublin") == pytest.approx(1 / 6)
    assert concise_answer("q", ".orange.red.yellow.red", "orange") == 0.25  # policies once learned these two
    assert concise_answer("q", "poorrustoprophytism", "poor") == 0.0
    assert concise_answer("q", "It is New York, of course", "new york") == pytest.approx(1 / 6)
    assert concise_answer("q", "Paris", "Dublin") == 0.0


# --- real runs -----------------------------------------------------------------------------------------

def prompt_files(folder) -> dict[str, str]:
    """The data section of a GRPO job: 40 training prompts and 8 held-out ones, written to `folder`."""
    words = ["apple", "river", "cloud", "stone", "music", "light", "green", "table", "dream", "ocean"]
    rows = [{"prompt": f"write {word}", "reference": word} for word in words * 4]
    held_out = [{"prompt": f"write {word}s", "reference": f"{word}s"} for word in words[:8]]
    return {"train": str(write_jsonl(folder / "prompts-train.jsonl", rows)),
            "validation": str(write_jsonl(folder / "prompts-val.jsonl", held_out)), "format": "prompts"}


@pytest.fixture
def prompts(tmp_path):
    return prompt_files(tmp_path)


def grpo_job(make_job, name: str, prompts: dict, rewards: list[dict], grpo: dict | None = None, **sections):
    settings = {"group_size": 4, "max_new_tokens": 8, "beta": 0.02, "rewards": rewards, "eval_prompts": 8,
                **(grpo or {})}
    training = {"max_steps": 4, "batch_size": 2, "lr": 1e-2, **sections.pop("training", {})}
    return make_job(name, method={"name": "lora", "objective": "grpo", "grpo": settings,
                                  "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}},
                    data=prompts, training=training, **sections)


def test_a_short_grpo_run_raises_the_held_out_reward(make_job, cli, tmp_path, prompts):
    job = grpo_job(make_job, "grpo-x", prompts, [{"function": "test_grpo:share_of_x"}], grpo={"temperature": 0.5},
                   training={"max_steps": 24, "log_every": 4}, eval={"before_after": True})
    result = cli("train", job, "--no-ray")
    assert result.code == 0, result
    run = tmp_path / "runs" / "grpo-x"
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert before["val_reward"] < 0.2 and after["val_reward"] > 0.8, (before, after)
    assert after["val_reward/share_of_x"] == after["val_reward"]  # one function, weight 1
    logged = [r for r in read_metrics(run) if "reward" in r]
    # Sampling at temperature 0.5 from a nearly flat distribution: the sampled reward moves slowly,
    # while the greedy answer is already all x; the policy moved away from the reference as it learned.
    assert len(logged) == 6 and logged[-1]["reward"] > logged[0]["reward"] and logged[-1]["kl"] > logged[0]["kl"]
    for record in logged:
        # one optimizer step per rollout: the ratio to the sampling policy is exactly 1, nothing is clipped
        assert 0 < record["completion_length"] <= 8 and record["kl"] >= 0 and record["clip_fraction"] == 0
        assert record["sampling_seconds"] > 0 and "reward/share_of_x" in record
    samples = json.loads((run / "eval_after.json").read_text())["samples"]
    assert len(samples) == 8 and {"prompt", "reference", "output", "reward"} <= set(samples[0])


def test_several_steps_per_rollout_use_the_sampling_policys_ratio(make_job, cli, tmp_path, prompts):
    job = grpo_job(make_job, "grpo-mu", prompts, [{"function": "test_grpo:ascii_share"}],
                   grpo={"steps_per_rollout": 2, "clip_eps": 0.05}, training={"max_steps": 6, "log_every": 2})
    assert cli("train", job, "--no-ray").code == 0
    logged = [r for r in read_metrics(tmp_path / "runs" / "grpo-mu") if "reward" in r]
    # The first step of a rollout has ratio 1 (nothing clipped); the second moves away from the sampler.
    assert any(record["clip_fraction"] > 0 for record in logged)


@pytest.mark.integration
def test_two_workers_sample_and_train_as_one_with_twice_the_batch(make_job, cli, tmp_path, prompts):
    """Under Ray with DDP: each prompt's group is seeded by its index, so the rollouts, the losses and
    the logged rewards equal a single worker's with twice the batch."""
    rewards = [{"function": "test_grpo:ascii_share"}]
    one = grpo_job(make_job, "grpo-one", prompts, rewards, training={"batch_size": 4, "max_steps": 3})
    two = grpo_job(make_job, "grpo-two", prompts, rewards, training={"batch_size": 2, "max_steps": 3},
                   scaling={"num_workers": 2})
    assert cli("train", one, "--no-ray").code == 0
    result = cli("train", two)
    assert result.code == 0, result
    logged = {name: [r for r in read_metrics(tmp_path / "runs" / name) if "reward" in r] for name in ("grpo-one", "grpo-two")}
    for key in ("train_loss", "reward", "kl", "completion_length"):
        assert [r[key] for r in logged["grpo-two"]] == pytest.approx([r[key] for r in logged["grpo-one"]], rel=1e-4, abs=1e-7)


def test_rollout_versions_follow_sync_every_and_a_restart_pushes_first():
    from ftcluster.core.worker import WorkerContext
    from ftcluster.launch.rollout_actors import RemoteSampler

    spec = load_spec(REPO / "jobs" / "grpo-smollm2.yaml", ["method.grpo.rollout.workers=1", "method.grpo.rollout.sync_every=3"])
    fresh = RemoteSampler([], spec, WorkerContext())
    assert [fresh.version(r) for r in range(8)] == [0, 0, 0, 3, 3, 3, 6, 6]
    assert fresh.with_logps  # older weights: the actor's own log-probabilities are needed
    restarted = RemoteSampler([], spec, WorkerContext())
    assert [restarted.version(r) for r in (4, 5, 6, 7)] == [4, 4, 6, 6]


def test_rollout_actors_need_ray(make_job, cli, prompts):
    job = grpo_job(make_job, "grpo-noray", prompts, [{"function": "ftcluster.rewards:exact_answer"}],
                   grpo={"rollout": {"workers": 1}})
    result = cli("train", job, "--no-ray")
    assert result.code == 2 and "rollout actors are Ray actors" in result.err and "Traceback" not in result.err


@pytest.mark.parametrize(("function", "message"), [
    ("test_grpo:explodes", "test_grpo:explodes raised ValueError: boom"),
    ("test_grpo:says_words", "reward test_grpo:says_words returned str 'high', not a number, for prompt"),
    ("test_grpo:missing", "test_grpo has no function 'missing'"),
    ("no_such_module:f", "cannot import no_such_module"),
])
def test_a_broken_reward_function_ends_the_run_in_one_line(function, message, make_job, cli, prompts):
    result = cli("train", grpo_job(make_job, "grpo-bad", prompts, [{"function": function}]), "--no-ray")
    assert result.code == 2 and message in result.err and "Traceback" not in result.err, result


def test_grpo_rules_are_validation_errors(make_job, cli, prompts):
    rewards = [{"function": "ftcluster.rewards:exact_answer"}]
    result = cli("validate", make_job("no-rewards", method={"objective": "grpo", "grpo": {}}, data=prompts))
    assert result.code == 2 and "grpo needs rewards" in result.err
    result = cli("validate", grpo_job(make_job, "zero3", prompts, rewards,
                                      distributed={"backend": "deepspeed", "zero_stage": 3}))
    assert result.code == 2 and "use zero_stage 2 or backend ddp" in result.err
    result = cli("validate", grpo_job(make_job, "code", prompts, [{"function": "__import__('os').system('x')"}]))
    assert result.code == 2 and "method.grpo.rewards.0.function" in result.err
    spec = load_spec(grpo_job(make_job, "defaults", prompts, rewards))
    assert (spec.eval.metric, spec.eval.mode) == ("val_reward", "max")


def test_grpo_job_is_valid():
    spec = load_spec(REPO / "jobs" / "grpo-smollm2.yaml")
    assert spec.method.objective == "grpo" and spec.data.format == "prompts"


def test_grpo_with_wandb_tracking_writes_its_samples_table_and_summary(make_job, cli, tmp_path, prompts):
    """A GRPO sample has a reward where a generation sample has a match: W&B's table takes what it holds."""
    from test_tracking import wandb_inspect

    job = grpo_job(make_job, "grpo-wandb", prompts, [{"function": "test_grpo:share_of_x"}], grpo={"eval_prompts": 4},
                   training={"max_steps": 2}, eval={"before_after": True},
                   tracking={"wandb": {"project": "eco", "mode": "offline"}})
    result = cli("train", job, "--no-ray")
    assert result.code == 0, result
    runs = list((tmp_path / "runs" / "grpo-wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary = json.loads(wandb_inspect(runs[0], "--summary", "--json"))
    assert "after/val_reward" in json.dumps(summary)
    records = wandb_inspect(runs[0], "--json")
    assert "eval/samples_after" in records and "eval/samples_before" in records
