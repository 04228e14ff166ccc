"""Weights & Biases logging, main worker only. Offline by default: the run is written under
OUTPUT/wandb and uploaded later with `wandb sync`; online when WANDB_API_KEY is in the environment
(mode auto, the default: a cluster's pods get the key from a Secret) or the spec says online.
The key is never put in configs, logs or run files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, cast

from ftcluster.core.atomic import write_text_atomic
from ftcluster.core.errors import FtError

RUN_ID_FILE = "wandb_run_id"
OPEN_RUNS: set[str] = set()  # this process's open runs (a shared-base pack has one per trial)


class NoTracker:
    """Used when tracking.wandb is not set (and on workers other than the main one)."""

    def log(self, record: dict[str, Any]) -> None: ...

    def samples_table(self, name: str, samples: list[dict]) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...

    def end_early(self, summary: dict[str, Any], failed: bool) -> None:
        """The run ended before its summary (stopped, failed, interrupted): close what was logged."""


Mode = Literal["online", "offline", "disabled"]
MODES: tuple[Mode, ...] = ("online", "offline", "disabled")


def wandb_mode(settings) -> Mode:
    """The mode a run uses: the spec's, or for auto WANDB_MODE, else online with a key, else offline."""
    mode = settings.mode
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode not in MODES:
        raise FtError(f"WANDB_MODE={mode}: not one of {', '.join(MODES)}")
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise FtError("tracking.wandb.mode: online needs WANDB_API_KEY in the environment "
                      "(never in the spec); or use mode: offline and `wandb sync` later")
    return cast(Mode, mode)


class WandbTracker(NoTracker):
    def __init__(self, spec, out_dir: Path, resume: bool):
        import wandb

        settings = spec.tracking.wandb
        mode = wandb_mode(settings)
        id_file = out_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group,
            tags=settings.tags,
            mode=mode,
            name=spec.name,
            id=run_id,
            resume="allow" if run_id else None,
            dir=str(out_dir),
            config=spec.model_dump(mode="json"),
            # create_new: a pack's trials each have a run of their own, open at the same time.
            settings=wandb.Settings(console="off", quiet=True, reinit="create_new"),
        )
        OPEN_RUNS.add(self.run.id)
        write_text_atomic(id_file, self.run.id + "\n")
        self.closed = False

    def log(self, record: dict[str, Any]) -> None:
        values = {k: v for k, v in record.items() if k not in ("step", "time") and v is not None}
        self.run.log(values, step=record["step"])

    def samples_table(self, name: str, samples: list[dict]) -> None:
        import wandb

        if samples:  # columns: what the samples hold (generation: match; GRPO: reward), in their order
            columns: list[str | int] = list(dict.fromkeys(key for sample in samples for key in sample))
            rows = [[sample.get(column) for column in columns] for sample in samples]
            self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def finish(self, summary: dict[str, Any]) -> None:
        flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and v is not None}
        flat.update({f"before/{k}": v for k, v in summary.get("before", {}).items()})
        flat.update({f"after/{k}": v for k, v in summary.get("after", {}).items()})
        self._close(flat, exit_code=0)

    def end_early(self, summary: dict[str, Any], failed: bool) -> None:
        self._close(summary, exit_code=1 if failed else 0)

    def _close(self, summary: dict[str, Any], exit_code: int) -> None:
        if self.closed:  # (an error after the summary was written: the run is already complete)
            return
        self.closed = True
        self.run.summary.update(summary)
        self.run.finish(exit_code=exit_code)
        OPEN_RUNS.discard(self.run.id)
        if OPEN_RUNS:  # the writer process serves the other trials of the pack still
            return
        import wandb

        # W&B's writer process, stopped now: at interpreter exit (a Ray actor's) it may already be gone,
        # and W&B's own exit hook then prints a connection traceback.
        wandb.teardown(exit_code)


def make_tracker(spec, out_dir: Path, is_main: bool, resume: bool) -> NoTracker:
    if not is_main or spec.tracking.wandb is None or spec.tracking.wandb.mode == "disabled":
        return NoTracker()
    return WandbTracker(spec, out_dir, resume)


def log_sweep_table(settings, sweep_dir: Path, sweep_name: str, metric: str, rows: list, totals: dict[str, Any]) -> None:
    """One summary run in the sweep's W&B group: a cost table of every trial (quality vs dollars)."""
    import json

    import wandb

    from ftcluster.track.tables import searched_keys

    run = wandb.init(project=settings.project, entity=settings.entity, group=sweep_name, tags=[*settings.tags, "sweep"],
                     mode=wandb_mode(settings), name=f"{sweep_name}-summary", job_type="sweep-summary", dir=str(sweep_dir),
                     settings=wandb.Settings(console="off", quiet=True))
    # One column per searched value (a W&B table sorts and plots by them); a whole-block choice as JSON.
    params = searched_keys(r.params for r in rows)
    columns: list[str | int] = ["trial", *params, metric, "steps", "status", "tokens", "gpu_hours", "cpu_core_hours",
                                "cost_usd"]

    def cell(value: Any) -> Any:
        return value if value is None or isinstance(value, (int, float, str, bool)) else json.dumps(value)

    data = [[r.trial, *(cell(r.params.get(key)) for key in params), r.metric, r.steps, r.status, r.tokens,
             r.gpu_hours, r.cpu_core_hours, r.cost_usd] for r in rows]
    run.log({"sweep/cost_table": wandb.Table(columns=columns, data=data)})
    run.summary.update({f"sweep/{k}": v for k, v in totals.items() if v is not None})
    run.summary.update({"sweep/best_trial": rows[0].trial, f"sweep/best_{metric}": rows[0].metric})
    run.finish()
