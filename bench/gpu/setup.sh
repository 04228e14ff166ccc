# Shared by bench/gpu/run.sh and bench/gpu/memory.sh (sourced, not run).
#
#   gpu_init NAME "$@"        parse [--smoke] [--budget SECONDS] [--only STEP,...] [OUT_DIR]; set PY, OUT,
#                             LOG, WORK, SMOKE, DEADLINE; export the environment every sub-step runs in
#   gpu_wheels MODULE...      make those modules importable: nothing to do where they already are (this
#                             project's .venv); else install the carried wheels (bench/gpu/wheels, from
#                             `make gpu-wheels`) into $WORK/site, which is on PYTHONPATH
#   step NAME TIMEOUT CMD...  one sub-step under its own `timeout`, cut to what is left of the budget;
#                             its output goes to $LOG, its record (status, exit code, seconds, the
#                             result it wrote to $WORK/NAME.json) to $OUT/NAME.json, rewritten after
#                             every step; a failing step is recorded and the script goes on
#   skip NAME REASON          record a sub-step that does not run here (e.g. needs CUDA, on --smoke)
#   lane CMD...               run a sequence of steps in the background (parallel lanes; FTC_PARALLEL=0
#                             runs them in turn); lanes_wait waits for all of them
#   gpu_finish                write the final JSON, print its summary; exit 0 when no step failed
#
# Environment: FTC_PYTHON (interpreter; default .venv/bin/python where it exists, else python3),
# FTC_WHEELS (wheel folder), FTC_FORCE_WHEELS=1 (install them even where the modules import),
# FTC_BUDGET (seconds for the whole script), FTC_PARALLEL (0/1).

GPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$GPU_DIR/../.." && pwd)
WHEELS=${FTC_WHEELS:-$GPU_DIR/wheels}

gpu_init() {
    NAME=$1
    shift
    SMOKE=0
    OUT=$GPU_DIR/out
    BUDGET=${FTC_BUDGET:-}
    ONLY=""
    while [ $# -gt 0 ]; do
        case $1 in
            --smoke) SMOKE=1 ;;
            --budget) BUDGET=$2; shift ;;
            --only) ONLY=$2; shift ;;
            -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
            -*) echo "unknown option: $1" >&2; exit 2 ;;
            *) OUT=$1 ;;
        esac
        shift
    done
    # 450 s of an 8-minute device call: the rest is for the wheel copy and this script's own work
    BUDGET=${BUDGET:-$([ "$SMOKE" = 1 ] && echo 240 || echo 450)}
    STARTED=$(date +%s)
    DEADLINE=$((STARTED + BUDGET))
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    LOG=$OUT/$NAME.log
    JSON=$OUT/$NAME.json
    : >"$LOG"
    rm -f "$JSON"
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/ftc-$NAME.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    trap 'echo "interrupted" >>"$LOG"; [ ${#LANES[@]} -gt 0 ] && kill "${LANES[@]}" 2>/dev/null; gpu_write interrupted; exit 130' INT TERM
    if [ -n "${FTC_PYTHON:-}" ]; then
        PY=$FTC_PYTHON
    elif [ -x "$REPO/.venv/bin/python" ]; then
        PY=$REPO/.venv/bin/python
    else
        PY=python3
    fi
    PARALLEL=${FTC_PARALLEL:-$([ "$SMOKE" = 1 ] && echo 0 || echo 1)}
    GPU_INFO=""
    if [ "$SMOKE" = 1 ]; then
        export CUDA_VISIBLE_DEVICES=""  # the rehearsal runs on CPU, GPU or not
    elif command -v nvidia-smi >/dev/null 2>&1; then
        GPU_INFO=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
    fi
    export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
    export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    export FTCLUSTER_CACHE=$WORK/cache FTC_NORAY_REPORT=$WORK/noray.jsonl
    export FTC_SCRIPT=$NAME FTC_SMOKE=$SMOKE FTC_STARTED=$STARTED FTC_BUDGET=$BUDGET FTC_GPU_INFO=$GPU_INFO
    export FTC_PYTHON_USED=$PY
    # Ray, W&B and Optuna are unimportable under this wrapper, as on the GPU machine (see noray.py);
    # a script adds what it does not install there to FTC_NORAY_ALSO
    NORAY=("$PY" "$GPU_DIR/noray.py")
    echo "[$(date +%T)] $NAME: $([ "$SMOKE" = 1 ] && echo "smoke rehearsal on CPU" || echo "${GPU_INFO:-no GPU seen}"),"\
         "budget ${BUDGET}s, python $PY, output $OUT" | tee -a "$LOG"
}

gpu_write() {  # gpu_write [final|interrupted]
    "$PY" "$GPU_DIR/collect.py" write "$WORK" "$JSON" "${1:-}" 2>>"$LOG"
}

record() {  # record NAME STATUS RC START_S END_S TIMEOUT NOTE (times: seconds since the epoch)
    "$PY" "$GPU_DIR/collect.py" record "$WORK" "$@" 2>>"$LOG"
    gpu_write
}

skip() {  # skip NAME REASON
    echo "[$(date +%T)] $1: skipped ($2)" | tee -a "$LOG"
    record "$1" skipped 0 "$(date +%s)" "$(date +%s)" 0 "$2"
    LAST_STATUS=skipped
}

step() {  # [NOTE=TEXT] step NAME TIMEOUT_S CMD ...   (NOTE lands in the step's record)
    local name=$1 limit=$2 left rc t0 t1 status note=${NOTE:-}
    shift 2
    if [ -n "$ONLY" ] && [[ ",$ONLY,wheels,cuda," != *",$name,"* ]]; then
        skip "$name" "not selected (--only $ONLY)"
        return 0
    fi
    left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 20 ]; then
        skip "$name" "${note:+$note; }out of time: ${left}s left of the ${BUDGET}s budget"
        return 0
    fi
    if [ "$limit" -gt $((left - 5)) ]; then
        limit=$((left - 5))
        note="${note:+$note; }timeout cut to ${limit}s by the budget"
    fi
    echo "[$(date +%T)] $name: start (timeout ${limit}s)"
    t0=$(date +%s.%N)
    if [ "$PARALLEL" = 1 ] && [ -n "${IN_LANE:-}" ]; then
        # in a lane: keep the output apart, append it whole when the step ends (no interleaving)
        timeout --kill-after=15 "$limit" "$@" >"$WORK/$name.out" 2>&1
        rc=$?
        { printf '\n===== %s: %s\n' "$name" "$*"; cat "$WORK/$name.out"; } >>"$LOG"
    else
        printf '\n===== %s: %s\n' "$name" "$*" >>"$LOG"
        timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG" >"$WORK/$name.out"
        rc=${PIPESTATUS[0]}
    fi
    t1=$(date +%s.%N)
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    echo "[$(date +%T)] $name: $status (exit $rc, $(awk "BEGIN { printf \"%.0f\", $t1 - $t0 }")s)"
    record "$name" "$status" "$rc" "$t0" "$t1" "$limit" "$note"
    LAST_STATUS=$status
}

LANES=()
lane() {  # lane CMD ... : a function or command that runs steps one after another
    if [ "$PARALLEL" = 1 ]; then
        (IN_LANE=1 "$@") &
        LANES+=($!)
    else
        "$@"
    fi
}

lanes_wait() {
    local pid
    for pid in "${LANES[@]}"; do
        wait "$pid"
    done
    LANES=()
}

install_wheels() {  # install_wheels WITH_DEEPSPEED(0/1): run as a step (in its own bash)
    local site=$WORK/site
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "no wheels in $WHEELS: run 'make gpu-wheels' where pip reaches PyPI, and carry bench/gpu/wheels"
        return 2
    fi
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$WHEELS"/*.whl || return
    if [ "$1" = 1 ]; then
        local sdist
        sdist=$(ls "$WHEELS"/deepspeed-*.tar.gz 2>/dev/null | head -1)
        [ -n "$sdist" ] || { echo "no DeepSpeed source package in $WHEELS"; return 2; }
        echo "building $(basename "$sdist") with DS_BUILD_OPS=0"
        DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
            --target "$site" "$sdist" || return
    fi
}

gpu_wheels() {  # gpu_wheels MODULE ...
    local missing with_ds=0 module
    missing=$("$PY" -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' "$@")
    [ "${FTC_FORCE_WHEELS:-0}" = 1 ] && missing="$*"  # rehearse the install where all are there already
    if [ -z "$missing" ]; then
        skip wheels "already importable: $*"
        return 0
    fi
    for module in $missing; do
        [ "$module" = deepspeed ] && with_ds=1
    done
    echo "[$(date +%T)] missing here: $missing"
    step wheels 200 bash -c 'source "$0"; WORK=$1 PY=$2; install_wheels "$3" && "$PY" -c "$4" $5' \
        "$GPU_DIR/setup.sh" "$WORK" "$PY" "$with_ds" \
        'import importlib, sys; [print(m, getattr(x, "__version__", "?"), x.__file__) for x, m in ((importlib.import_module(m), m) for m in sys.argv[1:])]' \
        "$missing"
}

gpu_finish() {  # the script's exit status: 0 when no step failed or timed out
    gpu_write final
    "$PY" "$GPU_DIR/collect.py" summary "$JSON" 2>&1 | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}
