"""Training-step throughput and memory on one GPU: ftcluster's step against the usual Hugging Face
setup, same process, same GPU, same model, same batches. Runs without Ray (torch, transformers,
peft; bitsandbytes for QLoRA).

Model: Llama-architecture, random init in bf16 (weights do not change speed), Llama-3.2-1B shapes
(or 8B), sequence length 2048, synthetic full-length sequences.

    baseline   AutoModelForCausalLM (+ peft), SDPA attention, bf16, the model's own loss
               (`labels=`: full logits tensor), torch AdamW defaults, loss.item() every step
    ftcluster  the same model through ftcluster's method setup, its chunked loss (no full logits,
               trained positions only), fused AdamW, no host sync inside the step

Cases: lora (rank 16, all linear layers), full, qlora (4-bit NF4 base + LoRA).
Reported: tokens/s, MFU against the GPU's peak (by device name), peak memory, ratio to baseline;
for QLoRA also the planner's weight + adapter + activation estimate.

    .venv/bin/python bench/gpu_throughput.py                          # 1B shapes, all cases
    .venv/bin/python bench/gpu_throughput.py --shape llama-3.1-8b --cases lora,qlora
    .venv/bin/python bench/gpu_throughput.py --smoke                  # CPU, tiny model: CI check
    .venv/bin/python bench/gpu_throughput.py --profile profile.txt     # + kernel tables of missed targets

Targets (ftcluster runner, full-length mode): LoRA tokens/s >= 1.5x the baseline's, full fine-tune
MFU >= 50%. With --profile, a case that misses its target (or whose figure is unknown, e.g. MFU on
CPU) runs a few more steps under torch.profiler and its top-kernels table is appended to the file
(for LoRA the baseline's table too, taken in the same run, to compare).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ftcluster.models.shapes import LLAMA_SHAPES  # noqa: E402

SHAPES = {
    **{name: {"tie_word_embeddings": False, **LLAMA_SHAPES[name]} for name in ("llama-3.2-1b", "llama-3.1-8b")},
    # ~25M parameters: big enough that compute, not Python, dominates a CPU step
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=16000, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),
}
LORA = {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
# method: (row field, target); "ratio" is the ftcluster runner's tokens/s over the baseline's
TARGETS = {"lora": ("ratio", 1.5), "full": ("mfu", 0.5)}


def build_model(shape: str, seq: int, folder: Path, dtype, device, method_name: str, attention: str = "sdpa"):
    """A random-init Llama; QLoRA reloads it from disk through bitsandbytes, as a user would."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftcluster.config.spec import MethodSpec
    from ftcluster.models.methods import quantization_config

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 2048), attn_implementation=attention)
    torch.manual_seed(0)
    if method_name != "qlora":
        return random_init(config, dtype, device)
    if not (folder / "config.json").exists():
        random_init(config, dtype, device).save_pretrained(folder)
    quant = quantization_config(MethodSpec(name="qlora"), dtype)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=dtype,
                                                device_map={"": device}, attn_implementation=attention)


def random_init(config, dtype, device):
    """Random weights made where they will live, in their final dtype (on a GPU: seconds, not a
    minute of CPU init for a 1B model). Both runners build their model the same way."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def full_length_batches(vocab: int, batch: int, seq: int, count: int) -> list[tuple[dict[str, torch.Tensor], int]]:
    """(batch, real tokens) pairs of synthetic full-length sequences: nothing to pad or pack."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        out.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, batch * seq))
    return out


def documents(vocab: int, seq: int, count: int) -> list[list[int]]:
    """Synthetic documents of chat-data-like lengths: log-normal around seq / 6, clipped to [16, seq]."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.empty(count).log_normal_(mean=float(torch.log(torch.tensor(seq / 6))), std=0.8, generator=generator)
    return [torch.randint(0, vocab, (int(n),), generator=generator).tolist() for n in lengths.clamp(16, seq)]


def document_batches(runner: str, docs: list[list[int]], batch: int, seq: int) -> list[tuple[dict, int]]:
    """The same documents, as each runner feeds them: the baseline pads each batch of documents to its
    longest (what DataCollatorWithPadding does); ftcluster packs them into rows of `seq` tokens."""
    from ftcluster.data.batches import collate
    from ftcluster.data.dataset import pack
    from ftcluster.data.render import Encoded

    encoded = [Encoded(doc, [True] * len(doc)) for doc in docs]
    rows = pack(encoded, seq) if runner == "ftcluster" else encoded
    groups = [rows[i : i + batch] for i in range(0, len(rows) - batch + 1, batch)]
    return [(collate(group, pad_id=0), sum(len(row.input_ids) for row in group)) for group in groups]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def target_check(row: dict, baseline: dict | None) -> dict | None:
    """Whether the ftcluster runner's row meets its case's target (None: the case has none)."""
    if row["method"] not in TARGETS or row["runner"] != "ftcluster":
        return None
    field, target = TARGETS[row["method"]]
    value = row["tokens_per_s"] / baseline["tokens_per_s"] if field == "ratio" and baseline else row.get(field)
    return {"metric": "tokens/s ratio to baseline" if field == "ratio" else field, "value": value, "target": target,
            "met": None if value is None else value >= target}


def profile_table(step, steps: int, device) -> str:
    """Top kernels (by self device time on a GPU, self CPU time on CPU) over `steps` more steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for index in range(steps):
            step(index)
        sync(device)
    averages = prof.key_averages()
    for key in (("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ()) + (
            "self_cpu_time_total",):
        try:
            return averages.table(sort_by=key, row_limit=25, max_name_column_width=70)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=25)


def run_case(runner: str, method_name: str, args, device, dtype, folder: Path, baseline: dict | None = None,
             profiles: dict | None = None) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from ftcluster.config.spec import MethodSpec
    from ftcluster.models.methods import apply_method
    from ftcluster.objectives.sft import SFTObjective
    from ftcluster.training.optim import build_optimizer, param_groups

    if device.type == "cuda":
        import gc

        gc.collect()  # the previous case's model and optimizer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    attention = args.attention if runner == "ftcluster" else "sdpa"
    model = build_model(args.shape, args.seq, folder, dtype, device, method_name, attention)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if runner == "baseline":
        if method_name == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.grad_ckpt)
        if method_name in ("lora", "qlora"):
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def loss_of(batch):
            return model(**batch, use_cache=False).loss
    else:
        method = MethodSpec(name=method_name, lora=LORA)
        model = apply_method(model, method, "causal_lm", args.grad_ckpt)
        groups = param_groups(model, 1e-4, 0.0, None, lambda name, p: p.requires_grad)
        optimizer = build_optimizer(groups, (0.9, 0.999), device.type)
        from ftcluster.models.chunked_loss import output_head

        objective = SFTObjective(output_head(model), chunk_tokens=args.chunk_tokens)

        def loss_of(batch):
            targets = (batch["labels"][:, 1:] != -100).sum()  # a tensor: no host sync
            return objective.loss_sum(model, batch) / targets
    model.train()
    vocab = SHAPES[args.shape]["vocab_size"]
    if args.lengths == "full":
        data = full_length_batches(vocab, args.batch, args.seq, args.warmup + args.steps)
    else:
        data = document_batches(runner, documents(vocab, args.seq, args.documents), args.batch, args.seq)
    autocast = torch.autocast(device.type, dtype=dtype) if device.type == "cuda" else contextlib.nullcontext()
    losses = []

    def step(host_batch) -> None:
        batch = {k: v.to(device) for k, v in host_batch.items()}
        with autocast:
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if runner == "baseline":
            losses.append(loss.item())  # what a typical loop does every step: a host sync
        else:
            losses.append(loss.detach())

    tokens = 0
    for index, (host_batch, real_tokens) in enumerate(data):
        if index == args.warmup:
            sync(device)
            started = time.perf_counter()
        tokens += real_tokens if index >= args.warmup else 0
        step(host_batch)
    sync(device)
    seconds = time.perf_counter() - started
    final_loss = float(losses[-1])
    from ftcluster.track.flops import flops_per_token, model_flops_utilization, peak_flops

    flops = flops_per_token(model, args.seq).total
    row = {
        "runner": runner, "method": method_name, "steps": len(data) - args.warmup, "tokens_per_s": tokens / seconds,
        "mfu": model_flops_utilization(tokens / seconds, flops, peak_flops(device), 1),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "final_loss": final_loss,
    }
    check = target_check(row, baseline) if args.lengths == "full" else None  # targets: full-length mode
    if check is not None:
        row["target"] = check
    if profiles is not None:  # --profile: tables of the cases that miss their target (or cannot tell)
        title = f"{method_name} / {runner}: {args.profile_steps} steps after the timed ones"
        again = lambda index: step(data[index % len(data)][0])  # noqa: E731
        ratio_case = args.lengths == "full" and TARGETS.get(method_name, ("",))[0] == "ratio"
        if runner == "baseline" and ratio_case:  # kept until ftcluster's row says whether it is needed
            profiles[(method_name, runner)] = (title, profile_table(again, args.profile_steps, device))
        if check is not None and not check["met"]:
            if (method_name, "baseline") in profiles:
                profiles[(method_name, "baseline")] += ("missed",)  # written beside ours, to compare
            profiles[(method_name, runner)] = (title, profile_table(again, args.profile_steps, device), "missed")
    return row


def qlora_estimate_gb(args) -> float | None:
    """The planner's per-GPU figure for the same QLoRA setup (weights + adapters + activations)."""
    from ftcluster.config.spec import build_spec
    from ftcluster.planning.plan import GB, plan_job

    if args.shape not in LLAMA_SHAPES:
        return None
    data = Path(tempfile.mkdtemp()) / "one-row.jsonl"  # the planner also sizes an epoch; one row will do
    data.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    spec = build_spec({
        "name": "bench", "model": {"path": args.shape}, "method": {"name": "qlora", "lora": LORA},
        "data": {"train": str(data), "max_length": args.seq},
        "training": {"batch_size": args.batch, "gradient_checkpointing": args.grad_ckpt, "precision": "bf16"},
        "scaling": {"use_gpu": True, "num_workers": 1},
    })
    return plan_job(spec).gpu_total / GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--cases", help="Comma-separated: lora, full, qlora (default all; lora,full with --smoke).")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="Micro batch (sequences per step).")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed steps first.")
    parser.add_argument("--grad-ckpt", action="store_true", help="Gradient checkpointing in both runners.")
    parser.add_argument("--chunk-tokens", type=int, default=4096, help="ftcluster's chunked loss: tokens per chunk.")
    parser.add_argument("--lengths", choices=["full", "documents"], default="full",
                        help="full: every sequence seq tokens long (pure step speed). documents: variable-length "
                             "documents, padded per batch by the baseline and packed by ftcluster; tokens/s then "
                             "counts real tokens only.")
    parser.add_argument("--documents", type=int, help="How many documents with --lengths documents (400; 24 with "
                        "--smoke).")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "flex_attention", "flash_attention_2"],
                        help="ftcluster runner's attention kernel (the baseline always uses sdpa).")
    parser.add_argument("--smoke", action="store_true", help="Tiny model on CPU, 2 steps: checks the script runs.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--profile", type=Path, help="Append torch.profiler top-kernel tables of the cases that miss "
                        "their target to this file (for LoRA also the baseline's, to compare).")
    parser.add_argument("--profile-steps", type=int, default=3, help="Steps profiled per case with --profile.")
    args = parser.parse_args()
    if args.smoke:
        args.shape, args.seq, args.batch, args.steps, args.warmup = "tiny", 64, 2, 2, 1
        args.cases = args.cases or "lora,full"
        args.documents = args.documents or 24
    args.cases = args.cases or "lora,full,qlora"
    args.documents = args.documents or 400
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows = []
    profiles: dict | None = {} if args.profile else None
    with tempfile.TemporaryDirectory(prefix="ftcluster-gpu-bench-") as tmp:
        for case in args.cases.split(","):
            for runner in ("baseline", "ftcluster"):
                baseline = rows[-1] if runner == "ftcluster" else None
                rows.append(run_case(runner, case, args, device, dtype, Path(tmp) / "weights", baseline, profiles))
                print(json.dumps(rows[-1]), flush=True)
    profiled = [key for key, value in (profiles or {}).items() if value[-1] == "missed"]
    if args.profile and profiled:
        with args.profile.open("a") as handle:
            handle.write(f"# {name}, {args.shape}, seq {args.seq}, micro batch {args.batch}, lengths {args.lengths}\n")
            for key in profiled:
                handle.write(f"\n## {profiles[key][0]}\n{profiles[key][1]}\n")
    print(f"\n{name}, {args.shape}, seq {args.seq}, micro batch {args.batch}, grad ckpt {args.grad_ckpt}, "
          f"lengths {args.lengths}, ftcluster attention {args.attention}\n")
    print("| case | runner | tokens/s | ratio | MFU | peak memory GB |\n|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["method"] == row["method"] and r["runner"] == "baseline")
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        memory = f"{row['peak_memory_gb']:.2f}" if row["peak_memory_gb"] is not None else "n/a"
        print(f"| {row['method']} | {row['runner']} | {row['tokens_per_s']:,.0f} | "
              f"{row['tokens_per_s'] / base['tokens_per_s']:.2f} | {mfu} | {memory} |")
    estimate = qlora_estimate_gb(args) if "qlora" in args.cases else None
    if estimate is not None:
        print(f"\nQLoRA planner estimate: {estimate:.2f} GB per GPU")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "shape": args.shape, "seq": args.seq, "batch": args.batch,
                                         "lengths": args.lengths, "rows": rows, "qlora_estimate_gb": estimate,
                                         "profiled": [f"{method}/{runner}" for method, runner in profiled]}, indent=1))


if __name__ == "__main__":
    main()
