//! The colour half of the view augmentation on a device: u8 crops (B, S, S, 3) and one
//! `ColorParams` each, finished into a normalized (B, 3, S, S) f32 tensor. Not a tape op (the
//! views are inputs, nothing differentiates them): the CPU arm runs `data::augment::finish`,
//! the specification, on rayon; the CUDA arm the kernels of kernels/augment.cu
//! (`CudaBackend::finish_views`), which tests/gpu_ops.rs checks against it.

use rayon::prelude::*;

use crate::data::augment::{ColorParams, ViewConfig};
use crate::error::{Error, Result};
use crate::ops::Backend;
use crate::tensor::{Device, Tensor};

/// Finishes `b` crops of side `s` — (B, S, S, 3) u8, one `ColorParams` each — into a
/// normalized (B, 3, S, S) tensor on `device`: on the CPU with `data::augment::finish`, on
/// CUDA with the kernels (whatever `--view-finish` says: callers choose the path with
/// `train::views::gpu_aug`).
pub fn finish_crops(
    crops: &[u8],
    params: &[ColorParams],
    b: usize,
    s: usize,
    cfg: &ViewConfig,
    device: &Device,
) -> Result<Tensor> {
    if crops.len() != b * s * s * 3 || params.len() != b {
        return Err(Error::Shape(format!(
            "finishing views: {} crop bytes and {} parameter sets for {b} crops of {s}x{s}x3 \
             (expected {} and {b})",
            crops.len(),
            params.len(),
            b * s * s * 3
        )));
    }
    match Backend::on(device)? {
        Backend::Cpu => {
            let per = 3 * s * s;
            let mut out = vec![0f32; b * per]; // (B, 3, S, S)
            if per > 0 {
                out.par_chunks_mut(per)
                    .zip(crops.par_chunks(s * s * 3))
                    .zip(params.par_iter())
                    .for_each(|((o, c), p)| {
                        crate::data::augment::finish(
                            c,
                            p,
                            s,
                            &cfg.mean,
                            &cfg.std,
                            cfg.solarize_threshold,
                            o,
                        )
                    });
            }
            Tensor::from_vec(out, &[b, 3, s, s])
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let norm = crate::data::augment::AugNorm::new(cfg);
            let buf = be.finish_views(crops, params, b, s, &norm)?; // (B, 3, S, S)
            Tensor::from_cuda(buf, be, &[b, 3, s, s])
        }
    }
}
