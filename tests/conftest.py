"""Shared fixtures: a tiny random-init Llama, small data files, job specs and a CLI runner."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from ftcluster.models.tiny import arithmetic_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

REPO = Path(__file__).resolve().parent.parent

# Test modules whose tests start Ray, subprocesses or several end-to-end runs: the `integration`
# tier. `make check` runs the rest (units, validation, single short runs) in under three minutes.
INTEGRATION_MODULES = {
    "test_distributed", "test_ray", "test_submit", "test_sweep", "test_quickstart", "test_recipes", "test_dpo",
    "test_bench", "test_tracking", "test_invariance", "test_forgetting", "test_export", "test_report",
    "test_storage", "test_multinode", "test_choices", "test_harness", "test_shared_base_sweep",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama with a byte tokenizer, saved as a Hugging Face folder."""
    from ftcluster.models.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(folder / "train.jsonl", arithmetic_rows(64, 0)),
        "val": write_jsonl(folder / "val.jsonl", arithmetic_rows(16, 1)),
    }


def load_causal_lm(path: str):
    """A causal LM and its tokenizer as ftcluster loads them (float32, eval mode): for tests that score by hand."""
    import torch

    from ftcluster.models.load import load_pretrained, load_tokenizer, resolve_model

    resolved = resolve_model(path)
    tokenizer = load_tokenizer(resolved, None)
    model = load_pretrained(resolved, "causal_lm", dtype=torch.float32, label_names=None,
                            pad_token_id=tokenizer.pad_token_id, revision=None)
    return model.eval(), tokenizer


def deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture
def make_job(tmp_path, tiny_model, tiny_data):
    """Write a job spec for the tiny model; keyword sections are merged into the defaults."""

    def make(name: str = "tiny", **sections) -> Path:
        spec = {
            "name": name,
            "model": {"path": str(tiny_model)},
            "method": {"name": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}},
            "data": {"train": str(tiny_data["train"]), "validation": str(tiny_data["val"]),
                     "format": "instruction", "max_length": 64},
            "training": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 1, "threads": 1,
                         "scheduler": "constant"},
            "eval": {"before_after": False},
            "output": {"dir": str(tmp_path / "runs" / name)},
        }
        deep_update(spec, sections)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return make


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, err={self.err[-2000:]!r})"


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the real `ftcluster` entry point in this process; returns exit code and output."""
    from ftcluster.cli.app import main
    from ftcluster.launch.session import CHILD_ENV

    monkeypatch.setenv(CHILD_ENV, "1")  # in this process, for capsys: no child in a session of its own

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["ftcluster", *map(str, args)])
        capsys.readouterr()
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run_dir) if "train_loss" in r]
