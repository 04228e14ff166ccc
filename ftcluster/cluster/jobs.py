"""Ray Job Submission: send a job spec to a Ray cluster, follow it, stop it, list jobs.

The entrypoint runs `ftcluster train|tune` on the head node; the training workers get the GPUs,
the entrypoint only a fraction of a CPU. The client's own ftcluster code travels with the job
(`py_modules`), so the cluster runs the version you tested; the image provides torch and the rest
(or `--pip` installs the pinned requirements into the job's environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ftcluster
from ftcluster.cluster.package import JOB_FILE, SPACE_FILE, build_package
from ftcluster.cluster.target import ClusterTarget
from ftcluster.config.spec import JobSpec, read_yaml
from ftcluster.core.errors import FtError, first_line
from ftcluster.core.storage import forwarded_settings, is_uri
from ftcluster.planning.capacity import CHECKED_ENV, DRIVER_CPUS_ENV, ClusterView, capacity_problems
from ftcluster.runs.paths import RunPaths

ENTRYPOINT_CPUS = 0.25  # the `ftcluster train` driver; Ray Train's workers reserve their own
SUMMARY_MARKER = "ftcluster-summary: "  # the submitted run prints its summary on one line with this
SUBMITTED_ENV = "FTCLUSTER_SUBMITTED"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class SubmitOptions:
    space: Path | None = None
    tune_args: list[str] | None = None
    name: str | None = None
    max_upload_mb: float = 100
    pip: bool = False
    resume_job: str | None = None  # continue the run of this earlier job (its run name, --resume)
    capacity_check: bool = True
    cluster_config: Path | None = None  # a `ray up` config: check against its autoscaling limits


def pinned_requirements() -> list[str]:
    """ftcluster's dependencies at the versions installed here (torch left to the cluster's image,
    which carries the CUDA build that matches its GPUs)."""
    pins = []
    for requirement in importlib.metadata.requires("ftcluster") or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]
        if name.lower() == "torch":
            continue
        extras = re.search(r"\[[^\]]*\]", requirement)
        try:
            pins.append(f"{name}{extras.group(0) if extras else ''}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def cluster_view(target: ClusterTarget) -> ClusterView:
    reply = target.get("/api/v0/nodes?detail=1")
    return ClusterView.from_state_api(reply["data"]["result"]["result"])


def autoscales(config: dict) -> bool:
    """Whether a `ray up` config describes node types the autoscaler starts (else: fixed machines, as
    cluster/local.yaml lists them, whose resources are what the nodes up now report)."""
    return bool(config.get("available_node_types")) or config.get("provider", {}).get("type") != "local"


def check_capacity(target: ClusterTarget, spec: JobSpec, options: SubmitOptions) -> None:
    """Refuse a job the cluster can never hold: against its nodes alive now, or, for an autoscaling
    cluster, against the most its `ray up` config lets the autoscaler start."""
    if not options.capacity_check:
        return
    config = read_yaml(options.cluster_config) if options.cluster_config is not None else None
    if config is not None and autoscales(config):
        view, where = ClusterView.at_most(config, str(options.cluster_config)), f"{options.cluster_config} (at most)"
    else:  # the nodes up now: no config, or one of fixed machines (`provider: local` with head_ip / worker_ips)
        view, where = cluster_view(target), target.address
    problems = capacity_problems(spec, view, driver_cpus=ENTRYPOINT_CPUS)
    if problems:
        hint = "" if options.cluster_config else (" (an autoscaling cluster: pass --cluster-config with its `ray up` "
                                                   "config, or --no-capacity-check)")
        raise FtError("\n".join(f"{where}: {p}" for p in problems) + hint)


def run_name(target: ClusterTarget, spec: JobSpec, options: SubmitOptions) -> str:
    """Each submission is a run of its own (`NAME-YYYYmmdd-HHMMSS`, so `runs/{name}` never collides with
    an earlier submission's), unless it continues an earlier job's run (`--resume JOB_ID`)."""
    if options.resume_job is None:
        return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    name = job_info(target, options.resume_job)["run_name"]
    if name is None:
        raise FtError(f"--resume {options.resume_job}: that job records no run name (submitted by an older "
                      "ftcluster); resubmit with name=RUN_NAME --resume instead")
    return name


def output_note(output: str, job_id: str) -> str:
    """Where a submitted run's outputs land, and how to bring them here."""
    if is_uri(output):
        return f"outputs: {output} (when it has finished, from any machine: ftcluster fetch {job_id} [--merge])"
    if not Path(output).is_absolute():
        return (f"output.dir {output} is relative: results land in the job's working directory on the head node and "
                "go with it; set output.dir to a storage URI (s3://BUCKET/runs/{name}) to keep them and fetch them")
    return (f"outputs: {output} on the cluster's disks (ftcluster fetch {job_id} works only where this path is "
            "mounted too; a storage URI, s3://BUCKET/runs/{name}, can be fetched from anywhere)")


def submit(target: ClusterTarget, spec: JobSpec, options: SubmitOptions) -> tuple[str, list[str]]:
    """Check capacity, package, submit; returns the job id and notes for the user."""
    if options.resume_job and options.space is not None:
        raise FtError("--resume JOB_ID continues a training run; a sweep continues with --tune-options '--resume DIR'")
    check_capacity(target, spec, options)
    name = run_name(target, spec, options)
    output = RunPaths.of(spec.model_copy(update={"name": name})).location
    with tempfile.TemporaryDirectory(prefix="ftcluster-submit-") as tmp:
        package = build_package(spec, Path(tmp), options.space, options.max_upload_mb)
        if options.space is not None:
            entrypoint = ["python", "-m", "ftcluster", "tune", JOB_FILE, SPACE_FILE, *(options.tune_args or [])]
        else:
            # The run name is an override, not an edit of the uploaded spec: the package (and the
            # working directory Ray keeps for it) stays the same from one submission to the next.
            entrypoint = ["python", "-m", "ftcluster", "train", JOB_FILE, f"name={name}"]
            entrypoint += ["--resume"] if options.resume_job else []
        env = forwarded_settings(keep_here="FTCLUSTER_CLUSTERS")  # (this machine's cluster profiles)
        env.update({SUBMITTED_ENV: "1", "PYTHONUNBUFFERED": "1", DRIVER_CPUS_ENV: f"{ENTRYPOINT_CPUS:g}"})
        if not options.capacity_check or options.cluster_config is not None:
            env[CHECKED_ENV] = "1"
        runtime_env: dict[str, Any] = {
            "working_dir": str(package.folder),
            "py_modules": [str(Path(ftcluster.__file__).parent)],
            "env_vars": env,
        }
        if options.pip:
            runtime_env["pip"] = pinned_requirements()
        job_name = options.name or spec.name
        submission_id = f"ftcluster-{job_name}-{package.spec_sha256[:8]}-{int(time.time())}"
        with _refused(target, "submission refused"):
            job_id = target.client().submit_job(
                entrypoint=" ".join(entrypoint),
                submission_id=submission_id,
                runtime_env=runtime_env,
                metadata={"ftcluster_job": job_name, "spec_sha256": package.spec_sha256, "run_name": name,
                          "kind": "tune" if options.space else "train", "output": output},
                entrypoint_num_cpus=ENTRYPOINT_CPUS,
                entrypoint_num_gpus=0,
            )
    return job_id, package.notes if options.space else [*package.notes, output_note(output, job_id)]


@contextlib.contextmanager
def _refused(target: ClusterTarget, what: str):
    """The Job Submission client's RuntimeErrors, as one line naming the cluster and the request."""
    try:
        yield
    except RuntimeError as exc:
        raise FtError(f"{target.address}: {what} ({first_line(exc)})") from None


def _status(info) -> str:
    return str(info.status.value if hasattr(info.status, "value") else info.status)


def job_info(target: ClusterTarget, job_id: str) -> dict[str, Any]:
    with _refused(target, f"no job {job_id}"):
        info = target.client().get_job_info(job_id)
    metadata = info.metadata or {}
    return {
        "job_id": job_id,
        "status": _status(info),
        "name": metadata.get("ftcluster_job"),
        "spec_sha256": metadata.get("spec_sha256"),
        "run_name": metadata.get("run_name"),
        "kind": metadata.get("kind"),
        "output": metadata.get("output"),
        "entrypoint": info.entrypoint,
        "message": info.message,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def job_logs(target: ClusterTarget, job_id: str) -> str:
    with _refused(target, f"no logs for job {job_id}"):
        return target.client().get_job_logs(job_id)


def follow_logs(target: ClusterTarget, job_id: str, write, skip_chars: int = 0) -> None:
    """Stream the job's logs until it ends (Ray streams from the start; the first `skip_chars` are dropped)."""
    client = target.client()

    async def stream() -> None:
        skipped = 0
        async for chunk in client.tail_job_logs(job_id):
            if skipped < skip_chars:
                cut = min(len(chunk), skip_chars - skipped)
                skipped += cut
                chunk = chunk[cut:]
            if chunk:
                write(chunk)

    asyncio.run(stream())


def run_summary(logs: str) -> dict[str, Any] | None:
    """The summary a submitted run printed on its marker line (the last one, for a resumed run)."""
    lines = [line for line in logs.splitlines() if line.startswith(SUMMARY_MARKER)]
    return json.loads(lines[-1][len(SUMMARY_MARKER):]) if lines else None


def error_lines(logs: str) -> list[str]:
    """The user-facing `error:` lines of a failed run."""
    return [line.strip() for line in logs.splitlines() if line.strip().startswith("error:")]


def stop(target: ClusterTarget, job_id: str, wait_s: float = 60) -> str:
    with _refused(target, f"cannot stop job {job_id}"):
        target.client().stop_job(job_id)
    return wait(target, job_id, wait_s)


def wait(target: ClusterTarget, job_id: str, timeout_s: float) -> str:
    """Poll until the job ends or `timeout_s` passes; its status then."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = job_info(target, job_id)["status"]
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1)


def list_jobs(target: ClusterTarget) -> list[dict[str, Any]]:
    rows = []
    for info in target.client().list_jobs():
        if not info.submission_id:
            continue
        rows.append({
            "job_id": info.submission_id,
            "status": _status(info),
            "name": (info.metadata or {}).get("ftcluster_job", ""),
            "start_time": info.start_time,
            "entrypoint": info.entrypoint,
        })
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def job_output(target: ClusterTarget, job_id: str) -> str:
    """Where a submitted training job's finished run can be read from this machine."""
    info = job_info(target, job_id)
    output, status = info["output"], info["status"]
    if info["kind"] == "tune":
        raise FtError(f"{job_id} is a sweep: fetch its best trial's run, or read its leaderboard on the cluster")
    if output is None:
        raise FtError(f"{job_id}: the job records no output location (submitted by an older ftcluster)")
    if not is_uri(output) and not Path(output).is_absolute():
        raise FtError(f"{job_id} wrote its outputs to {output} inside its working directory on the cluster's head "
                      "node, which this machine cannot read; submit with output.dir=s3://BUCKET/runs/{name} "
                      "(run storage) to fetch runs from anywhere")
    if status != "SUCCEEDED":
        then = (f"fetch it once it has SUCCEEDED (ftcluster status {job_id})" if status not in TERMINAL else
                f"continue it with `ftcluster submit JOB --resume {job_id}`")
        raise FtError(f"{job_id} is {status}: its run has not finished; {then}")
    if not is_uri(output) and not Path(output).is_dir():
        raise FtError(f"{job_id} wrote its outputs to {output} on the cluster's disks, which this machine does not "
                      "mount; submit with output.dir=s3://BUCKET/runs/{name} (run storage) to fetch runs from anywhere")
    return output
