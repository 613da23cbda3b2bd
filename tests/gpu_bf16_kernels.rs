//! The bf16-storage kernels (`*_bf16` in kernels/elementwise.cu, batchnorm.cu, bn_fused.cu,
//! pool.cu) on a real GPU, launched directly from the embedded PTX (independent of the host
//! launchers, which land separately): each bf16 kernel runs next to its f32 instantiation on
//! the widened bf16 inputs, with the same grid, and must store exactly
//! `round_bf16(f32 kernel's output)` (carp::tensor::round_bf16, the CPU emulation of bf16) and
//! produce bit-identical f32 partials and statistics; then loose checks against f64 references
//! (5e-3 of the largest reference value: bf16 keeps 8 significant bits) so that a bug shared by
//! both instantiations fails too. Shapes: ResNet50-like planes (56x56, 7x7, HW = 1) and odd ones,
//! buffers at offsets that select the 4-wide path (0; 4 elements = 8 bytes: bf16-aligned only)
//! or the scalar one (1, 2 elements: 2- and 4-byte misaligned), the launchers' grids and a small
//! grid whose grid-stride loop wraps. Outputs start as NaN (0x7fc0 for bf16): an unwritten
//! element fails. The same checks run on the kernel emulator in CI (tests/gpu_sim/sim_test.cpp).
//!
//! Without a GPU (or driver) each test prints "SKIPPED: <reason>" to stderr and returns.
#![cfg(feature = "cuda")]

mod ptx_harness;
use ptx_harness::{close, gpu_or_skip, randn, Gpu, NAN16};

use carp::tensor::round_bf16;
use cudarc::driver::{CudaSlice, LaunchConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The kernels these tests launch, by module.
const FUNCS: &[(&str, &[&str])] = &[
    (
        "elementwise",
        &["cast_f32_bf16", "cast_bf16_f32", "add_f32", "add_bf16"],
    ),
    (
        "batchnorm",
        &[
            "bn_sum_partial_f32",
            "bn_sum_partial_bf16",
            "bn_sqdev_partial_f32",
            "bn_sqdev_partial_bf16",
            "bn_stats_finalize_f32",
            "bn_forward_f32",
            "bn_forward_bf16",
            "bn_backward_partial_f32",
            "bn_backward_partial_bf16",
            "bn_backward_finalize_f32",
            "bn_backward_dx_f32",
            "bn_backward_dx_bf16",
            "bn_eval_backward_dx_f32",
            "bn_eval_backward_dx_bf16",
        ],
    ),
    (
        "bn_fused",
        &[
            "bn_act_forward_f32",
            "bn_act_forward_bf16",
            "bn_act_backward_partial_f32",
            "bn_act_backward_partial_bf16",
            "bn_act_backward_dx_f32",
            "bn_act_backward_dx_bf16",
        ],
    ),
    (
        "pool",
        &[
            "maxpool2d_fwd_f32",
            "maxpool2d_fwd_bf16",
            "maxpool2d_bwd_f32",
            "maxpool2d_bwd_bf16",
            "global_avgpool_fwd_f32",
            "global_avgpool_fwd_bf16",
            "global_avgpool_bwd_f32",
            "global_avgpool_bwd_bf16",
        ],
    ),
];

/// Launches kernel `$name` on `$grid` (x, y) blocks of `$block` threads. The arguments must be
/// plain variables (the launch builder keeps references to them).
macro_rules! launch {
    ($g:expr, $name:expr, $grid:expr, $block:expr; $($arg:ident),* $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let name: &str = &$name;
        let f = $g.funcs.get(name).unwrap_or_else(|| panic!("{name} not loaded"));
        let mut b = $g.stream.launch_builder(f);
        $( b.arg(&$arg); )*
        let (gx, gy): (u32, u32) = $grid;
        let cfg = LaunchConfig {
            grid_dim: (gx, gy, 1),
            block_dim: ($block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument lists below follow the kernels' signatures in kernels/*.cu, and
        // every pointer addresses a live buffer of this test sized for the kernel's index range
        // (offset `off` elements into an allocation of `off` + the tensor's length).
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| panic!("launching {name}: {e:?}"));
    }};
}

fn to16(x: f32) -> u16 {
    (round_bf16(x).to_bits() >> 16) as u16
}

fn wide(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

fn widen(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| wide(b)).collect()
}

/// `got[i] == round_bf16(want[i])` for every i past `off`, and the guard band before `off`
/// untouched.
fn bits_eq(name: &str, got: &[u16], want: &[f32], off: usize) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    assert!(
        got[..off].iter().all(|&b| b == NAN16),
        "{name}: wrote before the buffer start"
    );
    let bad: Vec<usize> = (off..got.len())
        .filter(|&i| got[i] != to16(want[i]))
        .collect();
    assert!(
        bad.is_empty(),
        "{name}: {} of {} elements differ from round_bf16(f32 kernel), first {}: {:#06x} vs \
         {:#06x} (from {})",
        bad.len(),
        got.len() - off,
        bad[0],
        got[bad[0]],
        to16(want[bad[0]]),
        want[bad[0]]
    );
}

/// Bit-identical f32 results of the two instantiations.
fn same_f32(name: &str, a: &[f32], b: &[f32]) {
    let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(
        same,
        "{name}: f32 results of the bf16 and f32 kernels differ"
    );
}

/// A grid-stride grid: `units` work items on blocks of 256 (at most 2048 blocks), or the small
/// grid (3 blocks of 64) whose loop wraps across planes and channels.
fn grid_1d(units: usize, small: bool) -> ((u32, u32), u32) {
    if small {
        ((3, 1), 64)
    } else {
        ((units.div_ceil(256).clamp(1, 2048) as u32, 1), 256)
    }
}

#[test]
fn bf16_casts_and_add() {
    let Some(g) = gpu_or_skip("bf16_casts_and_add", FUNCS) else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // Special values, every exponent with tie / near-tie mantissas, random bit patterns.
    let mut bits: Vec<u32> = vec![
        0x0000_0000,
        0x8000_0000,
        0x0000_0001,
        0x0000_8000,
        0x0001_8000,
        0x007f_ffff,
        0x3f80_8000,
        0x3f81_8000,
        0xbf81_8000,
        0x7f7f_ffff,
        0x7f7f_8000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x7f80_0001,
        0xff80_0001,
        0x7fa1_2345,
        0xffff_ffff,
    ];
    for e in 0..=255u32 {
        for m in [0u32, 0x7fff, 0x8000, 0x8001, 0x1_8000, 0x7f_ffff] {
            bits.push((e << 23) | m);
            bits.push(0x8000_0000 | (e << 23) | m);
        }
    }
    bits.extend((0..100_000).map(|_| rng.gen::<u32>()));
    let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    let n = x.len();
    // Aligned (the 4-wide path) with a large and a small grid, and misaligned by one element.
    for (small, off) in [(false, 0usize), (true, 0), (false, 1)] {
        let (grid, block) = grid_1d(n - off, small);
        let nn = (n - off) as i64;
        let (dx, dy, dw) = (g.up(&x), g.nan16(n), g.nan32(n));
        let (px, py, pw) = (g.at(&dx, off), g.at(&dy, off), g.at(&dw, off));
        launch!(g, "cast_f32_bf16", grid, block; px, py, nn);
        launch!(g, "cast_bf16_f32", grid, block; py, pw, nn);
        let (y, w) = (g.down(&dy), g.down(&dw));
        assert!(
            y[..off].iter().all(|&b| b == NAN16),
            "cast wrote before the start"
        );
        for i in off..n {
            let want = round_bf16(x[i]).to_bits();
            assert_eq!(
                (y[i] as u32) << 16,
                want,
                "cast_f32_bf16({:#010x})",
                bits[i]
            );
            assert_eq!(w[i].to_bits(), want, "cast_bf16_f32 of {:#010x}", bits[i]);
        }
    }
    // add_bf16 == round_bf16(add_f32 on the widened inputs), also in place (y = a); buffers
    // `off` elements into their allocation (0: the 4-wide path and its tail; 1: misaligned).
    for &(n, off) in &[
        (1usize, 0usize),
        (1001, 0),
        (1001, 1),
        (300_007, 0),
        (300_007, 1),
    ] {
        let a: Vec<u16> = randn(n + off, &mut rng, 3.0, 0.0)
            .into_iter()
            .map(to16)
            .collect();
        let b: Vec<u16> = randn(n + off, &mut rng, 3.0, 0.0)
            .into_iter()
            .map(to16)
            .collect();
        let (aw, bw) = (widen(&a), widen(&b));
        let (grid, block) = grid_1d(n, n == 1001);
        let nn = n as i64;
        let (da, db, dy) = (g.up(&a), g.up(&b), g.nan16(n + off));
        let (daw, dbw, dyw) = (g.up(&aw), g.up(&bw), g.nan32(n + off));
        let (pa, pb, py) = (g.at(&da, off), g.at(&db, off), g.at(&dy, off));
        let (paw, pbw, pyw) = (g.at(&daw, off), g.at(&dbw, off), g.at(&dyw, off));
        launch!(g, "add_f32", grid, block; paw, pbw, pyw, nn);
        launch!(g, "add_bf16", grid, block; pa, pb, py, nn);
        launch!(g, "add_bf16", grid, block; pa, pb, pa, nn);
        let (y, y32, inplace) = (g.down(&dy), g.down(&dyw), g.down(&da));
        bits_eq(&format!("add_bf16 n={n} off={off}"), &y, &y32, off);
        assert_eq!(
            inplace[off..],
            y[off..],
            "add_bf16 in place n={n} off={off}"
        );
        let want: Vec<f64> = aw[off..]
            .iter()
            .zip(&bw[off..])
            .map(|(&p, &q)| p as f64 + q as f64)
            .collect();
        close(
            &format!("add_bf16 n={n} off={off} vs f64"),
            &widen(&y[off..]),
            &want,
            5e-3,
        );
    }
}

/// Per-channel f64 mean and 1/sqrt(var + eps) of x (n, c, hw).
fn stats64(x: &[f32], n: usize, c: usize, hw: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let m = (n * hw) as f64;
    let (mut mu, mut is) = (vec![0.0; c], vec![0.0; c]);
    for ci in 0..c {
        let vals = (0..n).flat_map(|a| (0..hw).map(move |h| (a * c + ci) * hw + h));
        let s: f64 = vals.clone().map(|i| x[i] as f64).sum();
        mu[ci] = s / m;
        let s2: f64 = vals.map(|i| (x[i] as f64 - mu[ci]).powi(2)).sum();
        is[ci] = 1.0 / (s2 / m + eps).sqrt();
    }
    (mu, is)
}

/// Slices per channel and threads per block of the (C, S) reductions, as the launchers pick
/// them (a few thousand elements per block, at most 256 threads).
fn reduce_cfg(m: usize) -> (u32, u32) {
    let s = m.div_ceil(4096).clamp(1, 64);
    let threads = (m.div_ceil(s).div_ceil(32) * 32).clamp(32, 256);
    (s as u32, threads as u32)
}

/// Training-mode batch norm forward + backward and the eval-mode dx, bf16 next to f32.
fn bn_case(g: &Gpu, rng: &mut ChaCha8Rng, n: usize, c: usize, hw: usize, off: usize, small: bool) {
    let tag = format!("bn (n={n}, c={c}, hw={hw}) off={off} small={small}");
    let (tot, all) = (n * c * hw, n * c * hw + off);
    let xb: Vec<u16> = randn(all, rng, 2.0, 0.5).into_iter().map(to16).collect();
    let dyb: Vec<u16> = randn(all, rng, 1.0, 0.0).into_iter().map(to16).collect();
    let (xw, dyw) = (widen(&xb), widen(&dyb));
    let (gamma, beta) = (randn(c, rng, 1.0, 0.0), randn(c, rng, 1.0, 0.0));
    let (s, rthreads) = reduce_cfg(n * hw);
    let (ew_grid, ew_block) = grid_1d(if hw.is_multiple_of(4) { tot / 4 } else { tot }, small);
    let (nn, cc, hh, ss, eps) = (n as i64, c as i32, hw as i64, s as i32, 1e-5f32);
    let (dgm, dbt) = (g.up(&gamma), g.up(&beta));
    let (pgm, pbt) = (g.at(&dgm, 0), g.at(&dbt, 0));
    // Runs the pipeline on x, dy of one storage type; returns the device buffers.
    struct Out {
        ps: CudaSlice<f32>,
        pq: CudaSlice<f32>,
        stats: CudaSlice<f32>,
        pg: CudaSlice<f32>,
        pb: CudaSlice<f32>,
        dgdb: CudaSlice<f32>,
    }
    let run = |sfx: &str, px: u64, pdy: u64, py: u64, pdx: u64, pedx: u64| -> Out {
        let k = |base: &str| format!("{base}_{sfx}");
        let cs = c * s as usize;
        let o = Out {
            ps: g.nan32(cs),
            pq: g.nan32(cs),
            stats: g.nan32(3 * c),
            pg: g.nan32(cs),
            pb: g.nan32(cs),
            dgdb: g.nan32(2 * c),
        };
        let (pps, ppq, ppg, ppb) = (
            g.at(&o.ps, 0),
            g.at(&o.pq, 0),
            g.at(&o.pg, 0),
            g.at(&o.pb, 0),
        );
        let (pm, pi, pv) = (g.at(&o.stats, 0), g.at(&o.stats, c), g.at(&o.stats, 2 * c));
        let (pdg, pdb) = (g.at(&o.dgdb, 0), g.at(&o.dgdb, c));
        let rgrid = (c as u32, s);
        launch!(g, k("bn_sum_partial"), rgrid, rthreads; px, pps, nn, cc, hh);
        launch!(g, k("bn_sqdev_partial"), rgrid, rthreads; px, pps, ppq, nn, cc, hh);
        launch!(g, "bn_stats_finalize_f32", (c as u32, 1), 64; pps, ppq, pm, pi, pv, nn, hh, ss, eps);
        launch!(g, k("bn_forward"), ew_grid, ew_block; px, pm, pi, pgm, pbt, py, nn, cc, hh);
        launch!(g, k("bn_backward_partial"), rgrid, rthreads; pdy, px, pm, pi, ppg, ppb, nn, cc, hh);
        launch!(g, "bn_backward_finalize_f32", (c as u32, 1), 64; ppg, ppb, pdg, pdb, ss);
        launch!(g, k("bn_backward_dx"), ew_grid, ew_block; pdy, px, pm, pi, pgm, pdg, pdb, pdx, nn, cc, hh);
        launch!(g, k("bn_eval_backward_dx"), ew_grid, ew_block; pdy, pi, pgm, pedx, nn, cc, hh);
        o
    };
    let (dx32, ddy32, dy32, ddx32, dedx32) = (
        g.up(&xw),
        g.up(&dyw),
        g.nan32(all),
        g.nan32(all),
        g.nan32(all),
    );
    let o32 = run(
        "f32",
        g.at(&dx32, off),
        g.at(&ddy32, off),
        g.at(&dy32, off),
        g.at(&ddx32, off),
        g.at(&dedx32, off),
    );
    let (dx16, ddy16, dy16, ddx16, dedx16) = (
        g.up(&xb),
        g.up(&dyb),
        g.nan16(all),
        g.nan16(all),
        g.nan16(all),
    );
    let o16 = run(
        "bf16",
        g.at(&dx16, off),
        g.at(&ddy16, off),
        g.at(&dy16, off),
        g.at(&ddx16, off),
        g.at(&dedx16, off),
    );
    for (what, a, b) in [
        ("part_sum", &o16.ps, &o32.ps),
        ("part_sq", &o16.pq, &o32.pq),
        ("mean/invstd/var", &o16.stats, &o32.stats),
        ("part_g", &o16.pg, &o32.pg),
        ("part_b", &o16.pb, &o32.pb),
        ("dgamma/dbeta", &o16.dgdb, &o32.dgdb),
    ] {
        same_f32(&format!("{tag} {what}"), &g.down(a), &g.down(b));
    }
    let (y16, y32) = (g.down(&dy16), g.down(&dy32));
    let (dxo16, dxo32) = (g.down(&ddx16), g.down(&ddx32));
    bits_eq(&format!("{tag} y"), &y16, &y32, off);
    bits_eq(&format!("{tag} dx"), &dxo16, &dxo32, off);
    bits_eq(
        &format!("{tag} eval dx"),
        &g.down(&dedx16),
        &g.down(&dedx32),
        off,
    );
    // f64: y and the training dx from the widened inputs.
    let (x, dy) = (&xw[off..], &dyw[off..]);
    let (mu, is) = stats64(x, n, c, hw, eps as f64);
    let m = (n * hw) as f64;
    let (mut ry, mut rdx) = (vec![0.0; tot], vec![0.0; tot]);
    let (mut sdb, mut sdg) = (vec![0.0f64; c], vec![0.0f64; c]);
    for i in 0..tot {
        let ci = (i / hw) % c;
        let xh = (x[i] as f64 - mu[ci]) * is[ci];
        ry[i] = xh * gamma[ci] as f64 + beta[ci] as f64;
        sdb[ci] += dy[i] as f64;
        sdg[ci] += dy[i] as f64 * xh;
    }
    for i in 0..tot {
        let ci = (i / hw) % c;
        let xh = (x[i] as f64 - mu[ci]) * is[ci];
        rdx[i] = gamma[ci] as f64 * is[ci] / m * (m * dy[i] as f64 - sdb[ci] - xh * sdg[ci]);
    }
    close(&format!("{tag} y vs f64"), &widen(&y16[off..]), &ry, 5e-3);
    close(
        &format!("{tag} dx vs f64"),
        &widen(&dxo16[off..]),
        &rdx,
        5e-3,
    );
}

#[test]
fn bf16_batch_norm() {
    let Some(g) = gpu_or_skip("bf16_batch_norm", FUNCS) else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for &(n, c, hw, off, small) in &[
        (8usize, 64usize, 3136usize, 0usize, false), // a 56x56 stage, 4-wide
        (8, 64, 3136, 4, false),                     // 8-byte (bf16-only) alignment
        (8, 64, 3136, 1, false),                     // 2-byte misaligned: scalar
        (5, 7, 49, 0, true),                         // 7x7, odd: scalar, wrapping grid
        (3, 5, 12, 2, true),                         // 4-byte misaligned
        (16, 33, 1, 0, false),                       // (N, C) after a linear layer
        (2, 3, 13, 0, false),
    ] {
        bn_case(&g, &mut rng, n, c, hw, off, small);
    }
}

/// The fused BN + ReLU (+ residual) passes, bf16 next to f32; the f32 backward reads the
/// widened bf16 output y (the mask both instantiations see).
#[allow(clippy::too_many_arguments)]
fn bn_act_case(
    g: &Gpu,
    rng: &mut ChaCha8Rng,
    n: usize,
    c: usize,
    hw: usize,
    off: usize,
    small: bool,
    train: bool,
    resid: bool,
) {
    let tag = format!(
        "bn_act (n={n}, c={c}, hw={hw}) off={off} small={small} train={train} resid={resid}"
    );
    let (tot, all) = (n * c * hw, n * c * hw + off);
    let xb: Vec<u16> = randn(all, rng, 2.0, 0.5).into_iter().map(to16).collect();
    let dyb: Vec<u16> = randn(all, rng, 1.0, 0.0).into_iter().map(to16).collect();
    let rb: Vec<u16> = randn(all, rng, 1.0, 0.0).into_iter().map(to16).collect();
    let (xw, dyw, rw) = (widen(&xb), widen(&dyb), widen(&rb));
    let (gamma, beta) = (randn(c, rng, 1.0, 0.0), randn(c, rng, 1.0, 0.0));
    let (mu, is) = stats64(&xw[off..], n, c, hw, 1e-5);
    let mean: Vec<f32> = mu.iter().map(|&v| v as f32).collect();
    let invstd: Vec<f32> = is.iter().map(|&v| v as f32).collect();
    let (s, rthreads) = reduce_cfg(n * hw);
    let (ew_grid, ew_block) = grid_1d(if hw.is_multiple_of(4) { tot / 4 } else { tot }, small);
    let (nn, cc, hh, ss, tr) = (n as i64, c as i32, hw as i64, s as i32, train as i32);
    let (dgm, dbt, dm, di) = (g.up(&gamma), g.up(&beta), g.up(&mean), g.up(&invstd));
    let (pgm, pbt, pm, pi) = (g.at(&dgm, 0), g.at(&dbt, 0), g.at(&dm, 0), g.at(&di, 0));
    let null = 0u64;
    let cs = c * s as usize;
    let rgrid = (c as u32, s);
    // forward
    let (dx32, dr32, dy32) = (g.up(&xw), g.up(&rw), g.nan32(all));
    let (dx16, dr16, dy16) = (g.up(&xb), g.up(&rb), g.nan16(all));
    let (px32, py32, px16, py16) = (
        g.at(&dx32, off),
        g.at(&dy32, off),
        g.at(&dx16, off),
        g.at(&dy16, off),
    );
    let (pr32, pr16) = if resid {
        (g.at(&dr32, off), g.at(&dr16, off))
    } else {
        (null, null)
    };
    launch!(g, "bn_act_forward_f32", ew_grid, ew_block; px32, pr32, pm, pi, pgm, pbt, py32, nn, cc, hh);
    launch!(g, "bn_act_forward_bf16", ew_grid, ew_block; px16, pr16, pm, pi, pgm, pbt, py16, nn, cc, hh);
    let (y16, y32) = (g.down(&dy16), g.down(&dy32));
    bits_eq(&format!("{tag} y"), &y16, &y32, off);
    // backward partials (+ dresidual), finalize, dx
    let yw = widen(&y16);
    let (dyw32, dgrad32, dgrad16) = (g.up(&yw), g.up(&dyw), g.up(&dyb));
    let (pyw32, pg32, pg16) = (g.at(&dyw32, off), g.at(&dgrad32, off), g.at(&dgrad16, off));
    let (dm32, dm16) = (g.nan32(all), g.nan16(all));
    let (pdm32, pdm16) = if resid {
        (g.at(&dm32, off), g.at(&dm16, off))
    } else {
        (null, null)
    };
    let (part32, part16) = (g.nan32(2 * cs), g.nan32(2 * cs));
    let (pp32g, pp32b, pp16g, pp16b) = (
        g.at(&part32, 0),
        g.at(&part32, cs),
        g.at(&part16, 0),
        g.at(&part16, cs),
    );
    let (dgdb32, dgdb16) = (g.nan32(2 * c), g.nan32(2 * c));
    let (pdg32, pdb32, pdg16, pdb16) = (
        g.at(&dgdb32, 0),
        g.at(&dgdb32, c),
        g.at(&dgdb16, 0),
        g.at(&dgdb16, c),
    );
    launch!(g, "bn_act_backward_partial_f32", rgrid, rthreads; pg32, pyw32, px32, pm, pi, pp32g, pp32b, pdm32, nn, cc, hh);
    launch!(g, "bn_act_backward_partial_bf16", rgrid, rthreads; pg16, py16, px16, pm, pi, pp16g, pp16b, pdm16, nn, cc, hh);
    launch!(g, "bn_backward_finalize_f32", (c as u32, 1), 64; pp32g, pp32b, pdg32, pdb32, ss);
    launch!(g, "bn_backward_finalize_f32", (c as u32, 1), 64; pp16g, pp16b, pdg16, pdb16, ss);
    // With a residual the dx pass reads the masked dresidual (y = null), else dy and y.
    let (pd32, pm32, pd16, pm16) = if resid {
        (pdm32, null, pdm16, null)
    } else {
        (pg32, pyw32, pg16, py16)
    };
    let (ddx32, ddx16) = (g.nan32(all), g.nan16(all));
    let (pdx32, pdx16) = (g.at(&ddx32, off), g.at(&ddx16, off));
    launch!(g, "bn_act_backward_dx_f32", ew_grid, ew_block; pd32, pm32, px32, pm, pi, pgm, pdg32, pdb32, pdx32, nn, cc, hh, tr);
    launch!(g, "bn_act_backward_dx_bf16", ew_grid, ew_block; pd16, pm16, px16, pm, pi, pgm, pdg16, pdb16, pdx16, nn, cc, hh, tr);
    same_f32(
        &format!("{tag} part_g/part_b"),
        &g.down(&part16),
        &g.down(&part32),
    );
    same_f32(
        &format!("{tag} dgamma/dbeta"),
        &g.down(&dgdb16),
        &g.down(&dgdb32),
    );
    if resid {
        bits_eq(
            &format!("{tag} dresidual"),
            &g.down(&dm16),
            &g.down(&dm32),
            off,
        );
    } else {
        assert!(
            g.down(&dm16).iter().all(|&b| b == NAN16),
            "{tag}: wrote a null dresidual"
        );
    }
    bits_eq(&format!("{tag} dx"), &g.down(&ddx16), &g.down(&ddx32), off);
    // f64: the forward output, and a ReLU that cuts some but not all.
    let (x, r) = (&xw[off..], &rw[off..]);
    let ry: Vec<f64> = (0..tot)
        .map(|i| {
            let ci = (i / hw) % c;
            let t = (x[i] as f64 - mean[ci] as f64) * is[ci] * gamma[ci] as f64
                + beta[ci] as f64
                + if resid { r[i] as f64 } else { 0.0 };
            t.max(0.0)
        })
        .collect();
    close(&format!("{tag} y vs f64"), &yw[off..], &ry, 5e-3);
    let zeros = yw[off..].iter().filter(|&&v| v == 0.0).count();
    assert!(
        zeros > 0 && zeros < tot,
        "{tag}: the ReLU cut {zeros} of {tot}"
    );
}

#[test]
fn bf16_bn_act() {
    let Some(g) = gpu_or_skip("bf16_bn_act", FUNCS) else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for train in [true, false] {
        for resid in [false, true] {
            for &(n, c, hw, off, small) in &[
                (8usize, 64usize, 3136usize, 0usize, false),
                (8, 64, 3136, 4, false),
                (4, 32, 784, 1, false),
                (5, 7, 49, 0, true),
                (3, 5, 12, 2, true),
                (16, 33, 1, 0, false),
            ] {
                bn_act_case(&g, &mut rng, n, c, hw, off, small, train, resid);
            }
        }
    }
}

#[test]
fn bf16_pooling() {
    let Some(g) = gpu_or_skip("bf16_pooling", FUNCS) else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    // (n, c, h, w, k, stride, pad, off): the ResNet stem's 3x3/2 pad 1 on 112x112, odd sizes,
    // windows that overlap (stride < k) and that do not.
    for &(n, c, h, w, k, st, p, off) in &[
        (2usize, 64usize, 112i32, 112i32, 3i32, 2i32, 1i32, 0usize),
        (3, 5, 11, 9, 3, 2, 1, 1),
        (2, 3, 8, 7, 2, 2, 0, 3),
        (1, 4, 7, 7, 3, 1, 1, 2),
    ] {
        let tag = format!("pool ({n},{c},{h},{w}) k={k} s={st} p={p} off={off}");
        let (ho, wo) = ((h + 2 * p - k) / st + 1, (w + 2 * p - k) / st + 1);
        let nc = n * c;
        let (len, ol) = (nc * (h * w) as usize, nc * (ho * wo) as usize);
        // Coarse values: many ties inside windows (the first maximum wins).
        let xb: Vec<u16> = (0..len + off)
            .map(|_| to16(rng.gen_range(0..23) as f32 * 0.37 - 3.0))
            .collect();
        let dyb: Vec<u16> = randn(ol + off, &mut rng, 1.0, 0.0)
            .into_iter()
            .map(to16)
            .collect();
        let (xw, dyw) = (widen(&xb), widen(&dyb));
        let (dx32, dx16, ddy32, ddy16) = (g.up(&xw), g.up(&xb), g.up(&dyw), g.up(&dyb));
        let (dy32, dy16) = (g.nan32(ol + off), g.nan16(ol + off));
        let (a32, a16) = (g.up(&vec![-7i32; ol]), g.up(&vec![-7i32; ol]));
        let (dgx32, dgx16) = (g.nan32(len + off), g.nan16(len + off));
        let (px32, px16, pd32, pd16) = (
            g.at(&dx32, off),
            g.at(&dx16, off),
            g.at(&ddy32, off),
            g.at(&ddy16, off),
        );
        let (py32, py16, pa32, pa16) = (
            g.at(&dy32, off),
            g.at(&dy16, off),
            g.at(&a32, 0),
            g.at(&a16, 0),
        );
        let (pgx32, pgx16) = (g.at(&dgx32, off), g.at(&dgx16, off));
        let nci = nc as i64;
        let (fg, fb) = grid_1d(ol, false);
        let (bg, bb) = grid_1d(len, false);
        launch!(g, "maxpool2d_fwd_f32", fg, fb; px32, py32, pa32, nci, h, w, ho, wo, k, st, p);
        launch!(g, "maxpool2d_fwd_bf16", fg, fb; px16, py16, pa16, nci, h, w, ho, wo, k, st, p);
        launch!(g, "maxpool2d_bwd_f32", bg, bb; pd32, pa32, pgx32, nci, h, w, ho, wo, k, st, p);
        launch!(g, "maxpool2d_bwd_bf16", bg, bb; pd16, pa16, pgx16, nci, h, w, ho, wo, k, st, p);
        let (arg16, arg32) = (g.down(&a16), g.down(&a32));
        assert_eq!(arg16, arg32, "{tag}: argmax differs from the f32 kernel's");
        let y16 = g.down(&dy16);
        bits_eq(&format!("{tag} max y"), &y16, &g.down(&dy32), off);
        bits_eq(
            &format!("{tag} max dx"),
            &g.down(&dgx16),
            &g.down(&dgx32),
            off,
        );
        // f64: the argmax (first maximum of the window) and the selected value, exactly.
        let plane = (h * w) as usize;
        for q in 0..nc {
            for oh in 0..ho {
                for ow in 0..wo {
                    let (mut best, mut bi) = (f32::NEG_INFINITY, -1i32);
                    for a in 0..k {
                        for b in 0..k {
                            let (hh, ww) = (oh * st - p + a, ow * st - p + b);
                            if hh < 0 || ww < 0 || hh >= h || ww >= w {
                                continue;
                            }
                            let v = xw[off + q * plane + (hh * w + ww) as usize];
                            if bi < 0 || v > best {
                                (best, bi) = (v, hh * w + ww);
                            }
                        }
                    }
                    let o = (q * ho as usize + oh as usize) * wo as usize + ow as usize;
                    assert_eq!(arg16[o], bi, "{tag}: argmax of output {o}");
                    assert_eq!(wide(y16[off + o]), best, "{tag}: max of output {o}");
                }
            }
        }
        // Global average pool over the (n * c, h * w) planes.
        let hw = (h * w) as i64;
        let gxb: Vec<u16> = randn(len + off, &mut rng, 1.0, 0.3)
            .into_iter()
            .map(to16)
            .collect();
        let gdb: Vec<u16> = randn(nc + off, &mut rng, 1.0, 0.0)
            .into_iter()
            .map(to16)
            .collect();
        let (gxw, gdw) = (widen(&gxb), widen(&gdb));
        let (gx32, gx16, gd32, gd16) = (g.up(&gxw), g.up(&gxb), g.up(&gdw), g.up(&gdb));
        let (gy32, gy16, gdx32, gdx16) = (
            g.nan32(nc + off),
            g.nan16(nc + off),
            g.nan32(len + off),
            g.nan16(len + off),
        );
        let (q1, q2, q3, q4) = (
            g.at(&gx32, off),
            g.at(&gx16, off),
            g.at(&gd32, off),
            g.at(&gd16, off),
        );
        let (q5, q6, q7, q8) = (
            g.at(&gy32, off),
            g.at(&gy16, off),
            g.at(&gdx32, off),
            g.at(&gdx16, off),
        );
        let (ag, ab) = grid_1d(nc * 32, false);
        launch!(g, "global_avgpool_fwd_f32", ag, ab; q1, q5, nci, hw);
        launch!(g, "global_avgpool_fwd_bf16", ag, ab; q2, q6, nci, hw);
        launch!(g, "global_avgpool_bwd_f32", bg, bb; q3, q7, nci, hw);
        launch!(g, "global_avgpool_bwd_bf16", bg, bb; q4, q8, nci, hw);
        let gy16 = g.down(&gy16);
        bits_eq(&format!("{tag} gap y"), &gy16, &g.down(&gy32), off);
        bits_eq(
            &format!("{tag} gap dx"),
            &g.down(&gdx16),
            &g.down(&gdx32),
            off,
        );
        let rgy: Vec<f64> = (0..nc)
            .map(|q| {
                let s: f64 = (0..plane).map(|j| gxw[off + q * plane + j] as f64).sum();
                s / plane as f64
            })
            .collect();
        close(
            &format!("{tag} gap y vs f64"),
            &widen(&gy16[off..]),
            &rgy,
            5e-3,
        );
    }
}
