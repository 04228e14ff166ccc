#!/usr/bin/env bash
# GPU numbers, part 3: shared-base packs (issue 31) against separate trials, in one call of at most 8 minutes.
#
#   bash bench/gpu/shared_base.sh [--smoke] [--budget SECONDS] [--only STEP,...] [OUT_DIR]   (OUT_DIR: bench/gpu/out)
#
#   shared_base_1b  bench/shared_base.py --in-process: Llama-3.2-1B shape (random bf16 weights, byte
#                   tokenizer), sequence 1024, LoRA on every linear layer, 6 steps of batch 4; 4 and 8
#                   trials as separate processes one after another (memory: the sum of their
#                   torch.cuda.max_memory_allocated, what N at once would hold) against one process
#                   training them as a pack over one base. Targets: memory of 8 packed <= 0.4 of 8
#                   separate; tokens/s of the pack >= the separate trials'.
# No Ray on the GPU machine: the step runs under bench/gpu/noray.py, as the others do.
# Writes OUT_DIR/shared_base.json and OUT_DIR/shared_base.log (see setup.sh). --smoke: a tiny model on
# CPU, 2 trials, 2 steps (seconds), to rehearse before spending GPU time.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export FTC_NORAY_ALSO=${FTC_NORAY_ALSO:-deepspeed,gguf}  # not installed on the GPU machine by this script
gpu_init shared_base "$@"
cd "$REPO" || exit 1

gpu_wheels pydantic
if [ "$SMOKE" = 1 ]; then
    args=(--model tiny --trials 2 --steps 2)
    NOTE="smoke: tiny model on CPU (peak RSS), not Llama-3.2-1B"
else
    step cuda 90 "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.__version__, torch.cuda.get_device_name())'
    if [ "$LAST_STATUS" != ok ]; then
        skip shared_base_1b "no CUDA GPU here (--smoke rehearses on CPU)"
        gpu_finish
        exit
    fi
    args=(--model llama-3.2-1b --trials 4,8 --steps 6 --seq 1024)
    NOTE=""
fi
NOTE=$NOTE step shared_base_1b 420 "${NORAY[@]}" bench/shared_base.py --in-process "${args[@]}" \
    --json "$WORK/shared_base_1b.json"
gpu_finish
