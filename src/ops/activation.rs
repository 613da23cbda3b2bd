//! Activations: exact (erf) GELU, as the CARP head uses it (Linear + BN + GELU).

use rayon::prelude::*;

use crate::autograd::{Bf16Path, Tape};
use crate::bail;
use crate::error::Result;
use crate::ops::elementwise::PAR_CHUNK;
#[cfg(feature = "cuda")]
use crate::ops::gpu;
use crate::ops::Backend;
use crate::tensor::Tensor;

/// 1 / sqrt(2).
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi): the standard normal density's constant.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

// ---------- CPU reference kernels ----------

/// y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).
pub fn gelu_forward_cpu(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(PAR_CHUNK)
        .zip(x.par_chunks(PAR_CHUNK))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = 0.5 * x * (1.0 + libm::erff(x * FRAC_1_SQRT_2));
            }
        });
}

/// dx = dy * (Phi(x) + x phi(x)), phi the standard normal density.
pub fn gelu_backward_cpu(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(PAR_CHUNK)
        .zip(x.par_chunks(PAR_CHUNK).zip(dy.par_chunks(PAR_CHUNK)))
        .for_each(|(dx, (x, dy))| {
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                let cdf = 0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2));
                let pdf = FRAC_1_SQRT_2PI * (-0.5 * x * x).exp();
                *dx = dy * (cdf + x * pdf);
            }
        });
}

// ---------- backend dispatch ----------

/// GELU of x on x's device.
fn gelu_forward(x: &Tensor) -> Result<Tensor> {
    match Backend::of("gelu", &[x])? {
        Backend::Cpu => {
            let mut y = vec![0.0; x.numel()];
            gelu_forward_cpu(x.cpu()?, &mut y);
            x.like(y)
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let mut y = be.alloc_f32(x.numel())?;
            be.gelu_forward(gpu::dbuf("gelu", x)?, &mut y)?;
            gpu::wrap(&be, y, x.shape())
        }
    }
}

/// dx from the input x and dy, on x's device (a gradient from elsewhere is moved there).
fn gelu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if dy.shape() != x.shape() {
        bail!(
            Shape,
            "gelu backward: output gradient {:?} vs input {:?}",
            dy.shape(),
            x.shape()
        );
    }
    match Backend::of("gelu", &[x])? {
        Backend::Cpu => {
            let mut dx = vec![0.0; dy.numel()];
            gelu_backward_cpu(x.cpu()?, dy.cpu()?, &mut dx);
            x.like(dx)
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let dy = gpu::on_gpu(&be, dy)?;
            let mut dx = be.alloc_f32(dy.numel())?;
            be.gelu_backward(gpu::dbuf("gelu", x)?, gpu::dbuf("gelu", &dy)?, &mut dx)?;
            gpu::wrap(&be, dx, x.shape())
        }
    }
}

// ---------- tape ops ----------

impl Tape {
    /// Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).
    pub fn gelu(&mut self, x: &Tensor) -> Result<Tensor> {
        // Bf16 mode (Tape::bf16_inputs): bf16 operands, the f32 body, a bf16 output.
        if self.is_bf16() {
            let r = self.bf16_inputs("gelu", &[x], Bf16Path::ViaF32)?;
            let y = self.as_f32(|t| t.gelu(&r[0]))?;
            return self.bf16_output(&y);
        }
        let y = gelu_forward(x)?;
        // The backward needs the input (not the output: GELU is not invertible cheaply).
        let saved = x.clone();
        self.record("gelu", &y, &[x], move |dy| {
            Ok(vec![Some(gelu_backward(&saved, dy)?)])
        });
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;
    use crate::testutil::{check_grad, check_tape_op, f64s, randn, TapeRun, Tol};

    fn gelu_f64(x: f64) -> f64 {
        0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
    }

    #[test]
    fn gelu_forward_matches_f64_erf_formula() {
        // Values of std 3 cover both tails and the curved middle; odd length crosses no chunk
        // boundary specially but exercises the remainder path of a larger buffer below.
        let x: Vec<f32> = randn(&[7, 13, 5], 11)
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| 3.0 * v)
            .collect();
        let xt = Tensor::from_vec(x.clone(), &[7, 13, 5]).unwrap();
        let y = Tape::no_grad().gelu(&xt).unwrap().to_vec().unwrap();
        for (&xi, &yi) in x.iter().zip(&y) {
            let r = gelu_f64(xi as f64);
            assert!(
                (yi as f64 - r).abs() <= 1e-6 * (1.0 + r.abs()),
                "gelu({xi}) = {yi}, expected {r}"
            );
        }
        // A buffer larger than one rayon chunk.
        let big = randn(&[PAR_CHUNK * 2 + 17], 12);
        let y = Tape::no_grad().gelu(&big).unwrap().to_vec().unwrap();
        for (&xi, &yi) in big.cpu().unwrap().iter().zip(&y) {
            let r = gelu_f64(xi as f64);
            assert!((yi as f64 - r).abs() <= 1e-6 * (1.0 + r.abs()));
        }
    }

    #[test]
    fn gelu_backward_kernel_matches_f64_derivative() {
        // d/dx [x Phi(x)] = Phi(x) + x phi(x), evaluated in f64.
        let x = randn(&[301], 13).to_vec().unwrap();
        let dy = randn(&[301], 14).to_vec().unwrap();
        let mut dx = vec![0.0; 301];
        gelu_backward_cpu(&x, &dy, &mut dx);
        for i in 0..301 {
            let xi = x[i] as f64;
            let d = 0.5 * (1.0 + libm::erf(xi / std::f64::consts::SQRT_2))
                + xi * (-0.5 * xi * xi).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let r = d * dy[i] as f64;
            assert!((dx[i] as f64 - r).abs() <= 1e-6 * (1.0 + r.abs()));
        }
    }

    #[test]
    fn gelu_gradient_matches_finite_differences() {
        // Relative error bound 1e-2 (f32 forward, central differences with step 1e-3).
        let x = randn(&[3, 4, 5], 15);
        check_grad(&[x], 1e-2, |tape, xs| tape.gelu(&xs[0])).unwrap();
    }
    /// d/dx [x Phi(x)] = Phi(x) + x phi(x), in f64.
    fn gelu_grad_f64(x: f64) -> f64 {
        0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
            + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
    }

    /// gelu through the tape on `dev` against the f64 erf formula and its derivative (1e-6 of
    /// the largest value, forward and backward: f32 erf and exp). On a GPU also against the
    /// CPU op within 1e-6 forward, 1e-5 backward (gpu_tape's former bounds).
    fn gelu_matches_f64_on(dev: &Device) {
        for (c, shape) in [vec![1usize], vec![3, 5, 7], vec![2, 64, 56, 56]]
            .into_iter()
            .enumerate()
        {
            let s = 10 * c as u64;
            let (x, dy) = (randn(&shape, s + 1), randn(&shape, s + 3));
            let (xv, dyv) = (f64s(x.cpu().unwrap()), f64s(dy.cpu().unwrap()));
            let want = TapeRun {
                outputs: vec![xv.iter().map(|&v| gelu_f64(v)).collect()],
                grads: vec![Some(
                    xv.iter()
                        .zip(&dyv)
                        .map(|(&v, g)| gelu_grad_f64(v) * g)
                        .collect(),
                )],
            };
            let gelu = |t: &mut Tape, x: &[Tensor]| Ok(vec![t.gelu(&x[0])?]);
            check_tape_op(
                dev,
                &format!("gelu {shape:?}"),
                &[x],
                &dy,
                &gelu,
                &want,
                Tol::new(1e-6, 1e-6),
                Tol::new(1e-6, 1e-5),
            );
        }
    }
    crate::test_device!(
        gelu_matches_f64_on,
        gelu_matches_f64_cpu,
        gelu_matches_f64_cuda
    );
}
