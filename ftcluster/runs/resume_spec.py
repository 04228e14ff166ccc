"""What `train --resume` may change: the resumed spec is compared with the one the run was started with.

A checkpoint holds the trained weights and optimizer state of one model, method and parallel layout:
resuming it under another model, method (an adapter's rank, targets, the objective) or DeepSpeed layout
cannot work, and used to end in a traceback deep in loading. Those changes are refused in one line
naming the keys. Anything else (learning rate, data, batch size, steps, evaluation) can go on from the
checkpoint; it does, and one line names what changed, since the run is then no longer one spec's.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from ftcluster.config.spec import JobSpec, build_spec
from ftcluster.core.errors import FtError
from ftcluster.runs.layout import RUN_SPEC
from ftcluster.runs.mirror import remote_of
from ftcluster.runs.paths import RunPaths

# Keys (or sections) a checkpoint cannot carry over: the weights, adapters and optimizer state it holds.
BREAKING = ("model", "method", "distributed.backend", "distributed.zero_stage")
# The same run by definition, or how to treat its folder: never a change.
IGNORED = ("output", "name")
# Paths that Ray's launch makes absolute in the recorded spec: equal when they name the same file.
PATHS = ("data.train", "data.validation", "model.path", "method.grpo.reward_model.run")


def flat(values: Any, prefix: str = "") -> dict[str, Any]:
    """A nested spec dump as dotted keys."""
    if isinstance(values, dict) and values:
        out: dict[str, Any] = {}
        for key, value in values.items():
            out |= flat(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): values}


def under(key: str, sections: tuple[str, ...]) -> bool:
    return any(key == section or key.startswith(section + ".") for section in sections)


def same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in PATHS and isinstance(old, str) and isinstance(new, str):
        return os.path.abspath(os.path.expanduser(old)) == os.path.abspath(os.path.expanduser(new))
    return False


def changed_keys(started: JobSpec, resumed: JobSpec) -> dict[str, tuple[Any, Any]]:
    """Every key whose value differs, with (the run's value, the resumed spec's)."""
    old, new = flat(started.model_dump(mode="json")), flat(resumed.model_dump(mode="json"))
    return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if not under(key, IGNORED) and not same(key, old.get(key), new.get(key))}


def recorded_spec(spec: JobSpec) -> JobSpec | None:
    """The spec the run in output.dir was started with (its run.yaml, in the store for a URI), if any."""
    remote = remote_of(spec)
    local = RunPaths.of(spec).run_spec
    text = remote.read_text(RUN_SPEC) if remote is not None else (local.read_text() if local.is_file() else None)
    if text is None:
        return None
    where = f"{RunPaths.of(spec).location}/{RUN_SPEC}"
    try:
        return build_spec(yaml.safe_load(text), where)
    except (FtError, yaml.YAMLError) as exc:
        raise FtError(f"--resume: {where} is not a readable job spec ({str(exc).splitlines()[0][:160]}); "
                      "the run's record is damaged") from None


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in changes.items())


def check_resume_spec(spec: JobSpec) -> str | None:
    """Refuse a resume whose spec changes what the checkpoint holds; a line naming any other change, or None."""
    started = recorded_spec(spec)
    if started is None:
        return None
    changes = changed_keys(started, spec)
    breaking = {key: values for key, values in changes.items() if under(key, BREAKING)}
    if breaking:
        raise FtError(f"--resume: the run in {RunPaths.of(spec).location} was trained with other values of "
                      f"{describe(breaking)}; its checkpoint cannot continue under them. Resume with the run's "
                      "values, or start a new run (another output.dir, or output.overwrite=true)")
    if not changes:
        return None
    return f"--resume: continuing with values that differ from the run's: {describe(changes)}"
