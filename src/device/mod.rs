//! Backends. The CPU backend is the reference (plain f32, NCHW, rayon); the CUDA backend joins
//! behind the `cuda` feature.

#[cfg(feature = "cuda")]
pub mod cuda;

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
