//! Backends. The CPU backend is the reference (plain f32, NCHW, rayon); the CUDA backend joins
//! behind the `cuda` feature.

pub mod collective;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod profiler;
pub mod tcp;

use crate::bail;
use crate::error::Result;

/// Where a tensor lives. Ops dispatch on the storage; callers only ever name a `Device` when
/// they create inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// The n-th CUDA device (only usable with the `cuda` feature).
    Cuda(usize),
}

impl Device {
    /// Parses `--device`: `cpu`, `cuda` (= `cuda:0`), `cuda:N`, or `auto` (the first GPU when
    /// this build has the `cuda` feature and the machine a GPU, else the CPU). `cuda` in a
    /// build without the feature is an error saying so.
    pub fn parse(spec: &str) -> Result<Device> {
        let spec = spec.trim();
        match spec {
            "cpu" => Ok(Device::Cpu),
            "auto" => {
                if available().contains(&"cuda") {
                    Ok(Device::Cuda(0))
                } else {
                    Ok(Device::Cpu)
                }
            }
            s if s == "cuda" || s.starts_with("cuda:") => {
                let n = match s.strip_prefix("cuda:") {
                    None => 0,
                    Some(i) => i.parse::<usize>().map_err(|_| {
                        crate::error::Error::Config(format!(
                            "--device {s}: expected cuda:N with N a GPU index"
                        ))
                    })?,
                };
                if !cfg!(feature = "cuda") {
                    bail!(
                        Device,
                        "--device {s}: this build has no CUDA backend (rebuild with `--features \
                         cuda`), use --device cpu"
                    );
                }
                Ok(Device::Cuda(n))
            }
            other => bail!(
                Config,
                "unknown device {other:?}: use auto, cpu, cuda or cuda:N"
            ),
        }
    }
}

impl Device {
    /// Opens the device's backend (a GPU's context, stream and library handles) so that a
    /// missing driver or library is reported before any work starts; nothing to do for the CPU.
    pub fn open(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => cuda::backend(*i).map(|_| ()),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => bail!(Device, "{NO_CUDA}"),
        }
    }

    /// Waits until the device has finished all the work queued on it (a GPU's stream); nothing
    /// to wait for on the CPU, whose ops return when done.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => cuda::backend(*i)?.synchronize(),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => bail!(Device, "{NO_CUDA}"),
        }
    }

    /// A GPU's free memory in bytes (cuMemGetInfo); `None` for the CPU, whose free memory is
    /// the operating system's to tell.
    pub fn gpu_free_bytes(&self) -> Result<Option<u64>> {
        match self {
            Device::Cpu => Ok(None),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let (free, _total) = cuda::backend(*i)?
                    .context()
                    .mem_get_info()
                    .map_err(|e| crate::error::Error::Device(format!("cuMemGetInfo: {e}")))?;
                Ok(Some(free as u64))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => bail!(Device, "{NO_CUDA}"),
        }
    }
}

/// The error of a CUDA device in a build without the `cuda` feature.
pub const NO_CUDA: &str = "this build has no CUDA support (rebuild with --features cuda)";

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The element type of a storage. CPU tensors are always f32 (the bf16 mode is emulated there
/// by rounding values held in f32); a GPU tensor of a bf16 step stores bf16 (2 bytes per
/// element: activations and their gradients), with f32 arithmetic inside every kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    #[default]
    F32,
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
    /// The suffix of the kernels for this element type (`bn_forward_f32`, `bn_forward_bf16`).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a rank-4 tensor's logical (N, C, H, W) maps to memory. The CPU and every f32 tensor use
/// NCHW; a bf16 GPU activation may be channels-last (NHWC: element (n, c, h, w) at
/// ((n H + h) W + w) C + c), the layout of cuDNN's fastest bf16 convolutions. Shapes stay
/// (N, C, H, W) either way; host copies (`to_vec`) are NCHW.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Layout {
    #[default]
    Nchw,
    Nhwc,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::Nchw => "NCHW",
            Layout::Nhwc => "NHWC",
        })
    }
}

/// The collective a data-parallel rank on `device` steps with, over the host `control` plane
/// (the TCP group): on a GPU an NCCL group for the gradient average, elsewhere `control`.
pub fn rank_collective(
    control: std::sync::Arc<dyn collective::Collective>,
    device: &Device,
) -> Result<std::sync::Arc<dyn collective::Collective>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => nccl::nccl_group(control, device),
        _ => Ok(control),
    }
}

/// GPUs this build can use on this machine (0 without the `cuda` feature, a driver or a GPU).
pub fn gpu_count() -> usize {
    #[cfg(feature = "cuda")]
    return cuda::device_count();
    #[cfg(not(feature = "cuda"))]
    0
}

/// Name of the backend this build can run, for `--device auto`.
/// With the `cuda` feature, "cuda" is listed only when a CUDA driver and at least one GPU are
/// present on this machine.
pub fn available() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut v = vec!["cpu"];
    #[cfg(feature = "cuda")]
    if cuda::device_count() > 0 {
        v.push("cuda");
    }
    v
}

/// NVTX ranges callable without `cfg`: the real ones (`cuda::nvtx`) with the `cuda` feature,
/// no-ops without it.
pub mod nvtx {
    #[cfg(feature = "cuda")]
    pub use super::cuda::nvtx::{scoped, Range};

    /// A no-op range (this build has no profiler support).
    #[cfg(not(feature = "cuda"))]
    #[must_use = "the range closes when this value is dropped"]
    pub struct Range(());

    #[cfg(not(feature = "cuda"))]
    impl Range {
        pub fn new(_name: &str) -> Range {
            Range(())
        }
    }

    /// Runs `f` (inside a named range when profiling is compiled in).
    #[cfg(not(feature = "cuda"))]
    pub fn scoped<T>(_name: &str, f: impl FnOnce() -> T) -> T {
        f()
    }
}
