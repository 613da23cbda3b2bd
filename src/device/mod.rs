//! Backends. The CPU backend is the reference (plain f32, NCHW, rayon); the CUDA backend joins
//! behind the `cuda` feature.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod profiler;

/// The environment switches of the training step, for `--help` (the README lists them too):
/// each turns one optimization off, for A/B runs and as a fallback.
pub const ENV_SWITCHES: &str = "\
Environment switches, for A/B runs and as fallbacks (the defaults are the fast paths):
  CARP_FUSED_BN=0     BN, ReLU and the residual add as separate ops instead of fused ones
  CARP_RECOMPUTE=0|bn recompute less in backward (default all: the inner BN + ReLU outputs,
                      conv3's output and the stem's BN + ReLU output; bn: the BN outputs only);
                      more memory, the same values
GPU only:
  CARP_TF32=0         FMA-only convolutions (no TF32 tensor cores)
  CARP_CUDNN_FIND=0   cuDNN's heuristic algorithm instead of timing each one (cudnnFind)
  CARP_NHWC=0         bf16 activations in NCHW instead of channels-last
  CARP_BN_TWO_PASS=1  channels-last BN statistics in two reads of x (sums, then squared
                      deviations) instead of one read of shifted sums
  CARP_HOST_OPTIM=1   LARS, EMA and BN statistics updates on the host instead of the device
  CARP_STEP_SYNC=1    wait for the NaN verdict mid-step instead of gating updates on the device
  CARP_PHASE_SYNC=1   wait after each phase (per-phase times; carp-bench does unless
                      --no-phase-sync)
  CARP_GPU_AUG=0      finish the views' colour augmentation on the CPU instead of the GPU";

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
