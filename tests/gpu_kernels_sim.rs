//! Runs the CUDA kernel sources on the CPU: tests/gpu_sim/sim_test.cpp includes every
//! kernels/*.cu under a small emulation of the CUDA execution model (tests/gpu_sim/cuda_sim.h:
//! real threads per block, barriers for __syncthreads and warp shuffles) and compares the fused
//! CARP loss and gradient, batch norm, max pool, weight norm, global average pool and LARS with
//! double-precision references. This checks the kernels' logic where no GPU exists (CI); the
//! real-GPU checks are in tests/gpu_ops.rs. Needs g++ with C++20 (<barrier>); without one it
//! prints SKIPPED and returns.

use std::io::Write as _;
use std::path::Path;
use std::process::Command;

#[test]
fn cuda_kernels_on_cpu_emulator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sim = root.join("tests/gpu_sim");
    if !sim.join("sim_test.cpp").is_file() {
        // A test binary copied to another machine (gpu-bundle) without the sources.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: cuda_kernels_on_cpu_emulator: {} not found",
            sim.display()
        );
        return;
    }
    let exe = std::env::temp_dir().join(format!("carp-gpu-sim-{}", std::process::id()));
    let compiled = Command::new("g++")
        .args(["-std=c++20", "-O1", "-w", "-pthread"])
        .arg("-I")
        .arg(&sim)
        .arg("-I")
        .arg(root.join("kernels"))
        .args(["-include", "cuda_sim.h"])
        .arg(sim.join("sim_test.cpp"))
        .arg("-o")
        .arg(&exe)
        .output();
    let out = match compiled {
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: cuda_kernels_on_cpu_emulator: no g++ ({e})"
            );
            return;
        }
        Ok(o) => o,
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("barrier") && stderr.contains("No such file") {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: cuda_kernels_on_cpu_emulator: g++ lacks C++20 <barrier>"
            );
            return;
        }
        panic!("compiling the kernel emulator failed:\n{stderr}");
    }
    let run = Command::new(&exe).output().expect("running the emulator");
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("ALL OK"),
        "kernel emulator reported failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
}
