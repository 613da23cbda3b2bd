#!/usr/bin/env python3
"""Summarizes an Nsight Compute raw CSV (one row per kernel launch, gpu__time_duration.sum)
made by scripts/gpu-profile.sh: GPU time per kernel name and per kind (cuDNN/cuBLAS library
kernels vs carp's own kernels from kernels/*.cu), largest first.

usage: kernel_summary.py KERNELS.csv [KERNELS_DIR] [--top N]
"""
import argparse
import csv
import glob
import os
import re
import sys


def our_kernels(kdir):
    names = set()
    for f in glob.glob(os.path.join(kdir, "*.cu")):
        names.update(re.findall(r"__global__\s+void\s+(\w+)", open(f).read()))
    return names


def kind(name, ours):
    # With --print-nvtx-rename kernel a name reads "<nvtx range>/<kernel>": classify the kernel.
    kernel = name.split("(")[0].split("/")[-1]
    base = kernel.split("<")[0].strip()
    if base in ours:
        return "carp kernels"
    low = kernel.lower()
    if any(k in low for k in ("dgrad", "wgrad", "fprop", "conv", "implicit", "xmma", "cudnn", "nchw", "nhwc")):
        return "cuDNN"
    if any(k in low for k in ("gemm", "cublas", "splitk", "sm90_", "cutlass")):
        return "cuBLAS/GEMM"
    return "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="ncu --csv --page raw output")
    ap.add_argument("kernels_dir", nargs="?", help="kernels/ (default: next to this script)")
    ap.add_argument("--top", type=int, default=40, help="kernel names to list")
    a = ap.parse_args()
    kdir = a.kernels_dir or os.path.join(os.path.dirname(__file__), "..", "kernels")
    top, path = a.top, a.csv
    ours = our_kernels(kdir)
    rows = list(csv.reader(open(path, newline="")))
    hi = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if hi is None:
        sys.exit(f"{path}: no 'Kernel Name' column (not an ncu --csv --page raw file?)")
    head = rows[hi]
    ki = head.index("Kernel Name")
    ti = next((i for i, h in enumerate(head) if h.startswith("gpu__time_duration")), None)
    if ti is None:
        sys.exit(f"{path}: no gpu__time_duration column; columns: {head}")
    launches = []
    for r in rows[hi + 1:]:
        if len(r) <= max(ki, ti):
            continue
        try:
            t = float(r[ti].replace(",", ""))
        except ValueError:
            continue  # the units row
        launches.append((r[ki], t))
    if not launches:
        sys.exit(f"{path}: no kernel rows")
    unit = rows[hi + 1][ti] if len(rows) > hi + 1 else ""
    scale = 1e-6 if unit in ("ns", "nsecond", "") else 1e-3 if unit in ("us", "usecond") else 1.0
    total = sum(t for _, t in launches) * scale
    print(f"{len(launches)} kernel launches, {total:.2f} ms of GPU time (sum of kernel durations)")
    by_kind, by_name = {}, {}
    for n, t in launches:
        k = kind(n, ours)
        by_kind[k] = by_kind.get(k, 0.0) + t * scale
        short = n.split("(")[0][:90]
        c, s = by_name.get(short, (0, 0.0))
        by_name[short] = (c + 1, s + t * scale)
    print("\nby kind:")
    for k, s in sorted(by_kind.items(), key=lambda x: -x[1]):
        print(f"  {k:<16} {s:9.2f} ms  {100 * s / total:5.1f}%")
    print(f"\ntop {top} kernel names (launches, ms, share):")
    for n, (c, s) in sorted(by_name.items(), key=lambda x: -x[1][1])[:top]:
        print(f"  {c:5d} {s:9.2f} ms {100 * s / total:5.1f}%  [{kind(n, ours)}] {n}")


if __name__ == "__main__":
    main()
