"""`ftcluster tune`: prepare a sweep folder, run the trials with Ray Tune, write what was found.

    SWEEP/sweep.json        job spec, space and options (what `--resume` needs)
    SWEEP/tune/             Ray Tune's experiment state
    SWEEP/trials/<id>/      each trial's run folder (run.yaml, metrics.jsonl, final/, ...)
    SWEEP/leaderboard.json, leaderboard.csv, best.yaml

SWEEP is a path (a shared mount on a cluster) or a storage URI: see ftcluster/sweep/stored.py.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftcluster.config.spec import JobSpec, build_spec, read_yaml
from ftcluster.core.atomic import write_text_atomic
from ftcluster.core.errors import FtError
from ftcluster.core.storage import RemoteFolder, forwarded_settings
from ftcluster.objectives.grpo.rewards import share_reward_code
from ftcluster.sweep.leaderboard import TrialRow, collect_rows, totals, write_best_spec, write_leaderboard
from ftcluster.sweep.pack_tuner import (
    asha_settings,
    pack_space,
    pack_trainable,
    pbt_settings,
    shared_base_problems,
    sweep_packs,
)
from ftcluster.sweep.pbt import pbt_mutations
from ftcluster.sweep.searchers import SEARCHERS, BudgetLimiter, make_searcher
from ftcluster.sweep.space import SearchSpace, parse_space
from ftcluster.sweep.state_signature import SIGNATURE, check_state, sign_state
from ftcluster.sweep.stored import (
    SWEEP_FILE,
    TUNE_DIR,
    clear_sweep,
    is_sweep,
    pull_sweep,
    push_sweep_results,
    sweep_location,
    sweep_remote,
    working_folder,
)
from ftcluster.sweep.trial import SweepSetup, trial_trainable

SCHEDULERS = ("asha", "pbt", "none")


@dataclass
class SweepOptions:
    trials: int | None = None  # None: the grid's size for grid search, else 8
    concurrent: int = 2
    scheduler: str = "asha"
    searcher: str = "random"
    grace_steps: int | None = None  # ASHA: steps before the first cut; None: eval.every
    reduction_factor: float = 2
    max_gpu_hours: float | None = None
    max_cost_usd: float | None = None
    seed: int = 0
    shared_base: int = 1  # LoRA/DoRA trials per process over one base (sweep/packs.py); 1: every trial alone


@dataclass
class Sweep:
    """A prepared (or reloaded) sweep: its folder, the trials' common setup and the options."""

    folder: Path  # where this machine writes: the sweep's folder, or its copy of a URI's
    setup: SweepSetup
    options: SweepOptions
    base_spec: JobSpec = field(repr=False)

    @property
    def location(self) -> str:
        """The sweep's folder as the user names it: a path or a storage URI."""
        return self.setup.location

    @property
    def remote(self) -> RemoteFolder | None:
        return sweep_remote(self.location)

    @property
    def metric(self) -> str:
        return self.base_spec.eval.metric

    @property
    def mode(self) -> str:
        return self.base_spec.eval.mode

    @property
    def trials(self) -> int:
        if self.options.trials is not None:
            return self.options.trials
        return len(self.setup.space.grid_points()) if self.options.searcher == "grid" else 8


@dataclass
class SweepOutcome:
    rows: list[TrialRow]
    totals: dict[str, Any]
    interrupted: bool
    budget_reached: bool
    best_spec: Path | None


def check_options(spec: JobSpec, space: SearchSpace, options: SweepOptions, location: str = "") -> None:
    """Combinations that cannot work, refused before anything starts."""
    problems = []
    if options.scheduler not in SCHEDULERS:
        problems.append(f"--scheduler: {options.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if options.searcher not in SEARCHERS:
        problems.append(f"--searcher: {options.searcher!r} is not one of {', '.join(SEARCHERS)}")
    if options.scheduler in ("asha", "pbt") and spec.eval.every is None:
        problems.append(f"eval.every: the {options.scheduler} scheduler compares trials at evaluations; set eval.every "
                        "(e.g. eval.every=20) or use --scheduler none")
    if options.scheduler == "pbt":
        if not spec.training.checkpoint_every:
            problems.append("training.checkpoint_every: pbt copies checkpoints between trials; set it")
        if spec.scaling.num_workers > 1:
            problems.append("scaling.num_workers: pbt runs one-worker trials (use asha for multi-worker trials)")
        if options.searcher != "random":
            problems.append("--searcher: pbt draws its own population; use --searcher random")
        if options.max_gpu_hours is not None or options.max_cost_usd is not None:
            problems.append("--max-gpu-hours/--max-cost-usd: pbt runs a fixed population; budgets apply with asha or none")
    if options.searcher == "grid" and not space.grid:
        problems.append(f"{space.source}: --searcher grid needs at least one {{grid: [...]}} key")
    if options.searcher == "optuna" and space.grid:
        problems.append(f"{space.source}: --searcher optuna takes choice instead of grid keys")
    problems += shared_base_problems(options, location)
    if options.concurrent < 1 or (options.trials is not None and options.trials < 1):
        problems.append("--concurrent and --trials must be at least 1")
    if problems:
        raise FtError("\n".join(problems))


def prepare_sweep(spec: JobSpec, space_path: Path, options: SweepOptions, location: str | None, force: bool) -> Sweep:
    """Validate everything, then record the sweep in its folder (nothing runs yet)."""
    from ftcluster.launch.launcher import absolute_paths

    spec = absolute_paths(spec)
    share_reward_code(spec.method.grpo)  # before the sweep records the settings its trials get
    base = spec.model_dump(mode="json")
    space_raw = read_yaml(space_path)
    space = parse_space(space_raw, str(space_path), base)
    location = sweep_location(location or Path("runs") / f"{spec.name}-sweep")
    check_options(spec, space, options, location)
    remote, folder = sweep_remote(location), working_folder(location)
    if remote is not None:
        remote.probe_writable()
    if is_sweep(location):
        if not force:
            raise FtError(f"{location}: already holds a sweep; continue it with `ftcluster tune --resume {location}`, "
                          "replace it with --force, or choose --out")
        clear_sweep(location)
    elif remote is not None:  # this machine's stale copy of an earlier sweep at this URI
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"name": spec.name, "job": base, "space_source": str(space_path), "space": space_raw,
              "options": asdict(options)}
    write_text_atomic(folder / SWEEP_FILE, json.dumps(record, indent=1))
    if remote is not None:
        remote.upload(folder / SWEEP_FILE, SWEEP_FILE)
    return load_sweep(location)


def load_sweep(location: str | Path) -> Sweep:
    """The sweep recorded at ``location`` (a URI's is read from the store)."""
    location = sweep_location(location)
    remote, folder = sweep_remote(location), working_folder(location)
    if remote is not None:
        text = remote.read_text(SWEEP_FILE)
        if text is None:
            raise FtError(f"{location}: not a sweep (no {SWEEP_FILE}); pass the --out of a `ftcluster tune` sweep")
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / SWEEP_FILE, text)
    if not (folder / SWEEP_FILE).is_file():
        raise FtError(f"{folder}: not a sweep folder (no {SWEEP_FILE}); pass the folder `ftcluster tune` wrote")
    record = json.loads((folder / SWEEP_FILE).read_text())
    spec = build_spec(record["job"], f"{location}/{SWEEP_FILE}")
    share_reward_code(spec.method.grpo)
    space = parse_space(record["space"], record["space_source"], record["job"])
    setup = SweepSetup(name=f"{record['name']}-sweep", location=location, base=record["job"], space=space,
                       settings=forwarded_settings(keep_here="FTCLUSTER_CACHE"))
    return Sweep(folder, setup, SweepOptions(**record["options"]), spec)


# --- running ---------------------------------------------------------------------------------------


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    options, spec = sweep.options, sweep.base_spec
    if options.scheduler == "asha":
        asha = asha_settings(options, spec)
        return ASHAScheduler(time_attr="step", max_t=asha.max_t, grace_period=asha.grace_period,
                             reduction_factor=asha.reduction_factor)
    if options.scheduler == "pbt":
        mutations = pbt_mutations(sweep.setup.space)
        assert spec.training.checkpoint_every, "check_options requires training.checkpoint_every for pbt"
        return PopulationBasedTraining(time_attr="step", perturbation_interval=spec.training.checkpoint_every,
                                       hyperparam_mutations=mutations)
    return None


def _tuner(sweep: Sweep, resume: bool, trust_state: bool = False):
    from ray import tune

    options, setup = sweep.options, sweep.setup
    packs = sweep_packs(setup, options, sweep.folder, sweep.trials) if options.shared_base > 1 else None
    if packs is not None:
        asha = asha_settings(options, sweep.base_spec) if options.scheduler == "asha" else None
        pbt = pbt_settings(options, sweep.base_spec, setup.space) if options.scheduler == "pbt" else None
        trainable = pack_trainable(setup, packs, asha, pbt)
    else:
        trainable = tune.with_resources(trial_trainable(setup), setup.resources)
    tune_dir = f"{sweep.location}/{TUNE_DIR}"
    if resume:
        if not tune.Tuner.can_restore(tune_dir):
            raise FtError(f"{sweep.location}: no Ray Tune state to resume from (the sweep never started); start it again")
        if not trust_state:
            check_state(tune_dir, read_signature(sweep))
        return tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    param_space = None
    search_alg = None
    scheduler = _scheduler(sweep)
    if packs is not None:  # Tune starts each pack once, first in first out; ASHA ranks a pack's trials inside it
        param_space, scheduler = pack_space(packs), None
    elif options.scheduler == "pbt":  # PBT takes Tune's own variant generator and the domains
        param_space = {p.path: p.domain() for p in sweep.setup.space.sampled}
    else:
        searcher = make_searcher(options.searcher, sweep.setup.space, sweep.metric, sweep.mode, options.seed)
        search_alg = BudgetLimiter(searcher, options.max_gpu_hours, options.max_cost_usd)
    from ftcluster.sweep.progress import SweepProgress

    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=1 if packs is not None else sweep.trials, max_concurrent_trials=options.concurrent,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=sweep.location, verbose=0,
            callbacks=[SweepProgress(sweep.metric, len(packs) if packs is not None else sweep.trials)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )


def run_sweep(sweep: Sweep, resume: bool = False, address: str | None = None, trust_state: bool = False) -> SweepOutcome:
    """Run (or continue) the sweep to the end, or until interrupted; then write its results.

    trust_state: resume from Ray Tune's saved state even when this machine did not sign it (state_signature.py)."""
    from ftcluster.launch.launcher import init_ray

    # Trials report the metric only at evaluations; checkpoints and progress reports come without it.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if sweep.options.shared_base > 1:  # the packs (and whether each fits a device) before Ray starts
        sweep_packs(sweep.setup, sweep.options, sweep.folder, sweep.trials)
    init_ray(address)
    check_sweep_reaches_every_node(sweep)
    tuner = _tuner(sweep, resume, trust_state)
    try:
        tuner.fit()
    finally:  # (interrupted too: what `--resume` will load is signed by this machine)
        write_signature(sweep, sign_state(f"{sweep.location}/{TUNE_DIR}"))
    return finish_sweep(sweep, _interrupted(sweep))


def read_signature(sweep: Sweep) -> str | None:
    if sweep.remote is not None:
        return sweep.remote.read_text(SIGNATURE)
    path = Path(sweep.location) / SIGNATURE
    return path.read_text() if path.is_file() else None


def write_signature(sweep: Sweep, signature: str) -> None:
    if sweep.remote is not None:
        sweep.remote.write_text(signature, SIGNATURE)
    else:
        write_text_atomic(Path(sweep.location) / SIGNATURE, signature)


def check_sweep_reaches_every_node(sweep: Sweep) -> None:
    """A sweep on a path, on a cluster of several nodes, must be on a mount every node sees (as a run's
    output.dir must): trials would otherwise write to whichever node's disk they land on."""
    from ftcluster.launch.launcher import check_output_reaches_every_node

    if sweep.remote is None:
        output = sweep.base_spec.output.model_copy(update={"dir": sweep.location})
        check_output_reaches_every_node(sweep.base_spec.model_copy(update={"output": output}), key="--out")


def _interrupted(sweep: Sweep) -> bool:
    """Whether Tune ended with trials still running or pending (Ctrl+C), from its saved state.

    The saved state, not the returned ResultGrid: Tune marks the trials it tears down on Ctrl+C
    as terminated in memory, while the state it saved for resuming says what they really were.
    """
    # Named by session start time (Tune re-copies old ones): the last is the newest.
    remote = sweep.remote
    if remote is not None:
        names = [n for n in remote.names(TUNE_DIR) if n.startswith("experiment_state-") and n.endswith(".json")]
        newest = remote.read_text(TUNE_DIR, names[-1]) if names else None
    else:
        states = sorted((sweep.folder / TUNE_DIR).glob("experiment_state-*.json"))
        newest = states[-1].read_text() if states else None
    if newest is None:
        return True
    trials = json.loads(newest)["trial_data"]
    statuses = [(json.loads(t[0]) if isinstance(t[0], str) else t[0])["status"] for t in trials]
    return any(status not in ("TERMINATED", "ERROR") for status in statuses)


def finish_sweep(sweep: Sweep, interrupted: bool) -> SweepOutcome:
    """Leaderboard, best.yaml and the W&B sweep table, from the trials' folders (in the store too)."""
    remote = sweep.remote
    if remote is not None:
        pull_sweep(remote, sweep.folder)
    rows = collect_rows(sweep.folder, sweep.metric, sweep.mode, sweep_finished=not interrupted)
    summed = totals(rows)
    options = sweep.options
    budget_reached = (options.max_gpu_hours is not None and summed["gpu_hours"] >= options.max_gpu_hours) or (
        options.max_cost_usd is not None and (summed["cost_usd"] or 0) >= options.max_cost_usd)
    # Ended between two trials: fewer than planned, though neither the budget nor the grid ran out.
    if not interrupted and len(rows) < sweep.trials and not budget_reached:
        interrupted = True
        rows = collect_rows(sweep.folder, sweep.metric, sweep.mode, sweep_finished=False)
    extra = {"sweep": sweep.setup.name, "interrupted": interrupted, "budget_reached": budget_reached,
             "options": asdict(options), "space": sweep.setup.space.source}
    write_leaderboard(sweep.folder, rows, sweep.metric, sweep.mode, extra)
    best = write_best_spec(sweep.folder, rows, sweep.setup.name, f"{sweep.location}/best-run")
    wandb = sweep.base_spec.tracking.wandb
    if wandb is not None and wandb.mode != "disabled" and rows:
        from ftcluster.track.wandb_run import log_sweep_table

        log_sweep_table(wandb, sweep.folder, sweep.setup.name, sweep.metric, rows, summed)
    if remote is not None:
        push_sweep_results(remote, sweep.folder)
    return SweepOutcome(rows, summed, interrupted, budget_reached, best)
