#!/usr/bin/env bash
# GPU numbers, part 2: memory against the planner, 8B QLoRA, DeepSpeed ZeRO on one GPU, bf16 vs fp32,
# in one call of at most 8 minutes.
#
#   bash bench/gpu/memory.sh [--smoke] [--budget SECONDS] [--only STEP,...] [OUT_DIR]   (OUT_DIR: bench/gpu/out)
#
#   pytest_gpu    pytest -m gpu (tests/test_gpu.py: bf16 LoRA, fp16 full, QLoRA, packed flex attention)
#   planner_1b    bench/planner_memory.py, Llama-3.2-1B shape, sequence 2048, micro batch 4: full, LoRA,
#                 LoRA + gradient checkpointing, QLoRA (+ checkpointing), and the chunked loss;
#                 measured = torch.cuda.max_memory_allocated (target: each within 10% of the planner)
#   qlora_8b      the same for the Llama-3.1-8B shape, QLoRA + gradient checkpointing, 4 steps
#                 (fits and trains; memory against the plan)
#   zero2, zero3  DeepSpeed ZeRO-2 / ZeRO-3 with one process on the GPU (bf16), ftcluster's loop
#                 without Ray, a small random Llama, 8 steps (bench/gpu/train_check.py)
#   bf16_vs_fp32  the same job in bf16 and in fp32 on the same batches (LoRA and full): loss curves
#                 within 2% at every step
# Missing packages (pydantic, bitsandbytes, DeepSpeed from its source with DS_BUILD_OPS=0, hjson)
# install first from bench/gpu/wheels (`make gpu-wheels`). On a GPU the two groups of steps (the
# large models; the small jobs) run side by side (FTC_PARALLEL=0: one after the other).
# Writes OUT_DIR/memory.json and OUT_DIR/memory.log; each sub-step has its own timeout, a failing
# one is recorded and the script goes on; the whole script stays within the budget (450 s; 240 s
# with --smoke). Exit status 1 when a sub-step failed.
# --only STEP,...: just those sub-steps (to redo one; the rest are recorded as skipped: use another
# OUT_DIR to keep the first results). --smoke: the same steps on CPU with tiny models (what needs
# CUDA is skipped and says so in the JSON).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export FTC_NORAY_ALSO=${FTC_NORAY_ALSO:-gguf}  # not installed on the GPU machine by this script
gpu_init memory "$@"
cd "$REPO" || exit 1

gpu_wheels pydantic bitsandbytes deepspeed hjson
if [ "$SMOKE" = 1 ]; then
    smoke=(--smoke)
    planner_1b=(--model tiny --seq 64 --device cpu --cases full:2,lora:2,lora+gc:2,qlora:2)
    planner_8b=(--model tiny --seq 64 --device cpu --cases qlora+gc:2 --steps 3)
    NOTE_1B="smoke: tiny model on CPU (peak live tensor bytes), not Llama-3.2-1B"
    NOTE_8B="smoke: tiny model on CPU, not Llama-3.1-8B"
    NOTE_SMALL="smoke: 2-layer model on CPU, fp32 (DeepSpeed bf16 needs the GPU)"
    NOTE_TESTS="smoke: no CUDA, so every gpu test skips (the JSON lists them)"
else
    smoke=()
    step cuda 90 "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.__version__, torch.cuda.get_device_name())'
    if [ "$LAST_STATUS" != ok ]; then
        for name in pytest_gpu planner_1b qlora_8b zero2 zero3 bf16_vs_fp32; do
            skip "$name" "no CUDA GPU here (--smoke rehearses on CPU)"
        done
        gpu_finish
        exit
    fi
    planner_1b=(--model llama-3.2-1b --seq 2048 --device cuda --chunk-tokens 2048
                --cases full:4,lora:4,lora+gc:4,qlora:4,qlora+gc:4,lora+gc+chunk:4,full+chunk:4)
    planner_8b=(--model llama-3.1-8b --seq 2048 --device cuda --cases qlora+gc:4 --steps 4)
    NOTE_1B="" NOTE_8B="" NOTE_SMALL="" NOTE_TESTS=""
fi

large_models() {
    NOTE=$NOTE_1B step planner_1b 180 "${NORAY[@]}" bench/planner_memory.py "${planner_1b[@]}" --json "$WORK/planner_1b.json"
    NOTE=$NOTE_8B step qlora_8b 240 "${NORAY[@]}" bench/planner_memory.py "${planner_8b[@]}" --json "$WORK/qlora_8b.json"
}

small_jobs() {
    NOTE=$NOTE_TESTS step pytest_gpu 240 "${NORAY[@]}" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
        --timeout 150 --junitxml="$WORK/pytest_gpu.xml"
    NOTE=$NOTE_SMALL step zero2 100 "${NORAY[@]}" bench/gpu/train_check.py zero --stage 2 "${smoke[@]}" --json "$WORK/zero2.json"
    NOTE=$NOTE_SMALL step zero3 100 "${NORAY[@]}" bench/gpu/train_check.py zero --stage 3 "${smoke[@]}" --json "$WORK/zero3.json"
    NOTE=${NOTE_SMALL%%,*} step bf16_vs_fp32 100 "${NORAY[@]}" bench/gpu/train_check.py precision "${smoke[@]}" \
        --json "$WORK/bf16_vs_fp32.json"
}

lane large_models
lane small_jobs
lanes_wait
gpu_finish
