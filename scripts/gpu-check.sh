#!/usr/bin/env bash
# Runs on the GPU machine, from the repo root, with gpu-bundle/ (made by scripts/gpu-bundle.sh)
# present: the GPU tests, compute-sanitizer memcheck over the GPU op tests, and one ResNet50
# training step through carp-bench when it supports one. Prints a short table at the end.
# Fits in 10 minutes: every step has its own timeout.
# Environment: GPU_CHECK_MEMCHECK=0 skips compute-sanitizer; GPU_CHECK_TORCH=0 skips the PyTorch
# reference; BENCH_BATCH (64) and BENCH_STEPS (3) size the ResNet50 step.
set -uo pipefail
cd "$(dirname "$0")/.."
B=gpu-bundle
if [ ! -d "$B/tests" ]; then
    echo "no $B/tests: run scripts/gpu-bundle.sh on the build machine first" >&2
    exit 2
fi
LOG="${OUT:-/tmp}/gpu-check.log"
: >"$LOG"

# PyTorch brings its own cuDNN: it runs with the loader path as it was (see step 3).
ORIG_LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
# cuBLAS / cuDNN / NCCL: the image ships them as Python wheels (nvidia-cublas, nvidia-cudnn-cu13,
# ...); put their lib folders on the loader path for cudarc's dlopen.
for lib in 'libcudnn.so.9*' 'libcublas.so.13*' 'libcublasLt.so.13*' 'libnccl.so.2*'; do
    for d in $(find /opt /usr/local /usr/lib /usr/lib64 -name "$lib" -printf '%h\n' 2>/dev/null | sort -u); do
        case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
    done
done
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee -a "$LOG"
nvidia-smi -L 2>&1 | tee -a "$LOG"

declare -a ROWS
row() { ROWS+=("$(printf '%-44s %-6s %8s  %s' "$1" "$2" "$3" "$4")"); }

run_step() { # name timeout_s command...
    local name=$1 t=$2
    shift 2
    local start end rc
    start=$(date +%s.%N)
    echo "=== $name: $*" | tee -a "$LOG"
    timeout "$t" "$@" >>"$LOG" 2>&1
    rc=$?
    end=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}')
    local status=PASS
    [ $rc -ne 0 ] && status=FAIL
    [ $rc -eq 124 ] && status=TIMEOUT
    row "$name" "$status" "${secs}s" "rc=$rc"
    return $rc
}

overall=0
# 1. The GPU tests (gpu_* binaries), then the rest of the suite built with --features cuda.
for t in "$B"/tests/gpu_*; do
    [ -x "$t" ] || continue
    # The kernel emulator is a CPU test (needs the sources and g++), not a GPU check.
    [ "$(basename "$t")" = gpu_kernels_sim ] && continue
    run_step "test $(basename "$t")" 300 "$t" || overall=1
done
if grep -q "^SKIPPED" "$LOG"; then
    row "GPU tests skipped (no GPU seen)" FAIL "-" "$(grep -m1 '^SKIPPED' "$LOG")"
    overall=1
fi
# 2. memcheck over the op tests, without the large ResNet50 conv shapes (slow under the tool).
if [ "${GPU_CHECK_MEMCHECK:-1}" = 0 ]; then
    row "memcheck gpu_ops" SKIP "-" "GPU_CHECK_MEMCHECK=0"
elif command -v compute-sanitizer >/dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
    CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    run_step "memcheck gpu_ops" 200 "$CS" --tool memcheck --error-exitcode 1 \
        "$B/tests/gpu_ops" --test-threads=1 --skip conv2d_resnet50_shapes || overall=1
else
    row "memcheck gpu_ops" SKIP "-" "compute-sanitizer not found"
fi
# 3. ResNet50 training steps at batch 64 (K 65536, NB 512, 224x224): ours, then PyTorch's.
BB=${BENCH_BATCH:-64}
BS=${BENCH_STEPS:-3}
ours_ips="" torch_ips=""
if "$B/bin/carp-bench" --help 2>/dev/null | grep -q -- "--device"; then
    bench_out="${OUT:-/tmp}/carp-bench.json"
    run_step "carp-bench resnet50 step (batch $BB)" 240 bash -o pipefail -c \
        "'$B/bin/carp-bench' --device cuda --arch resnet50 --batch $BB --warmup 1 --steps $BS --json | tee '$bench_out'" ||
        overall=1
    ours_ips=$(grep -o '"images_per_s":[0-9.eE+-]*' "$bench_out" 2>/dev/null | tail -1 | cut -d: -f2)
    ours_mem=$(grep -o '"peak_mem_gib":[0-9.eE+-]*' "$bench_out" 2>/dev/null | tail -1 | cut -d: -f2)
    row "  carp images/s (peak GiB)" INFO "-" "${ours_ips:-?} (${ours_mem:-?}), TF32 convs as PyTorch's default"
    if [ "${GPU_CHECK_FMA_BENCH:-1}" != 0 ]; then
        fma_out="${OUT:-/tmp}/carp-bench-fma.json"
        run_step "carp-bench resnet50 (batch $BB, CARP_TF32=0)" 240 env CARP_TF32=0 bash -o pipefail -c \
            "'$B/bin/carp-bench' --device cuda --arch resnet50 --batch $BB --warmup 1 --steps $BS --json | tee '$fma_out'" ||
            overall=1
        fma_ips=$(grep -o '"images_per_s":[0-9.eE+-]*' "$fma_out" 2>/dev/null | tail -1 | cut -d: -f2)
        row "  carp images/s, FMA-only convs" INFO "-" "${fma_ips:-?}"
    fi
else
    row "carp-bench resnet50 step" SKIP "-" "this carp-bench has no --device flag yet"
fi
if [ "${GPU_CHECK_TORCH:-1}" != 0 ] && [ -f "$B/torch_carp_bench.py" ] &&
    python3 -c 'import torch, torchvision' 2>/dev/null; then
    torch_out="${OUT:-/tmp}/torch-bench.jsonl"
    run_step "torch reference (eager fp32, batch $BB)" 240 env LD_LIBRARY_PATH="$ORIG_LD_LIBRARY_PATH" bash -o pipefail -c \
        "python3 '$B/torch_carp_bench.py' --batch $BB --steps 10 --warmup 3 --variants eager32 --out '${OUT:-/tmp}' | tee '$torch_out'" ||
        overall=1
    torch_ips=$(grep -o '"images_per_s": *[0-9.eE+-]*' "$torch_out" 2>/dev/null | tail -1 | sed 's/.*: *//')
    row "  torch images/s" INFO "-" "${torch_ips:-?}"
    if [ -n "$ours_ips" ] && [ -n "$torch_ips" ]; then
        row "  carp / torch" INFO "-" "$(awk -v a="$ours_ips" -v b="$torch_ips" 'BEGIN{printf "%.3f", a/b}')"
    fi
else
    row "torch reference" SKIP "-" "GPU_CHECK_TORCH=0, no torch_carp_bench.py, or no torch"
fi

if [ "${GPU_CHECK_TRAIN:-1}" != 0 ]; then
    # What a user runs: `carp train` on the GPU (tiny model, embedded data, k-NN on the GPU).
    train_dir="${OUT:-/tmp}/gpu-train"
    rm -rf "$train_dir"
    run_step "carp train --device cuda (tiny, ${TRAIN_STEPS:-40} steps)" 240 bash -o pipefail -c \
        "'$B/bin/carp' train --device cuda --steps ${TRAIN_STEPS:-40} --out '$train_dir' --json | tee '${OUT:-/tmp}/train.json'" ||
        overall=1
    row "  train summary" INFO "-" "$(tail -1 "${OUT:-/tmp}/train.json" 2>/dev/null | grep -o '"knn_top1":[0-9.]*\|"knn_top1_random_init":[0-9.]*\|"images_per_s":[0-9.]*' | tr '\n' ' ')"
fi

echo
echo "---- log tail ----"
tail -n 40 "$LOG"
echo
echo "==== gpu-check: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1) ===="
printf '%-44s %-6s %8s  %s\n' step status time note
for r in "${ROWS[@]}"; do echo "$r"; done
[ $overall -eq 0 ] && echo "RESULT: PASS" || echo "RESULT: FAIL"
exit $overall
