"""Shared-base packs: several LoRA trials over one base in one process compute what separate runs do."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import read_metrics

from ftcluster.config.spec import load_spec
from ftcluster.core.interrupts import STOP, Interrupted
from ftcluster.core.worker import WorkerContext
from ftcluster.training.loop import train
from ftcluster.training.shared_base import COMPLETED, STOPPED, PackTrial, train_pack

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


def test_a_trial_stopped_by_asha_leaves_the_others_unchanged(make_job, tmp_path):
    """Ray's ASHA rule ranks the pack's trials at their evaluations; the ones it stops leave the pack
    (their adapters freed) and the others train on exactly as they would alone."""
    from ftcluster.sweep.pack_trial import AshaSettings, MemberRanking

    alone = run_separately(make_job, tmp_path)
    ranking = MemberRanking(AshaSettings("val_loss", "min", max_t=6, grace_period=2, reduction_factor=4),
                            tmp_path / "ranked.jsonl")
    pack = pack_of(make_job, tmp_path)
    for trial in pack:
        ranking.add(trial.adapter)

        def report(metrics, checkpoint=None, trial=trial):
            if ranking.should_stop(trial.adapter, metrics):
                trial.stop_requested = True

        trial.ctx = WorkerContext(report=report)
    left = []
    train_pack(pack, on_leave=lambda trial: left.append((trial.adapter, trial.outcome)))
    stopped = [t for t in pack if t.outcome == STOPPED]
    assert 1 <= len(stopped) < 4 and len(left) == 4
    for trial, folder in zip(pack, alone):
        got, want = losses(Path(trial.spec.output.dir)), losses(folder)
        if trial.outcome == STOPPED:  # what it did before the stop is what it did alone
            assert max(step for step, _, _ in got) < 6 and not (Path(trial.spec.output.dir) / "final").exists()
            want = [entry for entry in want if entry[0] <= max(step for step, _, _ in got)]
        assert_close(got, want)
    assert [entry["member"] for entry in map(json.loads, (tmp_path / "ranked.jsonl").read_text().splitlines())]


def test_an_interrupted_pack_resumes_every_trial_exactly(make_job, tmp_path):
    """SIGINT in the middle of a pack: the trial in its turn finishes its step, every running trial is
    checkpointed where it is, and a pack restarted from the checkpoints ends as an uninterrupted one."""
    alone = run_separately(make_job, tmp_path)
    pack = pack_of(make_job, tmp_path)
    previous = signal.getsignal(signal.SIGINT)
    STOP.install()
    try:
        def interrupt(metrics, checkpoint=None):
            if metrics.get("step") == 4 and "val_loss" in metrics:
                os.kill(os.getpid(), signal.SIGINT)  # arrives mid-pack; handled at the next step boundary

        pack[1].ctx = WorkerContext(report=interrupt)
        with pytest.raises(Interrupted):
            train_pack(pack)
    finally:
        STOP.signum = None
        signal.signal(signal.SIGINT, previous)
    steps = [latest_step(Path(t.spec.output.dir)) for t in pack]
    assert steps in ([4, 4, 3, 3], [4, 4, 4, 3]), steps  # t0 and t1 at step 4; the later ones where they were
    resumed = pack_of(make_job, tmp_path)
    for trial in resumed:
        trial.resume = True
    train_pack(resumed)
    for trial, folder in zip(resumed, alone):
        assert_close(losses(Path(trial.spec.output.dir)), losses(folder))


def test_a_pbt_exploit_copies_one_trials_adapter_into_another(make_job, tmp_path):
    """PBT's exploit inside a pack: at step 3 trial 0 continues from trial 2's checkpoint (its adapter, in
    trial 2's rank, optimizer, schedule, random-number state) with a new learning rate. It then trains
    exactly as a run of those values resumed from that checkpoint alone; the other trials are unchanged."""
    from ftcluster.models.adapter_set import renamed_adapter
    from ftcluster.runs.checkpoints import copy_checkpoint
    from ftcluster.training.shared_base import Exploit

    alone = run_separately(make_job, tmp_path, TRIALS[1:])
    pack = pack_of(make_job, tmp_path)
    explored = {**TRIALS[2], "lr": TRIALS[2]["lr"] * 0.8}
    new_spec = trial_spec(make_job, tmp_path, "pack0", explored)  # trial 0's folder, trial 2's values explored
    done = []

    def exploits(running):
        if done or {t.state.step for t in running} != {3}:
            return []
        done.append(latest_step(Path(pack[2].spec.output.dir)))
        from ftcluster.runs.layout import latest_checkpoint

        source = latest_checkpoint(Path(pack[2].spec.output.dir) / "checkpoints")
        reference = trial_spec(make_job, tmp_path, "reference", explored)  # the same, alone
        copy_checkpoint(source, Path(reference.output.dir) / "checkpoints", renamed_adapter("t2", "default"))
        return [Exploit(pack[0], pack[2], new_spec, lambda: done.append("continued"))]

    train_pack(pack, exploits=exploits)
    assert done == [3, "continued"] and [t.outcome for t in pack] == [COMPLETED] * 4
    assert pack[0].spec is new_spec
    reference = trial_spec(make_job, tmp_path, "reference", explored)
    train(reference, WorkerContext(), resume=True, verbose=False)
    got = losses(Path(pack[0].spec.output.dir))
    assert_close([entry for entry in got if entry[0] > 3], [e for e in losses(Path(reference.output.dir)) if e[0] > 3])
    assert [entry for entry in got if entry[0] <= 3] != [entry for entry in losses(Path(pack[2].spec.output.dir))
                                                        if entry[0] <= 3]  # (its own steps before the exploit)
    for trial, folder in zip(pack[1:], alone):
        assert_close(losses(Path(trial.spec.output.dir)), losses(folder))
    adapter = json.loads((Path(pack[0].spec.output.dir) / "final" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == TRIALS[2]["rank"]


def latest_step(folder: Path) -> int:
    return int((folder / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))


def test_the_planner_counts_the_shared_base_once(cli):
    """`ftcluster plan` says how many trials fit a device either way; a pack too big for one is refused."""
    from conftest import REPO

    from ftcluster.planning.shared_base import pack_memory, pack_problem

    spec = load_spec(REPO / "jobs" / "quickstart.yaml",
                     ["scaling.use_gpu=true", "scaling.gpu_type=H100", "scaling.gpu_memory_gb=4"])
    memory = pack_memory(spec)
    assert memory is not None and memory.shared + memory.per_trial == pytest.approx(memory.separate)
    assert memory.fit_separate() == 1 and memory.fit_shared() > 50  # the base (and one step's activations) once
    assert pack_problem([spec] * 8) is None
    problem = pack_problem([spec] * (memory.fit_shared() + 1))
    assert problem is not None and problem.startswith("--shared-base: a pack of") and "fit" in problem
    assert pack_memory(load_spec(REPO / "jobs" / "quickstart.yaml", ["method.name=full"])) is None
    result = cli("plan", REPO / "jobs" / "quickstart.yaml", "scaling.use_gpu=true", "scaling.gpu_type=H100",
                 "scaling.gpu_memory_gb=4")
    assert result.code == 0 and "1 as separate trials" in result.out and f"{memory.fit_shared()} sharing one base" in result.out
