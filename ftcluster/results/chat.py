"""`ftcluster chat RUN`: talk to a finished run's fine-tuned model; with --compare, its base model
answers the same turns beside it.

Prompts are rendered exactly as training and evaluation rendered them (the run's tokenizer, its chat
template, `data.system_prompt`), so what you read here is what `eval.generation` scored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftcluster.config.registry import METHODS
from ftcluster.core.errors import FtError
from ftcluster.data.render import Renderer
from ftcluster.evaluation.metrics import base_model_view
from ftcluster.runs.export import load_base, load_finetuned

RESET, EXIT = "/reset", "/exit"
COMMANDS = f"{RESET} forgets the conversation, {EXIT} (or end of input) quits"


@dataclass
class ChatOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy, as evaluation generates
    top_p: float = 1.0
    system: str | None = None  # replaces the run's data.system_prompt
    single_turn: bool = False  # every message starts a new conversation (as single-turn training data)
    compare: bool = False
    seed: int = 0


@dataclass
class Conversation:
    """One model's side of a chat: the turns so far, and how to answer the next one."""

    name: str
    model: Any
    renderer: Renderer
    options: ChatOptions
    view: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # the base model's view of a PEFT model
    system: list[dict[str, str]] = field(default_factory=list)
    turns: list[dict[str, str]] = field(default_factory=list)

    def reply(self, text: str) -> str:
        """The model's answer to the user's `text` after the turns so far (kept unless single-turn)."""
        ids, turns = self._fitting([*self.turns, {"role": "user", "content": text}])
        answer = self._generate(ids)
        if not self.options.single_turn:
            self.turns = [*turns, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        self.turns = []

    def _fitting(self, turns: list[dict[str, str]]) -> tuple[list[int], list[dict[str, str]]]:
        """The rendered prompt's tokens, and the turns it holds: when it outgrows the model's context
        (less the answer's tokens), the oldest exchanges leave the conversation first."""
        tokenizer, limit = self.renderer.tokenizer, context_length(self.model) - self.options.max_new_tokens
        while True:
            text = self.renderer.render_messages([*self.system, *turns], add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= limit:
                return ids, turns
            if len(turns) <= 1:
                raise FtError(f"the message is {len(ids)} tokens with the prompt; the model takes {limit} before "
                              f"its answer ({context_length(self.model)} minus --max-new-tokens "
                              f"{self.options.max_new_tokens}); send a shorter one")
            turns = turns[2:]

    @torch.no_grad()
    def _generate(self, ids: list[int]) -> str:
        tokenizer, options = self.renderer.tokenizer, self.options
        device = next(self.model.parameters()).device
        sampling = options.temperature > 0
        if sampling:
            torch.manual_seed(options.seed)
        inputs = torch.tensor([ids], device=device)
        with self.view():
            out = self.model.generate(
                input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=options.max_new_tokens,
                do_sample=sampling, pad_token_id=tokenizer.pad_token_id,
                **({"temperature": options.temperature, "top_p": options.top_p} if sampling else {}))
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def context_length(model) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def open_chat(run: str | Path, options: ChatOptions, device: str = "auto") -> list[Conversation]:
    """The run's fine-tuned model (and, with options.compare, its base model) ready to chat.

    A PEFT run's base model is the same model with its adapters switched off; a full fine-tune's
    base is loaded beside it.
    """
    model, tokenizer, spec = load_finetuned(run)
    if spec.model.task != "causal_lm":
        raise FtError(f"chat: {run} is a {spec.model.task} run (model.task); chat needs a text-generating model. "
                      "Score it with `ftcluster eval`")
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    renderer = Renderer(tokenizer, spec.data.max_length, spec.data.train_on_prompt)
    system_text = options.system if options.system is not None else spec.data.system_prompt
    system = [{"role": "system", "content": system_text}] if system_text else []

    def conversation(name: str, candidate, view=contextlib.nullcontext) -> Conversation:
        return Conversation(name, candidate.to(target).eval(), renderer, options, view, system)

    chats = [conversation("fine-tuned", model)]
    if options.compare:
        if METHODS[spec.method.name].adapters:
            chats.insert(0, conversation("base", model, lambda: base_model_view(model)))
        else:
            chats.insert(0, conversation("base", load_base(spec)))
    return chats


@dataclass
class Exchange:
    """What one message got back: each model's answer, in the order of the conversations."""

    message: str
    answers: list[tuple[str, str]]


def chat_loop(chats: list[Conversation], messages: Iterable[str], notice: Callable[[str], None]) -> Iterator[Exchange]:
    """Answer each message with every model; RESET and EXIT are commands, blank lines are skipped."""
    for raw in messages:
        message = raw.strip()
        if not message:
            continue
        if message == EXIT:
            return
        if message == RESET:
            for chat in chats:
                chat.reset()
            notice("(conversation forgotten)")
            continue
        try:
            yield Exchange(message, [(chat.name, chat.reply(message)) for chat in chats])
        except FtError as exc:  # one message too long: say so, and the chat goes on
            notice(f"error: {exc}")
