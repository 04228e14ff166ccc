"""The registry is the single source of method, objective and data-format names: the spec accepts exactly
its entries, and a new method and a new format added through it alone (the README's "Extending ftcluster"
recipe) train end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import train_losses, write_jsonl
from safetensors.torch import load_file

from ftcluster.config import registry
from ftcluster.config.spec import build_spec, describe_fields
from ftcluster.core.errors import SpecError
from ftcluster.data.formats import BadRow, Example


def test_the_spec_accepts_exactly_the_registry_names():
    listed = {key: type_name for key, type_name, _, _ in describe_fields()}
    for key, table in (("method.name", registry.METHODS), ("method.objective", registry.OBJECTIVES),
                       ("data.format", registry.FORMATS)):
        assert listed[key].split(" | ") == list(table)
    base = {"name": "t", "model": {"path": "m"}, "data": {"train": "t.jsonl"}}
    for name in registry.METHODS:
        assert build_spec({**base, "method": {"name": name}}).method.name == name
    with pytest.raises(SpecError, match=r"method.name: Input should be one of full \| freeze"):
        build_spec({**base, "method": {"name": "ia3"}})


def test_every_entry_names_an_implementation_that_exists():
    for entry in [*registry.METHODS.values(), *registry.FORMATS.values(), *registry.OBJECTIVES.values()]:
        path = getattr(entry, "apply", None) or getattr(entry, "parse", None) or entry.build
        assert callable(registry.implementation(path)), f"{entry.name}: {path}"


# --- the recipe: a toy method and a toy format, added through the registry alone ----------------------


def train_norms_only(model, method, task, gradient_checkpointing=False):
    """A toy method: only the normalisation weights train."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("norm" in name)
    return model


def parse_question_answer(record, columns, system_prompt) -> Example:
    """A toy format: rows {"q": ..., "a": ...}."""
    if not isinstance(record.get("q"), str) or not isinstance(record.get("a"), str):
        raise BadRow("needs text fields 'q' and 'a'")
    return Example(messages=[{"role": "user", "content": record["q"]}, {"role": "assistant", "content": record["a"]}])


@pytest.fixture
def toy_entries():
    saved = {table: dict(entries) for table, entries in
             ((id(t), t) for t in (registry.METHODS, registry.FORMATS, registry.OBJECTIVES))}
    registry.register(registry.Method("norms", f"{__name__}:train_norms_only", adapters=False))
    registry.register(registry.DataFormat("qa", f"{__name__}:parse_question_answer", ("causal_lm",), "q, a",
                                          generation=True))
    sft = registry.OBJECTIVES["sft"]
    registry.register(dataclasses.replace(sft, formats=(*sft.formats, "qa")))
    yield
    for table in (registry.METHODS, registry.FORMATS, registry.OBJECTIVES):
        table.clear()
        table.update(saved[id(table)])


def test_a_method_and_a_format_added_through_the_registry_train(toy_entries, make_job, cli, tmp_path, tiny_model):
    rows = [{"q": f"What is {a} plus {b}?", "a": str(a + b)} for a in range(8) for b in range(4)]
    train, val = write_jsonl(tmp_path / "qa.jsonl", rows[:28]), write_jsonl(tmp_path / "qa-val.jsonl", rows[28:])
    job = make_job(name="toy", method={"name": "norms"},
                   data={"train": str(train), "validation": str(val), "format": "qa"},
                   training={"max_steps": 6, "lr": 1e-2})
    result = cli("train", job, "--no-ray")
    assert result.code == 0, result
    run = tmp_path / "runs" / "toy"
    losses = train_losses(run)
    assert len(losses) == 6 and losses[-1] < losses[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "completed"
    trained = load_file(run / "final" / "model" / "model.safetensors")
    start = load_file(tiny_model / "model.safetensors")
    changed = {name for name, tensor in trained.items() if not torch.equal(tensor, start[name])}
    assert changed and all("norm" in name for name in changed)  # the toy method trained the norms alone
