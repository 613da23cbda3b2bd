//! Matrix products and reductions: matmul, linear (x W^T + b), the weight-normalized linear of
//! the CARP prototypes (rows used as v / ||v||, gain fixed at 1), sum and mean of all elements.
//!
//! Every product goes through the `gemm` crate; transposed operands are passed as strides, never
//! materialized (the prototype matrix is 65536 x 256, the head's linears 2048 x 2048).

use gemm::Parallelism;
use rayon::prelude::*;

use crate::autograd::{Bf16Path, Tape};
use crate::bail;
use crate::error::Result;
use crate::ops::elementwise::PAR_CHUNK;
#[cfg(feature = "cuda")]
use crate::ops::gpu;
use crate::ops::Backend;
use crate::tensor::Tensor;

/// Below this many multiply-adds a product runs on one thread: spawning costs more than it saves.
const GEMM_PAR_THRESHOLD: usize = 1 << 18;

fn check_len(op: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        bail!(Shape, "{op}: {what} has {got} elements, expected {want}");
    }
    Ok(())
}

// ---------- CPU reference kernels ----------

/// out (M, N) = op(a) (M, K) x op(b) (K, N), all row-major. With `trans_a`, `a` is stored as
/// (K, M) and used transposed; with `trans_b`, `b` is stored as (N, K) and used transposed (the
/// transposes are gemm strides, nothing is copied). With `accumulate`, the product is added to
/// `out`; otherwise `out` is overwritten.
#[allow(clippy::too_many_arguments)] // the BLAS-like signature the CUDA tests mirror
pub fn matmul_cpu(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    out: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    check_len("matmul_cpu", "a", a.len(), m * k)?;
    check_len("matmul_cpu", "b", b.len(), k * n)?;
    check_len("matmul_cpu", "out", out.len(), m * n)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // An empty sum: the product is zero.
        if !accumulate {
            out.fill(0.0);
        }
        return Ok(());
    }
    // Strides in elements: (column stride, row stride) of each operand as gemm sees it.
    let (a_cs, a_rs) = if trans_a { (m, 1) } else { (1, k) };
    let (b_cs, b_rs) = if trans_b { (k, 1) } else { (1, n) };
    let par = if m * n * k >= GEMM_PAR_THRESHOLD {
        Parallelism::Rayon(0) // 0: rayon's current thread count
    } else {
        Parallelism::None
    };
    // SAFETY: the length checks above guarantee that every index gemm forms from these
    // dimensions and strides is in bounds: out is (m, n) row-major (row stride n); a is (m, k)
    // with strides (1, k), or stored (k, m) with strides (m, 1) when transposed; b likewise.
    // `out` is a unique borrow and does not alias `a` or `b` (shared borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0, // alpha: weight of the old out (read only when accumulating)
            1.0, // beta: weight of the product
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// y (N, OUT) += b (OUT,) on every row.
pub fn add_bias_rows_cpu(y: &mut [f32], b: &[f32]) -> Result<()> {
    if b.is_empty() || !y.len().is_multiple_of(b.len()) {
        bail!(
            Shape,
            "add_bias_rows_cpu: {} outputs are not rows of the bias length {}",
            y.len(),
            b.len()
        );
    }
    y.par_chunks_mut(b.len()).for_each(|row| {
        for (v, &bi) in row.iter_mut().zip(b) {
            *v += bi;
        }
    });
    Ok(())
}

/// out (COLS,) = sum over rows of x (ROWS, COLS) (the bias gradient).
pub fn sum_rows_cpu(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) -> Result<()> {
    check_len("sum_rows_cpu", "x", x.len(), rows * cols)?;
    check_len("sum_rows_cpu", "out", out.len(), cols)?;
    // Parallel over blocks of columns; each block walks the rows, reading contiguous runs.
    const BLOCK: usize = 256;
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(blk, out)| {
            let c0 = blk * BLOCK;
            let mut acc = vec![0.0f64; out.len()];
            for r in 0..rows {
                let row = &x[r * cols + c0..r * cols + c0 + out.len()];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v as f64;
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = a as f32;
            }
        });
    Ok(())
}

/// norms (ROWS,) = Euclidean norm of each row of v (ROWS, COLS), accumulated in f64.
pub fn row_norms_cpu(v: &[f32], rows: usize, cols: usize, norms: &mut [f32]) -> Result<()> {
    check_len("row_norms_cpu", "v", v.len(), rows * cols)?;
    check_len("row_norms_cpu", "norms", norms.len(), rows)?;
    if cols == 0 {
        norms.fill(0.0);
        return Ok(());
    }
    norms
        .par_iter_mut()
        .zip(v.par_chunks(cols))
        .with_min_len(64)
        .for_each(|(nr, row)| {
            *nr = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32;
        });
    Ok(())
}

/// w (ROWS, COLS) = v / norms, row by row.
pub fn normalize_rows_cpu(
    v: &[f32],
    norms: &[f32],
    rows: usize,
    cols: usize,
    w: &mut [f32],
) -> Result<()> {
    check_len("normalize_rows_cpu", "v", v.len(), rows * cols)?;
    check_len("normalize_rows_cpu", "norms", norms.len(), rows)?;
    check_len("normalize_rows_cpu", "w", w.len(), rows * cols)?;
    if cols == 0 {
        return Ok(());
    }
    w.par_chunks_mut(cols)
        .zip(v.par_chunks(cols).zip(norms.par_iter()))
        .with_min_len(64)
        .for_each(|(w, (v, &nr))| {
            let inv = 1.0 / nr;
            for (w, &v) in w.iter_mut().zip(v) {
                *w = v * inv;
            }
        });
    Ok(())
}

/// The weight-norm backward, in place: given dW (ROWS, COLS) for the normalized rows
/// w = v / ||v||, turns each row into dv_r = (dW_r - (dW_r . w_r) w_r) / ||v_r||.
pub fn wn_backward_cpu(
    w: &[f32],
    norms: &[f32],
    rows: usize,
    cols: usize,
    dw_to_dv: &mut [f32],
) -> Result<()> {
    check_len("wn_backward_cpu", "w", w.len(), rows * cols)?;
    check_len("wn_backward_cpu", "norms", norms.len(), rows)?;
    check_len("wn_backward_cpu", "dw", dw_to_dv.len(), rows * cols)?;
    if cols == 0 {
        return Ok(());
    }
    dw_to_dv
        .par_chunks_mut(cols)
        .zip(w.par_chunks(cols).zip(norms.par_iter()))
        .with_min_len(64)
        .for_each(|(d, (w, &nr))| {
            let dot = d
                .iter()
                .zip(w)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
            let inv = 1.0 / nr;
            for (d, &w) in d.iter_mut().zip(w) {
                *d = (*d - dot * w) * inv;
            }
        });
    Ok(())
}

/// Sum of all elements, accumulated in f64 per chunk.
pub fn sum_all_cpu(x: &[f32]) -> f64 {
    x.par_chunks(PAR_CHUNK)
        .map(|c| c.iter().map(|&v| v as f64).sum::<f64>())
        .sum()
}

// ---------- tape ops ----------

/// (rows, cols) of a rank-2 tensor, or a shape error naming the op.
fn dims2(op: &str, what: &str, t: &Tensor) -> Result<(usize, usize)> {
    if t.rank() != 2 {
        bail!(
            Shape,
            "{op}: {what} must be a matrix, got shape {:?}",
            t.shape()
        );
    }
    Ok((t.dim(0), t.dim(1)))
}

impl Tape {
    /// (M, K) x (K, N) -> (M, N).
    pub fn matmul(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        // Bf16 mode (Tape::bf16_inputs): bf16 operands, the f32 body, a bf16 output.
        if self.is_bf16() {
            let r = self.bf16_inputs("matmul", &[a, b], Bf16Path::ViaF32)?;
            let y = self.as_f32(|t| t.matmul(&r[0], &r[1]))?;
            return self.bf16_output(&y);
        }
        let (m, k) = dims2("matmul", "a", a)?;
        let (k2, n) = dims2("matmul", "b", b)?;
        if k != k2 {
            bail!(
                Shape,
                "matmul: inner dimensions differ: a {:?} x b {:?}",
                a.shape(),
                b.shape()
            );
        }
        let y = matmul_forward(a, b, (m, k, n))?;
        let (sa, sb) = (a.clone(), b.clone());
        self.record("matmul", &y, &[a, b], move |dy| {
            let (da, db) = matmul_backward(&sa, &sb, dy, (m, k, n))?;
            Ok(vec![Some(da), Some(db)])
        });
        Ok(y)
    }

    /// x (N, IN), w (OUT, IN), b (OUT,) optional: y = x W^T + b.
    pub fn linear(&mut self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        // Bf16 mode (Tape::bf16_inputs): bf16 operands, the f32 body, a bf16 output.
        // The bias stays f32: it is added to the f32 accumulator before the output is rounded.
        if self.is_bf16() {
            let r = self.bf16_inputs("linear", &[x, w], Bf16Path::ViaF32)?;
            let y = self.as_f32(|t| t.linear(&r[0], &r[1], b))?;
            return self.bf16_output(&y);
        }
        let (n, cin) = dims2("linear", "x", x)?;
        let (cout, cin2) = dims2("linear", "w", w)?;
        if cin != cin2 {
            bail!(
                Shape,
                "linear: x {:?} has {cin} features but w {:?} expects {cin2}",
                x.shape(),
                w.shape()
            );
        }
        if let Some(b) = b {
            b.expect_shape("linear bias", &[cout])?;
        }
        let y = linear_forward(x, w, b, (n, cin, cout))?;
        let (sx, sw) = (x.clone(), w.clone());
        let has_bias = b.is_some();
        let backward = move |dy: &Tensor| -> Result<Vec<Option<Tensor>>> {
            let (dx, dw, db) = linear_backward(&sx, &sw, has_bias, dy, (n, cin, cout))?;
            let mut grads = vec![Some(dx), Some(dw)];
            grads.extend(db.map(Some));
            Ok(grads)
        };
        match b {
            Some(b) => self.record("linear", &y, &[x, w, b], backward),
            None => self.record("linear", &y, &[x, w], backward),
        }
        Ok(y)
    }

    /// Weight-normalized linear without bias, gain fixed at 1: each row of v (OUT, IN) is used
    /// as v_r / ||v_r||. y = x * (v / ||v||_rows)^T. Differentiable w.r.t. x and v
    /// (dv_r = (dW_r - (dW_r . w_r) w_r) / ||v_r||, with w_r = v_r/||v_r||).
    pub fn wn_linear(&mut self, x: &Tensor, v: &Tensor) -> Result<Tensor> {
        // Bf16 mode (Tape::bf16_inputs): bf16 operands, the f32 body, a bf16 output.
        // v is rounded before the row normalization (a GPU would normalize the f32 master
        // and round the result): either way the matmul's weight carries one bf16 rounding.
        if self.is_bf16() {
            let r = self.bf16_inputs("wn_linear", &[x, v], Bf16Path::ViaF32)?;
            let y = self.as_f32(|t| t.wn_linear(&r[0], &r[1]))?;
            return self.bf16_output(&y);
        }
        let (n, cin) = dims2("wn_linear", "x", x)?;
        let (cout, cin2) = dims2("wn_linear", "v", v)?;
        if cin != cin2 {
            bail!(
                Shape,
                "wn_linear: x {:?} has {cin} features but v {:?} expects {cin2}",
                x.shape(),
                v.shape()
            );
        }
        let (y, saved) = wn_linear_forward(x, v, (n, cin, cout))?;
        if !self.is_recording() {
            return Ok(y);
        }
        let sx = x.clone();
        self.record("wn_linear", &y, &[x, v], move |dy| {
            let (dx, dv) = wn_linear_backward(&sx, &saved, dy, (n, cin, cout))?;
            Ok(vec![Some(dx), Some(dv)])
        });
        Ok(y)
    }

    /// Sum of all elements -> shape (1,).
    pub fn sum_all(&mut self, x: &Tensor) -> Result<Tensor> {
        let y = sum_all_forward("sum_all", x, false)?;
        let (shape, device) = (x.shape().to_vec(), x.device());
        self.record("sum_all", &y, &[x], move |dy| {
            // The scalar comes to the host (on a GPU, one wait): broadcasting it is a fill.
            Ok(vec![Some(Tensor::full(dy.scalar()?, &shape, &device)?)])
        });
        Ok(y)
    }

    /// Mean of all elements -> shape (1,).
    pub fn mean_all(&mut self, x: &Tensor) -> Result<Tensor> {
        let count = x.numel();
        if count == 0 {
            bail!(Shape, "mean_all of an empty tensor {:?}", x.shape());
        }
        let y = sum_all_forward("mean_all", x, true)?;
        let (shape, device) = (x.shape().to_vec(), x.device());
        self.record("mean_all", &y, &[x], move |dy| {
            let g = dy.scalar()? / count as f32;
            Ok(vec![Some(Tensor::full(g, &shape, &device)?)])
        });
        Ok(y)
    }
}

// ---------- backend dispatch ----------

/// a (M, K) x b (K, N) -> (M, N) on a's device.
fn matmul_forward(a: &Tensor, b: &Tensor, (m, k, n): (usize, usize, usize)) -> Result<Tensor> {
    match Backend::of("matmul", &[a, b])? {
        Backend::Cpu => {
            let mut y = vec![0.0; m * n]; // (M, N)
            matmul_cpu(a.cpu()?, b.cpu()?, m, k, n, false, false, &mut y, false)?;
            Tensor::from_vec(y, &[m, n])
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let _r = crate::device::nvtx::Range::new("matmul");
            let op = "matmul";
            let mut y = be.alloc_f32(m * n)?; // (M, N)
            let (ab, bb) = (gpu::dbuf(op, a)?, gpu::dbuf(op, b)?);
            be.gemm(false, false, m, n, k, 1.0, ab, bb, 0.0, &mut y)?;
            gpu::wrap(&be, y, &[m, n])
        }
    }
}

/// (da (M, K), db (K, N)) of y = a b from dy (M, N), on a's device.
fn matmul_backward(
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    (m, k, n): (usize, usize, usize),
) -> Result<(Tensor, Tensor)> {
    dy.expect_shape("matmul backward dy", &[m, n])?;
    match Backend::of("matmul", &[a, b])? {
        Backend::Cpu => {
            // da (M, K) = dy (M, N) x b^T
            let mut da = vec![0.0; m * k];
            matmul_cpu(dy.cpu()?, b.cpu()?, m, n, k, false, true, &mut da, false)?;
            // db (K, N) = a^T x dy
            let mut db = vec![0.0; k * n];
            matmul_cpu(a.cpu()?, dy.cpu()?, k, m, n, true, false, &mut db, false)?;
            Ok((
                Tensor::from_vec(da, &[m, k])?,
                Tensor::from_vec(db, &[k, n])?,
            ))
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let _r = crate::device::nvtx::Range::new("matmul backward");
            let op = "matmul";
            let dy = gpu::on_gpu(&be, dy)?;
            let dyb = gpu::dbuf(op, &dy)?;
            // da (M, K) = dy (M, N) x b^T
            let mut da = be.alloc_f32(m * k)?;
            be.gemm(
                false,
                true,
                m,
                k,
                n,
                1.0,
                dyb,
                gpu::dbuf(op, b)?,
                0.0,
                &mut da,
            )?;
            // db (K, N) = a^T x dy
            let mut db = be.alloc_f32(k * n)?;
            be.gemm(
                true,
                false,
                k,
                n,
                m,
                1.0,
                gpu::dbuf(op, a)?,
                dyb,
                0.0,
                &mut db,
            )?;
            Ok((gpu::wrap(&be, da, &[m, k])?, gpu::wrap(&be, db, &[k, n])?))
        }
    }
}

/// y (N, OUT) = x (N, IN) W^T (W: (OUT, IN)) + b, on x's device.
fn linear_forward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    (n, cin, cout): (usize, usize, usize),
) -> Result<Tensor> {
    let mut inputs = vec![x, w];
    inputs.extend(b);
    match Backend::of("linear", &inputs)? {
        Backend::Cpu => {
            let mut y = vec![0.0; n * cout]; // (N, OUT)
            matmul_cpu(x.cpu()?, w.cpu()?, n, cin, cout, false, true, &mut y, false)?;
            if let Some(b) = b {
                add_bias_rows_cpu(&mut y, b.cpu()?)?;
            }
            Tensor::from_vec(y, &[n, cout])
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let _r = crate::device::nvtx::Range::new("linear");
            let op = "linear";
            let mut y = be.alloc_f32(n * cout)?; // (N, OUT)
            let (xb, wb) = (gpu::dbuf(op, x)?, gpu::dbuf(op, w)?);
            be.gemm(false, true, n, cout, cin, 1.0, xb, wb, 0.0, &mut y)?;
            if let Some(b) = b {
                be.bias_add(&mut y, gpu::dbuf(op, b)?, n, cout)?;
            }
            gpu::wrap(&be, y, &[n, cout])
        }
    }
}

/// dx (N, IN) = dy (N, OUT) W (OUT, IN) and dW (OUT, IN) = dy^T x: the two products of every
/// linear layer's backward (linear, wn_linear), on the host.
fn linear_grads_cpu(
    dy: &[f32],
    w: &[f32],
    x: &[f32],
    (n, cin, cout): (usize, usize, usize),
) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut dx = vec![0.0; n * cin];
    matmul_cpu(dy, w, n, cout, cin, false, false, &mut dx, false)?;
    let mut dw = vec![0.0; cout * cin];
    matmul_cpu(dy, x, cout, n, cin, true, false, &mut dw, false)?;
    Ok((dx, dw))
}

/// [`linear_grads_cpu`] on a GPU: the same two products as cuBLAS GEMMs.
#[cfg(feature = "cuda")]
fn linear_grads_gpu(
    be: &gpu::Be,
    dy: &crate::device::cuda::DeviceBuffer,
    w: &crate::device::cuda::DeviceBuffer,
    x: &crate::device::cuda::DeviceBuffer,
    (n, cin, cout): (usize, usize, usize),
) -> Result<(
    crate::device::cuda::DeviceBuffer,
    crate::device::cuda::DeviceBuffer,
)> {
    let mut dx = be.alloc_f32(n * cin)?; // (N, IN)
    be.gemm(false, false, n, cin, cout, 1.0, dy, w, 0.0, &mut dx)?;
    let mut dw = be.alloc_f32(cout * cin)?; // (OUT, IN)
    be.gemm(true, false, cout, cin, n, 1.0, dy, x, 0.0, &mut dw)?;
    Ok((dx, dw))
}

/// (dx (N, IN), dw (OUT, IN), db (OUT,) when there is a bias) of a linear layer from dy
/// (N, OUT), on x's device.
fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    has_bias: bool,
    dy: &Tensor,
    (n, cin, cout): (usize, usize, usize),
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    dy.expect_shape("linear backward dy", &[n, cout])?;
    match Backend::of("linear", &[x, w])? {
        Backend::Cpu => {
            let dyv = dy.cpu()?;
            let (dx, dw) = linear_grads_cpu(dyv, w.cpu()?, x.cpu()?, (n, cin, cout))?;
            let db = if has_bias {
                let mut db = vec![0.0; cout]; // (OUT,)
                sum_rows_cpu(dyv, n, cout, &mut db)?;
                Some(Tensor::from_vec(db, &[cout])?)
            } else {
                None
            };
            let dx = Tensor::from_vec(dx, &[n, cin])?;
            Ok((dx, Tensor::from_vec(dw, &[cout, cin])?, db))
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let _r = crate::device::nvtx::Range::new("linear backward");
            let op = "linear";
            let dy = gpu::on_gpu(&be, dy)?;
            let dyb = gpu::dbuf(op, &dy)?;
            let (xb, wb) = (gpu::dbuf(op, x)?, gpu::dbuf(op, w)?);
            let (dx, dw) = linear_grads_gpu(&be, dyb, wb, xb, (n, cin, cout))?;
            let db = if has_bias {
                let mut db = be.alloc_f32(cout)?; // (OUT,)
                be.col_sum(dyb, n, cout, &mut db)?;
                Some(gpu::wrap(&be, db, &[cout])?)
            } else {
                None
            };
            let dx = gpu::wrap(&be, dx, &[n, cin])?;
            Ok((dx, gpu::wrap(&be, dw, &[cout, cin])?, db))
        }
    }
}

/// What the weight-normalized linear's backward keeps from its forward: the normalized
/// weights W (OUT, IN) and the row norms (OUT,), in host memory or on the GPU.
enum WnSaved {
    Cpu {
        w: Vec<f32>,
        norms: Vec<f32>,
    },
    #[cfg(feature = "cuda")]
    Cuda {
        be: gpu::Be,
        w: crate::device::cuda::DeviceBuffer,
        norms: crate::device::cuda::DeviceBuffer,
    },
}

fn non_finite_row(v: &Tensor, norms: &[f32]) -> Result<()> {
    if let Some(r) = norms.iter().position(|&nr| !(nr > 0.0 && nr.is_finite())) {
        bail!(
            NonFinite,
            "wn_linear: row {r} of v {:?} has norm {} (rows must be non-zero and finite)",
            v.shape(),
            norms[r]
        );
    }
    Ok(())
}

/// y (N, OUT) = x (v / ||v||_rows)^T on x's device, with what the backward needs.
fn wn_linear_forward(
    x: &Tensor,
    v: &Tensor,
    (n, cin, cout): (usize, usize, usize),
) -> Result<(Tensor, WnSaved)> {
    match Backend::of("wn_linear", &[x, v])? {
        Backend::Cpu => {
            let mut norms = vec![0.0; cout]; // (OUT,)
            row_norms_cpu(v.cpu()?, cout, cin, &mut norms)?;
            non_finite_row(v, &norms)?;
            // The normalized weights are materialized once: the product and the backward both
            // use them, and gemm needs a plain matrix.
            let mut w = vec![0.0; cout * cin]; // (OUT, IN)
            normalize_rows_cpu(v.cpu()?, &norms, cout, cin, &mut w)?;
            let mut y = vec![0.0; n * cout]; // (N, OUT)
            matmul_cpu(x.cpu()?, &w, n, cin, cout, false, true, &mut y, false)?;
            Ok((Tensor::from_vec(y, &[n, cout])?, WnSaved::Cpu { w, norms }))
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let _r = crate::device::nvtx::Range::new("wn_linear");
            let op = "wn_linear";
            let mut norms = be.alloc_f32(cout)?; // (OUT,)
            be.row_norms(gpu::dbuf(op, v)?, cout, cin, &mut norms)?;
            // The CPU's check (a zero or non-finite row has no direction) needs a download, i.e.
            // a wait for everything queued, twice per training step (teacher and student). By
            // default the GPU skips it: such a row makes the logits, hence the loss,
            // non-finite, and the step's device-side guard then refuses the step before any
            // weight changes. `--nan-guard sync` (the synchronous step) restores the check and
            // its row-naming error.
            if crate::options::current().nan_guard == crate::options::NanGuard::Sync {
                non_finite_row(v, &be.download_f32(&norms)?)?;
            }
            let mut w = be.alloc_f32(cout * cin)?; // (OUT, IN)
            be.row_normalize(gpu::dbuf(op, v)?, &norms, cout, cin, &mut w)?;
            let mut y = be.alloc_f32(n * cout)?; // (N, OUT)
            be.gemm(
                false,
                true,
                n,
                cout,
                cin,
                1.0,
                gpu::dbuf(op, x)?,
                &w,
                0.0,
                &mut y,
            )?;
            let y = gpu::wrap(&be, y, &[n, cout])?;
            Ok((y, WnSaved::Cuda { be, w, norms }))
        }
    }
}

/// (dx (N, IN), dv (OUT, IN)) of the weight-normalized linear from dy (N, OUT): dx = dy W, and
/// dW = dy^T x projected onto each row's tangent space, on the forward's device.
fn wn_linear_backward(
    x: &Tensor,
    saved: &WnSaved,
    dy: &Tensor,
    (n, cin, cout): (usize, usize, usize),
) -> Result<(Tensor, Tensor)> {
    dy.expect_shape("wn_linear backward dy", &[n, cout])?;
    match saved {
        WnSaved::Cpu { w, norms } => {
            // dW, then projected onto each row's tangent space in place -> dv.
            let (dx, mut dv) = linear_grads_cpu(dy.cpu()?, w, x.cpu()?, (n, cin, cout))?;
            wn_backward_cpu(w, norms, cout, cin, &mut dv)?;
            Ok((
                Tensor::from_vec(dx, &[n, cin])?,
                Tensor::from_vec(dv, &[cout, cin])?,
            ))
        }
        #[cfg(feature = "cuda")]
        WnSaved::Cuda { be, w, norms } => {
            let _r = crate::device::nvtx::Range::new("wn_linear backward");
            let op = "wn_linear";
            let dy = gpu::on_gpu(be, dy)?;
            let dyb = gpu::dbuf(op, &dy)?;
            // dW, then projected onto each row's tangent space -> dv.
            let (dx, dw) = linear_grads_gpu(be, dyb, w, gpu::dbuf(op, x)?, (n, cin, cout))?;
            let mut dv = be.alloc_f32(cout * cin)?;
            be.row_normalize_backward(&dw, w, norms, cout, cin, &mut dv)?;
            Ok((
                gpu::wrap(be, dx, &[n, cin])?,
                gpu::wrap(be, dv, &[cout, cin])?,
            ))
        }
    }
}

/// The sum (or, with `mean`, the mean) of all of x's elements -> (1,) on x's device. The CPU
/// sums in f64, a GPU in f32 (`sum_f32` in kernels/elementwise.cu).
fn sum_all_forward(op: &str, x: &Tensor, mean: bool) -> Result<Tensor> {
    let count = x.numel();
    match Backend::of(op, &[x])? {
        Backend::Cpu => {
            let s = sum_all_cpu(x.cpu()?);
            let s = if mean { s / count as f64 } else { s };
            Tensor::from_vec(vec![s as f32], &[1])
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let mut s = be.alloc_f32(1)?; // (1,)
            be.sum(gpu::dbuf(op, x)?, count, &mut s)?;
            if mean {
                be.scale_in_place(&mut s, 1.0 / count as f32)?;
            }
            gpu::wrap(&be, s, &[1])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;
    use crate::testutil::{check_grad, check_tape_op, f64s, randn, TapeRun, Tol};

    /// Naive f64 product of row-major a (M, K) and b (K, N).
    fn naive_mm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    y[i * n + j] += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
            }
        }
        y
    }

    /// Explicit transpose of a row-major (R, C) matrix (test reference only).
    fn transpose(a: &[f32], r: usize, c: usize) -> Vec<f32> {
        let mut t = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = a[i * c + j];
            }
        }
        t
    }

    fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= tol * scale,
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    #[test]
    fn matmul_kernel_all_transposes_and_accumulate_match_naive() {
        // Odd sizes; one product large enough to take the parallel gemm path.
        for &(m, k, n) in &[(5, 7, 3), (1, 9, 4), (67, 45, 93)] {
            let a = randn(&[m, k], 21).to_vec().unwrap();
            let b = randn(&[k, n], 22).to_vec().unwrap();
            let want = naive_mm(&a, &b, m, k, n);
            let at = transpose(&a, m, k); // stored (K, M)
            let bt = transpose(&b, k, n); // stored (N, K)
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let aa = if ta { &at } else { &a };
                let bb = if tb { &bt } else { &b };
                let mut out = vec![f32::NAN; m * n]; // overwritten, never read
                matmul_cpu(aa, bb, m, k, n, ta, tb, &mut out, false).unwrap();
                assert_close(
                    &out,
                    &want,
                    1e-5,
                    &format!("mm {m}x{k}x{n} ta={ta} tb={tb}"),
                );
                // accumulate: out += product
                let init = randn(&[m, n], 23).to_vec().unwrap();
                let mut acc = init.clone();
                matmul_cpu(aa, bb, m, k, n, ta, tb, &mut acc, true).unwrap();
                let want_acc: Vec<f64> =
                    want.iter().zip(&init).map(|(w, &i)| w + i as f64).collect();
                assert_close(&acc, &want_acc, 1e-5, "accumulate");
            }
        }
        // A bad length is an error, not UB.
        let mut out = vec![0.0; 6];
        assert!(matmul_cpu(&[0.0; 5], &[0.0; 6], 2, 3, 3, false, false, &mut out, false).is_err());
    }

    #[test]
    fn matmul_op_forward_and_gradients() {
        let a = randn(&[4, 6], 24);
        let b = randn(&[6, 5], 25);
        let y = Tape::no_grad().matmul(&a, &b).unwrap();
        assert_eq!(y.shape(), &[4, 5]);
        let want = naive_mm(a.cpu().unwrap(), b.cpu().unwrap(), 4, 6, 5);
        assert_close(y.cpu().unwrap(), &want, 1e-5, "matmul op");
        assert!(Tape::no_grad().matmul(&a, &a).is_err());
        // Relative error bound 1e-2 (f32 central differences, step 1e-3).
        check_grad(&[a, b], 1e-2, |tape, xs| tape.matmul(&xs[0], &xs[1])).unwrap();
    }

    /// Naive f64 x W^T + b.
    fn naive_linear(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        n: usize,
        ci: usize,
        co: usize,
    ) -> Vec<f64> {
        let mut y = vec![0.0f64; n * co];
        for i in 0..n {
            for o in 0..co {
                let mut s = b.map_or(0.0, |b| b[o] as f64);
                for p in 0..ci {
                    s += x[i * ci + p] as f64 * w[o * ci + p] as f64;
                }
                y[i * co + o] = s;
            }
        }
        y
    }

    #[test]
    fn linear_forward_matches_naive_with_and_without_bias() {
        let (n, ci, co) = (7, 11, 5);
        let x = randn(&[n, ci], 26);
        let w = randn(&[co, ci], 27);
        let b = randn(&[co], 28);
        let mut tape = Tape::no_grad();
        let y = tape.linear(&x, &w, Some(&b)).unwrap();
        let y0 = tape.linear(&x, &w, None).unwrap();
        let (xv, wv, bv) = (x.cpu().unwrap(), w.cpu().unwrap(), b.cpu().unwrap());
        assert_close(
            y.cpu().unwrap(),
            &naive_linear(xv, wv, Some(bv), n, ci, co),
            1e-5,
            "bias",
        );
        assert_close(
            y0.cpu().unwrap(),
            &naive_linear(xv, wv, None, n, ci, co),
            1e-5,
            "no bias",
        );
        // Shape errors name the op.
        let e = tape.linear(&x, &randn(&[co, ci + 1], 1), None).unwrap_err();
        assert!(e.to_string().contains("linear"), "{e}");
        assert!(tape.linear(&x, &w, Some(&randn(&[co + 1], 1))).is_err());
    }

    #[test]
    fn linear_gradients_match_finite_differences() {
        // Relative error bound 1e-2 (f32 central differences, step 1e-3).
        let x = randn(&[5, 4], 29);
        let w = randn(&[3, 4], 30);
        let b = randn(&[3], 31);
        check_grad(&[x.clone(), w.clone(), b], 1e-2, |tape, xs| {
            tape.linear(&xs[0], &xs[1], Some(&xs[2]))
        })
        .unwrap();
        check_grad(&[x, w], 1e-2, |tape, xs| tape.linear(&xs[0], &xs[1], None)).unwrap();
    }

    #[test]
    fn sum_rows_kernel_matches_naive_across_blocks() {
        let (r, c) = (3, 600); // more than two column blocks
        let x = randn(&[r, c], 32).to_vec().unwrap();
        let mut out = vec![0.0; c];
        sum_rows_cpu(&x, r, c, &mut out).unwrap();
        for j in 0..c {
            let s: f64 = (0..r).map(|i| x[i * c + j] as f64).sum();
            assert!((out[j] as f64 - s).abs() < 1e-5);
        }
    }

    #[test]
    fn wn_linear_forward_matches_explicitly_normalized_rows() {
        let (n, ci, co) = (6, 9, 13);
        let x = randn(&[n, ci], 33);
        // Rows of very different scales: the output must not depend on them.
        let mut v = randn(&[co, ci], 34).to_vec().unwrap();
        for (r, row) in v.chunks_mut(ci).enumerate() {
            for e in row {
                *e *= 0.1 + r as f32;
            }
        }
        let vt = Tensor::from_vec(v.clone(), &[co, ci]).unwrap();
        let y = Tape::no_grad().wn_linear(&x, &vt).unwrap();
        // Reference: normalize in f64, then the naive product.
        let xv = x.cpu().unwrap();
        for i in 0..n {
            for o in 0..co {
                let row = &v[o * ci..(o + 1) * ci];
                let nr = row.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
                let want: f64 = (0..ci)
                    .map(|p| xv[i * ci + p] as f64 * row[p] as f64 / nr)
                    .sum();
                let got = y.cpu().unwrap()[i * co + o] as f64;
                assert!(
                    (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
        }
        // A zero row is reported, not turned into NaNs.
        let z = Tensor::from_vec(vec![0.0; co * ci], &[co, ci]).unwrap();
        assert!(Tape::no_grad().wn_linear(&x, &z).is_err());
    }

    #[test]
    fn wn_linear_gradients_match_finite_differences() {
        // Relative error bound 1e-2 (f32 central differences, step 1e-3); v has rows of norm
        // about 2, so the step is small against each row's length.
        let x = randn(&[4, 5], 35);
        let v = randn(&[3, 5], 36);
        check_grad(&[x, v], 1e-2, |tape, xs| tape.wn_linear(&xs[0], &xs[1])).unwrap();
    }

    #[test]
    fn row_norms_kernel_matches_naive() {
        let v = randn(&[70, 3], 37).to_vec().unwrap();
        let mut nr = vec![0.0; 70];
        row_norms_cpu(&v, 70, 3, &mut nr).unwrap();
        for r in 0..70 {
            let want = (0..3)
                .map(|j| (v[r * 3 + j] as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!((nr[r] as f64 - want).abs() < 1e-6 * (1.0 + want));
        }
    }

    #[test]
    fn sum_and_mean_all_forward_and_gradients() {
        let x = randn(&[3, 7, 11], 38);
        let want: f64 = x.cpu().unwrap().iter().map(|&v| v as f64).sum();
        let mut tape = Tape::no_grad();
        let s = tape.sum_all(&x).unwrap();
        let m = tape.mean_all(&x).unwrap();
        assert_eq!(s.shape(), &[1]);
        assert_eq!(m.shape(), &[1]);
        assert!((s.scalar().unwrap() as f64 - want).abs() < 1e-4);
        assert!((m.scalar().unwrap() as f64 - want / 231.0).abs() < 1e-6);
        // Larger than one rayon chunk: exercises the chunked f64 reduction.
        let big = randn(&[PAR_CHUNK + 1001], 39);
        let want_big: f64 = big.cpu().unwrap().iter().map(|&v| v as f64).sum();
        let got_big = Tape::no_grad().sum_all(&big).unwrap().scalar().unwrap() as f64;
        assert!((got_big - want_big).abs() < 1e-3);
        // Relative error bound 1e-2 (f32 central differences, step 1e-3).
        check_grad(std::slice::from_ref(&x), 1e-2, |tape, xs| {
            tape.sum_all(&xs[0])
        })
        .unwrap();
        check_grad(&[x], 1e-2, |tape, xs| tape.mean_all(&xs[0])).unwrap();
    }

    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn time_head_linear_and_prototypes() {
        // The head's linear (batch 256, 2048 -> 2048) and the prototype layer (256 x 256 against
        // 65536 x 256), forward and backward, as the training step runs them.
        let time = |name: &str, f: &mut dyn FnMut()| {
            f(); // warm-up
            let t = std::time::Instant::now();
            f();
            let dt = t.elapsed().as_secs_f64();
            println!("{name}: {:.1} ms", dt * 1e3);
        };
        let x = randn(&[256, 2048], 1);
        let w = randn(&[2048, 2048], 2);
        let b = randn(&[2048], 3);
        time("linear 256x2048x2048 fwd+bwd", &mut || {
            let mut tape = Tape::new();
            let w = tape.track(&w);
            let y = tape.linear(&x, &w, Some(&b)).unwrap();
            let dy = randn(&[256, 2048], 4);
            tape.backward_from(vec![(y, dy)]).unwrap();
        });
        let e = randn(&[256, 256], 5);
        let v = randn(&[65536, 256], 6);
        time("wn_linear 256x256 . (65536x256)^T fwd", &mut || {
            Tape::no_grad().wn_linear(&e, &v).unwrap();
        });
        let dy = randn(&[256, 65536], 7);
        time("wn_linear fwd+bwd", &mut || {
            let mut tape = Tape::new();
            let v = tape.track(&v);
            let y = tape.wn_linear(&e, &v).unwrap();
            tape.backward_from(vec![(y, dy.clone())]).unwrap();
        });
    }
    /// Row-major (M, K) x (K, N) in f64, the inner loop over N (contiguous).
    fn mm64(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; m * n];
        for i in 0..m {
            let row = &mut y[i * n..(i + 1) * n];
            for p in 0..k {
                let a = a[i * k + p];
                for (y, &b) in row.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                    *y += a * b;
                }
            }
        }
        y
    }

    /// Transpose of a row-major (R, C) f64 matrix.
    fn t64(a: &[f64], r: usize, c: usize) -> Vec<f64> {
        let mut t = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = a[i * c + j];
            }
        }
        t
    }

    /// f64 reference of matmul on x (M, K), b (K, N) and the output gradient dy (M, N):
    /// Y = X B, dX = dY B^T, dB = X^T dY.
    fn matmul_ref(x: &[f64], b: &[f64], dy: &[f64], m: usize, k: usize, n: usize) -> TapeRun<f64> {
        TapeRun {
            outputs: vec![mm64(x, b, m, k, n)],
            grads: vec![
                Some(mm64(dy, &t64(b, k, n), m, n, k)),
                Some(mm64(&t64(x, m, k), dy, k, m, n)),
            ],
        }
    }

    /// f64 reference of linear on x (M, K), w (N, K), an optional bias (N,) and dy (M, N):
    /// Y = X W^T + b, dX = dY W, dW = dY^T X, db = the column sums of dY.
    fn linear_ref(
        x: &[f64],
        w: &[f64],
        bias: Option<&[f64]>,
        dy: &[f64],
        m: usize,
        k: usize,
        n: usize,
    ) -> TapeRun<f64> {
        let mut y = mm64(x, &t64(w, n, k), m, k, n);
        let mut grads = vec![
            Some(mm64(dy, w, m, n, k)),
            Some(mm64(&t64(dy, m, n), x, n, m, k)),
        ];
        if let Some(bias) = bias {
            for (i, y) in y.iter_mut().enumerate() {
                *y += bias[i % n];
            }
            grads.push(Some(
                (0..n)
                    .map(|j| (0..m).map(|i| dy[i * n + j]).sum())
                    .collect(),
            ));
        }
        TapeRun {
            outputs: vec![y],
            grads,
        }
    }

    /// f64 reference of wn_linear on x (M, K), v (N, K) and dy (M, N), with W = V / |V|_row:
    /// Y = X W^T, dX = dY W, dV_o = (G_o - W_o (W_o . G_o)) / |V_o| with G = dY^T X (the
    /// derivative of v / |v| is (I - w w^T) / |v|).
    fn wn_linear_ref(
        x: &[f64],
        v: &[f64],
        dy: &[f64],
        m: usize,
        k: usize,
        n: usize,
    ) -> TapeRun<f64> {
        let norms: Vec<f64> = v
            .chunks(k)
            .map(|r| r.iter().map(|a| a * a).sum::<f64>().sqrt())
            .collect();
        let w: Vec<f64> = v
            .iter()
            .enumerate()
            .map(|(i, a)| a / norms[i / k])
            .collect();
        let g = mm64(&t64(dy, m, n), x, n, m, k); // (N, K)
        let mut dv = vec![0.0f64; n * k];
        for o in 0..n {
            let (wo, go) = (&w[o * k..(o + 1) * k], &g[o * k..(o + 1) * k]);
            let dot: f64 = wo.iter().zip(go).map(|(a, b)| a * b).sum();
            for p in 0..k {
                dv[o * k + p] = (go[p] - wo[p] * dot) / norms[o];
            }
        }
        TapeRun {
            outputs: vec![mm64(x, &t64(&w, n, k), m, k, n)],
            grads: vec![Some(mm64(dy, &w, m, n, k)), Some(dv)],
        }
    }

    /// matmul, linear (with and without the bias), wn_linear, sum_all and mean_all through the
    /// tape on `dev` against f64 references ([`matmul_ref`], [`linear_ref`], [`wn_linear_ref`]; the sums in f64, their gradients
    /// dy and dy / numel): odd small sizes, the head's (64, 2048) x (2048, 256), a 1 x 3 x 1,
    /// and the prototype layer at N = 64, (128, 256) against (65536, 256). f32 GEMMs of up to
    /// 65536-long sums: 1e-5 of the largest value on the CPU. On a GPU also against the CPU op
    /// within 1e-4 (sums 1e-5 forward, 1e-6 backward; gpu_tape's former bounds).
    fn gemm_and_sums_match_f64_on(dev: &Device) {
        let (cpu, gpu) = (Tol::new(1e-5, 1e-5), Tol::new(1e-4, 1e-4));
        for (i, (m, k, n)) in [(7usize, 13usize, 5usize), (64, 2048, 256), (1, 3, 1)]
            .into_iter()
            .enumerate()
        {
            let s = 500 + 10 * i as u64;
            let (a, b) = (randn(&[m, k], s), randn(&[k, n], s + 1));
            let (w, bias) = (randn(&[n, k], s + 2), randn(&[n], s + 3));
            let dy = randn(&[m, n], s + 4);
            let (av, bv, wv, biasv, dyv) = (
                f64s(a.cpu().unwrap()),
                f64s(b.cpu().unwrap()),
                f64s(w.cpu().unwrap()),
                f64s(bias.cpu().unwrap()),
                f64s(dy.cpu().unwrap()),
            );
            let matmul = matmul_ref(&av, &bv, &dyv, m, k, n);
            let linear = linear_ref(&av, &wv, Some(&biasv), &dyv, m, k, n);
            let no_bias = linear_ref(&av, &wv, None, &dyv, m, k, n);
            let wn_linear = wn_linear_ref(&av, &wv, &dyv, m, k, n);
            let op = |t: &mut Tape, v: &[Tensor]| Ok(vec![t.matmul(&v[0], &v[1])?]);
            check_tape_op(
                dev,
                &format!("matmul {m}x{k}x{n}"),
                &[a.clone(), b],
                &dy,
                &op,
                &matmul,
                cpu,
                gpu,
            );
            let op = |t: &mut Tape, v: &[Tensor]| Ok(vec![t.linear(&v[0], &v[1], Some(&v[2]))?]);
            let inputs = [a.clone(), w.clone(), bias];
            check_tape_op(
                dev,
                &format!("linear {m}x{k}->{n}"),
                &inputs,
                &dy,
                &op,
                &linear,
                cpu,
                gpu,
            );
            let op = |t: &mut Tape, v: &[Tensor]| Ok(vec![t.linear(&v[0], &v[1], None)?]);
            let name = format!("linear (no bias) {m}x{k}->{n}");
            check_tape_op(
                dev,
                &name,
                &[a.clone(), w.clone()],
                &dy,
                &op,
                &no_bias,
                cpu,
                gpu,
            );
            let op = |t: &mut Tape, v: &[Tensor]| Ok(vec![t.wn_linear(&v[0], &v[1])?]);
            let name = format!("wn_linear {m}x{k}->{n}");
            check_tape_op(dev, &name, &[a.clone(), w], &dy, &op, &wn_linear, cpu, gpu);
            let numel = (m * k) as f64;
            let d1 = randn(&[1], s + 5);
            let g = d1.to_vec().unwrap()[0] as f64;
            let sum = TapeRun {
                outputs: vec![vec![av.iter().sum::<f64>()]],
                grads: vec![Some(vec![g; m * k])],
            };
            let mean = TapeRun {
                outputs: vec![vec![av.iter().sum::<f64>() / numel]],
                grads: vec![Some(vec![g / numel; m * k])],
            };
            let sums = (Tol::new(1e-6, 0.0), Tol::new(1e-5, 1e-6));
            let op = |t: &mut Tape, v: &[Tensor]| Ok(vec![t.sum_all(&v[0])?]);
            let one = std::slice::from_ref(&a);
            check_tape_op(
                dev,
                &format!("sum_all {m}x{k}"),
                one,
                &d1,
                &op,
                &sum,
                sums.0,
                sums.1,
            );
            let op = |t: &mut Tape, v: &[Tensor]| Ok(vec![t.mean_all(&v[0])?]);
            let mean_tol = Tol::new(1e-6, f32::EPSILON as f64);
            check_tape_op(
                dev,
                &format!("mean_all {m}x{k}"),
                one,
                &d1,
                &op,
                &mean,
                mean_tol,
                sums.1,
            );
        }
        // The CARP prototype layer's size: (2N, 256) x (65536, 256)^T at N = 64.
        let (m, k, n) = (128, 256, 65536);
        let (x, v, dy) = (
            randn(&[m, k], 590),
            randn(&[n, k], 591),
            randn(&[m, n], 592),
        );
        let (xv, vv, dyv) = (
            f64s(x.cpu().unwrap()),
            f64s(v.cpu().unwrap()),
            f64s(dy.cpu().unwrap()),
        );
        let want = wn_linear_ref(&xv, &vv, &dyv, m, k, n);
        let op = |t: &mut Tape, v: &[Tensor]| Ok(vec![t.wn_linear(&v[0], &v[1])?]);
        check_tape_op(
            dev,
            "wn_linear 128x256->65536",
            &[x, v],
            &dy,
            &op,
            &want,
            cpu,
            gpu,
        );
    }
    crate::test_device!(
        gemm_and_sums_match_f64_on,
        gemm_and_sums_match_f64_cpu,
        gemm_and_sums_match_f64_cuda
    );
}
