//! The CARP loss over a random partition of the prototypes: forward and analytic gradient.
//! [`carp_loss_forward`] is the op the training step calls on the logits where they are (one
//! `match` on the backend): its CPU arm is [`carp_loss`] on plain row-major f32 slices, the
//! reference the fused GPU kernel (`kernels/carp_loss.cu`) is tested against.
//!
//! What is computed (SPEC.md "Loss"; the reference code's `modules/random_partition.py` and
//! `modules/carp_loss.py`):
//! - A permutation `perm` of the K prototypes splits them into NP = K / NB blocks; block j holds
//!   prototypes `perm[j*NB .. (j+1)*NB]`. Every view's logits are softmaxed per block
//!   (temperature 1): `p[v, i, j, c] = softmax_c(z[v, i, perm[j*NB + c]])`.
//! - Consistency: the mean over blocks and samples of `-log clamp(<p_a[i,j], q_b[i,j]>, eps,
//!   1-eps)` for every pair (student view a, teacher view b) with a != b, and the pairs averaged.
//!   With the two global views that is ((s1,t2) + (s2,t1)) / 2 (SPEC.md; the paper's pseudocode
//!   sums the two, the reference code divides by the pair count, as here). With V > 2 student
//!   views (multi-crop; views 0 and 1 are the global ones, the teacher sees only those), the
//!   pairs are all (a, b), a in 0..V, b in 0..2, a != b: 2 (V - 1) pairs, as the reference code.
//! - Uniformity: `pbar[j] = mean over rows of p[j, row]`, the rows being every student view and
//!   both teacher views: 4N rows for V = 2 (SPEC.md), (V + 2) N with multi-crop (SPEC.md does not
//!   say; the reference code concatenates all student and teacher outputs, as here), and over all
//!   ranks when distributed. `H = mean_j(log NB + sum_c pbar[j,c] log clamp(pbar[j,c], eps,
//!   1-eps))`, the KL divergence of pbar from uniform.
//! - loss = consistency + H. The teacher carries no gradient.
//!
//! Gradient, per student row and block (p = softmax(z), a row's upstream gradient `dp`):
//! `dz_c = p_c (dp_c - <p, dp>)` with
//! `dp_c = sum over pairs (a, b) of -w q_b,c / s_ab` (w = 1 / (pairs N NP); the pair's term is
//! dropped where its clamp is active, i.e. s outside [eps, 1-eps], as torch.clamp's gradient)
//! `+ gscale (log clamp(pbar_c) + [eps <= pbar_c <= 1-eps])`, gscale = 1 / (rows NP).
//! For one pair this is SPEC.md's `-p_c (q_c - s) / s` and `p_c (g_c - <p, g>)`.
//!
//! Passes (what a fused kernel does too): pass 1 gathers each row's blocks, softmaxes them,
//! keeps each (row, block)'s max and 1/sum (so pass 2 recomputes p exactly, without storing the
//! N x K probabilities), the pair dot products s, and sums p over rows into pbar_sum (K, in
//! block order). Then pbar over all rows (all ranks: one all-reduce of K values) gives H and the
//! uniformity gradient g. Pass 2 recomputes p and q and writes dz, scattered back through perm
//! to the original prototype order.
//!
//! Numerics: element math in f32 (a vectorizable exp, `exp_f32`, within 2 ulp), lane-wise f32
//! block sums and dots; pbar sums, the loss terms and H in f64. Pass 1's tasks are fixed sample
//! ranges whose pbar partials are added in order, so results do not depend on the thread count.

use std::sync::Arc;

use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::bail;
use crate::device::collective::{self, Collective};
use crate::error::Result;
use crate::ops::Backend;
use crate::tensor::{Device, Tensor};

pub const CARP_EPS: f32 = f32::EPSILON; // 1.1920929e-7

/// Samples per pass-1 task. Each task keeps its own K-long pbar partial, so the count of tasks is
/// bounded (at most `PASS1_TASKS`); the partials are added in task order, so the result does not
/// depend on the thread count.
const PASS1_TASKS: usize = 32;

/// exp(x) for the block softmax, written so the compiler vectorizes the loops that call it
/// (f32::exp is a scalar libm call and dominated the loss's time). Cody-Waite reduction
/// x = n ln2 + r, |r| <= ln2/2, and a degree-7 Taylor polynomial for exp(r) (truncation
/// < 1e-8 relative); within 2 ulp of exp over the clamped range. Inputs below -87.3 (where exp
/// is subnormal, < 1.2e-38) give exp(-87.3): a probability of ~1e-38 instead of ~0 is harmless
/// and keeps the exponent arithmetic in range. Softmax inputs are <= 0; the top is clamped at
/// 88 so 2^n stays finite.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so n * LN2_HI is exact for |n| < 2^8.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a round
    // instruction (SSE2 has none).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer, read from t's mantissa (t = 1.5 * 2^23 + n, |n| < 2^22): integer ops
    // that vectorize, unlike the saturating `n as i32`.
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n in [-126, 127]: the biased exponent n + 127 is in [1, 254], a normal power of two.
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    p * scale
}

/// Sum with 8 independent f32 lanes (vectorizes; also more accurate than one running sum).
#[inline]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Max with 8 independent lanes (the inputs are finite).
#[inline]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Whether no value is NaN or +-inf (an all-ones exponent), with integer ops that vectorize.
#[inline]
fn all_finite(x: &[f32]) -> bool {
    let mut bad = 0u32;
    for &v in x {
        bad |= ((v.to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32;
    }
    bad == 0
}

/// Dot product with 8 independent f32 lanes.
#[inline]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// A fresh random permutation of 0..k (u32), drawn from `rng` (new every step).
pub fn random_partition(k: usize, rng: &mut impl rand::Rng) -> Vec<u32> {
    let mut p: Vec<u32> = (0..k as u32).collect();
    p.shuffle(rng);
    p
}

#[derive(Clone, Debug)]
pub struct CarpLossOutput {
    pub loss: f32,        // consistency + entropy
    pub consistency: f32, // the pairs' mean of -log clamp(<p_a, q_b>)
    pub entropy: f32,     // H, the KL of the block-mean assignment from uniform
    /// d loss / d student logits, one (N, K) buffer per student view, in the ORIGINAL (ungathered)
    /// prototype order, ready to seed the backward of the student's logits.
    pub dstudent: Vec<Vec<f32>>,
}

/// The consistency pairs (student view a, teacher view b), a != b, in a fixed order.
pub fn carp_pairs(views: usize) -> Vec<(usize, usize)> {
    let mut pairs = Vec::with_capacity(2 * views);
    for a in 0..views {
        for b in 0..2 {
            if a != b {
                pairs.push((a, b));
            }
        }
    }
    pairs
}

/// What pass 1 leaves for pass 2 (and for the all-reduce of pbar between them).
#[derive(Clone, Debug)]
pub struct CarpPass1 {
    /// Student views V.
    pub views: usize,
    pub n: usize,
    pub k: usize,
    pub nb: usize,
    /// Rows entering pbar on this rank: (V + 2) N.
    pub rows: usize,
    /// sum over this rank's rows of p, (NP, NB) flattened, in block (gathered) order.
    pub pbar_sum: Vec<f64>,
    /// Per (sample, view u in 0..V+2 (students then teachers), block): the block's max logit
    /// and 1 / sum(exp(z - max)). (N, V+2, NP, 2)
    stats: Vec<f32>,
    /// Per (sample, pair, block): s = <p_a, q_b>, unclamped. (N, pairs, NP)
    dots: Vec<f64>,
}

impl CarpPass1 {
    pub fn np(&self) -> usize {
        self.k / self.nb
    }
}

/// One view's row of logits: students first, then the two teachers.
fn view_row<'a>(
    student: &[&'a [f32]],
    teacher: &[&'a [f32]],
    u: usize,
    i: usize,
    k: usize,
) -> &'a [f32] {
    let v = student.len();
    let src = if u < v { student[u] } else { teacher[u - v] };
    &src[i * k..(i + 1) * k]
}

fn view_name(u: usize, v: usize) -> String {
    if u < v {
        format!("student view {u}")
    } else {
        format!("teacher view {}", u - v)
    }
}

fn check_inputs(
    student: &[&[f32]],
    teacher: &[&[f32]],
    n: usize,
    k: usize,
    nb: usize,
    perm: &[u32],
) -> Result<()> {
    if student.len() < 2 {
        bail!(
            Shape,
            "carp_loss: need at least 2 student views (the two global views), got {}",
            student.len()
        );
    }
    if teacher.len() != 2 {
        bail!(
            Shape,
            "carp_loss: need exactly 2 teacher views, got {}",
            teacher.len()
        );
    }
    if n == 0 || k == 0 || nb == 0 {
        bail!(Shape, "carp_loss: empty sizes N={n}, K={k}, NB={nb}");
    }
    if !k.is_multiple_of(nb) {
        bail!(
            Shape,
            "carp_loss: the block size NB={nb} does not divide the prototype count K={k}"
        );
    }
    let v = student.len();
    for u in 0..v + 2 {
        let len = if u < v {
            student[u].len()
        } else {
            teacher[u - v].len()
        };
        if len != n * k {
            bail!(
                Shape,
                "carp_loss: {} has {len} logits, expected N x K = {n} x {k}",
                view_name(u, v)
            );
        }
    }
    check_permutation("carp_loss", perm, k)
}

/// That `perm` is a permutation of 0..`k` (each prototype index once), the partition's form;
/// `what` names the caller in the error.
pub fn check_permutation(what: &str, perm: &[u32], k: usize) -> Result<()> {
    if perm.len() != k {
        bail!(
            Shape,
            "{what}: the permutation has {} entries, expected K = {k}",
            perm.len()
        );
    }
    let mut seen = vec![false; k];
    for (pos, &p) in perm.iter().enumerate() {
        let p = p as usize;
        if p >= k || seen[p] {
            bail!(
                Shape,
                "{what}: perm is not a permutation of 0..{k} (entry {pos} = {p}): pass each prototype index once"
            );
        }
        seen[p] = true;
    }
    Ok(())
}

struct Pass1Part {
    pbar_sum: Vec<f64>,
    stats: Vec<f32>,
    dots: Vec<f64>,
}

/// Pass 1: block softmax of every row, the pairs' dot products, and this rank's pbar sum.
/// Errors on inconsistent sizes, K % NB != 0, a perm that is not a permutation, or non-finite
/// logits (naming the view).
pub fn carp_loss_pass1(
    student: &[&[f32]],
    teacher: &[&[f32]],
    n: usize,
    k: usize,
    nb: usize,
    perm: &[u32],
) -> Result<CarpPass1> {
    check_inputs(student, teacher, n, k, nb, perm)?;
    let v = student.len();
    let nu = v + 2;
    let np = k / nb;
    let pairs = carp_pairs(v);
    let chunk = n.div_ceil(PASS1_TASKS);
    let ntasks = n.div_ceil(chunk);

    let parts: Vec<Pass1Part> = (0..ntasks)
        .into_par_iter()
        .map(|t| -> Result<Pass1Part> {
            let samples = t * chunk..((t + 1) * chunk).min(n);
            let ns = samples.len();
            let mut pbar_sum = vec![0.0f64; k]; // (NP, NB)
            let mut stats = vec![0.0f32; ns * nu * np * 2]; // (ns, V+2, NP, 2)
            let mut dots = vec![0.0f64; ns * pairs.len() * np]; // (ns, pairs, NP)
            let mut probs = vec![0.0f32; nu * nb]; // (V+2, NB): one block of every view
            for (il, i) in samples.enumerate() {
                for j in 0..np {
                    let idx = &perm[j * nb..(j + 1) * nb];
                    for u in 0..nu {
                        let row = view_row(student, teacher, u, i, k);
                        let p = &mut probs[u * nb..(u + 1) * nb];
                        // Gather (the random reads), then the finite check and the max as
                        // vectorizable passes over the block.
                        for (pc, &c) in p.iter_mut().zip(idx) {
                            *pc = row[c as usize];
                        }
                        if !all_finite(p) {
                            let (c, z) = idx
                                .iter()
                                .map(|&c| (c, row[c as usize]))
                                .find(|(_, z)| !z.is_finite())
                                .unwrap_or((0, f32::NAN));
                            bail!(
                                NonFinite,
                                "carp_loss: {} has logit {z} at sample {i}, prototype {c}",
                                view_name(u, v)
                            );
                        }
                        let max = max_lanes(p);
                        for pc in p.iter_mut() {
                            *pc = exp_f32(*pc - max);
                        }
                        // sum >= 1 (the max's own term), so inv is finite.
                        let inv = 1.0 / sum_lanes(p);
                        let acc = &mut pbar_sum[j * nb..(j + 1) * nb];
                        for (pc, a) in p.iter_mut().zip(acc) {
                            *pc *= inv;
                            *a += *pc as f64;
                        }
                        let s = ((il * nu + u) * np + j) * 2;
                        stats[s] = max;
                        stats[s + 1] = inv;
                    }
                    for (pi, &(a, b)) in pairs.iter().enumerate() {
                        let pa = &probs[a * nb..(a + 1) * nb];
                        let qb = &probs[(v + b) * nb..(v + b + 1) * nb];
                        dots[(il * pairs.len() + pi) * np + j] = dot_lanes(pa, qb) as f64;
                    }
                }
            }
            Ok(Pass1Part {
                pbar_sum,
                stats,
                dots,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let mut pbar_sum = vec![0.0f64; k];
    let mut stats = Vec::with_capacity(n * nu * np * 2);
    let mut dots = Vec::with_capacity(n * pairs.len() * np);
    for part in parts {
        for (a, b) in pbar_sum.iter_mut().zip(&part.pbar_sum) {
            *a += b;
        }
        stats.extend_from_slice(&part.stats);
        dots.extend_from_slice(&part.dots);
    }
    Ok(CarpPass1 {
        views: v,
        n,
        k,
        nb,
        rows: nu * n,
        pbar_sum,
        stats,
        dots,
    })
}

/// -log clamp(s, eps, 1-eps), and whether the clamp passes the gradient (s inside the range).
fn clamped_neg_log(s: f64) -> (f64, bool) {
    let eps = CARP_EPS as f64;
    let inside = (eps..=1.0 - eps).contains(&s);
    (-(s.clamp(eps, 1.0 - eps)).ln(), inside)
}

/// Pass 2: from pass 1 and the pbar sum over all ranks' rows (`pbar_sum_global`, (NP, NB) in
/// block order; equal to `pass1.pbar_sum` on one rank), the loss and the student gradients.
///
/// `world` ranks each with the same batch: pbar = pbar_sum_global / (world * rows). The
/// consistency reported and differentiated is this rank's; H is the global one. The uniformity
/// gradient is scaled by `world`: dstudent = d consistency_r / dz + world * dH / dz, so that the
/// MEAN over ranks of the parameter gradients (a data-parallel all-reduce average) is exactly the
/// gradient of mean_r(consistency_r) + H. The reference code gets the same factor from its
/// AllGather backward (an all_reduce sum of the identical per-rank gradients of H). With
/// world = 1 this is the plain gradient of the loss.
pub fn carp_loss_pass2(
    student: &[&[f32]],
    teacher: &[&[f32]],
    perm: &[u32],
    pass1: &CarpPass1,
    pbar_sum_global: &[f64],
    world: usize,
) -> Result<CarpLossOutput> {
    carp_loss_pass2_scaled(student, teacher, perm, pass1, pbar_sum_global, world, world)
}

/// [`carp_loss_pass2`] with the uniformity gradient scaled by `entropy_scale` instead of the
/// world size: 1 is the mistake of forgetting that the gradient average divides it by the
/// world size, which the data-parallel tests show to matter.
pub(crate) fn carp_loss_pass2_scaled(
    student: &[&[f32]],
    teacher: &[&[f32]],
    perm: &[u32],
    pass1: &CarpPass1,
    pbar_sum_global: &[f64],
    world: usize,
    entropy_scale: usize,
) -> Result<CarpLossOutput> {
    let (v, n, k, nb) = (pass1.views, pass1.n, pass1.k, pass1.nb);
    check_inputs(student, teacher, n, k, nb, perm)?;
    if student.len() != v {
        bail!(
            Shape,
            "carp_loss_pass2: {} student views, pass 1 saw {v}",
            student.len()
        );
    }
    if pbar_sum_global.len() != k {
        bail!(
            Shape,
            "carp_loss_pass2: pbar sum has {} entries, expected K = {k}",
            pbar_sum_global.len()
        );
    }
    if world == 0 {
        bail!(Config, "carp_loss_pass2: world size 0");
    }
    let nu = v + 2;
    let np = k / nb;
    let pairs = carp_pairs(v);
    let eps = CARP_EPS as f64;

    // Uniformity: H and its gradient g (NP, NB) w.r.t. one row's p.
    let global_rows = (pass1.rows * world) as f64;
    let gscale = entropy_scale as f64 / (global_rows * np as f64);
    let mut h = 0.0f64;
    let mut g = vec![0.0f64; k]; // (NP, NB)
    for j in 0..np {
        let mut hj = (nb as f64).ln();
        for c in j * nb..(j + 1) * nb {
            let pbar = pbar_sum_global[c] / global_rows;
            if !pbar.is_finite() {
                bail!(NonFinite, "carp_loss_pass2: pbar[{c}] = {pbar}");
            }
            let lp = pbar.clamp(eps, 1.0 - eps).ln();
            hj += pbar * lp;
            let inside = (eps..=1.0 - eps).contains(&pbar);
            g[c] = (lp + if inside { 1.0 } else { 0.0 }) * gscale;
        }
        h += hj;
        // A constant added to a block's g cancels in p (g - <p, g>): center it (in f64) so the
        // f32 subtraction in pass 2 does not cancel the large common part (log(1/NB) + 1).
        let gj = &mut g[j * nb..(j + 1) * nb];
        let mean = gj.iter().sum::<f64>() / nb as f64;
        gj.iter_mut().for_each(|x| *x -= mean);
    }
    let g: Vec<f32> = g.iter().map(|&x| x as f32).collect(); // (NP, NB)
    h /= np as f64;

    // Consistency from pass 1's dot products, and each (sample, pair, block)'s gradient
    // coefficient -w / s (0 where the clamp is active).
    let w = 1.0 / (pairs.len() * n * np) as f64;
    let mut cons = 0.0f64;
    let coef: Vec<f32> = pass1
        .dots
        .iter()
        .map(|&s| {
            let (l, inside) = clamped_neg_log(s);
            cons += l;
            if inside {
                (-w / s) as f32
            } else {
                0.0
            }
        })
        .collect(); // (N, pairs, NP)
    cons *= w;

    // Pass 2: recompute p and q from the saved max and 1/sum, form dz, scatter through perm.
    let mut dstudent: Vec<Vec<f32>> = (0..v).map(|_| vec![0.0f32; n * k]).collect();
    let mut rows: Vec<Vec<&mut [f32]>> = (0..n).map(|_| Vec::with_capacity(v)).collect();
    for d in dstudent.iter_mut() {
        for (i, r) in d.chunks_mut(k).enumerate() {
            rows[i].push(r);
        }
    }
    let stats = &pass1.stats;
    rows.into_par_iter().enumerate().for_each_init(
        || (vec![0.0f32; 3 * nb], vec![0.0f32; nb]),
        |(buf, dp), (i, mut drows)| {
            // buf: (3, NB) = q_0, q_1, then the student block p being differentiated.
            for j in 0..np {
                let idx = &perm[j * nb..(j + 1) * nb];
                let block_probs = |u: usize, out: &mut [f32]| {
                    let row = view_row(student, teacher, u, i, k);
                    let s = ((i * nu + u) * np + j) * 2;
                    let (max, inv) = (stats[s], stats[s + 1]);
                    for (o, &c) in out.iter_mut().zip(idx) {
                        *o = row[c as usize];
                    }
                    for o in out.iter_mut() {
                        *o = exp_f32(*o - max) * inv;
                    }
                };
                let (qs, p) = buf.split_at_mut(2 * nb);
                block_probs(v, &mut qs[..nb]);
                block_probs(v + 1, &mut qs[nb..]);
                let gj = &g[j * nb..(j + 1) * nb];
                for (a, drow) in drows.iter_mut().enumerate() {
                    block_probs(a, p);
                    // Coefficients of q_0 and q_1 in dp for this student view.
                    let mut cb = [0.0f32; 2];
                    for (pi, &(pa, pb)) in pairs.iter().enumerate() {
                        if pa == a {
                            cb[pb] = coef[(i * pairs.len() + pi) * np + j];
                        }
                    }
                    let (q0, q1) = qs.split_at(nb);
                    for c in 0..nb {
                        dp[c] = gj[c] + cb[0] * q0[c] + cb[1] * q1[c];
                    }
                    let dot = dot_lanes(p, dp);
                    for c in 0..nb {
                        p[c] *= dp[c] - dot;
                    }
                    for (&pc, &c) in p.iter().zip(idx) {
                        drow[c as usize] = pc;
                    }
                }
            }
        },
    );

    let loss = cons + h;
    Ok(CarpLossOutput {
        loss: loss as f32,
        consistency: cons as f32,
        entropy: h as f32,
        dstudent,
    })
}

/// student: V >= 2 views, each (N, K) logits (views 0 and 1 are the two global views);
/// teacher: exactly 2 views, each (N, K). perm: the step's permutation of 0..K; block j holds
/// prototypes perm[j*nb .. (j+1)*nb]. Errors (not panics) on inconsistent sizes, K % nb != 0, or
/// non-finite logits (say which view).
pub fn carp_loss(
    student: &[&[f32]],
    teacher: &[&[f32]],
    n: usize,
    k: usize,
    nb: usize,
    perm: &[u32],
) -> Result<CarpLossOutput> {
    let p1 = carp_loss_pass1(student, teacher, n, k, nb, perm)?;
    carp_loss_pass2(student, teacher, perm, &p1, &p1.pbar_sum, 1)
}

/// [`carp_loss`] across `world` data-parallel ranks with equal batches: `allreduce_sum` sums the
/// K pbar partials over ranks in place (the only communication). See [`carp_loss_pass2`] for
/// what the returned values and gradients mean across ranks.
// The eight arguments are carp_loss's six plus the rank count and the communicator.
#[allow(clippy::too_many_arguments)]
pub fn carp_loss_dist(
    student: &[&[f32]],
    teacher: &[&[f32]],
    n: usize,
    k: usize,
    nb: usize,
    perm: &[u32],
    world: usize,
    allreduce_sum: &mut dyn FnMut(&mut [f64]) -> Result<()>,
) -> Result<CarpLossOutput> {
    let p1 = carp_loss_pass1(student, teacher, n, k, nb, perm)?;
    let mut pbar = p1.pbar_sum.clone();
    allreduce_sum(&mut pbar)?;
    carp_loss_pass2(student, teacher, perm, &p1, &pbar, world)
}

/// [`carp_loss_dist`] with the ranks of `comm`, checking that every rank holds `n` samples,
/// and reporting the consistency averaged over the ranks (the global batch's).
#[allow(clippy::too_many_arguments)] // carp_loss's six, the ranks and the test switch
fn carp_loss_ranks(
    student: &[&[f32]],
    teacher: &[&[f32]],
    n: usize,
    k: usize,
    nb: usize,
    perm: &[u32],
    comm: &dyn Collective,
    entropy_scaled: bool,
) -> Result<CarpLossOutput> {
    let world = comm.world_size();
    let p1 = carp_loss_pass1(student, teacher, n, k, nb, perm)?;
    // The samples ride along with the pbar sums: one all-reduce checks the batches.
    let mut pbar = p1.pbar_sum.clone();
    pbar.push(n as f64);
    comm.all_reduce_sum_f64(&mut pbar)?;
    if pbar[k] != (n * world) as f64 {
        bail!(
            Config,
            "carp_loss: {} samples over {world} ranks, {n} on rank {}: every rank must hold \
             the same number of samples (split the global batch evenly)",
            pbar[k],
            comm.rank()
        );
    }
    let scale = if entropy_scaled { world } else { 1 };
    let mut out = carp_loss_pass2_scaled(student, teacher, perm, &p1, &pbar[..k], world, scale)?;
    let mut terms = [out.consistency as f64];
    comm.all_reduce_sum_f64(&mut terms)?;
    out.consistency = (terms[0] / world as f64) as f32;
    out.loss = out.consistency + out.entropy;
    Ok(out)
}

/// [`carp_loss_ranks`] on the GPU: the loss kernels of one GPU with the CPU arm's
/// communication, staged through the host (each waits for the device). The (K,) pbar sums,
/// with this rank's sample count appended (the check that every rank holds the same number),
/// are all-reduced between the softmax pass and their use (the kernels' pbar hook); the
/// uniformity mean runs over the global rows, its gradient scaled by the world size with
/// `entropy_scaled`; the consistency term is averaged over the ranks afterwards.
#[cfg(feature = "cuda")]
fn carp_loss_ranks_gpu(
    be: &crate::ops::gpu::Be,
    student: &crate::device::cuda::DeviceBuffer,
    teacher: &crate::device::cuda::DeviceBuffer,
    perm: &crate::device::cuda::DeviceBuffer,
    (vs, n, k, nb): (usize, usize, usize, usize),
    comm: &dyn Collective,
    entropy_scaled: bool,
) -> Result<crate::device::cuda::CarpLossQueued> {
    let world = comm.world_size();
    let mut hook = |pbar: &mut crate::device::cuda::DeviceBuffer| -> Result<()> {
        let mut sums: Vec<f64> = be.download_f32(pbar)?.iter().map(|&v| v as f64).collect();
        if sums.len() != k {
            bail!(
                Shape,
                "carp_loss: {} pbar sums, expected K = {k}",
                sums.len()
            );
        }
        // The samples ride along with the pbar sums: one all-reduce checks the batches.
        sums.push(n as f64);
        comm.all_reduce_sum_f64(&mut sums)?;
        if sums[k] != (n * world) as f64 {
            bail!(
                Config,
                "carp_loss: {} samples over {world} ranks, {n} on rank {}: every rank must \
                 hold the same number of samples (split the global batch evenly)",
                sums[k],
                comm.rank()
            );
        }
        let global: Vec<f32> = sums[..k].iter().map(|&v| v as f32).collect();
        be.copy_from_host_f32(pbar, &global)
    };
    let scale = (entropy_scaled && world > 1).then_some(world as f32);
    let rows = (vs + 2) * n * world;
    let mut out = be.carp_loss_queued_scaled(
        student,
        teacher,
        perm,
        vs,
        n,
        k,
        nb,
        rows,
        Some(&mut hook),
        scale,
    )?;
    // [H, consistency]: H is the global batch's already; the consistency is this rank's.
    let mut terms = be.download_f32(&out.scalars)?;
    let mut cons = [terms[1] as f64];
    comm.all_reduce_sum_f64(&mut cons)?;
    terms[1] = (cons[0] / world as f64) as f32;
    be.copy_from_host_f32(&mut out.scalars, &terms)?;
    Ok(out)
}

/// A step's prototype partition where its loss runs: the permutation of 0..K (block j holds
/// `perm[j NB .. (j + 1) NB]`) and, for a GPU, its i32 copy in device memory. Made before the
/// step's work is queued: an upload from pageable memory waits for the queue, and would drain
/// it mid-step.
pub struct Partition {
    perm: Vec<u32>,
    device: Device,
    #[cfg(feature = "cuda")]
    on_gpu: Option<crate::device::cuda::DeviceBuffer>, // (K,) i32
}

impl Partition {
    /// `perm` for a loss on `device` (uploaded there when it is a GPU).
    pub fn on(perm: Vec<u32>, device: &Device) -> Result<Partition> {
        #[cfg(feature = "cuda")]
        let on_gpu = match Backend::on(device)? {
            Backend::Cpu => None,
            Backend::Cuda(be) => {
                let perm32: Vec<i32> = perm.iter().map(|&p| p as i32).collect();
                Some(be.upload_i32(&perm32)?)
            }
        };
        #[cfg(not(feature = "cuda"))]
        Backend::on(device)?;
        Ok(Partition {
            perm,
            device: device.clone(),
            #[cfg(feature = "cuda")]
            on_gpu,
        })
    }

    pub fn perm(&self) -> &[u32] {
        &self.perm
    }
}

/// The loss of one step, on the logits' device; on a GPU nothing has waited for it.
pub struct StepLoss {
    /// (2,) f32: [entropy H, consistency]; the loss is their sum (in f32, on every device).
    pub terms: Tensor,
    /// d loss / d student logits, (VS N, K) f32, in the original prototype order.
    pub dstudent: Tensor,
}

impl StepLoss {
    /// (loss, consistency, entropy) on the host (on a GPU: waits for the loss).
    pub fn read(&self) -> Result<(f32, f32, f32)> {
        let t = self.terms.to_vec()?;
        let [entropy, consistency] = t[..] else {
            bail!(Shape, "carp_loss: {} loss terms, expected 2", t.len());
        };
        Ok((entropy + consistency, consistency, entropy))
    }
}

/// The CARP loss and its gradient on the logits' device, in f32 (SPEC; bf16 logits widen
/// exactly): `student` (VS N, K), VS >= 2 views in view-major rows (views 0 and 1 global, then
/// the local ones), `teacher` (2N, K), blocks of `nb` prototypes under `partition`, which must
/// live on the same device. The uniformity mean runs over every student view and both teacher
/// views: (VS + 2) N rows. Errors on inconsistent shapes and, on the CPU, on non-finite logits
/// (naming the view); on a GPU a non-finite loss shows in `terms` (the step's NaN guard).
pub fn carp_loss_forward(
    student: &Tensor,
    teacher: &Tensor,
    vs: usize,
    nb: usize,
    partition: &Partition,
) -> Result<StepLoss> {
    carp_loss_forward_on(student, teacher, vs, nb, partition, None)
}

/// [`carp_loss_forward`] on this rank's rows of a data-parallel batch, the ranks those of
/// `comm` (none, or a world of one: the single-rank loss, bit for bit). Every rank must hold
/// the same number of rows. pbar is the mean over every rank's rows; the terms are the global
/// H and the consistency averaged over the ranks; the gradient is the one
/// [`carp_loss_pass2`] describes (its uniformity part scaled by the world size), so that the
/// average of the ranks' parameter gradients is the gradient of the global batch's loss.
pub fn carp_loss_forward_on(
    student: &Tensor,
    teacher: &Tensor,
    vs: usize,
    nb: usize,
    partition: &Partition,
    comm: Option<&Arc<dyn Collective>>,
) -> Result<StepLoss> {
    carp_loss_forward_scaled(student, teacher, vs, nb, partition, comm, true)
}

/// [`carp_loss_forward_on`]; without `entropy_scaled` the uniformity gradient is not scaled
/// by the world size (wrong: for the tests that show it).
pub(crate) fn carp_loss_forward_scaled(
    student: &Tensor,
    teacher: &Tensor,
    vs: usize,
    nb: usize,
    partition: &Partition,
    comm: Option<&Arc<dyn Collective>>,
    entropy_scaled: bool,
) -> Result<StepLoss> {
    let op = "carp_loss";
    let comm = collective::multi(comm);
    student.expect_rank("student logits (VS N, K)", 2)?;
    let (rows, k) = (student.dim(0), student.dim(1));
    if vs < 2 || !rows.is_multiple_of(vs) || rows == 0 {
        bail!(
            Shape,
            "{op}: student logits {:?} are not {vs} views of N > 0 rows (need VS >= 2)",
            student.shape()
        );
    }
    let n = rows / vs;
    teacher.expect_shape("teacher logits (2N, K)", &[2 * n, k])?;
    if partition.perm.len() != k {
        bail!(
            Shape,
            "{op}: a partition of {} prototypes for logits of K = {k}",
            partition.perm.len()
        );
    }
    let backend = Backend::of(op, &[student, teacher])?;
    if partition.device != student.device() {
        bail!(
            Device,
            "{op}: the partition is on {}, the logits on {} (make it with Partition::on(perm, device))",
            partition.device,
            student.device()
        );
    }
    match backend {
        Backend::Cpu => {
            let (s, t) = (student.to_vec()?, teacher.to_vec()?); // (VS N, K), (2N, K)
            let nk = n * k;
            let sv: Vec<&[f32]> = s.chunks_exact(nk).collect();
            let tv = [&t[..nk], &t[nk..]];
            let out = match comm {
                None => carp_loss(&sv, &tv, n, k, nb, &partition.perm)?,
                Some(c) => {
                    let perm = &partition.perm;
                    carp_loss_ranks(&sv, &tv, n, k, nb, perm, &**c, entropy_scaled)?
                }
            };
            let dstudent = Tensor::from_vec(out.dstudent.concat(), &[rows, k])?;
            Ok(StepLoss {
                terms: Tensor::from_vec(vec![out.entropy, out.consistency], &[2])?,
                dstudent,
            })
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            use crate::ops::gpu::{dbuf, wrap};
            use crate::tensor::DType;
            let Some(dperm) = &partition.on_gpu else {
                bail!(Device, "{op}: the partition has no device copy (a bug)");
            };
            let (s, t) = (student.to_dtype(DType::F32)?, teacher.to_dtype(DType::F32)?);
            let out = match comm {
                None => be.carp_loss_queued(
                    dbuf(op, &s)?,
                    dbuf(op, &t)?,
                    dperm,
                    vs,
                    n,
                    k,
                    nb,
                    (vs + 2) * n,
                    None,
                )?,
                Some(c) => {
                    let (s, t) = (dbuf(op, &s)?, dbuf(op, &t)?);
                    let shape = (vs, n, k, nb);
                    carp_loss_ranks_gpu(&be, s, t, dperm, shape, &**c, entropy_scaled)?
                }
            };
            Ok(StepLoss {
                terms: wrap(&be, out.scalars, &[2])?,
                dstudent: wrap(&be, out.dstudent, &[rows, k])?,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{randn_vec, rng};

    /// The loss restated literally from SPEC.md in f64: gather by perm into [NP, N, NB] per
    /// view, block softmax, the pairs' clamped dot products, pbar over all (V + 2) N rows, H.
    /// Returns (consistency, H).
    fn reference(
        student: &[Vec<f64>],
        teacher: &[Vec<f64>],
        n: usize,
        k: usize,
        nb: usize,
        perm: &[u32],
    ) -> (f64, f64) {
        let np = k / nb;
        let eps = f32::EPSILON as f64;
        let softmaxed = |z: &Vec<f64>| block_probs(z, n, k, nb, perm);
        let sp: Vec<_> = student.iter().map(softmaxed).collect();
        let tp: Vec<_> = teacher.iter().map(softmaxed).collect();
        let mut cons = 0.0;
        let mut count = 0;
        for (a, pa) in sp.iter().enumerate() {
            for (b, qb) in tp.iter().enumerate() {
                if a == b {
                    continue;
                }
                let mut l = 0.0;
                for j in 0..np {
                    for i in 0..n {
                        let s: f64 = (0..nb).map(|c| pa[j][i][c] * qb[j][i][c]).sum();
                        l += -s.clamp(eps, 1.0 - eps).ln();
                    }
                }
                cons += l / (np * n) as f64;
                count += 1;
            }
        }
        cons /= count as f64;
        let all: Vec<_> = sp.iter().chain(tp.iter()).collect();
        let rows = (all.len() * n) as f64;
        let mut h = 0.0;
        for j in 0..np {
            let mut hj = (nb as f64).ln();
            for c in 0..nb {
                let pbar: f64 = all
                    .iter()
                    .map(|p| (0..n).map(|i| p[j][i][c]).sum::<f64>())
                    .sum::<f64>()
                    / rows;
                hj += pbar * pbar.clamp(eps, 1.0 - eps).ln();
            }
            h += hj;
        }
        (cons, h / np as f64)
    }

    /// probs[j][i][c]: the softmax of block j of sample i's logits `z` (N, K) gathered by
    /// `perm`.
    fn block_probs(z: &[f64], n: usize, k: usize, nb: usize, perm: &[u32]) -> Vec<Vec<Vec<f64>>> {
        (0..k / nb)
            .map(|j| {
                (0..n)
                    .map(|i| {
                        let g: Vec<f64> = (0..nb)
                            .map(|c| z[i * k + perm[j * nb + c] as usize])
                            .collect();
                        let m = g.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = g.iter().map(|x| (x - m).exp()).collect();
                        let s: f64 = e.iter().sum();
                        e.iter().map(|x| x / s).collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// SPEC.md's gradient of consistency + H w.r.t. each student view's logits (N, K), in f64,
    /// from its formulas rather than from the kernel's: per row and block, with p the student's
    /// block softmax, consistency -p_k (q_k - s) / s for each teacher view q of another index
    /// (s = <p, q>; zero where the clamp is active), uniformity p_k (g_k - <p, g>) with
    /// g_k = (log pbar_k + 1) / (rows NP) (the 1 dropped where the clamp is active); the
    /// consistency averaged over the pairs, blocks and samples.
    fn reference_grad(
        student: &[Vec<f64>],
        teacher: &[Vec<f64>],
        n: usize,
        k: usize,
        nb: usize,
        perm: &[u32],
    ) -> Vec<Vec<f64>> {
        let np = k / nb;
        let eps = f32::EPSILON as f64;
        let sp: Vec<_> = student
            .iter()
            .map(|z| block_probs(z, n, k, nb, perm))
            .collect();
        let tp: Vec<_> = teacher
            .iter()
            .map(|z| block_probs(z, n, k, nb, perm))
            .collect();
        let pairs = (0..sp.len())
            .flat_map(|a| (0..tp.len()).filter(move |&b| b != a))
            .count() as f64;
        let rows = ((sp.len() + tp.len()) * n) as f64;
        // g[j][c] = dH/dpbar[j][c] / rows / NP.
        let g: Vec<Vec<f64>> = (0..np)
            .map(|j| {
                (0..nb)
                    .map(|c| {
                        let pbar = sp
                            .iter()
                            .chain(&tp)
                            .map(|p| (0..n).map(|i| p[j][i][c]).sum::<f64>())
                            .sum::<f64>()
                            / rows;
                        let clamped = pbar <= eps || pbar >= 1.0 - eps;
                        let d = pbar.clamp(eps, 1.0 - eps).ln() + if clamped { 0.0 } else { 1.0 };
                        d / (rows * np as f64)
                    })
                    .collect()
            })
            .collect();
        sp.iter()
            .enumerate()
            .map(|(a, pa)| {
                let mut dz = vec![0.0; n * k];
                for j in 0..np {
                    for i in 0..n {
                        let p = &pa[j][i];
                        let mut d = vec![0.0; nb];
                        for (b, qb) in tp.iter().enumerate() {
                            if b == a {
                                continue;
                            }
                            let q = &qb[j][i];
                            let s: f64 = (0..nb).map(|c| p[c] * q[c]).sum();
                            if s <= eps || s >= 1.0 - eps {
                                continue;
                            }
                            for c in 0..nb {
                                d[c] += -p[c] * (q[c] - s) / s / (pairs * (np * n) as f64);
                            }
                        }
                        let pg: f64 = (0..nb).map(|c| p[c] * g[j][c]).sum();
                        for c in 0..nb {
                            d[c] += p[c] * (g[j][c] - pg);
                            dz[i * k + perm[j * nb + c] as usize] = d[c];
                        }
                    }
                }
                dz
            })
            .collect()
    }

    fn to64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    /// Random logits with a spread that makes the block distributions far from uniform.
    fn logits(v: usize, n: usize, k: usize, seed: u64, scale: f32) -> Vec<Vec<f32>> {
        (0..v)
            .map(|u| {
                randn_vec(n * k, seed + u as u64)
                    .into_iter()
                    .map(|x| x * scale)
                    .collect()
            })
            .collect()
    }

    fn refs(v: &[Vec<f32>]) -> Vec<&[f32]> {
        v.iter().map(|x| x.as_slice()).collect()
    }

    #[test]
    fn loss_matches_f64_reference() {
        // (N, K, NB, V): several block sizes including NB = K (one block), NB = 1 and 2
        // (clamps active at NB = 1: p = 1), multi-crop V = 3 and 4, and N > PASS1_TASKS so
        // several samples share a pass-1 task.
        let cases = [
            (5, 24, 8, 2),
            (3, 16, 16, 2),
            (4, 12, 1, 2),
            (4, 12, 2, 2),
            (7, 30, 3, 4),
            (6, 64, 16, 4),
            (2, 20, 5, 3),
            (70, 96, 32, 2),
        ];
        for (ci, &(n, k, nb, v)) in cases.iter().enumerate() {
            let seed = 100 * ci as u64;
            let s = logits(v, n, k, seed, 2.5);
            let t = logits(2, n, k, seed + 50, 2.5);
            let perm = random_partition(k, &mut rng(seed + 7));
            let out = carp_loss(&refs(&s), &refs(&t), n, k, nb, &perm).unwrap();
            let s64: Vec<_> = s.iter().map(|x| to64(x)).collect();
            let t64: Vec<_> = t.iter().map(|x| to64(x)).collect();
            let (cons, h) = reference(&s64, &t64, n, k, nb, &perm);
            let what = format!("case {ci} (N {n}, K {k}, NB {nb}, V {v})");
            assert!(
                (out.consistency as f64 - cons).abs() <= 1e-5 * cons.abs().max(1e-3),
                "{what}: consistency {} vs {cons}",
                out.consistency
            );
            assert!(
                (out.entropy as f64 - h).abs() <= 1e-5 * h.abs().max(1e-2),
                "{what}: H {} vs {h}",
                out.entropy
            );
            assert!(((out.loss as f64) - (cons + h)).abs() <= 1e-5 * (cons + h).abs().max(1e-2));
            assert_eq!(out.dstudent.len(), v);
            assert!(out.dstudent.iter().all(|d| d.len() == n * k));
        }
    }

    /// Central finite differences of the f64 reference over every student logit (teacher
    /// fixed) against the analytic gradient. Bound: ||g - g_fd|| / ||g_fd|| < 1e-4, and every
    /// element within 1e-4 * max|g_fd| (f32 arithmetic ~1e-7, FD truncation ~h^2 = 1e-8).
    #[test]
    fn gradient_matches_finite_differences() {
        for (ci, &(n, k, nb, v)) in [(3, 12, 4, 2), (2, 12, 3, 4), (2, 10, 10, 2), (3, 8, 2, 3)]
            .iter()
            .enumerate()
        {
            let seed = 1000 + 10 * ci as u64;
            let s = logits(v, n, k, seed, 1.5);
            let t = logits(2, n, k, seed + 5, 1.5);
            let perm = random_partition(k, &mut rng(seed + 3));
            let out = carp_loss(&refs(&s), &refs(&t), n, k, nb, &perm).unwrap();
            let mut s64: Vec<_> = s.iter().map(|x| to64(x)).collect();
            let t64: Vec<_> = t.iter().map(|x| to64(x)).collect();
            let h = 1e-4;
            let (mut num, mut den, mut maxfd) = (0.0f64, 0.0f64, 0.0f64);
            let mut pairs = Vec::new();
            for a in 0..v {
                for e in 0..n * k {
                    let x0 = s64[a][e];
                    s64[a][e] = x0 + h;
                    let (cp, hp) = reference(&s64, &t64, n, k, nb, &perm);
                    s64[a][e] = x0 - h;
                    let (cm, hm) = reference(&s64, &t64, n, k, nb, &perm);
                    s64[a][e] = x0;
                    let fd = ((cp + hp) - (cm + hm)) / (2.0 * h);
                    let an = out.dstudent[a][e] as f64;
                    num += (an - fd).powi(2);
                    den += fd * fd;
                    maxfd = maxfd.max(fd.abs());
                    pairs.push((an, fd, a, e));
                }
            }
            let rel = (num / den).sqrt();
            assert!(rel < 1e-4, "case {ci}: relative gradient error {rel}");
            // The f64 gradient reference step_loss_on uses, from SPEC's formulas: within the
            // finite differences' truncation.
            let rg = reference_grad(&s64, &t64, n, k, nb, &perm);
            for &(_, fd, a, e) in &pairs {
                assert!(
                    (rg[a][e] - fd).abs() <= 1e-6 * maxfd,
                    "case {ci}: view {a} elem {e}: reference_grad {} vs fd {fd}",
                    rg[a][e]
                );
            }
            for (an, fd, a, e) in pairs {
                assert!(
                    (an - fd).abs() <= 1e-4 * maxfd,
                    "case {ci}: view {a} elem {e}: analytic {an} vs fd {fd}"
                );
            }
        }
    }

    #[test]
    fn equal_logits_give_log_nb_and_zero_h() {
        for &v in &[2usize, 4] {
            let (n, k, nb) = (4, 64, 16);
            // Every row constant (a different constant per row and view): p uniform.
            let row_const = |u: usize| -> Vec<f32> {
                (0..n * k)
                    .map(|e| (e / k) as f32 * 0.7 - u as f32)
                    .collect()
            };
            let s: Vec<Vec<f32>> = (0..v).map(row_const).collect();
            let t: Vec<Vec<f32>> = (0..2).map(|u| row_const(u + 10)).collect();
            let perm = random_partition(k, &mut rng(5));
            let out = carp_loss(&refs(&s), &refs(&t), n, k, nb, &perm).unwrap();
            assert!((out.consistency - (nb as f32).ln()).abs() < 1e-6);
            assert!(out.entropy.abs() < 1e-6, "H {}", out.entropy);
            // The uniform point is stationary: every gradient vanishes.
            let m = out
                .dstudent
                .iter()
                .flatten()
                .fold(0.0f32, |a, &x| a.max(x.abs()));
            assert!(m < 1e-9, "max |grad| {m}");
        }
    }

    #[test]
    fn identical_peaked_views_give_near_zero_consistency() {
        let (n, k, nb) = (5, 48, 12);
        let np = k / nb;
        let perm = random_partition(k, &mut rng(9));
        // One random peak per (row, block) at +25 over small noise; all four views identical,
        // so every pair (a, b) compares a distribution with itself.
        let mut r = rng(10);
        let mut l = randn_vec(n * k, 11)
            .into_iter()
            .map(|x| 0.1 * x)
            .collect::<Vec<f32>>();
        for i in 0..n {
            for j in 0..np {
                let c = rand::Rng::gen_range(&mut r, 0..nb);
                l[i * k + perm[j * nb + c] as usize] += 25.0;
            }
        }
        let views = vec![l.clone(), l.clone()];
        let out = carp_loss(&refs(&views), &refs(&views), n, k, nb, &perm).unwrap();
        assert!(
            out.consistency >= 0.0 && out.consistency < 1e-6,
            "{}",
            out.consistency
        );
        // Consistent with the reference too.
        let v64: Vec<_> = views.iter().map(|x| to64(x)).collect();
        let (c, h) = reference(&v64, &v64, n, k, nb, &perm);
        assert!((out.consistency as f64 - c).abs() < 1e-7);
        assert!((out.entropy as f64 - h).abs() < 1e-5 * h.abs().max(1e-2));
    }

    #[test]
    fn clamp_active_zeroes_the_consistency_gradient() {
        // Students put their mass on the first half of every block, teachers on the second
        // half (logit gap 40): s = <p, q> ~ 1e-18 < eps for every pair, so the consistency is
        // -log(eps) and its gradient is zero. Unclamped, the gradient would be about w / NB
        // (~5e-3 here) on every entry. pbar is uniform, so the uniformity gradient is 0 too.
        let (n, k, nb) = (3, 32, 8);
        let perm = random_partition(k, &mut rng(21));
        let mut first_half = vec![false; k];
        for (pos, &p) in perm.iter().enumerate() {
            first_half[p as usize] = pos % nb < nb / 2;
        }
        let make = |on_first: bool, seed: u64| -> Vec<f32> {
            let noise = randn_vec(n * k, seed);
            (0..n * k)
                .map(|e| {
                    let hot = first_half[e % k] == on_first;
                    // Tiny noise keeps p non-degenerate but the halves far apart.
                    (if hot { 0.0 } else { -40.0 }) + 1e-3 * noise[e]
                })
                .collect()
        };
        let s = vec![make(true, 1), make(true, 2)];
        let t = vec![make(false, 3), make(false, 4)];
        let out = carp_loss(&refs(&s), &refs(&t), n, k, nb, &perm).unwrap();
        let want = -(f32::EPSILON as f64).ln(); // 15.942385
        assert!(
            (out.consistency as f64 - want).abs() < 1e-5,
            "{}",
            out.consistency
        );
        let m = out
            .dstudent
            .iter()
            .flatten()
            .fold(0.0f32, |a, &x| a.max(x.abs()));
        // The uniformity gradient from the 1e-3 noise is O(1e-3 * gscale) at most.
        assert!(m < 1e-5, "max |grad| {m} with the clamp active");
    }

    #[test]
    fn fast_exp_matches_f64_exp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_37;
        }
        // Within 2 ulp (f32 ulp is 2^-23 ~ 1.19e-7 relative at most).
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        // Below the clamp: tiny and finite, never NaN or negative.
        let t = exp_f32(-1000.0);
        assert!(t > 0.0 && t < 1.3e-38);
        assert!(exp_f32(f32::NEG_INFINITY) < 1.3e-38);
    }

    #[test]
    fn partition_is_a_deterministic_permutation() {
        let k = 1000;
        let a = random_partition(k, &mut rng(42));
        let b = random_partition(k, &mut rng(42));
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..k as u32).collect::<Vec<_>>());
        let c = random_partition(k, &mut rng(43));
        assert_ne!(a, c);
        // A new draw from the same stream differs (a new partition every step).
        let mut r = rng(42);
        let d1 = random_partition(k, &mut r);
        let d2 = random_partition(k, &mut r);
        assert_eq!(d1, a);
        assert_ne!(d1, d2);
    }

    #[test]
    fn distributed_matches_single_rank() {
        // Two ranks of 3 samples against one rank of 6: same H; mean consistency; each rank's
        // gradient = world * the full-batch gradient of its rows (see carp_loss_pass2).
        let (n, k, nb, v) = (6, 40, 8, 3);
        let s = logits(v, n, k, 300, 2.0);
        let t = logits(2, n, k, 310, 2.0);
        let perm = random_partition(k, &mut rng(33));
        let full = carp_loss(&refs(&s), &refs(&t), n, k, nb, &perm).unwrap();
        let half = |x: &Vec<f32>, r: usize| x[r * 3 * k..(r + 1) * 3 * k].to_vec();
        type Shard = (Vec<Vec<f32>>, Vec<Vec<f32>>); // (student views, teacher views)
        let shards: Vec<Shard> = (0..2)
            .map(|r| {
                (
                    s.iter().map(|x| half(x, r)).collect(),
                    t.iter().map(|x| half(x, r)).collect(),
                )
            })
            .collect();
        let p1: Vec<CarpPass1> = shards
            .iter()
            .map(|(ss, tt)| carp_loss_pass1(&refs(ss), &refs(tt), 3, k, nb, &perm).unwrap())
            .collect();
        let total: Vec<f64> = (0..k)
            .map(|c| p1[0].pbar_sum[c] + p1[1].pbar_sum[c])
            .collect();
        let mut cons = 0.0;
        for r in 0..2 {
            let (ss, tt) = &shards[r];
            let other = p1[1 - r].pbar_sum.clone();
            let out = carp_loss_dist(&refs(ss), &refs(tt), 3, k, nb, &perm, 2, &mut |x| {
                x.iter_mut().zip(&other).for_each(|(a, b)| *a += b);
                Ok(())
            })
            .unwrap();
            let out2 = carp_loss_pass2(&refs(ss), &refs(tt), &perm, &p1[r], &total, 2).unwrap();
            assert_eq!(out.loss, out2.loss);
            assert!((out.entropy - full.entropy).abs() < 1e-6);
            cons += out.consistency / 2.0;
            for a in 0..v {
                for e in 0..3 * k {
                    let want = 2.0 * full.dstudent[a][r * 3 * k + e];
                    let got = out.dstudent[a][e];
                    assert!(
                        (got - want).abs() < 1e-6 * (1.0 + want.abs() * 1e3),
                        "{got} {want}"
                    );
                }
            }
        }
        assert!((cons - full.consistency).abs() < 1e-5);
    }

    #[test]
    fn errors_instead_of_panics() {
        let (n, k, nb) = (2, 8, 4);
        let s = logits(2, n, k, 1, 1.0);
        let t = logits(2, n, k, 2, 1.0);
        let perm = random_partition(k, &mut rng(1));
        let ok = |s: &[Vec<f32>], t: &[Vec<f32>], kk: usize, nbb: usize, p: &[u32]| {
            carp_loss(&refs(s), &refs(t), n, kk, nbb, p)
        };
        assert!(ok(&s, &t, k, nb, &perm).is_ok());
        assert!(ok(&s, &t, k, 3, &perm).is_err()); // K % NB != 0
        assert!(ok(&s[..1], &t, k, nb, &perm).is_err()); // one student view
        assert!(ok(&s, &t[..1], k, nb, &perm).is_err()); // one teacher view
        assert!(ok(&s, &t, k, nb, &perm[..7]).is_err()); // short perm
        let mut dup = perm.clone();
        dup[0] = dup[1];
        assert!(ok(&s, &t, k, nb, &dup).is_err()); // not a permutation
        let mut short = s.clone();
        short[1].pop();
        assert!(ok(&short, &t, k, nb, &perm).is_err()); // wrong length
        let mut bad = t.clone();
        bad[1][5] = f32::NAN;
        let e = ok(&s, &bad, k, nb, &perm).err().unwrap().to_string();
        assert!(e.contains("teacher view 1"), "{e}");
        let mut bad = s.clone();
        bad[0][3] = f32::NEG_INFINITY;
        let e = ok(&bad, &t, k, nb, &perm).err().unwrap().to_string();
        assert!(e.contains("student view 0"), "{e}");
    }

    /// The op on the logits' device against the literal f64 SPEC loss (terms and their sum) and
    /// SPEC's f64 gradient (`reference_grad`, itself checked against finite differences above),
    /// with the views in view-major rows; bf16 logits widen exactly; shape and partition errors.
    fn step_loss_on(dev: &Device) {
        for (vs, n, k, nb, seed) in [
            (2usize, 5usize, 48usize, 16usize, 31u64),
            (4, 3, 60, 20, 41),
        ] {
            let s = logits(vs, n, k, seed, 3.0);
            let t = logits(2, n, k, seed + 1, 3.0);
            let perm = random_partition(k, &mut rng(seed + 2));
            let on = |v: &[Vec<f32>]| {
                Tensor::from_vec(v.concat(), &[v.len() * n, k])
                    .unwrap()
                    .to_device(dev)
                    .unwrap()
            };
            let (st, tt) = (on(&s), on(&t));
            let part = Partition::on(perm.clone(), dev).unwrap();
            let out = carp_loss_forward(&st, &tt, vs, nb, &part).unwrap();
            assert_eq!(out.terms.device(), *dev);
            assert_eq!(out.dstudent.shape(), &[vs * n, k]);
            let (loss, cons, h) = out.read().unwrap();
            let s64: Vec<Vec<f64>> = s.iter().map(|v| to64(v)).collect();
            let t64: Vec<Vec<f64>> = t.iter().map(|v| to64(v)).collect();
            let (rc, rh) = reference(&s64, &t64, n, k, nb, &perm);
            let tag = format!("{dev} vs={vs} n={n} k={k}");
            assert!(
                (loss as f64 - (rc + rh)).abs() <= 1e-5 * (rc + rh).abs().max(1.0),
                "{tag}: loss {loss} vs {}",
                rc + rh
            );
            assert!(
                (cons as f64 - rc).abs() <= 1e-5 * rc.abs().max(1.0),
                "{tag}: consistency {cons} vs {rc}"
            );
            assert!(
                (h as f64 - rh).abs() <= 1e-5 * rh.abs().max(1e-3),
                "{tag}: H {h} vs {rh}"
            );
            let want = reference_grad(&s64, &t64, n, k, nb, &perm).concat();
            let got = out.dstudent.to_vec().unwrap();
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let (mut worst, mut at) = (0f64, 0);
            for (e, (&a, &b)) in got.iter().zip(&want).enumerate() {
                if (a as f64 - b).abs() > worst {
                    (worst, at) = ((a as f64 - b).abs(), e);
                }
            }
            // f32 arithmetic against f64; the fused GPU kernel also sums in another order.
            let tol = if *dev == Device::Cpu { 1e-5 } else { 1e-4 };
            assert!(
                worst <= tol * scale,
                "{tag}: dstudent element {at}: {} vs SPEC's {} (max |d| {scale})",
                got[at],
                want[at]
            );
            // bf16 logits (a bf16 step's on a GPU; the CPU holds bf16 values in f32) are
            // widened to f32 first: the same loss as the widened values give.
            if *dev != Device::Cpu {
                let sb = st.to_dtype(crate::tensor::DType::Bf16).unwrap();
                let widened = sb.to_dtype(crate::tensor::DType::F32).unwrap();
                let a = carp_loss_forward(&sb, &tt, vs, nb, &part)
                    .unwrap()
                    .read()
                    .unwrap();
                let b = carp_loss_forward(&widened, &tt, vs, nb, &part)
                    .unwrap()
                    .read()
                    .unwrap();
                assert_eq!(a, b, "{tag}: bf16 logits");
            }
            // Errors: a partition of another K, rows that are not vs views, a teacher of
            // another batch.
            let short = Partition::on(perm[..k - nb].to_vec(), dev).unwrap();
            let e = carp_loss_forward(&st, &tt, vs, nb, &short)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("partition of"), "{e}");
            let e = carp_loss_forward(&st, &tt, vs + 1, nb, &part)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("views"), "{e}");
            let e = carp_loss_forward(&tt, &st, 2, nb, &part).err();
            assert!(
                vs == 2 || e.is_some(),
                "{tag}: a teacher of {vs} views was accepted"
            );
        }
    }
    crate::test_device!(step_loss_on, step_loss_cpu, step_loss_cuda);

    /// The loss across W thread ranks (`carp_loss_forward_on` with a collective), each rank
    /// holding its rows of every view, against the whole batch on one rank on the same device:
    /// every rank reports the whole batch's terms, and its gradient is W times the whole
    /// batch's on its rows (the gradient average across ranks divides by W). On a GPU: the
    /// loss kernels with the pbar all-reduce in their hook and the consistency averaged after.
    fn loss_across_ranks_on(dev: &Device) {
        use crate::device::collective::ThreadGroup;
        let (vs, n, k, nb) = (4usize, 8usize, 48usize, 16usize);
        let s = logits(vs, n, k, 51, 3.0);
        let t = logits(2, n, k, 52, 3.0);
        let perm = random_partition(k, &mut rng(53));
        // Rows `rows` of every view, view-major, on the device.
        let on = |v: &[Vec<f32>], rows: std::ops::Range<usize>| {
            let data: Vec<f32> = v
                .iter()
                .flat_map(|view| view[rows.start * k..rows.end * k].to_vec())
                .collect();
            Tensor::from_vec(data, &[v.len() * rows.len(), k])
                .unwrap()
                .to_device(dev)
                .unwrap()
        };
        let part = Partition::on(perm.clone(), dev).unwrap();
        let whole = carp_loss_forward(&on(&s, 0..n), &on(&t, 0..n), vs, nb, &part).unwrap();
        let (wt, wg) = (whole.read().unwrap(), whole.dstudent.to_vec().unwrap());
        let scale = wg.iter().fold(0f32, |m, v| m.max(v.abs()));
        let tol = if *dev == Device::Cpu { 1e-5 } else { 1e-4 };
        for world in [2usize, 4] {
            let per = n / world;
            let got: Vec<((f32, f32, f32), Vec<f32>)> = std::thread::scope(|sc| {
                let hs: Vec<_> = ThreadGroup::ranks(world)
                    .unwrap()
                    .into_iter()
                    .enumerate()
                    .map(|(r, comm)| {
                        let (on, part) = (&on, &part);
                        let (s, t) = (&s, &t);
                        sc.spawn(move || {
                            let rows = r * per..(r + 1) * per;
                            let (st, tt) = (on(s, rows.clone()), on(t, rows));
                            let out =
                                carp_loss_forward_on(&st, &tt, vs, nb, part, Some(&comm)).unwrap();
                            (out.read().unwrap(), out.dstudent.to_vec().unwrap())
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (r, (terms, g)) in got.iter().enumerate() {
                let tag = format!("{dev}, world {world}, rank {r}");
                for (name, a, b) in [
                    ("loss", terms.0, wt.0),
                    ("consistency", terms.1, wt.1),
                    ("entropy", terms.2, wt.2),
                ] {
                    assert!(
                        (a - b).abs() <= tol * b.abs().max(1.0),
                        "{tag}: {name} {a}, the whole batch's {b}"
                    );
                }
                for v in 0..vs {
                    for i in 0..per * k {
                        let a = g[v * per * k + i];
                        let b = world as f32 * wg[(v * n + r * per) * k + i];
                        assert!(
                            (a - b).abs() <= tol * world as f32 * scale,
                            "{tag}: dstudent view {v} element {i}: {a}, W x the whole batch's {b}"
                        );
                    }
                }
            }
        }
    }
    crate::test_device!(
        loss_across_ranks_on,
        loss_across_ranks_cpu,
        loss_across_ranks_cuda
    );

    /// Timing at full size (N 256, K 65536, NB 512): `cargo test --release -- --ignored
    /// carp_loss_full_size --nocapture`.
    #[test]
    #[ignore]
    fn carp_loss_full_size() {
        let (n, k, nb) = (256, 65536, 512);
        let s = logits(2, n, k, 1, 3.0);
        let t = logits(2, n, k, 3, 3.0);
        let perm = random_partition(k, &mut rng(1));
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            let p1 = carp_loss_pass1(&refs(&s), &refs(&t), n, k, nb, &perm).unwrap();
            let t1 = t0.elapsed().as_secs_f64();
            let out = carp_loss_pass2(&refs(&s), &refs(&t), &perm, &p1, &p1.pbar_sum, 1).unwrap();
            eprintln!(
                "carp_loss N {n} K {k} NB {nb}: {:.3} s, pass 1 {t1:.3} s (loss {}, {} threads)",
                t0.elapsed().as_secs_f64(),
                out.loss,
                rayon::current_num_threads()
            );
        }
    }
}
