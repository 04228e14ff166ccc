"""What `ftcluster tune --shared-base N` changes in the Tune set-up: one Tune trial per pack.

Why: a pack's trials share a base in one actor (sweep/pack_trial.py), so Tune starts packs, not
trials. The trials' values are drawn up front by the sweep's searcher (random or grid) and
recorded with their packs in SWEEP/packs.json, which `--resume` reuses.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from ftcluster.config.spec import JobSpec
from ftcluster.core.errors import FtError
from ftcluster.core.storage import is_uri
from ftcluster.planning.shared_base import pack_problem
from ftcluster.sweep.pack_trial import AshaSettings, PbtSettings, run_pack
from ftcluster.sweep.packs import Pack, base_key, draw_trials, make_packs, read_packs, write_packs
from ftcluster.sweep.pbt import pbt_mutations
from ftcluster.sweep.space import SearchSpace, trial_spec
from ftcluster.sweep.trial import SweepSetup, trial_trainable


class SweepOptions(Protocol):
    """The options of sweep/driver.py's `SweepOptions` read here."""

    shared_base: int
    scheduler: str
    searcher: str
    grace_steps: int | None
    reduction_factor: float
    max_gpu_hours: float | None
    max_cost_usd: float | None
    seed: int


def shared_base_problems(options: SweepOptions, location: str) -> list[str]:
    """What --shared-base cannot be combined with, one line each."""
    if options.shared_base == 1:
        return []
    if options.shared_base < 1:
        return ["--shared-base: must be at least 1 (1: every trial alone)"]
    problems = []
    if options.searcher == "optuna":
        problems.append("--shared-base: a pack's trials are drawn before it starts; use --searcher random or grid")
    if options.max_gpu_hours is not None or options.max_cost_usd is not None:
        problems.append("--shared-base: --max-gpu-hours/--max-cost-usd stop new trials, and a pack starts its "
                        "trials together; set --trials instead")
    if is_uri(location):
        problems.append(f"--shared-base: the sweep must be in a folder (a mount every node sees on a cluster), "
                        f"not a storage URI ({location})")
    return problems


def asha_settings(options: SweepOptions, spec: JobSpec) -> AshaSettings:
    """ASHA's rungs: first at --grace-steps (default eval.every), up to training.max_steps."""
    grace_period = options.grace_steps or spec.eval.every
    assert grace_period is not None, "check_options requires eval.every for asha"
    return AshaSettings(spec.eval.metric, spec.eval.mode, spec.training.max_steps or 10**9, grace_period,
                        options.reduction_factor)


def pbt_settings(options: SweepOptions, spec: JobSpec, space: SearchSpace) -> PbtSettings:
    """PBT inside each pack: perturbations at checkpoints, as ordinary PBT; keys the members must share
    (what shapes the base) never perturbed."""
    assert spec.training.checkpoint_every, "check_options requires training.checkpoint_every for pbt"
    return PbtSettings(spec.eval.metric, spec.eval.mode, spec.training.checkpoint_every,
                       pbt_mutations(space, held=base_key(spec)), options.seed)


def sweep_packs(setup: SweepSetup, options: SweepOptions, folder: Path, trials: int) -> list[Pack]:
    """The sweep's packs: recorded ones (a resumed sweep), else drawn now, with one line per group."""
    packs = read_packs(folder)
    if packs is not None:
        return packs
    drawn = draw_trials(setup.space, options.searcher, trials, options.seed)
    packs, lines = make_packs(setup.space, setup.base, drawn, options.shared_base)
    for pack in (pack for pack in packs if pack.shared):
        problem = pack_problem([trial_spec(setup.space, setup.base, chosen) for chosen in pack.members])
        if problem is not None:
            raise FtError(problem)
    for line in lines:
        Console(highlight=False).print(line, soft_wrap=True)
    write_packs(folder, packs)
    return packs


def pack_trainable(setup: SweepSetup, packs: list[Pack], asha: AshaSettings | None, pbt: PbtSettings | None = None):
    """The Tune trainable of a shared-base sweep, with each pack's resources (one trial's)."""
    from ray import tune

    trainable = trial_trainable(setup, run_pack, packs=packs, asha=asha, pbt=pbt)
    return tune.with_resources(trainable, functools.partial(pack_resources, setup, packs))


def pack_resources(setup: SweepSetup, packs: list[Pack], config: dict[str, Any]):
    """A pack reserves what one of its trials would: its trials share one process and device."""
    return setup.resources(packs[config["pack"]].members[0])


def pack_space(packs: list[Pack]) -> dict[str, Any]:
    from ray import tune

    return {"pack": tune.grid_search(list(range(len(packs))))}
