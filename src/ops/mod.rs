//! One file per op: the CPU reference kernel, the tape method (forward + recorded backward),
//! and its tests (forward against a naive implementation, backward against finite differences).

pub mod activation;
pub mod batchnorm;
pub mod conv;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod elementwise;
pub mod fused;
pub mod linear;
pub mod pool;
pub mod recompute;

use crate::bail;
use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// The device all of `op`'s inputs live on; a clear error naming the op, the devices and the
/// shapes when they differ (ops never move data implicitly).
pub fn common_device(op: &str, xs: &[&Tensor]) -> Result<Device> {
    let Some(first) = xs.first() else {
        return Ok(Device::Cpu);
    };
    let dev = first.device();
    for (i, t) in xs.iter().enumerate().skip(1) {
        let d = t.device();
        if d != dev {
            bail!(
                Device,
                "{op}: inputs on different devices: input 0 {:?} on {dev}, input {i} {:?} on {d} \
                 (move them with Tensor::to_device first)",
                first.shape(),
                t.shape()
            );
        }
    }
    Ok(dev)
}

/// The backend of `op`'s inputs when they are on a GPU, `None` on the CPU; an error when they
/// are on different devices. Every tape op calls this first and takes its CUDA arm on `Some`.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_backend(
    op: &str,
    xs: &[&Tensor],
) -> Result<Option<std::sync::Arc<crate::device::cuda::CudaBackend>>> {
    common_device(op, xs)?;
    Ok(match xs.first().map(|t| t.storage()) {
        Some(crate::tensor::Storage::Cuda(c)) => Some(c.backend.clone()),
        _ => None,
    })
}
