#!/usr/bin/env bash
# Runs on the GPU machine, from the repo root, with gpu-bundle/ (made by scripts/gpu-bundle.sh)
# present: the GPU tests, compute-sanitizer memcheck over the GPU op tests, and one ResNet50
# training step through carp-bench when it supports one. Prints a short table at the end.
# Fits in 10 minutes: every step has its own timeout.
# Environment: GPU_CHECK_MEMCHECK=0 skips compute-sanitizer (GPU_CHECK_MEMCHECK_TESTS, gpu_ops:
# the test binaries it runs); GPU_CHECK_TORCH=0 skips the PyTorch
# reference; BENCH_BATCH (256) and BENCH_STEPS (3) size the ResNet50 step; BENCH_KEY_VARIANTS and
# BENCH_VARIANTS list the benches before and after PyTorch's (see step 3); GPU_CHECK_BIG_BATCH=0
# skips the batch-1024 fit check; TORCH_VARIANTS (eager32,eager16) picks the PyTorch reference's
# variants; GPU_CHECK_LOADER=0 skips the data-path benches (LOADER_IMAGES, 2048, sizes their
# ImageNet-like set).
# GPU_CHECK_MULTICROP=0 skips the 6-local-crop bench; GPU_CHECK_TRAIN=0 the `carp train` run;
# GPU_CHECK_TESTS=0 the GPU tests; GPU_CHECK_DP=0 the data-parallel launch (step 5);
# GPU_CHECK_BUDGET_S (530) bounds the whole run.
set -uo pipefail
cd "$(dirname "$0")/.."
B=gpu-bundle
. scripts/gpu-unpack.sh
if [ ! -d "$B/tests" ]; then
    echo "no $B/tests: run scripts/gpu-bundle.sh on the build machine first" >&2
    exit 2
fi
mkdir -p "${OUT:-/tmp}"
LOG="${OUT:-/tmp}/gpu-check.log"
: >"$LOG"

# The libraries' folders on the loader path (PyTorch keeps the original: see step 3).
. scripts/gpu-env.sh
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee -a "$LOG"
nvidia-smi -L 2>&1 | tee -a "$LOG"

declare -a ROWS
TABLE="${OUT:-/tmp}/gpu-check-table.txt"
: >"$TABLE"
# Each row also goes to the log, stdout and $OUT/gpu-check-table.txt as it is made, so a run cut
# short still reports what it measured.
row() {
    local r
    r=$(printf '%-44s %-6s %8s  %s' "$1" "$2" "$3" "$4")
    ROWS+=("$r")
    echo "ROW $r"
    echo "$r" >>"$TABLE"
}

# The whole check stays inside GPU_CHECK_BUDGET_S seconds (default 530: the device tool's
# 600-second command limit, less the start-up): a step gets at most the time left, and steps
# that would start with under 20 seconds left are skipped and reported (RESULT: INCOMPLETE).
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-530}
incomplete=0
run_step() { # name timeout_s command...
    local name=$1 t=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - T0)))
    if [ "$left" -lt 20 ]; then
        row "$name" SKIP "-" "out of time (GPU_CHECK_BUDGET_S=$BUDGET)"
        incomplete=1
        return 0
    fi
    [ "$t" -gt "$left" ] && t=$left
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
# Data parallelism on the CUDA backend: gpu_data_parallel (2 thread ranks on GPU 0 against one
# rank: SyncBN, the loss across ranks and the gradient average staged through the host) and
# gpu_nccl (an NCCL group of one rank; needs libnccl: without it that row fails saying so).
for t in "$B"/tests/gpu_*; do
    [ -x "$t" ] || continue
    # GPU_CHECK_TESTS=0: a second call that only benches (the tests ran in the first).
    [ "${GPU_CHECK_TESTS:-1}" = 0 ] && break
    # The kernel emulator is a CPU test (needs the sources and g++), not a GPU check.
    [ "$(basename "$t")" = gpu_kernels_sim ] && continue
    # gpu_lib: the library's unit tests; only their device instances (`*_cuda`, test_device!)
    # need the GPU, the rest ran in CI.
    filter=()
    [ "$(basename "$t")" = gpu_lib ] && filter=(_cuda)
    run_step "test $(basename "$t")" 300 "$t" "${filter[@]}" || overall=1
done
if grep -q "^SKIPPED" "$LOG"; then
    row "GPU tests skipped (no GPU seen)" FAIL "-" "$(grep -m1 '^SKIPPED' "$LOG")"
    overall=1
fi
# 3. ResNet50 training steps (K 65536, NB 512, 224x224): first the two steps the ratios use
# (f32 and bf16 as training runs them, no per-phase waits), then PyTorch's reference, then once
# per A/B switch with that path off (same run, same machine): if the budget runs out, the A/B
# rows are the ones lost. BENCH_KEY_VARIANTS / BENCH_VARIANTS override the two lists (an empty
# value runs none); a token is comma-separated items: "--..." items are carp-bench flags
# (--no-phase-sync: the step without a wait after each phase, as training runs it; the default
# bench waits per phase for its table; --precision=bf16: bf16 activations on the GPU, NHWC
# unless --bf16-layout=nchw; the run options such as --fused-bn=off), the others environment
# settings (NAME=VALUE); "-" alone is the defaults.
BB=${BENCH_BATCH:-256}
BS=${BENCH_STEPS:-3}
KEY_VARIANTS=${BENCH_KEY_VARIANTS-"--no-phase-sync --precision=bf16,--no-phase-sync"}
VARIANTS=${BENCH_VARIANTS-"- --precision=bf16,--bn-stats=two-pass --precision=bf16,--no-phase-sync,--bf16-layout=nchw --precision=bf16,--no-phase-sync,--recompute=none --precision=bf16,--no-phase-sync,--recompute=bn --precision=bf16,--no-phase-sync,--fused-bn=off --nan-guard=sync --cudnn-find=off --tf32=off"}
# images/s of the step as training runs it (no per-phase waits), in f32 and in bf16: the ratios
# against PyTorch's eager fp32 and eager bf16 below; and bf16's live-buffer peak.
ours_ips="" ours_bf16_ips="" ours_bf16_live=""
json_field() { # file field
    grep -o "\"$2\": *[0-9.eE+-]*" "$1" 2>/dev/null | tail -1 | sed 's/.*: *//'
}
has_bench=0
if "$B/bin/carp-bench" --help 2>/dev/null | grep -q -- "--device"; then
    has_bench=1
else
    row "carp-bench resnet50 step" SKIP "-" "this carp-bench has no --device flag yet"
fi
bench_variants() { # space-separated tokens
    [ "$has_bench" = 1 ] || return 0
    local v tag flags out label ips it
    for v in $1; do
        tag=${v//[^A-Za-z0-9_]/_}
        local envs=()
        flags=""
        if [ "$v" != "-" ]; then
            IFS=, read -ra items <<<"$v"
            for it in "${items[@]}"; do
                case "$it" in
                --*) flags="$flags $it" ;;
                *) envs+=("$it") ;;
                esac
            done
        fi
        out="${OUT:-/tmp}/carp-bench-$tag.json"
        label="carp-bench resnet50 b$BB${envs[*]:+ ${envs[*]}}$flags"
        run_step "$label" 240 env "${envs[@]}" bash -o pipefail -c \
            "'$B/bin/carp-bench' --device cuda --arch resnet50 --batch $BB --warmup 1 --steps $BS $flags --json | tee '$out'" ||
            overall=1
        ips=$(json_field "$out" images_per_s)
        row "  images/s, step ms, gpu ms, peak (live; ws) GiB" INFO "-" "${ips:-?}, $(json_field "$out" step_ms), $(json_field "$out" gpu_step_ms), $(json_field "$out" peak_mem_gib) ($(json_field "$out" peak_live_gib); $(json_field "$out" cudnn_workspace_gib))"
        # The ratio against PyTorch uses the step as training runs it (no per-phase waits).
        if [ "$v" = "--no-phase-sync" ] || { [ "$v" = "-" ] && [ -z "$ours_ips" ]; }; then
            ours_ips=$ips
        fi
        if [ "$v" = "--precision=bf16,--no-phase-sync" ] ||
            { [ "$v" = "--precision=bf16" ] && [ -z "$ours_bf16_ips" ]; }; then
            ours_bf16_ips=$ips
            ours_bf16_live=$(json_field "$out" peak_live_gib)
        fi
    done
}
bench_variants "$KEY_VARIANTS"
if [ "${GPU_CHECK_TORCH:-1}" != 0 ] && [ -f "$B/torch_carp_bench.py" ] &&
    python3 -c 'import torch, torchvision' 2>/dev/null; then
    torch_out="${OUT:-/tmp}/torch-bench.jsonl"
    run_step "torch reference (batch $BB)" 300 env LD_LIBRARY_PATH="$ORIG_LD_LIBRARY_PATH" bash -o pipefail -c \
        "python3 '$B/torch_carp_bench.py' --batch $BB --steps 10 --warmup 3 --variants ${TORCH_VARIANTS:-eager32,eager16} --out '${OUT:-/tmp}' | tee '$torch_out'" ||
        overall=1
    # One JSON line per variant: the ratio against each (eager32 is PyTorch's fp32, eager16 its
    # bf16 channels_last, the issue's 1,465 images/s row).
    while IFS= read -r line; do
        tv=$(echo "$line" | grep -o '"variant": *"[a-z0-9]*"' | sed 's/.*: *"//; s/"//')
        tips=$(echo "$line" | grep -o '"images_per_s": *[0-9.eE+-]*' | sed 's/.*: *//')
        [ -z "$tv" ] || [ -z "$tips" ] && continue
        tmem=$(echo "$line" | grep -o '"peak_mem_gib": *[0-9.eE+-]*' | sed 's/.*: *//')
        row "  torch $tv images/s (peak GiB)" INFO "-" "$tips ($tmem)"
        if [ -n "$ours_ips" ]; then
            row "  carp f32 / torch $tv" INFO "-" "$(awk -v a="$ours_ips" -v b="$tips" 'BEGIN{printf "%.3f", a/b}')"
        fi
        if [ -n "$ours_bf16_ips" ]; then
            row "  carp bf16 / torch $tv" INFO "-" "$(awk -v a="$ours_bf16_ips" -v b="$tips" 'BEGIN{printf "%.3f", a/b}')"
        fi
        # Memory, like for like: carp's live-buffer peak against torch's max_memory_allocated.
        if [ -n "$ours_bf16_live" ] && [ -n "$tmem" ]; then
            row "  carp bf16 live GiB / torch $tv GiB" INFO "-" "$ours_bf16_live / $tmem"
        fi
    done <"$torch_out"
else
    row "torch reference" SKIP "-" "GPU_CHECK_TORCH=0, no torch_carp_bench.py, or no torch"
fi

bench_variants "$VARIANTS"

# 3b. memcheck over the op tests, without the large ResNet50 conv shapes (slow under the tool).
if [ "${GPU_CHECK_MEMCHECK:-1}" = 0 ]; then
    row "memcheck gpu_ops" SKIP "-" "GPU_CHECK_MEMCHECK=0"
elif command -v compute-sanitizer >/dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
    CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    for mt in ${GPU_CHECK_MEMCHECK_TESTS:-gpu_ops}; do
        run_step "memcheck $mt" 200 "$CS" --tool memcheck --error-exitcode 1 \
            "$B/tests/$mt" --test-threads=1 --skip conv2d_resnet50_shapes || overall=1
    done
else
    row "memcheck gpu_ops" SKIP "-" "compute-sanitizer not found"
fi
# 3c. Multi-crop and the batch-1024 fit check (after PyTorch: the ratios come first).
if "$B/bin/carp-bench" --help 2>/dev/null | grep -q -- "--device"; then
    if [ "${GPU_CHECK_MULTICROP:-1}" != 0 ]; then
        # SPEC's optional multi-crop: 6 local 96x96 views per image through the student.
        mc="${OUT:-/tmp}/carp-bench-multicrop.json"
        run_step "carp-bench resnet50 b$BB --local-crops 6" 240 bash -o pipefail -c \
            "'$B/bin/carp-bench' --device cuda --arch resnet50 --batch $BB --local-crops 6 --warmup 1 --steps $BS --json | tee '$mc'" ||
            overall=1
        row "  images/s, step ms, peak GiB" INFO "-" "$(json_field "$mc" images_per_s), $(json_field "$mc" step_ms), $(json_field "$mc" peak_mem_gib)"
    fi
    if [ "${GPU_CHECK_BIG_BATCH:-1}" != 0 ]; then
        # Issue 7: the paper's whole global batch (1024) fits on one H200 (bf16, with the
        # default recomputation: ~4 x the ~13 GiB predicted for batch 256).
        big="${OUT:-/tmp}/carp-bench-b1024.json"
        run_step "carp-bench resnet50 b1024 bf16 (fits?)" 300 bash -o pipefail -c \
            "'$B/bin/carp-bench' --device cuda --arch resnet50 --batch 1024 --precision bf16 --no-phase-sync --warmup 1 --steps 1 --json | tee '$big'"
        # A target, not a correctness check: not fitting is reported, not a failure.
        row "  images/s, peak GiB" INFO "-" "$(json_field "$big" images_per_s), $(json_field "$big" peak_mem_gib)"
    fi
fi

# 4. The data path on this machine's cores: an ImageNet-like packed JPEG set (natural photos at
# ImageNet's sizes and bytes per pixel), the loader alone, then end to end (loader feeding the
# ResNet50 step, views finished on the GPU; --view-finish=cpu for the CPU finish).
if [ "${GPU_CHECK_LOADER:-1}" != 0 ]; then
    ldir="${OUT:-/tmp}/imagenet-like"
    rm -rf "$ldir"
    lout="${OUT:-/tmp}/loader.json"
    run_step "carp-bench --loader (ImageNet-like, all cores)" 240 bash -o pipefail -c \
        "'$B/bin/carp-bench' --loader '$ldir' --make-imagenet-like ${LOADER_IMAGES:-2048} --batch 256 --steps 12 --json | tee '$lout'" ||
        overall=1
    lcrops=$(json_field "$lout" crop_images_per_s)
    lfull=$(json_field "$lout" images_per_s)
    lw=$(json_field "$lout" workers)
    lpc=$(json_field "$lout" per_core_crops)
    lpf=$(json_field "$lout" per_core_full)
    row "  two-view images/s: crops only, + CPU finish" INFO "-" "$lcrops, $lfull ($lw workers)"
    # Issue 19: one thread's rate (per_core_*, from the per-stage run) against all workers
    # together says whether the loader scales with cores (1.0: perfectly) or loses to
    # allocation, page faults or memory bandwidth at this many threads.
    row "  per core, one thread: crops only, + CPU finish" INFO "-" "$lpc, $lpf"
    row "  scaling: all workers / (workers x one thread)" INFO "-" "$(awk -v a="$lcrops" -v b="$lfull" -v w="$lw" -v c="$lpc" -v f="$lpf" 'BEGIN { if (w > 0 && c > 0 && f > 0) printf "crops only %.2f, + CPU finish %.2f", a / (w * c), b / (w * f); else print "-" }')"
    if [ -d "$ldir/packed" ]; then
        for v in - --view-finish=cpu; do
            vflag=""
            [ "$v" != "-" ] && vflag=" $v"
            eout="${OUT:-/tmp}/end-to-end-${v//[^A-Za-z0-9_]/_}.json"
            run_step "carp-bench --data (end to end)$vflag" 240 bash -o pipefail -c \
                "'$B/bin/carp-bench' --device cuda --data '$ldir/packed' --batch $BB --warmup 1 --steps $BS$vflag --json | tee '$eout'" ||
                overall=1
            row "  images/s end to end" INFO "-" "$(json_field "$eout" images_per_s)"
        done
    fi
    rm -rf "$ldir"
fi

if [ "${GPU_CHECK_TRAIN:-1}" != 0 ]; then
    # What a user runs: `carp train` on the GPU (tiny model, embedded data, k-NN on the GPU), in
    # f32 and in bf16 (its k-NN gain is the end-to-end check of the bf16 GPU path).
    for prec in f32 bf16; do
        train_dir="${OUT:-/tmp}/gpu-train-$prec"
        rm -rf "$train_dir"
        run_step "carp train --device cuda --precision $prec (tiny, ${TRAIN_STEPS:-40} steps)" 240 bash -o pipefail -c \
            "'$B/bin/carp' train --device cuda --precision $prec --steps ${TRAIN_STEPS:-40} --out '$train_dir' --json | tee '${OUT:-/tmp}/train-$prec.json'" ||
            overall=1
        row "  train summary ($prec)" INFO "-" "$(tail -1 "${OUT:-/tmp}/train-$prec.json" 2>/dev/null | grep -o '"knn_top1":[0-9.]*\|"knn_top1_random_init":[0-9.]*\|"images_per_s":[0-9.]*' | tr '\n' ' ')"
    done
fi

if [ "${GPU_CHECK_DP:-1}" != 0 ]; then
    # 5. Data parallel from the launcher (issue 35): with two GPUs or more, 2 ranks over NCCL
    # against one rank at the same global batch (the final losses must agree); with one GPU,
    # the launcher must refuse a second rank with the GPU count (NCCL needs a GPU per rank).
    gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
    dp="${OUT:-/tmp}/gpu-dp"
    rm -rf "$dp"
    dp_args="train --device cuda --steps 10 --batch 128 --no-eval --json"
    if [ "$gpus" -ge 2 ]; then
        run_step "carp train --nproc-per-node 2 (NCCL)" 240 bash -o pipefail -c \
            "'$B/bin/carp' $dp_args --out '$dp/one' | tail -1 > '$dp-one.json' && '$B/bin/carp' $dp_args --nproc-per-node 2 --out '$dp/two' | tail -1 > '$dp-two.json'" ||
            overall=1
        l1=$(json_field "$dp-one.json" loss)
        l2=$(json_field "$dp-two.json" loss)
        if python3 -c "import sys; a,b=float('$l1'),float('$l2'); sys.exit(0 if abs(a-b) <= 1e-3*max(1,abs(a)) else 1)" 2>/dev/null; then
            row "  2 ranks vs 1: final loss" PASS "-" "$l2 vs $l1"
        else
            row "  2 ranks vs 1: final loss" FAIL "-" "$l2 vs $l1"
            overall=1
        fi
    else
        run_step "carp train --nproc-per-node 2 refused on 1 GPU" 60 bash -c \
            "! '$B/bin/carp' $dp_args --nproc-per-node 2 --out '$dp/two' 2> '$dp-err.txt'; grep -q 'GPU(s)' '$dp-err.txt'" ||
            overall=1
        row "  (one GPU: the 2-rank NCCL run needs a second)" INFO "-" "$(head -c 120 "$dp-err.txt" 2>/dev/null)"
    fi
fi

echo
echo "---- log tail ----"
tail -n 40 "$LOG"
echo
echo "==== gpu-check: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1) ===="
printf '%-44s %-6s %8s  %s\n' step status time note
for r in "${ROWS[@]}"; do echo "$r"; done
if [ $overall -ne 0 ]; then
    echo "RESULT: FAIL"
elif [ $incomplete -ne 0 ]; then
    echo "RESULT: INCOMPLETE (steps skipped for time: rerun them with the GPU_CHECK_* switches)"
else
    echo "RESULT: PASS"
fi
exit $overall
