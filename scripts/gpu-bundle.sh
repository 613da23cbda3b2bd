#!/usr/bin/env bash
# Builds the CUDA build here (no GPU needed) and gathers what the GPU machine (which has no Rust
# toolchain) needs into gpu-bundle/ (git-ignored):
#   gpu-bundle/tests/<name>   the GPU test binaries built with --features cuda (gpu_ops, gpu_tape, ...;
#                             gpu_lib: the library's unit tests, whose `_cuda` device instances run there;
#                             ~26 MB stripped, GPU_BUNDLE_LIB=0 leaves it out when the bundle is too large)
#   gpu-bundle/bin/carp, gpu-bundle/bin/carp-bench
#   gpu-bundle/torch_carp_bench.py (when /work/shared has it), gpu-bundle/MANIFEST
# tests/ and bin/ travel packed as gpu-bundle/bins.tar.xz (~40 MiB for ~110 MiB of binaries:
# the device tool carries at most 64 MiB); gpu-check.sh unpacks it there.
# Then, on the GPU machine, from the repo root: scripts/gpu-check.sh
# (with the device tool: carry ["gpu-bundle"], command "bash scripts/gpu-check.sh").
set -euo pipefail
cd "$(dirname "$0")/.."

# The pinned CUDA 13.0 nvcc from PyPI, unless NVCC already names one.
if [ -z "${NVCC:-}" ]; then
    NVCC_DIR="${CARP_NVCC_DIR:-$HOME/.cache/carp-nvcc}"
    [ -x /work/nvcc13/nvidia/cu13/bin/nvcc ] && NVCC_DIR=/work/nvcc13
    if [ ! -x "$NVCC_DIR/nvidia/cu13/bin/nvcc" ]; then
        python3 -m pip install --quiet --disable-pip-version-check --target "$NVCC_DIR" \
            "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
            "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85"
    fi
    export NVCC="$NVCC_DIR/nvidia/cu13/bin/nvcc"
fi

OUTDIR=gpu-bundle
rm -rf "$OUTDIR"
mkdir -p "$OUTDIR/tests" "$OUTDIR/bin"

cargo build --release --features cuda --bins
# Test binaries: cargo prints one JSON "compiler-artifact" line per target with its executable.
cargo test --release --features cuda --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys, shutil, os
out = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") != "compiler-artifact" or not exe or not m.get("profile", {}).get("test"):
        continue
    name = m["target"]["name"]
    # The unit tests of the library travel as gpu_lib: their device instances (test_device!, the
    # `*_cuda` tests) run there.
    if name == "carp" and "lib" in m["target"].get("kind", []):
        if os.environ.get("GPU_BUNDLE_LIB", "1") == "0":
            continue
        name = "gpu_lib"
    # Only the GPU test files travel (the device tool carries at most 64 MiB): the rest of the
    # suite is CPU-only and runs in CI; the kernel emulator needs the sources and g++.
    if not name.startswith("gpu_") or name == "gpu_kernels_sim":
        continue
    dst = os.path.join(out, "tests", name)
    shutil.copy2(exe, dst)
    print("test binary:", name)
' "$OUTDIR"

TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cp "$TARGET_DIR/release/carp" "$TARGET_DIR/release/carp-bench" "$OUTDIR/bin/"
for ref in ../shared/torch_carp_bench.py /work/shared/torch_carp_bench.py; do
    if [ -f "$ref" ]; then
        cp "$ref" "$OUTDIR/"
        break
    fi
done
# Host debug info is not needed there (kernels carry -lineinfo for compute-sanitizer), and the
# device tool carries at most 64 MiB.
if command -v strip >/dev/null; then
    strip --strip-debug "$OUTDIR"/tests/* "$OUTDIR"/bin/* 2>/dev/null || true
fi
{
    echo "built: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "nvcc: $("$NVCC" --version | tail -1)"
    (cd "$OUTDIR" && find . -type f | sort)
} >"$OUTDIR/MANIFEST"
unpacked=$(du -sm "$OUTDIR" | cut -f1)
tar -cf - -C "$OUTDIR" tests bin | xz -T0 -6 >"$OUTDIR/bins.tar.xz"
rm -rf "$OUTDIR/tests" "$OUTDIR/bin"
size=$(du -sm "$OUTDIR" | cut -f1)
echo "gpu-bundle/: ${size} MiB (binaries packed in bins.tar.xz; ${unpacked} MiB unpacked)"
if [ "$size" -gt 60 ]; then
    echo "warning: over 60 MiB; the device tool carries at most 64 MiB" >&2
fi
