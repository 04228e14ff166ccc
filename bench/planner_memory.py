"""The planner's per-device memory estimate against measured peak memory, on CPU.

CPU RSS says little about tensors (the allocator keeps freed pages, the runtime adds hundreds of
MB), so the measurement here follows every tensor storage a training step creates and frees —
parameters, gradients, optimizer states, activations, temporaries — through a dispatch mode, and
keeps the peak of live bytes: what `torch.cuda.max_memory_allocated` counts on a GPU. (PyTorch's
MemTracker does the same but refuses frozen parameters, i.e. every LoRA model.) Compared with the planner's total
minus its fixed GPU runtime allowance (CUDA context and kernels do not exist on CPU).

Each case runs ftcluster's own step (method setup, optimizer groups, loss) twice on full-length
sequences; the second step is measured (optimizer states exist by then).

On a CUDA GPU (`--device cuda`, the default where one is present) the measure is
`torch.cuda.max_memory_allocated` over the steps after the first, the model is in bf16 with bf16
autocast (what the loop does there by default) and the planner is asked for the same (precision
bf16, one GPU); its fixed runtime allowance (CUDA context, kernels) is again left out, since the
allocator does not count it. `--model` also takes a Llama shape name (llama-3.2-1b, llama-3.1-8b:
random weights, written once to a temporary folder and loaded from there as a user's model would
be) or `tiny` (a 2-layer random Llama).

    .venv/bin/python bench/planner_memory.py                       # SmolLM2-135M, eight setups
    .venv/bin/python bench/planner_memory.py --cases full:8 --json out.json
    python bench/planner_memory.py --model llama-3.2-1b --seq 2048 --cases full:4,lora:4,lora+gc:4,qlora:4
    python bench/planner_memory.py --model llama-3.1-8b --seq 2048 --cases qlora+gc:4 --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import weakref  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

DEFAULT_CASES = "full:8,lora:8,full:16,lora+gc:8,lora+gc2:8,lora+gc+chunk:8,qlora:8,qlora+gc:8"


class LivePeak(TorchDispatchMode):
    """Peak bytes of live tensor storages while active, counting the given tensors as live at start."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.live: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = self.peak = 0
        for tensor in existing:
            self._track(tensor)

    def _release(self, size: int) -> None:
        self.current -= size

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.live or storage.device.type == "meta":
            return
        size = storage.nbytes()
        self.live[storage] = size
        weakref.finalize(storage, self._release, size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out


CHUNK_TOKENS = 256  # the chunked-loss cases' chunk (default): a quarter of a micro batch of 8 x 128 tokens


@dataclass
class Case:
    """METHOD[+gc[N]][+chunk]:MICRO_BATCH, e.g. lora+gc2+chunk:8."""

    text: str
    method: str
    batch: int
    gc_every: int  # 0: no gradient checkpointing; N: every N-th block recomputes
    chunked: bool  # ftcluster's chunked loss instead of full logits

    @classmethod
    def parse(cls, text: str) -> Case:
        setup, _, batch = text.partition(":")
        method, *flags = setup.split("+")
        gc_flags = [flag for flag in flags if flag.startswith("gc")]
        gc_every = int(gc_flags[0][2:] or 1) if gc_flags else 0
        return cls(text, method, int(batch), gc_every, "chunk" in flags)


def quantization_constants(model: torch.nn.Module) -> list[torch.Tensor]:
    """bitsandbytes keeps 4-bit weights' block constants beside the parameters, not as parameters."""
    out = []
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        while state is not None:
            out += [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
            state = state.state2
    return out


@dataclass
class Setting:
    """Where and how the cases run: the device, the weights' dtype, the loss chunk, steps per case."""

    device: torch.device
    chunk_tokens: int = CHUNK_TOKENS
    steps: int = 2

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @property
    def precision(self) -> str:
        return "bf16" if self.device.type == "cuda" else "fp32"


def random_llama(shape: str, folder: Path, device: torch.device, dtype: torch.dtype) -> Path:
    """A random-init Llama of a known shape (the planner's own config of it), saved as a HF folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftcluster.models.shapes import LLAMA_SHAPES

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(**{"tie_word_embeddings": False, **LLAMA_SHAPES[shape]}, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):  # made where it is fast (GPU), in the dtype it is stored in
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    return folder


def measure(model_path: str, case: Case, seq: int, setting: Setting | None = None) -> dict:
    """Peak bytes of a steady-state step; with `setting.steps` > 2, the peak over steps 2..N. Also
    the losses and the seconds the steps took."""
    from ftcluster.config.spec import MethodSpec
    from ftcluster.models.blocks import checkpoint_every_nth_block
    from ftcluster.models.chunked_loss import output_head
    from ftcluster.models.load import load_pretrained, resolve_model
    from ftcluster.models.methods import apply_method, quantization_config
    from ftcluster.objectives.sft import SFTObjective
    from ftcluster.training.optim import build_optimizer, param_groups

    setting = setting or Setting(torch.device("cpu"))
    device, dtype, cuda = setting.device, setting.dtype, setting.device.type == "cuda"
    checkpointing = case.gc_every > 0
    torch.manual_seed(0)
    quantization = quantization_config(MethodSpec(name=case.method), dtype)  # qlora: 4-bit base
    model = load_pretrained(resolve_model(model_path), "causal_lm", dtype=dtype, quantization_config=quantization)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(model, MethodSpec(name=case.method, lora={"rank": 8, "alpha": 16, "dropout": 0.0}),
                         "causal_lm", checkpointing)
    if case.gc_every > 1:
        checkpoint_every_nth_block(model, case.gc_every)
    if quantization is None:
        model.to(device)  # the loop does the same; bitsandbytes places a quantized model itself
    model.train()
    optimizer = build_optimizer(param_groups(model, 1e-4, 0.0, None, lambda n, p: p.requires_grad), (0.9, 0.999),
                                device.type)
    objective = SFTObjective(output_head(model) if case.chunked else None, setting.chunk_tokens)
    ids = torch.randint(0, model.config.vocab_size, (case.batch, seq), generator=torch.Generator().manual_seed(0))
    batch_inputs = {k: v.to(device) for k, v in
                    {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}.items()}
    autocast = torch.autocast("cuda", dtype=dtype) if cuda else contextlib.nullcontext()
    peak, losses, started = 0, [], time.perf_counter()
    for index in range(max(2, setting.steps)):  # from the second step on: optimizer states exist
        if cuda:
            torch.cuda.synchronize()
            if index == 1:
                torch.cuda.reset_peak_memory_stats(device)
            tracker = contextlib.nullcontext()
        else:
            states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
            tracker = LivePeak([*model.parameters(), *model.buffers(), *quantization_constants(model), *states,
                                *batch_inputs.values()])
        with tracker:
            with autocast:
                loss = objective.loss_sum(model, batch_inputs) / objective.count(batch_inputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if index >= 1:
            peak = max(peak, torch.cuda.max_memory_allocated(device) if cuda else tracker.peak)
    seconds = time.perf_counter() - started
    del model, optimizer, objective, batch_inputs, loss
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    return {"peak": peak, "losses": losses, "seconds": seconds}


def estimate(model_path: str, case: Case, seq: int, setting: Setting | None = None) -> dict:
    from ftcluster.config.spec import build_spec
    from ftcluster.planning.plan import plan_job

    setting = setting or Setting(torch.device("cpu"))
    data = Path(tempfile.mkdtemp()) / "one-row.jsonl"  # the planner also sizes an epoch; one row will do
    data.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    spec = build_spec({
        "name": "planner-check", "model": {"path": model_path},
        "method": {"name": case.method, "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"train": str(data), "max_length": seq},
        "training": {"batch_size": case.batch, "precision": setting.precision,
                     "gradient_checkpointing": case.gc_every > 0,
                     "gradient_checkpointing_every": max(1, case.gc_every),
                     "loss_impl": "chunked" if case.chunked else "standard", "loss_chunk_tokens": setting.chunk_tokens},
        "scaling": {"use_gpu": setting.device.type == "cuda", "num_workers": 1},
    })
    parts = dict(plan_job(spec).gpu_bytes)
    parts.pop("runtime", None)  # the CUDA context and kernels (GPU plans): the allocator does not count them
    return parts


def run_cases(model_path: str, cases: str, seq: int, setting: Setting | None = None,
              plan_path: str | None = None) -> list[dict]:
    """plan_path: what the planner is given for the model (default model_path; a shape name for
    random-weight folders, which carry no tokenizer)."""
    rows = []
    for text in cases.split(","):
        case = Case.parse(text)
        result = measure(model_path, case, seq, setting)
        planned = estimate(plan_path or model_path, case, seq, setting)
        measured = result["peak"]
        rows.append({"case": text, "measured_mb": measured / 2**20, "estimated_mb": sum(planned.values()) / 2**20,
                     "ratio": measured / sum(planned.values()),
                     "estimated_parts_mb": {k: v / 2**20 for k, v in planned.items()},
                     "losses": result["losses"], "seconds": result["seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Model path or alias; a Llama shape name "
                        "(llama-3.2-1b, llama-3.1-8b: random weights); or tiny (a 2-layer random Llama).")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="METHOD[+gc[N]][+chunk]:MICRO_BATCH, comma-separated "
                        "(+gc: checkpoint every block, +gc2: every 2nd; +chunk: chunked loss).")
    parser.add_argument("--seq", type=int, default=128, help="Tokens per sequence.")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda where a GPU is present (measure: torch.cuda.max_memory_allocated).")
    parser.add_argument("--steps", type=int, default=2, help="Steps per case; the peak is taken over steps 2..N.")
    parser.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS, help="+chunk cases: positions per chunk.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    from ftcluster.models.shapes import LLAMA_SHAPES

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    setting = Setting(device, args.chunk_tokens, args.steps)
    torch.set_num_threads(2 if device.type == "cpu" else torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="planner-memory-") as tmp:
        model, plan_path = args.model, None
        if args.model == "tiny":
            from ftcluster.models.tiny import make_tiny_llama

            model = str(make_tiny_llama(Path(tmp) / "tiny"))
        elif args.model in LLAMA_SHAPES:
            model, plan_path = str(random_llama(args.model, Path(tmp) / args.model, device, setting.dtype)), args.model
        rows = run_cases(model, args.cases, args.seq, setting, plan_path)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    measure_name = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak live tensor bytes"
    print(f"\n{args.model}, {setting.precision}, seq {args.seq}, {where}; measured = {measure_name} of steps "
          f"2..{max(2, args.steps)}\n")
    print("| setup:micro batch | estimated MB | measured MB | measured / estimated |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['estimated_mb']:,.0f} | {row['measured_mb']:,.0f} | {row['ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
