#!/usr/bin/env bash
# GPU numbers, part 1: training-step throughput on one GPU, in one call of at most 8 minutes.
#
#   bash bench/gpu/run.sh [--smoke] [--budget SECONDS] [--only STEP,...] [OUT_DIR]      (OUT_DIR: bench/gpu/out)
#
# Llama-3.2-1B shape (random bf16 weights), sequence 2048, micro batch 4, one process, no Ray:
#   throughput  bench/gpu_throughput.py: LoRA, full and QLoRA, ftcluster's step against the HF + PEFT
#               baseline in the same process; where a target is missed (LoRA tokens/s >= 1.5x the
#               baseline's, full fine-tune MFU >= 50%) a torch.profiler top-kernels table of a few
#               more steps goes to OUT_DIR/run-profile.txt
#   documents   the same script with variable-length documents: baseline pads each batch, ftcluster packs
# Missing packages (pydantic, bitsandbytes) install first from bench/gpu/wheels (`make gpu-wheels`).
# Writes OUT_DIR/run.json (every sub-step: status, seconds, results; a summary) and OUT_DIR/run.log.
# Each sub-step has its own timeout; a failing one is recorded and the script goes on; the whole
# script stays within the budget (450 s; 240 s with --smoke). Exit status 1 when a sub-step failed.
# --only STEP,...: just those sub-steps (to redo one; the rest are recorded as skipped: use another
# OUT_DIR to keep the first results). --smoke: the same steps on CPU with a tiny model (seconds), to
# rehearse before spending GPU time.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export FTC_NORAY_ALSO=${FTC_NORAY_ALSO:-deepspeed,gguf}  # not installed on the GPU machine by this script
gpu_init run "$@"
cd "$REPO" || exit 1
PROFILE=$OUT/run-profile.txt
rm -f "$PROFILE"

gpu_wheels pydantic bitsandbytes
if [ "$SMOKE" = 1 ]; then
    args=(--smoke --cases lora,full,qlora)
    NOTE="smoke: tiny model on CPU, 2 timed steps"
else
    args=(--shape llama-3.2-1b --seq 2048 --batch 4 --steps 20 --warmup 5)
    NOTE=""
    step cuda 90 "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.__version__, torch.cuda.get_device_name())'
    if [ "$LAST_STATUS" != ok ]; then
        skip throughput "no CUDA GPU here (--smoke rehearses on CPU)"
        skip documents "no CUDA GPU here (--smoke rehearses on CPU)"
        gpu_finish
        exit
    fi
fi
NOTE=$NOTE step throughput 300 "${NORAY[@]}" bench/gpu_throughput.py "${args[@]}" --profile "$PROFILE" \
    --json "$WORK/throughput.json"
[ "$SMOKE" = 1 ] && args+=(--documents 12)  # on CPU every new padded shape costs kernel set-up: keep it short
NOTE=$NOTE step documents 150 "${NORAY[@]}" bench/gpu_throughput.py "${args[@]}" --lengths documents --cases lora \
    --json "$WORK/documents.json"
gpu_finish
