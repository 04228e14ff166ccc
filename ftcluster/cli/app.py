"""The `ftcluster` command line. Every user error is one line per problem and exit code 2."""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ftcluster.core.errors import FtError, io_error_line, storage_errno
from ftcluster.core.quiet import quiet_libraries
from ftcluster.runs.paths import RunPaths

app = typer.Typer(
    help="Fine-tune pretrained language models from one YAML job spec, locally or on a Ray cluster.\n\n"
    "Example: ftcluster train jobs/quickstart.yaml training.lr=1e-4",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

JobArg = Annotated[Path, typer.Argument(help="Job spec YAML file, e.g. jobs/quickstart.yaml.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides KEY=VALUE applied to the spec, e.g. training.lr=1e-4 method.lora.rank=16.",
                   show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (one document) instead of a table.")]
RunArg = Annotated[str, typer.Argument(
    help="A run written by `ftcluster train`: its output.dir, a folder or a storage URI (s3://bucket/runs/x).",
    show_default=False)]


def check_spec_inputs(spec, job: Path, model_here: bool = True) -> None:
    """Problems the schema cannot see, all at once: missing data files, a model that isn't there.

    model_here=False: the model is found where the job runs (a cluster path or hub id), not here.
    """
    from ftcluster.config.spec import check_files
    from ftcluster.models.load import locate_model

    problems = check_files(spec, str(job))
    if model_here:
        try:
            locate_model(spec.model.path)
        except FtError as exc:
            problems.append(f"{job}: {exc}")
    if problems:
        raise FtError("\n".join(problems))


@app.command(epilog="Examples:\n\n  ftcluster validate jobs/quickstart.yaml\n\n  ftcluster validate jobs/quickstart.yaml training.lr=-1   # shows the error")
def validate(job: JobArg, overrides: OverridesArg = None) -> None:
    """Check a job spec without running it: every problem at once, with its dotted key."""
    from ftcluster.config.spec import load_spec

    spec = load_spec(job, overrides or [])
    check_spec_inputs(spec, job)
    console.print(f"[green]✓[/] {job}: valid ({spec.method.name} on {spec.model.path}, data {spec.data.train})")


@app.command(epilog="Examples:\n\n  ftcluster fields\n\n  ftcluster fields method.lora\n\n  ftcluster fields distributed")
def fields(section: Annotated[str | None, typer.Argument(help="Only keys under this dotted prefix, e.g. training.")] = None) -> None:
    """List every job-spec key with its type, default and meaning (the same text validation uses)."""
    from rich.markup import escape

    from ftcluster.config.spec import describe_fields

    rows = [row for row in describe_fields() if section is None or row[0] == section or row[0].startswith(section + ".")]
    if not rows:
        raise FtError(f"fields: no spec key starts with {section!r} (sections: model, method, data, training, eval, "
                      "scaling, distributed, tracking, cost, output)")
    for key, type_name, default, meaning in rows:
        console.print(f"[bold]{escape(key)}[/]  [dim]({escape(type_name)}, default {escape(default)})[/]")
        console.print(f"    {escape(meaning)}", highlight=False)


def exit_in_own_session_if(starts_embedded_ray: bool) -> None:
    """A command that starts embedded Ray runs as a child in a session of its own (launch/session.py):
    a signal to the whole process group then stops training at a step boundary, with a checkpoint."""
    from ftcluster.launch.session import needs_own_session, rerun_in_own_session

    if starts_embedded_ray and needs_own_session():
        sys.exit(rerun_in_own_session())


@app.command(epilog="Examples:\n\n  ftcluster train jobs/quickstart.yaml\n\n"
             "  ftcluster train jobs/quickstart.yaml training.max_steps=20 output.dir=runs/try\n\n"
             "  ftcluster train jobs/quickstart.yaml --resume\n\n"
             "  ftcluster train jobs/quickstart.yaml --resume training.max_steps=120   # a finished run, further\n\n"
             "  ftcluster train jobs/quickstart.yaml output.dir=s3://my-bucket/runs/quickstart   # outputs in object storage\n\n"
             "  ftcluster train jobs/classify-minilm.yaml --no-ray")
def train(
    job: JobArg,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in output.dir.")] = False,
    no_ray: Annotated[bool, typer.Option("--no-ray", help="Run the loop in this process without Ray (1 worker).")] = False,
    address: Annotated[str | None, typer.Option(
        "--address", envvar="RAY_ADDRESS",
        help="Ray cluster to run on (ray://HOST:10001); default: embedded local Ray on 127.0.0.1.")] = None,
    samples: Annotated[int, typer.Option(help="Held-out generations to show at the end (default: eval.generation.show).")] = -1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the memory/cost plan and exit without training.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: retrain a finished run from its last checkpoint.")] = False,
) -> None:
    """Fine-tune a model as the job spec says, then print the summary and the base-vs-fine-tuned table."""
    from ftcluster.config.spec import load_spec

    spec = load_spec(job, overrides or [])
    check_spec_inputs(spec, job)
    if dry_run:
        show_plan(spec, mfu=0.4)
        return
    from ftcluster.launch.launcher import run_in_process, run_with_ray
    from ftcluster.runs.folder import check_output, replacing_earlier_run
    from ftcluster.runs.lock import run_lock
    from ftcluster.runs.resume_spec import check_resume_spec
    from ftcluster.track.tables import print_run_tables

    if no_ray and spec.scaling.num_workers > 1:
        raise FtError("--no-ray runs one worker; set scaling.num_workers=1 or drop --no-ray")
    exit_in_own_session_if(starts_embedded_ray=not no_ray and address is None)
    with run_lock(spec):  # one train per output.dir: another one is refused in one line
        out = check_output(spec, resume, force)
        changed = check_resume_spec(spec) if resume else None  # a change the checkpoint cannot take is refused
        where = RunPaths.of(spec).location
        console.print(f"[bold]ftcluster[/] {spec.name}: {spec.method.name} on {spec.model.path} → {where}")
        if changed:
            console.print(changed, soft_wrap=True, highlight=False, markup=False)
        try:
            with replacing_earlier_run(spec, resume):
                summary = run_in_process(spec, resume) if no_ray else run_with_ray(spec, resume, address)
        except KeyboardInterrupt as exc:
            interrupted_run(exc, spec, out)
    show = samples if samples >= 0 else (spec.eval.generation.show if spec.eval.generation else 0)
    print_run_tables(summary, show, console)
    print_summary_marker(summary)
    merged = "merged" if RunPaths.of(spec).uri else f"{out}/merged"
    console.print(f"Outputs in {where} (metrics.jsonl, summary.json, final/). "
                  f"Export: ftcluster export {where} --merge --out {merged}")


@app.command(epilog="Examples:\n\n"
             "  ftcluster tune jobs/quickstart.yaml tune_spaces/lora.yaml --trials 6 --concurrent 2\n\n"
             "  ftcluster tune jobs/quickstart.yaml tune_spaces/lora.yaml --searcher optuna --max-cost-usd 5\n\n"
             "  ftcluster tune jobs/classify-minilm.yaml tune_spaces/unfreeze.yaml --scheduler none\n\n"
             "  ftcluster tune jobs/quickstart.yaml tune_spaces/lora.yaml --out s3://bucket/sweeps/lora\n\n"
             "  ftcluster tune jobs/quickstart.yaml tune_spaces/lora.yaml --trials 8 --shared-base 8   # one base, 8 adapters\n\n"
             "  ftcluster tune --resume runs/quickstart-sweep\n\n"
             "  ftcluster tune --resume s3://bucket/sweeps/lora --trust-state   # its state signed on another machine")
def tune(
    job: Annotated[Path | None, typer.Argument(help="Job spec YAML every trial starts from.", show_default=False)] = None,
    space: Annotated[Path | None, typer.Argument(
        help="Search space YAML: dotted spec keys -> {loguniform|uniform|quniform|randint|choice|grid|expr: ...}, "
             "e.g. tune_spaces/lora.yaml.", show_default=False)] = None,
    overrides: OverridesArg = None,
    trials: Annotated[int | None, typer.Option(help="Trials in total (default: the grid's size for --searcher grid, else 8).")] = None,
    concurrent: Annotated[int, typer.Option(help="Trials running at once.")] = 2,
    scheduler: Annotated[str, typer.Option(help="asha (stop weak trials at evaluations), pbt (population based "
                                           "training: copy good checkpoints, perturb values) or none.")] = "asha",
    searcher: Annotated[str, typer.Option(help="random, grid (every grid point once) or optuna (TPE).")] = "random",
    grace_steps: Annotated[int | None, typer.Option(help="ASHA: steps every trial runs before any is stopped (default: eval.every).")] = None,
    reduction_factor: Annotated[float, typer.Option(help="ASHA: keep 1/this of the trials at each rung.")] = 2,
    max_gpu_hours: Annotated[float | None, typer.Option(help="Start no new trial once the trials have used this many GPU-hours.")] = None,
    max_cost_usd: Annotated[float | None, typer.Option(help="Start no new trial once the trials have cost this much (cost section prices).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the searcher (same seed, same trials).")] = 0,
    shared_base: Annotated[int, typer.Option(
        help="Train up to N LoRA/DoRA/QLoRA trials in one process over one copy of the base model, an adapter each "
             "(same losses as separate trials); trials that cannot share run alone. ASHA and PBT rank a pack's "
             "trials inside it (a PBT exploit copies one trial's adapter into another). E.g. --shared-base 8.")] = 1,
    out: Annotated[str | None, typer.Option(
        help="Sweep folder (default: runs/NAME-sweep): a path (on a cluster, a mount every node sees) or a storage "
             "URI such as s3://bucket/sweeps/lora, where every trial's run, Tune's state and the leaderboards land.",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing sweep in the folder.")] = False,
    resume: Annotated[str | None, typer.Option(help="Continue the interrupted sweep in this folder or URI.",
                                               show_default=False)] = None,
    address: Annotated[str | None, typer.Option(
        "--address", envvar="RAY_ADDRESS", help="Ray cluster to run on; default: embedded local Ray on 127.0.0.1.")] = None,
    trust_state: Annotated[bool, typer.Option(
        "--trust-state", help="With --resume: load Ray Tune's saved state (pickles) even where this machine did not "
                              "sign it (a sweep made elsewhere, or changed since).")] = False,
) -> None:
    """Run many fine-tunes of one job in parallel with Ray Tune; print the leaderboard; write best.yaml."""
    from ftcluster.config.spec import load_spec
    from ftcluster.sweep.driver import SweepOptions, load_sweep, prepare_sweep, run_sweep
    from ftcluster.track.tables import leaderboard_table

    exit_in_own_session_if(starts_embedded_ray=address is None)
    if resume is not None:
        if job is not None or space is not None:
            raise FtError("--resume DIR continues a sweep with its recorded job and space; drop JOB and SPACE")
        sweep = load_sweep(resume)
    else:
        if job is None or space is None:
            raise FtError("tune: give JOB and SPACE (e.g. ftcluster tune jobs/quickstart.yaml tune_spaces/lora.yaml), "
                          "or --resume DIR")
        spec = load_spec(job, overrides or [])
        check_spec_inputs(spec, job)
        options = SweepOptions(trials, concurrent, scheduler, searcher, grace_steps, reduction_factor,
                               max_gpu_hours, max_cost_usd, seed, shared_base)
        sweep = prepare_sweep(spec, space, options, out, force)
    packs = f" in packs of up to {sweep.options.shared_base} per base" if sweep.options.shared_base > 1 else ""
    console.print(f"[bold]ftcluster tune[/] {sweep.setup.name}: {sweep.trials} trials{packs}, "
                  f"{sweep.options.concurrent} {'packs' if packs else 'trials'} at once, "
                  f"{sweep.options.searcher} search, scheduler {sweep.options.scheduler}, "
                  f"{sweep.metric} ({sweep.mode}) → {sweep.location}", soft_wrap=True, highlight=False)
    outcome = run_sweep(sweep, resume=resume is not None, address=address, trust_state=trust_state)
    console.print(leaderboard_table(outcome.rows, sweep.metric, f"Sweep {sweep.setup.name}"))
    t = outcome.totals
    cost = f"${t['cost_usd']:.4f}" if t["cost_usd"] is not None else "n/a"
    console.print(f"{t['trials']} trials: {t['completed']} completed, {t['stopped_early']} stopped early, "
                  f"{t['errors']} failed; {t['steps']:,} steps, {t['tokens']:,} tokens, {t['gpu_hours']:.4f} GPU-h, "
                  f"{t['cpu_core_hours']:.4f} CPU core-h, {cost}")
    if outcome.budget_reached:
        console.print("[yellow]Budget reached:[/] no new trials were started after it.")
    if outcome.best_spec:
        stored = f"{sweep.location}/{outcome.best_spec.name}"  # the sweep's own location, a URI as given
        copy = f" (copy here: {outcome.best_spec})" if stored != str(outcome.best_spec) else ""
        console.print(f"Best spec: {stored}{copy}; run it: ftcluster train {outcome.best_spec}. "
                      f"Leaderboard: {sweep.location}/leaderboard.csv; report: ftcluster report {sweep.location}",
                      soft_wrap=True, highlight=False)
    if outcome.interrupted:
        err_console.print(f"interrupted; continue with `ftcluster tune --resume {sweep.location}`", soft_wrap=True,
                          highlight=False)
        sys.exit(130)


def interrupted_run(exc: KeyboardInterrupt, spec, out: Path) -> None:
    """One line for a run stopped by Ctrl+C or SIGTERM: the step, the checkpoint, the command that resumes."""
    import shlex

    from ftcluster.core.interrupts import Interrupted, signal_of
    from ftcluster.runs.layout import CHECKPOINTS, latest_checkpoint

    signum = signal_of(exc)
    step = exc.step if isinstance(exc, Interrupted) else None
    from ftcluster.runs.mirror import display_checkpoint

    local = (exc.checkpoint if isinstance(exc, Interrupted) else None) or latest_checkpoint(out / CHECKPOINTS)
    checkpoint = display_checkpoint(spec, local)
    words = [a for a in sys.argv[1:] if a != "--resume"]
    where = f" at step {step}" if step is not None else ""
    if checkpoint is None:
        err_console.print(f"interrupted ({signal.Signals(signum).name}){where}; no checkpoint was saved yet")
    else:
        err_console.print(f"interrupted ({signal.Signals(signum).name}){where}; checkpoint: {checkpoint}; continue with: "
                          f"ftcluster {shlex.join(words)} --resume", soft_wrap=True, highlight=False)
    sys.exit(128 + signum)


def print_summary_marker(summary: dict) -> None:
    """A submitted run prints its summary on one marker line, for `ftcluster status` to read from the logs."""
    import json
    import os

    from ftcluster.cluster.jobs import SUBMITTED_ENV, SUMMARY_MARKER

    if os.environ.get(SUBMITTED_ENV):
        keys = ("name", "method", "steps", "stop_reason", "tokens", "tokens_per_s", "train_seconds", "before", "after",
                "gpu_hours", "cpu_core_hours", "cost_usd", "final")
        print(SUMMARY_MARKER + json.dumps({k: summary.get(k) for k in keys}), flush=True)


AddressOption = Annotated[str | None, typer.Option(
    "--address", help="Ray dashboard address, e.g. http://HEAD:8265 (default: --cluster's, else RAY_ADDRESS).",
    show_default=False)]
ClusterOption = Annotated[str | None, typer.Option(
    "--cluster", help="A profile in ~/.config/ftcluster/clusters.yaml (address, token_file).", show_default=False)]
JobIdArg = Annotated[str, typer.Argument(help="The job id `ftcluster submit` printed (see `ftcluster jobs`).",
                                         show_default=False)]


def check_tune_options(tune_options: str, space: Path | None) -> list[str]:
    """`--tune-options` parsed by `ftcluster tune` itself, here, so a typo fails before anything is sent."""
    import shlex

    from typer.exceptions import TyperException  # typer's own click; its usage errors derive from this

    args = shlex.split(tune_options)
    if args and space is None:
        raise FtError("--tune-options: only with --tune SPACE")
    command = typer.main.get_command(app).commands["tune"]  # type: ignore[attr-defined]
    try:
        command.make_context("tune", ["job.yaml", "space.yaml", *args], resilient_parsing=False)
    except TyperException as exc:
        raise FtError(f"--tune-options {tune_options!r}: {exc.format_message()}") from None
    return args


@app.command(epilog="Examples:\n\n"
             "  ftcluster submit jobs/quickstart.yaml --address http://127.0.0.1:8265\n\n"
             "  ftcluster submit jobs/quickstart.yaml --cluster prod --wait output.dir=s3://bucket/runs/{name}\n\n"
             "  ftcluster submit jobs/quickstart.yaml --cluster prod --resume JOB_ID training.max_steps=2000\n\n"
             "  ftcluster submit jobs/llama-7b-lora-ddp.yaml --address http://127.0.0.1:8265 --cluster-config cluster/aws-gpu.yaml\n\n"
             "  ftcluster submit jobs/quickstart.yaml --tune tune_spaces/lora.yaml --tune-options '--trials 16 --concurrent 4'")
def submit(
    job: JobArg,
    overrides: OverridesArg = None,
    address: AddressOption = None,
    cluster: ClusterOption = None,
    tune_space: Annotated[Path | None, typer.Option("--tune", help="Run a sweep over this space instead of one training run.")] = None,
    tune_options: Annotated[str, typer.Option(help="Options for `ftcluster tune` on the cluster, in one string.")] = "",
    name: Annotated[str | None, typer.Option(help="Job name in the metadata (default: the spec's name).")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Refuse uploads (spec + data) above this size.")] = 100,
    pip: Annotated[bool, typer.Option("--pip", help="Install ftcluster's pinned requirements into the job's "
                                      "environment (for clusters whose image lacks them).")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the logs until the job ends; exit 1 if it failed.")] = False,
    resume: Annotated[str | None, typer.Option(
        help="Continue the run of this earlier job (JOB_ID from `ftcluster jobs`) from its last checkpoint; "
             "without it every submission is a fresh run named NAME-YYYYmmdd-HHMMSS.")] = None,
    cluster_config: Annotated[Path | None, typer.Option(
        help="The cluster's `ray up` config: check the job against the most its autoscaler may start (max_workers "
             "per node type) instead of the nodes up now; a profile's cluster_config by default.")] = None,
    capacity_check: Annotated[bool, typer.Option(
        "--capacity-check/--no-capacity-check", help="Skip (--no-capacity-check) the check that the cluster can ever hold the job (the job still fails "
        "after scaling.placement_timeout_s if it cannot be placed).")] = True,
) -> None:
    """Send a job spec (and its local data) to a Ray cluster with the Job Submission API; prints the job id."""
    from ftcluster.cluster.jobs import SubmitOptions
    from ftcluster.cluster.jobs import submit as submit_job
    from ftcluster.cluster.target import resolve_target
    from ftcluster.config.spec import load_spec

    spec = load_spec(job, overrides or [])
    check_spec_inputs(spec, job, model_here=False)
    if tune_space is not None:
        from ftcluster.sweep.space import load_space

        load_space(tune_space, spec.model_dump(mode="json"))
    target = resolve_target(address, cluster)
    options = SubmitOptions(tune_space, check_tune_options(tune_options, tune_space), name, max_upload_mb, pip,
                            resume, capacity_check, cluster_config or target.cluster_config)
    job_id, notes = submit_job(target, spec, options)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True, highlight=False)
    console.print(f"[green]✓[/] submitted {job_id} to {target.address}")
    if tune_space is None:
        console.print(f"run {spec.name}-…: continue it later with `ftcluster submit {job} --resume {job_id}`",
                      soft_wrap=True, highlight=False)
    print(job_id)
    if wait:
        logs(job_id, follow=True, address=address, cluster=cluster)
        status(job_id, address=address, cluster=cluster)


@app.command(epilog="Examples:\n\n  ftcluster status ftcluster-quickstart-1a2b3c4d-1795500000 --address http://127.0.0.1:8265\n\n"
             "  ftcluster status JOB_ID --json | jq .summary.steps")
def status(job_id: JobIdArg, address: AddressOption = None, cluster: ClusterOption = None,
           as_json: JsonOption = False) -> None:
    """A submitted job's state, and its run summary (or its error lines) once it has ended. Exit 1 if it failed."""
    from rich.markup import escape

    from ftcluster.cluster.jobs import error_lines, job_info, job_logs, run_summary
    from ftcluster.cluster.target import resolve_target
    from ftcluster.track.tables import job_status_table

    target = resolve_target(address, cluster)
    info = job_info(target, job_id)
    logs_text = job_logs(target, job_id) if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED") else ""
    summary = run_summary(logs_text)
    failed = info["status"] == "FAILED"
    if as_json:
        print(json.dumps({**info, "summary": summary, "errors": error_lines(logs_text)}, default=str))
    else:
        console.print(job_status_table(info, summary))
        if failed:
            for line in error_lines(logs_text) or [str(info["message"]).splitlines()[0]]:
                err_console.print(f"[red]{escape(line)}[/]", highlight=False, soft_wrap=True)
    if failed:
        sys.exit(1)


@app.command(epilog="Examples:\n\n  ftcluster logs JOB_ID\n\n  ftcluster logs JOB_ID --follow --tail 20")
def logs(
    job_id: JobIdArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")] = False,
    tail: Annotated[int | None, typer.Option(min=1, help="Only the last N lines (with --follow: then stream).")] = None,
    address: AddressOption = None,
    cluster: ClusterOption = None,
) -> None:
    """Print a submitted job's logs (the entrypoint's output: progress, summary, errors)."""
    from ftcluster.cluster.jobs import follow_logs, job_logs
    from ftcluster.cluster.target import resolve_target

    target = resolve_target(address, cluster)
    shown = 0
    if not follow or tail is not None:
        text = job_logs(target, job_id)
        print("".join(text.splitlines(keepends=True)[-tail:] if tail else text), end="", flush=True)
        shown = len(text)
    if follow:  # Ray streams from the start: what the tail above covered is skipped
        follow_logs(target, job_id, lambda chunk: print(chunk, end="", flush=True), skip_chars=shown)


@app.command(epilog="Example:\n\n  ftcluster stop JOB_ID --cluster prod")
def stop(job_id: JobIdArg, address: AddressOption = None, cluster: ClusterOption = None) -> None:
    """Stop a submitted job (its workers and trials with it) and wait until Ray says it stopped."""
    from ftcluster.cluster.jobs import stop as stop_job
    from ftcluster.cluster.target import resolve_target

    target = resolve_target(address, cluster)
    console.print(f"{job_id}: {stop_job(target, job_id)}")


@app.command(epilog="Examples:\n\n  ftcluster jobs --address http://127.0.0.1:8265\n\n  ftcluster jobs --json | jq '.[0].job_id'")
def jobs(address: AddressOption = None, cluster: ClusterOption = None, as_json: JsonOption = False) -> None:
    """List the cluster's submitted jobs, newest first."""
    from ftcluster.cluster.jobs import list_jobs
    from ftcluster.cluster.target import resolve_target
    from ftcluster.track.tables import jobs_table

    target = resolve_target(address, cluster)
    rows = list_jobs(target)
    if as_json:
        print(json.dumps(rows, default=str))
    else:
        console.print(jobs_table(rows, target.address))


@app.command(epilog="Examples:\n\n  ftcluster plan jobs/llama-65b-qlora-zero3.yaml\n\n"
             "  ftcluster plan jobs/llama-7b-lora-ddp.yaml --suggest --top 5\n\n"
             "  ftcluster plan jobs/llama-7b-lora-ddp.yaml scaling.gpu_type=A100 training.batch_size=8")
def plan(
    job: JobArg,
    overrides: OverridesArg = None,
    mfu: Annotated[float, typer.Option(help="Model FLOPs utilisation assumed for time and cost (0-1).")] = 0.4,
    suggest: Annotated[bool, typer.Option("--suggest", help="Rank every feasible setup (method, ZeRO stage, offload, nodes) by cost.")] = False,
    top: Annotated[int, typer.Option(help="How many suggestions to show.")] = 10,
) -> None:
    """Estimate per-GPU memory, host RAM, time and cost per epoch for a job, before running it."""
    from ftcluster.config.spec import load_spec

    spec = load_spec(job, overrides or [])
    show_plan(spec, mfu, suggest, top)


def show_plan(spec, mfu: float, suggest: bool = False, top: int = 10) -> None:
    from ftcluster.planning import plan as planner
    from ftcluster.planning.shared_base import trials_per_device_line
    from ftcluster.track.tables import plan_tables, suggestions_table

    if not 0 < mfu <= 1:
        raise FtError(f"--mfu: {mfu} must be between 0 and 1")
    result = planner.plan_job(spec, mfu)
    for table in plan_tables(result):
        console.print(table)
    trials_line = trials_per_device_line(spec, result)
    if trials_line is not None:
        console.print(trials_line, soft_wrap=True, highlight=False)
    if suggest:
        console.print(suggestions_table(planner.suggest(spec, mfu), top))


@app.command("eval", epilog="Examples:\n\n  ftcluster eval runs/quickstart\n\n"
             "  ftcluster eval runs/quickstart --baseline few-shot:3   # did fine-tuning beat prompting?\n\n"
             "  ftcluster eval runs/quickstart --harness arc_easy,hellaswag --harness-limit 200   # online\n\n"
             "  ftcluster eval runs/quickstart --harness my_task --harness-include tasks/   # a local task YAML")
def eval_run(
    run: RunArg,
    baseline: Annotated[str | None, typer.Option(
        help="Also score the base model prompted with K training examples (few-shot:K) on the same held-out "
             "prompts and metric.")] = None,
    harness: Annotated[str | None, typer.Option(
        help="Also run these lm-evaluation-harness tasks (comma-separated) on both models; replaces the run's "
             "eval.harness tasks.")] = None,
    harness_include: Annotated[Path | None, typer.Option(
        help="A folder of harness task YAML files (tasks whose data are local files).")] = None,
    harness_limit: Annotated[int | None, typer.Option(min=1, help="Score at most N examples per harness task.")] = None,
) -> None:
    """Evaluate a finished run's base model and fine-tuned model on its validation data, side by side."""
    from ftcluster.results.compare import compare_run
    from ftcluster.track.tables import before_after_table, few_shot_line, samples_table

    shots = None
    if baseline is not None:
        kind, _, count = baseline.partition(":")
        if kind != "few-shot" or not count.isdigit() or not 1 <= int(count) <= 16:
            raise FtError(f"--baseline {baseline!r}: expected few-shot:K with K from 1 to 16, e.g. few-shot:3")
        shots = int(count)
    tasks = None
    if harness is not None or harness_include is not None or harness_limit is not None:
        if not harness:
            raise FtError("--harness-include and --harness-limit go with --harness TASK[,TASK...]")
        tasks = {"tasks": [t.strip() for t in harness.split(",") if t.strip()], "limit": harness_limit,
                 "include_path": str(harness_include) if harness_include else None}
    result = compare_run(run, shots, tasks)
    console.print(before_after_table(result["before"], result["after"]))
    table = samples_table(result["samples_before"], result["samples_after"], 3)
    if table is not None:
        console.print(table)
    line = few_shot_line({"few_shot": result["few_shot"], "after": result["after"]})
    if line:
        console.print(line)


@app.command(epilog="Examples:\n\n  ftcluster chat runs/quickstart\n\n"
             "  ftcluster chat runs/quickstart --compare   # the base model answers beside the fine-tuned one\n\n"
             "  ftcluster chat s3://my-bucket/runs/quickstart --temperature 0.7 --max-new-tokens 64\n\n"
             "  echo 'Extract: Emma moved to Lima.' | ftcluster chat runs/quickstart --single-turn   # scripted")
def chat(
    run: RunArg,
    compare: Annotated[bool, typer.Option("--compare", help="Also answer with the base model (before fine-tuning), "
                                          "side by side.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="The longest answer, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy, as evaluation generates; above 0: "
                                               "sampling (with --top-p).")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature).")] = 1.0,
    system: Annotated[str | None, typer.Option(help="A system prompt instead of the run's data.system_prompt "
                                               "('' for none).")] = None,
    single_turn: Annotated[bool, typer.Option("--single-turn", help="Every message starts a new conversation "
                                              "(what single-turn training data taught).")] = False,
    device: Annotated[str, typer.Option(help="auto (a GPU when there is one), cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Talk to a finished run's fine-tuned model (a folder or a storage URI), prompted exactly as it was
    trained: its chat template and system prompt. Type a message and press Enter; /reset forgets the
    conversation, /exit or Ctrl-D quits. Piped input is read a message per line."""
    from ftcluster.results.chat import COMMANDS, ChatOptions, chat_loop, open_chat

    options = ChatOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, system=system,
                          single_turn=single_turn, compare=compare)
    with console.status(f"Loading {run} ..."):
        chats = open_chat(run, options, device)
    interactive = sys.stdin.isatty()
    if interactive:
        console.print(f"Chatting with {run} ({' and '.join(c.name for c in chats)}); {COMMANDS}.", highlight=False)

    def messages():
        while True:
            try:
                yield input("you> ") if interactive else next(sys.stdin)
            except (EOFError, StopIteration):
                return

    for exchange in chat_loop(chats, messages(), lambda line: console.print(line, highlight=False)):
        if not interactive:
            console.print(f"you> {exchange.message}", markup=False, highlight=False, soft_wrap=True)
        if len(exchange.answers) == 1:  # (markup off: a model's "[...]" is text, not a rich style)
            console.print(f"{exchange.answers[0][0]}> {exchange.answers[0][1]}", markup=False, highlight=False,
                          soft_wrap=True)
            continue
        from rich.table import Table
        from rich.text import Text

        table = Table()
        for name, _ in exchange.answers:
            table.add_column(name, overflow="fold")
        table.add_row(*(Text(answer) for _, answer in exchange.answers))
        console.print(table)


@app.command(epilog="Examples:\n\n  ftcluster export runs/quickstart --out exported/adapter\n\n"
             "  ftcluster export runs/quickstart --merge --out exported/merged\n\n"
             "  ftcluster export s3://my-bucket/runs/quickstart --merge --out merged   # a run in object storage\n\n"
             "  ftcluster export runs/llama-65b --checkpoint latest --merge --out exported/step")
def export(
    run: RunArg,
    out: Annotated[Path | None, typer.Option(help="Destination folder (default: RUN/export or RUN/merged).")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Merge adapters into the base weights: a plain transformers folder.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty destination folder.")] = False,
    checkpoint: Annotated[str | None, typer.Option(
        help="Export a training checkpoint instead of the final weights: step-0000200 or latest. "
             "DeepSpeed ZeRO shards are consolidated into one safetensors model.")] = None,
) -> None:
    """Export fine-tuned weights: an adapter folder plain `peft` loads, or (--merge) a full model folder."""
    from ftcluster.runs.export import export_run
    from ftcluster.runs.mirror import open_run

    destination = out or open_run(run) / ("merged" if merge else "export")
    path = export_run(run, destination, merge=merge, force=force, checkpoint=checkpoint)
    console.print(f"[green]✓[/] exported to {path}")


@app.command(epilog="Examples:\n\n"
             "  ftcluster fetch ftcluster-quickstart-1a2b3c4d-1795500000 --cluster prod   # to runs/RUN_NAME\n\n"
             "  ftcluster fetch JOB_ID --address http://127.0.0.1:8265 --merge --out weights/quickstart\n\n"
             "  ftcluster fetch s3://my-bucket/runs/quickstart --out runs/quickstart")
def fetch(
    source: Annotated[str, typer.Argument(
        help="A submitted job's id (its run is read from where the job wrote it: a storage URI, or a path this "
             "machine mounts too), or a run's output.dir (a storage URI or a folder).", show_default=False)],
    out: Annotated[Path | None, typer.Option(help="Destination folder (default: runs/RUN_NAME).")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Also write OUT/merged: adapters folded into the base "
                                        "weights, a folder plain transformers loads (needs the base model here).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty destination folder.")] = False,
    address: AddressOption = None,
    cluster: ClusterOption = None,
) -> None:
    """Copy a finished run to this machine: final weights, summary, metrics, evaluations, and a report.html.
    The copy is a run folder: `ftcluster eval`, `export` and `report` work on it."""
    from ftcluster.core.storage import is_uri
    from ftcluster.results.fetch import fetch_run

    location = source
    if not is_uri(source) and not Path(source).exists():
        from ftcluster.cluster.jobs import job_output
        from ftcluster.cluster.target import resolve_target

        location = job_output(resolve_target(address, cluster), source)
    fetched = fetch_run(location, out or Path("runs") / Path(location.rstrip("/")).name, merge=merge, force=force)
    console.print(f"[green]✓[/] fetched {location} to {fetched.folder} ({fetched.size_bytes / 2**20:.1f} MB): "
                  f"weights {fetched.weights}, report {fetched.report}", soft_wrap=True, highlight=False)


@app.command(epilog="Examples:\n\n  ftcluster report runs/quickstart   # then open runs/quickstart/report.html\n\n"
             "  ftcluster report runs/quickstart-sweep\n\n"
             "  ftcluster report s3://bucket/sweeps/lora   # fetched to the local cache; prints where the page is")
def report(run: Annotated[str, typer.Argument(help="A run, or a sweep written by `ftcluster tune` (a folder or a "
                                              "storage URI).", show_default=False)]) -> None:
    """Write report.html: for a run, overview, base-vs-fine-tuned and plots of loss, throughput, memory, cost;
    for a sweep, the leaderboard, metric vs dollars with the Pareto front, and every trial's curve."""
    from ftcluster.results.report import write_report

    stored, here = write_report(run)
    copy = f" (open the copy here: {here})" if stored != str(here) else ""
    console.print(f"[green]✓[/] wrote {stored}{copy}", soft_wrap=True, highlight=False)


render_app = typer.Typer(help="Render deployment manifests for a job spec.", no_args_is_help=True)
app.add_typer(render_app, name="render")


def _key_values(items: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FtError(f"{option} {item!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs


def _toleration(text: str) -> dict[str, str]:
    """KEY[=VALUE]:EFFECT → a Kubernetes toleration."""
    head, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise FtError(f"--toleration {text!r}: expected KEY[=VALUE]:EFFECT, EFFECT one of NoSchedule, "
                      "PreferNoSchedule, NoExecute")
    key, has_value, value = head.partition("=")
    toleration = {"key": key, "operator": "Equal" if has_value else "Exists", "effect": effect}
    if has_value:
        toleration["value"] = value
    return toleration


@render_app.command("k8s", epilog="Examples:\n\n"
                    "  ftcluster render k8s jobs/llama-7b-lora-ddp.yaml --image ghcr.io/acme/ftcluster:0.1 --workers 1 "
                    "--gpus-per-worker 8 --pvc ftcluster-shared --pvc-mount /shared --out rayjob.yaml\n\n"
                    "  ftcluster render k8s jobs/quickstart.yaml output.dir=s3://bucket/runs/{name} --image "
                    "ghcr.io/acme/ftcluster:0.1 --storage-secret s3-credentials\n\n"
                    "  ftcluster render k8s jobs/quickstart.yaml --image ghcr.io/acme/ftcluster:0.1 --workers 2 --pvc ftcluster-shared --cluster-only\n\n"
                    "  kubectl apply -f rayjob.yaml && kubectl get rayjobs -w")
def render_k8s(
    job: JobArg,
    image: Annotated[str, typer.Option(help="Container image with ftcluster and its dependencies (k8s/Dockerfile).")],
    overrides: OverridesArg = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker pods (default: scaling.num_workers).")] = None,
    gpus_per_worker: Annotated[int | None, typer.Option(help="GPUs per worker pod; one Ray Train worker per GPU "
                                                                "(default: 1 if scaling.use_gpu else 0).")] = None,
    cpus_per_worker: Annotated[int, typer.Option(help="CPUs per worker pod.")] = 8,
    memory_per_worker: Annotated[str, typer.Option(help="Memory per worker pod (Kubernetes quantity).")] = "64Gi",
    shm_size: Annotated[str, typer.Option(help="Shared memory (/dev/shm) per pod, for NCCL and data loading.")] = "16Gi",
    node_selector: Annotated[list[str] | None, typer.Option(help="KEY=VALUE node labels for worker pods, e.g. "
                                                               "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3.")] = None,
    toleration: Annotated[list[str] | None, typer.Option(help="KEY[=VALUE]:EFFECT taints the workers tolerate, "
                                                            "e.g. nvidia.com/gpu:NoSchedule.")] = None,
    pvc: Annotated[str | None, typer.Option(help="PersistentVolumeClaim shared by the pods (data, outputs, "
                                               "checkpoints), mounted at --pvc-mount.")] = None,
    pvc_mount: Annotated[str, typer.Option(help="Where --pvc is mounted in the pods; a spec's absolute output.dir "
                                           "must lie under it (e.g. --pvc-mount /shared for /shared/runs/x).")] = "/mnt/shared",
    ephemeral_outputs: Annotated[bool, typer.Option("--ephemeral-outputs", help="Allow outputs on a pod's own disk, "
                                                    "deleted with the cluster (without it: --pvc or a URI output.dir "
                                                    "is required).")] = False,
    storage_secret: Annotated[str | None, typer.Option(help="Secret whose keys become the pods' environment, e.g. "
                                                       "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for an s3:// "
                                                       "output.dir (referenced, never copied).")] = None,
    namespace: Annotated[str | None, typer.Option(help="Namespace of the manifests.")] = None,
    wandb_secret: Annotated[str, typer.Option(help="Secret with key api-key for WANDB_API_KEY ('' for none).")] = "wandb",
    working_dir_uri: Annotated[str | None, typer.Option(help="Remote working_dir for the job (s3://.../pkg.zip).")] = None,
    submission_mode: Annotated[str, typer.Option(help="RayJob submissionMode: K8sJobMode, HTTPMode, InteractiveMode "
                                                 "or SidecarMode.")] = "K8sJobMode",
    active_deadline_s: Annotated[int, typer.Option(help="Fail the RayJob after this many seconds (0: no limit).")] = 86400,
    ttl_s: Annotated[int, typer.Option(help="Delete the finished RayJob's cluster after this many seconds.")] = 3600,
    backoff_limit: Annotated[int, typer.Option(help="Retries of the whole RayJob after a failure.")] = 0,
    tune_space: Annotated[Path | None, typer.Option("--tune", help="Run a sweep over this space.")] = None,
    tune_options: Annotated[str, typer.Option(help="Options for `ftcluster tune`, in one string.")] = "",
    cluster_only: Annotated[bool, typer.Option("--cluster-only", help="A standalone RayCluster (for `ftcluster "
                                               "submit`) instead of a RayJob.")] = False,
    name: Annotated[str | None, typer.Option(help="Kubernetes name (default: from the spec's name).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the manifests here (default: print them).")] = None,
) -> None:
    """Render a KubeRay RayJob (or RayCluster) plus a ConfigMap holding the job spec, ready for kubectl apply."""
    from ftcluster.cluster.kuberay import K8sOptions, adds_wandb_tracking, dump_manifests, render
    from ftcluster.config.spec import load_spec
    from ftcluster.core.atomic import write_text_atomic

    spec = load_spec(job, overrides or [])
    check_spec_inputs(spec, job, model_here=False)
    tune_args = check_tune_options(tune_options, tune_space)
    options = K8sOptions(
        image=image, workers=spec.scaling.num_workers if workers is None else workers,
        gpus_per_worker=gpus_per_worker if gpus_per_worker is not None else (1 if spec.scaling.use_gpu else 0),
        cpus_per_worker=cpus_per_worker, memory_per_worker=memory_per_worker, shm_size=shm_size,
        node_selector=_key_values(node_selector or [], "--node-selector"),
        tolerations=[_toleration(t) for t in toleration or []], pvc=pvc, pvc_mount=pvc_mount,
        ephemeral_outputs=ephemeral_outputs, storage_secret=storage_secret, namespace=namespace,
        wandb_secret=wandb_secret or None, working_dir_uri=working_dir_uri, submission_mode=submission_mode,
        active_deadline_s=active_deadline_s or None, ttl_s=ttl_s, backoff_limit=backoff_limit, name=name,
    )
    text = dump_manifests(render(spec, options, tune_space, tune_args, cluster_only))
    if adds_wandb_tracking(spec, options):
        err_console.print(f"W&B: the spec has no tracking.wandb, so the pods track to project 'ftcluster' (online where "
                          f"the '{options.wandb_secret}' Secret holds a key); set tracking.wandb.project=NAME, or "
                          "--wandb-secret '' for none")
    if out is None:
        print(text, end="")
    else:
        write_text_atomic(out, text)
        console.print(f"[green]✓[/] wrote {out} (kubectl apply -f {out})")


def interruptible(command):
    """Ctrl+C / SIGTERM inside a command: one line and exit 128 + signal (typer would exit 130 silently)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as exc:
            from ftcluster.core.interrupts import signal_of

            signum = signal_of(exc)
            err_console.print(f"interrupted ({signal.Signals(signum).name})")
            sys.exit(128 + signum)

    return run


def main() -> None:
    """Console entry point: user errors become one line per problem on stderr and exit code 2."""
    from ftcluster.core.interrupts import STOP

    quiet_libraries()
    STOP.install()
    for command in app.registered_commands:
        command.callback = interruptible(command.callback)
    try:
        app()
    except FtError as exc:
        for line in str(exc).splitlines():
            err_console.print(f"[red]error:[/] {line}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:
        if storage_errno(exc) is None:
            raise
        err_console.print(f"[red]error:[/] {io_error_line(exc)}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
