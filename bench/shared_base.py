"""Shared-base sweeps (`ftcluster tune --shared-base N`) against the same trials as separate Tune trials.

One invocation runs, for each N in --trials, the same LoRA sweep twice with `ftcluster tune`
(same job, space and searcher seed, so the same N trials): as N separate Ray Tune trials, one at a
time, and as one pack of N over one base; both on one core with one torch thread (on a shared
2-core machine a second thread in one process is what other processes slow down most). Reported
per sweep, from the trials' folders:

  memory    separate: the sum of each trial's process peak RSS (what N trials held at once would
            need); pack: the pack process's peak RSS. Target at N=8: pack <= 0.4 x separate.
  tokens/s  every trial's trained tokens over the `ftcluster tune` command's wall time (Ray's
            start-up included, the same for both). Target: pack >= separate.
  loss      the largest relative difference of a trial's last training loss, pack vs separate.

    .venv/bin/python bench/shared_base.py                       # SmolLM2-135M, 4 and 8 trials
    .venv/bin/python bench/shared_base.py --trials 2 --steps 2 --model tiny   # quick smoke run

--in-process (what bench/gpu/shared_base.sh runs on a GPU, where there is no Ray): the same
comparison without Tune, each arm in a process of its own: the N trials one after another, each
its own process (peak: torch.cuda.max_memory_allocated on a GPU, peak RSS on CPU; memory
"separate" is the sum, what N held at once would need), against one process training the pack.
Trials: LoRA ranks 8/16/32/64 in turn, learning rates 1e-4..1e-3, seeds 0..N-1. --model also
takes a Llama shape (llama-3.2-1b: random weights, byte tokenizer).

    python bench/shared_base.py --in-process --model llama-3.2-1b --trials 4,8 --steps 6 --seq 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SPACE = {
    "training.lr": {"loguniform": [1.0e-4, 3.0e-3]},
    "method.lora.rank": {"choice": [4, 8, 16]},
    "method.lora.alpha": {"expr": "2 * method.lora.rank"},
    "training.seed": {"choice": [0, 1, 2, 3]},
}


def job_for(model: str, steps: int, cores: int, folder: Path, max_length: int) -> Path:
    """The quickstart's LoRA job, trimmed to training (no evaluation), on ``cores`` cores."""
    spec = yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text())
    for key in ("train", "validation"):
        spec["data"][key] = str(REPO / spec["data"][key])
    spec["model"]["path"] = model
    spec["data"]["max_length"] = max_length
    spec["training"] |= {"max_steps": steps, "batch_size": 4, "log_every": 1, "checkpoint_every": None,
                         "threads": cores, "warmup_steps": 1}
    spec["eval"] = {"every": None, "before_after": False}
    spec["scaling"] |= {"cpus_per_worker": cores}
    path = folder / f"job-{cores}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_sweep(job: Path, space: Path, out: Path, trials: int, shared: int) -> dict:
    """One `ftcluster tune`; its wall time and, per trial, params, tokens, peak memory, last loss."""
    command = [str(REPO / ".venv" / "bin" / "ftcluster"), "tune", str(job), str(space), "--trials", str(trials),
               "--concurrent", "1", "--scheduler", "none", "--shared-base", str(shared), "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    rows = []
    for info in sorted((out / "trials").glob("*/trial.json")):
        if json.loads(info.read_text())["status"] != "completed":
            raise SystemExit(f"{info}: {info.read_text()}")
        records = [json.loads(line) for line in (info.parent / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in records if "train_loss" in r]
        rows.append({"params": json.loads(info.read_text())["params"], "tokens": logged[-1]["tokens"],
                     "peak_memory_mb": max(r["peak_memory_mb"] for r in logged), "loss": logged[-1]["train_loss"],
                     "tokens_per_s": sum(r["tokens_per_s"] for r in logged) / len(logged)})
    assert len(rows) == trials, f"{out}: {len(rows)} trials, expected {trials}"
    return {"wall_s": wall, "trials": rows, "command": " ".join(command[1:])}


def in_process_job(model: str, steps: int, folder: Path, seq: int, gpu: bool) -> dict:
    """The in-process job: the quickstart's data, LoRA on every linear layer, no evaluation."""
    spec = yaml.safe_load(job_for(model, steps, 1, folder, seq).read_text())
    spec["scaling"] = {"use_gpu": gpu, "cpus_per_worker": 1}
    spec["training"] |= {"precision": "bf16" if gpu else "fp32"}
    return spec


def in_process_specs(base: dict, count: int, folder: Path, arm: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        spec = json.loads(json.dumps(base))
        rank = (8, 16, 32, 64)[index % 4]
        spec["name"] = f"{arm}-{index}"
        spec["method"]["lora"] |= {"rank": rank, "alpha": 2 * rank}
        spec["training"] |= {"lr": 1e-4 * 10 ** (index / max(1, count - 1)), "seed": index}
        spec["output"] = {"dir": str(folder / arm / str(index))}
        path = folder / f"{arm}-{index}.yaml"
        path.write_text(yaml.safe_dump(spec))
        paths.append(path)
    return paths


def child(arm: str, paths: list[Path]) -> None:
    """One arm's process: train the trial (separate) or the pack; print peak bytes, tokens, seconds."""
    import resource

    import torch

    from ftcluster.config.spec import load_spec
    from ftcluster.core.worker import WorkerContext
    from ftcluster.training.loop import train
    from ftcluster.training.shared_base import PackTrial, train_pack

    specs = [load_spec(path) for path in paths]
    started = time.perf_counter()
    if arm == "pack":
        train_pack([PackTrial(spec, WorkerContext(), f"t{i}") for i, spec in enumerate(specs)])
    else:
        train(specs[0], WorkerContext(), verbose=False)
    seconds = time.perf_counter() - started
    cuda = torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = []
    for spec in specs:
        records = [json.loads(line) for line in (Path(spec.output.dir) / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in records if "train_loss" in r]
        rows.append({"name": spec.name, "tokens": logged[-1]["tokens"], "loss": logged[-1]["train_loss"]})
    print("RESULT " + json.dumps({"peak_bytes": peak, "seconds": seconds, "trials": rows}), flush=True)


def run_child(arm: str, paths: list[Path]) -> dict:
    command = [sys.executable, __file__, "--child", arm, *map(str, paths)]
    if os.environ.get("FTC_NORAY_REPORT") is not None:  # under bench/gpu: no Ray, as on the GPU machine
        command[1:1] = [str(REPO / "bench" / "gpu" / "noray.py")]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return result | {"wall_s": time.perf_counter() - started}


def in_process(count: int, base: dict, folder: Path) -> dict:
    separate = [run_child("separate", [path]) for path in in_process_specs(base, count, folder, "separate")]
    pack = run_child("pack", in_process_specs(base, count, folder, "pack"))
    tokens = sum(r["trials"][0]["tokens"] for r in separate)
    assert tokens == sum(t["tokens"] for t in pack["trials"]), "the two arms trained different tokens"
    losses = [abs(p["loss"] - s["trials"][0]["loss"]) / abs(s["trials"][0]["loss"])
              for p, s in zip(pack["trials"], separate)]
    memory_separate = sum(r["peak_bytes"] for r in separate)
    seconds_separate = sum(r["wall_s"] for r in separate)
    return {
        "tokens": tokens, "memory_separate_mb": round(memory_separate / 2**20),
        "memory_pack_mb": round(pack["peak_bytes"] / 2**20), "memory_ratio": round(pack["peak_bytes"] / memory_separate, 3),
        "tokens_per_s_separate": round(tokens / seconds_separate, 1), "tokens_per_s_pack": round(tokens / pack["wall_s"], 1),
        "throughput_ratio": round(seconds_separate / pack["wall_s"], 3),
        "wall_s_separate": round(seconds_separate, 1), "wall_s_pack": round(pack["wall_s"], 1),
        "largest_rel_loss_diff": float(f"{max(losses):.2e}"),
    }


def summarize(separate: dict, pack: dict) -> dict:
    tokens = sum(r["tokens"] for r in separate["trials"])
    assert tokens == sum(r["tokens"] for r in pack["trials"]), "the two sweeps trained different tokens"
    memory_separate = sum(r["peak_memory_mb"] for r in separate["trials"])
    memory_pack = max(r["peak_memory_mb"] for r in pack["trials"])  # one process: every member reports its peak
    by_params = {json.dumps(r["params"], sort_keys=True): r["loss"] for r in separate["trials"]}
    loss_diff = max(abs(r["loss"] - by_params[json.dumps(r["params"], sort_keys=True)]) / abs(r["loss"])
                    for r in pack["trials"])
    return {
        "tokens": tokens,
        "memory_separate_mb": round(memory_separate), "memory_pack_mb": round(memory_pack),
        "memory_ratio": round(memory_pack / memory_separate, 3),
        "tokens_per_s_separate": round(tokens / separate["wall_s"], 1),
        "tokens_per_s_pack": round(tokens / pack["wall_s"], 1),
        "throughput_ratio": round(separate["wall_s"] / pack["wall_s"], 3),
        "wall_s_separate": round(separate["wall_s"], 1), "wall_s_pack": round(pack["wall_s"], 1),
        "largest_rel_loss_diff": float(f"{loss_diff:.2e}"),
    }


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2], [Path(p) for p in sys.argv[3:]])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", default="4,8", help="comma-separated trial counts (each: one pack of that size)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a model path or alias; 'tiny': a random tiny Llama; with --in-process also a Llama shape")
    parser.add_argument("--in-process", action="store_true", help="no Ray Tune: each arm in a process of its own")
    parser.add_argument("--seq", type=int, default=None, help="data.max_length (default 128; 1024 for byte tokenizers)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="ftc-shared-base-") as tmp:
        folder = Path(tmp)
        model, byte_tokens = model_for(args.model, folder)
        max_length = args.seq or (1024 if byte_tokens else 128)  # (a byte tokenizer needs longer sequences)
        space = folder / "space.yaml"
        space.write_text(yaml.safe_dump(SPACE))
        job = job_for(model, args.steps, 1, folder, max_length)
        for count in (int(n) for n in args.trials.split(",")):
            if args.in_process:
                import torch

                base = in_process_job(model, args.steps, folder, max_length, torch.cuda.is_available())
                results[count] = in_process(count, base, folder / f"n{count}")
            else:
                separate = run_sweep(job, space, folder / f"separate-{count}", count, 1)
                pack = run_sweep(job, space, folder / f"pack-{count}", count, count)
                results[count] = summarize(separate, pack) | {"separate": separate["command"], "pack": pack["command"]}
            print(json.dumps({count: {k: v for k, v in results[count].items() if k not in ("separate", "pack")}}),
                  flush=True)
            if args.json:  # after each count: a later one that fails keeps the earlier ones
                args.json.write_text(json.dumps(results, indent=1))


def model_for(name: str, folder: Path) -> tuple[str, bool]:
    """(model path, whether its tokenizer is the tiny byte tokenizer)."""
    from ftcluster.models.shapes import LLAMA_SHAPES
    from ftcluster.models.tiny import byte_tokenizer, make_tiny_llama

    if name == "tiny":
        return str(make_tiny_llama(folder / "tiny")), True
    if name in LLAMA_SHAPES:
        import torch

        sys.path.insert(0, str(REPO / "bench"))
        from planner_memory import random_llama

        gpu = torch.cuda.is_available()
        path = random_llama(name, folder / name, torch.device("cuda" if gpu else "cpu"),
                            torch.bfloat16 if gpu else torch.float32)
        byte_tokenizer().save_pretrained(path)
        return str(path), True
    return name, False


if __name__ == "__main__":
    main()
