"""The cost of evaluation: ftcluster's evaluation of held-out prompts against a plain transformers loop.

Both score the same 500 synthetic movie reviews (one to eight sentences each, "positive" or
"negative") with SmolLM2-135M-Instruct on the same threads, in one invocation: the validation loss
of the reference answers, then greedy generation of 8 tokens per prompt (exact match). The plain
loop is what a person writes with transformers: batches of 16 in data order, `labels=` for the
loss, `tokenizer(..., padding=True)` + `generate` for the answers. ftcluster's evaluation is
`run_eval` as a run calls it (eval.batch_size 16). Reported: both times, the ratio ftcluster /
plain (target <= 0.7), and that both gave the same loss and the same answers.

Then (unless --no-quickstart) the quickstart job runs as `make demo` runs it (Ray Train) and with
--no-ray, and the share of its wall time spent evaluating (summary.json's eval_seconds; target
<= 15%) is reported for both.

    .venv/bin/python bench/eval_speed.py                        # 500 prompts + the quickstart
    .venv/bin/python bench/eval_speed.py --prompts 32 --model tiny --no-quickstart   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ftcluster.config.spec import build_spec  # noqa: E402
from ftcluster.core.quiet import quiet_libraries  # noqa: E402
from ftcluster.data import build_data  # noqa: E402
from ftcluster.data.batches import collate, count_targets  # noqa: E402
from ftcluster.data.render import Renderer  # noqa: E402
from ftcluster.evaluation.metrics import normalize_answer  # noqa: E402
from ftcluster.evaluation.suite import EvalContext, run_eval  # noqa: E402
from ftcluster.models.load import load_pretrained, load_tokenizer, resolve_model  # noqa: E402
from ftcluster.models.tiny import make_tiny_llama  # noqa: E402
from ftcluster.objectives.base import make_objective  # noqa: E402

POSITIVE = ["The acting is superb from start to finish.", "I loved every minute of it.",
            "A moving, beautifully shot story.", "The score is gorgeous and the pacing never drags.",
            "It made me laugh and cry, and I would watch it again tomorrow."]
NEGATIVE = ["The acting is wooden and the dialogue is worse.", "I was bored within ten minutes.",
            "A muddled, ugly mess of a film.", "The plot makes no sense and the ending is lazy.",
            "I want those two hours of my life back."]
NEUTRAL = ["The film follows a detective in a small coastal town.", "It runs a little over two hours.",
           "Most of it was shot in winter.", "The director also wrote the screenplay.",
           "The cast includes several newcomers.", "It is based on a novel from the nineties."]
INSTRUCTION = "Is this movie review positive or negative? Answer with one word: positive or negative."


def reviews(count: int, seed: int) -> list[dict]:
    """Instruction rows: a review of 1-8 sentences (neutral ones and a few of one sentiment)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(["positive", "negative"])
        opinions = rng.sample(POSITIVE if label == "positive" else NEGATIVE, rng.randint(1, 3))
        sentences = rng.sample(NEUTRAL, rng.randint(0, 5)) + opinions
        rng.shuffle(sentences)
        rows.append({"instruction": INSTRUCTION, "input": " ".join(sentences), "output": label})
    return rows


def job_spec(model: str, data: Path, prompts: int, threads: int):
    return build_spec({
        "name": "eval-speed", "model": {"path": model}, "method": {"name": "full"},
        "data": {"train": str(data), "validation": str(data), "format": "instruction", "max_length": 256,
                 "system_prompt": "You are a film critic's assistant."},
        "training": {"batch_size": 16, "threads": threads},
        "eval": {"batch_size": 16, "generation": {"num_prompts": prompts, "max_new_tokens": 8}, "max_choices": 0},
    }, "eval_speed")


@torch.no_grad()
def plain_loop(model, tokenizer, bundle, renderer, prompts: int, max_new_tokens: int) -> dict:
    """What a person writes: batches of 16 in data order; HF's own loss; padding=True + generate."""
    total, count = 0.0, 0
    for start in range(0, len(bundle.val), 16):
        batch = collate(bundle.val[start : start + 16], tokenizer.pad_token_id)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        targets = count_targets(batch)
        total, count = total + float(out.loss) * targets, count + targets
    pairs = [renderer.prompt_text(example) for example in bundle.val_examples[:prompts]]
    outputs = []
    tokenizer.padding_side = "left"
    for start in range(0, len(pairs), 16):
        texts = [prompt for prompt, _ in pairs[start : start + 16]]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        outputs += tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    matches = [normalize_answer(o) == normalize_answer(ref) for o, (_, ref) in zip(outputs, pairs)]
    return {"val_loss": total / count, "exact_match": sum(matches) / len(matches), "outputs": outputs}


def compare(model_path: str, prompts: int, threads: int, folder: Path) -> dict:
    data = folder / "reviews.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in reviews(prompts, seed=0)))
    spec = job_spec(model_path, data, prompts, threads)
    torch.set_num_threads(threads)
    resolved = resolve_model(spec.model.path)
    tokenizer = load_tokenizer(resolved)
    model = load_pretrained(resolved, "causal_lm", dtype=torch.float32, label_names=None,
                            pad_token_id=tokenizer.pad_token_id, revision=None).eval()
    bundle = build_data(spec.data, tokenizer)
    renderer = Renderer(tokenizer, spec.data.max_length, spec.data.train_on_prompt)
    objective = make_objective(spec, model, is_peft=False)
    device = torch.device("cpu")
    plain_loop(model, tokenizer, bundle, renderer, 4, 2)  # warm-up (thread pools, first-call allocations)

    started = time.perf_counter()
    plain = plain_loop(model, tokenizer, bundle, renderer, prompts, 8)
    plain_s = time.perf_counter() - started
    started = time.perf_counter()
    ours = run_eval(model, EvalContext(tokenizer, bundle, renderer, spec.eval, spec.training.batch_size, device,
                                       contextlib.nullcontext, objective=objective))
    ours_s = time.perf_counter() - started
    same_outputs = sum(s["output"] == o for s, o in zip(ours["samples"], plain["outputs"]))
    return {
        "prompts": len(bundle.val), "threads": threads, "model": model_path,
        "plain_s": round(plain_s, 2), "ftcluster_s": round(ours_s, 2), "ratio": round(ours_s / plain_s, 3),
        "val_loss": {"plain": plain["val_loss"], "ftcluster": ours["val_loss"]},
        "exact_match": {"plain": plain["exact_match"], "ftcluster": ours["exact_match"]},
        "same_answers": same_outputs, "prompt_tokens": sorted(len(e.input_ids) for e in bundle.val)[:: max(1, prompts // 5)],
    }


def quickstart(folder: Path, ray: bool) -> dict:
    """The quickstart job as `make demo` runs it (ray=True), or in this process (--no-ray); the share of
    its wall time spent evaluating."""
    out = folder / f"quickstart-{'ray' if ray else 'no-ray'}"
    ftcluster = Path(sys.executable).with_name("ftcluster")
    command = [str(ftcluster), "train", str(REPO / "jobs" / "quickstart.yaml"), f"output.dir={out}"]
    started = time.perf_counter()
    subprocess.run(command + ([] if ray else ["--no-ray"]), check=True, capture_output=True)
    wall = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    return {"ray": ray, "wall_s": round(wall, 1), "eval_s": round(summary["eval_seconds"], 1),
            "train_s": round(summary["train_seconds"], 1), "eval_share": round(summary["eval_seconds"] / wall, 3),
            "exact_match_after": summary["after"].get("exact_match")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=500, help="held-out prompts (default 500)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model path or alias; 'tiny' for a smoke run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-quickstart", action="store_true", help="skip the quickstart eval-share run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = str(make_tiny_llama(folder / "tiny")) if args.model == "tiny" else args.model
        result = {"comparison": compare(model, args.prompts, args.threads, folder)}
        if not args.no_quickstart:
            result["quickstart"] = [quickstart(folder, ray=True), quickstart(folder, ray=False)]
    row = result["comparison"]
    print(f"{row['prompts']} prompts, {row['threads']} threads: plain transformers loop {row['plain_s']:.1f} s, "
          f"ftcluster {row['ftcluster_s']:.1f} s, ratio {row['ratio']:.2f} (target <= 0.7); same answers "
          f"{row['same_answers']}/{row['prompts']}; val_loss {row['val_loss']['plain']:.4f} vs "
          f"{row['val_loss']['ftcluster']:.4f}")
    for q in result.get("quickstart", []):
        print(f"quickstart ({'Ray Train' if q['ray'] else '--no-ray'}): {q['wall_s']:.0f} s wall, {q['eval_s']:.0f} s "
              f"evaluating = {q['eval_share']:.1%} (target <= 15%), {q['train_s']:.0f} s training")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
