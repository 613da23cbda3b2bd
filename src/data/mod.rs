//! Data: the shard format, packing, decoding, two-view augmentation and the loader.
//!
//! - `shard`: the on-disk format (header, index, records), memory-mapped, validated on open;
//!   documented in `datasets/README.md`.
//! - `dataset`: a folder of shards plus `manifest.json` (`Dataset`).
//! - `embedded`: the demo subset inside the binary (`embedded:fashion-mnist-small/...` paths).
//! - `decode`: raw / JPEG (libjpeg-turbo: whole, or a region at a DCT scale) / PNG records to
//!   RGB u8.
//! - `augment`: SPEC.md's two views, split into a u8 geometric half and a colour `finish`.
//! - `loader`: the shuffling, prefetching two-view loader, evaluation batches, the benchmark.
//! - `pack` / `idx`: `carp pack` from ImageFolder trees and IDX (MNIST-format) files.
//! - `benchset`: the loader benchmark's ImageNet-like JPEG set.
//! - `timing`: thread and process CPU clocks (the loader benchmark's per-core rates).

pub mod augment;
pub mod benchset;
pub mod dataset;
pub mod decode;
pub mod embedded;
pub mod idx;
pub mod loader;
pub mod pack;
pub mod shard;
pub mod timing;

pub use augment::{finish, finish_view, sample_view, ColorParams, ViewConfig};
pub use dataset::{Dataset, Manifest};
pub use decode::Image;
pub use loader::{
    bench_loader, eval_batches, CropBatch, LoaderBenchReport, LoaderConfig, LocalViews,
    TwoViewBatch, TwoViewLoader,
};
pub use pack::{run_pack, PackArgs, PackReport};

/// The embedded Fashion-MNIST subset, relative to the repository root.
pub const EMBEDDED_TRAIN: &str = "datasets/fashion-mnist-small/train";
pub const EMBEDDED_TEST: &str = "datasets/fashion-mnist-small/test";

/// The embedded dataset's folder: `CARGO_MANIFEST_DIR`-relative so it is found from tests
/// and from the repository root alike.
pub fn embedded_dir(split: &str) -> std::path::PathBuf {
    let rel = if split == "test" {
        EMBEDDED_TEST
    } else {
        EMBEDDED_TRAIN
    };
    let local = std::path::PathBuf::from(rel);
    if local.join(dataset::MANIFEST).exists() {
        local
    } else {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }
}
