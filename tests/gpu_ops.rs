//! Every CUDA kernel/launcher against a direct f64 reference written here (independent of the
//! CPU ops, which land separately), on fresh random inputs with odd sizes; every output buffer
//! is poisoned with NaN first, so an element the GPU does not write fails the comparison.
//!
//! Without a GPU (or driver) each test prints "SKIPPED: <reason>" to the real stderr (visible
//! in `cargo test` output even for passing tests) and returns.
#![cfg(feature = "cuda")]

use std::io::Write as _;
use std::sync::OnceLock;

use carp::device::cuda::{ConvShape, CudaBackend, DeviceBuffer, Pool2dShape};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

static BACKEND: OnceLock<Result<CudaBackend, String>> = OnceLock::new();

/// The shared GPU backend, or None after printing why the test is skipped (no CUDA driver or
/// no device; a backend that fails to open on a GPU fails the test).
fn gpu_or_skip(test: &str) -> Option<&'static CudaBackend> {
    let be = BACKEND.get_or_init(|| CudaBackend::new(0).map_err(|e| e.to_string()));
    let be = carp::testutil::gpu_or_skip(test, || be.as_ref())?;
    // f64 references at f32 tolerances: no TF32 in the convolutions.
    carp::options::update(|o| o.tf32 = carp::options::Switch::Off);
    Some(be)
}

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            // Box-Muller: standard normal without extra crates.
            let u1: f64 = r.gen_range(1e-12..1.0);
            let u2: f64 = r.gen();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Fails on any non-finite GPU value, or when max |got - want| / max(|want|_inf, 1e-6) > tol.
fn check_close(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{name}: element {i} is {} (unwritten or overflow)", got[i]);
    }
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w).abs();
        if d > worst {
            worst = d;
            at = i;
        }
    }
    let rel = worst / scale;
    assert!(
        rel <= tol,
        "{name}: relative error {rel:.3e} > {tol:.1e} (element {at}: gpu {} vs ref {})",
        got[at],
        want[at]
    );
}

/// A NaN-filled device buffer of n f32.
fn poisoned(be: &CudaBackend, n: usize) -> DeviceBuffer {
    let mut b = be.alloc_f32(n).unwrap();
    be.fill(&mut b, f32::NAN).unwrap();
    b
}

fn up(be: &CudaBackend, v: &[f32]) -> DeviceBuffer {
    be.upload_f32(v).unwrap()
}

fn down(be: &CudaBackend, b: &DeviceBuffer) -> Vec<f32> {
    be.download_f32(b).unwrap()
}

#[test]
fn backend_new_reports_instead_of_panicking() {
    // Runs everywhere: on a machine without a driver this must be an error, not a panic.
    match CudaBackend::new(0) {
        Ok(be) => {
            let _ = writeln!(std::io::stderr(), "GPU: {}", be.name());
            assert!(carp::device::available().contains(&"cuda"));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("device error"), "{msg}");
            assert!(!carp::device::available().contains(&"cuda"));
        }
    }
    // An ordinal beyond the device count is an error either way.
    assert!(CudaBackend::new(1 << 20).is_err());
}

#[test]
fn elementwise_ops() {
    let Some(be) = gpu_or_skip("elementwise_ops") else {
        return;
    };
    for &n in &[1usize, 1000, 100_003] {
        let a = randn(n, 1 + n as u64);
        let b = randn(n, 2 + n as u64);
        let (da, db) = (up(be, &a), up(be, &b));
        let (a6, b6) = (f64s(&a), f64s(&b));

        let mut y = poisoned(be, n);
        be.add(&da, &db, &mut y).unwrap();
        let want: Vec<f64> = a6.iter().zip(&b6).map(|(x, y)| x + y).collect();
        check_close("add", &down(be, &y), &want, 1e-6);

        let mut y = poisoned(be, n);
        be.relu_forward(&da, &mut y).unwrap();
        check_close(
            "relu",
            &down(be, &y),
            &a6.iter().map(|x| x.max(0.0)).collect::<Vec<_>>(),
            0.0,
        );

        let mut dx = poisoned(be, n);
        be.relu_backward(&da, &db, &mut dx).unwrap();
        let want: Vec<f64> = a6
            .iter()
            .zip(&b6)
            .map(|(x, g)| if *x > 0.0 { *g } else { 0.0 })
            .collect();
        check_close("relu_backward", &down(be, &dx), &want, 0.0);

        let mut y = poisoned(be, n);
        be.gelu_forward(&da, &mut y).unwrap();
        let want: Vec<f64> = a6
            .iter()
            .map(|&x| 0.5 * x * (1.0 + libm::erf(x / 2f64.sqrt())))
            .collect();
        check_close("gelu", &down(be, &y), &want, 1e-6);

        let mut dx = poisoned(be, n);
        be.gelu_backward(&da, &db, &mut dx).unwrap();
        let want: Vec<f64> = a6
            .iter()
            .zip(&b6)
            .map(|(&x, &g)| {
                let cdf = 0.5 * (1.0 + libm::erf(x / 2f64.sqrt()));
                let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                g * (cdf + x * pdf)
            })
            .collect();
        check_close("gelu_backward", &down(be, &dx), &want, 1e-6);

        let mut y = up(be, &a);
        be.accumulate(&mut y, &db).unwrap();
        let want: Vec<f64> = a6.iter().zip(&b6).map(|(x, y)| x + y).collect();
        check_close("accumulate", &down(be, &y), &want, 1e-6);

        let mut y = poisoned(be, n);
        be.scale(&da, -0.37, &mut y).unwrap();
        check_close(
            "scale",
            &down(be, &y),
            &a6.iter().map(|x| -0.37 * x).collect::<Vec<_>>(),
            1e-6,
        );
    }
    // Bias add and column sums (linear layers), and the one-block sum.
    let (rows, cols) = (37, 61);
    let y0 = randn(rows * cols, 5);
    let b = randn(cols, 6);
    let mut y = up(be, &y0);
    be.bias_add(&mut y, &up(be, &b), rows, cols).unwrap();
    let want: Vec<f64> = (0..rows * cols)
        .map(|i| y0[i] as f64 + b[i % cols] as f64)
        .collect();
    check_close("bias_add", &down(be, &y), &want, 1e-6);
    let mut cs = poisoned(be, cols);
    be.col_sum(&up(be, &y0), rows, cols, &mut cs).unwrap();
    let want: Vec<f64> = (0..cols)
        .map(|c| (0..rows).map(|r| y0[r * cols + c] as f64).sum())
        .collect();
    check_close("col_sum", &down(be, &cs), &want, 1e-5);
    let mut s = poisoned(be, 1);
    be.sum(&up(be, &y0), rows * cols, &mut s).unwrap();
    check_close(
        "sum",
        &down(be, &s),
        &[y0.iter().map(|&v| v as f64).sum()],
        1e-5,
    );
}

fn matmul_ref(a: &[f32], b: &[f32], ta: bool, tb: bool, m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for l in 0..k {
                let av = if ta { a[l * m + i] } else { a[i * k + l] };
                let bv = if tb { b[j * k + l] } else { b[l * n + j] };
                acc += av as f64 * bv as f64;
            }
            c[i * n + j] = acc;
        }
    }
    c
}

#[test]
fn gemm_row_major_all_transposes() {
    let Some(be) = gpu_or_skip("gemm_row_major_all_transposes") else {
        return;
    };
    let (m, n, k) = (37, 53, 29);
    for (seed, &(ta, tb)) in [(false, false), (true, false), (false, true), (true, true)]
        .iter()
        .enumerate()
    {
        let a = randn(m * k, 10 + seed as u64);
        let b = randn(k * n, 20 + seed as u64);
        let want = matmul_ref(&a, &b, ta, tb, m, n, k);
        let mut c = poisoned(be, m * n);
        be.gemm(ta, tb, m, n, k, 1.0, &up(be, &a), &up(be, &b), 0.0, &mut c)
            .unwrap();
        check_close(&format!("gemm ta={ta} tb={tb}"), &down(be, &c), &want, 1e-5);
        // beta = 1 accumulates: c = 0.5 * ab + c.
        be.gemm(ta, tb, m, n, k, 0.5, &up(be, &a), &up(be, &b), 1.0, &mut c)
            .unwrap();
        let want2: Vec<f64> = want.iter().map(|v| 1.5 * v).collect();
        check_close(
            &format!("gemm accumulate ta={ta} tb={tb}"),
            &down(be, &c),
            &want2,
            1e-5,
        );
    }
    // Prototype-sized logits: (n, 256) x (k, 256)^T.
    let (m, n, k) = (64, 4096, 256);
    let a = randn(m * k, 30);
    let b = randn(n * k, 31);
    let mut c = poisoned(be, m * n);
    be.gemm(
        false,
        true,
        m,
        n,
        k,
        1.0,
        &up(be, &a),
        &up(be, &b),
        0.0,
        &mut c,
    )
    .unwrap();
    check_close(
        "gemm logits",
        &down(be, &c),
        &matmul_ref(&a, &b, false, true, m, n, k),
        1e-5,
    );
}

fn conv_ref_fwd(s: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f64> {
    let (ho, wo) = s.out_hw().unwrap();
    let mut y = vec![0.0f64; s.n * s.o * ho * wo];
    y.par_chunks_mut(ho * wo)
        .enumerate()
        .for_each(|(no, plane)| {
            let (n, o) = (no / s.o, no % s.o);
            for oh in 0..ho {
                for ow in 0..wo {
                    let mut acc = 0.0f64;
                    for c in 0..s.c {
                        for kh in 0..s.kh {
                            let h = (oh * s.stride + kh) as isize - s.padding as isize;
                            if h < 0 || h >= s.h as isize {
                                continue;
                            }
                            for kw in 0..s.kw {
                                let ww = (ow * s.stride + kw) as isize - s.padding as isize;
                                if ww < 0 || ww >= s.w as isize {
                                    continue;
                                }
                                let xv = x[((n * s.c + c) * s.h + h as usize) * s.w + ww as usize];
                                let wv = w[((o * s.c + c) * s.kh + kh) * s.kw + kw];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    plane[oh * wo + ow] = acc;
                }
            }
        });
    y
}

fn conv_ref_bwd(s: &ConvShape, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (ho, wo) = s.out_hw().unwrap();
    let taps = |oh: usize, ow: usize, kh: usize, kw: usize| -> Option<(usize, usize)> {
        let h = (oh * s.stride + kh) as isize - s.padding as isize;
        let ww = (ow * s.stride + kw) as isize - s.padding as isize;
        (h >= 0 && h < s.h as isize && ww >= 0 && ww < s.w as isize)
            .then_some((h as usize, ww as usize))
    };
    let mut dx = vec![0.0f64; s.x_len()];
    dx.par_chunks_mut(s.h * s.w)
        .enumerate()
        .for_each(|(nc, plane)| {
            let (n, c) = (nc / s.c, nc % s.c);
            for o in 0..s.o {
                for oh in 0..ho {
                    for ow in 0..wo {
                        let g = dy[((n * s.o + o) * ho + oh) * wo + ow] as f64;
                        for kh in 0..s.kh {
                            for kw in 0..s.kw {
                                if let Some((h, ww)) = taps(oh, ow, kh, kw) {
                                    plane[h * s.w + ww] +=
                                        g * w[((o * s.c + c) * s.kh + kh) * s.kw + kw] as f64;
                                }
                            }
                        }
                    }
                }
            }
        });
    let mut dw = vec![0.0f64; s.w_len()];
    dw.par_chunks_mut(s.kh * s.kw)
        .enumerate()
        .for_each(|(oc, taps_out)| {
            let (o, c) = (oc / s.c, oc % s.c);
            for n in 0..s.n {
                for oh in 0..ho {
                    for ow in 0..wo {
                        let g = dy[((n * s.o + o) * ho + oh) * wo + ow] as f64;
                        for kh in 0..s.kh {
                            for kw in 0..s.kw {
                                if let Some((h, ww)) = taps(oh, ow, kh, kw) {
                                    taps_out[kh * s.kw + kw] +=
                                        g * x[((n * s.c + c) * s.h + h) * s.w + ww] as f64;
                                }
                            }
                        }
                    }
                }
            }
        });
    (dx, dw)
}

fn conv_case(be: &CudaBackend, s: ConvShape, seed: u64) {
    let x = randn(s.x_len(), seed);
    let w = randn(s.w_len(), seed + 1);
    let ylen = s.y_len().unwrap();
    let dy = randn(ylen, seed + 2);
    let (dxb, dwb, ddy) = (up(be, &x), up(be, &w), up(be, &dy));
    let mut y = poisoned(be, ylen);
    be.conv2d_forward(&s, &dxb, &dwb, &mut y).unwrap();
    check_close(
        &format!("conv fwd {s:?}"),
        &down(be, &y),
        &conv_ref_fwd(&s, &x, &w),
        1e-4,
    );
    let (rdx, rdw) = conv_ref_bwd(&s, &x, &w, &dy);
    let mut gx = poisoned(be, s.x_len());
    be.conv2d_backward_data(&s, &dwb, &ddy, &mut gx).unwrap();
    check_close(&format!("conv bwd data {s:?}"), &down(be, &gx), &rdx, 1e-4);
    let mut gw = poisoned(be, s.w_len());
    be.conv2d_backward_filter(&s, &dxb, &ddy, &mut gw).unwrap();
    check_close(
        &format!("conv bwd filter {s:?}"),
        &down(be, &gw),
        &rdw,
        1e-4,
    );
}

#[test]
fn conv2d_small_shapes() {
    let Some(be) = gpu_or_skip("conv2d_small_shapes") else {
        return;
    };
    let cs = |n, c, h, w, o, k, stride, padding| ConvShape {
        n,
        c,
        h,
        w,
        o,
        kh: k,
        kw: k,
        stride,
        padding,
    };
    conv_case(be, cs(2, 3, 9, 7, 4, 3, 2, 1), 100);
    conv_case(be, cs(3, 5, 8, 8, 6, 1, 1, 0), 110);
    conv_case(be, cs(2, 4, 11, 10, 3, 1, 2, 0), 120);
    conv_case(be, cs(1, 2, 13, 13, 5, 7, 2, 3), 130);
    // Shape errors are errors.
    let s = cs(2, 3, 9, 7, 4, 3, 2, 1);
    let mut y = be.alloc_f32(1).unwrap();
    assert!(be
        .conv2d_forward(&s, &up(be, &[0.0; 3]), &up(be, &[0.0; 3]), &mut y)
        .is_err());
}

#[test]
fn conv2d_resnet50_shapes() {
    let Some(be) = gpu_or_skip("conv2d_resnet50_shapes") else {
        return;
    };
    let cs = |n, c, h, o, k, stride, padding| ConvShape {
        n,
        c,
        h,
        w: h,
        o,
        kh: k,
        kw: k,
        stride,
        padding,
    };
    conv_case(be, cs(1, 3, 224, 64, 7, 2, 3), 200); // stem
    conv_case(be, cs(2, 64, 56, 64, 3, 1, 1), 210); // layer1 3x3
    conv_case(be, cs(2, 64, 56, 256, 1, 1, 0), 215); // layer1 expand 1x1
    conv_case(be, cs(2, 128, 56, 128, 3, 2, 1), 220); // layer2 first 3x3, stride 2
    conv_case(be, cs(2, 256, 56, 512, 1, 2, 0), 230); // layer2 projection shortcut
    conv_case(be, cs(2, 512, 7, 512, 3, 1, 1), 240); // layer4 3x3
}

struct BnRef {
    y: Vec<f64>,
    mean: Vec<f64>,
    var_b: Vec<f64>,
    var_u: Vec<f64>,
}

fn bn_ref(x: &[f32], g: &[f32], b: &[f32], n: usize, c: usize, hw: usize, eps: f64) -> BnRef {
    let m = (n * hw) as f64;
    let idx = |ni: usize, ci: usize, j: usize| (ni * c + ci) * hw + j;
    let mut r = BnRef {
        y: vec![0.0; x.len()],
        mean: vec![0.0; c],
        var_b: vec![0.0; c],
        var_u: vec![0.0; c],
    };
    for ci in 0..c {
        let vals: Vec<f64> = (0..n)
            .flat_map(|ni| (0..hw).map(move |j| (ni, j)))
            .map(|(ni, j)| x[idx(ni, ci, j)] as f64)
            .collect();
        let mu = vals.iter().sum::<f64>() / m;
        let var = vals.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / m;
        r.mean[ci] = mu;
        r.var_b[ci] = var;
        r.var_u[ci] = if m > 1.0 { var * m / (m - 1.0) } else { var };
        for ni in 0..n {
            for j in 0..hw {
                let i = idx(ni, ci, j);
                r.y[i] = (x[i] as f64 - mu) / (var + eps).sqrt() * g[ci] as f64 + b[ci] as f64;
            }
        }
    }
    r
}

/// The stem BN of ResNet50 at 256 images, (256, 64, 112 * 112): 3.2M elements per channel,
/// the shape that one-block-per-channel reductions handled worst. Checks exact results on a
/// constant input (mean = the constant, variance 0, y = beta, dgamma = 0, dbeta = sum dy) and
/// prints the time and effective bandwidth of each stage (no speed assertion: that depends on
/// the card; compare the printed numbers across commits on the same card).
#[test]
fn batch_norm_stem_shape_exact_and_timed() {
    let Some(be) = gpu_or_skip("batch_norm_stem_shape_exact_and_timed") else {
        return;
    };
    let (n, c, hw) = (256usize, 64usize, 112 * 112);
    let total = n * c * hw;
    let (xv, dyv, eps) = (0.375f32, 0.5f32, 1e-5f32);
    let mut x = be.alloc_f32(total).unwrap(); // (n, c, hw)
    let mut dy = be.alloc_f32(total).unwrap(); // (n, c, hw)
    be.fill(&mut x, xv).unwrap();
    be.fill(&mut dy, dyv).unwrap();
    let gamma = up(be, &randn(c, 77));
    let beta_h = randn(c, 78);
    let beta = up(be, &beta_h);
    let (mut mean, mut invstd, mut varu) = (poisoned(be, c), poisoned(be, c), poisoned(be, c));
    let (mut y, mut dx) = (poisoned(be, total), poisoned(be, total));
    let (mut dg, mut db) = (poisoned(be, c), poisoned(be, c));
    let mut stages = [0.0f64; 3];
    let iters = 5;
    for it in 0..=iters {
        // Iteration 0 warms up (module load, pool allocation) and is not timed.
        let mut times = [0.0f64; 3];
        be.synchronize().unwrap();
        let t = std::time::Instant::now();
        be.batch_norm_stats(&x, n, c, hw, eps, &mut mean, &mut invstd, &mut varu)
            .unwrap();
        be.synchronize().unwrap();
        times[0] = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        be.batch_norm_forward(&x, &mean, &invstd, &gamma, &beta, n, c, hw, &mut y)
            .unwrap();
        be.synchronize().unwrap();
        times[1] = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        be.batch_norm_backward(
            true, &dy, &x, &mean, &invstd, &gamma, n, c, hw, &mut dx, &mut dg, &mut db,
        )
        .unwrap();
        be.synchronize().unwrap();
        times[2] = t.elapsed().as_secs_f64();
        if it > 0 {
            for (s, t) in stages.iter_mut().zip(times) {
                *s += t / iters as f64;
            }
        }
    }
    // Tensor passes per stage: stats reads x twice; forward reads x, writes y; backward reads
    // dy and x for the reduction, then dy and x again and writes dx.
    let bytes = (total * 4) as f64;
    for (name, secs, passes) in [
        ("stats", stages[0], 2.0),
        ("forward", stages[1], 2.0),
        ("backward", stages[2], 5.0),
    ] {
        let _ = writeln!(
            std::io::stderr(),
            "bn ({n}, {c}, {hw}) {name}: {:.3} ms, {:.0} GB/s effective",
            secs * 1e3,
            passes * bytes / secs / 1e9
        );
    }
    let m = (n * hw) as f64;
    check_close("stem mean", &down(be, &mean), &vec![xv as f64; c], 1e-6);
    check_close("stem var_u", &down(be, &varu), &vec![0.0; c], 0.0);
    let want_is = vec![1.0 / (eps as f64).sqrt(); c];
    check_close("stem invstd", &down(be, &invstd), &want_is, 1e-6);
    check_close("stem dgamma", &down(be, &dg), &vec![0.0; c], 0.0);
    check_close("stem dbeta", &down(be, &db), &vec![dyv as f64 * m; c], 1e-6);
    // y = beta everywhere (x - mean = 0); spot-check the first and last plane of each channel.
    let yh = down(be, &y);
    let dxh = down(be, &dx);
    for (ci, &b) in beta_h.iter().enumerate() {
        for ni in [0, n - 1] {
            let plane = (ni * c + ci) * hw;
            for j in [0, hw / 2, hw - 1] {
                assert_eq!(yh[plane + j], b, "stem y at n={ni} c={ci} hw={j}");
                // dx = gamma * invstd / M * (M dy - dbeta - 0) = 0 up to rounding.
                assert!(
                    dxh[plane + j].abs() < 1e-3,
                    "stem dx at n={ni} c={ci} hw={j}"
                );
            }
        }
    }
    assert!(yh.iter().all(|v| v.is_finite()) && dxh.iter().all(|v| v.is_finite()));
}

#[test]
fn batch_norm_train_eval_backward_running() {
    let Some(be) = gpu_or_skip("batch_norm_train_eval_backward_running") else {
        return;
    };
    let eps = 1e-5f32;
    // Small shapes (one slice per channel), then shapes whose per-channel reductions split
    // into several uneven slices (S > 1; (16, 64, 56 * 56) is a ResNet layer1 BN at batch 16),
    // with hw % 4 == 0 (float4 elementwise path) and odd hw (scalar path).
    let shapes = [
        (3usize, 5usize, 21usize),
        (6, 10, 1),
        (4, 7, 49),
        (16, 64, 56 * 56),
        (33, 2, 1000),
        (5, 3, 2501),
        (2, 3, 4096),
    ];
    for (seed, &(n, c, hw)) in shapes.iter().enumerate() {
        let seed = 300 + 10 * seed as u64;
        let total = n * c * hw;
        let x: Vec<f32> = randn(total, seed).iter().map(|v| 2.0 * v + 0.5).collect();
        let gamma = randn(c, seed + 1);
        let beta = randn(c, seed + 2);
        let dy = randn(total, seed + 3);
        let r = bn_ref(&x, &gamma, &beta, n, c, hw, eps as f64);
        let (dx_, dg_, db_) = (up(be, &x), up(be, &gamma), up(be, &beta));
        let (mut mean, mut invstd, mut varu) = (poisoned(be, c), poisoned(be, c), poisoned(be, c));
        be.batch_norm_stats(&dx_, n, c, hw, eps, &mut mean, &mut invstd, &mut varu)
            .unwrap();
        check_close("bn mean", &down(be, &mean), &r.mean, 1e-5);
        check_close("bn var_unbiased", &down(be, &varu), &r.var_u, 1e-5);
        let want_is: Vec<f64> = r
            .var_b
            .iter()
            .map(|v| 1.0 / (v + eps as f64).sqrt())
            .collect();
        check_close("bn invstd", &down(be, &invstd), &want_is, 1e-5);
        let mut y = poisoned(be, total);
        be.batch_norm_forward(&dx_, &mean, &invstd, &dg_, &db_, n, c, hw, &mut y)
            .unwrap();
        check_close("bn forward", &down(be, &y), &r.y, 1e-5);

        // Training backward, reference in f64: dx = g*is/M (M dy - sum dy - xhat sum dy xhat).
        let m = (n * hw) as f64;
        let mut rdx = vec![0.0; total];
        let (mut rdg, mut rdb) = (vec![0.0; c], vec![0.0; c]);
        for ci in 0..c {
            let is = want_is[ci];
            let items: Vec<usize> = (0..n)
                .flat_map(|ni| (0..hw).map(move |j| (ni * c + ci) * hw + j))
                .collect();
            for &i in &items {
                rdb[ci] += dy[i] as f64;
                rdg[ci] += dy[i] as f64 * (x[i] as f64 - r.mean[ci]) * is;
            }
            for &i in &items {
                let xhat = (x[i] as f64 - r.mean[ci]) * is;
                rdx[i] = gamma[ci] as f64 * is / m * (m * dy[i] as f64 - rdb[ci] - xhat * rdg[ci]);
            }
        }
        let (mut gx, mut gg, mut gb) = (poisoned(be, total), poisoned(be, c), poisoned(be, c));
        be.batch_norm_backward(
            true,
            &up(be, &dy),
            &dx_,
            &mean,
            &invstd,
            &dg_,
            n,
            c,
            hw,
            &mut gx,
            &mut gg,
            &mut gb,
        )
        .unwrap();
        check_close("bn dx", &down(be, &gx), &rdx, 1e-4);
        check_close("bn dgamma", &down(be, &gg), &rdg, 1e-5);
        check_close("bn dbeta", &down(be, &gb), &rdb, 1e-5);

        // Eval: running statistics (random positive variances), forward and backward.
        let rmean = randn(c, seed + 4);
        let rvar: Vec<f32> = randn(c, seed + 5).iter().map(|v| v.abs() + 0.1).collect();
        let (drm, drv) = (up(be, &rmean), up(be, &rvar));
        let mut eis = poisoned(be, c);
        be.batch_norm_invstd(&drv, c, eps, &mut eis).unwrap();
        let mut y = poisoned(be, total);
        be.batch_norm_forward(&dx_, &drm, &eis, &dg_, &db_, n, c, hw, &mut y)
            .unwrap();
        let chan = |i: usize| (i / hw) % c;
        let want: Vec<f64> = (0..total)
            .map(|i| {
                let ci = chan(i);
                (x[i] as f64 - rmean[ci] as f64) / (rvar[ci] as f64 + eps as f64).sqrt()
                    * gamma[ci] as f64
                    + beta[ci] as f64
            })
            .collect();
        check_close("bn eval forward", &down(be, &y), &want, 1e-5);
        let (mut gx, mut gg, mut gb) = (poisoned(be, total), poisoned(be, c), poisoned(be, c));
        be.batch_norm_backward(
            false,
            &up(be, &dy),
            &dx_,
            &drm,
            &eis,
            &dg_,
            n,
            c,
            hw,
            &mut gx,
            &mut gg,
            &mut gb,
        )
        .unwrap();
        let want: Vec<f64> = (0..total)
            .map(|i| {
                dy[i] as f64 * gamma[chan(i)] as f64 / (rvar[chan(i)] as f64 + eps as f64).sqrt()
            })
            .collect();
        check_close("bn eval dx", &down(be, &gx), &want, 1e-5);
        check_close("bn eval dbeta", &down(be, &gb), &rdb, 1e-5);

        // Running update, twice from (0, 1).
        let (mut rm, mut rv) = (up(be, &vec![0.0; c]), up(be, &vec![1.0; c]));
        for _ in 0..2 {
            be.batch_norm_running_update(&mut rm, &mut rv, &mean, &varu, c, 0.1)
                .unwrap();
        }
        let wm: Vec<f64> = r.mean.iter().map(|m| 0.1 * m + 0.9 * 0.1 * m).collect();
        let wv: Vec<f64> = r
            .var_u
            .iter()
            .map(|v| 0.81 + 0.1 * v + 0.9 * 0.1 * v)
            .collect();
        check_close("bn running mean", &down(be, &rm), &wm, 1e-5);
        check_close("bn running var", &down(be, &rv), &wv, 1e-5);
    }
}

#[test]
fn pooling() {
    let Some(be) = gpu_or_skip("pooling") else {
        return;
    };
    for (seed, s) in [
        Pool2dShape {
            n: 2,
            c: 3,
            h: 11,
            w: 9,
            k: 3,
            stride: 2,
            padding: 1,
        },
        Pool2dShape {
            n: 1,
            c: 4,
            h: 112,
            w: 112,
            k: 3,
            stride: 2,
            padding: 1,
        },
        Pool2dShape {
            n: 3,
            c: 2,
            h: 8,
            w: 7,
            k: 2,
            stride: 2,
            padding: 0,
        },
    ]
    .iter()
    .enumerate()
    {
        let len = s.n * s.c * s.h * s.w;
        // Distinct values: a shuffled ramp, so the argmax is unambiguous.
        let mut x: Vec<f32> = (0..len).map(|i| i as f32 * 0.01 - 3.0).collect();
        x.shuffle(&mut ChaCha8Rng::seed_from_u64(400 + seed as u64));
        let (ho, wo) = s.out_hw().unwrap();
        let olen = s.n * s.c * ho * wo;
        let dy = randn(olen, 410 + seed as u64);
        let (mut ry, mut rarg) = (vec![0.0f64; olen], vec![0usize; olen]);
        for nc in 0..s.n * s.c {
            for oh in 0..ho {
                for ow in 0..wo {
                    let (mut best, mut bi) = (f64::NEG_INFINITY, usize::MAX);
                    for kh in 0..s.k {
                        for kw in 0..s.k {
                            let h = (oh * s.stride + kh) as isize - s.padding as isize;
                            let w = (ow * s.stride + kw) as isize - s.padding as isize;
                            if h < 0 || w < 0 || h >= s.h as isize || w >= s.w as isize {
                                continue;
                            }
                            let i = (h as usize) * s.w + w as usize;
                            let v = x[nc * s.h * s.w + i] as f64;
                            if bi == usize::MAX || v > best {
                                best = v;
                                bi = i;
                            }
                        }
                    }
                    let o = (nc * ho + oh) * wo + ow;
                    ry[o] = best;
                    rarg[o] = bi;
                }
            }
        }
        let mut rdx = vec![0.0f64; len];
        for o in 0..olen {
            let nc = o / (ho * wo);
            rdx[nc * s.h * s.w + rarg[o]] += dy[o] as f64;
        }
        let dx_ = up(be, &x);
        let mut y = poisoned(be, olen);
        let mut arg = be.alloc_bytes(olen * 4).unwrap();
        be.fill(&mut arg, f32::NAN).unwrap();
        be.max_pool2d_forward(s, &dx_, &mut y, &mut arg).unwrap();
        check_close(&format!("maxpool fwd {s:?}"), &down(be, &y), &ry, 0.0);
        let ga = be.download_i32(&arg).unwrap();
        assert!(
            ga.iter().zip(&rarg).all(|(&g, &r)| g as usize == r),
            "argmax {s:?}"
        );
        let mut dx = poisoned(be, len);
        be.max_pool2d_backward(s, &up(be, &dy), &arg, &mut dx)
            .unwrap();
        check_close(&format!("maxpool bwd {s:?}"), &down(be, &dx), &rdx, 1e-6);
    }
    // Ties: the first maximum in window order wins (PyTorch).
    let s = Pool2dShape {
        n: 1,
        c: 1,
        h: 2,
        w: 2,
        k: 2,
        stride: 2,
        padding: 0,
    };
    let (mut y, mut arg) = (poisoned(be, 1), be.alloc_bytes(4).unwrap());
    be.max_pool2d_forward(&s, &up(be, &[1.0, 5.0, 5.0, 5.0]), &mut y, &mut arg)
        .unwrap();
    assert_eq!(be.download_i32(&arg).unwrap(), vec![1]);

    // Global average pool, ResNet50's final map (7x7) and an odd one.
    for &(nc, hw) in &[(2 * 2048usize, 49usize), (15, 123)] {
        let x = randn(nc * hw, 420 + hw as u64);
        let dy = randn(nc, 421);
        let mut y = poisoned(be, nc);
        be.global_avg_pool_forward(&up(be, &x), nc, hw, &mut y)
            .unwrap();
        let want: Vec<f64> = (0..nc)
            .map(|p| {
                x[p * hw..(p + 1) * hw]
                    .iter()
                    .map(|&v| v as f64)
                    .sum::<f64>()
                    / hw as f64
            })
            .collect();
        check_close("gap fwd", &down(be, &y), &want, 1e-6);
        let mut dx = poisoned(be, nc * hw);
        be.global_avg_pool_backward(&up(be, &dy), nc, hw, &mut dx)
            .unwrap();
        let want: Vec<f64> = (0..nc * hw)
            .map(|i| dy[i / hw] as f64 / hw as f64)
            .collect();
        check_close("gap bwd", &down(be, &dx), &want, 1e-6);
    }
}

#[test]
fn weight_norm_rows() {
    let Some(be) = gpu_or_skip("weight_norm_rows") else {
        return;
    };
    for &(rows, cols) in &[(1000usize, 256usize), (37, 45)] {
        let v = randn(rows * cols, 500 + cols as u64);
        let dw = randn(rows * cols, 501);
        let norms: Vec<f64> = (0..rows)
            .map(|r| {
                v[r * cols..(r + 1) * cols]
                    .iter()
                    .map(|&x| (x as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        let w: Vec<f64> = (0..rows * cols)
            .map(|i| v[i] as f64 / norms[i / cols])
            .collect();
        let mut dn = poisoned(be, rows);
        be.row_norms(&up(be, &v), rows, cols, &mut dn).unwrap();
        check_close("row_norms", &down(be, &dn), &norms, 1e-5);
        let mut dwn = poisoned(be, rows * cols);
        be.row_normalize(&up(be, &v), &dn, rows, cols, &mut dwn)
            .unwrap();
        check_close("row_normalize", &down(be, &dwn), &w, 1e-5);
        let mut dv = poisoned(be, rows * cols);
        be.row_normalize_backward(&up(be, &dw), &dwn, &dn, rows, cols, &mut dv)
            .unwrap();
        let mut want = vec![0.0; rows * cols];
        for r in 0..rows {
            let dot: f64 = (0..cols)
                .map(|j| dw[r * cols + j] as f64 * w[r * cols + j])
                .sum();
            for j in 0..cols {
                let i = r * cols + j;
                want[i] = (dw[i] as f64 - dot * w[i]) / norms[r];
            }
        }
        check_close("row_normalize_backward", &down(be, &dv), &want, 1e-4);
    }
}

#[test]
fn ema_and_lars() {
    let Some(be) = gpu_or_skip("ema_and_lars") else {
        return;
    };
    let n = 200_003;
    let t = randn(n, 600);
    let s = randn(n, 601);
    let mut dt = up(be, &t);
    be.ema_update(&mut dt, &up(be, &s), 0.996).unwrap();
    let want: Vec<f64> = t
        .iter()
        .zip(&s)
        .map(|(&a, &b)| 0.996 * a as f64 + (1.0 - 0.996) * b as f64)
        .collect();
    check_close("ema", &down(be, &dt), &want, 1e-6);

    // Segments: a big matrix spanning several chunks, a bias (1-d), a matrix with zero
    // gradient (trust ratio 1), a small matrix, and an unused gap at the end.
    let segs = [
        (0usize, 150_000usize, false),
        (150_000, 513, true),
        (150_513, 1000, false),
        (151_513, 48_000, false),
    ];
    let numel = 200_003;
    let w = randn(numel, 610);
    let mut g = randn(numel, 611);
    for v in &mut g[150_513..151_513] {
        *v = 0.0;
    }
    let (lr, mom, trust, wd) = (0.3f32, 0.9f32, 0.001f32, 1e-4f32);
    let plan = be.lars_plan(&segs, numel).unwrap();
    let (mut dw, dg) = (up(be, &w), up(be, &g));
    let mut dmu = be.zeros_f32(numel).unwrap();
    let mut w6 = f64s(&w);
    let mut mu6 = vec![0.0f64; numel];
    for step in 0..3 {
        be.lars_step(&plan, &mut dw, &dg, &mut dmu, lr, mom, trust, wd)
            .unwrap();
        for &(off, len, one_d) in &segs {
            let r = off..off + len;
            let gp: Vec<f64> = if one_d {
                g[r.clone()].iter().map(|&x| x as f64).collect()
            } else {
                let gp: Vec<f64> = r.clone().map(|i| g[i] as f64 + wd as f64 * w6[i]).collect();
                let wn = r.clone().map(|i| w6[i] * w6[i]).sum::<f64>().sqrt();
                let gn = gp.iter().map(|v| v * v).sum::<f64>().sqrt();
                let q = if wn > 0.0 && gn > 0.0 {
                    trust as f64 * wn / gn
                } else {
                    1.0
                };
                gp.iter().map(|v| v * q).collect()
            };
            for (j, i) in r.enumerate() {
                mu6[i] = mom as f64 * mu6[i] + gp[j];
                w6[i] -= lr as f64 * mu6[i];
            }
        }
        check_close(&format!("lars w step {step}"), &down(be, &dw), &w6, 1e-5);
        check_close(&format!("lars mu step {step}"), &down(be, &dmu), &mu6, 1e-4);
    }
}

/// The CARP loss in f64, straight from SPEC.md: returns (loss, consistency, entropy,
/// dstudent (vs, n, k) in the original order).
fn carp_ref(
    student: &[f64],
    teacher: &[f64],
    vs: usize,
    n: usize,
    k: usize,
    nb: usize,
    perm: &[usize],
) -> (f64, f64, f64, Vec<f64>) {
    let eps = f32::EPSILON as f64;
    let np = k / nb;
    let clamp = |v: f64| v.clamp(eps, 1.0 - eps);
    // p[v][j][i][kk]
    let softmax = |logits: &[f64], v: usize, i: usize, j: usize| -> Vec<f64> {
        let z: Vec<f64> = (0..nb)
            .map(|kk| logits[(v * n + i) * k + perm[j * nb + kk]])
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    };
    let ps: Vec<Vec<Vec<Vec<f64>>>> = (0..vs)
        .map(|v| {
            (0..np)
                .map(|j| (0..n).map(|i| softmax(student, v, i, j)).collect())
                .collect()
        })
        .collect();
    let pt: Vec<Vec<Vec<Vec<f64>>>> = (0..2)
        .map(|v| {
            (0..np)
                .map(|j| (0..n).map(|i| softmax(teacher, v, i, j)).collect())
                .collect()
        })
        .collect();
    // pbar over every student view (local crops included) and both teacher views: (vs + 2) n
    // rows, as the reference code.
    let rows = ((vs + 2) * n) as f64;
    let mut pbar = vec![vec![0.0; nb]; np];
    for j in 0..np {
        for i in 0..n {
            for kk in 0..nb {
                let sum: f64 = ps.iter().chain(&pt).map(|p| p[j][i][kk]).sum();
                pbar[j][kk] += sum / rows;
            }
        }
    }
    let ent = (nb as f64).ln()
        + pbar
            .iter()
            .flatten()
            .map(|&p| p * clamp(p).ln())
            .sum::<f64>()
            / np as f64;
    let g: Vec<Vec<f64>> = pbar
        .iter()
        .map(|row| {
            row.iter()
                .map(|&p| {
                    (clamp(p).ln() + if p >= eps && p <= 1.0 - eps { 1.0 } else { 0.0 })
                        / (rows * np as f64)
                })
                .collect()
        })
        .collect();
    let pairs: Vec<(usize, usize)> = (0..vs)
        .flat_map(|a| (0..2).filter(move |&b| b != a).map(move |b| (a, b)))
        .collect();
    let c = 1.0 / (pairs.len() as f64 * n as f64 * np as f64);
    let mut cons = 0.0;
    let mut d = vec![0.0; vs * n * k];
    for j in 0..np {
        for i in 0..n {
            for a in 0..vs {
                let p = &ps[a][j][i];
                let mut dz = vec![0.0; nb];
                for &(_, b) in pairs.iter().filter(|(pa, _)| *pa == a) {
                    let q = &pt[b][j][i];
                    let s: f64 = p.iter().zip(q).map(|(x, y)| x * y).sum();
                    cons -= clamp(s).ln() * c;
                    if s >= eps && s <= 1.0 - eps {
                        for kk in 0..nb {
                            dz[kk] -= c * p[kk] * (q[kk] - s) / s;
                        }
                    }
                }
                let pg: f64 = p.iter().zip(&g[j]).map(|(x, y)| x * y).sum();
                for kk in 0..nb {
                    dz[kk] += p[kk] * (g[j][kk] - pg);
                }
                for kk in 0..nb {
                    d[(a * n + i) * k + perm[j * nb + kk]] = dz[kk];
                }
            }
        }
    }
    (cons + ent, cons, ent, d)
}

#[test]
fn carp_reference_gradient_matches_finite_differences() {
    // CPU only: validates the f64 reference the GPU test relies on.
    let (vs, n, k, nb) = (3, 3, 8, 4);
    let mut perm: Vec<usize> = (0..k).collect();
    perm.shuffle(&mut ChaCha8Rng::seed_from_u64(700));
    let s = f64s(&randn(vs * n * k, 701));
    let t = f64s(&randn(2 * n * k, 702));
    let (_, _, _, d) = carp_ref(&s, &t, vs, n, k, nb, &perm);
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for idx in 0..s.len() {
        let (mut sp, mut sm) = (s.clone(), s.clone());
        sp[idx] += h;
        sm[idx] -= h;
        let fd = (carp_ref(&sp, &t, vs, n, k, nb, &perm).0
            - carp_ref(&sm, &t, vs, n, k, nb, &perm).0)
            / (2.0 * h);
        worst = worst.max((fd - d[idx]).abs());
    }
    let scale = d.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(
        worst / scale < 1e-6,
        "reference gradient vs finite differences: {}",
        worst / scale
    );
}

#[test]
fn carp_reference_matches_the_cpu_loss_with_local_views() {
    // CPU only: the f64 reference the GPU test uses and the CPU loss (src/ops/loss.rs, itself
    // tested against a literal SPEC implementation) agree for VS > 2, local rows in pbar
    // included (they disagreed while the fused loss left the local crops out of pbar).
    for (vs, n, k, nb, seed) in [
        (3usize, 5usize, 48usize, 16usize, 710u64),
        (8, 3, 60, 20, 720),
    ] {
        let mut perm: Vec<usize> = (0..k).collect();
        perm.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let s: Vec<f32> = randn(vs * n * k, seed + 1)
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        let t: Vec<f32> = randn(2 * n * k, seed + 2).iter().map(|v| 2.0 * v).collect();
        let (loss, cons, ent, d) = carp_ref(&f64s(&s), &f64s(&t), vs, n, k, nb, &perm);
        let sv: Vec<&[f32]> = s.chunks_exact(n * k).collect();
        let tv: Vec<&[f32]> = t.chunks_exact(n * k).collect();
        let perm32: Vec<u32> = perm.iter().map(|&p| p as u32).collect();
        let cpu = carp::ops::loss::carp_loss(&sv, &tv, n, k, nb, &perm32).unwrap();
        let tag = format!("vs={vs} n={n} k={k} nb={nb}");
        for (name, got, want) in [
            ("loss", cpu.loss, loss),
            ("consistency", cpu.consistency, cons),
            ("entropy", cpu.entropy, ent),
        ] {
            assert!(
                (got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{tag} {name}: cpu {got} vs f64 reference {want}"
            );
        }
        let dcpu: Vec<f32> = cpu.dstudent.concat();
        check_close(&format!("{tag} dstudent"), &dcpu, &d, 1e-4);
    }
}

#[test]
fn carp_loss_fused() {
    let Some(be) = gpu_or_skip("carp_loss_fused") else {
        return;
    };
    for (case, &(vs, n, k, nb)) in [
        (2usize, 5usize, 64usize, 16usize),
        (4, 7, 96, 32),
        (2, 16, 4096, 512),
        (2, 3, 600, 100),
        // Multi-crop: 1 and 6 local views (the local rows are in pbar, R = (vs + 2) n).
        (3, 5, 120, 40),
        (8, 3, 256, 64),
    ]
    .iter()
    .enumerate()
    {
        let seed = 800 + 10 * case as u64;
        let mut perm: Vec<usize> = (0..k).collect();
        perm.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let s: Vec<f32> = randn(vs * n * k, seed + 1)
            .iter()
            .map(|v| 3.0 * v)
            .collect();
        let t: Vec<f32> = randn(2 * n * k, seed + 2).iter().map(|v| 3.0 * v).collect();
        let (loss, cons, ent, d) = carp_ref(&f64s(&s), &f64s(&t), vs, n, k, nb, &perm);
        let perm32: Vec<i32> = perm.iter().map(|&p| p as i32).collect();
        let out = be
            .carp_loss(
                &up(be, &s),
                &up(be, &t),
                &be.upload_i32(&perm32).unwrap(),
                vs,
                n,
                k,
                nb,
                (vs + 2) * n,
                None,
            )
            .unwrap();
        let tag = format!("carp (vs={vs}, n={n}, k={k}, nb={nb})");
        // H = log NB + (a sum close to -log NB): f32 cancellation makes its error absolute,
        // about 1e-6 * log NB, so the scalars are compared with an absolute bound.
        for (name, got, want) in [
            ("loss", out.loss, loss),
            ("consistency", out.consistency, cons),
            ("entropy", out.entropy, ent),
        ] {
            assert!(
                got.is_finite() && (got as f64 - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{tag} {name}: gpu {got} vs ref {want}"
            );
        }
        check_close(
            &format!("{tag} dstudent"),
            &down(be, &out.dstudent),
            &d,
            1e-4,
        );
    }
}

#[test]
fn allocator_reuses_memory_in_steady_state() {
    let Some(be) = gpu_or_skip("allocator_reuses_memory_in_steady_state") else {
        return;
    };
    // Sizes unlikely to be used by the other tests running concurrently.
    let sizes = [123_457usize, 7_777_777, 31];
    let step = || {
        let bufs: Vec<DeviceBuffer> = sizes.iter().map(|&s| be.alloc_bytes(s).unwrap()).collect();
        drop(bufs);
    };
    step();
    let before = be.pool_stats();
    for _ in 0..5 {
        step();
    }
    let after = be.pool_stats();
    assert!(
        after.reuses >= before.reuses + 15,
        "{before:?} -> {after:?}"
    );
    // The requested-bytes peak saw the three buffers alive together, and buckets only round up.
    assert!(
        after.peak_bytes_requested >= sizes.iter().sum::<usize>(),
        "{after:?}"
    );
    assert!(
        after.peak_bytes_requested <= after.peak_bytes_in_use,
        "{after:?}"
    );
    assert!(after.bytes_requested <= after.bytes_in_use, "{after:?}");
}

#[test]
fn nvtx_ranges_are_harmless_without_a_profiler() {
    // Runs everywhere: without Nsight attached the NVTX calls must be no-ops.
    let r = carp::device::cuda::nvtx::Range::new("outer");
    let v = carp::device::cuda::nvtx::scoped("inner", || 41 + 1);
    drop(r);
    assert_eq!(v, 42);
}

/// The GPU view finish (kernels/augment.cu through `train::views::finish_crops`, the trainer's
/// entry point) against the CPU `finish` (the specification) on random crops and parameters
/// covering every branch: jitter off / on with contrast at each position of the order and a
/// non-permutation order, grayscale, blur off and sigmas up to 3.4 (radius 11, beyond a 9-pixel
/// side: clamped edges), solarize with and without blur, flipped or not; sides 224 and 96 (the
/// global and local views), odd 13, and 1. Every device buffer is NaN-poisoned when allocated,
/// so an unwritten element fails. Tolerance: 5e-5 absolute on the normalized values (~1e-5 on
/// [0, 1]): float rounding only (FMA contraction, `expf`, the f32 contrast mean vs the CPU's
/// f64); elements within 1e-4 of the solarize threshold before solarizing, in images with
/// jitter or blur, may land on either side and are skipped.
#[test]
fn view_finish_matches_the_cpu() {
    use carp::data::augment::{finish, ColorParams, ViewConfig};
    use carp::tensor::Device;
    use carp::train::views::{crops_to_locals, crops_to_views, finish_crops};
    if gpu_or_skip("view_finish_matches_the_cpu").is_none() {
        return;
    }
    carp::device::cuda::set_poison_allocations(true);
    let cfg = ViewConfig::imagenet(224);
    let thr = cfg.solarize_threshold / 255.0;
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    const ORDERS: [[u8; 4]; 6] = [
        [1, 0, 2, 3],
        [0, 1, 3, 2],
        [3, 2, 1, 0],
        [2, 3, 0, 1],
        [1, 3, 1, 0],
        [0, 2, 3, 1],
    ];
    const SIGMAS: [f32; 5] = [0.0, 0.1, 0.6, 1.3, 3.4];
    for &(b, s) in &[(9usize, 13usize), (4, 224), (6, 96), (3, 1), (12, 9)] {
        let mut crops: Vec<u8> = (0..b * s * s * 3).map(|_| rng.gen()).collect();
        for px in crops.chunks_exact_mut(3) {
            match rng.gen_range(0..6) {
                0 => {
                    let v = rng.gen();
                    px.fill(v);
                }
                1 => px[rng.gen_range(0..3)] = 128,
                2 => px[rng.gen_range(0..3)] = 255,
                _ => {}
            }
        }
        let params: Vec<ColorParams> = (0..b)
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
            .collect();
        let got = finish_crops(&crops, &params, b, s, &cfg, &Device::Cuda(0))
            .unwrap()
            .to_vec()
            .unwrap();
        let per = 3 * s * s;
        let (mut worst, mut at, mut skipped) = (0f32, 0, 0);
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
            let mut pre = vec![0f32; per];
            let unsolarized = ColorParams { solarize: 0, ..*p };
            finish(crop, &unsolarized, s, &[0.0; 3], &[1.0; 3], 0.0, &mut pre);
            let exact = p.jitter == 0 && p.blur_sigma <= 0.0;
            for k in 0..per {
                if p.solarize != 0 && !exact && (pre[k] - thr).abs() < 1e-4 {
                    skipped += 1;
                    continue;
                }
                let g = got[i * per + k];
                assert!(g.is_finite(), "B={b} S={s}: image {i} element {k} = {g}");
                let d = (g - want[k]).abs();
                if d > worst {
                    (worst, at) = (d, i * per + k);
                }
            }
        }
        let _ = writeln!(
            std::io::stderr(),
            "view finish B={b} S={s}: max |gpu - cpu| {worst:.2e} at {at}, {skipped} skipped"
        );
        assert!(
            worst <= 5e-5,
            "B={b} S={s}: GPU finish off by {worst} at {at}"
        );
    }
    // The batch entry points: two views and the (L, B) local layout, against the CPU device.
    let (b, s, l, ls) = (5usize, 17usize, 3usize, 7usize);
    let mut cfg = ViewConfig::imagenet(s);
    cfg.local_count = l;
    cfg.local_size = ls;
    let mut bytes = |n: usize| (0..n).map(|_| rng.gen::<u8>()).collect::<Vec<u8>>();
    let (v1, v2, loc) = (
        bytes(b * s * s * 3),
        bytes(b * s * s * 3),
        bytes(b * l * ls * ls * 3),
    );
    let p = |n: usize| {
        (0..n)
            .map(|i| ColorParams {
                jitter: 1,
                order: ORDERS[i % 6],
                brightness: 1.2,
                contrast: 0.7,
                saturation: 1.3,
                hue: 0.05,
                blur_sigma: if i % 2 == 0 { 0.8 } else { 0.0 },
                ..ColorParams::identity()
            })
            .collect::<Vec<_>>()
    };
    let batch = carp::data::CropBatch {
        view1: v1,
        view2: v2,
        params1: p(b),
        params2: p(b),
        labels: vec![0; b],
        indices: (0..b).collect(),
        batch: b,
        size: s,
        locals: loc,
        local_params: p(b * l),
        local_count: l,
        local_size: ls,
    };
    let (g1, g2) = crops_to_views(&batch, &cfg, &Device::Cuda(0)).unwrap();
    let (c1, c2) = crops_to_views(&batch, &cfg, &Device::Cpu).unwrap();
    let gl = crops_to_locals(&batch, &cfg, &Device::Cuda(0))
        .unwrap()
        .unwrap();
    let cl = crops_to_locals(&batch, &cfg, &Device::Cpu)
        .unwrap()
        .unwrap();
    assert_eq!(gl.shape(), &[l * b, 3, ls, ls]);
    for (name, g, c) in [("view1", g1, c1), ("view2", g2, c2), ("locals", gl, cl)] {
        check_close(
            name,
            &g.to_vec().unwrap(),
            &f64s(&c.to_vec().unwrap()),
            2e-5,
        );
    }
}

/// The view finish's pinned staging (src/device/cuda/augment.rs: two slots, each rewritten only
/// after its previous copy completed, grown while the other slot's copy may be queued) under
/// back-to-back calls with nothing waiting in between: six finishes of changing sizes, the
/// first ones heavy (sigma 3.4 blur at 224) so later copies queue behind kernels, and ONE host
/// crop buffer refilled with new bytes after every call (the call must have taken its bytes).
/// Each result is read only at the end and compared with the CPU finish of the bytes that call
/// was given; a slot overwritten before its copy ran, or a host read after return, shows as a
/// view holding another call's image. Tolerance 5e-5 of the largest |value| (check_close;
/// float rounding only, as view_finish_matches_the_cpu), with no solarize (no threshold flips)
/// so every element is compared.
#[test]
fn view_finish_staging_back_to_back() {
    use carp::data::augment::{finish, ColorParams, ViewConfig};
    use carp::tensor::Device;
    use carp::train::views::finish_crops;
    if gpu_or_skip("view_finish_staging_back_to_back").is_none() {
        return;
    }
    let cfg = ViewConfig::imagenet(224);
    let mut rng = ChaCha8Rng::seed_from_u64(91);
    let mut host: Vec<u8> = Vec::new(); // reused (B, S, S, 3) crop bytes
    let mut pending = Vec::new();
    for &(b, s) in &[
        (5usize, 224usize),
        (4, 224),
        (2, 64),
        (6, 160),
        (1, 31),
        (3, 96),
    ] {
        host.resize(b * s * s * 3, 0);
        host.iter_mut().for_each(|v| *v = rng.gen());
        let params: Vec<ColorParams> = (0..b)
            .map(|i| ColorParams {
                jitter: 1,
                order: [
                    (i % 4) as u8,
                    ((i + 1) % 4) as u8,
                    ((i + 2) % 4) as u8,
                    ((i + 3) % 4) as u8,
                ],
                brightness: rng.gen_range(0.6..1.4),
                contrast: rng.gen_range(0.6..1.4),
                saturation: rng.gen_range(0.6..1.4),
                hue: rng.gen_range(-0.2..0.2),
                blur_sigma: if i % 2 == 0 { 3.4 } else { 0.0 },
                ..ColorParams::identity()
            })
            .collect();
        let got = finish_crops(&host, &params, b, s, &cfg, &Device::Cuda(0)).unwrap();
        // The expected views from the bytes this call got, before the buffer is refilled.
        let mut want = vec![0f32; b * 3 * s * s];
        for i in 0..b {
            finish(
                &host[i * s * s * 3..(i + 1) * s * s * 3],
                &params[i],
                s,
                &cfg.mean,
                &cfg.std,
                cfg.solarize_threshold,
                &mut want[i * 3 * s * s..(i + 1) * 3 * s * s],
            );
        }
        pending.push((b, s, got, want));
    }
    for (b, s, got, want) in pending {
        check_close(
            &format!("back-to-back finish B={b} S={s}"),
            &got.to_vec().unwrap(),
            &f64s(&want),
            5e-5,
        );
    }
}

/// The fused BN + ReLU (+ residual) launchers (kernels/bn_fused.cu) against an f64 reference
/// written here, in both modes, with and without the residual, at odd shapes and one with
/// several slices per channel (m = 12800 > 4096); outputs NaN-poisoned first. The reference's
/// ReLU mask is the GPU's y (itself checked against the reference), so an element within f32
/// rounding of the kink cannot flip the comparison.
#[test]
fn bn_act_fused_launchers() {
    let Some(be) = gpu_or_skip("bn_act_fused_launchers") else {
        return;
    };
    let eps = 1e-5f32;
    for (k, &(n, c, hw)) in [
        (3usize, 5usize, 7usize),
        (16, 33, 1),
        (8, 3, 1600),
        (2, 64, 12),
    ]
    .iter()
    .enumerate()
    {
        for train in [true, false] {
            for resid in [false, true] {
                let s = 1000 + 10 * k as u64;
                let total = n * c * hw;
                let xh: Vec<f32> = randn(total, s).iter().map(|v| 0.5 + 2.0 * v).collect();
                let (gh, bh) = (randn(c, s + 1), randn(c, s + 2));
                let (rh, dyh) = (randn(total, s + 3), randn(total, s + 4));
                let rmh: Vec<f32> = randn(c, s + 5).iter().map(|v| 0.5 + 0.3 * v).collect();
                let rvh: Vec<f32> = randn(c, s + 6).iter().map(|v| 0.3 + v * v).collect();
                let (x, g, b, r, dy) = (
                    up(be, &xh),
                    up(be, &gh),
                    up(be, &bh),
                    up(be, &rh),
                    up(be, &dyh),
                );
                let (mut mean, mut invstd, mut varu) =
                    (poisoned(be, c), poisoned(be, c), poisoned(be, c));
                // The statistics the reference uses: the batch's (f64) or the running ones.
                let (mu, isd): (Vec<f64>, Vec<f64>) = if train {
                    be.batch_norm_stats(&x, n, c, hw, eps, &mut mean, &mut invstd, &mut varu)
                        .unwrap();
                    let rf = bn_ref(&xh, &gh, &bh, n, c, hw, eps as f64);
                    let isd = rf
                        .var_b
                        .iter()
                        .map(|v| 1.0 / (v + eps as f64).sqrt())
                        .collect();
                    (rf.mean, isd)
                } else {
                    mean = up(be, &rmh);
                    be.batch_norm_invstd(&up(be, &rvh), c, eps, &mut invstd)
                        .unwrap();
                    let isd = rvh.iter().map(|&v| 1.0 / (v as f64 + eps as f64).sqrt());
                    (f64s(&rmh), isd.collect())
                };
                let mut y = poisoned(be, total);
                let rr = resid.then_some(&r);
                be.bn_act_forward(&x, rr, &mean, &invstd, &g, &b, n, c, hw, &mut y)
                    .unwrap();
                let (mut dx, mut dg, mut db) =
                    (poisoned(be, total), poisoned(be, c), poisoned(be, c));
                let mut dres = resid.then(|| poisoned(be, total));
                be.bn_act_backward(
                    train,
                    &dy,
                    &y,
                    &x,
                    &mean,
                    &invstd,
                    &g,
                    n,
                    c,
                    hw,
                    &mut dx,
                    dres.as_mut(),
                    &mut dg,
                    &mut db,
                )
                .unwrap();
                let yg = down(be, &y);
                let m = (n * hw) as f64;
                let (mut ry, mut rdx, mut rdr) =
                    (vec![0.0; total], vec![0.0; total], vec![0.0; total]);
                let (mut rdg, mut rdb) = (vec![0.0; c], vec![0.0; c]);
                let idx = |ni: usize, ci: usize, j: usize| (ni * c + ci) * hw + j;
                for ci in 0..c {
                    for ni in 0..n {
                        for j in 0..hw {
                            let i = idx(ni, ci, j);
                            let pre = (xh[i] as f64 - mu[ci]) * isd[ci] * gh[ci] as f64
                                + bh[ci] as f64
                                + if resid { rh[i] as f64 } else { 0.0 };
                            ry[i] = pre.max(0.0);
                            let gp = if yg[i] > 0.0 { dyh[i] as f64 } else { 0.0 };
                            rdr[i] = gp;
                            rdb[ci] += gp;
                            rdg[ci] += gp * (xh[i] as f64 - mu[ci]) * isd[ci];
                        }
                    }
                    for ni in 0..n {
                        for j in 0..hw {
                            let i = idx(ni, ci, j);
                            let xhat = (xh[i] as f64 - mu[ci]) * isd[ci];
                            let k = gh[ci] as f64 * isd[ci];
                            rdx[i] = if train {
                                k / m * (m * rdr[i] - rdb[ci] - xhat * rdg[ci])
                            } else {
                                k * rdr[i]
                            };
                        }
                    }
                }
                let tag = format!("bn_act ({n},{c},{hw}) train={train} residual={resid}");
                let zeros = yg.iter().filter(|&&v| v == 0.0).count();
                assert!(zeros > 0 && zeros < total, "{tag}: ReLU cut {zeros}");
                check_close(&format!("{tag} y"), &yg, &ry, 1e-5);
                check_close(&format!("{tag} dgamma"), &down(be, &dg), &rdg, 1e-5);
                check_close(&format!("{tag} dbeta"), &down(be, &db), &rdb, 1e-5);
                check_close(&format!("{tag} dx"), &down(be, &dx), &rdx, 1e-4);
                if let Some(dr) = &dres {
                    check_close(&format!("{tag} dresidual"), &down(be, dr), &rdr, 0.0);
                }
            }
        }
    }
}

/// The fused BN + ReLU + add kernels timed against the unfused sequence (stats + apply + add +
/// relu; relu backward + BN backward) at ResNet50's stem BN shape at 64 images (51M elements;
/// 64 rather than 256 keeps the compute-sanitizer pass over this file short), printed for the
/// GPU session's notes; no speed assertion (it depends on the card).
#[test]
fn bn_act_fused_vs_unfused_timed() {
    let Some(be) = gpu_or_skip("bn_act_fused_vs_unfused_timed") else {
        return;
    };
    let eps = 1e-5f32;
    let (n, c, hw) = (64usize, 64usize, 112 * 112);
    let total = n * c * hw;
    let (x, r, dy) = (
        up(be, &randn(total, 1)),
        up(be, &randn(total, 2)),
        up(be, &randn(total, 3)),
    );
    let (g, b) = (up(be, &randn(c, 4)), up(be, &randn(c, 5)));
    let (mut mean, mut invstd, mut varu) = (poisoned(be, c), poisoned(be, c), poisoned(be, c));
    let (mut y, mut t, mut dx, mut dr) = (
        poisoned(be, total),
        poisoned(be, total),
        poisoned(be, total),
        poisoned(be, total),
    );
    let (mut dg, mut db) = (poisoned(be, c), poisoned(be, c));
    let time = |f: &mut dyn FnMut()| {
        f(); // warm-up
        be.synchronize().unwrap();
        let t0 = std::time::Instant::now();
        for _ in 0..5 {
            f();
        }
        be.synchronize().unwrap();
        t0.elapsed().as_secs_f64() / 5.0 * 1e3
    };
    let fused_fwd = time(&mut || {
        be.batch_norm_stats(&x, n, c, hw, eps, &mut mean, &mut invstd, &mut varu)
            .unwrap();
        be.bn_act_forward(&x, Some(&r), &mean, &invstd, &g, &b, n, c, hw, &mut y)
            .unwrap();
    });
    let fused_bwd = time(&mut || {
        be.bn_act_backward(
            true,
            &dy,
            &y,
            &x,
            &mean,
            &invstd,
            &g,
            n,
            c,
            hw,
            &mut dx,
            Some(&mut dr),
            &mut dg,
            &mut db,
        )
        .unwrap();
    });
    let unfused_fwd = time(&mut || {
        be.batch_norm_stats(&x, n, c, hw, eps, &mut mean, &mut invstd, &mut varu)
            .unwrap();
        be.batch_norm_forward(&x, &mean, &invstd, &g, &b, n, c, hw, &mut t)
            .unwrap();
        be.add(&t, &r, &mut dr).unwrap();
        be.relu_forward(&dr, &mut y).unwrap();
    });
    let unfused_bwd = time(&mut || {
        be.relu_backward(&y, &dy, &mut dr).unwrap();
        be.batch_norm_backward(
            true, &dr, &x, &mean, &invstd, &g, n, c, hw, &mut dx, &mut dg, &mut db,
        )
        .unwrap();
    });
    let _ = writeln!(
        std::io::stderr(),
        "bn+add+relu ({n}, {c}, {hw}): forward fused {fused_fwd:.3} ms vs unfused \
         {unfused_fwd:.3} ms; backward fused {fused_bwd:.3} ms vs unfused {unfused_bwd:.3} ms"
    );
}

// The layout-agnostic launchers refuse buffers whose layout labels disagree (an NHWC operand
// next to an NCHW one would otherwise be combined element by element without an error): add
// with mixed a/b/y layouts, max pool with an NCHW input and an NHWC output (or gradient).
#[test]
fn launchers_refuse_mixed_layouts() {
    use carp::tensor::Layout;
    let Some(be) = gpu_or_skip("launchers_refuse_mixed_layouts") else {
        return;
    };
    let n = 2 * 3 * 5 * 7; // (2, 3, 5, 7)
    let a = be.alloc_bf16(n).unwrap();
    let b = be.alloc_bf16(n).unwrap().with_layout(Layout::Nhwc);
    let mut y = be.alloc_bf16(n).unwrap();
    let e = be.add(&a, &b, &mut y).expect_err("NCHW a + NHWC b");
    assert!(e.to_string().contains("NHWC"), "{e}");
    let b = be.alloc_bf16(n).unwrap();
    be.add(&a, &b, &mut y).expect("one layout");

    let s = Pool2dShape {
        n: 2,
        c: 3,
        h: 5,
        w: 7,
        k: 3,
        stride: 2,
        padding: 1,
    };
    let (ho, wo) = s.out_hw().unwrap();
    let x = be.alloc_bf16(n).unwrap(); // (N, C, H, W)
    let mut yp = be
        .alloc_bf16(2 * 3 * ho * wo)
        .unwrap()
        .with_layout(Layout::Nhwc);
    let mut argmax = be.alloc_bytes(2 * 3 * ho * wo * 4).unwrap();
    let e = be
        .max_pool2d_forward(&s, &x, &mut yp, &mut argmax)
        .expect_err("NCHW x, NHWC y");
    assert!(e.to_string().contains("NHWC"), "{e}");
    let dy = be.alloc_bf16(2 * 3 * ho * wo).unwrap(); // NCHW
    let mut dx = be.alloc_bf16(n).unwrap().with_layout(Layout::Nhwc);
    let e = be
        .max_pool2d_backward(&s, &dy, &argmax, &mut dx)
        .expect_err("NCHW dy, NHWC dx");
    assert!(e.to_string().contains("NHWC"), "{e}");
}
