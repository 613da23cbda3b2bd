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
    use crate::tensor::{DType, Device, Layout};
    use crate::testutil::{check_grad, check_tape_op, f64s, randn, TapeRun, Tol};

    /// The rows of `a` then those of `b`, each `width` wide, copied one element at a time.
    fn naive_stack(a: &[f32], b: &[f32], width: usize) -> Vec<f32> {
        let (ra, rb) = (a.len() / width, b.len() / width);
        let mut out = Vec::with_capacity(a.len() + b.len());
        for r in 0..ra + rb {
            for e in 0..width {
                out.push(if r < ra {
                    a[r * width + e]
                } else {
                    b[(r - ra) * width + e]
                });
            }
        }
        out
    }

    /// `both` split at row `r` on its device and in its format: the two halves' shapes,
    /// device, format and values (exact: copies) against `want` (all rows, `width` wide).
    fn check_split(both: &Tensor, r: usize, want: &[f32], width: usize, what: &str) {
        let (h, t) = split_rows(both, r).unwrap();
        let mut hs = both.shape().to_vec();
        hs[0] = r;
        let mut ts = both.shape().to_vec();
        ts[0] -= r;
        assert_eq!(
            (h.shape(), t.shape()),
            (&hs[..], &ts[..]),
            "{what}: split at {r}"
        );
        for half in [&h, &t] {
            assert_eq!(
                half.device(),
                both.device(),
                "{what}: a half left the device"
            );
            assert_eq!(
                (half.dtype(), half.layout()),
                (both.dtype(), both.layout()),
                "{what}: a half changed format"
            );
        }
        assert_eq!(
            h.to_vec().unwrap(),
            &want[..r * width],
            "{what}: head at {r}"
        );
        assert_eq!(
            t.to_vec().unwrap(),
            &want[r * width..],
            "{what}: tail at {r}"
        );
    }

    /// stack_rows and split_rows on `dev` against row-by-row copies, exactly (they copy): 2-d,
    /// 3-d and 4-d rows, one-row halves, splits at the first, the joint and the last row. On a
    /// GPU also bf16 NHWC activations (a bf16 step's: the format is kept) and a bf16 tensor
    /// stacked with an f32 one (f32 NCHW, the bf16 values widened exactly).
    fn stack_and_split_match_row_copies_on(dev: &Device) {
        for (c, (ra, rb, rest)) in [
            (3usize, 5usize, vec![2usize, 4]),
            (1, 4, vec![7]),
            (2, 1, vec![3, 5, 6]),
        ]
        .into_iter()
        .enumerate()
        {
            let width: usize = rest.iter().product();
            let sa: Vec<usize> = [vec![ra], rest.clone()].concat();
            let sb: Vec<usize> = [vec![rb], rest.clone()].concat();
            let seed = 10 * c as u64;
            let a = randn(&sa, seed + 1).to_device(dev).unwrap();
            let b = randn(&sb, seed + 2).to_device(dev).unwrap();
            let want = naive_stack(&a.to_vec().unwrap(), &b.to_vec().unwrap(), width);
            let both = stack_rows(&a, &b).unwrap();
            let what = format!("{sa:?} + {sb:?} on {dev}");
            assert_eq!(
                both.shape(),
                [vec![ra + rb], rest.clone()].concat(),
                "{what}"
            );
            assert_eq!(both.device(), *dev, "{what}: the stack left the device");
            assert_eq!(both.to_vec().unwrap(), want, "{what}");
            for r in [1, ra, ra + rb - 1] {
                check_split(&both, r, &want, width, &what);
            }
        }
        if *dev == Device::Cpu {
            return; // CPU tensors are f32 NCHW only
        }
        let fmt = |t: Tensor, dt, layout| t.to_device(dev).unwrap().to_format(dt, layout).unwrap();
        let a = fmt(randn(&[2, 3, 4, 5], 41), DType::Bf16, Layout::Nhwc);
        let b = fmt(randn(&[3, 3, 4, 5], 42), DType::Bf16, Layout::Nhwc);
        let width = 3 * 4 * 5;
        let want = naive_stack(&a.to_vec().unwrap(), &b.to_vec().unwrap(), width);
        let both = stack_rows(&a, &b).unwrap();
        assert_eq!((both.dtype(), both.layout()), (DType::Bf16, Layout::Nhwc));
        assert_eq!(both.to_vec().unwrap(), want, "bf16 NHWC on {dev}");
        for r in [1, 2, 4] {
            check_split(&both, r, &want, width, "bf16 NHWC");
        }
        let b32 = fmt(randn(&[1, 3, 4, 5], 43), DType::F32, Layout::Nchw);
        let mixed = stack_rows(&a, &b32).unwrap();
        assert_eq!((mixed.dtype(), mixed.layout()), (DType::F32, Layout::Nchw));
        let want = naive_stack(&a.to_vec().unwrap(), &b32.to_vec().unwrap(), width);
        assert_eq!(mixed.to_vec().unwrap(), want, "bf16 + f32 on {dev}");
    }
    crate::test_device!(
        stack_and_split_match_row_copies_on,
        stack_split_rows_cpu,
        stack_split_rows_cuda
    );

    /// concat_rows through the tape on `dev`: the output is the row copies, the gradients dy's
    /// first Ra rows and the rest, all exact (copies), on every device.
    fn concat_rows_matches_row_copies_on(dev: &Device) {
        for (c, (ra, rb, d)) in [(2usize, 4usize, 3usize), (5, 1, 16)]
            .into_iter()
            .enumerate()
        {
            let seed = 50 + 10 * c as u64;
            let (a, b) = (randn(&[ra, d], seed), randn(&[rb, d], seed + 1));
            let dy = randn(&[ra + rb, d], seed + 2);
            let dyv = f64s(dy.cpu().unwrap());
            let want = TapeRun {
                outputs: vec![f64s(&naive_stack(a.cpu().unwrap(), b.cpu().unwrap(), d))],
                grads: vec![Some(dyv[..ra * d].to_vec()), Some(dyv[ra * d..].to_vec())],
            };
            let op = |t: &mut Tape, x: &[Tensor]| Ok(vec![t.concat_rows(&x[0], &x[1])?]);
            check_tape_op(
                dev,
                &format!("concat_rows ({ra}, {d}) + ({rb}, {d})"),
                &[a, b],
                &dy,
                &op,
                &want,
                Tol::EXACT,
                Tol::EXACT,
            );
        }
    }
    crate::test_device!(
        concat_rows_matches_row_copies_on,
        concat_rows_cpu,
        concat_rows_cuda
    );

    #[test]
    fn concat_rows_gradient_matches_finite_differences() {
        let xs = [randn(&[2, 3], 3), randn(&[4, 3], 4)];
        check_grad(&xs, 1e-3, |t, x| t.concat_rows(&x[0], &x[1])).unwrap();
    }

    fn shape_errors_name_the_op_on(dev: &Device) {
        let on = |shape: &[usize], seed| randn(shape, seed).to_device(dev).unwrap();
        let e = stack_rows(&on(&[2, 3], 1), &on(&[2, 4], 2)).unwrap_err();
        assert!(e.to_string().contains("stack_rows"), "{e}");
        let e = stack_rows(&on(&[2, 3], 1), &on(&[2, 3, 1], 2)).unwrap_err();
        assert!(e.to_string().contains("stack_rows"), "{e}");
        let e = split_rows(&on(&[2, 3], 1), 3).unwrap_err();
        assert!(e.to_string().contains("split_rows"), "{e}");
    }
    crate::test_device!(
        shape_errors_name_the_op_on,
        shape_errors_cpu,
        shape_errors_cuda
    );
}
