#!/usr/bin/env bash
# Runs on the GPU machine (like gpu-check.sh, with gpu-bundle/ carried): where the ResNet50
# step's GPU time goes, kernel by kernel. Nsight Compute times every kernel of one bf16 step
# (one metric, gpu__time_duration; --clock-control none: the clocks as found) and
# scripts/kernel_summary.py sums them per kernel name and per kind (cuDNN, cuBLAS, carp's own).
# cuDNN's heuristic algorithms (--cudnn-find off) keep cudnnFind's thousands of trial launches
# out of the profile; a plain bench row with the same switch gives that step's time unprofiled.
# Environment: PROFILE_BATCH (256), PROFILE_PRECISION (bf16), PROFILE_TESTS (a gpu_tape test
# filter to run first; empty: none), PROFILE_BIG_BATCH=0 skips the batch-1024 step log
# (PROFILE_BIG_STEPS, 2, timed steps; PROFILE_BIG_FIND=1 with cudnnFind), PROFILE_NCU=0 the
# profile.
# Output under $OUT: kernels.csv, kernel-summary.txt, bench-*.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
B=gpu-bundle
. scripts/gpu-unpack.sh
[ -x "$B/bin/carp-bench" ] || { echo "no $B/bin/carp-bench: run scripts/gpu-bundle.sh first" >&2; exit 2; }
O="${OUT:-/tmp}"
mkdir -p "$O"
. scripts/gpu-env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
BB=${PROFILE_BATCH:-256}
PREC=${PROFILE_PRECISION:-bf16}
bench() { # tag timeout_s env... -- carp-bench flags...
    local tag=$1 t=$2
    shift 2
    local envs=()
    while [ "$1" != -- ]; do envs+=("$1"); shift; done
    shift
    timeout "$t" env "${envs[@]}" "$B/bin/carp-bench" --device cuda --arch resnet50 "$@" >"$O/bench-$tag.txt" 2>&1
    echo "== bench $tag (rc $?): $(grep -m1 '^images/s' "$O/bench-$tag.txt")"
    grep -A9 '^phase' "$O/bench-$tag.txt" | head -10
    grep -m1 'cuMemAlloc calls' "$O/bench-$tag.txt"
}

if [ -n "${PROFILE_TESTS:-}" ]; then
    timeout 120 "$B/tests/gpu_tape" "$PROFILE_TESTS" >"$O/tests.txt" 2>&1
    echo "== gpu_tape $PROFILE_TESTS (rc $?): $(grep '^test result' "$O/tests.txt")"
    grep -A12 '^failures:' "$O/tests.txt" | head -30
fi

# The step unprofiled, with the same heuristic algorithms the profile sees.
bench heuristic 120 -- --cudnn-find off --batch "$BB" --precision "$PREC" --warmup 1 --steps 3

NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ "${PROFILE_NCU:-1}" = 0 ]; then
    echo "== ncu skipped (PROFILE_NCU=0)"
elif [ -n "$NCU" ]; then
    rm -f /tmp/carp-step.ncu-rep
    timeout "${PROFILE_NCU_TIMEOUT_S:-240}" "$NCU" --clock-control none \
        --metrics gpu__time_duration.sum --nvtx -o /tmp/carp-step -f \
        "$B/bin/carp-bench" --device cuda --arch resnet50 --cudnn-find off --batch "$BB" --precision "$PREC" \
        --no-phase-sync --warmup 0 --steps 1 >"$O/ncu-run.txt" 2>&1
    echo "== ncu (rc $?): $(tail -1 "$O/ncu-run.txt")"
    if [ -f /tmp/carp-step.ncu-rep ]; then
        "$NCU" --import /tmp/carp-step.ncu-rep --csv --page raw --print-units base >"$O/kernels.csv" 2>"$O/ncu-import.txt"
        # The same rows named by their innermost NVTX range (carp's op names), when this ncu can.
        "$NCU" --import /tmp/carp-step.ncu-rep --csv --page raw --print-units base \
            --print-nvtx-rename kernel >"$O/kernels-nvtx.csv" 2>>"$O/ncu-import.txt" || rm -f "$O/kernels-nvtx.csv"
        python3 scripts/kernel_summary.py "$O/kernels.csv" kernels --top 45 | tee "$O/kernel-summary.txt"
        [ -s "$O/kernels-nvtx.csv" ] && python3 scripts/kernel_summary.py "$O/kernels-nvtx.csv" kernels --top 30 >"$O/kernel-summary-nvtx.txt" 2>&1
    fi
else
    echo "== ncu not found"
fi

if [ "${PROFILE_BIG_BATCH:-1}" != 0 ]; then
    # The paper's global batch on one card, phases synchronized, every step's time in the log;
    # cuDNN's heuristics (cudnnFind took 70 s at this batch), PROFILE_BIG_FIND=1 to time them.
    big_find=off
    [ "${PROFILE_BIG_FIND:-0}" = 1 ] && big_find=on
    bench b1024 200 -- --cudnn-find "$big_find" --batch 1024 --precision bf16 \
        --warmup 1 --steps "${PROFILE_BIG_STEPS:-2}"
    grep '^step ' "$O/bench-b1024.txt"
fi
