//! Pooling over (N, C, H, W): max pool (ResNet's 3x3/2 stem pool) and global average pool.
//!
//! Max pool's backward does not save argmax indices: it recomputes each window's argmax from the
//! saved input (cheap next to the convolutions, and it keeps the saved state to the input,
//! which the graph holds anyway). The argmax is the first maximum in row-major window order, with
//! NaN winning, exactly as PyTorch's CPU kernel, so gradients agree on ties.

use rayon::prelude::*;

use crate::autograd::{Bf16Path, Tape};
use crate::bail;
use crate::error::Result;
#[cfg(feature = "cuda")]
use crate::ops::gpu;
use crate::ops::Backend;
use crate::tensor::{DType, Layout, Tensor};

/// The sizes of one max pool: input (N, C, H, W), square window `kernel`, `stride`, `padding`
/// (padding acts as -inf), output (N, C, HO, WO) with floor rounding (PyTorch's default
/// `ceil_mode=False`, no dilation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dShape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Pool2dShape {
    /// Output height: (H + 2*padding - kernel) / stride + 1. Meaningful only for a shape that
    /// passes [`Pool2dShape::validate`].
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.padding - self.kernel) / self.stride + 1
    }
    /// Output width: (W + 2*padding - kernel) / stride + 1.
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.padding - self.kernel) / self.stride + 1
    }
    /// Elements of the input (N, C, H, W).
    pub fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    /// Elements of the output (N, C, HO, WO).
    pub fn y_len(&self) -> usize {
        self.n * self.c * self.ho() * self.wo()
    }

    /// Checks the sizes. As PyTorch, padding may be at most kernel / 2, which guarantees that
    /// every window holds at least one real input pixel.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("N", self.n),
            ("C", self.c),
            ("H", self.h),
            ("W", self.w),
            ("kernel", self.kernel),
            ("stride", self.stride),
        ];
        for (name, v) in dims {
            if v == 0 {
                bail!(Shape, "max_pool2d: {name} must be positive ({self:?})");
            }
        }
        if 2 * self.padding > self.kernel {
            bail!(
                Shape,
                "max_pool2d: padding {} must be at most half the kernel {}",
                self.padding,
                self.kernel
            );
        }
        if self.h + 2 * self.padding < self.kernel || self.w + 2 * self.padding < self.kernel {
            bail!(
                Shape,
                "max_pool2d: kernel {k}x{k} is larger than the padded input {}x{} (H={}, W={}, padding={})",
                self.h + 2 * self.padding,
                self.w + 2 * self.padding,
                self.h,
                self.w,
                self.padding,
                k = self.kernel
            );
        }
        Ok(())
    }

    /// The shape of `max_pool2d(x, ..)` for x (N, C, H, W), validated.
    pub fn from_shape(
        x: &[usize],
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Pool2dShape> {
        if x.len() != 4 {
            bail!(
                Shape,
                "max_pool2d: input must be (N, C, H, W), got shape {x:?}"
            );
        }
        let s = Pool2dShape {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            kernel,
            stride,
            padding,
        };
        s.validate()?;
        Ok(s)
    }

    /// The input index range [lo, hi) covered by output position `o` along a side of `len`.
    fn window(&self, o: usize, len: usize) -> (usize, usize) {
        let start = o * self.stride;
        let lo = start.saturating_sub(self.padding);
        let hi = (start + self.kernel).saturating_sub(self.padding).min(len);
        (lo, hi)
    }

    /// The index (within the plane) of the max of window (oy, ox) of one (H, W) plane: the
    /// first maximum in row-major order, NaN winning (PyTorch's rule).
    fn argmax(&self, plane: &[f32], oy: usize, ox: usize) -> usize {
        let (y0, y1) = self.window(oy, self.h);
        let (x0, x1) = self.window(ox, self.w);
        let mut best = f32::NEG_INFINITY;
        let mut best_i = y0 * self.w + x0;
        for iy in y0..y1 {
            for ix in x0..x1 {
                let i = iy * self.w + ix;
                let v = plane[i];
                if v > best || v.is_nan() {
                    best = v;
                    best_i = i;
                }
            }
        }
        best_i
    }
}

// ---------- CPU kernels ----------

/// Planes per rayon task: enough work to amortize scheduling.
fn planes_per_task(plane_len: usize) -> usize {
    (1 << 14) / plane_len.max(1) + 1
}

/// y (N, C, HO, WO) = max over each window of x (N, C, H, W). Overwrites y.
///
/// # Panics
/// If a buffer length does not match `s`, or `s` is invalid (see [`Pool2dShape::validate`]).
pub fn max_pool2d_forward_cpu(x: &[f32], s: &Pool2dShape, y: &mut [f32]) {
    s.validate().expect("max_pool2d_forward_cpu: invalid shape");
    assert_eq!(x.len(), s.x_len(), "max_pool2d_forward_cpu: x length");
    assert_eq!(y.len(), s.y_len(), "max_pool2d_forward_cpu: y length");
    let (ho, wo) = (s.ho(), s.wo());
    let (xp, yp) = (s.h * s.w, ho * wo);
    let per = planes_per_task(xp);
    y.par_chunks_mut(yp * per)
        .zip(x.par_chunks(xp * per))
        .for_each(|(y, x)| {
            for (y, x) in y.chunks_mut(yp).zip(x.chunks(xp)) {
                // y (HO, WO), x (H, W)
                for oy in 0..ho {
                    for ox in 0..wo {
                        y[oy * wo + ox] = x[s.argmax(x, oy, ox)];
                    }
                }
            }
        });
}

/// dx (N, C, H, W): each dy (N, C, HO, WO) entry added at its window's argmax in x (first max on
/// ties, as PyTorch). Overwrites dx.
///
/// # Panics
/// If a buffer length does not match `s`, or `s` is invalid.
pub fn max_pool2d_backward_cpu(x: &[f32], dy: &[f32], s: &Pool2dShape, dx: &mut [f32]) {
    s.validate()
        .expect("max_pool2d_backward_cpu: invalid shape");
    assert_eq!(x.len(), s.x_len(), "max_pool2d_backward_cpu: x length");
    assert_eq!(dy.len(), s.y_len(), "max_pool2d_backward_cpu: dy length");
    assert_eq!(dx.len(), s.x_len(), "max_pool2d_backward_cpu: dx length");
    let (ho, wo) = (s.ho(), s.wo());
    let (xp, yp) = (s.h * s.w, ho * wo);
    let per = planes_per_task(xp);
    dx.par_chunks_mut(xp * per)
        .zip(x.par_chunks(xp * per).zip(dy.par_chunks(yp * per)))
        .for_each(|(dx, (x, dy))| {
            for (dx, (x, dy)) in dx.chunks_mut(xp).zip(x.chunks(xp).zip(dy.chunks(yp))) {
                // dx (H, W), x (H, W), dy (HO, WO); windows overlap, so accumulate.
                dx.fill(0.0);
                for oy in 0..ho {
                    for ox in 0..wo {
                        dx[s.argmax(x, oy, ox)] += dy[oy * wo + ox];
                    }
                }
            }
        });
}

/// Global average pool: y (rows) = mean of each of the `rows` planes of `hw` values in
/// x (rows, hw), i.e. (N, C, H, W) -> (N, C) with rows = N*C and hw = H*W. Sums in f64.
/// Overwrites y.
///
/// # Panics
/// If a buffer length does not match, or `hw` is 0.
pub fn avg_pool_forward_cpu(x: &[f32], rows: usize, hw: usize, y: &mut [f32]) {
    assert!(hw > 0, "avg_pool_forward_cpu: empty planes");
    assert_eq!(x.len(), rows * hw, "avg_pool_forward_cpu: x length");
    assert_eq!(y.len(), rows, "avg_pool_forward_cpu: y length");
    let per = planes_per_task(hw);
    y.par_chunks_mut(per)
        .zip(x.par_chunks(hw * per))
        .for_each(|(y, x)| {
            for (y, x) in y.iter_mut().zip(x.chunks(hw)) {
                *y = (x.iter().map(|&v| v as f64).sum::<f64>() / hw as f64) as f32;
            }
        });
}

/// The global average pool's backward: dx (rows, hw) = dy (rows) / hw, broadcast over each
/// plane. Overwrites dx.
///
/// # Panics
/// If a buffer length does not match, or `hw` is 0.
pub fn avg_pool_backward_cpu(dy: &[f32], rows: usize, hw: usize, dx: &mut [f32]) {
    assert!(hw > 0, "avg_pool_backward_cpu: empty planes");
    assert_eq!(dy.len(), rows, "avg_pool_backward_cpu: dy length");
    assert_eq!(dx.len(), rows * hw, "avg_pool_backward_cpu: dx length");
    let per = planes_per_task(hw);
    let scale = 1.0 / hw as f32;
    dx.par_chunks_mut(hw * per)
        .zip(dy.par_chunks(per))
        .for_each(|(dx, dy)| {
            for (dx, &g) in dx.chunks_mut(hw).zip(dy) {
                dx.fill(g * scale);
            }
        });
}

// ---------- backend dispatch ----------

/// What max pool's backward needs besides the output gradient: on the CPU the input (its
/// kernel finds each window's argmax again), on a GPU the argmax the forward wrote.
pub(crate) enum MaxPoolSaved {
    Input(Tensor),
    #[cfg(feature = "cuda")]
    Argmax {
        be: gpu::Be,
        /// i32 (N, C, HO, WO): each output's index in its input plane.
        argmax: crate::device::cuda::DeviceBuffer,
        format: (DType, Layout),
        x_shape: Vec<usize>,
    },
}

/// The launcher's copy of a max pool's sizes.
#[cfg(feature = "cuda")]
fn gpu_pool_shape(s: Pool2dShape) -> crate::device::cuda::Pool2dShape {
    crate::device::cuda::Pool2dShape {
        n: s.n,
        c: s.c,
        h: s.h,
        w: s.w,
        k: s.kernel,
        stride: s.stride,
        padding: s.padding,
    }
}

/// Max pool of x (N, C, H, W) on x's device -> (N, C, HO, WO), in x's format.
pub(crate) fn max_pool2d_forward(x: &Tensor, s: Pool2dShape) -> Result<(Tensor, MaxPoolSaved)> {
    let y_shape = [s.n, s.c, s.ho(), s.wo()];
    match Backend::of("max_pool2d", &[x])? {
        Backend::Cpu => {
            let mut y = vec![0.0f32; s.y_len()]; // (N, C, HO, WO)
            max_pool2d_forward_cpu(x.cpu()?, &s, &mut y);
            Ok((
                Tensor::from_vec(y, &y_shape)?,
                MaxPoolSaved::Input(x.clone()),
            ))
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let _r = crate::device::nvtx::Range::new("max_pool2d");
            let f = gpu::format_of(x);
            let mut y = gpu::alloc_fmt(&be, f, s.y_len())?; // (N, C, HO, WO)
            let mut argmax = be.alloc_bytes(s.y_len() * 4)?; // i32 (N, C, HO, WO)
            be.max_pool2d_forward(
                &gpu_pool_shape(s),
                gpu::dbuf("max_pool2d", x)?,
                &mut y,
                &mut argmax,
            )?;
            let y = gpu::wrap(&be, y, &y_shape)?;
            let saved = MaxPoolSaved::Argmax {
                be,
                argmax,
                format: f,
                x_shape: x.shape().to_vec(),
            };
            Ok((y, saved))
        }
    }
}

/// dx (N, C, H, W): dy routed to each window's argmax, on the forward's device.
pub(crate) fn max_pool2d_backward(
    saved: &MaxPoolSaved,
    dy: &Tensor,
    s: Pool2dShape,
) -> Result<Tensor> {
    dy.expect_shape("max_pool2d output gradient", &[s.n, s.c, s.ho(), s.wo()])?;
    match saved {
        MaxPoolSaved::Input(x) => {
            let mut dx = vec![0.0f32; s.x_len()]; // (N, C, H, W)
            max_pool2d_backward_cpu(x.cpu()?, dy.cpu()?, &s, &mut dx);
            x.like(dx)
        }
        #[cfg(feature = "cuda")]
        MaxPoolSaved::Argmax {
            be,
            argmax,
            format,
            x_shape,
        } => {
            let _r = crate::device::nvtx::Range::new("max_pool2d backward");
            let dy = gpu::on_gpu_as(be, dy, *format)?;
            let mut dx = gpu::alloc_fmt(be, *format, s.x_len())?; // (N, C, H, W)
            be.max_pool2d_backward(
                &gpu_pool_shape(s),
                gpu::dbuf("max_pool2d backward", &dy)?,
                argmax,
                &mut dx,
            )?;
            gpu::wrap(be, dx, x_shape)
        }
    }
}

/// What [`max_pool2d_backward`] needs of a pool of `x` whose forward output was not kept
/// (src/ops/recompute.rs): on the CPU x itself, on a GPU the argmax of the pool's forward, run
/// again (its output is dropped).
pub(crate) fn max_pool2d_saved(x: &Tensor, s: Pool2dShape) -> Result<MaxPoolSaved> {
    if matches!(Backend::of("max_pool2d", &[x])?, Backend::Cpu) {
        return Ok(MaxPoolSaved::Input(x.clone()));
    }
    Ok(max_pool2d_forward(x, s)?.1)
}

/// Mean over H*W of x (N, C, H, W) viewed as `rows` = N*C planes of `hw`, on x's device ->
/// ((N, C) in x's element type, the backend, x's format).
fn global_avg_pool_forward(
    x: &Tensor,
    rows: usize,
    hw: usize,
) -> Result<(Tensor, Backend, (DType, Layout))> {
    let y_shape = [x.dim(0), x.dim(1)];
    let be = Backend::of("global_avg_pool", &[x])?;
    let f = (x.dtype(), x.layout());
    let y = match &be {
        Backend::Cpu => {
            let mut y = vec![0.0f32; rows]; // (N, C)
            avg_pool_forward_cpu(x.cpu()?, rows, hw, &mut y);
            Tensor::from_vec(y, &y_shape)?
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let _r = crate::device::nvtx::Range::new("global_avg_pool");
            let (n, c) = (y_shape[0], y_shape[1]);
            let xb = gpu::dbuf("global_avg_pool", x)?;
            let mut y = be.alloc_dt(f.0, rows)?; // (N, C)
            match f.1 {
                Layout::Nchw => be.global_avg_pool_forward(xb, rows, hw, &mut y)?,
                Layout::Nhwc => be.global_avg_pool_forward_nhwc(xb, n, c, hw, &mut y)?,
            }
            gpu::wrap(be, y, &y_shape)?
        }
    };
    Ok((y, be, f))
}

/// dx (N, C, H, W) = dy / (H W) broadcast over each plane, on `be` in format `f` (the input's).
fn global_avg_pool_backward(
    be: &Backend,
    f: (DType, Layout),
    dy: &Tensor,
    x_shape: &[usize],
    rows: usize,
    hw: usize,
) -> Result<Tensor> {
    dy.expect_shape("global_avg_pool output gradient", &x_shape[..2])?;
    match be {
        Backend::Cpu => {
            let _ = f; // always f32 NCHW on the CPU
            let mut dx = vec![0.0f32; rows * hw]; // (N, C, H, W)
            avg_pool_backward_cpu(dy.cpu()?, rows, hw, &mut dx);
            Tensor::from_vec(dx, x_shape)
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let _r = crate::device::nvtx::Range::new("global_avg_pool backward");
            let (n, c) = (x_shape[0], x_shape[1]);
            let dy = gpu::on_gpu_as(be, dy, (f.0, Layout::Nchw))?; // (N, C): no spatial layout
            let mut dx = gpu::alloc_fmt(be, f, rows * hw)?; // (N, C, H, W)
            let dyb = gpu::dbuf("global_avg_pool backward", &dy)?;
            match f.1 {
                Layout::Nchw => be.global_avg_pool_backward(dyb, rows, hw, &mut dx)?,
                Layout::Nhwc => be.global_avg_pool_backward_nhwc(dyb, n, c, hw, &mut dx)?,
            }
            gpu::wrap(be, dx, x_shape)
        }
    }
}

// ---------- tape ops ----------

impl Tape {
    /// Max pool (kernel, stride, padding) over (N, C, H, W); padding acts as -inf. Backward
    /// routes the gradient to the argmax (first max on ties, as PyTorch).
    pub fn max_pool2d(
        &mut self,
        x: &Tensor,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor> {
        // Bf16 mode (Tape::bf16_inputs): bf16 operands, the f32 body, a bf16 output.
        if self.is_bf16() {
            let r = self.bf16_inputs("max_pool2d", &[x], Bf16Path::Native)?;
            let y = self.as_f32(|t| t.max_pool2d(&r[0], kernel, stride, padding))?;
            return self.bf16_output(&y);
        }
        let s = Pool2dShape::from_shape(x.shape(), kernel, stride, padding)?;
        let (y, saved) = max_pool2d_forward(x, s)?;
        self.record("max_pool2d", &y, &[x], move |dy| {
            Ok(vec![Some(max_pool2d_backward(&saved, dy, s)?)])
        });
        Ok(y)
    }

    /// (N, C, H, W) -> (N, C): mean over H*W.
    pub fn global_avg_pool(&mut self, x: &Tensor) -> Result<Tensor> {
        // Bf16 mode (Tape::bf16_inputs): bf16 operands, the f32 body, a bf16 output.
        if self.is_bf16() {
            let r = self.bf16_inputs("global_avg_pool", &[x], Bf16Path::Native)?;
            let y = self.as_f32(|t| t.global_avg_pool(&r[0]))?;
            return self.bf16_output(&y);
        }
        if x.rank() != 4 {
            bail!(
                Shape,
                "global_avg_pool: input must be (N, C, H, W), got shape {:?}",
                x.shape()
            );
        }
        let x_shape = x.shape().to_vec();
        let (rows, hw) = (x_shape[0] * x_shape[1], x_shape[2] * x_shape[3]);
        if hw == 0 {
            bail!(
                Shape,
                "global_avg_pool: empty spatial size in shape {x_shape:?}"
            );
        }
        let (y, be, f) = global_avg_pool_forward(x, rows, hw)?;
        // The backward needs only the input's device, format and shape, not its values.
        self.record("global_avg_pool", &y, &[x], move |dy| {
            let dx = global_avg_pool_backward(&be, f, dy, &x_shape, rows, hw)?;
            Ok(vec![Some(dx)])
        });
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;
    use crate::testutil::{check_grad, check_tape_op, randn, randn_vec, rng, TapeRun, Tol};
    use rand::seq::SliceRandom;

    fn pshape(
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        k: usize,
        st: usize,
        p: usize,
    ) -> Pool2dShape {
        let s = Pool2dShape {
            n,
            c,
            h,
            w,
            kernel: k,
            stride: st,
            padding: p,
        };
        s.validate().unwrap();
        s
    }

    /// Naive max pool: (y, argmax index into x) per output, scanning every window position and
    /// skipping the padding; strict `>` keeps the first maximum.
    fn naive_max_pool(x: &[f32], s: &Pool2dShape) -> (Vec<f32>, Vec<usize>) {
        let (ho, wo) = (s.ho(), s.wo());
        let mut y = Vec::new();
        let mut arg = Vec::new();
        for n in 0..s.n {
            for c in 0..s.c {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut best = f32::NEG_INFINITY;
                        let mut bi = usize::MAX;
                        for ky in 0..s.kernel {
                            for kx in 0..s.kernel {
                                let iy = (oy * s.stride + ky) as isize - s.padding as isize;
                                let ix = (ox * s.stride + kx) as isize - s.padding as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                let i = ((n * s.c + c) * s.h + iy as usize) * s.w + ix as usize;
                                if bi == usize::MAX || x[i] > best {
                                    best = x[i];
                                    bi = i;
                                }
                            }
                        }
                        y.push(best);
                        arg.push(bi);
                    }
                }
            }
        }
        (y, arg)
    }

    /// Distinct values (a shuffled ramp, spacing 0.05 >> the finite-difference step), so that
    /// every window's argmax is stable under the checker's perturbations.
    fn distinct(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.05 - n as f32 * 0.025).collect();
        v.shuffle(&mut rng(seed));
        Tensor::from_vec(v, shape).unwrap()
    }

    fn pool_cases() -> Vec<Pool2dShape> {
        vec![
            pshape(2, 3, 9, 8, 3, 2, 1),     // ResNet's stem pool, odd H
            pshape(1, 2, 7, 7, 3, 2, 1),     // batch 1, odd both
            pshape(3, 2, 6, 5, 2, 2, 0),     // 2x2/2 no padding, odd W (last column dropped)
            pshape(2, 2, 5, 6, 3, 1, 1),     // stride 1: heavily overlapping windows
            pshape(2, 1, 1, 1, 3, 2, 1),     // 1x1 input
            pshape(2, 3, 112, 112, 3, 2, 1), // the real stem size
        ]
    }

    #[test]
    fn max_pool_forward_matches_naive() {
        for (t, s) in pool_cases().iter().enumerate() {
            let x = randn_vec(s.x_len(), 50 + t as u64);
            let mut y = vec![f32::NAN; s.y_len()];
            max_pool2d_forward_cpu(&x, s, &mut y);
            let (want, _) = naive_max_pool(&x, s);
            assert_eq!(y, want, "{s:?}");
        }
        let x = randn(&[2, 3, 9, 8], 1);
        let y = Tape::no_grad().max_pool2d(&x, 3, 2, 1).unwrap();
        assert_eq!(y.shape(), &[2, 3, 5, 4]);
    }

    /// max_pool2d through the tape on `dev` against the naive pool: the forward exactly, dx as
    /// dy scattered to each window's first maximum (1e-6; overlapping windows add up), on the
    /// shapes of `pool_cases` and on ties: equal values in a window route the gradient to the
    /// first in row-major order, as PyTorch, padding never wins. Also at the stem pool's real
    /// width (64 channels) and odd planes; on a GPU, forward and dx also equal the CPU op's
    /// exactly (gpu_tape's former check).
    fn max_pool_matches_naive_on(dev: &Device) {
        let run_on = |dev: &Device, x: &[f32], dy: &[f32], s: &Pool2dShape| {
            let mut tape = Tape::new();
            let x = Tensor::from_vec(x.to_vec(), &[s.n, s.c, s.h, s.w]).unwrap();
            let xt = tape.track(&x.to_device(dev).unwrap());
            let y = tape.max_pool2d(&xt, s.kernel, s.stride, s.padding).unwrap();
            assert_eq!(y.device(), *dev);
            let dyt = Tensor::from_vec(dy.to_vec(), y.shape()).unwrap();
            let g = tape.backward_from(vec![(y.clone(), dyt)]).unwrap();
            (y.to_vec().unwrap(), g.get(&xt).unwrap().to_vec().unwrap())
        };
        let mut cases: Vec<(Pool2dShape, Vec<f32>)> = pool_cases()
            .into_iter()
            .enumerate()
            .map(|(t, s)| (s, randn_vec(s.x_len(), 60 + t as u64)))
            .collect();
        // Ties: a 2x4 plane of equal values but a -1 in 2x2/2 windows; a constant plane in
        // padded, overlapping 3x3/1 windows.
        let tie = [5.0, 5.0, -1.0, 5.0, 5.0, 5.0, 5.0, 5.0];
        cases.push((pshape(1, 1, 2, 4, 2, 2, 0), tie.to_vec()));
        cases.push((pshape(1, 1, 2, 2, 3, 1, 1), vec![1.0; 4]));
        // The stem pool at its real width, and odd planes of the 3x3/2 and 2x2/2 pools.
        for (t, s) in [
            pshape(2, 64, 112, 112, 3, 2, 1),
            pshape(3, 5, 9, 8, 3, 2, 1),
            pshape(2, 3, 6, 7, 2, 2, 0),
        ]
        .into_iter()
        .enumerate()
        {
            cases.push((s, randn_vec(s.x_len(), 300 + t as u64)));
        }
        for (t, (s, x)) in cases.iter().enumerate() {
            let dy = randn_vec(s.y_len(), 70 + t as u64);
            let (want_y, arg) = naive_max_pool(x, s);
            let mut want = vec![0.0f32; s.x_len()];
            for (&i, &g) in arg.iter().zip(&dy) {
                want[i] += g;
            }
            let (y, dx) = run_on(dev, x, &dy, s);
            assert_eq!(y, want_y, "{s:?} on {dev}");
            if *dev != Device::Cpu {
                assert_eq!(
                    (&y, &dx),
                    (&want_y, &run_on(&Device::Cpu, x, &dy, s).1),
                    "{s:?}: {dev} against the CPU op"
                );
            }
            for (i, (&a, &b)) in dx.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "{s:?} on {dev}: dx[{i}] = {a}, want {b}"
                );
            }
        }
    }
    crate::test_device!(
        max_pool_matches_naive_on,
        max_pool_matches_naive_cpu,
        max_pool_matches_naive_cuda
    );

    /// The CPU kernel on its own: every output written (NaN-filled first), the first maximum
    /// on ties.
    #[test]
    fn max_pool_cpu_kernel_writes_every_gradient_and_takes_the_first_max() {
        let s = pshape(1, 1, 2, 4, 2, 2, 0);
        let x = [5.0, 5.0, -1.0, 5.0, 5.0, 5.0, 5.0, 5.0];
        let mut dx = [f32::NAN; 8];
        max_pool2d_backward_cpu(&x, &[1.0, 2.0], &s, &mut dx);
        assert_eq!(dx, [1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn max_pool_gradient_matches_finite_differences() {
        // Relative error bound 1e-3: with distinct inputs the pool is locally linear (a
        // selection), so central differences are exact up to f32 rounding.
        for (t, shape) in [[2, 3, 7, 6], [1, 2, 5, 5], [2, 1, 6, 9]]
            .iter()
            .enumerate()
        {
            let x = distinct(shape, 80 + t as u64);
            check_grad(&[x], 1e-3, |tape, xs| tape.max_pool2d(&xs[0], 3, 2, 1)).unwrap();
        }
        let x = distinct(&[2, 2, 6, 5], 90);
        check_grad(&[x], 1e-3, |tape, xs| tape.max_pool2d(&xs[0], 2, 2, 0)).unwrap();
    }

    #[test]
    fn global_avg_pool_forward_and_gradient() {
        let x = randn(&[3, 5, 7, 6], 3);
        let y = Tape::no_grad().global_avg_pool(&x).unwrap();
        assert_eq!(y.shape(), &[3, 5]);
        let xv = x.to_vec().unwrap();
        for (r, &got) in y.cpu().unwrap().iter().enumerate() {
            let want = xv[r * 42..(r + 1) * 42]
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>()
                / 42.0;
            assert!((got as f64 - want).abs() < 1e-6, "row {r}: {got} vs {want}");
        }
        // Hand-derived: d mean / dx = 1 / (H*W) for every pixel of the plane.
        let dy = randn(&[3, 5], 4);
        let mut tape = Tape::new();
        let xt = tape.track(&x);
        let y = tape.global_avg_pool(&xt).unwrap();
        let g = tape.backward_from(vec![(y, dy.clone())]).unwrap();
        let dx = g.get(&xt).unwrap();
        assert_eq!(dx.shape(), x.shape());
        let dyv = dy.to_vec().unwrap();
        for (i, &v) in dx.cpu().unwrap().iter().enumerate() {
            assert!((v - dyv[i / 42] / 42.0).abs() < 1e-7);
        }
        // And against finite differences (bound 1e-3: the op is linear).
        let x = randn(&[2, 3, 3, 5], 5);
        check_grad(&[x], 1e-3, |tape, xs| tape.global_avg_pool(&xs[0])).unwrap();
    }

    #[test]
    fn bad_pool_shapes_are_errors() {
        let mut tape = Tape::new();
        let x = randn(&[2, 3, 5, 5], 1);
        assert!(tape.max_pool2d(&x, 3, 2, 2).is_err()); // padding > kernel / 2
        assert!(tape.max_pool2d(&x, 7, 1, 0).is_err()); // kernel > input
        assert!(tape.max_pool2d(&x, 3, 0, 1).is_err()); // stride 0
        assert!(tape.max_pool2d(&randn(&[3, 5, 5], 1), 3, 2, 1).is_err());
        assert!(tape.global_avg_pool(&randn(&[3, 5], 1)).is_err());
    }
    /// global_avg_pool through the tape on `dev` against the f64 plane means and the
    /// hand-derived gradient dy / (H W) for every pixel (f32 sums of up to 49 values: 1e-6;
    /// the gradient one f32 division: 1e-7). On a GPU also against the CPU op within 1e-5
    /// forward, 1e-6 backward (gpu_tape's former bounds). Shapes: ResNet50's last feature map
    /// and an odd small one.
    fn global_avg_pool_matches_f64_on(dev: &Device) {
        for (i, shape) in [[2usize, 2048, 7, 7], [3, 5, 4, 3]].into_iter().enumerate() {
            let hw = shape[2] * shape[3];
            let x = randn(&shape, 310 + i as u64);
            let dy = randn(&shape[..2], 320 + i as u64);
            let (xv, dyv) = (x.to_vec().unwrap(), dy.to_vec().unwrap());
            let mean = |p: &[f32]| p.iter().map(|&v| v as f64).sum::<f64>() / hw as f64;
            let want = TapeRun {
                outputs: vec![xv.chunks(hw).map(mean).collect()],
                grads: vec![Some(
                    (0..xv.len())
                        .map(|k| dyv[k / hw] as f64 / hw as f64)
                        .collect(),
                )],
            };
            let pool = |t: &mut Tape, v: &[Tensor]| Ok(vec![t.global_avg_pool(&v[0])?]);
            check_tape_op(
                dev,
                &format!("global_avg_pool {shape:?}"),
                &[x],
                &dy,
                &pool,
                &want,
                Tol::new(1e-6, 1e-7),
                Tol::new(1e-5, 1e-6),
            );
        }
    }
    crate::test_device!(
        global_avg_pool_matches_f64_on,
        global_avg_pool_matches_f64_cpu,
        global_avg_pool_matches_f64_cuda
    );
}
