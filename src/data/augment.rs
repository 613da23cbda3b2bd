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
//! Gaussian with box passes); the resampling is PIL's antialiased bicubic (a = -0.5), by
//! `fast_image_resize` on u8 pixels as PIL computes it.

use rand::Rng;

use crate::data::decode::{Image, JpegWindow};

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

/// The normalization and solarize threshold as the kernels take them: `#[repr(C)]`, passed by
/// value. The threshold is divided by 255 exactly as the CPU `finish` divides it, so a pixel at
/// the threshold is solarized (or not) on both paths alike; `inv_std` likewise.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AugNorm {
    pub mean: [f32; 3],
    pub inv_std: [f32; 3],
    pub threshold: f32,
}

impl AugNorm {
    pub fn new(cfg: &ViewConfig) -> AugNorm {
        AugNorm {
            mean: cfg.mean,
            inv_std: cfg.std.map(|s| 1.0 / s),
            threshold: cfg.solarize_threshold / 255.0,
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

/// Sources up to this many pixels resample with the thread's kept `Resizer`, whose scratch
/// grows to the largest resize it did; larger ones (packing a huge image) use a fresh one.
const KEEP_RESIZER_PIXELS: usize = 2048 * 2048;

thread_local! {
    /// The resizer and the (rows, out_w, 3) intermediate between the two passes.
    static RESIZER: std::cell::RefCell<(fast_image_resize::Resizer, Vec<u8>)> =
        std::cell::RefCell::new((fast_image_resize::Resizer::new(), Vec::new()));
}

/// `resample` into `out` (out_h, out_w, 3), which must hold exactly out_h * out_w * 3 bytes.
///
/// `fast_image_resize`'s convolution with Catmull-Rom (the cubic with a = -0.5, PIL's
/// BICUBIC) and an adaptive kernel (widened by the scale factor when shrinking, PIL's
/// antialiasing), straight from the box of the source (no copy of the crop; taps reach
/// outside the box as PIL's do). It works as PIL does on 8-bit images: fixed-point weights,
/// an 8-bit intermediate between the two passes (vertical first, where PIL goes horizontal
/// first), each pass rounded and clamped. Against the exact f64 resampling that is within
/// one grey level on natural images; where a pass overshoots 0..255 (bicubic ringing on
/// noise) the clamped intermediate can move an output further, exactly as in PIL.
/// The box is clipped to the image.
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
    use fast_image_resize::{images, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
    assert_eq!(out.len(), out_h * out_w * 3, "resample_into: output size");
    if out_h == 0 || out_w == 0 || img.height == 0 || img.width == 0 {
        return;
    }
    let (ih, iw) = (img.height as f64, img.width as f64);
    let top = top.clamp(0.0, ih - 1.0);
    let left = left.clamp(0.0, iw - 1.0);
    let height = height.clamp(1e-6, ih - top);
    let width = width.clamp(1e-6, iw - left);
    // PIL's order: the horizontal pass over the source rows the vertical taps reach (fir's
    // bounds: centre -+ 2 * max(scale, 1), clipped), into an 8-bit (rows, out_w, 3)
    // intermediate, then the vertical pass. (fir alone would go vertical first on u8
    // images, which differs from PIL wherever a pass clamps.)
    let sy = height / out_h as f64;
    let reach = 2.0 * sy.max(1.0);
    let y0 = ((top + 0.5 * sy - reach).floor().max(0.0) as usize).min(img.height - 1);
    let y1 = ((top + (out_h as f64 - 0.5) * sy + reach).ceil() as usize).clamp(y0 + 1, img.height);
    let w = img.width;
    let rows = &img.data[y0 * w * 3..y1 * w * 3];
    let alg = ResizeAlg::Convolution(FilterType::CatmullRom);
    // Invariants rather than input errors: the sizes fit u32 (decoders cap sides at
    // MAX_SIDE), the buffers hold exactly the (H, W, 3) bytes given, and the boxes lie in
    // their images.
    let mut run = |r: &mut Resizer, tmp: &mut Vec<u8>| {
        tmp.resize((y1 - y0) * out_w * 3, 0);
        let src = images::ImageRef::new(w as u32, (y1 - y0) as u32, rows, PixelType::U8x3)
            .expect("resample: source rows hold (rows, W, 3) bytes");
        let mut mid =
            images::Image::from_slice_u8(out_w as u32, (y1 - y0) as u32, tmp, PixelType::U8x3)
                .expect("resample: intermediate holds (rows, out_w, 3) bytes");
        // Same height and an integer top: fir runs the horizontal pass only.
        let opts = ResizeOptions::new()
            .resize_alg(alg)
            .crop(left, 0.0, width, (y1 - y0) as f64);
        r.resize(&src, &mut mid, &opts)
            .expect("resample: box clipped to the image, pixel types equal");
        let mid = images::ImageRef::new(out_w as u32, (y1 - y0) as u32, tmp, PixelType::U8x3)
            .expect("resample: intermediate holds (rows, out_w, 3) bytes");
        let mut dst =
            images::Image::from_slice_u8(out_w as u32, out_h as u32, out, PixelType::U8x3)
                .expect("resample: output holds (out_h, out_w, 3) bytes");
        // Same width at left 0: the vertical pass only.
        let opts =
            ResizeOptions::new()
                .resize_alg(alg)
                .crop(0.0, top - y0 as f64, out_w as f64, height);
        r.resize(&mid, &mut dst, &opts)
            .expect("resample: box clipped to the image, pixel types equal");
    };
    if img.height * img.width <= KEEP_RESIZER_PIXELS {
        RESIZER.with(|r| {
            let (r, tmp) = &mut *r.borrow_mut();
            run(r, tmp)
        });
    } else {
        run(&mut Resizer::new(), &mut Vec::new());
    }
    if flip {
        for row in out.chunks_exact_mut(out_w * 3) {
            let (mut a, mut b) = (0, out_w - 1);
            while a < b {
                for c in 0..3 {
                    row.swap(a * 3 + c, b * 3 + c);
                }
                a += 1;
                b -= 1;
            }
        }
    }
}

/// One view's drawn geometry and colour parameters (what `sample_view_into` draws before it
/// resamples): the crop box in source pixels, the output side and the flip (also in
/// `params.flipped`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ViewDraw {
    pub crop: CropBox,
    pub size: usize,
    pub flip: bool,
    pub params: ColorParams,
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
    let d = draw_view(img.height, img.width, cfg, view, rng);
    let b = d.crop;
    resample_into(
        img,
        b.top as f64,
        b.left as f64,
        b.height as f64,
        b.width as f64,
        d.size,
        d.size,
        d.flip,
        out,
    );
    d.params
}

/// Draws one view of an `h` x `w` image: the numbers `sample_view_into` draws, in the same
/// order, without touching pixels (so the loader can decode only what the views need).
pub fn draw_view<R: Rng>(
    h: usize,
    w: usize,
    cfg: &ViewConfig,
    view: usize,
    rng: &mut R,
) -> ViewDraw {
    let local = view >= 2;
    let v = view.min(1);
    let (size, scale) = if local {
        (cfg.local_size, (cfg.local_min_scale, cfg.local_max_scale))
    } else {
        (cfg.size, (cfg.min_scale, cfg.max_scale))
    };
    let crop = random_resized_crop_box(rng, h, w, scale, (cfg.min_ratio, cfg.max_ratio));
    let flip = rng.gen::<f32>() < cfg.flip_p;
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
    ViewDraw {
        crop,
        size,
        flip,
        params: p,
    }
}

/// Resamples view `d` from `img`, the decode of `win` (see `JpegWindow`): the crop box,
/// in source pixels, is mapped into the decoded pixels (scaled by 1 / denom, shifted by the
/// window's corner) and resampled from there, so a window that contains the box and its
/// taps gives the view a full decode would give at that scale.
pub fn resample_view(img: &Image, win: &JpegWindow, d: &ViewDraw, out: &mut [u8]) {
    let s = 1.0 / win.denom as f64;
    let b = d.crop;
    resample_into(
        img,
        b.top as f64 * s - win.top as f64,
        b.left as f64 * s - win.left as f64,
        b.height as f64 * s,
        b.width as f64 * s,
        d.size,
        d.size,
        d.flip,
        out,
    );
}

/// The evaluation view (SPEC.md "Evaluation", the official k-NN and linear scripts):
/// torchvision's `Resize(round(size * 256 / 224))` (bicubic, the short side; 256 at 224) then
/// `CenterCrop(size)`, for every image. The aspect ratio is kept: an image whose short side is
/// below the resize target is upsampled, never squashed to a square (28x28 Fashion-MNIST at
/// size 32: resized to 37x37, centre 32x32).
pub fn eval_crop(img: &Image, size: usize) -> Vec<u8> {
    let (h, w) = (img.height, img.width);
    let target = ((size as f64) * 256.0 / 224.0).round() as usize;
    // torchvision Resize(int): short side -> target, long side -> int(target * long / short).
    let (nh, nw) = if h <= w {
        (target, (target as f64 * w as f64 / h as f64) as usize)
    } else {
        ((target as f64 * h as f64 / w as f64) as usize, target)
    };
    // CenterCrop's corner is Python's round((resized - size) / 2): half to even, so an odd
    // margin puts the extra pixel after the crop, as torchvision does.
    let top = ((nh - size) as f64 / 2.0).round_ties_even();
    let left = ((nw - size) as f64 / 2.0).round_ties_even();
    // The centre crop of the resized image, mapped back to a box in source pixels so that
    // one resampling pass does both.
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

/// The hue rotation of one pixel in [0, 1]: torchvision's `_rgb2hsv`, `(h + f) % 1` and
/// `_hsv2rgb`, with the hue in sextants (H = 6 h) and `shift` = 6 (f mod 1), in [0, 6].
///
/// The same function in fewer operations: one division instead of five and no selection by
/// sextant. With v = max, c = max - min and s = c / v, `_hsv2rgb`'s p = v (1 - s) = min,
/// q = v - c f and t = min + c f, and the channel that sextant i assigns is, for n = 5, 3, 1
/// (red, green, blue), v - c clamp(min(k, 4 - k), 0, 1) with k = (H + n) mod 6 (sextant 0:
/// red k in [5, 6) gives v, green k in [3, 4) gives min + c H = t, blue k in [1, 2) gives
/// min = p; the others likewise). That form is continuous in H, so a rounding across a
/// sextant boundary moves the colour by a rounding, not a sextant. It differs from
/// torchvision's expression order by a few f32 roundings (the tests compare it with
/// Python's colorsys in f64). Written with selects, not branches, so the loop vectorizes.
#[inline(always)]
fn rotate_hue(r: f32, g: f32, b: f32, shift: f32) -> (f32, f32, f32) {
    let maxc = if r > g { r } else { g };
    let maxc = if maxc > b { maxc } else { b };
    let minc = if r < g { r } else { g };
    let minc = if minc < b { minc } else { b };
    let c = maxc - minc;
    let inv = 1.0 / if c == 0.0 { 1.0 } else { c };
    // torchvision's choice: red's formula where red is the maximum, then green's, then blue's.
    let h = if maxc == r {
        (g - b) * inv
    } else if maxc == g {
        2.0 + (b - r) * inv
    } else {
        4.0 + (r - g) * inv
    };
    // h in [-1, 5] and shift in [0, 6]: the rotated hue, reduced to [-1, 6).
    let hs = h + shift;
    let hs = if hs >= 6.0 { hs - 6.0 } else { hs };
    let channel = |n: f32| {
        let k = hs + n; // in [0, 11)
        let k = if k >= 6.0 { k - 6.0 } else { k };
        let w = if k < 4.0 - k { k } else { 4.0 - k };
        let w = w.clamp(0.0, 1.0);
        (maxc - c * w).clamp(0.0, 1.0)
    };
    (channel(5.0), channel(3.0), channel(1.0))
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
    let m = (1.0 - f) * gray_mean(r, g, b) as f32;
    for v in x.iter_mut() {
        *v = (f * *v + m).clamp(0.0, 1.0);
    }
}

/// The mean grayscale value of planar (r, g, b), summed in f64 over 8 interleaved partial sums
/// (independent lanes vectorize; one running sum is a chain of dependent scalar adds).
#[inline(always)]
fn gray_mean(r: &[f32], g: &[f32], b: &[f32]) -> f64 {
    const L: usize = 8;
    let mut acc = [0f64; L];
    let (rc, gc, bc) = (r.chunks_exact(L), g.chunks_exact(L), b.chunks_exact(L));
    let tail = rc
        .remainder()
        .iter()
        .zip(gc.remainder())
        .zip(bc.remainder());
    let tail: f64 = tail.map(|((&r, &g), &b)| gray(r, g, b) as f64).sum();
    for ((r, g), b) in rc.zip(gc).zip(bc) {
        for l in 0..L {
            acc[l] += gray(r[l], g[l], b[l]) as f64;
        }
    }
    (acc.iter().sum::<f64>() + tail) / r.len().max(1) as f64
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

/// Hue: rotate the HSV hue by `f` turns (the jitter draws |f| <= 0.5; any finite f works).
#[inline(always)]
pub fn adjust_hue(x: &mut [f32], n: usize, f: f32) {
    // f mod 1 can round to 1.0 for a tiny negative f: still within rotate_hue's range.
    let shift = 6.0 * f.rem_euclid(1.0);
    let (r, rest) = x[..3 * n].split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        (*r, *g, *b) = rotate_hue(*r, *g, *b, shift);
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
        *v = if *v >= threshold { 1.0 - *v } else { *v };
    }
}

/// (n, 3) u8 pixels -> (3, n) f32 in [0, 1].
#[inline(always)]
fn to_planar(crop: &[u8], out: &mut [f32]) {
    let n = crop.len() / 3;
    let (r, rest) = out[..3 * n].split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for (((r, g), b), px) in r
        .iter_mut()
        .zip(g.iter_mut())
        .zip(b.iter_mut())
        .zip(crop.chunks_exact(3))
    {
        *r = px[0] as f32 * (1.0 / 255.0);
        *g = px[1] as f32 * (1.0 / 255.0);
        *b = px[2] as f32 * (1.0 / 255.0);
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
        .map(|_| crate::data::timing::thread_cpu_seconds());
    let mut blur_s = 0.0;
    let n = size * size;
    to_planar(&crop[..3 * n], &mut out[..3 * n]);
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
            .map(|_| crate::data::timing::thread_cpu_seconds());
        gaussian_blur(x, size, size, p.blur_sigma);
        if let Some(tb) = tb {
            blur_s = crate::data::timing::thread_cpu_seconds() - tb;
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
        t[0] += crate::data::timing::thread_cpu_seconds() - t0 - blur_s;
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
