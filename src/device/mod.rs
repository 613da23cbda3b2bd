//! Backends. The CPU backend is the reference (plain f32, NCHW, rayon); the CUDA backend joins
//! behind the `cuda` feature.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod profiler;

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

/// The most bytes live tensors on `device` needed at once so far in this process (the measure
/// PyTorch's `max_memory_allocated` gives): the CPU's tensor-storage counter, or the GPU pool's
/// requested-bytes peak.
pub fn peak_live_bytes(device: &crate::tensor::Device) -> crate::error::Result<usize> {
    match device {
        crate::tensor::Device::Cpu => Ok(crate::tensor::cpu_storage_bytes().1),
        #[cfg(feature = "cuda")]
        crate::tensor::Device::Cuda(i) => Ok(cuda::backend(*i)?.pool_stats().peak_bytes_requested),
        #[cfg(not(feature = "cuda"))]
        crate::tensor::Device::Cuda(_) => crate::bail!(
            Device,
            "this build has no CUDA support (rebuild with --features cuda)"
        ),
    }
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
