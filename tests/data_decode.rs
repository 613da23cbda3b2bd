//! The loader's JPEG path (libjpeg-turbo region decode at a DCT scale, then
//! fast_image_resize) against independent references: the full decode at the same scale, and
//! the previous path (zune-jpeg's full decode, the exact resampling the previous f32
//! resampler matched within one level) on the same crop parameters. Corrupt and unusual
//! JPEGs: errors where pixels would be made up, images where they would not.

use std::path::{Path, PathBuf};

mod pil_ref;

use carp::data::augment::{draw_view, resample_view, sample_view, ViewConfig, ViewDraw};
use carp::data::benchset::make_imagenet_like;
use carp::data::decode::{
    decode_jpeg, decode_jpeg_window_into, encode_jpeg, jpeg_header, Image, JpegWindow,
};
use carp::data::loader::{decode_for_views, image_rng, plan_window};
use carp::data::Dataset;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("carp-decode-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// The previous decoder: zune-jpeg, RGB out.
fn zune_decode(bytes: &[u8]) -> Image {
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let opts = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(bytes, opts);
    let px = dec.decode().unwrap();
    let (w, h) = dec.dimensions().unwrap();
    if px.len() == h * w {
        // Gray JPEGs come out gray whatever was asked.
        return Image::new(h, w, px.iter().flat_map(|&g| [g, g, g]).collect());
    }
    assert_eq!(px.len(), h * w * 3);
    Image::new(h, w, px)
}

/// PIL's antialiased bicubic weights (a = -0.5) along one axis, as (first index, weights).
fn axis_weights(n_in: usize, b0: f64, blen: f64, n_out: usize) -> Vec<(usize, Vec<f64>)> {
    let k = pil_ref::cubic;
    let scale = blen / n_out as f64;
    let fs = scale.max(1.0);
    (0..n_out)
        .map(|o| {
            let c = b0 + (o as f64 + 0.5) * scale;
            let lo = ((c - 2.0 * fs - 1.0).floor().max(0.0)) as usize;
            let hi = ((c + 2.0 * fs + 1.0).ceil() as usize).min(n_in);
            let mut w: Vec<f64> = (lo..hi).map(|i| k((i as f64 + 0.5 - c) / fs)).collect();
            let s: f64 = w.iter().sum();
            w.iter_mut().for_each(|v| *v /= s);
            (lo, w)
        })
        .collect()
}

/// The previous path's resampling, exact (f64, separable, no intermediate rounding; the old
/// f32 resampler was within one level of this), mirrored if `flip`: (S, S, 3) values.
fn old_resample(img: &Image, d: &ViewDraw) -> Vec<f64> {
    let b = d.crop;
    let s = d.size;
    let wy = axis_weights(img.height, b.top as f64, b.height as f64, s);
    let wx = axis_weights(img.width, b.left as f64, b.width as f64, s);
    let w = img.width;
    // Vertical pass: (S, W, 3)
    let mut t = vec![0.0; s * w * 3];
    for (y, (lo, ws)) in wy.iter().enumerate() {
        for (k, wk) in ws.iter().enumerate() {
            let row = &img.data[(lo + k) * w * 3..(lo + k + 1) * w * 3];
            for (a, &p) in t[y * w * 3..(y + 1) * w * 3].iter_mut().zip(row) {
                *a += wk * p as f64;
            }
        }
    }
    let mut out = vec![0.0; s * s * 3];
    for y in 0..s {
        for (x, (lo, ws)) in wx.iter().enumerate() {
            let xo = if d.flip { s - 1 - x } else { x };
            for c in 0..3 {
                out[(y * s + xo) * 3 + c] = ws
                    .iter()
                    .enumerate()
                    .map(|(k, wk)| wk * t[(y * w + lo + k) * 3 + c])
                    .sum();
            }
        }
    }
    out
}

/// Max and mean absolute difference of u8 values against f64 values clamped to 0..255.
fn diffs(a: &[u8], b: &[f64]) -> (f64, f64) {
    let mut max = 0.0f64;
    let mut sum = 0.0;
    for (&x, &y) in a.iter().zip(b) {
        let d = (x as f64 - y.clamp(0.0, 255.0)).abs();
        max = max.max(d);
        sum += d;
    }
    (max, sum / a.len().max(1) as f64)
}

/// `n` ImageNet-like JPEGs (500x375 and friends, ~0.68 B/px), packed, shared by the tests
/// (generated once per test that asks; a few hundred ms).
fn imagenet_like(name: &str, n: usize) -> (Dataset, PathBuf) {
    let dir = tmpdir(name);
    let r = make_imagenet_like(&dir, n, 7, None).unwrap();
    (Dataset::open(&r.packed).unwrap(), dir)
}

/// The JPEGs of the tests: the photographs, a grayscale one, ImageNet-like frames, and
/// 4:4:4 / 4:2:0 / progressive encodes of an odd-sized noise-on-photo image (iMCU edges inside
/// the frame).
fn jpegs() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg"]
        .iter()
        .map(|n| (n.to_string(), fixture_bytes(n)))
        .collect();
    let gray: Vec<u8> = (0..61 * 47).map(|k| (k * 7 % 251) as u8).collect();
    v.push(("gray".into(), encode_jpeg(61, 47, 1, &gray, 90).unwrap()));
    let photo = decode_jpeg(&fixture_bytes("coffee.jpg")).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (h, w) = (photo.height - 3, photo.width - 5);
    let mut px = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let p = photo.data[(y * photo.width + x) * 3 + c] as i32;
                px.push((p + rng.gen_range(-20..=20)).clamp(0, 255) as u8);
            }
        }
    }
    for (name, sf) in [
        ("444", jpeg_encoder::SamplingFactor::R_4_4_4),
        ("420", jpeg_encoder::SamplingFactor::R_4_2_0),
    ] {
        let mut out = Vec::new();
        let mut enc = jpeg_encoder::Encoder::new(&mut out, 90);
        enc.set_sampling_factor(sf);
        enc.encode(&px, w as u16, h as u16, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        v.push((name.to_string(), out));
    }
    // Progressive 4:2:0 (ImageNet has some): coefficients buffered, then cropped.
    let mut comp = turbojpeg::Compressor::new().unwrap();
    comp.set_quality(90).unwrap();
    comp.set_subsamp(turbojpeg::Subsamp::Sub2x2).unwrap();
    comp.set_progressive(true).unwrap();
    let progressive = comp
        .compress_to_vec(turbojpeg::Image {
            pixels: &px[..],
            width: w,
            pitch: w * 3,
            height: h,
            format: turbojpeg::PixelFormat::RGB,
        })
        .unwrap();
    v.push(("progressive".to_string(), progressive));
    let (ds, _dir) = imagenet_like("jpegs", 2);
    for i in 0..ds.len() {
        v.push((
            format!("imagenet-like {i}"),
            ds.record(i).unwrap().1.to_vec(),
        ));
    }
    v
}

/// A region decode at each DCT scale gives the pixels of the full decode at that scale, on
/// random windows (left edges on scaled iMCU boundaries, the rest anywhere), for 4:4:4,
/// 4:2:0 and gray JPEGs: exactly, except in a column at a cut edge (the window's first or
/// last where that is not the frame's), whose chroma upsampling lacks the neighbour beyond
/// the cut; `plan_window`'s two-pixel margin keeps those columns out of every view. The
/// full-scale decode matches zune-jpeg's within the IDCT / upsampling differences of two
/// correct decoders.
#[test]
fn region_decodes_equal_the_full_decode_at_each_scale() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (mut windows, mut edge_max) = (0, 0u8);
    for (name, bytes) in jpegs() {
        let hd = jpeg_header(&bytes).unwrap();
        let full1 = decode_jpeg(&bytes).unwrap();
        assert_eq!((full1.height, full1.width), (hd.height, hd.width), "{name}");
        let z = zune_decode(&bytes);
        let (max, mean) = diffs(
            &full1.data,
            &z.data.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        );
        eprintln!("{name}: vs zune-jpeg max {max} mean {mean:.3}");
        assert!(
            max <= 8.0 && mean <= 0.6,
            "{name}: vs zune-jpeg max {max} mean {mean}"
        );
        for denom in [1usize, 2, 4, 8] {
            let fw = JpegWindow::full(hd.height, hd.width, denom);
            let mut full = Image::new(0, 0, Vec::new());
            decode_jpeg_window_into(&bytes, Some(fw), &mut full).unwrap();
            assert_eq!(
                (full.height, full.width),
                (fw.height, fw.width),
                "{name} 1/{denom}"
            );
            let mcu = hd.mcu_width.div_ceil(denom);
            let mut img = Image::new(0, 0, Vec::new());
            for _ in 0..6 {
                let left = rng.gen_range(0..fw.width) / mcu * mcu;
                let top = rng.gen_range(0..fw.height);
                let width = rng.gen_range(1..=fw.width - left);
                let height = rng.gen_range(1..=fw.height - top);
                let win = JpegWindow {
                    denom,
                    top,
                    left,
                    height,
                    width,
                };
                decode_jpeg_window_into(&bytes, Some(win), &mut img).unwrap();
                assert_eq!((img.height, img.width), (height, width));
                // Exact but for a cut edge's column (where the window's edge is not the
                // frame's): chroma upsampling there sees no neighbour beyond the cut.
                let c0 = usize::from(left > 0);
                let c1 = width - usize::from(left + width < fw.width);
                for y in 0..height {
                    let got = &img.data[y * width * 3..(y + 1) * width * 3];
                    let want = &full.data[((top + y) * fw.width + left) * 3..][..width * 3];
                    assert!(
                        c0 >= c1 || got[c0 * 3..c1 * 3] == want[c0 * 3..c1 * 3],
                        "{name} {win:?}: row {y} differs inside the cut edges"
                    );
                    edge_max = edge_max.max(max_abs(got, want));
                }
                windows += 1;
            }
        }
    }
    assert!(windows >= 100);
    eprintln!("cut-edge columns differ by up to {edge_max}");
}

fn max_abs(a: &[u8], b: &[u8]) -> u8 {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// The loader's views (draws, window plan, region decode, resampling from the window) are
/// exactly `sample_view` on the full decode when no DCT scaling applies: the window holds
/// every tap, and the crop maps into it exactly.
#[test]
fn loader_views_equal_sample_view_of_the_full_decode_at_full_scale() {
    let (ds, _dir) = imagenet_like("exact", 6);
    let mut checked = 0;
    for size in [224, 160, 32] {
        let mut view = ViewConfig::imagenet(size);
        view.local_count = 2;
        view.local_size = size / 3;
        for i in 0..ds.len() {
            for epoch in 0..4 {
                let mut rng = image_rng(3, epoch, i);
                let mut img = Image::new(0, 0, Vec::new());
                let (draws, win) = decode_for_views(&ds, i, &view, &mut rng, &mut img).unwrap();
                if win.denom != 1 {
                    continue;
                }
                let full = ds.image(i).unwrap();
                let mut rng = image_rng(3, epoch, i);
                for (v, d) in draws.iter().enumerate() {
                    let (want, p) = sample_view(&full, &view, v.min(2), &mut rng);
                    assert_eq!(p, d.params);
                    let mut got = vec![0u8; d.size * d.size * 3];
                    resample_view(&img, &win, d, &mut got);
                    assert!(got == want, "image {i} size {size} view {v} {win:?}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 100, "{checked}");
}

/// The new path against the previous one on the same crop parameters: zune-jpeg's full
/// decode resampled exactly (what the old f32 resampler gave within one level) vs the
/// loader's region decode (at a DCT scale where every crop is >= 2x its output side)
/// resampled by fast_image_resize. Bounds: at full scale, the two decoders' IDCT / chroma
/// upsampling differences and the 8-bit intermediate of the resampler; at a DCT scale, a
/// different low-pass (the scaled IDCT, then bicubic) from the same source.
#[test]
fn loader_views_match_the_previous_path_on_the_same_crops() {
    let (ds, _dir) = imagenet_like("old-path", 6);
    // (max per-pixel difference, max per-view mean difference, views) per DCT denominator.
    let mut worst = std::collections::BTreeMap::<usize, (f64, f64, usize)>::new();
    for size in [224, 96, 40] {
        let view = ViewConfig::imagenet(size);
        for i in 0..ds.len() {
            let z = zune_decode(ds.record(i).unwrap().1);
            for epoch in 0..3 {
                let mut rng = image_rng(1, epoch, i);
                let mut img = Image::new(0, 0, Vec::new());
                let (draws, win) = decode_for_views(&ds, i, &view, &mut rng, &mut img).unwrap();
                // The draws are the old path's: same RNG stream, same order.
                let mut rng = image_rng(1, epoch, i);
                for (v, d) in draws.iter().enumerate() {
                    assert_eq!(*d, draw_view(z.height, z.width, &view, v, &mut rng));
                    let mut got = vec![0u8; d.size * d.size * 3];
                    resample_view(&img, &win, d, &mut got);
                    let (max, mean) = diffs(&got, &old_resample(&z, d));
                    let e = worst.entry(win.denom).or_insert((0.0, 0.0, 0));
                    e.0 = e.0.max(max);
                    e.1 = e.1.max(mean);
                    e.2 += 1;
                }
            }
        }
    }
    eprintln!("worst (max, mean, views) per DCT denominator: {worst:?}");
    assert!(
        worst.contains_key(&1) && worst.keys().any(|&d| d > 1),
        "{worst:?}"
    );
    for (&denom, &(max, mean, _)) in &worst {
        let (bmax, bmean) = if denom == 1 { (6.0, 0.5) } else { (20.0, 2.5) };
        assert!(
            max <= bmax && mean <= bmean,
            "1/{denom}: max {max} (bound {bmax}), mean {mean} (bound {bmean})"
        );
    }
}

/// `plan_window`: the scale is the largest power of two (<= 8) every crop covers at that
/// multiple of its output side; the window covers every crop plus the resampler's reach,
/// with its left edge on a scaled iMCU boundary and everything inside the scaled frame.
#[test]
fn window_plans_cover_the_crops_and_their_taps() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for _ in 0..3000 {
        let (h, w) = (rng.gen_range(1..3000), rng.gen_range(1..3000));
        let mcu = [8usize, 16, 32][rng.gen_range(0..3)];
        let mut view = ViewConfig::imagenet(rng.gen_range(1..300));
        view.local_count = rng.gen_range(0..3);
        let draws: Vec<ViewDraw> = (0..2 + view.local_count)
            .map(|v| draw_view(h, w, &view, v.min(2), &mut rng))
            .collect();
        let win = plan_window(h, w, mcu, &draws);
        let d = win.denom;
        assert!(matches!(d, 1 | 2 | 4 | 8));
        let fits = |d: usize| {
            draws
                .iter()
                .all(|v| v.crop.height.min(v.crop.width) >= d * v.size)
        };
        assert!(fits(d) || d == 1);
        assert!(d == 8 || !fits(2 * d), "{d} could be {}", 2 * d);
        let full = JpegWindow::full(h, w, d);
        assert!(win.top + win.height <= full.height && win.left + win.width <= full.width);
        assert_eq!(win.left % mcu.div_ceil(d), 0);
        let s = 1.0 / d as f64;
        for v in &draws {
            let reach = 2.0 * (v.crop.height.max(v.crop.width) as f64 * s / v.size as f64).max(1.0);
            let lo = |a: usize| ((a as f64 * s - reach).floor().max(0.0)) as usize;
            let hi = |b: usize, n: usize| ((b as f64 * s + reach).ceil() as usize).min(n);
            assert!(win.top <= lo(v.crop.top) && win.left <= lo(v.crop.left));
            assert!(win.top + win.height >= hi(v.crop.top + v.crop.height, full.height));
            assert!(win.left + win.width >= hi(v.crop.left + v.crop.width, full.width));
        }
    }
}

/// Corrupt JPEGs: a header cut short, entropy data cut short or wrecked: errors (pixels
/// would be made up). Stray bytes before a marker (common in ImageNet, ignored by PIL too):
/// the same image as without them.
#[test]
fn corrupt_jpegs_are_errors_and_stray_bytes_are_not() {
    let good = fixture_bytes("chelsea.jpg");
    let clean = decode_jpeg(&good).unwrap();
    for cut in [2, 40, 300, good.len() / 2, good.len() - 10] {
        let e = decode_jpeg(&good[..cut]).unwrap_err();
        assert!(e.starts_with("JPEG decode:"), "{cut}: {e}");
    }
    let mut wrecked = good.clone();
    let n = wrecked.len();
    for v in &mut wrecked[n / 2..n - 2] {
        *v = 0xFF;
    }
    assert!(decode_jpeg(&wrecked).is_err());
    // Stray bytes between the entropy data and the EOI marker.
    assert_eq!(&good[n - 2..], &[0xFF, 0xD9]);
    let mut stray = good[..n - 2].to_vec();
    stray.extend_from_slice(&[0x12, 0x34, 0x56, 0xFF, 0xD9]);
    assert_eq!(decode_jpeg(&stray).unwrap(), clean);
    // Not a JPEG at all, and an empty record.
    assert!(decode_jpeg(b"definitely not a jpeg").is_err());
    assert!(decode_jpeg(&[]).is_err());
    // A window outside the frame is an error, not a read out of bounds.
    let hd = jpeg_header(&good).unwrap();
    let mut img = Image::new(0, 0, Vec::new());
    let bad = JpegWindow {
        height: hd.height + 1,
        ..JpegWindow::full(hd.height, hd.width, 1)
    };
    assert!(decode_jpeg_window_into(&good, Some(bad), &mut img).is_err());
    assert_eq!((img.height, img.width, img.data.len()), (0, 0, 0));
}

/// A CMYK JPEG (as ImageNet has a few of) decodes to RGB with R = C K / 255 (and so on) of
/// the stored values, as PIL and zune-jpeg convert it.
#[test]
fn cmyk_jpegs_decode_to_rgb() {
    let (h, w) = (24, 40);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    // Smooth CMYK so that JPEG's loss stays small.
    let base: [u8; 4] = [
        rng.gen_range(100..=200),
        rng.gen_range(100..=200),
        rng.gen_range(100..=200),
        rng.gen_range(64..=128),
    ];
    let mut cmyk = Vec::with_capacity(h * w * 4);
    for y in 0..h {
        for x in 0..w {
            for (c, &b) in base.iter().enumerate() {
                cmyk.push((b as usize + (x + y + c * 7) % 40).min(255) as u8);
            }
        }
    }
    let img = turbojpeg::Image {
        pixels: &cmyk[..],
        width: w,
        pitch: w * 4,
        height: h,
        format: turbojpeg::PixelFormat::CMYK,
    };
    let mut comp = turbojpeg::Compressor::new().unwrap();
    comp.set_quality(98).unwrap();
    comp.set_subsamp(turbojpeg::Subsamp::None).unwrap();
    let jpg = comp.compress_to_vec(img).unwrap();
    let rgb = decode_jpeg(&jpg).unwrap();
    assert_eq!((rgb.height, rgb.width), (h, w));
    let want: Vec<f64> = (0..h * w * 3)
        .map(|j| {
            let (i, c) = (j / 3, j % 3);
            cmyk[4 * i + c] as f64 * cmyk[4 * i + 3] as f64 / 255.0
        })
        .collect();
    // JPEG's loss on four channels, multiplied: a few levels.
    let (max, mean) = diffs(&rgb.data, &want);
    assert!(max <= 10.0 && mean <= 1.5, "max {max} mean {mean}");
    // Not the stored values read as RGB, nor their inverse.
    let raw: Vec<f64> = (0..h * w * 3)
        .map(|j| cmyk[4 * (j / 3) + j % 3] as f64)
        .collect();
    assert!(diffs(&rgb.data, &raw).1 > 10.0);
}

/// A decoder that failed (mid-header, mid-data) decodes the next good JPEG on the same thread
/// correctly: every decode starts from a clean state.
#[test]
fn a_failed_decode_leaves_no_state_behind() {
    let good = fixture_bytes("coffee.jpg");
    let clean = decode_jpeg(&good).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    for _ in 0..200 {
        let mut bad = good.clone();
        for _ in 0..rng.gen_range(1..6) {
            let i = rng.gen_range(0..bad.len());
            bad[i] = rng.gen();
        }
        bad.truncate(rng.gen_range(1..=bad.len()));
        let _ = decode_jpeg(&bad);
        let _ = jpeg_header(&bad);
        assert_eq!(decode_jpeg(&good).unwrap(), clean);
        assert_eq!(jpeg_header(&good).unwrap().width, clean.width);
    }
}
