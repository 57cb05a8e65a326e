#!/usr/bin/env bash
# Every CUDA measurement BENCHMARKS.md lists as "not measured", in one run, into one Markdown table.
#
#     bench/gpu.sh [OUT.md]            # default ./bench-gpu.md; the commands' whole output in OUT.log,
#                                      # python -m bench.machine's report in OUT-machine.md
#     GPU_DRY_RUN=1 bench/gpu.sh       # print the commands, one per line, and run nothing
#
# Python: GPU_PYTHON if set, else .venv/bin/python when present, else python. GPU_BUDGET_S: the
# time budget in seconds (default 465).
#
# Each command runs under `timeout`; one that fails or times out leaves the row
# "FAILED (exit N): <its last stderr line>" and the rest go on. The exit status is 1 when any row
# failed or was skipped. SD-size models are built with random weights by each script.
#
# Time budget on one H200 (assumed / timeout per command). No command is given more than what is
# left of GPU_BUDGET_S (default 465 s); once under 15 s are left, the rest are SKIPPED.
#   versions for the header                                           3 s /  60 s
#   unet.py: 2 SD U-Nets, fp16 speed at 48 and 64 px, peak fwd+bwd   40 s / 150 s
#   vae.py: decode 384 px fp16, 30 runs per model                    20 s /  60 s
#   clip_text.py, text tower fp16                                    15 s /  60 s
#   clip_text.py --tower vision (ViT-H/14, 632M) fp16                25 s /  90 s
#   eval.py: 160 PNGs written, 128 timed, 256 texts, batch 32        25 s /  90 s
#   retrinet.py: 2 checkpointing x (plain, K = 1, 2, 4) x 8 steps    40 s / 150 s
#   data.synthetic: 64 images of 384 px, shared by train.py          10 s /  60 s
#   8 x train.py sd15 (3 methods x their locks, 2 + 5 steps + 1)     20 s /  75 s each
#   python -m bench.machine, after the table (outside the budget)     3 s /  60 s
# Assumed total: 3 + 40 + 20 + 15 + 25 + 25 + 40 + 10 + 160 = 338 s, under 6 minutes.
# The eight bench/memory.py estimates (CPU only, fake tensors: about 10-25 s each) run one after
# another in the background from the start (niced, 90 s each at most), off that path; each train.py
# run first waits (60 s at most) for its configuration's estimate, which goes into the table as a
# bench/memory.py row (estimate in the reference column) and to train.py as `--estimate SIZE`, so
# that the measured peak stands beside it. The size is memory.py's line "estimated peak: X GiB".
set -u

out=${1:-bench-gpu.md}
case $out in /*) ;; *) out=$PWD/$out ;; esac
log=${out%.md}.log
cd "$(dirname "$0")/.." || exit 1
if [ -n "${GPU_PYTHON:-}" ]; then PY=$GPU_PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python
fi
dry=0
[ "${GPU_DRY_RUN:-0}" != 0 ] && dry=1
budget=${GPU_BUDGET_S:-465}
min_left=15
failures=0
export PYTHONUNBUFFERED=1

quote() {  # the command as one shell-quoted line
    local line
    line=$(printf '%q ' "$@")
    printf '%s\n' "${line% }"
}

cell() {  # one table cell: one line, '|' escaped
    local s=${1//$'\r'/}
    s=${s//$'\n'/ }
    s=${s//$'\t'/ }
    printf '%s' "${s//|/\\|}"
}

row() {  # row SCRIPT MEASUREMENT [OURS [REFERENCE [RATIO]]]
    printf '| %s | %s | %s | %s | %s |\n' "$(cell "$1")" "$(cell "$2")" "$(cell "${3:-}")" \
        "$(cell "${4:-}")" "$(cell "${5:-}")" >> "$out"
}

nrows() { grep -c '^|' "$out"; }

# measure LABEL TIMEOUT COMMAND...: run COMMAND, its stdout to the console and the log, and record
# a row when it fails, times out, is skipped for lack of time, or writes no row of its own.
# NO_ROWS=1 before the call: the command writes no rows (only its failure is recorded).
measure() {
    local label=$1 cap=$2
    shift 2
    if [ "$dry" = 1 ]; then quote "$@"; return 0; fi
    local left=$((deadline - SECONDS))
    if [ "$left" -lt "$min_left" ]; then
        row "$label" "SKIPPED: the ${budget} s budget was spent"
        echo "== SKIPPED (budget spent): $(quote "$@")" | tee -a "$log"
        failures=$((failures + 1))
        return 1
    fi
    local t=$((cap < left ? cap : left)) before start rc err msg
    before=$(nrows)
    err=$(mktemp)
    echo "== $(quote "$@")   [timeout ${t} s, ${left} s of the budget left]" | tee -a "$log"
    start=$SECONDS
    timeout -k 10 "$t" "$@" 2> "$err" | tee -a "$log"
    rc=${PIPESTATUS[0]}
    cat "$err" >> "$log"
    echo "== exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    if [ "$rc" != 0 ]; then
        if [ "$((SECONDS - start))" -ge "$t" ]; then
            msg="timed out after ${t} s"
        else
            msg=$(grep -v '^[[:space:]]*$' "$err" | tail -n 1 | cut -c1-300)
        fi
        tail -n 5 "$err" >&2
        row "$label" "FAILED (exit $rc): ${msg:-no error output}"
        failures=$((failures + 1))
    elif [ "${NO_ROWS:-0}" != 1 ] && [ "$(nrows)" = "$before" ]; then
        row "$label" "FAILED: exit 0 but no row written"
        failures=$((failures + 1))
        rc=1
    fi
    rm -f "$err"
    return "$rc"
}

train_shape() {  # as bench/train.py: RetriNet at 384 px with K = 2, the baselines at 256 px with one
    if [ "$1" = retrinet ]; then res=384 refs=2; else res=256 refs=1; fi
}

memory_cmd() {  # memory_cmd METHOD LOCK: the estimate's command line into the array mem
    train_shape "$1"
    mem=("$PY" bench/memory.py --method "$1" --lock "$2" --resolution "$res" --refs "$refs" --precision fp16
         --checkpointing)
}

estimates() {  # the eight estimates, one after another; each leaves its exit status in memory-M-L.rc
    local method lock
    for method in "${methods[@]}"; do
        locks_of "$method"
        for lock in "${locks[@]}"; do
            memory_cmd "$method" "$lock"
            timeout -k 5 90 nice -n 10 "${mem[@]}" > "$tmp/memory-$method-$lock.out" 2>&1
            echo $? > "$tmp/memory-$method-$lock.rc.part"
            mv "$tmp/memory-$method-$lock.rc.part" "$tmp/memory-$method-$lock.rc"  # whole when it appears
        done
    done
}

# memory_row METHOD LOCK: wait for that estimate (60 s at most, within the budget), record its row,
# and leave `--estimate SIZE` for train.py in the array est.
memory_row() {
    local f=$tmp/memory-$1-$2 label="bench/memory.py --method $1 --lock $2" patience e rc setup msg
    est=()
    patience=$((deadline - SECONDS - min_left))
    [ "$patience" -gt 60 ] && patience=60
    while [ ! -e "$f.rc" ] && [ "$patience" -gt 0 ]; do sleep 1; patience=$((patience - 1)); done
    if [ ! -e "$f.rc" ]; then
        row "$label" "FAILED: no estimate yet (still running, or not started)"
        failures=$((failures + 1))
        return
    fi
    memory_cmd "$1" "$2"
    { echo "== $(quote "${mem[@]}")   [in the background, exit $(cat "$f.rc")]"; cat "$f.out"; } >> "$log"
    rc=$(cat "$f.rc")
    e=$(sed -n 's/^estimated peak: \([0-9.]* GiB\)$/\1/p' "$f.out" | tail -n 1)
    setup="sd15 $1 lock $2, $res px, K=$refs, batch 1, fp16 autocast, checkpointing"
    if [ -n "$e" ]; then
        row "$label" "estimated peak memory (allocated), $setup" "" "$e"
        est=(--estimate "$e")
        return
    fi
    case $rc in
        0) msg="FAILED: exit 0 but no line 'estimated peak: X GiB' in its output" ;;
        124|137) msg="FAILED (exit $rc): timed out after 90 s" ;;
        *) msg="FAILED (exit $rc): $(grep -v '^[[:space:]]*$' "$f.out" | tail -n 1 | cut -c1-300)" ;;
    esac
    row "$label" "$msg"
    failures=$((failures + 1))
}

gpu_names=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null) || gpu_names=""
gpu=()  # bench/train.py's --gpu: the fp16 peak its achieved fraction is taken against
case $gpu_names in
    *H200*) gpu=(--gpu H200) ;; *H100*) gpu=(--gpu H100) ;; *A100*) gpu=(--gpu A100) ;; *V100*) gpu=(--gpu V100) ;;
esac

methods=(retrinet controlnet ip-adapter)
locks_of() {  # the locks of a method, in the array locks (the IP-Adapter has no encoder of its own for LockB)
    if [ "$1" = ip-adapter ]; then locks=(none decoder); else locks=(none decoder both); fi
}

if [ "$dry" = 1 ]; then
    tmp=${TMPDIR:-/tmp}/gpu-bench.XXXXXX
    for method in "${methods[@]}"; do
        locks_of "$method"
        for lock in "${locks[@]}"; do memory_cmd "$method" "$lock"; quote "${mem[@]}"; done
    done
else
    tmp=$(mktemp -d) || exit 1
    estimates &
    estimates_pid=$!
    # the estimates' job and its running command (timeout passes the signal on), then the scratch folder
    trap 'pkill -P "$estimates_pid" 2>/dev/null; kill "$estimates_pid" 2>/dev/null; rm -rf "$tmp"' EXIT
    deadline=$((SECONDS + budget))
    : > "$log"
    versions=$(timeout 60 "$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                                    f"cuda available: {torch.cuda.is_available()}")' 2>/dev/null) \
        || versions="torch not importable with $PY"
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && commit="$commit + uncommitted changes"
    {
        echo "# CUDA measurements (bench/gpu.sh)"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "- GPU: ${gpu_names:-nvidia-smi not available}" | paste -sd ';' - | sed 's/;/; /g'
        echo "- $versions"
        echo "- commit: $commit"
        echo "- every command and its whole output: $(basename "$log")"
        echo
        echo "| script | measurement | ours | reference | ratio / error |"
        echo "|---|---|---|---|---|"
    } > "$out"
fi

measure "bench/unet.py" 150 "$PY" bench/unet.py --device cuda --cuda-only --report "$out"
measure "bench/vae.py" 60 "$PY" bench/vae.py --device cuda --cuda-only --report "$out"
measure "bench/clip_text.py (text)" 60 \
    "$PY" bench/clip_text.py --device cuda --dtype fp16 --repeats 30 --report "$out"
measure "bench/clip_text.py (vision)" 90 \
    "$PY" bench/clip_text.py --device cuda --dtype fp16 --tower vision --vision-config h14 --repeats 30 --report "$out"
measure "bench/eval.py" 90 \
    "$PY" bench/eval.py --device cuda --images 128 --texts 256 --batch 32 --report "$out"
measure "bench/retrinet.py" 150 "$PY" bench/retrinet.py --device cuda --cuda-only --repeats 5 --report "$out"

# One synthetic dataset for the eight training runs (each would otherwise write its own).
data=(--data "$tmp/syn")
NO_ROWS=1 measure "python -m data.synthetic (train.py's data)" 60 "$PY" -m data.synthetic --out "$tmp/syn" \
    --identities 16 --images-per-identity 4 --size 384 --seed 0 --noise-fraction 0 || data=()

for method in "${methods[@]}"; do
    locks_of "$method"
    for lock in "${locks[@]}"; do
        est=()
        [ "$dry" = 1 ] || memory_row "$method" "$lock"
        measure "bench/train.py --method $method --lock $lock" 75 "$PY" bench/train.py --preset sd15 --device cuda \
            --method "$method" --lock "$lock" ${data[@]+"${data[@]}"} --warmup 2 --steps 5 ${gpu[@]+"${gpu[@]}"} \
            --report "$out" ${est[@]+"${est[@]}"}
    done
done

# The machine's facts (GPU, bf16, the fused fp16 attention kernels at SD's head sizes) and the
# settings they call for, into a file of their own beside the table.
machine=${out%.md}-machine.md
if [ "$dry" = 1 ]; then
    quote "$PY" -m bench.machine
    exit 0
fi
timeout 60 "$PY" -m bench.machine > "$machine" 2>> "$log" \
    || echo "python -m bench.machine failed (its error is in $(basename "$log"))" > "$machine"
{
    echo
    echo "Total wall time $SECONDS s (budget $budget s); $failures command(s) failed or were skipped."
} >> "$out"
echo "wrote $out ($failures failed or skipped); the machine: $machine; log: $log"
[ "$failures" = 0 ]
