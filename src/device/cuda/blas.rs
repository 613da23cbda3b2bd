//! cuBLAS: one handle on the backend's stream, and a row-major `gemm`.
//!
//! cuBLAS is column-major; a row-major (r x c) matrix is the column-major (c x r) matrix of the
//! same bytes, its transpose. So row-major C = op(A) op(B) is computed as column-major
//! C^T = op(B)^T op(A)^T: cuBLAS gets B first, A second, and the dimensions (n, m, k).

use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as cb, sys as cbs};
use cudarc::driver::{CudaContext, CudaStream};

use super::{CudaBackend, DeviceBuffer};
use crate::error::{Error, Result};

pub struct Blas {
    handle: Mutex<Handle>,
}

struct Handle(cbs::cublasHandle_t);

// SAFETY: a cuBLAS handle may be used from any thread as long as calls on it are not
// concurrent; the Mutex around it guarantees that.
unsafe impl Send for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cublasCreate, destroyed once here.
        let _ = unsafe { cb::destroy_handle(self.0) };
    }
}

impl Blas {
    pub(crate) fn new(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<Blas> {
        // SAFETY: only tries to dlopen libcublas (cudarc panics on first use when it is absent).
        if !unsafe { cbs::is_culib_present() } {
            return Err(Error::Device(
                "libcublas.so not found (install the CUDA 13 cuBLAS library, e.g. the \
                 nvidia-cublas PyPI wheel, and add it to LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        ctx.bind_to_thread()
            .map_err(|e| super::driver_err("binding the CUDA context", e))?;
        let h = cb::create_handle().map_err(|e| Error::Device(format!("cublasCreate: {e}")))?;
        let handle = Handle(h);
        // SAFETY: valid handle and stream; the stream outlives the backend's Blas.
        unsafe { cb::set_stream(handle.0, stream.cu_stream() as cbs::cudaStream_t) }
            .map_err(|e| Error::Device(format!("cublasSetStream: {e}")))?;
        Ok(Blas {
            handle: Mutex::new(handle),
        })
    }
}

/// The column-major cuBLAS call that computes a row-major product: C^T = op(B)^T op(A)^T, so
/// the "first" operand is B and the "second" is A. Kept apart from the FFI so that the mapping
/// is unit-tested on the CPU against a column-major reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ColMajorCall {
    pub trans_first: bool,
    pub trans_second: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub ld_first: i32,
    pub ld_second: i32,
    pub ldc: i32,
}

impl ColMajorCall {
    /// Row-major C (m, n) = op(A) (m, k) op(B) (k, n); A stored (m, k) or (k, m) when
    /// trans_a, B stored (k, n) or (n, k) when trans_b.
    pub(crate) fn for_row_major(trans_a: bool, trans_b: bool, m: i32, n: i32, k: i32) -> Self {
        ColMajorCall {
            trans_first: trans_b,
            trans_second: trans_a,
            m: n,
            n: m,
            k,
            // Row-major B (k, n) is column-major (n, k) with leading dimension n; stored (n, k)
            // it is column-major (k, n), leading dimension k. Likewise for A.
            ld_first: if trans_b { k } else { n },
            ld_second: if trans_a { m } else { k },
            ldc: n,
        }
    }
}

fn dim(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::Device(format!("gemm: {what} = {x} exceeds i32")))
}

impl CudaBackend {
    /// Row-major `c = alpha * op(a) * op(b) + beta * c`, with op(a) (m, k), op(b) (k, n),
    /// c (m, n). `a` is stored (m, k), or (k, m) when `trans_a`; `b` is (k, n), or (n, k) when
    /// `trans_b`. beta = 0 ignores c's old contents (NaN included), beta = 1 accumulates.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        trans_a: bool,
        trans_b: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &DeviceBuffer,
        b: &DeviceBuffer,
        beta: f32,
        c: &mut DeviceBuffer,
    ) -> Result<()> {
        for (name, buf) in [("a", a), ("b", b), ("c", &*c)] {
            if buf.dtype() != crate::device::DType::F32 {
                return Err(Error::Device(format!(
                    "gemm: {name} is a {} buffer; the matrix products run in f32 (widen bf16 \
                     activations first)",
                    buf.dtype()
                )));
            }
        }
        for (name, buf, need) in [("a", a, m * k), ("b", b, k * n)] {
            if buf.len32() < need {
                return Err(Error::Shape(format!(
                    "gemm: {name} holds {} values, (m={m}, n={n}, k={k}) needs {need}",
                    buf.len32()
                )));
            }
        }
        if c.len32() < m * n {
            return Err(Error::Shape(format!(
                "gemm: c holds {} values, ({m}, {n}) needs {}",
                c.len32(),
                m * n
            )));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (mi, ni, ki) = (dim(m, "m")?, dim(n, "n")?, dim(k.max(1), "k")?);
        if k == 0 {
            // op(a) op(b) is the zero matrix: c = beta * c.
            return if beta == 0.0 {
                self.fill(c, 0.0)
            } else {
                self.scale_in_place(c, beta)
            };
        }
        let call = ColMajorCall::for_row_major(trans_a, trans_b, mi, ni, ki);
        let op = |t: bool| {
            if t {
                cbs::cublasOperation_t::CUBLAS_OP_T
            } else {
                cbs::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let h = self
            .blas()?
            .handle
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.context()
            .bind_to_thread()
            .map_err(|e| super::driver_err("binding the CUDA context", e))?;
        // SAFETY: all three pointers are live device buffers whose sizes were checked above;
        // alpha and beta are host scalars that outlive the call (host pointer mode).
        unsafe {
            cb::sgemm(
                h.0,
                op(call.trans_first),
                op(call.trans_second),
                call.m,
                call.n,
                call.k,
                &alpha,
                b.ptr() as *const f32,
                call.ld_first,
                a.ptr() as *const f32,
                call.ld_second,
                &beta,
                c.ptr() as *mut f32,
                call.ldc,
            )
        }
        .map_err(|e| Error::Device(format!("cublasSgemm(m={m}, n={n}, k={k}): {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::ColMajorCall;

    /// Reference column-major sgemm (BLAS semantics): C = op(A) op(B), C m x n, ldc.
    #[allow(clippy::too_many_arguments)]
    fn sgemm_col_major(
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: &[f64],
        lda: usize,
        b: &[f64],
        ldb: usize,
        ldc: usize,
    ) -> Vec<f64> {
        let mut c = vec![f64::NAN; ldc * n];
        for j in 0..n {
            for i in 0..m {
                let mut acc = 0.0;
                for l in 0..k {
                    let av = if ta { a[l + i * lda] } else { a[i + l * lda] };
                    let bv = if tb { b[j + l * ldb] } else { b[l + j * ldb] };
                    acc += av * bv;
                }
                c[i + j * ldc] = acc;
            }
        }
        c
    }

    #[test]
    fn row_major_mapping_matches_a_direct_product() {
        let (m, n, k) = (5usize, 7usize, 3usize);
        let val = |s: usize, i: usize| ((i * 7 + s * 13) % 11) as f64 - 5.0;
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a: Vec<f64> = (0..m * k).map(|i| val(1, i)).collect();
            let b: Vec<f64> = (0..k * n).map(|i| val(2, i)).collect();
            let call = ColMajorCall::for_row_major(ta, tb, m as i32, n as i32, k as i32);
            let c = sgemm_col_major(
                call.trans_first,
                call.trans_second,
                call.m as usize,
                call.n as usize,
                call.k as usize,
                &b,
                call.ld_first as usize,
                &a,
                call.ld_second as usize,
                call.ldc as usize,
            );
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|l| {
                            let av = if ta { a[l * m + i] } else { a[i * k + l] };
                            let bv = if tb { b[j * k + l] } else { b[l * n + j] };
                            av * bv
                        })
                        .sum();
                    assert_eq!(c[i * n + j], want, "ta={ta} tb={tb} ({i}, {j})");
                }
            }
        }
    }
}
