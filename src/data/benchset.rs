//! An ImageNet-like packed JPEG set for the loader benchmark, generated from the bundled
//! photographs (tests/fixtures, 96x96..120x80 real photos).
//!
//! Decode speed depends on the compressed bits per pixel (entropy decoding) and the pixel
//! count (IDCT, colour conversion), so noise or flat colours decode at unrealistic speeds.
//! Each image here is a random crop of one photograph, rescaled (bicubic) to one of
//! ImageNet's typical sizes (500x375, 375x500, 500x333, 512x512), plus film grain so that at
//! quality 90 the files carry about as many bytes per pixel as ImageNet's (its training JPEGs
//! average ~110 KB at ~400x350, ~0.6-0.8 B/px); `ImagenetLikeReport::bytes_per_pixel` says
//! what a given set has, and the benchmark prints it.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::augment::resample;
use crate::data::decode::{decode_jpeg, encode_jpeg};
use crate::data::pack::{run_pack, PackArgs};
use crate::error::{Error, Result};

/// The bundled photographs (JPEG, quality 90; see tests/fixtures/README.md).
const PHOTOS: [&[u8]; 3] = [
    include_bytes!("../../tests/fixtures/astronaut.jpg"),
    include_bytes!("../../tests/fixtures/coffee.jpg"),
    include_bytes!("../../tests/fixtures/chelsea.jpg"),
];

/// Half-amplitude of the triangular film grain, in grey levels.
const GRAIN: i32 = 12;

/// ImageNet's common frame sizes (height, width).
const SIZES: [(usize, usize); 4] = [(375, 500), (500, 375), (333, 500), (512, 512)];

/// What `make_imagenet_like` wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagenetLikeReport {
    /// The packed folder (open it with `Dataset::open`).
    pub packed: PathBuf,
    pub images: usize,
    /// Mean JPEG bytes per pixel of the source files.
    pub bytes_per_pixel: f64,
    /// Mean pixels per image.
    pub mean_pixels: f64,
}

/// Writes `n` ImageNet-like JPEGs (2 classes) under `dir/folder` and packs them into
/// `dir/packed` (with `max_side`, as `carp pack --max-side`). Deterministic in `seed`.
pub fn make_imagenet_like(
    dir: &Path,
    n: usize,
    seed: u64,
    max_side: Option<u32>,
) -> Result<ImagenetLikeReport> {
    let photos = PHOTOS
        .iter()
        .map(|b| decode_jpeg(b).map_err(|m| Error::Msg(format!("bundled photo: {m}"))))
        .collect::<Result<Vec<_>>>()?;
    let root = dir.join("folder");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut bytes, mut pixels) = (0usize, 0usize);
    for i in 0..n {
        let class = root.join(format!("c{}", i % 2));
        std::fs::create_dir_all(&class).map_err(|e| Error::io(&class, e))?;
        let img = &photos[rng.gen_range(0..photos.len())];
        let (h, w) = SIZES[rng.gen_range(0..SIZES.len())];
        // A random crop of 60-100% of each side, so images of one photo differ.
        let (ch, cw) = (
            img.height as f64 * rng.gen_range(0.6..1.0),
            img.width as f64 * rng.gen_range(0.6..1.0),
        );
        let top = rng.gen_range(0.0..=img.height as f64 - ch);
        let left = rng.gen_range(0.0..=img.width as f64 - cw);
        let mut px = resample(img, top, left, ch, cw, h, w, rng.gen_bool(0.5));
        // Film grain: a triangular noise of +-2*GRAIN grey levels per channel (calibrated
        // to ~0.68 B/px at quality 90).
        for v in px.iter_mut() {
            let d = rng.gen_range(-GRAIN..=GRAIN) + rng.gen_range(-GRAIN..=GRAIN);
            *v = (*v as i32 + d).clamp(0, 255) as u8;
        }
        let jpg = encode_jpeg(h, w, 3, &px, 90)?;
        bytes += jpg.len();
        pixels += h * w;
        let path = class.join(format!("{i}.jpg"));
        std::fs::write(&path, jpg).map_err(|e| Error::io(&path, e))?;
    }
    let packed = dir.join("packed");
    let mut args = PackArgs::new(&root, &packed);
    args.max_side = max_side;
    run_pack(&args)?;
    Ok(ImagenetLikeReport {
        packed,
        images: n,
        bytes_per_pixel: bytes as f64 / pixels.max(1) as f64,
        mean_pixels: pixels as f64 / n.max(1) as f64,
    })
}

/// CPU seconds consumed by the calling thread (not wall time: the benchmark machines are
/// shared, and per-core throughput is what the loader's sizing needs).
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID exists on every
    // Linux and POSIX target this crate supports, and on failure `ts` stays zero.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// CPU seconds consumed by the whole process (all threads), from getrusage.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; on failure it stays zero.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Per-core loader cost, measured on one thread: thread CPU seconds per image by stage.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageTimes {
    pub images: usize,
    /// Record to RGB u8 (JPEG decode), per image.
    pub decode_s: f64,
    /// Random resized crop + bicubic resample + flip, both views, per image.
    pub resize_s: f64,
    /// Colour finish without the blur (u8 -> f32, jitter, grayscale, solarize, normalize),
    /// both views, per image.
    pub colour_s: f64,
    /// Gaussian blur, both views, per image.
    pub blur_s: f64,
}

impl StageTimes {
    /// Two-view images/s on one core for the geometric half (u8 crops + parameters).
    pub fn crops_per_core(&self) -> f64 {
        1.0 / (self.decode_s + self.resize_s).max(1e-12)
    }
    /// Two-view images/s on one core with the CPU colour finish.
    pub fn full_per_core(&self) -> f64 {
        1.0 / (self.decode_s + self.resize_s + self.colour_s + self.blur_s).max(1e-12)
    }
}

/// Measures the stages on the calling thread over `images` records (cycling), with the
/// loader's per-image RNG, so the crops are those `epoch(0)` would draw.
pub fn bench_stages(
    ds: &crate::data::Dataset,
    view: &crate::data::ViewConfig,
    images: usize,
) -> Result<StageTimes> {
    use crate::data::augment::{finish_clocked, resample_view};
    let n = images.max(1);
    let (mut dec, mut res) = (0.0, 0.0);
    let mut fin = [0.0f64; 2];
    let mut out = vec![0f32; 3 * view.size * view.size]; // (3, S, S)
                                                         // Reused buffers, as the loader's workers have them.
    let mut img = crate::data::decode::Image::new(0, 0, Vec::new());
    let (mut c1, mut c2) = (
        vec![0u8; view.size * view.size * 3],
        vec![0u8; view.size * view.size * 3],
    ); // (S, S, 3)
    for k in 0..n {
        let i = k % ds.len().max(1);
        let t0 = thread_cpu_seconds();
        // Drawing the views is part of the decode stage: the decode depends on them.
        let mut rng = crate::data::loader::image_rng(0, 0, i);
        let (draws, win) = crate::data::loader::decode_for_views(ds, i, view, &mut rng, &mut img)?;
        let t1 = thread_cpu_seconds();
        resample_view(&img, &win, &draws[0], &mut c1);
        resample_view(&img, &win, &draws[1], &mut c2);
        let (p1, p2) = (draws[0].params, draws[1].params);
        let t2 = thread_cpu_seconds();
        dec += t1 - t0;
        res += t2 - t1;
        for (c, p) in [(&c1, &p1), (&c2, &p2)] {
            finish_clocked(
                c,
                p,
                view.size,
                &view.mean,
                &view.std,
                view.solarize_threshold,
                &mut out,
                Some(&mut fin),
            );
            std::hint::black_box(&out);
        }
    }
    let nf = n as f64;
    Ok(StageTimes {
        images: n,
        decode_s: dec / nf,
        resize_s: res / nf,
        colour_s: fin[0] / nf,
        blur_s: fin[1] / nf,
    })
}
