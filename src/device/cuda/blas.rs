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
        let op = |t: bool| {
            if t {
                cbs::cublasOperation_t::CUBLAS_OP_T
            } else {
                cbs::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // Column-major view: C^T (n x m) = op(B)^T (n x k) * op(A)^T (k x m).
        let lda_b = if trans_b { ki } else { ni };
        let ldb_a = if trans_a { mi } else { ki };
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
                op(trans_b),
                op(trans_a),
                ni,
                mi,
                ki,
                &alpha,
                b.ptr() as *const f32,
                lda_b,
                a.ptr() as *const f32,
                ldb_a,
                &beta,
                c.ptr() as *mut f32,
                ni,
            )
        }
        .map_err(|e| Error::Device(format!("cublasSgemm(m={m}, n={n}, k={k}): {e}")))
    }
}
