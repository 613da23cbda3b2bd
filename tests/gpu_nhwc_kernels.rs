//! The channels-last (NHWC) kernels (`*_nhwc_*` in kernels/batchnorm.cu, bn_fused.cu, pool.cu;
//! the layout conversions of kernels/elementwise.cu) on a real GPU, launched directly from the
//! embedded PTX with the launch geometry each kernel's comment states (independent of the host
//! launchers): every NHWC kernel runs next to its NCHW twin on the same values (the NHWC buffer is
//! the NCHW one transposed per image on the host), for f32 and bf16 storage.
//! - Per-channel reductions: NHWC partials on a (ceil(C / 32), S) grid of (32, 8) blocks against
//!   the NCHW kernels' (C, S) partials (same slices, other summation order: 1e-5 of the largest
//!   value; the emulator checks 1e-6 on small shapes, these are ResNet50-sized), finalized by the
//!   same finalize kernels, and against f64 (1e-4); bf16 partials equal the f32 instantiation's
//!   on the widened values bit for bit; dmasked equals the NCHW kernel's, transposed, bit for bit.
//! - Elementwise BN kernels launched as (N = R, C, HW = 1) on NHWC data: bit for bit the NCHW
//!   launch on buffers one element off alignment (which takes the same one-element code path).
//! - Max pool (forward, argmax, backward) and global average pool backward: bit for bit; global
//!   average pool forward: 1e-6 * sqrt(HW) (f32; summation order) and round_bf16 of the f32
//!   NHWC kernel.
//! - Conversions: bit for bit against a host transposition and carp::tensor::round_bf16.
//!
//! Outputs start as NaN (0x7fc0 for bf16): an unwritten element fails. The same checks run on
//! the kernel emulator in CI (tests/gpu_sim/sim_test.cpp, test_nhwc_all).
//!
//! Without a GPU (or driver) each test prints "SKIPPED: <reason>" to stderr and returns.
#![cfg(feature = "cuda")]

mod ptx_harness;
use ptx_harness::{close, gpu_or_skip, randn, Gpu};

use carp::tensor::round_bf16;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The kernel families these tests launch, by module; each base name is loaded as `_f32` and
/// `_bf16` unless it is listed whole (the conversions and the f32-only finalize kernels).
const FUNCS: &[(&str, &[&str])] = &[
    (
        "elementwise",
        &[
            "nchw_to_nhwc_f32_bf16",
            "nchw_to_nhwc_bf16_bf16",
            "nhwc_to_nchw_bf16_f32",
            "nhwc_to_nchw_bf16_bf16",
        ],
    ),
    (
        "batchnorm",
        &[
            "bn_stats_finalize_f32",
            "bn_backward_finalize_f32",
            "bn_sum_partial_*",
            "bn_sqdev_partial_*",
            "bn_backward_partial_*",
            "bn_sum_partial_nhwc_*",
            "bn_sqdev_partial_nhwc_*",
            "bn_backward_partial_nhwc_*",
            "bn_forward_*",
            "bn_backward_dx_*",
            "bn_eval_backward_dx_*",
        ],
    ),
    (
        "bn_fused",
        &[
            "bn_act_backward_partial_*",
            "bn_act_backward_partial_nhwc_*",
            "bn_act_forward_*",
            "bn_act_backward_dx_*",
        ],
    ),
    (
        "pool",
        &[
            "maxpool2d_fwd_*",
            "maxpool2d_bwd_*",
            "global_avgpool_fwd_*",
            "global_avgpool_bwd_*",
            "maxpool2d_fwd_nhwc_*",
            "maxpool2d_bwd_nhwc_*",
            "global_avgpool_fwd_nhwc_*",
            "global_avgpool_bwd_nhwc_*",
        ],
    ),
];

/// Launches kernel `$name` (a &str) on a `$grid` of `$block` threads, both (x, y, z). The
/// arguments must be plain variables (the launch builder keeps references to them).
macro_rules! launch {
    ($g:expr, $name:expr, $grid:expr, $block:expr; $($arg:ident),* $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let name: &str = $name;
        let f = $g.funcs.get(name).unwrap_or_else(|| panic!("{name} not loaded"));
        let mut b = $g.stream.launch_builder(f);
        $( b.arg(&$arg); )*
        let cfg = LaunchConfig {
            grid_dim: $grid,
            block_dim: $block,
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument lists below follow the kernels' signatures in kernels/*.cu, every
        // pointer addresses a live buffer of this test sized for the kernel's index range, and
        // the grid / block are the geometry the kernel's comment requires.
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| panic!("launching {name}: {e:?}"));
    }};
}

/// An activation storage type: f32, or bf16 held as its u16 bits.
trait Act: DeviceRepr + Copy + Default + std::fmt::Debug {
    const SUFFIX: &'static str;
    const NAN: Self;
    fn store(x: f32) -> Self;
    fn wide(self) -> f32;
    fn bits(self) -> u32;
}
impl Act for f32 {
    const SUFFIX: &'static str = "f32";
    const NAN: Self = f32::NAN;
    fn store(x: f32) -> Self {
        x
    }
    fn wide(self) -> f32 {
        self
    }
    fn bits(self) -> u32 {
        self.to_bits()
    }
}
impl Act for u16 {
    const SUFFIX: &'static str = "bf16";
    const NAN: Self = 0x7fc0;
    fn store(x: f32) -> Self {
        (round_bf16(x).to_bits() >> 16) as u16
    }
    fn wide(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
    fn bits(self) -> u32 {
        self as u32
    }
}

/// `base` with T's suffix.
fn k<T: Act>(base: &str) -> String {
    format!("{base}_{}", T::SUFFIX)
}

fn store<T: Act>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::store(x)).collect()
}

fn widen<T: Act>(v: &[T]) -> Vec<f32> {
    v.iter().map(|&x| x.wide()).collect()
}

/// (n, c, hw) NCHW -> (n, hw, c) NHWC.
fn to_nhwc<T: Copy + Default>(v: &[T], n: usize, c: usize, hw: usize) -> Vec<T> {
    let mut r = vec![T::default(); v.len()];
    for a in 0..n {
        for ci in 0..c {
            for h in 0..hw {
                r[(a * hw + h) * c + ci] = v[(a * c + ci) * hw + h];
            }
        }
    }
    r
}

/// (n, hw, c) NHWC -> (n, c, hw) NCHW.
fn to_nchw<T: Copy + Default>(v: &[T], n: usize, c: usize, hw: usize) -> Vec<T> {
    let mut r = vec![T::default(); v.len()];
    for a in 0..n {
        for ci in 0..c {
            for h in 0..hw {
                r[(a * c + ci) * hw + h] = v[(a * hw + h) * c + ci];
            }
        }
    }
    r
}

/// Bit-identical buffers.
fn same_bits<T: Act>(name: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].bits() != want[i].bits())
        .collect();
    assert!(
        bad.is_empty(),
        "{name}: {} of {} elements differ, first {}: {:?} vs {:?}",
        bad.len(),
        got.len(),
        bad[0],
        got[bad[0]],
        want[bad[0]]
    );
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The elementwise launch config: `units` work items on blocks of 256 (at most 2048 blocks).
fn grid_1d(units: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
    (
        (units.div_ceil(256).clamp(1, 2048) as u32, 1, 1),
        (256, 1, 1),
    )
}

/// The NHWC reductions' geometry: grid (ceil(C / 32), S, 1), block (32, 8, 1).
fn nhwc_grid(c: usize, s: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((c.div_ceil(32) as u32, s as u32, 1), (32, 8, 1))
}

/// The conversions' geometry: grid (ceil(HW / 32), ceil(C / 32), min(N, 65535)), block (32, 8, 1).
fn transpose_grid(n: usize, c: usize, hw: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
    (
        (
            hw.div_ceil(32) as u32,
            c.div_ceil(32) as u32,
            n.min(65535) as u32,
        ),
        (32, 8, 1),
    )
}

/// NHWC statistics, BN backward and fused BN + ReLU backward partials of one storage type
/// against the NCHW kernels and f64. S slices per channel for both layouts.
fn bn_reduce_case<T: Act>(g: &Gpu, rng: &mut ChaCha8Rng, n: usize, c: usize, hw: usize, s: usize) {
    let tag = format!("{} (n={n}, c={c}, hw={hw}) S={s}", T::SUFFIX);
    let (r, tot, cs) = (n * hw, n * c * hw, c * s);
    let x: Vec<T> = store(&randn(tot, rng, 2.0, 0.5));
    let dy: Vec<T> = store(&randn(tot, rng, 1.0, 0.0));
    let y: Vec<T> = store(
        &randn(tot, rng, 1.0, 0.0)
            .into_iter()
            .map(|v| v.max(0.0))
            .collect::<Vec<_>>(),
    );
    let (xn, dyn_, yn) = (
        to_nhwc(&x, n, c, hw),
        to_nhwc(&dy, n, c, hw),
        to_nhwc(&y, n, c, hw),
    );
    let (dx, ddy, dyv) = (g.up(&x), g.up(&dy), g.up(&y));
    let (dxn, ddyn, dyvn) = (g.up(&xn), g.up(&dyn_), g.up(&yn));
    let (px, pdy, py) = (g.at(&dx, 0), g.at(&ddy, 0), g.at(&dyv, 0));
    let (pxn, pdyn, pyn) = (g.at(&dxn, 0), g.at(&ddyn, 0), g.at(&dyvn, 0));
    let (nn, cc, hh, rr, ss, one, eps) = (
        n as i64, c as i32, hw as i64, r as i64, s as i32, 1i64, 1e-5f32,
    );
    let nchw = ((c as u32, s as u32, 1), (256, 1, 1));
    let (ng, nb) = nhwc_grid(c, s);
    let fin = ((c as u32, 1, 1), (256, 1, 1));
    // statistics, both layouts
    let bufs = |m: usize| (0..m).map(|_| g.nan32(cs)).collect::<Vec<_>>();
    let p = bufs(12);
    let pp: Vec<u64> = p.iter().map(|b| g.at(b, 0)).collect();
    let (ps, pq, ps2, pq2) = (pp[0], pp[1], pp[2], pp[3]);
    let st = [
        g.nan32(c),
        g.nan32(c),
        g.nan32(c),
        g.nan32(c),
        g.nan32(c),
        g.nan32(c),
    ];
    let sp: Vec<u64> = st.iter().map(|b| g.at(b, 0)).collect();
    let (mean, is, vu, mean2, is2, vu2) = (sp[0], sp[1], sp[2], sp[3], sp[4], sp[5]);
    launch!(g, &k::<T>("bn_sum_partial"), nchw.0, nchw.1; px, ps, nn, cc, hh);
    launch!(g, &k::<T>("bn_sqdev_partial"), nchw.0, nchw.1; px, ps, pq, nn, cc, hh);
    launch!(g, "bn_stats_finalize_f32", fin.0, fin.1; ps, pq, mean, is, vu, nn, hh, ss, eps);
    launch!(g, &k::<T>("bn_sum_partial_nhwc"), ng, nb; pxn, ps2, rr, cc);
    launch!(g, &k::<T>("bn_sqdev_partial_nhwc"), ng, nb; pxn, ps2, pq2, rr, cc);
    launch!(g, "bn_stats_finalize_f32", fin.0, fin.1; ps2, pq2, mean2, is2, vu2, rr, one, ss, eps);
    let d = |b: &CudaSlice<f32>| g.down(b);
    for (i, what) in ["part_sum", "part_sq"].iter().enumerate() {
        close(
            &format!("{tag}: {what} vs NCHW"),
            &d(&p[i + 2]),
            &f64s(&d(&p[i])),
            1e-5,
        );
    }
    for (i, what) in ["mean", "invstd", "var_unbiased"].iter().enumerate() {
        close(
            &format!("{tag}: {what} vs NCHW"),
            &d(&st[i + 3]),
            &f64s(&d(&st[i])),
            1e-5,
        );
    }
    // f64 statistics on the widened NCHW values
    let xw = widen(&x);
    let m = r as f64;
    let (mut rm, mut ris) = (vec![0.0f64; c], vec![0.0f64; c]);
    for ci in 0..c {
        let idx = (0..n).flat_map(|a| (0..hw).map(move |h| (a * c + ci) * hw + h));
        rm[ci] = idx.clone().map(|i| xw[i] as f64).sum::<f64>() / m;
        let s2: f64 = idx.map(|i| (xw[i] as f64 - rm[ci]).powi(2)).sum();
        ris[ci] = 1.0 / (s2 / m + eps as f64).sqrt();
    }
    close(&format!("{tag}: mean vs f64"), &d(&st[3]), &rm, 1e-4);
    close(&format!("{tag}: invstd vs f64"), &d(&st[4]), &ris, 1e-4);
    // backward partials on the NCHW statistics, both layouts; the fused ones with dmasked
    let (pg, pb, pg2, pb2) = (pp[4], pp[5], pp[6], pp[7]);
    let (ag, ab, ag2, ab2) = (pp[8], pp[9], pp[10], pp[11]);
    let (dm, dmn) = (g.up(&vec![T::NAN; tot]), g.up(&vec![T::NAN; tot]));
    let (pdm, pdmn) = (g.at(&dm, 0), g.at(&dmn, 0));
    launch!(g, &k::<T>("bn_backward_partial"), nchw.0, nchw.1; pdy, px, mean, is, pg, pb, nn, cc, hh);
    launch!(g, &k::<T>("bn_backward_partial_nhwc"), ng, nb; pdyn, pxn, mean, is, pg2, pb2, rr, cc);
    launch!(g, &k::<T>("bn_act_backward_partial"), nchw.0, nchw.1; pdy, py, px, mean, is, ag, ab, pdm, nn, cc, hh);
    launch!(g, &k::<T>("bn_act_backward_partial_nhwc"), ng, nb; pdyn, pyn, pxn, mean, is, ag2, ab2, pdmn, rr, cc);
    for (i, what) in ["part_g", "part_b", "", "", "act part_g", "act part_b"]
        .iter()
        .enumerate()
    {
        if !what.is_empty() {
            close(
                &format!("{tag}: {what} vs NCHW"),
                &d(&p[6 + i]),
                &f64s(&d(&p[4 + i])),
                1e-5,
            );
        }
    }
    same_bits(
        &format!("{tag}: dmasked == NCHW's, transposed"),
        &to_nchw(&g.down(&dmn), n, c, hw),
        &g.down(&dm),
    );
    // dmasked null: the same partials
    let (ag3, ab3) = (g.nan32(cs), g.nan32(cs));
    let (pag3, pab3, null) = (g.at(&ag3, 0), g.at(&ab3, 0), 0u64);
    launch!(g, &k::<T>("bn_act_backward_partial_nhwc"), ng, nb; pdyn, pyn, pxn, mean, is, pag3, pab3, null, rr, cc);
    same_bits(
        &format!("{tag}: act part_g, dmasked null"),
        &d(&ag3),
        &d(&p[10]),
    );
    same_bits(
        &format!("{tag}: act part_b, dmasked null"),
        &d(&ab3),
        &d(&p[11]),
    );
    // finalized parameter gradients against f64
    let dgdb = [g.nan32(c), g.nan32(c), g.nan32(c), g.nan32(c)];
    let q: Vec<u64> = dgdb.iter().map(|b| g.at(b, 0)).collect();
    let (dg, db, adg, adb) = (q[0], q[1], q[2], q[3]);
    launch!(g, "bn_backward_finalize_f32", fin.0, fin.1; pg2, pb2, dg, db, ss);
    launch!(g, "bn_backward_finalize_f32", fin.0, fin.1; ag2, ab2, adg, adb, ss);
    let (meanv, isv) = (d(&st[0]), d(&st[1]));
    let (dyw, yw) = (widen(&dy), widen(&y));
    let mut want = vec![vec![0.0f64; c]; 4];
    for ci in 0..c {
        for a in 0..n {
            for h in 0..hw {
                let i = (a * c + ci) * hw + h;
                let xh = (xw[i] as f64 - meanv[ci] as f64) * isv[ci] as f64;
                let gm = if yw[i] > 0.0 { dyw[i] as f64 } else { 0.0 };
                want[0][ci] += dyw[i] as f64 * xh;
                want[1][ci] += dyw[i] as f64;
                want[2][ci] += gm * xh;
                want[3][ci] += gm;
            }
        }
    }
    for (i, what) in ["dgamma", "dbeta", "act dgamma", "act dbeta"]
        .iter()
        .enumerate()
    {
        close(
            &format!("{tag}: {what} vs f64"),
            &d(&dgdb[i]),
            &want[i],
            1e-4,
        );
    }
    if T::SUFFIX == "bf16" {
        // the f32 instantiation on the widened NHWC values: the same partials, bit for bit
        let (xw2, dyw2, yw2) = (g.up(&widen(&xn)), g.up(&widen(&dyn_)), g.up(&widen(&yn)));
        let (px32, pdy32, py32) = (g.at(&xw2, 0), g.at(&dyw2, 0), g.at(&yw2, 0));
        let f = bufs(6);
        let fp: Vec<u64> = f.iter().map(|b| g.at(b, 0)).collect();
        let (f1, f2, f3, f4, f5, f6) = (fp[0], fp[1], fp[2], fp[3], fp[4], fp[5]);
        launch!(g, "bn_sum_partial_nhwc_f32", ng, nb; px32, f1, rr, cc);
        launch!(g, "bn_sqdev_partial_nhwc_f32", ng, nb; px32, ps2, f2, rr, cc);
        launch!(g, "bn_backward_partial_nhwc_f32", ng, nb; pdy32, px32, mean, is, f3, f4, rr, cc);
        launch!(g, "bn_act_backward_partial_nhwc_f32", ng, nb; pdy32, py32, px32, mean, is, f5, f6, null, rr, cc);
        for (i, (what, j)) in [
            ("part_sum", 2usize),
            ("part_sq", 3),
            ("part_g", 6),
            ("part_b", 7),
            ("act part_g", 10),
            ("act part_b", 11),
        ]
        .iter()
        .enumerate()
        {
            same_bits(
                &format!("{tag}: {what} == f32 kernel's"),
                &d(&f[i]),
                &d(&p[*j]),
            );
        }
    }
}

#[test]
fn nhwc_batch_norm_reductions() {
    let Some(g) = gpu_or_skip("nhwc_batch_norm_reductions", FUNCS) else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // ResNet50-like (stem-sized channels on a 56x56 plane, 2048 channels of 7x7, an (N, C)
    // tensor after a linear layer) and odd shapes (C = 3, 100; R odd; empty trailing slices).
    let shapes = [
        (8usize, 64usize, 56 * 56usize, 49usize),
        (16, 2048, 49, 7),
        (64, 512, 1, 1),
        (5, 100, 9, 3),
        (3, 3, 7, 7),
        (1, 33, 9, 7),
    ];
    for &(n, c, hw, s) in &shapes {
        bn_reduce_case::<f32>(&g, &mut rng, n, c, hw, s);
        bn_reduce_case::<u16>(&g, &mut rng, n, c, hw, s);
    }
}

/// The elementwise BN kernels on NHWC data as (R, C, 1) against the NCHW launch on buffers one
/// element off alignment (the same one-element code path), bit for bit.
fn bn_elem_case<T: Act>(g: &Gpu, rng: &mut ChaCha8Rng, n: usize, c: usize, hw: usize) {
    let tag = format!(
        "{} (n={n}, c={c}, hw={hw}) as ({}, {c}, 1)",
        T::SUFFIX,
        n * hw
    );
    let tot = n * c * hw;
    let x: Vec<T> = store(&randn(tot, rng, 2.0, 0.5));
    let dy: Vec<T> = store(&randn(tot, rng, 1.0, 0.0));
    let res: Vec<T> = store(&randn(tot, rng, 1.0, 0.0));
    let y: Vec<T> = store(
        &randn(tot, rng, 1.0, 0.0)
            .into_iter()
            .map(|v| v.max(0.0))
            .collect::<Vec<_>>(),
    );
    // NCHW copies one element into their allocation; NHWC ones aligned.
    let shifted = |v: &[T]| {
        let mut s = vec![T::NAN];
        s.extend_from_slice(v);
        g.up(&s)
    };
    let (x1, dy1, r1, y1) = (shifted(&x), shifted(&dy), shifted(&res), shifted(&y));
    let (px1, pdy1, pr1, py1) = (g.at(&x1, 1), g.at(&dy1, 1), g.at(&r1, 1), g.at(&y1, 1));
    let (xn, dyn_, rn, yn) = (
        g.up(&to_nhwc(&x, n, c, hw)),
        g.up(&to_nhwc(&dy, n, c, hw)),
        g.up(&to_nhwc(&res, n, c, hw)),
        g.up(&to_nhwc(&y, n, c, hw)),
    );
    let (pxn, pdyn, prn, pyn) = (g.at(&xn, 0), g.at(&dyn_, 0), g.at(&rn, 0), g.at(&yn, 0));
    let mut params: Vec<Vec<f32>> = (0..6).map(|_| randn(c, rng, 1.0, 0.0)).collect();
    for v in params[1].iter_mut() {
        *v = 0.2 + v.abs(); // invstd > 0
    }
    let pbufs: Vec<CudaSlice<f32>> = params.iter().map(|v| g.up(v)).collect();
    let pv: Vec<u64> = pbufs.iter().map(|b| g.at(b, 0)).collect();
    let (mean, is, gm, bt, dg, db) = (pv[0], pv[1], pv[2], pv[3], pv[4], pv[5]);
    let (nn, cc, hh, rr, one) = (n as i64, c as i32, hw as i64, (n * hw) as i64, 1i64);
    let (eg, eb) = grid_1d(tot);
    let (o1, on) = (g.up(&vec![T::NAN; tot + 1]), g.up(&vec![T::NAN; tot]));
    let (po1, pon) = (g.at(&o1, 1), g.at(&on, 0));
    let cmp = |what: &str| {
        let a = g.down(&o1);
        same_bits(
            &format!("{tag}: {what}"),
            &to_nchw(&g.down(&on), n, c, hw),
            &a[1..],
        );
    };
    launch!(g, &k::<T>("bn_forward"), eg, eb; px1, mean, is, gm, bt, po1, nn, cc, hh);
    launch!(g, &k::<T>("bn_forward"), eg, eb; pxn, mean, is, gm, bt, pon, rr, cc, one);
    cmp("bn_forward");
    let null = 0u64;
    launch!(g, &k::<T>("bn_act_forward"), eg, eb; px1, null, mean, is, gm, bt, po1, nn, cc, hh);
    launch!(g, &k::<T>("bn_act_forward"), eg, eb; pxn, null, mean, is, gm, bt, pon, rr, cc, one);
    cmp("bn_act_forward");
    launch!(g, &k::<T>("bn_act_forward"), eg, eb; px1, pr1, mean, is, gm, bt, po1, nn, cc, hh);
    launch!(g, &k::<T>("bn_act_forward"), eg, eb; pxn, prn, mean, is, gm, bt, pon, rr, cc, one);
    cmp("bn_act_forward + residual");
    launch!(g, &k::<T>("bn_backward_dx"), eg, eb; pdy1, px1, mean, is, gm, dg, db, po1, nn, cc, hh);
    launch!(g, &k::<T>("bn_backward_dx"), eg, eb; pdyn, pxn, mean, is, gm, dg, db, pon, rr, cc, one);
    cmp("bn_backward_dx");
    launch!(g, &k::<T>("bn_eval_backward_dx"), eg, eb; pdy1, is, gm, po1, nn, cc, hh);
    launch!(g, &k::<T>("bn_eval_backward_dx"), eg, eb; pdyn, is, gm, pon, rr, cc, one);
    cmp("bn_eval_backward_dx");
    for train in [0i32, 1] {
        launch!(g, &k::<T>("bn_act_backward_dx"), eg, eb; pdy1, py1, px1, mean, is, gm, dg, db, po1, nn, cc, hh, train);
        launch!(g, &k::<T>("bn_act_backward_dx"), eg, eb; pdyn, pyn, pxn, mean, is, gm, dg, db, pon, rr, cc, one, train);
        cmp(&format!("bn_act_backward_dx training={train}"));
        launch!(g, &k::<T>("bn_act_backward_dx"), eg, eb; pdy1, null, px1, mean, is, gm, dg, db, po1, nn, cc, hh, train);
        launch!(g, &k::<T>("bn_act_backward_dx"), eg, eb; pdyn, null, pxn, mean, is, gm, dg, db, pon, rr, cc, one, train);
        cmp(&format!("bn_act_backward_dx training={train} y=null"));
    }
    // the NHWC forward against f64 too
    launch!(g, &k::<T>("bn_forward"), eg, eb; pxn, mean, is, gm, bt, pon, rr, cc, one);
    let got = widen(&g.down(&on));
    let xw = widen(&to_nhwc(&x, n, c, hw));
    params.truncate(4);
    let want: Vec<f64> = (0..tot)
        .map(|i| {
            let ci = i % c;
            (xw[i] as f64 - params[0][ci] as f64) * params[1][ci] as f64 * params[2][ci] as f64
                + params[3][ci] as f64
        })
        .collect();
    let tol = if T::SUFFIX == "f32" { 1e-5 } else { 5e-3 };
    close(&format!("{tag}: bn_forward vs f64"), &got, &want, tol);
}

#[test]
fn nhwc_batch_norm_elementwise() {
    let Some(g) = gpu_or_skip("nhwc_batch_norm_elementwise", FUNCS) else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for &(n, c, hw) in &[
        (4usize, 64usize, 56 * 56usize),
        (8, 100, 9),
        (3, 3, 7),
        (2, 2048, 49),
    ] {
        bn_elem_case::<f32>(&g, &mut rng, n, c, hw);
        bn_elem_case::<u16>(&g, &mut rng, n, c, hw);
    }
}

/// NHWC max pool and global average pool against the NCHW kernels (max pool input from 23
/// values: ties in the windows; one NaN).
#[allow(clippy::too_many_arguments)] // a pooling shape: every size is explicit
fn pool_case<T: Act>(
    g: &Gpu,
    rng: &mut ChaCha8Rng,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kk: usize,
    st: usize,
    pad: usize,
) {
    let tag = format!(
        "{} (n={n}, c={c}, {h}x{w}) k={kk} s={st} p={pad}",
        T::SUFFIX
    );
    let (ho, wo) = ((h + 2 * pad - kk) / st + 1, (w + 2 * pad - kk) / st + 1);
    let (len, ol) = (n * c * h * w, n * c * ho * wo);
    let mut xr: Vec<f32> = (0..len).map(|i| (i % 23) as f32 * 0.37 - 3.0).collect();
    for i in (1..len).rev() {
        xr.swap(i, rng.gen_range(0..=i));
    }
    xr[len / 2] = f32::NAN;
    let x: Vec<T> = store(&xr);
    let dy: Vec<T> = store(&randn(ol, rng, 1.0, 0.0));
    let (dx_, ddy) = (g.up(&x), g.up(&dy));
    let (dxn, ddyn) = (
        g.up(&to_nhwc(&x, n, c, h * w)),
        g.up(&to_nhwc(&dy, n, c, ho * wo)),
    );
    let (px, pdy, pxn, pdyn) = (g.at(&dx_, 0), g.at(&ddy, 0), g.at(&dxn, 0), g.at(&ddyn, 0));
    let (y, yn) = (g.up(&vec![T::NAN; ol]), g.up(&vec![T::NAN; ol]));
    let (a, an) = (g.up(&vec![-7i32; ol]), g.up(&vec![-7i32; ol]));
    let (gx, gxn) = (g.up(&vec![T::NAN; len]), g.up(&vec![T::NAN; len]));
    let (py, pyn, pa, pan, pgx, pgxn) = (
        g.at(&y, 0),
        g.at(&yn, 0),
        g.at(&a, 0),
        g.at(&an, 0),
        g.at(&gx, 0),
        g.at(&gxn, 0),
    );
    let (nc, nn, cc, hh, ww, hoo, woo, ki, si, pi) = (
        (n * c) as i64,
        n as i64,
        c as i32,
        h as i32,
        w as i32,
        ho as i32,
        wo as i32,
        kk as i32,
        st as i32,
        pad as i32,
    );
    let (og, ob) = grid_1d(ol);
    let (ig, ib) = grid_1d(len);
    launch!(g, &k::<T>("maxpool2d_fwd"), og, ob; px, py, pa, nc, hh, ww, hoo, woo, ki, si, pi);
    launch!(g, &k::<T>("maxpool2d_fwd_nhwc"), og, ob; pxn, pyn, pan, nn, cc, hh, ww, hoo, woo, ki, si, pi);
    launch!(g, &k::<T>("maxpool2d_bwd"), ig, ib; pdy, pa, pgx, nc, hh, ww, hoo, woo, ki, si, pi);
    launch!(g, &k::<T>("maxpool2d_bwd_nhwc"), ig, ib; pdyn, pan, pgxn, nn, cc, hh, ww, hoo, woo, ki, si, pi);
    let yv = g.down(&y);
    same_bits(
        &format!("{tag}: maxpool y"),
        &to_nchw(&g.down(&yn), n, c, ho * wo),
        &yv,
    );
    let av = g.down(&a);
    assert_eq!(
        to_nchw(&g.down(&an), n, c, ho * wo),
        av,
        "{tag}: maxpool argmax"
    );
    same_bits(
        &format!("{tag}: maxpool dx"),
        &to_nchw(&g.down(&gxn), n, c, h * w),
        &g.down(&gx),
    );
    assert!(
        yv.iter().any(|v| v.wide().is_nan()),
        "{tag}: the NaN reached no output"
    );
    // first maximum wins: the argmax of every NaN-free window against the host
    let xw = widen(&x);
    for q in 0..n * c {
        for oh in 0..ho {
            for ow in 0..wo {
                let (mut best, mut bi, mut nan) = (f32::NEG_INFINITY, -1i32, false);
                for u in 0..kk {
                    for v in 0..kk {
                        let (hi, wi) = (
                            (oh * st + u) as i64 - pad as i64,
                            (ow * st + v) as i64 - pad as i64,
                        );
                        if hi < 0 || wi < 0 || hi >= h as i64 || wi >= w as i64 {
                            continue;
                        }
                        let xv = xw[q * h * w + (hi as usize) * w + wi as usize];
                        nan |= xv.is_nan();
                        if bi < 0 || xv > best {
                            best = xv;
                            bi = (hi as i32) * w as i32 + wi as i32;
                        }
                    }
                }
                let o = (q * ho + oh) * wo + ow;
                assert!(
                    nan || av[o] == bi,
                    "{tag}: argmax {o} = {}, want {bi}",
                    av[o]
                );
            }
        }
    }
    // global average pool over (n, c, h * w)
    let hw = h * w;
    let gxv: Vec<T> = store(&randn(len, rng, 1.0, 0.3));
    let gdy: Vec<T> = store(&randn(n * c, rng, 1.0, 0.0));
    let (dgx, dgxn, dgdy) = (g.up(&gxv), g.up(&to_nhwc(&gxv, n, c, hw)), g.up(&gdy));
    let (pgx1, pgxn1, pgdy) = (g.at(&dgx, 0), g.at(&dgxn, 0), g.at(&dgdy, 0));
    let (gy, gyn) = (g.up(&vec![T::NAN; n * c]), g.up(&vec![T::NAN; n * c]));
    let (gd, gdn) = (g.up(&vec![T::NAN; len]), g.up(&vec![T::NAN; len]));
    let (pgy, pgyn, pgd, pgdn) = (g.at(&gy, 0), g.at(&gyn, 0), g.at(&gd, 0), g.at(&gdn, 0));
    let hwi = hw as i64;
    let (yg, yb) = grid_1d(n * c);
    launch!(g, &k::<T>("global_avgpool_fwd"), yg, yb; pgx1, pgy, nc, hwi);
    launch!(g, &k::<T>("global_avgpool_fwd_nhwc"), yg, yb; pgxn1, pgyn, nn, cc, hwi);
    launch!(g, &k::<T>("global_avgpool_bwd"), ig, ib; pgdy, pgd, nc, hwi);
    launch!(g, &k::<T>("global_avgpool_bwd_nhwc"), ig, ib; pgdy, pgdn, nn, cc, hwi);
    same_bits(
        &format!("{tag}: gap dx"),
        &to_nchw(&g.down(&gdn), n, c, hw),
        &g.down(&gd),
    );
    let got = widen(&g.down(&gyn));
    let gw = widen(&gxv);
    let want: Vec<f64> = (0..n * c)
        .map(|q| {
            gw[q * hw..(q + 1) * hw]
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>()
                / hw as f64
        })
        .collect();
    if T::SUFFIX == "f32" {
        // The NHWC kernel sums each plane in order, the NCHW one over 32 lanes and a tree: their
        // rounding errors grow like sqrt(HW) (the stem-sized 112x112 plane: ~4e-6 expected).
        let tol = 1e-6 * (hw as f64).sqrt().max(1.0);
        close(
            &format!("{tag}: gap y vs NCHW"),
            &got,
            &f64s(&widen(&g.down(&gy))),
            tol,
        );
        close(&format!("{tag}: gap y vs f64"), &got, &want, tol);
    } else {
        let f = g.up(&widen(&to_nhwc(&gxv, n, c, hw)));
        let fy = g.nan32(n * c);
        let (pf, pfy) = (g.at(&f, 0), g.at(&fy, 0));
        launch!(g, "global_avgpool_fwd_nhwc_f32", yg, yb; pf, pfy, nn, cc, hwi);
        let want16: Vec<f32> = g.down(&fy).iter().map(|&v| round_bf16(v)).collect();
        same_bits(
            &format!("{tag}: gap y == round_bf16(f32 NHWC kernel)"),
            &got,
            &want16,
        );
        close(&format!("{tag}: gap y vs f64"), &got, &want, 5e-3);
    }
}

#[test]
fn nhwc_pooling() {
    let Some(g) = gpu_or_skip("nhwc_pooling", FUNCS) else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    // ResNet50's stem pool (on 8 images), its global pool input (2048 x 7x7), odd shapes.
    for &(n, c, h, w, kk, st, pad) in &[
        (8usize, 64usize, 112usize, 112usize, 3usize, 2usize, 1usize),
        (16, 2048, 7, 7, 1, 1, 0),
        (2, 3, 11, 9, 3, 2, 1),
        (3, 100, 8, 7, 2, 2, 0),
    ] {
        pool_case::<f32>(&g, &mut rng, n, c, h, w, kk, st, pad);
        pool_case::<u16>(&g, &mut rng, n, c, h, w, kk, st, pad);
    }
}

#[test]
fn nhwc_layout_conversions() {
    let Some(g) = gpu_or_skip("nhwc_layout_conversions", FUNCS) else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    // images, conv weights (O, C, 3x3), odd sizes, N past the grid's z limit (the z loop), HW == 1
    // (1x1 conv weights) and C == 1 (layouts coincide: the kernels' elementwise branch)
    for &(n, c, hw) in &[
        (4usize, 3usize, 224 * 224usize),
        (512, 256, 9),
        (7, 100, 33),
        (70_000, 3, 1),
        (2048, 512, 1),
        (3, 1, 45),
        (2, 2048, 49),
    ] {
        let tag = format!("(n={n}, c={c}, hw={hw})");
        let tot = n * c * hw;
        let mut x = randn(tot, &mut rng, 3.0, 0.0);
        for (j, &b) in [
            0x7fa1_2345u32,
            0xff80_0001,
            0x7f80_0000,
            0x8000_0000,
            0x3f80_8000,
            0x3f81_8000,
            0x0001_8000,
            0x7f7f_ffff,
        ]
        .iter()
        .enumerate()
        {
            x[(j * 7919) % tot] = f32::from_bits(b);
        }
        let xb: Vec<u16> = (0..tot).map(|_| rng.gen()).collect();
        let (grid, block) = transpose_grid(n, c, hw);
        let (nn, cc, hh) = (n as i64, c as i32, hw as i64);
        let (dx, dxb) = (g.up(&x), g.up(&xb));
        let (px, pxb) = (g.at(&dx, 0), g.at(&dxb, 0));
        let (y1, y2, y3) = (
            g.up(&vec![0x7fc0u16; tot]),
            g.up(&vec![0x7fc0u16; tot]),
            g.up(&vec![0x7fc0u16; tot]),
        );
        let y4 = g.nan32(tot);
        let (p1, p2, p3, p4) = (g.at(&y1, 0), g.at(&y2, 0), g.at(&y3, 0), g.at(&y4, 0));
        launch!(g, "nchw_to_nhwc_f32_bf16", grid, block; px, p1, nn, cc, hh);
        launch!(g, "nchw_to_nhwc_bf16_bf16", grid, block; pxb, p2, nn, cc, hh);
        launch!(g, "nhwc_to_nchw_bf16_bf16", grid, block; pxb, p3, nn, cc, hh);
        launch!(g, "nhwc_to_nchw_bf16_f32", grid, block; pxb, p4, nn, cc, hh);
        let want1: Vec<u16> = to_nhwc(&x, n, c, hw)
            .iter()
            .map(|&v| u16::store(v))
            .collect();
        same_bits(
            &format!("{tag}: nchw_to_nhwc_f32_bf16"),
            &g.down(&y1),
            &want1,
        );
        same_bits(
            &format!("{tag}: nchw_to_nhwc_bf16_bf16"),
            &g.down(&y2),
            &to_nhwc(&xb, n, c, hw),
        );
        same_bits(
            &format!("{tag}: nhwc_to_nchw_bf16_bf16"),
            &g.down(&y3),
            &to_nchw(&xb, n, c, hw),
        );
        let want4: Vec<f32> = to_nchw(&xb, n, c, hw).iter().map(|&b| b.wide()).collect();
        same_bits(
            &format!("{tag}: nhwc_to_nchw_bf16_f32"),
            &g.down(&y4),
            &want4,
        );
    }
}
