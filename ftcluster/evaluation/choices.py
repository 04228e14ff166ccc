"""Choice scoring: when a prompt's answer is one of a few known options, rank the options by likelihood.

Exact match asks a model to produce the answer word for word; a base model that answers in prose
fails it even when it knows the answer. Here every option is scored by the log-probability the
model gives it right after the prompt, and the best-scored option is the prediction: accuracy,
per-class precision/recall/F1 and a confusion matrix, comparable between the base, few-shot and
fine-tuned models. An option is scored as its own words, tokenized as training tokenizes replies;
the template's end-of-turn is scored too only where one option's tokens begin another's
(`scored_text`).

Each prompt is run once; its attention cache is copied to every option, and all options of a batch
of prompts are scored in one more forward pass. Methods whose adapters live in the attention cache
(prefix tuning) score prompt+option sequences whole instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ftcluster.data.dataset import DataBundle
from ftcluster.data.formats import Example
from ftcluster.data.render import Renderer
from ftcluster.evaluation.metrics import classification_metrics, eval_mode, normalize_answer
from ftcluster.evaluation.shard import WHOLE, EvalShard, longest_first
from ftcluster.evaluation.shared_prompt import completion_token_logps, rollout_batch


def answer_choices(bundle: DataBundle, eval_spec) -> list[str] | None:
    """The options to score: `eval.choices`, else the training answers when they form a closed set
    (at most `eval.max_choices` distinct ones, each seen twice or more, covering every validation answer)."""
    if eval_spec.choices:
        return [normalize_answer(choice) for choice in eval_spec.choices]
    if not eval_spec.max_choices or not bundle.answer_counts or not bundle.val_examples:
        return None
    counts: Counter[str] = Counter()
    for answer, seen in bundle.answer_counts.items():
        counts[normalize_answer(answer)] += seen
    if not 2 <= len(counts) <= eval_spec.max_choices or min(counts.values()) < 2:
        return None
    if any(normalize_answer(e.reference or "") not in counts for e in bundle.val_examples):
        return None
    return sorted(counts)


@dataclass
class ChoiceScores:
    """Per prompt and option: the summed log-probability of the option's tokens, and their count."""

    logprob: torch.Tensor  # (prompts, options)
    tokens: torch.Tensor  # (options,) or (prompts, options): each option's token count

    def predictions(self, score: str) -> list[int]:
        values = self.logprob if score == "sum" else self.logprob / self.tokens
        return values.argmax(-1).tolist()


@torch.no_grad()
def score_options(model, prompts: list[list[int]], options: list[list[int]], device, pad_id: int,
                  share_prompt_cache: bool | None = None) -> ChoiceScores:
    """Log-probabilities of every option after every prompt (token ids; options may differ in length):
    each prompt runs once and its options share its attention cache, as GRPO's groups do."""
    batch = rollout_batch(prompts, [options] * len(prompts), pad_id)
    on_device = {key: value.to(device) for key, value in batch.items()}
    logprob = completion_token_logps(model, on_device, share_prompt_cache).sum(-1).view(len(prompts), len(options))
    return ChoiceScores(logprob.float().cpu(), torch.tensor([len(option) for option in options]))


def scored_text(continuations: list[str], choices: list[str], encode: Callable[[str], list[int]]) -> list[str]:
    """What is scored of each choice: its own words, without the template's end-of-turn (a base model that
    would go on talking is not penalised for it), unless one choice's tokens begin another's: then the
    end-of-turn is what tells "pos" from "positive", and every choice keeps it."""
    words = []
    for continuation, choice in zip(continuations, choices):
        found = continuation.find(choice)
        words.append(continuation[: found + len(choice)] if found >= 0 else continuation)
    ids = [encode(text) for text in words]
    ambiguous = any(a != b and b[: len(a)] == a for a in ids for b in ids)
    return continuations if ambiguous else words


def _regroup(groups: dict[tuple[str, ...], list[int]], choices: list[str], encode) -> dict[tuple[str, ...], list[int]]:
    merged: dict[tuple[str, ...], list[int]] = {}
    for continuations, rows in groups.items():
        merged.setdefault(tuple(scored_text(list(continuations), choices, encode)), []).extend(rows)
    return merged


def evaluate_choices(model, tokenizer, renderer: Renderer, examples: list[Example], choices: list[str], eval_spec,
                     device, autocast: Callable, batch_size: int, shots: list[Example] | None = None,
                     shard: EvalShard = WHOLE) -> dict:
    """Choice accuracy (sum and length-normalised), per-class scores and the confusion matrix
    (every worker scores its share of the examples; the scores are gathered)."""
    index = {choice: i for i, choice in enumerate(choices)}
    scored = [e for e in examples if normalize_answer(e.reference or "") in index]
    if not scored:
        return {}
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]  # (as training tokenizes each piece)

    def rendered(example: Example) -> tuple[list[int], tuple[str, ...]]:
        """The prompt's ids, and the options as the template renders them after it."""
        prompt, continuations = renderer.prompt_and_replies(example, choices, shots)
        return encode(prompt), tuple(continuations)

    def spare() -> tuple[tuple[str, ...], list[list[int]], list[int]]:
        prompt, continuations = rendered(scored[0])
        return next(iter(_regroup({continuations: [0]}, choices, encode))), [prompt], []

    mine = shard.part(scored)
    prompts: list[list[int]] = []
    groups: dict[tuple[str, ...], list[int]] = {}  # option texts: most templates render them the same after every prompt
    for row, example in enumerate(mine):
        prompt, continuations = rendered(example)
        prompts.append(prompt)
        groups.setdefault(continuations, []).append(row)
    per_batch = max(1, batch_size // len(choices))
    batches = [(texts, [prompts[i] for i in rows], rows) for texts, members in _regroup(groups, choices, encode).items()
               for rows in longest_first(members, per_batch, lambda i: len(prompts[i]))]
    logprob, tokens = torch.empty(len(mine), len(choices)), torch.empty(len(mine), len(choices))
    with eval_mode(model), autocast():
        for (texts, batch_prompts, rows), real in shard.batches(batches, spare):
            result = score_options(model, batch_prompts, [encode(t) for t in texts], device, tokenizer.pad_token_id)
            if real:
                logprob[rows], tokens[rows] = result.logprob, result.tokens.float()
    mine_actual = [index[normalize_answer(e.reference or "")] for e in mine]
    gathered = shard.gather([(logprob[i].tolist(), tokens[i].tolist(), mine_actual[i]) for i in range(len(mine))])
    scores = ChoiceScores(torch.tensor([g[0] for g in gathered]), torch.tensor([g[1] for g in gathered]))
    actual = [g[2] for g in gathered]
    by_sum, by_mean = scores.predictions("sum"), scores.predictions("mean")
    primary = by_sum if eval_spec.choice_score == "sum" else by_mean
    details = classification_metrics(primary, actual, choices)
    return {
        "choice_accuracy": sum(p == a for p, a in zip(by_sum, actual)) / len(actual),
        "choice_accuracy_norm": sum(p == a for p, a in zip(by_mean, actual)) / len(actual),
        "choice_macro_f1": details["macro_f1"],
        "choice": {"choices": choices, "score": eval_spec.choice_score, "examples": len(actual),
                   "skipped": len(examples) - len(scored), "per_class": details["per_class"],
                   "confusion_matrix": details["confusion_matrix"]},
    }
