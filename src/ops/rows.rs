//! Rows of a batch: two tensors stacked along the first dimension (the global views into one
//! batch; the global and the local views' features before the head) and split back.
//!
//! `Tape::concat_rows` is the differentiable form; its gradient splits by rows. On a GPU both
//! are device copies (the rows are the outermost dimension in NCHW and NHWC alike, so the bytes
//! just follow), nothing passes through the host.

use crate::autograd::Tape;
use crate::bail;
use crate::error::Result;
#[cfg(feature = "cuda")]
use crate::ops::gpu;
use crate::ops::Backend;
use crate::tensor::Tensor;

/// `a` (Ra, ...) then `b` (Rb, ...) as one (Ra + Rb, ...) tensor on their device, untracked.
/// On a GPU in their common format (bf16 features of a bf16 step), f32 NCHW when they differ
/// (exact).
pub fn stack_rows(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let op = "stack_rows";
    if a.rank() == 0 || a.rank() != b.rank() || a.shape()[1..] != b.shape()[1..] {
        bail!(
            Shape,
            "{op}: {:?} and {:?} differ beyond the first dimension",
            a.shape(),
            b.shape()
        );
    }
    let mut shape = a.shape().to_vec(); // (Ra + Rb, ...)
    shape[0] += b.dim(0);
    match Backend::of(op, &[a, b])? {
        Backend::Cpu => {
            let mut both = a.to_vec()?;
            both.extend_from_slice(&b.to_vec()?);
            Tensor::from_vec(both, &shape)
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let f = if a.dtype() == b.dtype() {
                gpu::format_of(a)
            } else {
                (crate::tensor::DType::F32, crate::tensor::Layout::Nchw)
            };
            let (a, b) = (a.to_format(f.0, f.1)?, b.to_format(f.0, f.1)?);
            let (bytes_a, bytes_b) = (a.numel() * f.0.size(), b.numel() * f.0.size());
            let mut both = gpu::alloc_fmt(&be, f, a.numel() + b.numel())?;
            be.copy_dtod_range(gpu::dbuf(op, &a)?, 0, &mut both, 0, bytes_a)?;
            be.copy_dtod_range(gpu::dbuf(op, &b)?, 0, &mut both, bytes_a, bytes_b)?;
            gpu::wrap(&be, both, &shape)
        }
    }
}

/// `t` (R, ...) split into its first `r` rows (r, ...) and the rest (R - r, ...), on its
/// device and in its format, untracked.
pub fn split_rows(t: &Tensor, r: usize) -> Result<(Tensor, Tensor)> {
    let op = "split_rows";
    if t.rank() == 0 || r > t.dim(0) {
        bail!(
            Shape,
            "{op}: {r} rows out of a tensor of shape {:?}",
            t.shape()
        );
    }
    let rows = t.dim(0);
    let width = t.numel() / rows.max(1);
    let mut head_shape = t.shape().to_vec(); // (r, ...)
    head_shape[0] = r;
    let mut tail_shape = t.shape().to_vec(); // (R - r, ...)
    tail_shape[0] = rows - r;
    match Backend::of(op, &[t])? {
        Backend::Cpu => {
            let mut v = t.to_vec()?;
            let tail = v.split_off(r * width);
            Ok((
                Tensor::from_vec(v, &head_shape)?,
                Tensor::from_vec(tail, &tail_shape)?,
            ))
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let f = gpu::format_of(t);
            let (na, nb) = (r * width, (rows - r) * width);
            let es = f.0.size();
            let mut a = gpu::alloc_fmt(&be, f, na)?;
            let mut b = gpu::alloc_fmt(&be, f, nb)?;
            let buf = gpu::dbuf(op, t)?;
            be.copy_dtod_range(buf, 0, &mut a, 0, na * es)?;
            be.copy_dtod_range(buf, na * es, &mut b, 0, nb * es)?;
            Ok((
                gpu::wrap(&be, a, &head_shape)?,
                gpu::wrap(&be, b, &tail_shape)?,
            ))
        }
    }
}

impl Tape {
    /// `a` (Ra, D) and `b` (Rb, D) -> (Ra + Rb, D); the gradient splits back by rows. Joins the
    /// global and local views' features before the head (the head's BN then takes its
    /// statistics over every crop, as DINO's multi-crop wrapper does).
    pub fn concat_rows(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let out = stack_rows(a, b)?;
        let ra = a.dim(0);
        self.record("concat_rows", &out, &[a, b], move |dout| {
            let (da, db) = split_rows(dout, ra)?;
            Ok(vec![Some(da), Some(db)])
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{check_grad, randn};

    #[test]
    fn stack_then_split_gives_the_rows_back() {
        let (a, b) = (randn(&[3, 2, 4], 1), randn(&[5, 2, 4], 2));
        let both = stack_rows(&a, &b).unwrap();
        assert_eq!(both.shape(), [8, 2, 4]);
        let v = both.to_vec().unwrap();
        assert_eq!(&v[..24], &a.to_vec().unwrap()[..]);
        assert_eq!(&v[24..], &b.to_vec().unwrap()[..]);
        let (h, t) = split_rows(&both, 3).unwrap();
        assert_eq!((h.shape(), t.shape()), (&[3, 2, 4][..], &[5, 2, 4][..]));
        assert_eq!(h.to_vec().unwrap(), a.to_vec().unwrap());
        assert_eq!(t.to_vec().unwrap(), b.to_vec().unwrap());
    }

    #[test]
    fn concat_rows_gradient_matches_finite_differences() {
        let xs = [randn(&[2, 3], 3), randn(&[4, 3], 4)];
        check_grad(&xs, 1e-3, |t, x| t.concat_rows(&x[0], &x[1])).unwrap();
    }

    #[test]
    fn shape_errors_name_the_op() {
        let e = stack_rows(&randn(&[2, 3], 1), &randn(&[2, 4], 2)).unwrap_err();
        assert!(e.to_string().contains("stack_rows"), "{e}");
        let e = split_rows(&randn(&[2, 3], 1), 3).unwrap_err();
        assert!(e.to_string().contains("split_rows"), "{e}");
    }
}
