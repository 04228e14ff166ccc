"""Shared-base packs: several LoRA trials over one base in one process compute what separate runs do."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_metrics

from ftcluster.config.spec import load_spec
from ftcluster.core.worker import WorkerContext
from ftcluster.training.loop import train
from ftcluster.training.shared_base import COMPLETED, PackTrial, train_pack

# Four trials: different ranks, alphas, learning rates, batch sizes, seeds; LoRA dropout on (its masks
# come from each trial's own random-number state).
TRIALS = [
    {"rank": 2, "alpha": 4, "lr": 1e-3, "batch_size": 4, "seed": 0},
    {"rank": 4, "alpha": 8, "lr": 3e-3, "batch_size": 2, "seed": 1},
    {"rank": 8, "alpha": 8, "lr": 1e-2, "batch_size": 4, "seed": 2},
    {"rank": 4, "alpha": 16, "lr": 5e-4, "batch_size": 3, "seed": 3},
]


def trial_spec(make_job, tmp_path: Path, name: str, values: dict, **extra):
    job = make_job(name, method={"name": "lora", "lora": {"rank": values["rank"], "alpha": values["alpha"],
                                                          "dropout": 0.1}},
                   training={"max_steps": 6, "lr": values["lr"], "batch_size": values["batch_size"],
                             "seed": values["seed"], "scheduler": "cosine", "warmup_steps": 2,
                             "checkpoint_every": 3, **extra.get("training", {})},
                   eval={"every": 2, "before_after": False})
    return load_spec(job)


def losses(folder: Path) -> list[tuple[int, str, float]]:
    return [(r["step"], key, r[key]) for r in read_metrics(folder) for key in ("train_loss", "val_loss") if key in r]


def assert_close(got, want, rel=1e-4):
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in want]
    for (step, key, a), (_, _, b) in zip(got, want):
        assert a == pytest.approx(b, rel=rel), (step, key, a, b)


def run_separately(make_job, tmp_path, trials=TRIALS):
    folders = []
    for index, values in enumerate(trials):
        spec = trial_spec(make_job, tmp_path, f"alone{index}", values)
        train(spec, WorkerContext(), verbose=False)
        folders.append(Path(spec.output.dir))
    return folders


def pack_of(make_job, tmp_path, prefix="pack", trials=TRIALS) -> list[PackTrial]:
    return [PackTrial(trial_spec(make_job, tmp_path, f"{prefix}{i}", values), WorkerContext(), f"t{i}")
            for i, values in enumerate(trials)]


def test_pack_of_four_lora_trials_equals_four_separate_runs(make_job, tmp_path):
    alone = run_separately(make_job, tmp_path)
    pack = pack_of(make_job, tmp_path)
    train_pack(pack)
    assert [t.outcome for t in pack] == [COMPLETED] * 4
    for trial, folder in zip(pack, alone):
        assert_close(losses(Path(trial.spec.output.dir)), losses(folder))
        assert (Path(trial.spec.output.dir) / "final" / "adapter" / "adapter_config.json").is_file()
