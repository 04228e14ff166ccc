"""Bookkeeping for bench/gpu/run.sh and memory.sh (standard library only: runs before any wheel is in).

    collect.py record WORK NAME STATUS EXIT_CODE START_S END_S TIMEOUT_S NOTE   # one sub-step's record
    collect.py write WORK OUT.json [final|interrupted]                          # the whole JSON, again
    collect.py summary OUT.json         # print it short; exit 1 when a sub-step failed or timed out

A sub-step may leave WORK/NAME.json (its own results, merged in as "result") and WORK/NAME.xml (a
pytest JUnit report: counts). Its output is WORK/NAME.out; the tail of it lands in the record when
the sub-step did not succeed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "pydantic", "triton",
            "safetensors", "ray", "wandb", "optuna")
LORA_RATIO_TARGET, FULL_MFU_TARGET, PLANNER_TOLERANCE = 1.5, 0.5, 0.10


def pytest_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    cases = []
    for suite in suites:
        for case in suite.iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child.tag if child.tag != "skipped" else f"skipped: {child.get('message', '')[:120]}"
            cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "cases": cases}


def record(work: Path, name: str, status: str, code: str, start: str, end: str, timeout: str, note: str) -> None:
    started = float(os.environ.get("FTC_STARTED", start))
    entry = {"name": name, "status": status, "exit_code": int(code), "seconds": round(float(end) - float(start), 1),
             "timeout_s": int(timeout), "started_after_s": round(float(start) - started, 1), "note": note or None}
    result = work / f"{name}.json"
    if result.is_file():
        try:
            entry["result"] = json.loads(result.read_text())
        except ValueError as exc:
            entry["result_error"] = f"unreadable {result.name}: {exc}"
    report = work / f"{name}.xml"
    if report.is_file():
        try:
            entry["pytest"] = pytest_counts(report)
        except ET.ParseError as exc:
            entry["result_error"] = f"unreadable {report.name}: {exc}"
    output = work / f"{name}.out"
    if status not in ("ok", "skipped") and output.is_file():
        entry["output_tail"] = output.read_text(errors="replace").splitlines()[-40:]
    with (work / "steps.jsonl").open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[2]), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def steps_of(work: Path) -> list[dict]:
    path = work / "steps.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(json.loads(line))
        except ValueError:  # the other lane's record, half written: the next write has it
            continue
    return steps


def by_name(steps: list[dict]) -> dict[str, dict]:
    return {step["name"]: step for step in steps}


def summarize_run(steps: dict[str, dict]) -> dict:
    out: dict = {}
    result = steps.get("throughput", {}).get("result")
    if result:
        cases, targets = {}, {}
        for method in dict.fromkeys(row["method"] for row in result["rows"]):
            base = next(r for r in result["rows"] if r["method"] == method and r["runner"] == "baseline")
            ours = next((r for r in result["rows"] if r["method"] == method and r["runner"] == "ftcluster"), None)
            if ours is None:
                continue
            cases[method] = {"baseline_tokens_per_s": base["tokens_per_s"], "ftcluster_tokens_per_s": ours["tokens_per_s"],
                             "ratio": ours["tokens_per_s"] / base["tokens_per_s"], "baseline_mfu": base["mfu"],
                             "ftcluster_mfu": ours["mfu"], "baseline_peak_memory_gb": base["peak_memory_gb"],
                             "ftcluster_peak_memory_gb": ours["peak_memory_gb"]}
            if "target" in ours:
                targets[method] = ours["target"]
        out["device"] = result.get("device")
        out["cases"] = cases
        out["targets"] = targets
        if result.get("qlora_estimate_gb") is not None and cases.get("qlora", {}).get("ftcluster_peak_memory_gb"):
            measured = cases["qlora"]["ftcluster_peak_memory_gb"]
            out["qlora_memory"] = {"planner_gb": result["qlora_estimate_gb"], "measured_peak_gb": measured,
                                   "measured_over_planned": measured / result["qlora_estimate_gb"],
                                   "note": "planner total includes its GPU runtime allowance; the peak does not"}
        out["profiled"] = result.get("profiled", [])
    documents = steps.get("documents", {}).get("result")
    if documents:
        rows = {row["runner"]: row for row in documents["rows"]}
        if {"baseline", "ftcluster"} <= rows.keys():
            out["documents"] = {
                "padded_tokens_per_s": rows["baseline"]["tokens_per_s"],
                "packed_tokens_per_s": rows["ftcluster"]["tokens_per_s"],
                "packed_over_padded": rows["ftcluster"]["tokens_per_s"] / rows["baseline"]["tokens_per_s"],
                "steps": {"padded": rows["baseline"]["steps"], "packed": rows["ftcluster"]["steps"]},
            }
    return out


def planner_rows(rows: list[dict]) -> dict:
    return {row["case"]: {"estimated_mb": round(row["estimated_mb"]), "measured_mb": round(row["measured_mb"]),
                          "ratio": round(row["ratio"], 3), "within_10pct": abs(row["ratio"] - 1) <= PLANNER_TOLERANCE,
                          "losses": row.get("losses")} for row in rows}


def summarize_memory(steps: dict[str, dict]) -> dict:
    out: dict = {}
    tests = steps.get("pytest_gpu", {}).get("pytest")
    if tests:
        out["pytest_gpu"] = {k: tests[k] for k in ("passed", "failures", "errors", "skipped")}
    for name in ("planner_1b", "qlora_8b"):
        rows = steps.get(name, {}).get("result")
        if rows:
            out[name] = planner_rows(rows)
    if "planner_1b" in out:
        out["planner_1b_all_within_10pct"] = all(row["within_10pct"] for row in out["planner_1b"].values())
    if "qlora_8b" in steps:
        out["qlora_8b_fits_and_trains"] = steps["qlora_8b"]["status"] == "ok" and bool(out.get("qlora_8b"))
    for name in ("zero2", "zero3", "bf16_vs_fp32"):
        result = steps.get(name, {}).get("result")
        if result:
            out[name] = result.get("summary", result)
    return out


def write(work: Path, target: Path, state: str) -> None:
    steps = steps_of(work)
    script = os.environ.get("FTC_SCRIPT", target.stem)
    started = float(os.environ.get("FTC_STARTED", time.time()))
    violations_file = work / "noray.jsonl"
    violations = []
    if violations_file.is_file():
        for line in violations_file.read_text().splitlines():
            if line.strip() and json.loads(line) not in violations:
                violations.append(json.loads(line))
    named = by_name(steps)
    doc = {
        "script": script,
        "smoke": os.environ.get("FTC_SMOKE") == "1",
        "state": {"final": "finished", "interrupted": "interrupted"}.get(state, "running"),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "budget_s": int(os.environ.get("FTC_BUDGET", 0) or 0),
        "gpu": os.environ.get("FTC_GPU_INFO") or None,
        "python": f"{platform.python_version()} ({os.environ.get('FTC_PYTHON_USED', sys.executable)})",
        "packages": versions(),
        "commit": git_commit() if state else None,
        "no_ray": {"blocked": ["ray", "wandb", "optuna", *filter(None, os.environ.get("FTC_NORAY_ALSO", "").split(","))],
                   "violations": violations},
        "status_counts": {s: sum(step["status"] == s for step in steps) for s in ("ok", "failed", "timeout", "skipped")},
        "summary": summarize_run(named) if script == "run" else summarize_memory(named),
        "steps": steps,
    }
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, target)


def summary(target: Path) -> int:
    doc = json.loads(target.read_text())
    print(f"\n{doc['script']}: {doc['state']} in {doc['elapsed_s']:.0f}s, {doc['gpu'] or 'CPU'}"
          f"{' (smoke)' if doc['smoke'] else ''}; steps {doc['status_counts']}")
    for step in doc["steps"]:
        print(f"  {step['name']:<14} {step['status']:<8} {step['seconds']:>6.1f}s  {step.get('note') or ''}")
    print(json.dumps(doc["summary"], indent=1, default=str))
    if doc["no_ray"]["violations"]:
        print(f"NO-RAY VIOLATIONS: {doc['no_ray']['violations']}")
    print(f"written: {target}")
    bad = doc["status_counts"]["failed"] + doc["status_counts"]["timeout"] + len(doc["no_ray"]["violations"])
    return 1 if bad else 0


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "record":
        record(Path(args[0]), *args[1:])
    elif command == "write":
        write(Path(args[0]), Path(args[1]), args[2] if len(args) > 2 else "")
    elif command == "summary":
        sys.exit(summary(Path(args[0])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
