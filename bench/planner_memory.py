"""The planner's per-device memory estimate against measured peak memory, on CPU.

CPU RSS says little about tensors (the allocator keeps freed pages, the runtime adds hundreds of
MB), so the measurement here follows every tensor storage a training step creates and frees —
parameters, gradients, optimizer states, activations, temporaries — through a dispatch mode, and
keeps the peak of live bytes: what `torch.cuda.max_memory_allocated` counts on a GPU. (PyTorch's
MemTracker does the same but refuses frozen parameters, i.e. every LoRA model.) Compared with the planner's total
minus its fixed GPU runtime allowance (CUDA context and kernels do not exist on CPU).

Each case runs ftcluster's own step (method setup, optimizer groups, loss) twice on full-length
sequences; the second step is measured (optimizer states exist by then).

    .venv/bin/python bench/planner_memory.py                       # SmolLM2-135M, eight setups
    .venv/bin/python bench/planner_memory.py --cases full:8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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


CHUNK_TOKENS = 256  # the chunked-loss cases' chunk: a quarter of a micro batch of 8 x 128 tokens


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


def measure(model_path: str, case: Case, seq: int) -> dict:
    from ftcluster.engine.chunked_loss import output_head
    from ftcluster.engine.objectives import SFTObjective
    from ftcluster.engine.optim import build_optimizer, param_groups
    from ftcluster.models.blocks import checkpoint_every_nth_block
    from ftcluster.models.load import load_pretrained, resolve_model
    from ftcluster.models.methods import apply_method, quantization_config
    from ftcluster.spec import MethodSpec

    checkpointing = case.gc_every > 0
    torch.manual_seed(0)
    quantization = quantization_config(MethodSpec(name=case.method), torch.float32)  # qlora: 4-bit base
    model = load_pretrained(resolve_model(model_path), "causal_lm", dtype=torch.float32,
                            quantization_config=quantization)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(model, MethodSpec(name=case.method, lora={"rank": 8, "alpha": 16, "dropout": 0.0}),
                         "causal_lm", checkpointing)
    if case.gc_every > 1:
        checkpoint_every_nth_block(model, case.gc_every)
    model.train()
    optimizer = build_optimizer(param_groups(model, 1e-4, 0.0, None, lambda n, p: p.requires_grad), (0.9, 0.999), "cpu")
    objective = SFTObjective(output_head(model) if case.chunked else None, CHUNK_TOKENS)
    ids = torch.randint(0, model.config.vocab_size, (case.batch, seq), generator=torch.Generator().manual_seed(0))
    batch_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    peak = 0
    for _ in range(2):  # the second step is the steady state: optimizer states exist
        states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        tracker = LivePeak([*model.parameters(), *model.buffers(), *quantization_constants(model), *states,
                            *batch_inputs.values()])
        with tracker:
            loss = objective.loss_sum(model, batch_inputs) / objective.count(batch_inputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = tracker.peak
    return peak


def estimate(model_path: str, case: Case, seq: int) -> dict:
    from ftcluster.plan import plan_job
    from ftcluster.spec import build_spec

    data = Path(tempfile.mkdtemp()) / "one-row.jsonl"  # the planner also sizes an epoch; one row will do
    data.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    spec = build_spec({
        "name": "planner-check", "model": {"path": model_path},
        "method": {"name": case.method, "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"train": str(data), "max_length": seq},
        "training": {"batch_size": case.batch, "precision": "fp32", "gradient_checkpointing": case.gc_every > 0,
                     "gradient_checkpointing_every": max(1, case.gc_every),
                     "loss_impl": "chunked" if case.chunked else "standard", "loss_chunk_tokens": CHUNK_TOKENS},
    })
    parts = dict(plan_job(spec).gpu_bytes)
    parts.pop("runtime")  # the CUDA context and kernels: nothing to compare with on CPU
    return parts


def run_cases(model_path: str, cases: str, seq: int) -> list[dict]:
    rows = []
    for text in cases.split(","):
        case = Case.parse(text)
        measured = measure(model_path, case, seq)
        planned = estimate(model_path, case, seq)
        rows.append({"case": text, "measured_mb": measured / 2**20, "estimated_mb": sum(planned.values()) / 2**20,
                     "ratio": measured / sum(planned.values()),
                     "estimated_parts_mb": {k: v / 2**20 for k, v in planned.items()}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Model path or alias.")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="METHOD[+gc[N]][+chunk]:MICRO_BATCH, comma-separated "
                        "(+gc: checkpoint every block, +gc2: every 2nd; +chunk: chunked loss).")
    parser.add_argument("--seq", type=int, default=128, help="Tokens per sequence.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = run_cases(args.model, args.cases, args.seq)
    print(f"\n{args.model}, fp32, seq {args.seq}, CPU; measured = peak live tensor bytes of the second step\n")
    print("| setup:micro batch | estimated MB | measured MB | measured / estimated |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['estimated_mb']:,.0f} | {row['measured_mb']:,.0f} | {row['ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
