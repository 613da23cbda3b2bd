//! The CUDA backend (feature `cuda`).

pub mod kernels;

/// Number of CUDA devices, 0 when no driver (libcuda) is installed or it reports none.
pub fn device_count() -> usize {
    // SAFETY: is_culib_present only tries to dlopen libcuda; nothing else is touched.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    if cudarc::driver::result::init().is_err() {
        return 0;
    }
    cudarc::driver::CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}
