"""The job spec: one YAML file that says what to fine-tune, how, on what data, and where.

Every field is documented where it is defined (``Field(description=...)``); ``--help``, the
docs and validation hints all come from here. Models are strict: an unknown key is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ftcluster.config.registry import FORMATS, METHODS, OBJECTIVES
from ftcluster.core.errors import SpecError
from ftcluster.core.locations import exists, is_remote


class RegisteredName:
    """A spec value that must name an entry of a registry table: checked when a spec is validated, so
    entries added with `registry.register` are accepted (`ftcluster fields` lists the table's names)."""

    def __init__(self, table: dict[str, Any]):
        self.table = table

    def __call__(self, value: str) -> str:
        if value not in self.table:
            raise ValueError(f"Input should be one of {' | '.join(self.table)}, not {value!r}")
        return value


MethodName = Annotated[str, AfterValidator(RegisteredName(METHODS))]
ObjectiveName = Annotated[str, AfterValidator(RegisteredName(OBJECTIVES))]
FormatName = Annotated[str, AfterValidator(RegisteredName(FORMATS))]


class Section(BaseModel):
    """Base for every spec section: unknown keys are errors, values are checked on assignment, and
    numbers must be finite (``training.lr=inf`` would train to NaN weights)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


PositiveFloat = Annotated[float, Field(gt=0)]


class ModelSpec(Section):
    path: str = Field(
        description="What to fine-tune: a local Hugging Face folder, a .gguf file (dequantized once "
        "and cached as safetensors), an alias (smollm2-135m-instruct, minilm-l6), or a hub id "
        "(needs network). Example: smollm2-135m-instruct"
    )
    task: Literal["causal_lm", "classification"] = Field(
        "causal_lm",
        description="Head to train: causal_lm (next-token prediction) or classification "
        "(a fresh sequence-classification head, num_labels taken from the data).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of the loaded weights. auto: float32 on CPU, bfloat16 on GPUs that support it.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    attention: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel (transformers' attn_implementation). auto: the model's default (sdpa "
        "for most). flex_attention skips the cross-example blocks of packed sequences; flash_attention_2 "
        "needs the flash-attn package and a CUDA GPU. Example: flex_attention",
    )


class LoraSpec(Section):
    rank: int = Field(8, ge=1, description="LoRA rank r: width of the low-rank update.")
    alpha: float = Field(16, gt=0, description="LoRA scaling alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules that get adapters: a list of names (e.g. [q_proj, v_proj]) or all-linear.",
    )


class FreezeSpec(Section):
    top_blocks: int = Field(
        0, ge=0, description="Train the top N transformer blocks (counted from the output side)."
    )
    train_head: bool = Field(True, description="Train the output head (lm_head / classifier) and final norm.")
    modules: list[str] = Field(
        default_factory=list,
        description="Regular expressions of parameter names to train as well, e.g. ['.*embed_tokens.*'].",
    )


class PrefixSpec(Section):
    num_virtual_tokens: int = Field(16, ge=1, description="Number of trainable virtual prefix tokens per layer.")


class QuantSpec(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")


class UnfreezeSpec(Section):
    """ULMFiT-style gradual unfreezing: start with the head (and top groups) trainable, then
    unfreeze one more group of blocks from the top every ``every`` steps or epochs."""

    every: int = Field(ge=1, description="Unfreeze the next group after this many units.")
    unit: Literal["steps", "epochs"] = Field("steps", description="Unit of `every`: steps or epochs.")
    blocks_per_group: int = Field(1, ge=1, description="Transformer blocks unfrozen together.")
    initial_groups: int = Field(0, ge=0, description="Groups already trainable at step 0 (the head always is).")


class DpoSpec(Section):
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Conservative DPO: the share of preference labels assumed flipped (noise)."
    )


class RewardSpec(Section):
    margin: float = Field(
        0.0, ge=0, description="Bradley-Terry loss with a margin: -log sigmoid(r_chosen - r_rejected - margin); the "
        "chosen reply must win by at least this much before the loss lets go. Example: 0.5",
    )


class RewardFunctionSpec(Section):
    function: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="A Python function as module:function (imported, never evaluated from text), called as "
        "f(prompt, completion, reference) -> float for every completion. The module is found on the Python path or "
        "in the folder ftcluster runs in (submit and render k8s ship such a local module to the cluster). Built in: ftcluster.rewards:exact_answer, ftcluster.rewards:number_answer, "
        "ftcluster.rewards:answer_tags. Example: my_rewards:is_valid_json",
    )
    weight: float = Field(1.0, description="Its share of a completion's reward (rewards are summed with these weights).")


class RewardModelSpec(Section):
    run: str = Field(description="A finished reward-model run (method.objective reward) whose final weights score "
                     "each prompt and completion. Example: runs/reward-smollm2")
    weight: float = Field(1.0, description="Its share of a completion's reward.")


def custom_resources(value: dict[str, float]) -> dict[str, float]:
    """A resources_per_worker mapping: custom Ray resources only (CPUs and GPUs have their own keys), above 0."""
    builtin = sorted({"CPU", "GPU", "memory", "object_store_memory"} & set(value))
    if builtin:
        raise ValueError(f"{', '.join(builtin)}: set these with cpus_per_worker / gpus_per_worker, not here")
    negative = [name for name, amount in value.items() if amount <= 0]
    if negative:
        raise ValueError(f"{negative[0]}: amounts must be above 0")
    return value


class RolloutSpec(Section):
    """Where GRPO samples: in the training workers (workers 0), or in separate Ray actors that hold a copy
    of the policy and receive its trained weights (the layout large models need: generation on its own
    GPUs while the learners train)."""

    workers: int = Field(0, ge=0, description="Ray actors that sample the completions (0: the training workers "
                         "sample). Needs Ray (not --no-ray). Example: 2")
    sync_every: int = Field(1, ge=1, description="Rollouts between pushes of the policy's weights to the actors "
                            "(trainable weights only: adapters for PEFT). Above 1 the actors sample with weights up to "
                            "sync_every - 1 rollouts old, and the clipped ratio to their own log-probabilities "
                            "corrects for it. Example: 4")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs per rollout actor (also its torch threads); "
                                          "None: scaling.cpus_per_worker.")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per rollout actor; None: "
                                          "scaling.gpus_per_worker when scaling.use_gpu, else 0.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each rollout actor needs besides CPU and GPU: it runs only on nodes that "
        "advertise them (ray start --resources), e.g. a cluster's inference nodes. Example: {rollout_node: 1}",
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_only(cls, value: dict[str, float]) -> dict[str, float]:
        return custom_resources(value)


class GrpoSpec(Section):
    """Group Relative Policy Optimisation (Shao et al., 2024): per prompt, sample a group of completions, score
    them, and push up those that beat their group's mean, with a KL penalty to the starting model."""

    group_size: int = Field(8, ge=2, description="Completions sampled per prompt; advantages are relative to the group.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the completions.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest token set with this mass.")
    max_new_tokens: int = Field(64, ge=1, description="Longest completion; one cut short is scored as it is.")
    beta: float = Field(0.04, ge=0, description="KL penalty coefficient towards the reference (the starting model: "
                        "adapters off, or a frozen copy). 0: no reference pass at all.")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clipping of the policy ratio to [1 - eps, 1 + eps].")
    steps_per_rollout: int = Field(1, ge=1, description="Optimizer steps on each batch of rollouts (the ratio to the "
                                   "sampling policy matters from the second on). Example: 2")
    rewards: list[RewardFunctionSpec] = Field(default_factory=list, description="Reward functions, summed with weights.")
    reward_timeout_s: float = Field(
        60.0, gt=0, description="Longest wait for one reward function call: one that takes longer ends the run in one "
        "line naming the function and the prompt (a hung reward would hang training, deaf to signals). Example: 5",
    )
    reward_model: RewardModelSpec | None = Field(None, description="A trained reward model, added to the rewards.")
    eval_prompts: int = Field(32, ge=1, description="Held-out prompts answered (greedily) for val_reward, the mean "
                              "reward that evaluation, early stopping and sweeps read.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Sampling in separate Ray actors "
                                 "(rollout.workers) instead of the training workers.")

    @model_validator(mode="after")
    def _needs_a_reward(self) -> GrpoSpec:
        if not self.rewards and self.reward_model is None:
            raise ValueError("grpo needs rewards (module:function entries), a reward_model, or both")
        return self


class MethodSpec(Section):
    name: MethodName = Field(
        "lora",
        description="Fine-tuning method: full (all weights), freeze (only chosen blocks/head), lora, "
        "dora (weight-decomposed LoRA), prefix (prefix tuning), qlora (4-bit NF4 base + LoRA).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (lora, dora, qlora).")
    freeze: FreezeSpec = Field(default_factory=FreezeSpec, description="What `freeze` trains.")
    prefix: PrefixSpec = Field(default_factory=PrefixSpec, description="Prefix tuning settings.")
    quant: QuantSpec = Field(default_factory=QuantSpec, description="4-bit quantization for qlora.")
    unfreeze: UnfreezeSpec | None = Field(
        None, description="Gradual unfreezing schedule (full and freeze methods only)."
    )
    objective: ObjectiveName = Field(
        "sft",
        description="sft: next-token loss on responses; dpo: direct preference optimisation on preference data, "
        "against the frozen base model (for adapters: the same weights with adapters off, no second copy); "
        "reward: a reward model (model.task classification, one output) scoring the chosen reply above the "
        "rejected one (Bradley-Terry loss), for RLHF; grpo: online RL on prompts data, sampling completions and "
        "scoring them with method.grpo's rewards.",
    )
    dpo: DpoSpec = Field(default_factory=DpoSpec, description="DPO settings (objective: dpo).")
    reward: RewardSpec = Field(default_factory=RewardSpec, description="Reward-model settings (objective: reward).")
    grpo: GrpoSpec | None = Field(None, description="Online RL settings (objective: grpo); rewards are required.")
    layerwise_lr_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Discriminative learning rates: block at depth d from the top trains at "
        "lr * decay**d (head d=0, embeddings deepest). None: one lr for all.",
    )

    @model_validator(mode="after")
    def _schedules_need_whole_blocks(self) -> MethodSpec:
        if self.unfreeze is not None and self.name not in ("full", "freeze"):
            raise ValueError(f"unfreeze schedules apply to full and freeze, not {self.name}")
        return self


class ColumnSpec(Section):
    """Column names in the data files, for files whose names differ from the defaults."""

    instruction: str = Field("instruction", description="instruction format: the task text.")
    input: str = Field("input", description="instruction format: optional extra input.")
    output: str = Field("output", description="instruction format: the expected response.")
    messages: str = Field("messages", description="chat format: list of {role, content}.")
    text: str = Field("text", description="text and classification formats: the text.")
    label: str = Field("label", description="classification format: the class label.")
    prompt: str = Field("prompt", description="preference format: the prompt.")
    chosen: str = Field("chosen", description="preference format: the preferred response.")
    rejected: str = Field("rejected", description="preference format: the dispreferred response.")
    reference: str = Field("reference", description="prompts format: the optional reference answer rewards compare to.")


class DataSpec(Section):
    train: str = Field(description="Training data: a .jsonl/.json/.csv/.parquet file, a folder of them, a glob "
                       "(data/part-*.parquet), the same in an object store (s3://bucket/data/part-*.jsonl), a "
                       "`datasets.save_to_disk` folder, or a Hugging Face hub dataset (hf:NAME, online only).")
    validation: str | None = Field(
        None, description="Separate validation data (any form `train` takes). None: split `val_fraction` off the "
        "training data."
    )
    split: str = Field("train", description="The split of a `datasets` source (save_to_disk folder or hf:NAME) to train on.")
    validation_split: str = Field("validation", description="The split of a `datasets` validation source.")
    cache_dir: str | None = Field(
        None, description="Where tokenized data is cached (Arrow files each worker reads row by row on demand; "
        "reused by every worker, restart and sweep trial with the same data, tokenizer and settings). None: "
        "$FTCLUSTER_CACHE/data/tokenized, else ~/.cache/ftcluster/data/tokenized. A folder on a mount the nodes share "
        "tokenizes once per cluster; delete entries to reclaim space."
    )
    format: FormatName = Field(
        "instruction", description="Row format of the files."
    )
    columns: ColumnSpec = Field(default_factory=ColumnSpec, description="Column names, if not the defaults.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share held out for validation (no validation file).")
    max_length: int = Field(512, ge=8, description="Tokens per example; longer ones are truncated and counted.")
    packing: bool = Field(
        False, description="Pack several examples into each sequence (no cross-example attention)."
    )
    train_on_prompt: bool = Field(
        False, description="Also compute the loss on prompt tokens (default: response tokens only)."
    )
    labels: list[str | int] | None = Field(
        None, description="classification: the label set (rows with other labels are bad). None: from the data."
    )
    balance_classes: bool = Field(
        False, description="classification: oversample minority classes to the majority count."
    )
    on_bad_row: Literal["skip", "fail"] = Field(
        "skip", description="Bad rows (missing/empty field, wrong type, unknown label): skip and report, or fail."
    )
    seed: int = Field(0, description="Seed of the train/validation split.")
    system_prompt: str | None = Field(None, description="System message added to every chat/instruction example.")


class TrainingSpec(Section):
    epochs: float = Field(1, gt=0, description="Passes over the training data (may be fractional).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(8, ge=1, description="Micro batch per worker (examples per forward pass).")
    grad_accum: int = Field(1, ge=1, description="Micro batches accumulated per optimizer step.")
    lr: PositiveFloat = Field(2e-4, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled AdamW weight decay (never on norms or biases).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="LR schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm; None: no clipping.")
    dropout: float | None = Field(None, ge=0, lt=1, description="Override the model's dropout probabilities.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision: auto = bf16 autocast on GPUs that have it, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    gradient_checkpointing_every: int = Field(
        1, ge=1,
        description="Selective checkpointing: with gradient_checkpointing, recompute only every N-th transformer "
        "block (1: all of them). The others keep their activations: faster steps for more memory. Example: 2",
    )
    loss_impl: Literal["auto", "standard", "chunked"] = Field(
        "auto",
        description="Causal-LM loss: chunked never builds the full (tokens x vocab) logits and skips untrained "
        "positions; standard does. auto: chunked where it can run (not under ZeRO-3, whose head weight is "
        "sharded, nor with prefix tuning or training.compile).",
    )
    loss_chunk_tokens: int = Field(2048, ge=64, description="chunked loss: trained positions per logits chunk.")
    compile: bool = Field(False, description="torch.compile the model (first steps are slow while it compiles).")
    seed: int = Field(0, description="Seed of initialisation, shuffling and dropout.")
    log_every: int = Field(10, ge=1, description="Log train metrics every N steps.")
    checkpoint_every: int | None = Field(None, ge=1, description="Save a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep on disk.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads per worker (default: CPUs per worker).")
    max_failures: int = Field(
        0, ge=0, description="Restart the worker group this many times after a worker dies, resuming from the "
        "latest checkpoint (set checkpoint_every)."
    )
    max_preemption_failures: int = Field(
        -1, ge=-1, description="Under Ray: restarts after nodes are preempted (a drained spot node), counted apart "
        "from max_failures; -1: no limit, 0: none. Each restart resumes from the latest checkpoint.",
    )
    checkpoint_on_preempt: bool = Field(
        True, description="On Ctrl+C or SIGTERM (pod eviction, spot reclaim), finish the step in flight and save a "
        "checkpoint before exiting, so --resume loses at most that step. Under Ray, also save one as soon as a node "
        "of the run gets a preemption notice (a drain with a deadline), and keep training until the node goes.",
    )
    skip_nonfinite_steps: int = Field(
        0, ge=0,
        description="A step whose loss or gradient norm is NaN/inf stops training as diverged; allow this many such "
        "steps to be skipped (no update) first, as fp16 recipes do. The count is logged. Example: 3",
    )
    max_weight_growth: float | None = Field(
        100.0, gt=1,
        description="Silent collapse stops training as divergence does: the trainable weights' RMS growing past this "
        "many times its value at the start (checked at each log step, checkpoint and the end), or, for next-token "
        "and classification losses, a logged training loss back at or above a uniform guess's (ln of the vocabulary "
        "or label count) after warmup_steps, once it had been well below (under 90% of it). None: neither check.",
    )


class GenerationEvalSpec(Section):
    num_prompts: int = Field(32, ge=1, description="Held-out prompts to generate for.")
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per prompt (greedy).")
    show: int = Field(3, ge=0, description="Examples printed in the before/after table.")


class HarnessSpec(Section):
    """Standard benchmarks through EleutherAI's lm-evaluation-harness (`pip install 'ftcluster[harness]'`)."""

    tasks: list[str] = Field(min_length=1, description="Harness task names, e.g. [hellaswag, arc_easy] (hub data, "
                             "online), or tasks defined by YAML files in include_path (local data, offline).")
    include_path: str | None = Field(None, description="A folder of task YAML files (their data may be local "
                                     "jsonl/csv files: dataset_path: json, dataset_kwargs.data_files).")
    limit: int | None = Field(None, ge=1, description="Score at most this many examples per task.")
    num_fewshot: int | None = Field(None, ge=0, description="Examples in each prompt (default: the task's own).")
    batch_size: int = Field(8, ge=1, description="Requests scored per forward pass.")


class ForgettingSpec(Section):
    """Score general-domain text before and after fine-tuning: did the model lose what it knew?"""

    data: str | None = Field(
        "builtin",
        description="General-domain texts whose perplexity is compared: builtin (a small sample ftcluster ships), "
        "a .jsonl/.json/.csv/.parquet file with a `text` column, or null (only the harness tasks below).",
    )
    harness: HarnessSpec | None = Field(
        None, description="lm-evaluation-harness tasks whose scores must not fall, e.g. {tasks: [arc_easy], limit: "
        "200}: scored on the base and the fine-tuned model, like eval.harness.",
    )
    max_increase_pct: float = Field(
        10.0, gt=0, description="How much worse, in percent, the general-text perplexity (a rise) or a harness "
        "score (a fall; a rise for perplexity-like metrics) may get before the run warns or fails."
    )
    action: Literal["warn", "fail"] = Field(
        "warn", description="Above the threshold: warn (and record it), or fail the run (exit 2; outputs kept)."
    )
    max_texts: int = Field(64, ge=1, description="Score at most this many texts.")


class EvalSpec(Section):
    every: int | None = Field(None, ge=1, description="Evaluate on validation data every N steps (and at the end).")
    max_batches: int | None = Field(None, ge=1, description="Cap validation batches per evaluation.")
    metric: str = Field("val_loss", description="Metric for early stopping and model selection (for method.objective "
                        "grpo the default is val_reward, mode max).")
    mode: Literal["min", "max"] = Field("min", description="Whether `metric` should go down or up.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement."
    )
    min_delta: float = Field(
        0.0, ge=0, description="Early stopping: an evaluation counts as better only by more than this."
    )
    stop_on_overfit: bool = Field(
        False, description="Stop when validation loss rises while training loss falls (`overfit_evals` times)."
    )
    overfit_evals: int = Field(2, ge=1, description="Consecutive evaluations of divergence that signal overfitting.")
    before_after: bool = Field(True, description="Evaluate the base model too and print both side by side.")
    batch_size: int | None = Field(
        None, ge=1, description="Examples per evaluation batch (loss, choice scoring, generation). No gradients are "
        "kept, so it can often be larger than training.batch_size. Default: training.batch_size for scoring; for "
        "generation 64 prompts on CPU (decoding steps are few rows' work: fewer, fuller steps cost less) and 16 on a "
        "GPU.",
    )
    max_examples: int | None = Field(
        None, ge=1, description="Evaluate on at most the first N validation examples (every evaluation: loss, "
        "choices, generation). Under several workers each scores its share of them.",
    )
    generation: GenerationEvalSpec | None = Field(
        None, description="Generate on held-out prompts and score exact match against references."
    )
    forgetting: ForgettingSpec | None = Field(
        None, description="Forgetting check: perplexity of general-domain text before vs after fine-tuning."
    )
    choices: list[str] | None = Field(
        None, min_length=2, description="The answers a prompt may have, e.g. [positive, negative]: each is scored by "
        "its log-likelihood after the prompt (accuracy, per-class precision/recall/F1, confusion matrix), for the base, "
        "few-shot and fine-tuned models. Default: found in the training data when its answers form a closed set.",
    )
    max_choices: int = Field(
        20, ge=0, le=1000, description="Score by choices when the training answers have at most this many distinct values, "
        "each seen at least twice, and every validation answer is one of them; 0 turns the detection off.",
    )
    choice_score: Literal["sum", "mean"] = Field(
        "sum", description="Rank choices by the sum of their tokens' log-probabilities, or by the mean per token "
        "(length-normalised). Both accuracies are reported; this one decides precision/recall/F1.",
    )
    harness: HarnessSpec | None = Field(
        None, description="Run lm-evaluation-harness tasks on the base and the fine-tuned model (adapters applied); "
        "their scores join the before/after table as harness/TASK/METRIC.",
    )
    few_shot_baseline: int | None = Field(
        None, ge=1, le=16,
        description="Also score the base model prompted with this many training examples (same held-out prompts, "
        "same exact-match metric): did fine-tuning beat prompting? Needs eval.generation.",
    )


class ScalingSpec(Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one process each).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker (also its torch threads).")
    gpus_per_worker: float = Field(1, ge=0, description="GPUs per worker when use_gpu (fractions allowed).")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each worker needs besides CPU and GPU: it runs only on nodes that "
        "advertise them (ray start --resources). Example: {a100_node: 1}",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How Ray places workers on nodes: PACK (fill nodes), SPREAD, STRICT_SPREAD (one per node).",
    )
    placement_timeout_s: float | None = Field(
        900, gt=0, description="Under Ray: how long the worker group may wait to be placed (other jobs holding "
        "resources, an autoscaler adding nodes) before the job fails with the numbers; null: wait forever.",
    )
    storage_path: str | None = Field(
        None,
        description="Where Ray Train persists reported checkpoints: a local/NFS path or an s3:// / gs:// URI "
        "(multi-node runs need shared storage). None: OUTPUT/ray.",
    )
    gpu_type: str = Field(
        "H100", description="GPU model the job is planned for (memory, peak FLOPs, price), by Ray's accelerator "
        "type name: H200, H100, H100-PCIE, A100-80G, A100-40G, A100, L40S, L4, A10G, ... Example: A100-40G",
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_only(cls, value: dict[str, float]) -> dict[str, float]:
        return custom_resources(value)

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu(cls, value: str) -> str:
        from ftcluster.core.accelerators import find_accelerator, unknown_message

        if find_accelerator(value) is None:
            raise ValueError(unknown_message(value))
        return value
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory per GPU for planning; None: from gpu_type (H100 80, A100 80, H200 141, ...)."
    )
    gpus_per_node: int = Field(8, ge=1, description="GPUs per node, for planning host RAM and node counts.")
    node_ram_gb: float = Field(1024, gt=0, description="Host RAM per node, for planning loading and CPU offload.")


class DistributedSpec(Section):
    backend: Literal["ddp", "deepspeed"] = Field(
        "ddp",
        description="ddp: torch DistributedDataParallel (gloo on CPU, nccl on GPU); deepspeed: ZeRO stages 1-3.",
    )
    zero_stage: Literal[1, 2, 3] = Field(2, description="deepspeed: ZeRO stage (1 optimizer, 2 +gradients, 3 +parameters).")
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field(
        "none", description="deepspeed: keep optimizer states in CPU memory or on NVMe (stage >= 1)."
    )
    offload_params: Literal["none", "cpu", "nvme"] = Field(
        "none", description="deepspeed: keep parameters in CPU memory or on NVMe (stage 3 only)."
    )
    nvme_path: str | None = Field(None, description="deepspeed: local NVMe folder for nvme offload.")
    bucket_size_mb: int = Field(
        25, ge=1, description="Gradient bucket size: DDP bucket_cap_mb; DeepSpeed reduce/allgather bucket sizes."
    )
    timeout_s: int = Field(
        1800, ge=10, description="Collective operations time out after this long: a stuck peer ends the attempt."
    )
    deepspeed_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra DeepSpeed config keys passed through. A key that contradicts a value generated "
        "from the spec is a validation error.",
    )

    @model_validator(mode="after")
    def _offload_rules(self) -> DistributedSpec:
        problems = []
        if self.backend == "ddp" and (self.offload_optimizer != "none" or self.offload_params != "none"):
            problems.append("offload needs backend: deepspeed")
        if self.offload_params != "none" and self.zero_stage != 3:
            problems.append("offload_params needs zero_stage: 3 (stages 1-2 keep parameters on the device)")
        if "nvme" in (self.offload_optimizer, self.offload_params) and not self.nvme_path:
            problems.append("nvme offload needs nvme_path")
        if self.backend == "ddp" and self.deepspeed_overrides:
            problems.append("deepspeed_overrides need backend: deepspeed")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class WandbSpec(Section):
    project: str = Field("ftcluster", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user).")
    group: str | None = Field(None, description="W&B group.")
    tags: list[str] = Field(default_factory=list, description="W&B tags.")
    mode: Literal["auto", "offline", "online", "disabled"] = Field(
        "auto", description="auto: WANDB_MODE if set, else online when WANDB_API_KEY is in the environment (a "
        "cluster's Secret) and offline otherwise; offline writes runs locally (`wandb sync` later); online needs "
        "WANDB_API_KEY.",
    )


class TrackingSpec(Section):
    wandb: WandbSpec | None = Field(None, description="Log to Weights & Biases. None: local metrics only.")


class CostSpec(Section):
    gpu_hour_usd: dict[str, float] = Field(
        default_factory=dict,
        description="USD per GPU-hour by GPU family (H100, A100, ...), overriding the built-in table, "
        "e.g. {H100: 2.10}.",
    )
    cpu_core_hour_usd: float = Field(0.04, ge=0, description="USD per CPU core-hour, for runs on CPUs.")


class OutputSpec(Section):
    dir: str = Field(
        "runs/{name}",
        description="Run folder; {name} is the job name. A local or shared path, or a storage URI that every node "
        "can reach (s3://bucket/runs/{name}, gs://, abfs://; S3-compatible stores via AWS_ENDPOINT_URL): "
        "checkpoints, final weights, metrics and summary are mirrored there.",
    )
    overwrite: bool = Field(
        False, description="Allow a fresh run into a folder that holds a finished run (else an error)."
    )


class JobSpec(Section):
    name: str = Field(description="Job name, used in the output folder and trackers.", pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    cost: CostSpec = Field(default_factory=CostSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    @property
    def rollout_actors(self) -> int:
        """GRPO's rollout actors (method.grpo.rollout.workers); 0 when the training workers sample."""
        return self.method.grpo.rollout.workers if self.method.grpo is not None else 0

    @model_validator(mode="after")
    def _cross_field_checks(self) -> JobSpec:
        """Rules that span sections, from the registry's entries; every problem at once (one per line)."""
        problems = [*self._combination_problems(), *self._setting_problems(), *self._grpo_problems()]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _combination_problems(self) -> list[str]:
        """Does the method, the objective, the data format and the task go together?"""

        method, objective, fmt = METHODS[self.method.name], OBJECTIVES[self.method.objective], FORMATS[self.data.format]
        task, problems = self.model.task, []
        if task not in fmt.tasks:
            problems.append(f"data.format {fmt.name} needs model.task: {' | '.join(fmt.tasks)}" if "causal_lm" not in fmt.tasks
                            else f"model.task {task} needs data.format: "
                            + " | ".join(name for name, f in FORMATS.items() if task in f.tasks))
        if task not in method.tasks:
            problems.append(f"method {method.name} supports {', '.join(method.tasks)} only; use lora for {task}")
        if fmt.name not in objective.formats:
            pair = objective if objective.name != "sft" else next(
                (o for o in OBJECTIVES.values() if fmt.name in o.formats and task in o.tasks), objective)
            rows = FORMATS[pair.formats[0]]
            problems.append(f"method.objective {pair.name} and data.format {' | '.join(pair.formats)} go together "
                            f"({rows.name} rows: {rows.fields})")
        elif task not in objective.tasks:
            problems.append(f"method.objective {objective.name} needs model.task: {' | '.join(objective.tasks)}")
        if objective.methods is not None and method.name not in objective.methods:
            problems.append(f"method.objective {objective.name} supports {', '.join(objective.methods)}, not {method.name}")
        if self.data.packing:
            if not method.packing:
                problems.append(f"data.packing does not work with method {method.name} ({method.why_not}, which hides "
                                "where packed examples start); set it false or use lora")
            if task != "causal_lm":
                problems.append("data.packing applies to model.task causal_lm only; set it false")
            elif not objective.packing:
                problems.append(f"data.packing does not apply to method.objective {objective.name} "
                                f"({fmt.name} rows); set it false")
        deepspeed = self.distributed.backend == "deepspeed"
        if deepspeed and not method.deepspeed:
            problems.append(f"method {method.name} is not supported with backend deepspeed; use lora")
        if deepspeed and objective.needs_reference and not method.adapters and self.distributed.zero_stage == 3:
            problems.append(f"{objective.name} with a {method.name} model under ZeRO-3 would need a partitioned reference "
                            "copy; use lora (its reference is the base with adapters off) or zero_stage 2")
        prompted = " or ".join(name for name, f in FORMATS.items() if f.generation) + " data"
        if self.eval.few_shot_baseline and ((self.eval.generation is None and not self.eval.choices) or not fmt.generation):
            problems.append(f"eval.few_shot_baseline needs eval.generation or eval.choices, and {prompted}")
        if self.eval.choices and (not fmt.generation or objective.name != "sft"):
            problems.append(f"eval.choices scores answers to prompts: it needs method.objective sft and {prompted}")
        if self.eval.harness is not None and task != "causal_lm":
            problems.append("eval.harness runs language-model benchmarks: it needs model.task causal_lm")
        if self.eval.choices and len({c.strip() for c in self.eval.choices}) < len(self.eval.choices):
            problems.append("eval.choices: each choice must differ from the others")
        return problems

    def _grpo_problems(self) -> list[str]:
        """Online RL's settings; its default metric is the held-out reward (it has no validation loss)."""
        grpo, problems = self.method.objective == "grpo", []
        if grpo and self.method.grpo is None:
            problems.append("method.objective grpo needs method.grpo with its rewards, e.g. "
                            "{rewards: [{function: ftcluster.rewards:exact_answer}]}")
        if not grpo and self.method.grpo is not None:
            problems.append("method.grpo applies to method.objective grpo only")
        if grpo and self.distributed.backend == "deepspeed" and self.distributed.zero_stage == 3:
            problems.append("grpo samples completions in the training workers, which ZeRO-3's partitioned weights "
                            "make a collective per token; use zero_stage 2 or backend ddp")
        if grpo and "metric" not in self.eval.model_fields_set:
            self.eval.metric, self.eval.mode = "val_reward", "max"
        return problems

    def _setting_problems(self) -> list[str]:
        """Settings that need another setting."""
        training, distributed, problems = self.training, self.distributed, []
        if training.gradient_checkpointing_every > 1 and not training.gradient_checkpointing:
            problems.append("training.gradient_checkpointing_every needs training.gradient_checkpointing: true")
        if distributed.backend == "deepspeed" and self.method.unfreeze is not None:
            problems.append("unfreeze schedules are not supported with backend deepspeed (ZeRO fixes the trainable set "
                            "at start); use backend ddp")
        if distributed.backend == "deepspeed" and training.skip_nonfinite_steps:
            problems.append("training.skip_nonfinite_steps needs backend ddp (DeepSpeed updates inside backward; "
                            "under fp16 it skips overflowing steps itself)")
        if distributed.deepspeed_overrides:
            from ftcluster.config.deepspeed import contradictions, generated_config

            explicit = None if training.precision == "auto" else training.precision
            clashes = contradictions(generated_config(self, explicit), distributed.deepspeed_overrides)
            if clashes:
                problems.append("distributed.deepspeed_overrides: " + "; ".join(clashes))
        if training.max_failures and not training.checkpoint_every:
            problems.append("training.max_failures needs training.checkpoint_every (restarts resume from a checkpoint)")
        if self.eval.forgetting is not None and (self.model.task != "causal_lm" or not self.eval.before_after):
            problems.append("eval.forgetting needs model.task: causal_lm and eval.before_after: true")
        if self.eval.forgetting is not None and self.eval.forgetting.data is None and self.eval.forgetting.harness is None:
            problems.append("eval.forgetting: set data (general texts), harness (benchmark tasks) or both")
        return problems


# --- loading ------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``training.lr=1e-4`` → (["training", "lr"], 1e-4). The value is parsed as YAML."""
    if "=" not in text:
        raise SpecError(f"override {text!r}: expected KEY=VALUE, e.g. training.lr=1e-4")
    key, _, raw = text.partition("=")
    if not key.strip():
        raise SpecError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def set_dotted(raw: dict[str, Any], path: list[str], value: Any, source: str) -> None:
    """Set ``raw[a][b][c] = value`` for path [a, b, c], creating sections as needed."""
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{source}: {part} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a raw spec dict (creating sections as needed)."""
    for item in overrides:
        path, value = parse_override(item)
        set_dotted(raw, path, value, f"override {item!r}")
    return raw


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file or bad syntax."""
    if not path.is_file():
        raise SpecError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}:{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections (model:, data:, ...) at the top level")
    return raw


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the section at ``loc`` accepts, for 'unknown key' hints."""
    model: Any = JobSpec
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            break
        candidates = list(getattr(field.annotation, "__args__", ()) or (field.annotation,))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def format_validation_errors(source: str, exc: ValidationError) -> list[str]:
    """One line per problem: ``FILE: dotted.path: message (hint)``."""
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            keys = _valid_keys(loc[:-1])
            message = "unknown key" + (f" (valid keys: {', '.join(keys)})" if keys else "")
        elif error["type"] == "missing":
            message = "missing required key"
        if not loc:  # the cross-field checks: one problem per line, each naming its keys
            lines += [f"{source}: {line}" for line in message.splitlines()]
            continue
        lines.append(f"{source}: {path}: {message}")
    return lines


def build_spec(raw: dict[str, Any], source: str = "<spec>") -> JobSpec:
    """Validate a raw dict; every problem is reported at once in one SpecError."""
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError("\n".join(format_validation_errors(source, exc))) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Load a job spec file, apply ``a.b=c`` overrides, validate, and resolve data paths."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    spec = build_spec(raw, str(path))
    spec.data.train = resolve_data_path(spec.data.train, path)
    if spec.data.validation:
        spec.data.validation = resolve_data_path(spec.data.validation, path)
    return spec


def resolve_data_path(value: str, spec_file: Path) -> str:
    """Data paths (and globs) are relative to the working directory, or else to the spec file's
    folder; storage URIs and hub ids are left as they are."""
    if is_remote(value):
        return value
    candidate = str(Path(value).expanduser())
    if Path(candidate).is_absolute() or exists(candidate):
        return candidate
    beside_spec = str(spec_file.parent / candidate)
    return beside_spec if exists(beside_spec) else candidate


def check_files(spec: JobSpec, source: str) -> list[str]:
    """Problems a schema cannot see: data files that do not exist."""
    problems = []
    for key in ("train", "validation"):
        value = getattr(spec.data, key)
        if value and not exists(value):
            problems.append(f"{source}: data.{key}: file not found: {value}")
    return problems


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def describe_fields(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every field of the spec, nested sections included."""
    model = model or JobSpec
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        candidates = getattr(field.annotation, "__args__", ()) or (field.annotation,)
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is not None:
            rows += describe_fields(nested, key + ".")
            continue
        type_name = str(field.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
        registered = next((m.func for m in field.metadata if isinstance(getattr(m, "func", None), RegisteredName)), None)
        if registered is not None:
            type_name = " | ".join(registered.table)
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((key, type_name, default, field.description or ""))
    return rows
