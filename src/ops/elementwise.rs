//! Elementwise ops: residual add, ReLU, reshape/flatten.

use rayon::prelude::*;

use crate::autograd::{Bf16Path, Tape};
use crate::bail;
use crate::error::Result;
#[cfg(feature = "cuda")]
use crate::ops::gpu;
use crate::ops::Backend;
use crate::tensor::Tensor;

pub use crate::tensor::PAR_CHUNK;

// ---------- CPU reference kernels ----------

/// y = max(x, 0)
pub fn relu_forward_cpu(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(PAR_CHUNK)
        .zip(x.par_chunks(PAR_CHUNK))
        .for_each(|(y, x)| {
            for i in 0..y.len() {
                y[i] = x[i].max(0.0);
            }
        });
}

/// dx = dy where y > 0 (the output decides: ReLU's subgradient at 0 is taken as 0, as PyTorch).
pub fn relu_backward_cpu(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(PAR_CHUNK)
        .zip(y.par_chunks(PAR_CHUNK).zip(dy.par_chunks(PAR_CHUNK)))
        .for_each(|(dx, (y, dy))| {
            for i in 0..dx.len() {
                dx[i] = if y[i] > 0.0 { dy[i] } else { 0.0 };
            }
        });
}

// ---------- backend dispatch ----------

/// max(x, 0) on x's device.
fn relu_forward(x: &Tensor) -> Result<Tensor> {
    match Backend::of("relu", &[x])? {
        Backend::Cpu => {
            let mut y = vec![0.0; x.numel()];
            relu_forward_cpu(x.cpu()?, &mut y);
            x.like(y)
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let mut y = be.alloc_f32(x.numel())?;
            be.relu_forward(gpu::dbuf("relu", x)?, &mut y)?;
            gpu::wrap(&be, y, x.shape())
        }
    }
}

/// dx = dy where y > 0, on y's device (a gradient from elsewhere is moved there).
fn relu_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    dy.expect_shape("relu backward dy", y.shape())?;
    match Backend::of("relu", &[y])? {
        Backend::Cpu => {
            let mut dx = vec![0.0; dy.numel()];
            relu_backward_cpu(y.cpu()?, dy.cpu()?, &mut dx);
            dy.like(dx)
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let dy = gpu::on_gpu(&be, dy)?;
            let mut dx = be.alloc_f32(dy.numel())?;
            be.relu_backward(gpu::dbuf("relu", y)?, gpu::dbuf("relu", &dy)?, &mut dx)?;
            gpu::wrap(&be, dx, y.shape())
        }
    }
}

// ---------- tape ops ----------

impl Tape {
    /// a + b (same shapes): the residual connection.
    pub fn add(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        // Bf16 mode (Tape::bf16_inputs): bf16 operands, the f32 body, a bf16 output.
        if self.is_bf16() {
            let r = self.bf16_inputs("add", &[a, b], Bf16Path::Native)?;
            let y = self.as_f32(|t| t.add(&r[0], &r[1]))?;
            return self.bf16_output(&y);
        }
        let y = a.add_untracked(b)?;
        self.record("add", &y, &[a, b], |dy| {
            Ok(vec![Some(dy.clone()), Some(dy.clone())])
        });
        Ok(y)
    }

    /// max(x, 0).
    pub fn relu(&mut self, x: &Tensor) -> Result<Tensor> {
        // Bf16 mode (Tape::bf16_inputs): bf16 operands, the f32 body, a bf16 output.
        if self.is_bf16() {
            let r = self.bf16_inputs("relu", &[x], Bf16Path::ViaF32)?;
            let y = self.as_f32(|t| t.relu(&r[0]))?;
            return self.bf16_output(&y);
        }
        let y = relu_forward(x)?;
        // The backward needs only the output (dx = dy where y > 0).
        let saved = y.clone();
        self.record("relu", &y, &[x], move |dy| {
            Ok(vec![Some(relu_backward(&saved, dy)?)])
        });
        Ok(y)
    }

    /// A new view with another shape (same element count); its gradient is reshaped back.
    pub fn reshape(&mut self, x: &Tensor, shape: &[usize]) -> Result<Tensor> {
        let y = x.reshaped(shape)?;
        let in_shape = x.shape().to_vec();
        self.record("reshape", &y, &[x], move |dy| {
            Ok(vec![Some(dy.reshaped(&in_shape)?)])
        });
        Ok(y)
    }

    /// (N, ...) -> (N, prod(...)).
    pub fn flatten(&mut self, x: &Tensor) -> Result<Tensor> {
        if x.rank() == 0 {
            bail!(Shape, "flatten of a scalar");
        }
        let n = x.dim(0);
        let rest = x.numel() / n.max(1);
        self.reshape(x, &[n, rest])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;
    use crate::testutil::{check_grad, check_tape_op, f64s, randn, TapeRun, Tol};

    #[test]
    fn add_and_relu_forward_match_naive() {
        let a = randn(&[3, 5, 7], 1);
        let b = randn(&[3, 5, 7], 2);
        let mut tape = Tape::no_grad();
        let s = tape.add(&a, &b).unwrap();
        let r = tape.relu(&a).unwrap();
        let (av, bv) = (a.to_vec().unwrap(), b.to_vec().unwrap());
        for (i, (&s, &r)) in s.cpu().unwrap().iter().zip(r.cpu().unwrap()).enumerate() {
            assert_eq!(s, av[i] + bv[i]);
            assert_eq!(r, if av[i] > 0.0 { av[i] } else { 0.0 });
        }
    }

    #[test]
    fn add_relu_reshape_gradients_match_finite_differences() {
        // Relative error bound 1e-2 (f32 central differences, step 1e-3); values near the ReLU
        // kink are avoided by the checker's random inputs being continuous.
        let a = randn(&[2, 3, 5], 3);
        let b = randn(&[2, 3, 5], 4);
        check_grad(&[a, b], 1e-2, |tape, x| {
            let s = tape.add(&x[0], &x[1])?;
            let r = tape.relu(&s)?;
            let r = tape.add(&r, &x[0])?; // x[0] used twice: gradients must accumulate
            tape.reshape(&r, &[6, 5])
        })
        .unwrap();
    }
    /// add, relu, and x + relu(x) through a reshape (x used twice: its two gradients
    /// accumulate) through the tape on `dev`, against values derived by hand: a + b (f32's one
    /// rounding of the exact sum: 1 ulp), max(x, 0) and x + max(x, 0) exact, gradients dy, dy
    /// [x > 0] and dy (1 + [x > 0]) exact. On a GPU also against the CPU op within 1e-6
    /// (gpu_tape's former bound). Shapes: one element, odd, and a ResNet activation.
    fn add_relu_reshape_match_hand_derivation_on(dev: &Device) {
        for (c, shape) in [vec![1usize], vec![3, 5, 7], vec![2, 64, 56, 56]]
            .into_iter()
            .enumerate()
        {
            let s = 10 * c as u64;
            let (a, b, dy) = (
                randn(&shape, s + 1),
                randn(&shape, s + 2),
                randn(&shape, s + 3),
            );
            let (av, bv, dyv) = (
                f64s(a.cpu().unwrap()),
                f64s(b.cpu().unwrap()),
                f64s(dy.cpu().unwrap()),
            );
            let pos = |x: f64| if x > 0.0 { 1.0 } else { 0.0 };
            let gpu = Tol::new(1e-6, 1e-6);
            let want = TapeRun {
                outputs: vec![av.iter().zip(&bv).map(|(x, y)| x + y).collect()],
                grads: vec![Some(dyv.clone()), Some(dyv.clone())],
            };
            let add = |t: &mut Tape, x: &[Tensor]| Ok(vec![t.add(&x[0], &x[1])?]);
            let tol = Tol::new(f32::EPSILON as f64, 0.0);
            check_tape_op(
                dev,
                &format!("add {shape:?}"),
                &[a.clone(), b],
                &dy,
                &add,
                &want,
                tol,
                gpu,
            );
            let want = TapeRun {
                outputs: vec![av.iter().map(|&x| x.max(0.0)).collect()],
                grads: vec![Some(
                    av.iter().zip(&dyv).map(|(&x, g)| pos(x) * g).collect(),
                )],
            };
            let relu = |t: &mut Tape, x: &[Tensor]| Ok(vec![t.relu(&x[0])?]);
            let name = format!("relu {shape:?}");
            check_tape_op(
                dev,
                &name,
                std::slice::from_ref(&a),
                &dy,
                &relu,
                &want,
                Tol::EXACT,
                Tol::EXACT,
            );
            let want = TapeRun {
                outputs: vec![av.iter().map(|&x| x + x.max(0.0)).collect()],
                grads: vec![Some(
                    av.iter()
                        .zip(&dyv)
                        .map(|(&x, g)| (1.0 + pos(x)) * g)
                        .collect(),
                )],
            };
            let twice = |t: &mut Tape, x: &[Tensor]| {
                let n = x[0].numel();
                let flat = t.reshape(&x[0], &[n])?;
                let r = t.relu(&flat)?;
                let y = t.add(&flat, &r)?;
                Ok(vec![t.reshape(&y, x[0].shape())?])
            };
            let name = format!("x + relu(x) {shape:?}");
            check_tape_op(dev, &name, &[a], &dy, &twice, &want, Tol::EXACT, gpu);
        }
    }
    crate::test_device!(
        add_relu_reshape_match_hand_derivation_on,
        add_relu_reshape_match_hand_derivation_cpu,
        add_relu_reshape_match_hand_derivation_cuda
    );
}
