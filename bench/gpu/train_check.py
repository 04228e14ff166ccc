"""Short runs of ftcluster's own training loop in this process, without Ray (what `ftcluster train
--no-ray` does), on a small random Llama with a byte tokenizer and synthetic arithmetic data.

    python bench/gpu/train_check.py zero --stage 2 --json out.json   # DeepSpeed ZeRO-2, one process
    python bench/gpu/train_check.py zero --stage 3 --json out.json   # ZeRO-3
    python bench/gpu/train_check.py precision --json out.json        # bf16 vs fp32, same batches
    ... --smoke                                                      # CPU, 2-layer model, fewer steps

zero: torch.distributed is set up for one process (rank 0 of 1: NCCL on a GPU, gloo on CPU), as
Ray Train does for each of its workers, and the loop runs with distributed.backend=deepspeed (bf16
on a GPU). The same job without DeepSpeed runs next, for comparison (reported, not judged: DeepSpeed
keeps fp32 master weights, the plain bf16 loop trains bf16 weights). Passes when every step's loss
is finite and the last is below the first.

precision: the same job (LoRA, and full fine-tuning) twice: bf16 weights with bf16 autocast, and
fp32 throughout; the data order is seeded, so both see the same batches. Passes when every step's
loss agrees within --rtol.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# the model: a Llama shape, small enough for seconds per run on one GPU (about 12M parameters)
GPU_MODEL = dict(hidden_size=512, layers=4, heads=8, kv_heads=4, intermediate_size=1408)
CPU_MODEL = dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


class Bench:
    def __init__(self, work: Path, smoke: bool):
        import torch

        from ftcluster.models.tiny import arithmetic_rows, make_tiny_llama

        self.work, self.smoke = work, smoke
        self.cuda = torch.cuda.is_available() and not smoke
        self.model = str(make_tiny_llama(work / "model", **(CPU_MODEL if smoke else GPU_MODEL)))
        self.train = write_jsonl(work / "train.jsonl", arithmetic_rows(512, 0, largest=99))
        self.val = write_jsonl(work / "val.jsonl", arithmetic_rows(16, 1, largest=99))

    def run(self, name: str, **sections) -> dict:
        """One loop run; returns its summary plus the per-step training losses."""
        from ftcluster.config.spec import build_spec
        from ftcluster.launch.launcher import run_in_process

        spec = {
            "name": name,
            "model": {"path": self.model},
            "method": {"name": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}},
            "data": {"train": self.train, "validation": self.val, "format": "instruction",
                     "max_length": 64 if self.smoke else 128},
            "training": {"max_steps": 4 if self.smoke else 8, "batch_size": 4 if self.smoke else 8, "lr": 1e-3,
                         "log_every": 1, "scheduler": "constant", "threads": 1 if self.smoke else None},
            "eval": {"before_after": False},
            "scaling": {"use_gpu": self.cuda},
            "output": {"dir": str(self.work / "runs" / name)},
        }
        for key, value in sections.items():
            spec[key] = {**spec.get(key, {}), **value}
        started = time.perf_counter()
        summary = run_in_process(build_spec(spec))
        metrics = [json.loads(line) for line in (self.work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        losses = [row["train_loss"] for row in metrics if "train_loss" in row]
        return {"seconds": round(time.perf_counter() - started, 2), "losses": losses,
                "peak_memory_mb": summary.get("peak_memory_mb"), "precision": summary.get("precision"),
                "device": summary.get("device"), "steps": summary.get("steps"),
                "tokens_per_s": summary.get("tokens_per_s")}


def max_rel_diff(a: list[float], b: list[float]) -> float | None:
    if len(a) != len(b) or not a:
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def single_process_group(cuda: bool) -> None:
    """torch.distributed for one process, as Ray Train sets it up for each worker."""
    import torch
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    if cuda:
        torch.cuda.set_device(0)
    else:
        # DeepSpeed's CPU backend compiles a shared-memory all-reduce (C++, minutes on 2 cores) when it
        # wraps the process group; one process never uses it
        # (importlib: `import deepspeed.comm.torch as m` gives the torch package, which deepspeed.comm
        # re-exports under that name)
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)


def check_zero(bench: Bench, stage: int) -> dict:
    import torch.distributed as dist

    single_process_group(bench.cuda)
    precision = "bf16" if bench.cuda else "fp32"
    common = {"method": {"name": "full"}, "training": {"precision": precision, "max_grad_norm": None}}
    ours = bench.run(f"zero{stage}", distributed={"backend": "deepspeed", "zero_stage": stage}, **common)
    plain = bench.run(f"plain-{stage}", **common)
    dist.destroy_process_group()
    losses = ours["losses"]
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    passed = finite and len(losses) == ours["steps"] and losses[-1] < losses[0]
    return {"summary": {"stage": stage, "precision": precision, "steps": ours["steps"], "passed": passed,
                        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                        "peak_memory_mb": ours["peak_memory_mb"],
                        "max_rel_diff_vs_plain_loop": max_rel_diff(losses, plain["losses"])},
            "deepspeed": ours, "plain": plain}


def check_precision(bench: Bench, rtol: float) -> dict:
    out, summary = {}, {"rtol": rtol}
    for method in ("lora", "full"):
        runs = {}
        for precision, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
            runs[precision] = bench.run(f"{method}-{precision}", method={"name": method},
                                        model={"dtype": dtype}, training={"precision": precision})
        difference = max_rel_diff(runs["bf16"]["losses"], runs["fp32"]["losses"])
        out[method] = runs
        summary[method] = {"max_rel_diff": difference, "passed": difference is not None and difference <= rtol,
                           "bf16_losses": runs["bf16"]["losses"], "fp32_losses": runs["fp32"]["losses"]}
    summary["passed"] = all(summary[m]["passed"] for m in ("lora", "full"))
    return {"summary": summary, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["zero", "precision"])
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], default=2, help="zero: the ZeRO stage.")
    parser.add_argument("--rtol", type=float, default=0.02, help="precision: largest relative loss difference.")
    parser.add_argument("--smoke", action="store_true", help="CPU, 2-layer model, 4 steps.")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    args = parser.parse_args()
    from ftcluster.core.quiet import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="ftc-train-check-") as tmp:
        bench = Bench(Path(tmp), args.smoke)
        result = check_zero(bench, args.stage) if args.check == "zero" else check_precision(bench, args.rtol)
    result["smoke"] = args.smoke
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not result["summary"]["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
