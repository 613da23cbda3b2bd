//! The two views of SPEC.md ("Views") and the evaluation transform.
//!
//! The work is split in two so a GPU backend can take over the second half:
//! 1. geometry on the CPU (`sample_view`): random resized crop with bicubic resampling and the
//!    horizontal flip, producing a u8 (S, S, 3) crop, plus the view's drawn colour parameters
//!    (`ColorParams`: jitter factors and order, grayscale, blur sigma, solarize);
//! 2. colour (`finish`): applies those parameters and the normalization, writing f32 (3, S, S).
//!
//! Colour operations follow torchvision's tensor definitions on [0, 1] floats (each clamps to
//! [0, 1]); grayscale weights 0.299/0.587/0.114. Where the reference (DINO's PIL pipeline)
//! works on u8 images between operations, this works on f32 and rounds nothing: the results
//! differ by less than one grey level per operation. The blur is an exact separable Gaussian
//! of radius ceil(3 sigma) with clamped edges (PIL's GaussianBlur approximates the same
//! Gaussian with box passes); the resampling is PIL's antialiased bicubic (a = -0.5).

use rand::Rng;

use crate::data::decode::Image;

/// ImageNet normalization (SPEC.md "Views").
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// View parameters; `Default` is SPEC.md's 224x224 recipe, `imagenet(size)` the same at `size`.
#[derive(Clone, Debug, PartialEq)]
pub struct ViewConfig {
    /// Output side S.
    pub size: usize,
    /// Random resized crop: area fraction range and aspect ratio range.
    pub min_scale: f32,
    pub max_scale: f32,
    pub min_ratio: f32,
    pub max_ratio: f32,
    pub flip_p: f32,
    /// Colour jitter probability and strengths (torchvision ColorJitter semantics).
    pub jitter_p: f32,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    pub grayscale_p: f32,
    /// Gaussian blur probability per view (view 1, view 2) and the sigma range in output pixels.
    pub blur_p: [f32; 2],
    pub blur_sigma: (f32, f32),
    /// Solarize probability per view and its threshold on the 0..255 scale.
    pub solarize_p: [f32; 2],
    pub solarize_threshold: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Optional multi-crop (SPEC.md, beyond the seed): this many local views per image
    /// (0 = none), of side `local_size`, area fraction (`local_min_scale`, `local_max_scale`),
    /// blur probability `local_blur_p`, never solarized; the rest as the global views.
    pub local_count: usize,
    pub local_size: usize,
    pub local_min_scale: f32,
    pub local_max_scale: f32,
    pub local_blur_p: f32,
}

impl ViewConfig {
    /// SPEC.md's view recipe at output side `size`.
    pub fn imagenet(size: usize) -> ViewConfig {
        ViewConfig {
            size,
            min_scale: 0.2,
            max_scale: 1.0,
            min_ratio: 3.0 / 4.0,
            max_ratio: 4.0 / 3.0,
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_p: [1.0, 0.1],
            blur_sigma: (0.1, 2.0),
            solarize_p: [0.0, 0.2],
            solarize_threshold: 128.0,
            mean: MEAN,
            std: STD,
            local_count: 0,
            // 96 at 224, in proportion otherwise.
            local_size: (size * 96).div_ceil(224).max(1),
            local_min_scale: 0.05,
            local_max_scale: 0.2,
            local_blur_p: 0.5,
        }
    }
}

impl ViewConfig {
    /// Checks ranges so that sampling can never panic or produce NaNs.
    pub fn validate(&self) -> crate::error::Result<()> {
        let bad = |m: String| Err(crate::error::Error::Config(format!("view config: {m}")));
        if self.size == 0 {
            return bad("size must be at least 1".into());
        }
        if !(self.min_scale > 0.0 && self.min_scale <= self.max_scale && self.max_scale <= 1.0) {
            return bad(format!(
                "crop scale ({}, {}) must satisfy 0 < min <= max <= 1",
                self.min_scale, self.max_scale
            ));
        }
        if !(self.min_ratio > 0.0 && self.min_ratio <= self.max_ratio && self.max_ratio.is_finite())
        {
            return bad(format!(
                "crop ratio ({}, {}) must satisfy 0 < min <= max",
                self.min_ratio, self.max_ratio
            ));
        }
        if self.local_count > 0
            && !(self.local_size > 0
                && self.local_min_scale > 0.0
                && self.local_min_scale <= self.local_max_scale
                && self.local_max_scale <= 1.0)
        {
            return bad(format!(
                "local views: size {} and scale ({}, {}) must satisfy size >= 1, 0 < min <= max <= 1",
                self.local_size, self.local_min_scale, self.local_max_scale
            ));
        }
        let probs = [
            self.local_blur_p,
            self.flip_p,
            self.jitter_p,
            self.grayscale_p,
            self.blur_p[0],
            self.blur_p[1],
            self.solarize_p[0],
            self.solarize_p[1],
        ];
        if probs.iter().any(|p| !(0.0..=1.0).contains(p)) {
            return bad(format!("probabilities {probs:?} must lie in [0, 1]"));
        }
        let strengths = [self.brightness, self.contrast, self.saturation];
        if strengths.iter().any(|v| !(v.is_finite() && *v >= 0.0))
            || !(0.0..=0.5).contains(&self.hue)
        {
            return bad(format!(
                "jitter strengths {strengths:?} must be >= 0 and hue {} in [0, 0.5]",
                self.hue
            ));
        }
        let (s0, s1) = self.blur_sigma;
        if !(s0 >= 0.0 && s0 <= s1 && s1 <= 100.0) {
            return bad(format!(
                "blur sigma ({s0}, {s1}) must satisfy 0 <= min <= max <= 100"
            ));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || !self.solarize_threshold.is_finite()
        {
            return bad(format!("std {:?} must be positive", self.std));
        }
        Ok(())
    }
}

impl Default for ViewConfig {
    fn default() -> Self {
        ViewConfig::imagenet(224)
    }
}

/// The colour half of one view, drawn on the CPU with the geometry; applied by `finish`
/// (or, later, by a GPU kernel). `#[repr(C)]` and Pod so it can be uploaded as is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ColorParams {
    /// Multiplicative factors (1 = identity) and the hue shift (0 = identity, in turns).
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    /// Blur sigma in output pixels; 0 = no blur.
    pub blur_sigma: f32,
    /// Order of the four jitter operations: 0 brightness, 1 contrast, 2 saturation, 3 hue.
    pub order: [u8; 4],
    /// 1 when colour jitter is applied.
    pub jitter: u8,
    /// 1 when converted to grayscale (after jitter).
    pub grayscale: u8,
    /// 1 when solarized (after blur).
    pub solarize: u8,
    pub flipped: u8,
}

impl ColorParams {
    /// No colour change (evaluation): normalization only.
    pub fn identity() -> ColorParams {
        ColorParams {
            brightness: 1.0,
            contrast: 1.0,
            saturation: 1.0,
            hue: 0.0,
            blur_sigma: 0.0,
            order: [0, 1, 2, 3],
            jitter: 0,
            grayscale: 0,
            solarize: 0,
            flipped: 0,
        }
    }
}

/// A crop rectangle in source pixels (integers, as torchvision draws them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at a random area fraction and
/// log-uniform aspect ratio, then a centre crop clamped to the ratio range.
pub fn random_resized_crop_box<R: Rng>(
    rng: &mut R,
    h: usize,
    w: usize,
    scale: (f32, f32),
    ratio: (f32, f32),
) -> CropBox {
    let area = (h * w) as f64;
    let (lr0, lr1) = ((ratio.0 as f64).ln(), (ratio.1 as f64).ln());
    for _ in 0..10 {
        let target = area * uniform(rng, scale.0 as f64, scale.1 as f64);
        let aspect = uniform(rng, lr0, lr1).exp();
        let cw = (target * aspect).sqrt().round() as usize;
        let ch = (target / aspect).sqrt().round() as usize;
        if cw > 0 && cw <= w && ch > 0 && ch <= h {
            let top = rng.gen_range(0..=h - ch);
            let left = rng.gen_range(0..=w - cw);
            return CropBox {
                top,
                left,
                height: ch,
                width: cw,
            };
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < ratio.0 as f64 {
        (((w as f64) / ratio.0 as f64).round() as usize, w)
    } else if in_ratio > ratio.1 as f64 {
        (h, ((h as f64) * ratio.1 as f64).round() as usize)
    } else {
        (h, w)
    };
    let (ch, cw) = (ch.clamp(1, h), cw.clamp(1, w));
    CropBox {
        top: (h - ch) / 2,
        left: (w - cw) / 2,
        height: ch,
        width: cw,
    }
}

fn uniform<R: Rng>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    if hi > lo {
        rng.gen_range(lo..hi)
    } else {
        lo
    }
}

fn uniform32<R: Rng>(rng: &mut R, lo: f32, hi: f32) -> f32 {
    if hi > lo {
        rng.gen_range(lo..hi)
    } else {
        lo
    }
}

/// Bicubic kernel with a = -0.5 (PIL's, which torchvision uses on PIL images).
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output coordinate: first input index and normalized weights (PIL's antialiased
/// resampling: the kernel widens by the scale factor when shrinking).
struct Taps {
    start: Vec<usize>,
    /// Number of taps in bounds for each output coordinate (start + len <= in_size).
    len: Vec<usize>,
    /// (out, ksize) weights, zero-padded.
    weights: Vec<f32>,
    ksize: usize,
}

fn taps(in_size: usize, box0: f64, box_len: f64, out_size: usize) -> Taps {
    let scale = box_len / out_size as f64;
    let fscale = scale.max(1.0);
    let support = 2.0 * fscale;
    let ksize = (support.ceil() as usize) * 2 + 1;
    let mut start = Vec::with_capacity(out_size);
    let mut lens = Vec::with_capacity(out_size);
    let mut weights = vec![0f32; out_size * ksize];
    for i in 0..out_size {
        let center = box0 + (i as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5).floor().max(0.0) as usize).min(in_size - 1);
        let xmax = ((center + support + 0.5).floor() as isize)
            .clamp(xmin as isize + 1, in_size as isize) as usize;
        let n = (xmax - xmin).min(ksize);
        let wrow = &mut weights[i * ksize..i * ksize + n];
        let mut total = 0.0f64;
        for (k, wk) in wrow.iter_mut().enumerate() {
            let v = cubic((k as f64 + xmin as f64 - center + 0.5) / fscale);
            *wk = v as f32;
            total += v;
        }
        if total != 0.0 {
            let inv = (1.0 / total) as f32;
            wrow.iter_mut().for_each(|v| *v *= inv);
        }
        start.push(xmin);
        lens.push(n);
    }
    Taps {
        start,
        len: lens,
        weights,
        ksize,
    }
}

/// Resamples the box (top, left, height, width) — real-valued, in source pixels — of `img`
/// to (out_h, out_w, 3) u8 with antialiased bicubic, mirrored horizontally if `flip`.
#[allow(clippy::too_many_arguments)] // a box and an output shape: clearer flat than bundled
pub fn resample(
    img: &Image,
    top: f64,
    left: f64,
    height: f64,
    width: f64,
    out_h: usize,
    out_w: usize,
    flip: bool,
) -> Vec<u8> {
    let mut out = vec![0u8; out_h * out_w * 3];
    resample_into(img, top, left, height, width, out_h, out_w, flip, &mut out);
    out
}

/// Per-thread scratch of the resampler, reused across calls (no per-view allocation).
#[derive(Default)]
struct ResampleScratch {
    /// One source row's touched columns as RGBx f32, zero-padded by the tap count: (cols + K, 4)
    row: Vec<[f32; 4]>,
    /// Horizontal taps padded to a fixed count K: (out_w, K)
    hw: Vec<f32>,
    /// Horizontal pass output: (rows, out_w, 3)
    tmp: Vec<f32>,
    /// One output row's accumulator: (out_w * 3)
    acc: Vec<f32>,
}

/// The largest horizontal-pass buffer a thread keeps between resizes (16 MB).
const KEEP_SCRATCH_FLOATS: usize = 1 << 22;

thread_local! {
    static SCRATCH: std::cell::RefCell<ResampleScratch> =
        std::cell::RefCell::new(ResampleScratch::default());
}

/// `resample` into `out` (out_h, out_w, 3), which must hold exactly out_h * out_w * 3 bytes.
///
/// The same arithmetic as the plain two-pass loop (f32 taps normalized in f64, f32 sums in
/// tap order, f32 intermediate, one rounding at the end), arranged to vectorize: the
/// horizontal pass reads only the crop's rows and columns, converted once to RGBx f32, with
/// every output column's taps zero-padded to one count K (adding 0 * x leaves a sum
/// unchanged); the vertical pass is whole-row multiply-adds. On x86-64 with AVX2 the same code
/// is compiled for AVX2 and chosen at run time; no FMA is enabled, so the results are
/// bit-identical on every path.
#[allow(clippy::too_many_arguments)]
pub fn resample_into(
    img: &Image,
    top: f64,
    left: f64,
    height: f64,
    width: f64,
    out_h: usize,
    out_w: usize,
    flip: bool,
    out: &mut [u8],
) {
    assert_eq!(out.len(), out_h * out_w * 3, "resample_into: output size");
    if out_h == 0 || out_w == 0 || img.height == 0 || img.width == 0 {
        return;
    }
    let tx = taps(img.width, left, width, out_w);
    let ty = taps(img.height, top, height, out_h);
    SCRATCH.with(|sc| {
        let sc = &mut *sc.borrow_mut();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { resample_avx2(img, &tx, &ty, out_h, out_w, flip, sc, out) };
            return;
        }
        resample_body(img, &tx, &ty, out_h, out_w, flip, sc, out);
    });
    // Keep the scratch of ordinary views; release what an outsized resize (packing a huge
    // image, say) grew it to.
    SCRATCH.with(|sc| {
        let sc = &mut *sc.borrow_mut();
        if sc.tmp.capacity() > KEEP_SCRATCH_FLOATS || sc.row.capacity() > KEEP_SCRATCH_FLOATS / 4 {
            *sc = ResampleScratch::default();
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn resample_avx2(
    img: &Image,
    tx: &Taps,
    ty: &Taps,
    out_h: usize,
    out_w: usize,
    flip: bool,
    sc: &mut ResampleScratch,
    out: &mut [u8],
) {
    resample_body(img, tx, ty, out_h, out_w, flip, sc, out)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn resample_body(
    img: &Image,
    tx: &Taps,
    ty: &Taps,
    out_h: usize,
    out_w: usize,
    flip: bool,
    sc: &mut ResampleScratch,
    out: &mut [u8],
) {
    let w = img.width;
    // Source rows and columns touched by the taps.
    let span = |t: &Taps| {
        let a = t.start.iter().copied().min().unwrap_or(0);
        let b = t
            .start
            .iter()
            .zip(&t.len)
            .map(|(&s, &n)| s + n)
            .max()
            .unwrap_or(0)
            .max(a + 1);
        (a, b)
    };
    let (r0, r1) = span(ty);
    let (c0, c1) = span(tx);
    // Horizontal taps padded to K = the longest in-bounds tap list, relative to column c0.
    let k = tx.len.iter().copied().max().unwrap_or(1).max(1);
    sc.hw.clear();
    sc.hw.resize(out_w * k, 0.0);
    for x in 0..out_w {
        let n = tx.len[x];
        sc.hw[x * k..x * k + n].copy_from_slice(&tx.weights[x * tx.ksize..x * tx.ksize + n]);
    }
    let cols = c1 - c0;
    sc.row.clear();
    sc.row.resize(cols + k, [0.0; 4]);
    sc.tmp.clear();
    sc.tmp.resize((r1 - r0) * out_w * 3 + 1, 0.0); // + 1: see the stores below
                                                   // Horizontal pass: (r1 - r0, out_w, 3)
    for y in r0..r1 {
        let src = &img.data[(y * w + c0) * 3..(y * w + c1) * 3];
        for (d, p) in sc.row[..cols].iter_mut().zip(src.chunks_exact(3)) {
            *d = [p[0] as f32, p[1] as f32, p[2] as f32, 0.0];
        }
        // This row plus the next row's first float (or the buffer's padding float): the
        // 4-lane stores below spill their unused 4th lane one float ahead, which the next
        // store (output columns go in ascending order) or the next row overwrites.
        let trow = &mut sc.tmp[(y - r0) * out_w * 3..(y - r0 + 1) * out_w * 3 + 1];
        // Four output columns at a time: four independent sums hide the add latency (each
        // sum still runs over its taps in order, so the result is unchanged).
        let mut xo = 0;
        #[cfg(target_arch = "x86_64")]
        while xo + 4 <= out_w {
            use std::arch::x86_64::*;
            let col = |j: usize| if flip { out_w - 1 - (xo + j) } else { xo + j };
            let (xa, xb, xc, xd) = (col(0), col(1), col(2), col(3));
            let (sa, sb, scc, sd) = (
                tx.start[xa] - c0,
                tx.start[xb] - c0,
                tx.start[xc] - c0,
                tx.start[xd] - c0,
            );
            let (wa, wb, wc, wd) = (
                &sc.hw[xa * k..(xa + 1) * k],
                &sc.hw[xb * k..(xb + 1) * k],
                &sc.hw[xc * k..(xc + 1) * k],
                &sc.hw[xd * k..(xd + 1) * k],
            );
            let (pa, pb, pc, pd) = (
                &sc.row[sa..sa + k],
                &sc.row[sb..sb + k],
                &sc.row[scc..scc + k],
                &sc.row[sd..sd + k],
            );
            // SAFETY: SSE is part of the x86-64 baseline; the loads read [f32; 4] elements
            // of the slices above (all of length k); the stores write trow[xo*3 .. xo*3 + 13],
            // in bounds since xo + 4 <= out_w and trow has out_w * 3 + 1 floats.
            unsafe {
                let (mut a, mut b, mut c, mut d) = (
                    _mm_setzero_ps(),
                    _mm_setzero_ps(),
                    _mm_setzero_ps(),
                    _mm_setzero_ps(),
                );
                for j in 0..k {
                    a = _mm_add_ps(
                        a,
                        _mm_mul_ps(_mm_set1_ps(wa[j]), _mm_loadu_ps(pa[j].as_ptr())),
                    );
                    b = _mm_add_ps(
                        b,
                        _mm_mul_ps(_mm_set1_ps(wb[j]), _mm_loadu_ps(pb[j].as_ptr())),
                    );
                    c = _mm_add_ps(
                        c,
                        _mm_mul_ps(_mm_set1_ps(wc[j]), _mm_loadu_ps(pc[j].as_ptr())),
                    );
                    d = _mm_add_ps(
                        d,
                        _mm_mul_ps(_mm_set1_ps(wd[j]), _mm_loadu_ps(pd[j].as_ptr())),
                    );
                }
                debug_assert!(xo * 3 + 13 <= trow.len());
                let o = trow.as_mut_ptr().add(xo * 3);
                _mm_storeu_ps(o, a);
                _mm_storeu_ps(o.add(3), b);
                _mm_storeu_ps(o.add(6), c);
                _mm_storeu_ps(o.add(9), d);
            }
            xo += 4;
        }
        for xo in xo..out_w {
            let x = if flip { out_w - 1 - xo } else { xo };
            let s = tx.start[x] - c0;
            let ws = &sc.hw[x * k..(x + 1) * k];
            let px = &sc.row[s..s + k];
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::x86_64::*;
                // SAFETY: SSE is part of the x86-64 baseline; every load reads one
                // [f32; 4] of `px` and the store writes trow[xo*3 .. xo*3 + 4], in bounds
                // since trow has out_w * 3 + 1 floats.
                unsafe {
                    let mut acc = _mm_setzero_ps();
                    for (&wk, p) in ws.iter().zip(px) {
                        acc =
                            _mm_add_ps(acc, _mm_mul_ps(_mm_set1_ps(wk), _mm_loadu_ps(p.as_ptr())));
                    }
                    debug_assert!(xo * 3 + 4 <= trow.len());
                    _mm_storeu_ps(trow.as_mut_ptr().add(xo * 3), acc);
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let mut acc = [0f32; 4];
                for (&wk, p) in ws.iter().zip(px) {
                    for c in 0..4 {
                        acc[c] += wk * p[c];
                    }
                }
                trow[xo * 3..xo * 3 + 3].copy_from_slice(&acc[..3]);
            }
        }
    }
    // Vertical pass: (out_h, out_w, 3) u8, rounded and clamped as PIL does.
    sc.acc.clear();
    sc.acc.resize(out_w * 3, 0.0);
    for y in 0..out_h {
        let (s, n) = (ty.start[y], ty.len[y]);
        let ws = &ty.weights[y * ty.ksize..y * ty.ksize + n];
        // Whole-row multiply-adds (vectorize).
        sc.acc.fill(0.0);
        for (j, &wj) in ws.iter().enumerate() {
            let trow = &sc.tmp[(s + j - r0) * out_w * 3..(s + j - r0 + 1) * out_w * 3];
            for (a, &t) in sc.acc.iter_mut().zip(trow) {
                *a += wj * t;
            }
        }
        let orow = &mut out[y * out_w * 3..(y + 1) * out_w * 3];
        for (o, &a) in orow.iter_mut().zip(&sc.acc) {
            // round-half-up on the clamped (non-negative) value: equal to round() there,
            // and it vectorizes (round() is a libm call without SSE4.1).
            *o = (a.clamp(0.0, 255.0) + 0.5) as u8;
        }
    }
}

/// Draws one view's geometry and colour parameters; returns the u8 (S, S, 3) crop.
/// `view` is 0 for view 1 and 1 for view 2 (they differ in blur and solarize probability);
/// 2 (or more) draws a local view: side `local_size`, local scale range and blur probability,
/// no solarize.
pub fn sample_view<R: Rng>(
    img: &Image,
    cfg: &ViewConfig,
    view: usize,
    rng: &mut R,
) -> (Vec<u8>, ColorParams) {
    let size = if view >= 2 { cfg.local_size } else { cfg.size };
    let mut crop = vec![0u8; size * size * 3];
    let p = sample_view_into(img, cfg, view, rng, &mut crop);
    (crop, p)
}

/// `sample_view` writing the (S, S, 3) crop into `out` (S = `size`, or `local_size` for a
/// local view), which must hold exactly S * S * 3 bytes. Draws the same numbers.
pub fn sample_view_into<R: Rng>(
    img: &Image,
    cfg: &ViewConfig,
    view: usize,
    rng: &mut R,
    out: &mut [u8],
) -> ColorParams {
    let local = view >= 2;
    let v = view.min(1);
    let (size, scale) = if local {
        (cfg.local_size, (cfg.local_min_scale, cfg.local_max_scale))
    } else {
        (cfg.size, (cfg.min_scale, cfg.max_scale))
    };
    let b = random_resized_crop_box(
        rng,
        img.height,
        img.width,
        scale,
        (cfg.min_ratio, cfg.max_ratio),
    );
    let flip = rng.gen::<f32>() < cfg.flip_p;
    resample_into(
        img,
        b.top as f64,
        b.left as f64,
        b.height as f64,
        b.width as f64,
        size,
        size,
        flip,
        out,
    );
    let mut p = ColorParams::identity();
    p.flipped = flip as u8;
    if rng.gen::<f32>() < cfg.jitter_p {
        p.jitter = 1;
        // torchvision ColorJitter.get_params: a random permutation, then the four factors.
        let mut order = [0u8, 1, 2, 3];
        for i in (1..4).rev() {
            let j = rng.gen_range(0..=i);
            order.swap(i, j);
        }
        p.order = order;
        p.brightness = uniform32(rng, (1.0 - cfg.brightness).max(0.0), 1.0 + cfg.brightness);
        p.contrast = uniform32(rng, (1.0 - cfg.contrast).max(0.0), 1.0 + cfg.contrast);
        p.saturation = uniform32(rng, (1.0 - cfg.saturation).max(0.0), 1.0 + cfg.saturation);
        p.hue = uniform32(rng, -cfg.hue, cfg.hue);
    }
    p.grayscale = (rng.gen::<f32>() < cfg.grayscale_p) as u8;
    let (blur_p, solarize_p) = if local {
        (cfg.local_blur_p, 0.0)
    } else {
        (cfg.blur_p[v], cfg.solarize_p[v])
    };
    if rng.gen::<f32>() < blur_p {
        p.blur_sigma = uniform32(rng, cfg.blur_sigma.0, cfg.blur_sigma.1);
    }
    p.solarize = (rng.gen::<f32>() < solarize_p) as u8;
    p
}

/// Evaluation geometry: resize the short side to `round(size * 256 / 224)` (bicubic) and take
/// the centre `size` x `size`; an image whose short side is below that is resized straight to
/// `size` x `size` (small datasets such as 28x28 Fashion-MNIST keep their whole frame).
pub fn eval_crop(img: &Image, size: usize) -> Vec<u8> {
    let (h, w) = (img.height, img.width);
    let short = h.min(w);
    let target = ((size as f64) * 256.0 / 224.0).round() as usize;
    if short < target {
        return resample(img, 0.0, 0.0, h as f64, w as f64, size, size, false);
    }
    // torchvision Resize(int): short side -> target, long side -> int(target * long / short).
    let (nh, nw) = if h <= w {
        (target, (target as f64 * w as f64 / h as f64) as usize)
    } else {
        ((target as f64 * h as f64 / w as f64) as usize, target)
    };
    // The centre crop of the resized image, mapped back to a box in source pixels so that
    // one resampling pass does both.
    let top = ((nh - size) as f64 / 2.0).round();
    let left = ((nw - size) as f64 / 2.0).round();
    let (sy, sx) = (h as f64 / nh as f64, w as f64 / nw as f64);
    resample(
        img,
        top * sy,
        left * sx,
        size as f64 * sy,
        size as f64 * sx,
        size,
        size,
        false,
    )
}

/// ITU-R 601 luma, the weights of SPEC.md.
#[inline]
pub fn gray(r: f32, g: f32, b: f32) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

/// `x.rem_euclid(1.0)` for x in [-1, 2), without the libm `fmodf` call: fmod is exact, so
/// for |x| < 1 it is x, and for x in [1, 2) it is x - 1 (exact by Sterbenz's lemma).
#[inline(always)]
fn wrap01(x: f32) -> f32 {
    if x < 0.0 {
        x + 1.0
    } else if x >= 1.0 {
        x - 1.0
    } else {
        x
    }
}

/// torchvision `_rgb2hsv` for one pixel in [0, 1].
/// (Written with selects rather than branches so that `adjust_hue`'s loop vectorizes.)
#[inline(always)]
pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let crd = if eqc { 1.0 } else { cr };
    let rc = (maxc - r) / crd;
    let gc = (maxc - g) / crd;
    let bc = (maxc - b) / crd;
    let hr = bc - gc;
    let hg = 2.0 + rc - bc;
    let hb = 4.0 + gc - rc;
    let h = if maxc == r {
        hr
    } else if maxc == g {
        hg
    } else {
        hb
    };
    // h / 6 + 1 lies in [5/6, 11/6]
    let h = wrap01(h / 6.0 + 1.0);
    (h, s, maxc)
}

/// torchvision `_hsv2rgb` for one pixel (h in [0, 1)).
#[inline(always)]
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    // floor(h * 6) for h >= 0 (the truncating cast; negative h, which callers never pass,
    // is folded in by the rem_euclid below).
    let h6 = h * 6.0;
    let fl = h6 as i32 as f32;
    let i0 = if fl > h6 { fl - 1.0 } else { fl };
    let f = h6 - i0;
    let i = (i0 as i32).rem_euclid(6);
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    let r = if i == 0 || i == 5 {
        v
    } else if i == 1 {
        q
    } else if i == 4 {
        t
    } else {
        p
    };
    let g = if i == 1 || i == 2 {
        v
    } else if i == 0 {
        t
    } else if i == 3 {
        q
    } else {
        p
    };
    let b = if i == 3 || i == 4 {
        v
    } else if i == 2 {
        t
    } else if i == 5 {
        q
    } else {
        p
    };
    (r, g, b)
}

/// Applies brightness (`x * f`), clamped, to a (3, n) planar image in [0, 1].
#[inline(always)]
pub fn adjust_brightness(x: &mut [f32], f: f32) {
    for v in x.iter_mut() {
        *v = (*v * f).clamp(0.0, 1.0);
    }
}

/// Contrast: blend with the mean of the grayscale image, `f * x + (1 - f) * mean`.
#[inline(always)]
pub fn adjust_contrast(x: &mut [f32], n: usize, f: f32) {
    let (r, rest) = x.split_at(n);
    let (g, b) = rest.split_at(n);
    let mean = (0..n).map(|i| gray(r[i], g[i], b[i]) as f64).sum::<f64>() / n.max(1) as f64;
    let m = (1.0 - f) * mean as f32;
    for v in x.iter_mut() {
        *v = (f * *v + m).clamp(0.0, 1.0);
    }
}

/// Saturation: blend each pixel with its gray value, `f * x + (1 - f) * gray`.
#[inline(always)]
pub fn adjust_saturation(x: &mut [f32], n: usize, f: f32) {
    let (r, rest) = x[..3 * n].split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let l = (1.0 - f) * gray(*r, *g, *b);
        *r = (f * *r + l).clamp(0.0, 1.0);
        *g = (f * *g + l).clamp(0.0, 1.0);
        *b = (f * *b + l).clamp(0.0, 1.0);
    }
}

/// Hue: rotate the HSV hue by `f` turns (|f| <= 0.5).
#[inline(always)]
pub fn adjust_hue(x: &mut [f32], n: usize, f: f32) {
    if !(f > -1.0 && f < 1.0) {
        // Outside the jitter's range (|f| <= 0.5): the plain formula.
        for i in 0..n {
            let (h, s, v) = rgb_to_hsv(x[i], x[n + i], x[2 * n + i]);
            let (r, g, b) = hsv_to_rgb((h + f).rem_euclid(1.0), s, v);
            x[i] = r;
            x[n + i] = g;
            x[2 * n + i] = b;
        }
        return;
    }
    let (r, rest) = x[..3 * n].split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let (h, s, v) = rgb_to_hsv(*r, *g, *b);
        // h in [0, 1) and |f| < 1, so h + f in (-1, 2)
        let (nr, ng, nb) = hsv_to_rgb(wrap01(h + f), s, v);
        *r = nr;
        *g = ng;
        *b = nb;
    }
}

/// Grayscale: L replicated to the three channels.
#[inline(always)]
pub fn to_grayscale(x: &mut [f32], n: usize) {
    let (r, rest) = x[..3 * n].split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let l = gray(*r, *g, *b);
        *r = l;
        *g = l;
        *b = l;
    }
}

/// Separable Gaussian blur of a (3, h, w) planar image, radius ceil(3 sigma), edges clamped.
#[inline(always)]
pub fn gaussian_blur(x: &mut [f32], h: usize, w: usize, sigma: f32) {
    if sigma <= 0.0 || h == 0 || w == 0 {
        return;
    }
    let r = (3.0 * sigma).ceil() as isize;
    let k: Vec<f32> = (-r..=r)
        .map(|d| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f32 = k.iter().sum();
    let k: Vec<f32> = k.iter().map(|v| v / s).collect();
    // Row pass on an edge-padded copy of each row (no clamping in the inner loop), then a
    // column pass as whole-row multiply-adds (vectorizes), edges clamped.
    let ru = r as usize;
    let mut padded = vec![0f32; w + 2 * ru];
    let mut tmp = vec![0f32; h * w];
    for c in 0..3 {
        let plane = &mut x[c * h * w..(c + 1) * h * w];
        for y in 0..h {
            let row = &plane[y * w..(y + 1) * w];
            padded[..ru].fill(row[0]);
            padded[ru..ru + w].copy_from_slice(row);
            padded[ru + w..].fill(row[w - 1]);
            let trow = &mut tmp[y * w..(y + 1) * w];
            trow.fill(0.0);
            for (j, &kj) in k.iter().enumerate() {
                for (t, &p) in trow.iter_mut().zip(&padded[j..j + w]) {
                    *t += kj * p;
                }
            }
        }
        for y in 0..h {
            let orow = &mut plane[y * w..(y + 1) * w];
            orow.fill(0.0);
            for (j, &kj) in k.iter().enumerate() {
                let sy = (y as isize + j as isize - r).clamp(0, h as isize - 1) as usize;
                for (o, &t) in orow.iter_mut().zip(&tmp[sy * w..(sy + 1) * w]) {
                    *o += kj * t;
                }
            }
        }
    }
}

/// Solarize: values at or above `threshold` (on [0, 1]) become `1 - x`.
#[inline(always)]
pub fn solarize(x: &mut [f32], threshold: f32) {
    for v in x.iter_mut() {
        if *v >= threshold {
            *v = 1.0 - *v;
        }
    }
}

/// Converts a u8 (S, S, 3) crop to planar [0, 1] floats, applies the view's colour operations
/// (jitter in its drawn order, grayscale, blur, solarize) and normalizes into `out` (3, S, S).
pub fn finish(
    crop: &[u8],
    p: &ColorParams,
    size: usize,
    mean: &[f32; 3],
    std: &[f32; 3],
    threshold: f32,
    out: &mut [f32],
) {
    finish_clocked(crop, p, size, mean, std, threshold, out, None);
}

/// `finish`, adding the thread CPU seconds spent outside and inside the blur to
/// `times` = [colour, blur] (the loader benchmark's stage split).
#[allow(clippy::too_many_arguments)] // finish's arguments plus the clock
pub fn finish_clocked(
    crop: &[u8],
    p: &ColorParams,
    size: usize,
    mean: &[f32; 3],
    std: &[f32; 3],
    threshold: f32,
    out: &mut [f32],
    times: Option<&mut [f64; 2]>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { finish_avx2(crop, p, size, mean, std, threshold, out, times) };
        return;
    }
    finish_body(crop, p, size, mean, std, threshold, out, times);
}

/// `finish_body` compiled for AVX2 (no FMA: the results are bit-identical to the baseline
/// build's, only wider).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn finish_avx2(
    crop: &[u8],
    p: &ColorParams,
    size: usize,
    mean: &[f32; 3],
    std: &[f32; 3],
    threshold: f32,
    out: &mut [f32],
    times: Option<&mut [f64; 2]>,
) {
    finish_body(crop, p, size, mean, std, threshold, out, times)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn finish_body(
    crop: &[u8],
    p: &ColorParams,
    size: usize,
    mean: &[f32; 3],
    std: &[f32; 3],
    threshold: f32,
    out: &mut [f32],
    times: Option<&mut [f64; 2]>,
) {
    let t0 = times
        .as_ref()
        .map(|_| crate::data::benchset::thread_cpu_seconds());
    let mut blur_s = 0.0;
    let n = size * size;
    // (S, S, 3) u8 -> (3, S, S) f32 in [0, 1]
    {
        let (r, rest) = out[..3 * n].split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        for (((r, g), b), px) in r
            .iter_mut()
            .zip(g.iter_mut())
            .zip(b.iter_mut())
            .zip(crop[..3 * n].chunks_exact(3))
        {
            *r = px[0] as f32 * (1.0 / 255.0);
            *g = px[1] as f32 * (1.0 / 255.0);
            *b = px[2] as f32 * (1.0 / 255.0);
        }
    }
    let x = &mut out[..3 * n];
    if p.jitter != 0 {
        for &op in &p.order {
            match op {
                0 => adjust_brightness(x, p.brightness),
                1 => adjust_contrast(x, n, p.contrast),
                2 => adjust_saturation(x, n, p.saturation),
                _ => adjust_hue(x, n, p.hue),
            }
        }
    }
    if p.grayscale != 0 {
        to_grayscale(x, n);
    }
    if p.blur_sigma > 0.0 {
        let tb = times
            .as_ref()
            .map(|_| crate::data::benchset::thread_cpu_seconds());
        gaussian_blur(x, size, size, p.blur_sigma);
        if let Some(tb) = tb {
            blur_s = crate::data::benchset::thread_cpu_seconds() - tb;
        }
    }
    if p.solarize != 0 {
        solarize(x, threshold / 255.0);
    }
    for c in 0..3 {
        let (m, s) = (mean[c], 1.0 / std[c]);
        for v in &mut x[c * n..(c + 1) * n] {
            *v = (*v - m) * s;
        }
    }
    if let (Some(t), Some(t0)) = (times, t0) {
        // Colour = everything but the blur.
        t[0] += crate::data::benchset::thread_cpu_seconds() - t0 - blur_s;
        t[1] += blur_s;
    }
}

/// `finish` with the configuration's normalization; the side comes from the crop's length
/// (so it serves global and local views alike).
pub fn finish_view(crop: &[u8], p: &ColorParams, cfg: &ViewConfig, out: &mut [f32]) {
    let side = ((crop.len() / 3) as f64).sqrt().round() as usize;
    finish(
        crop,
        p,
        side,
        &cfg.mean,
        &cfg.std,
        cfg.solarize_threshold,
        out,
    );
}
