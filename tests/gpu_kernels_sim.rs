//! Runs the CUDA kernel sources on the CPU: tests/gpu_sim/sim_test.cpp includes every
//! kernels/*.cu under a small emulation of the CUDA execution model (tests/gpu_sim/cuda_sim.h:
//! real threads per block, barriers for __syncthreads and warp shuffles) and compares the fused
//! CARP loss and gradient, batch norm, max pool, weight norm, global average pool and LARS with
//! double-precision references, the bf16-storage instantiations of the memory-bound kernels
//! against the f32 ones (bit for bit after rounding) and against the Rust `round_bf16` (the CPU
//! emulation of bf16), and the channels-last (NHWC) kernels and layout conversions against their
//! NCHW twins on the transposed data (bit for bit where the arithmetic is the same, 1e-6
//! relative where only the summation order differs) and f64, and synchronized batch norm across
//! ranks as the CUDA backend stages it (the shifted-sum kernels, the host all-reduces emulated)
//! against f64 batch norm of the global batch. This checks the kernels' logic
//! where no GPU exists (CI); the real-GPU checks are in tests/gpu_ops.rs. Needs g++ with C++20
//! (<barrier>); without one it prints SKIPPED and returns.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use carp::data::augment::{finish, AugNorm, ColorParams, ViewConfig};
use carp::tensor::round_bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Compiles the emulator to a temporary executable named by `tag`; None (after printing
/// SKIPPED) where that cannot work here.
fn compile_emulator(tag: &str) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sim = root.join("tests/gpu_sim");
    if !sim.join("sim_test.cpp").is_file() {
        // A test binary copied to another machine (gpu-bundle) without the sources.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {tag}: {} not found",
            sim.display()
        );
        return None;
    }
    let exe = std::env::temp_dir().join(format!("carp-gpu-sim-{tag}-{}", std::process::id()));
    let compiled = Command::new("g++")
        // No strict aliasing: the kernels reinterpret buffers (float4, and uint2 over bf16) as
        // CUDA allows; g++ must not reorder those accesses.
        .args([
            "-std=c++20",
            "-O1",
            "-w",
            "-pthread",
            "-fno-strict-aliasing",
        ])
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
            let _ = writeln!(std::io::stderr(), "SKIPPED: {tag}: no g++ ({e})");
            return None;
        }
        Ok(o) => o,
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("barrier") && stderr.contains("No such file") {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: {tag}: g++ lacks C++20 <barrier>"
            );
            return None;
        }
        panic!("compiling the kernel emulator failed:\n{stderr}");
    }
    Some(exe)
}

#[test]
fn cuda_kernels_on_cpu_emulator() {
    let Some(exe) = compile_emulator("kernels") else {
        return;
    };
    let run = Command::new(&exe).output().expect("running the emulator");
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("ALL OK"),
        "kernel emulator reported failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// Crops with the pixels that reach the colour code's special cases: random bytes, plus grey
/// pixels (r = g = b: the HSV hue is undefined, `eqc`), pixels with two equal maximal channels
/// (the hue's branch ties), saturated 0 / 255 values and exactly the solarize threshold (128).
fn aug_crops(rng: &mut impl Rng, b: usize, s: usize) -> Vec<u8> {
    let mut c: Vec<u8> = (0..b * s * s * 3).map(|_| rng.gen()).collect();
    for px in c.chunks_exact_mut(3) {
        match rng.gen_range(0..8) {
            0 => {
                let v = rng.gen();
                px.fill(v);
            }
            1 => {
                let m = rng.gen_range(1..=255u8);
                let k = rng.gen_range(0..3);
                px[k] = m;
                px[(k + 1) % 3] = m;
                px[(k + 2) % 3] = rng.gen_range(0..m);
            }
            2 => px[rng.gen_range(0..3)] = if rng.gen() { 0 } else { 255 },
            3 => px[rng.gen_range(0..3)] = 128,
            _ => {}
        }
    }
    c
}

/// Parameters covering every branch of the CPU finish, cycled over the batch so each case
/// sees them all: jitter off and on with contrast at every position of the order (contrast
/// ends a kernel pass) and an order that is not a permutation (two contrasts), grayscale,
/// blur off and with small to large sigmas (a radius beyond the side exercises the clamped
/// edges on small crops), solarize with and without blur, flipped or not (the crop is already
/// mirrored: the finish must not flip again). Factors beyond the sampler's ranges.
fn aug_params(rng: &mut impl Rng, b: usize) -> Vec<ColorParams> {
    const ORDERS: [[u8; 4]; 6] = [
        [1, 0, 2, 3],
        [0, 1, 3, 2],
        [3, 2, 1, 0],
        [2, 3, 0, 1],
        [1, 3, 1, 0],
        [0, 2, 3, 1],
    ];
    const SIGMAS: [f32; 5] = [0.0, 0.1, 0.6, 1.3, 3.4];
    (0..b)
        .map(|i| ColorParams {
            brightness: rng.gen_range(0.4..1.6),
            contrast: rng.gen_range(0.4..1.6),
            saturation: rng.gen_range(0.3..1.7),
            hue: rng.gen_range(-0.5..0.5),
            blur_sigma: SIGMAS[i % 5] * rng.gen_range(0.9..1.1),
            order: ORDERS[(i / 2) % 6],
            jitter: (i % 7 != 6 && i % 10 != 5) as u8,
            grayscale: (i % 3 == 1) as u8,
            solarize: (i % 2 == 1) as u8,
            flipped: rng.gen::<bool>() as u8,
        })
        .collect()
}

/// kernels/augment.cu on the emulator against the CPU `finish` (the specification), on random
/// crops and parameters, for odd and even sides, a 1x1 side and block sizes below and above
/// the side. Tolerance: 2e-5 absolute on the normalized values (1 / std <= 4.5, so ~4e-6 on
/// the [0, 1] scale): the paths differ only in float rounding (the f32 contrast mean vs the
/// CPU's f64 one, `expf` in the blur weights, the summation order of the reductions), a few
/// ulps per operation. The hue rotation is continuous in RGB (sector boundaries and the 0/1
/// wrap included; near-grey pixels, where the hue itself is ill-conditioned, have saturation
/// ~0 so it hardly moves them), so it needs no extra tolerance. The one discontinuity is
/// solarize: a value within 1e-5 of the threshold after jitter or blur may land on either side
/// on either path, so such elements are skipped (and counted); in images with neither jitter
/// nor blur the paths compute the same bits and nothing is skipped.
#[test]
fn augment_kernels_on_cpu_emulator() {
    let Some(exe) = compile_emulator("augment") else {
        return;
    };
    let cfg = ViewConfig::imagenet(224);
    let norm = AugNorm::new(&cfg);
    let thr = cfg.solarize_threshold / 255.0;
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let dir = tempfile::tempdir().expect("temp dir");
    for (case, &(b, s, threads)) in [
        (14usize, 13usize, 64i32),
        (7, 8, 32),
        (3, 1, 32),
        (5, 33, 96),
    ]
    .iter()
    .enumerate()
    {
        let crops = aug_crops(&mut rng, b, s);
        let params = aug_params(&mut rng, b);
        let (inp, outp) = (
            dir.path().join(format!("in{case}")),
            dir.path().join(format!("out{case}")),
        );
        let mut bytes = Vec::new();
        for v in [b as i32, s as i32, threads] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(bytemuck::bytes_of(&norm));
        bytes.extend_from_slice(&crops);
        bytes.extend_from_slice(bytemuck::cast_slice(&params));
        std::fs::write(&inp, &bytes).expect("writing the emulator input");
        let run = Command::new(&exe)
            .arg("augment")
            .arg(&inp)
            .arg(&outp)
            .output()
            .expect("running the emulator");
        assert!(
            run.status.success(),
            "emulator failed:\n{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        let raw = std::fs::read(&outp).expect("reading the emulator output");
        let got: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let per = 3 * s * s;
        assert_eq!(got.len(), b * per);
        let (mut worst, mut at, mut skipped) = (0f32, 0usize, 0usize);
        for i in 0..b {
            let (crop, p) = (&crops[i * s * s * 3..(i + 1) * s * s * 3], &params[i]);
            let mut want = vec![0f32; per];
            finish(
                crop,
                p,
                s,
                &cfg.mean,
                &cfg.std,
                cfg.solarize_threshold,
                &mut want,
            );
            // The values before solarize, to find the ambiguous ones.
            let mut pre = vec![0f32; per];
            let unsolarized = ColorParams { solarize: 0, ..*p };
            finish(crop, &unsolarized, s, &[0.0; 3], &[1.0; 3], 0.0, &mut pre);
            let exact = p.jitter == 0 && p.blur_sigma <= 0.0;
            for k in 0..per {
                if p.solarize != 0 && !exact && (pre[k] - thr).abs() < 1e-5 {
                    skipped += 1;
                    continue;
                }
                let g = got[i * per + k];
                assert!(g.is_finite(), "case {case}: image {i} element {k} = {g}");
                let d = (g - want[k]).abs();
                if d > worst {
                    (worst, at) = (d, i * per + k);
                }
            }
        }
        eprintln!(
            "augment B={b} S={s} threads={threads}: max |gpu - cpu| {worst:.2e} at {at}, \
             {skipped} ambiguous solarize element(s) skipped"
        );
        assert!(
            worst <= 2e-5,
            "case {case} (B={b} S={s}): kernels differ from the CPU finish by {worst} at {at}"
        );
    }
    let _ = std::fs::remove_file(&exe);
}

/// The GPU's f32 -> bf16 rounding (kernels/common.cuh `f32_to_bf16`, through the
/// `cast_f32_bf16` and `cast_bf16_f32` kernels on the emulator) equals the CPU emulation's
/// `round_bf16` bit for bit, so bf16 tensors on the GPU hold what `--precision bf16` computes on
/// the CPU. Inputs: special values (zeros, ties to even both ways, the overflow threshold,
/// subnormals, infinities, NaNs with payloads of both signs, signalling ones), every exponent
/// with tie / near-tie mantissas, and random bit patterns.
#[test]
fn bf16_rounding_matches_rust() {
    let Some(exe) = compile_emulator("bf16round") else {
        return;
    };
    let mut bits: Vec<u32> = vec![
        0x0000_0000,
        0x8000_0000,
        0x0000_0001,
        0x8000_0001,
        0x0000_8000,
        0x0001_8000,
        0x0000_8001,
        0x007f_ffff,
        0x0080_0000,
        0x3f80_0000,
        0x3f80_8000,
        0x3f81_8000,
        0x3f80_8001,
        0x3f80_7fff,
        0xbf80_8000,
        0xbf81_8000,
        0x7f7f_ffff,
        0x7f7f_7fff,
        0x7f7f_8000,
        0xff7f_ffff,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0xffc0_0000,
        0x7f80_0001,
        0xff80_0001,
        0x7fa1_2345,
        0xffff_ffff,
        0x7fbf_ffff,
    ];
    for e in 0..=255u32 {
        for m in [
            0x0000u32, 0x7fff, 0x8000, 0x8001, 0x1_8000, 0x7f_8000, 0x7f_ffff,
        ] {
            for sign in [0u32, 0x8000_0000] {
                bits.push(sign | (e << 23) | m);
            }
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    bits.extend((0..4000).map(|_| rng.gen::<u32>()));
    let dir = tempfile::tempdir().expect("temp dir");
    let (inp, outp) = (dir.path().join("in"), dir.path().join("out"));
    let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    std::fs::write(&inp, bytes).expect("writing the emulator input");
    let run = Command::new(&exe)
        .arg("bf16round")
        .arg(&inp)
        .arg(&outp)
        .output()
        .expect("running the emulator");
    let _ = std::fs::remove_file(&exe);
    assert!(
        run.status.success(),
        "emulator failed:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let raw = std::fs::read(&outp).expect("reading the emulator output");
    let n = bits.len();
    assert_eq!(raw.len(), 6 * n, "expected {n} u16 then {n} u32");
    let (half, wide) = raw.split_at(2 * n);
    for (i, &b) in bits.iter().enumerate() {
        let want = round_bf16(f32::from_bits(b)).to_bits();
        let got16 = u16::from_le_bytes([half[2 * i], half[2 * i + 1]]) as u32;
        let w = &wide[4 * i..4 * i + 4];
        let got32 = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        assert_eq!(
            want & 0xffff,
            0,
            "round_bf16({b:#010x}) = {want:#010x} has a lower half"
        );
        assert_eq!(
            got16 << 16,
            want,
            "cast_f32_bf16({b:#010x}) = {got16:#06x}, round_bf16 gives {want:#010x}"
        );
        assert_eq!(
            got32, want,
            "cast_bf16_f32(cast_f32_bf16({b:#010x})) = {got32:#010x}, round_bf16 gives {want:#010x}"
        );
    }
    eprintln!("bf16 rounding: {n} patterns, the kernels equal round_bf16 bit for bit");
}
