"""How much compute ASHA saves: the same grid swept twice in one invocation, once run to completion
(every trial trains all its steps) and once with ASHA stopping weak trials at evaluations.

Reported: training steps each sweep spent, the ratio ASHA / full grid (target <= 1/3), each sweep's
best metric, and whether ASHA's best is within 1% of the full grid's best (the point of a sweep).
Steps spent by ASHA are counted up to the moment its best trial first reached that level.

    .venv/bin/python bench/sweep_efficiency.py                  # 16-trial grid, 64 steps each
    .venv/bin/python bench/sweep_efficiency.py --smoke          # 4 trials, a few steps: CI check
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("WANDB_MODE", "disabled")

import yaml  # noqa: E402

from ftcluster.config.spec import load_spec  # noqa: E402
from ftcluster.core.quiet import quiet_libraries  # noqa: E402
from ftcluster.models.tiny import make_tiny_llama  # noqa: E402
from ftcluster.sweep.driver import SweepOptions, prepare_sweep, run_sweep  # noqa: E402
from ftcluster.sweep.leaderboard import read_records  # noqa: E402
from ftcluster.sweep.trial import TRIALS  # noqa: E402


def write_task(folder: Path, steps: int, eval_every: int) -> tuple[Path, Path]:
    """A tiny random Llama learning two-digit addition; a grid over learning rate and LoRA rank."""
    rng = random.Random(0)

    def rows(count: int) -> str:
        lines = []
        for _ in range(count):
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            lines.append(json.dumps({"instruction": f"add {a} and {b}", "output": str(a + b)}))
        return "\n".join(lines) + "\n"

    (folder / "train.jsonl").write_text(rows(512))
    (folder / "val.jsonl").write_text(rows(64))
    model = make_tiny_llama(folder / "tiny-llama")
    job = {
        "name": "efficiency",
        "model": {"path": str(model)},
        "method": {"name": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"train": str(folder / "train.jsonl"), "validation": str(folder / "val.jsonl"),
                 "format": "instruction", "max_length": 48},
        "training": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "log_every": eval_every, "threads": 1,
                     "scheduler": "constant"},
        "eval": {"every": eval_every, "before_after": False, "max_batches": 4},
        "scaling": {"cpus_per_worker": 0.5},
    }
    space = {"training.lr": {"grid": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 2e-2, 4e-2]},
             "method.lora.rank": {"grid": [2, 8]}}
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    return folder / "job.yaml", folder / "space.yaml"


def shrink_space(space_path: Path, trials: int) -> None:
    space = yaml.safe_load(space_path.read_text())
    space["training.lr"]["grid"] = space["training.lr"]["grid"][: max(1, trials // 2)]
    space_path.write_text(yaml.safe_dump(space))


def steps_to_reach(folder: Path, metric: str, target: float) -> tuple[int, float]:
    """Steps all trials had spent when the first evaluation reached `target` (by wall time), and the
    sweep's best metric. Every trial's evaluations, merged in time order."""
    events = []  # (time, trial, step, value)
    for trial in (folder / TRIALS).iterdir():
        steps_done = 0
        for record in read_records(trial):
            if "train_loss" in record:
                steps_done = record["step"]
                events.append((record["time"], trial.name, steps_done, None))
            elif record.get(metric) is not None:
                events.append((record["time"], trial.name, steps_done, record[metric]))
    events.sort()
    spent: dict[str, int] = {}
    best = min(value for *_, value in events if value is not None)
    for _, trial, step, value in events:
        spent[trial] = step
        if value is not None and value <= target:
            return sum(spent.values()), best
    return sum(spent.values()), best


def run(scheduler: str, job: Path, space: Path, out: Path, concurrent: int) -> tuple[Path, float]:
    options = SweepOptions(searcher="grid", scheduler=scheduler, concurrent=concurrent, reduction_factor=4)
    sweep = prepare_sweep(load_spec(job), space, options, out, force=True)
    started = time.perf_counter()
    run_sweep(sweep)
    return sweep.folder, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=64, help="Steps per trial run to completion.")
    parser.add_argument("--eval-every", type=int, default=4, help="Evaluation (and ASHA rung) interval.")
    parser.add_argument("--concurrent", type=int, default=4, help="Trials at once.")
    parser.add_argument("--smoke", action="store_true", help="4 trials, 8 steps: checks the benchmark runs.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.eval_every = 8, 4
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        job, space = write_task(folder, args.steps, args.eval_every)
        if args.smoke:
            shrink_space(space, 4)
        grid_dir, grid_seconds = run("none", job, space, folder / "grid", args.concurrent)
        asha_dir, asha_seconds = run("asha", job, space, folder / "asha", args.concurrent)
        grid_steps, grid_best = steps_to_reach(grid_dir, "val_loss", float("-inf"))
        target = grid_best * 1.01  # within 1% of the full grid's best val_loss
        asha_steps, asha_best = steps_to_reach(asha_dir, "val_loss", target)
        asha_total, _ = steps_to_reach(asha_dir, "val_loss", float("-inf"))
        reached = asha_best <= target
    result = {
        "grid": {"steps": grid_steps, "best": grid_best, "seconds": round(grid_seconds, 1)},
        "asha": {"steps_to_target": asha_steps, "steps_total": asha_total, "best": asha_best, "seconds": round(asha_seconds, 1),
                 "reached_within_1pct": reached},
        "ratio": asha_steps / grid_steps,
    }
    print("| sweep | steps spent | best val_loss | wall s |\n|---|---|---|---|")
    print(f"| full grid (run to completion) | {grid_steps} | {grid_best:.4f} | {grid_seconds:.0f} |")
    print(f"| ASHA (rf 4, same grid) | {asha_steps} to within 1%, {asha_total} in all | {asha_best:.4f} | {asha_seconds:.0f} |")
    print(f"\nASHA / grid steps: {result['ratio']:.3f} (target <= 0.333); within 1% of the grid's best: {reached}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
