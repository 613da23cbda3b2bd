//! One file per op group: the CPU reference kernels, the backend dispatch (`<op>_forward` /
//! `<op>_backward` on tensors, each one `match` on `Backend`), the tape method that records
//! one backward closure, and the tests (forward against a naive implementation, backward
//! against finite differences). docs/architecture.md: "Adding an op".

pub mod activation;
pub mod augment;
pub mod batchnorm;
pub mod conv;
pub mod elementwise;
pub mod flat;
pub mod fused;
pub mod linear;
pub mod loss;
pub mod pool;
pub mod recompute;
pub mod rows;

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

/// The backend an op runs on: its inputs' (all on one device, else an error naming the op).
/// An op's forward and backward helpers each `match` on it once: those matches are where the
/// device is chosen, and the op's one tape closure calls the helpers.
#[derive(Clone)]
pub(crate) enum Backend {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<crate::device::cuda::CudaBackend>),
}

impl Backend {
    /// The backend of `device` (a GPU's is opened on first use); an error for a CUDA device in
    /// a build without the `cuda` feature.
    pub(crate) fn on(device: &Device) -> Result<Backend> {
        match device {
            Device::Cpu => Ok(Backend::Cpu),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => Ok(Backend::Cuda(crate::device::cuda::backend(*i)?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => bail!(Device, "{}", crate::device::NO_CUDA),
        }
    }

    pub(crate) fn of(op: &str, xs: &[&Tensor]) -> Result<Backend> {
        common_device(op, xs)?;
        Ok(match xs.first().map(|t| t.storage()) {
            #[cfg(feature = "cuda")]
            Some(crate::tensor::Storage::Cuda(c)) => Backend::Cuda(c.backend.clone()),
            _ => Backend::Cpu,
        })
    }
}

/// What the ops' CUDA arms share: device buffers of tensors, gradients moved to the op's GPU
/// and format, outputs wrapped as tensors.
#[cfg(feature = "cuda")]
pub(crate) mod gpu {
    use std::sync::Arc;

    use crate::bail;
    use crate::device::cuda::{CudaBackend, DeviceBuffer};
    use crate::error::Result;
    use crate::tensor::{DType, Layout, Tensor};

    pub(crate) type Be = Arc<CudaBackend>;

    /// The device buffer of a CUDA tensor (an error naming `op` otherwise).
    pub(crate) fn dbuf<'a>(op: &str, t: &'a Tensor) -> Result<&'a DeviceBuffer> {
        match t.cuda() {
            Ok(c) => Ok(&c.buf),
            Err(e) => bail!(Device, "{op}: {e}"),
        }
    }

    /// A gradient that arrived on another device than the op ran on (a CPU seed for a GPU
    /// output): moved here, so the backward stays on the op's GPU; in f32, the type of every op
    /// without bf16 kernels (a bf16 gradient widens exactly).
    pub(crate) fn on_gpu(be: &Be, t: &Tensor) -> Result<Tensor> {
        on_gpu_as(be, t, (DType::F32, Layout::Nchw))
    }

    /// As [`on_gpu`], in the element type and layout of the op's activations (an op with bf16
    /// kernels takes its output gradient in its output's format: an f32 gradient, e.g. the sum
    /// of a bf16 and an f32 contribution, is rounded here, where the CPU emulation's bf16
    /// output node rounds it).
    pub(crate) fn on_gpu_as(be: &Be, t: &Tensor, (dt, layout): (DType, Layout)) -> Result<Tensor> {
        t.to_device(&crate::tensor::Device::Cuda(be.ordinal()))?
            .to_format(dt, layout)
    }

    /// The (element type, layout) of a tensor's storage.
    pub(crate) fn format_of(t: &Tensor) -> (DType, Layout) {
        (t.dtype(), t.layout())
    }

    /// A new device buffer for `n` elements in format `f`.
    pub(crate) fn alloc_fmt(
        be: &Be,
        (dt, layout): (DType, Layout),
        n: usize,
    ) -> Result<DeviceBuffer> {
        Ok(be.alloc_dt(dt, n)?.with_layout(layout))
    }

    pub(crate) fn wrap(be: &Be, buf: DeviceBuffer, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_cuda(buf, be.clone(), shape)
    }
}
