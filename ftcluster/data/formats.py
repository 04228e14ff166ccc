"""Row formats: check one row and turn it into an `Example` (conversation or text, or label).

Each format's registry entry (`config/registry.py`) names its parser here.

A row that cannot be used raises `BadRow` with the reason; the caller counts and reports it
with its file and line, then skips it or fails (``data.on_bad_row``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftcluster.config.registry import FORMATS, implementation
from ftcluster.config.spec import ColumnSpec
from ftcluster.data.readers import unparsable_reason

ROLES = ("system", "user", "assistant")


class BadRow(ValueError):
    """This row cannot be used; the message says why."""


@dataclass
class Example:
    """A format-independent training example.

    messages: a conversation (instruction and chat formats) whose assistant turns are trained;
    text: plain text trained everywhere (text format) or classified (classification format).
    """

    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None
    label: str | None = None
    rejected: str | None = None  # preference format: the dispreferred reply to the same prompt
    prompt_only: bool = False  # prompts format: the model answers it (online RL); the last turn is a reference

    @property
    def reference(self) -> str | None:
        """The reply a prompt-and-answer example expects (its last assistant turn); None for other kinds
        and for a prompt without a reference answer."""
        if self.rejected is not None:
            return None
        replies = [m["content"] for m in self.messages if m["role"] == "assistant"]
        return replies[-1] if replies and replies[-1] else None

    @property
    def prompt(self) -> str:
        """The last user turn: what a prompts row asked."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def _text_field(record: dict[str, Any], key: str, *, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise BadRow(f"missing field {key!r}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise BadRow(f"field {key!r} must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise BadRow(f"field {key!r} is empty")
    return value


def parse_instruction(record: dict[str, Any], columns: ColumnSpec, system_prompt: str | None) -> Example:
    instruction = _text_field(record, columns.instruction)
    extra = _text_field(record, columns.input, required=False)
    output = _text_field(record, columns.output)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Example(messages=messages)


def parse_chat(record: dict[str, Any], columns: ColumnSpec, system_prompt: str | None) -> Example:
    messages = record.get(columns.messages)
    if messages is None:
        raise BadRow(f"missing field {columns.messages!r}")
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"field {columns.messages!r} must be a non-empty list of {{role, content}}")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRow(f"{columns.messages}[{index}]: needs role in {ROLES}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise BadRow(f"{columns.messages}[{index}]: content must be non-empty text")
        clean.append({"role": message["role"], "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise BadRow("conversation has no assistant turn to learn from")
    if system_prompt and clean[0]["role"] != "system":
        clean.insert(0, {"role": "system", "content": system_prompt})
    return Example(messages=clean)


def parse_text(record: dict[str, Any], columns: ColumnSpec, system_prompt: str | None) -> Example:
    return Example(text=_text_field(record, columns.text))


def parse_classification(record: dict[str, Any], columns: ColumnSpec, system_prompt: str | None) -> Example:
    text = _text_field(record, columns.text)
    if columns.label not in record or record[columns.label] is None or record[columns.label] == "":
        raise BadRow(f"missing field {columns.label!r}")
    label = record[columns.label]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise BadRow(f"field {columns.label!r} must be a string or integer, got {type(label).__name__}")
    return Example(text=text, label=str(label))


def parse_preference(record: dict[str, Any], columns: ColumnSpec, system_prompt: str | None) -> Example:
    prompt = _text_field(record, columns.prompt)
    chosen = _text_field(record, columns.chosen)
    rejected = _text_field(record, columns.rejected)
    if chosen == rejected:
        raise BadRow("chosen and rejected are the same text: nothing to prefer")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}]
    return Example(messages=messages, rejected=rejected)


def parse_prompts(record: dict[str, Any], columns: ColumnSpec, system_prompt: str | None) -> Example:
    prompt = _text_field(record, columns.prompt)
    reference = record.get(columns.reference)
    if reference is not None and (isinstance(reference, bool) or not isinstance(reference, (str, int, float))):
        raise BadRow(f"field {columns.reference!r} must be text or a number, got {type(reference).__name__}")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": "" if reference is None else str(reference)}]
    return Example(messages=messages, prompt_only=True)


def parse_row(values: Any, data_format: str, columns: ColumnSpec, system_prompt: str | None) -> Example:
    reason = unparsable_reason(values)
    if reason:
        raise BadRow(reason)
    if not isinstance(values, dict):
        raise BadRow(f"expected an object with fields, got {type(values).__name__}")
    return implementation(FORMATS[data_format].parse)(values, columns, system_prompt)
