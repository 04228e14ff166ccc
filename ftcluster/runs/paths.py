"""Where one run lives, decided once from its spec: `RunPaths`.

A run's home is `output.dir` (its `location`): a path, or a storage URI. A process always reads and
writes the run in a folder of its own machine (`local`): the location itself for a path, or this
node's working copy of a URI's run (under the cache, mirrored to the store by `runs/mirror.py`).
Every module asks a `RunPaths` for the run's files instead of deriving them from `output.dir`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftcluster.config.spec import JobSpec
from ftcluster.core.storage import is_uri, local_path, staging_dir
from ftcluster.runs.layout import CHECKPOINTS, EVAL_AFTER, EVAL_BEFORE, FINAL, METRICS, RUN_SPEC, SUMMARY


@dataclass(frozen=True)
class RunPaths:
    location: str  # output.dir with {name} filled in: a path, or a storage URI (s3://bucket/runs/x)
    uri: str | None  # the run's storage URI (None for a run on a local or mounted path)
    local: Path  # where this process reads and writes the run (a URI's run: this node's working copy)

    @classmethod
    def of(cls, spec: JobSpec) -> RunPaths:
        location = spec.output.dir.format(name=spec.name)
        uri = location.rstrip("/") if is_uri(location) else None
        return cls(location, uri, staging_dir(uri) if uri else local_path(location))

    @property
    def checkpoints(self) -> Path:
        return self.local / CHECKPOINTS

    @property
    def final(self) -> Path:
        return self.local / FINAL

    @property
    def metrics(self) -> Path:
        return self.local / METRICS

    @property
    def summary(self) -> Path:
        return self.local / SUMMARY

    @property
    def run_spec(self) -> Path:
        return self.local / RUN_SPEC

    @property
    def eval_before(self) -> Path:
        return self.local / EVAL_BEFORE

    @property
    def eval_after(self) -> Path:
        return self.local / EVAL_AFTER

    @property
    def shown(self) -> str:
        """How to name the run to a person: its URI, or its folder."""
        return self.uri or str(self.local)
