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
