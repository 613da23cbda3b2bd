//! Finishing the loader's views on the training device.
//!
//! The loader's geometric half (`CropBatch`: u8 crops + per-view `ColorParams`) is finished
//! either on the CPU (`CropBatch::finish`, the specification) or, on a CUDA device, by the
//! kernels of kernels/augment.cu (`CudaBackend::finish_views`): the CPU then only decodes and
//! crops, a quarter of the bytes cross the bus (u8 instead of f32), and the colour work runs on
//! the GPU. `--view-finish cpu` selects the CPU finish on a CUDA device (A/B and fallback).

use crate::data::augment::ViewConfig;
use crate::data::loader::{CropBatch, TwoViewBatch, TwoViewLoader};
use crate::error::{Error, Result};
pub use crate::ops::augment::finish_crops;
use crate::tensor::{Device, Tensor};

/// Whether views are finished on `device` by the GPU kernels: a CUDA device, unless the run
/// option `view_finish` is cpu (the CPU finish, verified on a GPU before; the option A/B-tests
/// the two).
pub fn gpu_aug(device: &Device) -> bool {
    matches!(device, Device::Cuda(_))
        && crate::options::current().view_finish == crate::options::ViewFinish::Gpu
}

/// Which path finished the views, for logs and benchmark reports.
pub fn finish_path(device: &Device) -> &'static str {
    if gpu_aug(device) {
        "gpu (kernels/augment.cu)"
    } else {
        "cpu (loader threads)"
    }
}

/// The two global views of a crop batch, each (B, 3, S, S) on `device`: the CPU `finish` on
/// the CPU, the kernels on a CUDA device.
pub fn crops_to_views(
    batch: &CropBatch,
    cfg: &ViewConfig,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (b, s) = (batch.batch, batch.size);
    Ok((
        finish_crops(&batch.view1, &batch.params1, b, s, cfg, device)?,
        finish_crops(&batch.view2, &batch.params2, b, s, cfg, device)?,
    ))
}

/// The local views of a crop batch (multi-crop), as `CropBatch::finish_locals` lays them out:
/// one (L * B, 3, s, s) tensor whose block l is local view l of the whole batch; `None` when
/// the batch has no local views.
pub fn crops_to_locals(
    batch: &CropBatch,
    cfg: &ViewConfig,
    device: &Device,
) -> Result<Option<Tensor>> {
    let (l, b, s) = (batch.local_count, batch.batch, batch.local_size);
    if l == 0 {
        return Ok(None);
    }
    let per = s * s * 3;
    if batch.locals.len() != b * l * per || batch.local_params.len() != b * l {
        return Err(Error::Shape(format!(
            "local views: {} bytes and {} parameter sets for {b} images x {l} crops of {s}x{s}x3",
            batch.locals.len(),
            batch.local_params.len()
        )));
    }
    // The crops are stored (image, local): reorder to (local, image) so one launch writes the
    // (L, B, 3, s, s) layout directly.
    let mut crops = vec![0u8; b * l * per]; // (L, B, s, s, 3)
    let mut params = Vec::with_capacity(b * l);
    for li in 0..l {
        for bi in 0..b {
            let (src, dst) = (bi * l + li, li * b + bi);
            crops[dst * per..(dst + 1) * per]
                .copy_from_slice(&batch.locals[src * per..(src + 1) * per]);
            params.push(batch.local_params[src]);
        }
    }
    finish_crops(&crops, &params, l * b, s, cfg, device).map(Some)
}

/// One loader batch for the training loop: finished on the CPU by the loader threads, or still
/// crops to be finished on the GPU by `to_views`.
pub enum LoaderBatch {
    Finished(TwoViewBatch),
    Crops(CropBatch),
}

impl LoaderBatch {
    pub fn batch(&self) -> usize {
        match self {
            LoaderBatch::Finished(b) => b.batch,
            LoaderBatch::Crops(c) => c.batch,
        }
    }

    /// The two views, each (B, 3, S, S) on `device`. `poison` sets the first element of view 1
    /// to NaN (the trainer's `inject_nan_at_step` test hook).
    pub fn to_views(
        self,
        cfg: &ViewConfig,
        device: &Device,
        poison: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (v1, v2) = match self {
            LoaderBatch::Finished(b) => {
                let (n, s) = (b.batch, b.size);
                let mut v1 = b.view1;
                if poison && !v1.is_empty() {
                    v1[0] = f32::NAN;
                }
                let v1 = Tensor::from_vec(v1, &[n, 3, s, s])?.to_device(device)?;
                let v2 = Tensor::from_vec(b.view2, &[n, 3, s, s])?.to_device(device)?;
                return Ok((v1, v2));
            }
            LoaderBatch::Crops(c) => crops_to_views(&c, cfg, device)?,
        };
        if poison {
            // A test path: through the host, whatever the device.
            let mut h = v1.to_vec()?;
            if let Some(x) = h.first_mut() {
                *x = f32::NAN;
            }
            let v1 = Tensor::from_vec(h, v1.shape())?.to_device(device)?;
            return Ok((v1, v2));
        }
        Ok((v1, v2))
    }
}

/// The batches of `epoch` from batch `first` on (the skipped ones are not decoded), finished
/// where `gpu_aug(device)` says.
pub fn epoch_batches<'a>(
    loader: &'a TwoViewLoader,
    epoch: usize,
    first: usize,
    device: &Device,
) -> Box<dyn Iterator<Item = Result<LoaderBatch>> + 'a> {
    if gpu_aug(device) {
        Box::new(
            loader
                .epoch_crops(epoch, first)
                .map(|b| b.map(LoaderBatch::Crops)),
        )
    } else {
        Box::new(
            loader
                .epoch_from(epoch, first)
                .map(|b| b.map(LoaderBatch::Finished)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::augment::{finish_view, ColorParams};
    use rand::{Rng, SeedableRng};

    fn random_params(rng: &mut impl Rng) -> ColorParams {
        let mut order = [0u8, 1, 2, 3];
        for i in (1..4).rev() {
            order.swap(i, rng.gen_range(0..=i));
        }
        ColorParams {
            brightness: rng.gen_range(0.6..1.4),
            contrast: rng.gen_range(0.6..1.4),
            saturation: rng.gen_range(0.8..1.2),
            hue: rng.gen_range(-0.1..0.1),
            blur_sigma: if rng.gen() {
                rng.gen_range(0.1..2.0)
            } else {
                0.0
            },
            order,
            jitter: rng.gen::<bool>() as u8,
            grayscale: rng.gen::<bool>() as u8,
            solarize: rng.gen::<bool>() as u8,
            flipped: rng.gen::<bool>() as u8,
        }
    }

    fn random_batch(b: usize, s: usize, locals: usize, ls: usize, seed: u64) -> CropBatch {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut bytes = |n: usize| (0..n).map(|_| rng.gen::<u8>()).collect::<Vec<u8>>();
        let (view1, view2, locals_u8) = (
            bytes(b * s * s * 3),
            bytes(b * s * s * 3),
            bytes(b * locals * ls * ls * 3),
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed + 1);
        let mut ps = |n: usize| (0..n).map(|_| random_params(&mut rng)).collect::<Vec<_>>();
        CropBatch {
            view1,
            view2,
            params1: ps(b),
            params2: ps(b),
            labels: (0..b as u32).collect(),
            indices: (0..b).collect(),
            batch: b,
            size: s,
            locals: locals_u8,
            local_params: ps(b * locals),
            local_count: locals,
            local_size: if locals > 0 { ls } else { 0 },
        }
    }

    // On the CPU device, crops_to_views is the loader's CPU finish, bit for bit: the same
    // function on the same bytes (an odd side, batch 3, every colour branch drawn at random).
    #[test]
    fn cpu_views_equal_the_loader_finish() {
        let cfg = ViewConfig::imagenet(11);
        let batch = random_batch(3, 11, 0, 0, 7);
        let want = batch.finish(&cfg);
        let (v1, v2) = crops_to_views(&batch, &cfg, &Device::Cpu).unwrap();
        assert_eq!(v1.shape(), &[3, 3, 11, 11]);
        assert_eq!(v1.to_vec().unwrap(), want.view1);
        assert_eq!(v2.to_vec().unwrap(), want.view2);
        // Not trivially equal: the colour operations changed the views.
        let plain: Vec<f32> = batch.view1.iter().map(|&v| v as f32 / 255.0).collect();
        assert!(want
            .view1
            .iter()
            .zip(&plain)
            .any(|(a, b)| (a - b).abs() > 0.1));
    }

    #[test]
    fn cpu_locals_follow_the_loader_layout() {
        let mut cfg = ViewConfig::imagenet(9);
        cfg.local_count = 2;
        cfg.local_size = 5;
        let batch = random_batch(3, 9, 2, 5, 11);
        let want = batch.finish_locals(&cfg);
        let got = crops_to_locals(&batch, &cfg, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(got.shape(), &[6, 3, 5, 5]);
        assert_eq!(got.to_vec().unwrap(), want.views);
        let none = random_batch(2, 9, 0, 0, 3);
        assert!(crops_to_locals(&none, &cfg, &Device::Cpu)
            .unwrap()
            .is_none());
    }

    #[test]
    fn loader_batch_paths_agree_on_the_cpu() {
        let cfg = ViewConfig::imagenet(7);
        let batch = random_batch(2, 7, 0, 0, 5);
        let finished = LoaderBatch::Finished(batch.finish(&cfg));
        let crops = LoaderBatch::Crops(batch.clone());
        assert_eq!((finished.batch(), crops.batch()), (2, 2));
        let (a1, a2) = finished.to_views(&cfg, &Device::Cpu, true).unwrap();
        let (b1, b2) = crops.to_views(&cfg, &Device::Cpu, true).unwrap();
        let (a1, b1) = (a1.to_vec().unwrap(), b1.to_vec().unwrap());
        assert!(a1[0].is_nan() && b1[0].is_nan());
        assert_eq!(a1[1..], b1[1..]);
        assert_eq!(a2.to_vec().unwrap(), b2.to_vec().unwrap());
        // finish_view on one crop is the same as the batched finish.
        let mut one = vec![0f32; 3 * 7 * 7];
        finish_view(&batch.view2[..7 * 7 * 3], &batch.params2[0], &cfg, &mut one);
        assert_eq!(one[..], a2.to_vec().unwrap()[..3 * 7 * 7]);
    }

    #[test]
    fn mismatched_lengths_are_errors() {
        let cfg = ViewConfig::imagenet(4);
        let err = finish_crops(
            &[0u8; 10],
            &[ColorParams::identity()],
            1,
            4,
            &cfg,
            &Device::Cpu,
        )
        .unwrap_err();
        assert!(err.to_string().contains("expected 48"), "{err}");
    }

    #[test]
    fn gpu_aug_is_off_on_the_cpu() {
        assert!(!gpu_aug(&Device::Cpu));
        assert!(finish_path(&Device::Cpu).starts_with("cpu"));
    }
}
