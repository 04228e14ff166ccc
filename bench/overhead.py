"""Overhead of `ftcluster train` (Ray Train, 1 worker) against a minimal hand-written PyTorch loop.

Both train the same model with the same method, on the same batches, with the same number of
threads, in one invocation. Reported: steady-state tokens/s (after warm-up steps), the ratio
ftcluster / baseline (target >= 0.95), and time to the first finished step.

    .venv/bin/python bench/overhead.py                  # SmolLM2-135M + LoRA, 24 steps
    .venv/bin/python bench/overhead.py --steps 8 --model tiny   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import torch  # noqa: E402

from ftcluster.config.spec import load_spec  # noqa: E402
from ftcluster.core.quiet import quiet_libraries  # noqa: E402
from ftcluster.data import build_data  # noqa: E402
from ftcluster.data.batches import StepOrder, collate  # noqa: E402
from ftcluster.launch.launcher import run_in_process, run_with_ray  # noqa: E402
from ftcluster.models.load import load_tokenizer, resolve_model  # noqa: E402
from ftcluster.models.methods import apply_method  # noqa: E402
from ftcluster.models.tiny import make_tiny_llama  # noqa: E402
from ftcluster.runs.paths import RunPaths  # noqa: E402


def baseline(spec, warmup: int) -> dict:
    """The loop a person would write by hand: model + peft, AdamW, forward/backward/step."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    torch.set_num_threads(spec.training.threads)
    torch.manual_seed(spec.training.seed)
    resolved = resolve_model(spec.model.path)
    tokenizer = load_tokenizer(resolved)
    data = build_data(spec.data, tokenizer)
    model = apply_method(AutoModelForCausalLM.from_pretrained(resolved.source), spec.method, "causal_lm")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.training.lr)
    order = StepOrder(len(data.train), spec.training.batch_size, 1, 1, spec.training.seed)
    model.train()
    first_step = None
    tokens, seconds = 0, 0.0
    for step in range(spec.training.max_steps):
        batch = collate([data.train[i] for i in order.micro_batches(step, 0)[0]], tokenizer.pad_token_id)
        tick = time.perf_counter()
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        first_step = first_step or done - started
        if step >= warmup:
            tokens += int(batch["attention_mask"].sum())
            seconds += done - tick
    return {"tokens_per_s": tokens / seconds, "first_step_s": first_step}


def ftcluster_run(spec, warmup: int, with_ray: bool) -> dict:
    started = time.time()
    (run_with_ray if with_ray else run_in_process)(spec)
    records = [json.loads(line) for line in (RunPaths.of(spec).local / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    steady = [r for r in steps if r["step"] > warmup]
    tokens = steady[-1]["tokens"] - steps[warmup - 1]["tokens"] if warmup else steady[-1]["tokens"]
    seconds = sum(r["step_time_s"] for r in steady)
    return {"tokens_per_s": tokens / seconds, "first_step_s": steps[0]["time"] - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model.path, or 'tiny' for a random 2-layer Llama")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the steady-state rate")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    quiet_libraries()

    work = Path(tempfile.mkdtemp(prefix="ftcluster-bench-"))
    model = str(make_tiny_llama(work / "tiny")) if args.model == "tiny" else args.model
    overrides = [
        f"model.path={model}", f"training.max_steps={args.steps}", f"training.threads={args.threads}",
        f"scaling.cpus_per_worker={args.threads}", "training.log_every=1", "training.checkpoint_every=null",
        "training.scheduler=constant", "training.warmup_steps=0", "training.max_grad_norm=null",
        "eval.every=null", "eval.before_after=false", "eval.generation=null", "eval.forgetting=null",
        "eval.few_shot_baseline=null", f"output.dir={work / 'run'}",
    ]
    if args.model == "tiny":
        overrides.append("data.max_length=512")  # byte-level tokens: longer sequences
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", overrides)
    base = baseline(spec, args.warmup)
    in_process = ftcluster_run(spec.model_copy(update={"output": spec.output.model_copy(update={"dir": str(work / "local")})}),
                               args.warmup, with_ray=False)
    ray_train = ftcluster_run(spec, args.warmup, with_ray=True)
    result = {"model": args.model, "steps": args.steps, "threads": args.threads, "rows": []}
    print("| runner | tokens/s | ratio to baseline | time to first step |")
    print("|---|---|---|---|")
    for label, measured in (("hand-written PyTorch loop (baseline)", base),
                            ("ftcluster train --no-ray", in_process),
                            ("ftcluster train (Ray Train, 1 worker)", ray_train)):
        ratio = measured["tokens_per_s"] / base["tokens_per_s"]
        result["rows"].append({"runner": label, "tokens_per_s": round(measured["tokens_per_s"], 1),
                               "ratio": round(ratio, 3), "first_step_s": round(measured["first_step_s"], 1)})
        print(f"| {label} | {measured['tokens_per_s']:,.1f} | {ratio:.3f} | {measured['first_step_s']:.1f} s |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
