"""Render examples into token ids with a loss mask (only response tokens are trained).

Conversations go through the tokenizer's chat template; each assistant turn is the text the
template adds between "prompt ending in the assistant header" and "prompt plus that turn",
so the mask follows the template exactly, whatever the model family.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftcluster.data.formats import Example

# Used when a tokenizer has no chat template (base models): an Alpaca-style layout.
PLAIN_ROLE_HEADERS = {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"}


@dataclass
class Encoded:
    """Token ids of one example; ``trained[i]`` says whether token i is a prediction target."""

    input_ids: list[int]
    trained: list[bool]
    label: int | None = None
    truncated: bool = False
    positions: list[int] | None = None  # set for packed sequences: restarts at each example
    rejected: Encoded | None = None  # preference pairs: this is the chosen reply, that the rejected one


def _plain_render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    parts = [PLAIN_ROLE_HEADERS[m["role"]] + m["content"] + "\n\n" for m in messages]
    if add_generation_prompt:
        parts.append(PLAIN_ROLE_HEADERS["assistant"])
    return "".join(parts)


class Renderer:
    """Turns `Example`s into `Encoded` sequences for one tokenizer."""

    def __init__(self, tokenizer, max_length: int, train_on_prompt: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train_on_prompt = train_on_prompt
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def render_messages(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self.has_template:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        return _plain_render(messages, add_generation_prompt)

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """Split a rendered conversation into (text, is_assistant_turn) pieces."""
        pieces: list[tuple[str, bool]] = []
        done = ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, reply = self._prompt_and_reply(messages[:index], message)
            if not prompt.startswith(done):
                raise ValueError("chat template is not prefix-stable; cannot mask prompt tokens")
            pieces += [(prompt[len(done):], False), (reply, True)]
            done = prompt + reply
        return [(text, trained) for text, trained in pieces if text]

    def prompt_text(self, example: Example, shots: list[Example] | None = None) -> tuple[str, str]:
        """The generation prompt (everything before the last assistant turn) and its reference.

        shots: worked examples (whole conversations) placed before it, for a few-shot prompt.
        """
        history, reference = self._history(example, shots)
        return self.render_messages(history, add_generation_prompt=True), reference

    def prompt_and_replies(self, example: Example, replies: list[str],
                           shots: list[Example] | None = None) -> tuple[str, list[str]]:
        """The generation prompt and, for each candidate reply, the text it adds after the prompt:
        exactly what training scores for that reply (the template's end-of-turn or EOS included)."""
        history, _ = self._history(example, shots)
        prompt = self.render_messages(history, add_generation_prompt=True)
        return prompt, [self._prompt_and_reply(history, {"role": "assistant", "content": reply})[1] for reply in replies]

    def _prompt_and_reply(self, history: list[dict[str, str]], reply: dict[str, str]) -> tuple[str, str]:
        """The generation prompt after ``history``, and the text the assistant ``reply`` adds to it
        (the template's end of turn, or EOS without a template, included)."""
        prompt = self.render_messages(history, add_generation_prompt=True)
        full = self.render_messages([*history, reply], add_generation_prompt=False)
        if not self.has_template:
            full += self.tokenizer.eos_token or ""
        if not full.startswith(prompt):
            raise ValueError("chat template is not prefix-stable; cannot mask prompt tokens")
        return prompt, full[len(prompt):]

    @staticmethod
    def _history(example: Example, shots: list[Example] | None) -> tuple[list[dict[str, str]], str]:
        """The turns before the example's last reply (after the shots' turns), and that reply."""
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        system = [m for m in example.messages[:1] if m["role"] == "system"]
        turns = [m for shot in shots or [] for m in shot.messages if m["role"] != "system"]
        history = system + turns + [m for m in example.messages[:last] if m["role"] != "system"]
        return history, example.messages[last]["content"]

    def encode(self, example: Example, label_ids: dict[str, int] | None = None) -> Encoded:
        tokenizer = self.tokenizer
        if example.label is not None:  # classification: the whole text, special tokens included
            assert label_ids is not None, "classification examples need the label ids"
            ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
            return self._cut(Encoded(ids, [False] * len(ids), label=label_ids[example.label]))
        if example.text is not None:  # plain text: trained everywhere, ends with EOS
            ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            return self._cut(Encoded(ids, [True] * len(ids)))
        if example.prompt_only:  # the generation prompt alone: the model writes the rest
            ids = tokenizer(self.prompt_text(example)[0], add_special_tokens=False)["input_ids"]
            return self._cut(Encoded(ids, [False] * len(ids)))
        if example.rejected is not None:
            chosen = self._encode_conversation(example.messages)
            other = [*example.messages[:-1], {"role": "assistant", "content": example.rejected}]
            chosen.rejected = self._encode_conversation(other)
            chosen.truncated = chosen.truncated or chosen.rejected.truncated
            return chosen
        return self._encode_conversation(example.messages)

    def _encode_conversation(self, messages: list[dict[str, str]]) -> Encoded:
        ids, trained = [], []
        for text, is_response in self.segments(messages):
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            trained += [is_response or self.train_on_prompt] * len(piece)
        return self._cut(Encoded(ids, trained))

    def _cut(self, encoded: Encoded) -> Encoded:
        if len(encoded.input_ids) <= self.max_length:
            return encoded
        return Encoded(
            encoded.input_ids[: self.max_length],
            encoded.trained[: self.max_length],
            encoded.label,
            truncated=True,
        )
