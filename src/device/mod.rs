//! Backends. The CPU backend is the reference (plain f32, NCHW, rayon); the CUDA backend joins
//! behind the `cuda` feature.

/// Name of the backend this build can run, for `--device auto`.
pub fn available() -> Vec<&'static str> {
    vec!["cpu"]
}
