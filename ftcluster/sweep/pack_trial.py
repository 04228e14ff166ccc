"""The Ray Tune trial of a shared-base pack: its members are the sweep's trials, trained over one base.

Ray Tune runs one trial per pack (one actor, one base in memory; sweep/packs.py decides the
packs). Each member is a sweep trial to the user: its own folder SWEEP/trials/<pack>-<k>/ with
trial.json, metrics.jsonl, checkpoints (its adapter, optimizer and RNG state; trial.json names the
shared base), final/ adapter, W&B run, leaderboard row, and it can be best.yaml. Tune's scheduler
sees the pack, not the members: ASHA ranks the members with Ray's own `ASHAScheduler`, fed the
members' reports inside the pack (members of other packs are not compared), and a member it stops
leaves the pack while the others go on. PBT runs inside the pack too (`MemberPopulation`: Ray's
synchronous rules over the members): a member in the bottom quantile at a perturbation step
continues from a top member's checkpoint, its adapter a copy of that member's, with that member's
values explored. A pack that cannot share (one ordinary trial) runs as `sweep/trial.run_trial` does.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcluster.config.spec import JobSpec
from ftcluster.core.atomic import write_text_atomic
from ftcluster.core.errors import first_line
from ftcluster.core.worker import WorkerContext
from ftcluster.runs.layout import CHECKPOINTS, TRAINER_STATE, latest_checkpoint
from ftcluster.runs.paths import RunPaths
from ftcluster.sweep.packs import Pack
from ftcluster.sweep.pbt import explore, quantile_size
from ftcluster.sweep.trial import TRIAL_ENDED, TRIAL_INFO, SweepSetup, finished_report, run_trial, write_trial_info
from ftcluster.training.shared_base import COMPLETED, STOPPED, Exploit, PackTrial, step_of, train_pack

RANKED = "ranked.jsonl"  # SWEEP/trials/<pack>.ranked.jsonl: what the pack's ASHA was fed, in order (for --resume)
EXPLOITS = "pbt.jsonl"  # SWEEP/trials/<pack>.pbt.jsonl: the pack's PBT exploits, in order (for --resume)


@dataclass(frozen=True)
class AshaSettings:
    metric: str
    mode: str
    max_t: int
    grace_period: int
    reduction_factor: float


@dataclass(frozen=True)
class PbtSettings:
    metric: str
    mode: str
    interval: int  # perturbation steps: training.checkpoint_every, as for ordinary PBT trials
    mutations: dict[str, Any]  # sweep/pbt.pbt_mutations: Tune domains or a grid's lists
    seed: int


@dataclass(frozen=True)
class _Ranked:
    trial_id: str  # (all Ray's ASHA reads of a trial)


class MemberRanking:
    """Ray's ASHAScheduler over a pack's members, its inputs kept in a file so a resumed pack replays them."""

    def __init__(self, settings: AshaSettings, log: Path):
        from ray.tune.schedulers import ASHAScheduler

        self.asha = ASHAScheduler(time_attr="step", metric=settings.metric, mode=settings.mode, max_t=settings.max_t,
                                  grace_period=settings.grace_period, reduction_factor=settings.reduction_factor)
        self.metric = settings.metric
        self.log = log

    def add(self, member: str) -> None:
        self.asha.on_trial_add(None, _Ranked(member))  # type: ignore[arg-type]

    def should_stop(self, member: str, result: dict[str, Any], record: bool = True) -> bool:
        if result.get(self.metric) is None or "step" not in result:
            return False
        if record:
            with self.log.open("a") as handle:
                handle.write(json.dumps({"member": member, "step": result["step"], self.metric: result[self.metric]}) + "\n")
        return self.asha.on_trial_result(None, _Ranked(member), result) == "STOP"  # type: ignore[arg-type]

    def replay(self, kept_until: dict[str, float]) -> None:
        """Feed what the pack was fed before it stopped, up to each member's resume step, and keep only that
        in the file (the rest comes again as the members continue)."""
        lines = self.log.read_text().splitlines() if self.log.is_file() else []
        kept = []
        for line in lines:
            entry = json.loads(line)
            if entry["step"] <= kept_until.get(entry["member"], 0):
                kept.append(line)
                self.should_stop(entry["member"], entry, record=False)
        write_text_atomic(self.log, "".join(line + "\n" for line in kept))


@dataclass
class Member:
    """A pack member as the sweep sees it: its id, searched values (``chosen``) and all its values, its spec;
    its run in the pack (None once it is done)."""

    member_id: str
    chosen: dict[str, Any]
    values: dict[str, Any]
    spec: JobSpec
    run: PackTrial | None


class MemberPopulation:
    """Ray Tune's synchronous PBT over a pack's members. After the round in which every running member
    reached a perturbation step, each member of the bottom quantile (by its latest metric) continues from a
    random top member's checkpoint of that step with the top member's values explored; each exploit is
    logged, so a resumed pack trains every member with its latest values (`latest_values`)."""

    def __init__(self, settings: PbtSettings, setup: SweepSetup, pack_id: str, members: list[Member], log: Path):
        self.settings, self.setup, self.pack_id, self.log = settings, setup, pack_id, log
        self.by_run = {id(m.run): m for m in members if m.run is not None}
        self.scores: dict[str, tuple[int, float]] = {}  # member id: (step, its latest metric then)
        self.last_round = 0

    def record(self, member: Member, metrics: dict[str, Any]) -> None:
        value = metrics.get(self.settings.metric)
        if value is not None and "step" in metrics and math.isfinite(value):
            self.scores[member.member_id] = (int(metrics["step"]), float(value))

    def exploits(self, running: list[PackTrial]) -> list[Exploit]:
        steps = {step_of(run) for run in running}
        step = steps.pop() if len(steps) == 1 else 0
        if not step or step % self.settings.interval or step <= self.last_round:
            return []
        members = [self.by_run[id(run)] for run in running]
        if any(self.scores.get(m.member_id, (None,))[0] != step for m in members):
            return []  # a member without its metric at this step (the next boundary decides)
        self.last_round = step
        sign = -1.0 if self.settings.mode == "min" else 1.0
        ranked = sorted(members, key=lambda m: sign * self.scores[m.member_id][1])  # worst first
        size = quantile_size(len(ranked))
        rng = random.Random(f"{self.settings.seed}-{self.pack_id}-{step}")
        return [self.exploit(recipient, rng.choice(ranked[-size:]), step, rng) for recipient in ranked[:size]]

    def exploit(self, recipient: Member, donor: Member, step: int, rng: random.Random) -> Exploit:
        chosen = explore(donor.chosen, self.settings.mutations, rng)
        spec = self.setup.spec_for(recipient.member_id, chosen)

        def done() -> None:  # after the copy: a resume then trains the member with its new values
            recipient.chosen, recipient.spec = chosen, spec
            recipient.values = self.setup.space.resolve(chosen, self.setup.base)
            with self.log.open("a") as handle:
                handle.write(json.dumps({"step": step, "member": recipient.member_id, "from": donor.member_id,
                                         "chosen": chosen}, default=str) + "\n")
            write_trial_info(spec, recipient.member_id, recipient.values, "running")

        assert recipient.run is not None and donor.run is not None
        return Exploit(recipient.run, donor.run, spec, done)


def latest_values(log: Path, member_id: str, chosen: dict[str, Any], until: int | None) -> dict[str, Any]:
    """A member's searched values after the exploits logged for it up to its resume step ``until``."""
    if until is None or not log.is_file():
        return chosen
    for entry in map(json.loads, log.read_text().splitlines()):
        if entry["member"] == member_id and entry["step"] <= until:
            chosen = entry["chosen"]
    return chosen


def run_pack(config: dict[str, Any], setup: SweepSetup, packs: list[Pack], asha: AshaSettings | None,
             pbt: PbtSettings | None = None) -> None:
    """The Tune function of a shared-base sweep: the pack ``config["pack"]`` names."""
    pack = packs[config["pack"]]
    if not pack.shared:
        return run_trial(pack.members[0], setup)
    TRIAL_ENDED.clear()
    try:
        _run_pack(pack, setup, asha, pbt)
    finally:
        TRIAL_ENDED.set()


def _run_pack(pack: Pack, setup: SweepSetup, asha: AshaSettings | None, pbt: PbtSettings | None) -> None:
    from ray import tune

    from ftcluster.core.quiet import quiet_libraries

    quiet_libraries()
    for key, value in setup.settings.items():
        os.environ.setdefault(key, value)
    pack_id = tune.get_context().get_trial_id()
    trials_folder = RunPaths.of(setup.spec_for(pack_id, pack.members[0])).local.parent
    exploits_log = trials_folder / f"{pack_id}.{EXPLOITS}"
    members = [pack_member(setup, pack_id, index, chosen, exploits_log) for index, chosen in enumerate(pack.members)]
    ranking = MemberRanking(asha, trials_folder / f"{pack_id}.{RANKED}") if asha is not None else None
    if ranking is not None:
        for member in members:
            ranking.add(member.member_id)
        ranking.replay({m.member_id: math.inf if m.run is None else resume_step(m.spec) or 0 for m in members})
    running = [m for m in members if m.run is not None]
    population = MemberPopulation(pbt, setup, pack_id, running, exploits_log) if pbt is not None else None
    for member in running:
        assert member.run is not None
        member.run.ctx = WorkerContext(report=member_reporter(member, ranking, population))
        write_trial_info(member.spec, member.member_id, member.values, "running")
        write_text_atomic(RunPaths.of(member.spec).local / SHARED_BASE, json.dumps(
            {"pack": pack_id, "adapter": member.run.adapter, "base": member.spec.model.path}, indent=1))
    by_run = {id(m.run): m for m in running}

    def on_leave(run: PackTrial) -> None:
        member = by_run[id(run)]
        write_trial_info(member.spec, member.member_id, member.values, STOPPED if run.outcome == STOPPED else COMPLETED)

    try:
        train_pack([m.run for m in running if m.run is not None], on_leave,
                   population.exploits if population is not None else lambda members: [])
    except Exception as exc:
        for member in running:
            if member.run is not None and member.run.outcome not in (COMPLETED, STOPPED):
                write_trial_info(member.spec, member.member_id, member.values, "error", first_line(exc))
        raise


SHARED_BASE = "shared_base.json"  # in a member's folder: its pack, its adapter's name, the base it trained on


def pack_member(setup: SweepSetup, pack_id: str, index: int, drawn: dict[str, Any], exploits_log: Path) -> Member:
    """Member ``index`` of the pack: to train (from its checkpoint, if it has one, with the values PBT
    gave it by then), or done already."""
    member_id = f"{pack_id}-{index}"
    step = resume_step(setup.spec_for(member_id, drawn))  # (the folder is the member's whatever its values)
    chosen = latest_values(exploits_log, member_id, drawn, step)
    spec = setup.spec_for(member_id, chosen)
    values = setup.space.resolve(chosen, setup.base)
    folder = RunPaths.of(spec).local
    if finished_report(folder, values) is not None or _status(folder) == STOPPED:
        return Member(member_id, chosen, values, spec, None)
    return Member(member_id, chosen, values, spec, PackTrial(spec, WorkerContext(), f"t{index}", resume=step is not None))


def _status(folder: Path) -> str | None:
    try:
        return json.loads((folder / TRIAL_INFO).read_text()).get("status")
    except (OSError, ValueError):
        return None


def resume_step(spec: JobSpec) -> int | None:
    """The step of the member's latest checkpoint (None: it starts from scratch)."""
    checkpoint = latest_checkpoint(RunPaths.of(spec).local / CHECKPOINTS)
    if checkpoint is None or not (checkpoint / TRAINER_STATE).is_file():
        return None
    return int(json.loads((checkpoint / TRAINER_STATE).read_text())["step"])


def member_reporter(member: Member, ranking: MemberRanking | None, population: MemberPopulation | None):
    """A member's reports: ranked by the pack's ASHA (a stop takes it out of the pack) or scored for its PBT,
    passed on to Tune."""
    from ray import tune

    def report(metrics: dict[str, float], checkpoint: Path | None = None) -> None:
        if ranking is not None and member.run is not None and ranking.should_stop(member.member_id, metrics):
            member.run.stop_requested = True
        if population is not None:
            population.record(member, metrics)
        tune.report({**metrics, "member": member.member_id})

    return report
