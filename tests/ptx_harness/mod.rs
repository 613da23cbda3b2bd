//! Shared by the GPU kernel test files that launch kernels straight from the embedded PTX
//! (tests/gpu_bf16_kernels.rs, tests/gpu_nhwc_kernels.rs): the GPU with a file's kernels
//! loaded (or a printed SKIPPED), upload / download / device addresses, random data and a
//! relative-error check. Each file keeps its own `launch!` (their grids differ).
#![allow(dead_code)] // each test file uses its own subset

use std::collections::HashMap;
use std::sync::Arc;

use carp::device::cuda::{kernels::MODULES, CudaBackend};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub struct Gpu {
    // Keeps the context alive (the stream and functions borrow it).
    _be: CudaBackend,
    pub stream: Arc<CudaStream>,
    pub funcs: HashMap<String, CudaFunction>,
}

/// The GPU with `kernels` loaded (by module; a name ending in `*` stands for its `f32` and
/// `bf16` instantiations), or None after printing why the test `test` is skipped (no CUDA driver
/// or no device).
pub fn gpu_or_skip(test: &str, kernels: &[(&str, &[&str])]) -> Option<Gpu> {
    // Skips only without a driver or a device; a backend that fails to open fails the test.
    let be = carp::testutil::gpu_or_skip(test, || CudaBackend::new(0))?;
    let mut funcs = HashMap::new();
    for &(module, names) in kernels {
        let ptx = MODULES
            .iter()
            .find(|(m, _, _)| *m == module)
            .unwrap_or_else(|| panic!("kernels/{module}.cu missing from the build"))
            .1;
        let m = be
            .context()
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .unwrap_or_else(|e| panic!("loading {module}.ptx: {e:?}"));
        for &pattern in names {
            let full: Vec<String> = match pattern.strip_suffix('*') {
                Some(base) => vec![format!("{base}f32"), format!("{base}bf16")],
                None => vec![pattern.to_string()],
            };
            for n in full {
                let f = m
                    .load_function(&n)
                    .unwrap_or_else(|e| panic!("kernel {n} in {module}.ptx: {e:?}"));
                funcs.insert(n, f);
            }
        }
    }
    Some(Gpu {
        stream: be.stream().clone(),
        _be: be,
        funcs,
    })
}

/// A bf16 NaN's bits (outputs start as NaN: an unwritten element fails).
pub const NAN16: u16 = 0x7fc0;

impl Gpu {
    pub fn up<T: DeviceRepr>(&self, v: &[T]) -> CudaSlice<T> {
        self.stream.clone_htod(v).expect("upload")
    }
    pub fn down<T: DeviceRepr>(&self, s: &CudaSlice<T>) -> Vec<T> {
        self.stream.clone_dtoh(s).expect("download")
    }
    /// The device address of element `off` of `s`.
    pub fn at<T>(&self, s: &CudaSlice<T>, off: usize) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p + (off * std::mem::size_of::<T>()) as u64
    }
    pub fn nan32(&self, n: usize) -> CudaSlice<f32> {
        self.up(&vec![f32::NAN; n])
    }
    pub fn nan16(&self, n: usize) -> CudaSlice<u16> {
        self.up(&vec![NAN16; n])
    }
}

/// `n` normal samples (Box-Muller) times `scale` plus `shift`.
pub fn randn(n: usize, rng: &mut ChaCha8Rng, scale: f32, shift: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.gen_range(1e-12..1.0);
            let u2: f64 = rng.gen();
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            z as f32 * scale + shift
        })
        .collect()
}

/// Max |got - want| / max |want| <= tol, every value finite.
pub fn close(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{name}: element {i} is {}", got[i]);
    }
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max);
    assert!(
        worst / scale <= tol,
        "{name}: relative error {:.3e} > {tol:.1e}",
        worst / scale
    );
}
