//! Tensors: a shape and an immutable, shared storage. Ops produce new tensors; the storage
//! enum is where a backend joins (`Storage::Cuda` with the `cuda` feature) without touching the
//! callers of any op.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::bail;
use crate::error::Result;

// The element formats and device kinds are the backends' vocabulary (device/ sits below
// tensor/); re-exported so callers keep naming them `tensor::Device`, `tensor::DType`.
pub use crate::device::{DType, Device, Layout};

/// Chunk size for rayon over flat buffers: large enough to amortize scheduling.
pub const PAR_CHUNK: usize = 1 << 14;

/// The bytes behind a tensor: f32 on the CPU; f32 or bf16 ([`DType`]) on a GPU. Row-major
/// NCHW, except bf16 GPU activations, which may be NHWC ([`Layout`]).
#[derive(Debug)]
pub enum Storage {
    Cpu(Vec<f32>),
    /// f32 values in device memory of one GPU, with the backend that owns the memory (every
    /// op on the tensor runs on that backend's stream).
    #[cfg(feature = "cuda")]
    Cuda(CudaStorage),
}

/// A device buffer and its backend. The buffer holds exactly the tensor's elements.
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub struct CudaStorage {
    pub buf: crate::device::cuda::DeviceBuffer,
    pub backend: Arc<crate::device::cuda::CudaBackend>,
}

/// Bytes of CPU tensor storage alive now, and the most alive at once since the last
/// [`reset_cpu_storage_peak`]: the CPU's counterpart of the GPU pool's live-buffer peak (what the
/// tape keeps for backward shows here). Counted when a tensor wraps the storage, uncounted when
/// the storage is dropped.
static CPU_LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static CPU_PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// (bytes of CPU tensor storage alive now, the peak since the last reset). Process-wide: tests
/// that read it must run alone in their process.
pub fn cpu_storage_bytes() -> (usize, usize) {
    (
        CPU_LIVE_BYTES.load(Ordering::Relaxed),
        CPU_PEAK_BYTES.load(Ordering::Relaxed),
    )
}

/// Starts a new peak for [`cpu_storage_bytes`] at what is alive now.
pub fn reset_cpu_storage_peak() {
    CPU_PEAK_BYTES.store(CPU_LIVE_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// The most bytes live tensors on `device` needed at once so far in this process (the measure
/// PyTorch's `max_memory_allocated` gives): the CPU's tensor-storage counter, or the GPU pool's
/// requested-bytes peak.
pub fn peak_live_bytes(device: &Device) -> Result<usize> {
    match device {
        Device::Cpu => Ok(cpu_storage_bytes().1),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => Ok(crate::device::cuda::backend(*i)?
            .pool_stats()
            .peak_bytes_requested),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => bail!(Device, "{}", crate::device::NO_CUDA),
    }
}

fn count_cpu_storage(bytes: usize) {
    let live = CPU_LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
    CPU_PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
}

impl Drop for Storage {
    fn drop(&mut self) {
        let bytes = self.cpu_bytes();
        // Saturating: a storage built and dropped without ever being wrapped was never counted.
        let _ = CPU_LIVE_BYTES.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
            Some(l.saturating_sub(bytes))
        });
    }
}

impl Storage {
    /// Host bytes held (0 for device storage).
    fn cpu_bytes(&self) -> usize {
        match self {
            Storage::Cpu(v) => v.len() * 4,
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => 0,
        }
    }
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => Device::Cuda(c.backend.ordinal()),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(v) => v.len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => c.buf.len(),
        }
    }
    /// The element type (always f32 on the CPU).
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(_) => DType::F32,
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => c.buf.dtype(),
        }
    }
    /// The memory layout (always NCHW on the CPU).
    pub fn layout(&self) -> Layout {
        match self {
            Storage::Cpu(_) => Layout::Nchw,
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => c.buf.layout(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Identifies a tensor on the tape. Every new tensor (including a reshape) gets a fresh id.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl TensorId {
    fn fresh() -> Self {
        TensorId(NEXT_ID.fetch_add(1, Ordering::Relaxed))
    }
}

#[derive(Debug)]
struct Inner {
    id: TensorId,
    shape: Vec<usize>,
    storage: Arc<Storage>,
}

/// A cheaply clonable handle to an immutable tensor.
#[derive(Clone, Debug)]
pub struct Tensor(Arc<Inner>);

impl Tensor {
    /// Wraps a storage; checks the element count against the shape.
    pub fn new(storage: Storage, shape: &[usize]) -> Result<Tensor> {
        // Counted first: the storage's drop uncounts it even when the shape check fails.
        count_cpu_storage(storage.cpu_bytes());
        let n: usize = shape.iter().product();
        if n != storage.len() {
            bail!(
                Shape,
                "shape {shape:?} needs {n} elements, storage has {}",
                storage.len()
            );
        }
        Ok(Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            shape: shape.to_vec(),
            storage: Arc::new(storage),
        })))
    }

    /// A CPU tensor from a host vector.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        Tensor::new(Storage::Cpu(data), shape)
    }

    pub fn zeros(shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::full(0.0, shape, device)
    }

    pub fn full(value: f32, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        match device {
            Device::Cpu => Tensor::from_vec(vec![value; n], shape),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let be = crate::device::cuda::backend(*i)?;
                let mut buf = be.alloc_f32(n)?;
                be.fill(&mut buf, value)?;
                Tensor::from_cuda(buf, be, shape)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => bail!(
                Device,
                "CUDA tensors need a build with `--features cuda` and a GPU"
            ),
        }
    }

    /// A tensor of the same shape holding `data` on the CPU (used by the CPU ops for their
    /// outputs).
    pub fn like(&self, data: Vec<f32>) -> Result<Tensor> {
        Tensor::from_vec(data, self.shape())
    }

    /// A tensor over a device buffer of `backend` (the buffer must hold exactly the shape's
    /// element count).
    #[cfg(feature = "cuda")]
    pub fn from_cuda(
        buf: crate::device::cuda::DeviceBuffer,
        backend: Arc<crate::device::cuda::CudaBackend>,
        shape: &[usize],
    ) -> Result<Tensor> {
        Tensor::new(Storage::Cuda(CudaStorage { buf, backend }), shape)
    }

    /// The device buffer and backend of a CUDA tensor; an error for other devices.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Result<&CudaStorage> {
        match self.storage() {
            Storage::Cuda(c) => Ok(c),
            Storage::Cpu(_) => bail!(
                Device,
                "expected a CUDA tensor, got a CPU tensor of shape {:?}",
                self.shape()
            ),
        }
    }

    /// A copy on `device` (the same tensor, no copy, when it is already there). The copy is a
    /// new leaf for the tape: use it on inputs and parameters, not inside a differentiated
    /// computation.
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device() == *device {
            return Ok(self.clone());
        }
        match device {
            Device::Cpu => Tensor::from_vec(self.to_vec()?, self.shape()),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let be = crate::device::cuda::backend(*i)?;
                let buf = match self.storage() {
                    Storage::Cpu(v) => be.upload_f32(v)?,
                    // GPU to another GPU: through the host (no peer copies yet).
                    Storage::Cuda(_) => be.upload_f32(&self.to_vec()?)?,
                };
                Tensor::from_cuda(buf, be, self.shape())
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => bail!(
                Device,
                "CUDA tensors need a build with `--features cuda` and a GPU"
            ),
        }
    }

    /// The same values stored as `dtype` (a new tensor, not recorded on a tape; the same
    /// tensor when it already is). On a GPU, f32 -> bf16 rounds to nearest even exactly as
    /// [`round_bf16`] and keeps the layout; bf16 -> f32 is exact and NCHW (f32 tensors are NCHW).
    /// CPU tensors are f32 only.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        match dtype {
            DType::F32 => self.to_format(DType::F32, Layout::Nchw),
            DType::Bf16 => self.to_format(DType::Bf16, self.layout()),
        }
    }

    /// The same values stored as `dtype` in `layout` (see [`Tensor::to_dtype`]): a new tensor,
    /// not recorded, or the same one when it already is. NHWC is for rank-4 bf16 GPU tensors.
    pub fn to_format(&self, dtype: DType, layout: Layout) -> Result<Tensor> {
        if self.dtype() == dtype && self.layout() == layout {
            return Ok(self.clone());
        }
        if layout == Layout::Nhwc && (dtype != DType::Bf16 || self.rank() != 4) {
            bail!(
                Shape,
                "NHWC storage is for rank-4 bf16 GPU tensors, not {dtype} of shape {:?}",
                self.shape()
            );
        }
        match self.storage() {
            Storage::Cpu(_) => bail!(
                Device,
                "CPU tensors are f32 NCHW only (the bf16 mode rounds values held in f32 there); \
                 {dtype} {layout} storage exists on a GPU"
            ),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => {
                let s = self.shape();
                // (N, C, H*W) for the layout kernels; any rank is one plane otherwise.
                let (n, ch, hw) = if self.rank() == 4 {
                    (s[0], s[1], s[2] * s[3])
                } else {
                    (1, 1, self.numel())
                };
                let mut y = c.backend.alloc_dt(dtype, self.numel())?.with_layout(layout);
                c.backend.convert(&c.buf, n, ch, hw, &mut y)?;
                Tensor::from_cuda(y, c.backend.clone(), s)
            }
        }
    }

    /// `self + other` elementwise (same shapes and device), recorded on no tape: the tape's
    /// gradient accumulation and the body of `Tape::add`. On a GPU two bf16 operands give a bf16
    /// sum (rounded once); mixed element types an f32 sum of the exact values (a bf16 consumer
    /// rounds it, as the CPU emulation's bf16 output node does).
    pub fn add_untracked(&self, other: &Tensor) -> Result<Tensor> {
        if self.shape() != other.shape() {
            bail!(
                Shape,
                "add: shapes {:?} and {:?} differ",
                self.shape(),
                other.shape()
            );
        }
        if self.device() != other.device() {
            bail!(
                Device,
                "add: inputs on different devices: {:?} on {} and {:?} on {} (move them with \
                 Tensor::to_device first)",
                self.shape(),
                self.device(),
                other.shape(),
                other.device()
            );
        }
        match self.storage() {
            Storage::Cpu(a) => {
                use rayon::prelude::*;
                let b = other.cpu()?;
                let mut y = vec![0.0; a.len()];
                y.par_chunks_mut(PAR_CHUNK)
                    .zip(a.par_chunks(PAR_CHUNK).zip(b.par_chunks(PAR_CHUNK)))
                    .for_each(|(y, (a, b))| {
                        for i in 0..y.len() {
                            y[i] = a[i] + b[i];
                        }
                    });
                self.like(y)
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => {
                let (dt, layout) = if self.dtype() == other.dtype() {
                    (self.dtype(), self.layout())
                } else {
                    (DType::F32, Layout::Nchw)
                };
                let (a, b) = (self.to_format(dt, layout)?, other.to_format(dt, layout)?);
                let mut y = c.backend.alloc_dt(dt, a.numel())?.with_layout(layout);
                c.backend.add(&a.cuda()?.buf, &b.cuda()?.buf, &mut y)?;
                Tensor::from_cuda(y, c.backend.clone(), self.shape())
            }
        }
    }

    pub fn id(&self) -> TensorId {
        self.0.id
    }
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    pub fn rank(&self) -> usize {
        self.0.shape.len()
    }
    /// The size of dimension `d`; panics on a bad index (a programming error, not user input).
    pub fn dim(&self, d: usize) -> usize {
        self.0.shape[d]
    }
    pub fn numel(&self) -> usize {
        self.0.shape.iter().product()
    }
    pub fn storage(&self) -> &Storage {
        &self.0.storage
    }
    pub fn device(&self) -> Device {
        self.0.storage.device()
    }
    /// The storage's element type.
    pub fn dtype(&self) -> DType {
        self.0.storage.dtype()
    }
    /// The storage's memory layout.
    pub fn layout(&self) -> Layout {
        self.0.storage.layout()
    }

    /// The host slice of a CPU tensor; an error for other devices.
    pub fn cpu(&self) -> Result<&[f32]> {
        match self.storage() {
            Storage::Cpu(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => bail!(
                Device,
                "a CPU op got a tensor of shape {:?} on cuda:{} (download it with to_vec or \
                 to_device(&Device::Cpu) first)",
                self.shape(),
                c.backend.ordinal()
            ),
        }
    }

    /// Copies the data to a host vector, whatever the device (a GPU tensor waits for the
    /// queued work that writes it).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match self.storage() {
            Storage::Cpu(v) => Ok(v.clone()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => {
                let v = c.backend.download_values(&c.buf)?;
                match c.buf.layout() {
                    Layout::Nchw => Ok(v),
                    Layout::Nhwc => Ok(nhwc_to_nchw_host(&v, self.shape())),
                }
            }
        }
    }

    /// The single value of a one-element tensor.
    pub fn scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            bail!(Shape, "scalar() on a tensor of shape {:?}", self.shape());
        }
        Ok(self.to_vec()?[0])
    }

    /// Same storage, new shape and new id. Not recorded on a tape: use `Tape::reshape` inside a
    /// differentiated computation.
    pub fn reshaped(&self, shape: &[usize]) -> Result<Tensor> {
        if self.layout() == Layout::Nhwc && shape != self.shape() {
            // A channels-last buffer is not row-major in the logical shape: reshape its NCHW copy.
            return self.to_format(self.dtype(), Layout::Nchw)?.reshaped(shape);
        }
        let n: usize = shape.iter().product();
        if n != self.numel() {
            bail!(
                Shape,
                "cannot reshape {:?} ({} elements) to {shape:?}",
                self.shape(),
                self.numel()
            );
        }
        Ok(Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            shape: shape.to_vec(),
            storage: self.0.storage.clone(),
        })))
    }

    /// A copy with a fresh id: the tape sees it as a new leaf with no history.
    pub fn detach(&self) -> Tensor {
        Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            shape: self.0.shape.clone(),
            storage: self.0.storage.clone(),
        }))
    }

    /// Checks the shape, for op argument validation.
    pub fn expect_shape(&self, what: &str, shape: &[usize]) -> Result<()> {
        if self.shape() != shape {
            bail!(
                Shape,
                "{what}: expected shape {shape:?}, got {:?}",
                self.shape()
            );
        }
        Ok(())
    }

    /// Checks the rank, for op argument validation.
    pub fn expect_rank(&self, what: &str, rank: usize) -> Result<()> {
        if self.rank() != rank {
            bail!(
                Shape,
                "{what}: expected a rank-{rank} tensor, got shape {:?}",
                self.shape()
            );
        }
        Ok(())
    }
}

/// An NHWC host copy of a rank-4 tensor of logical shape (N, C, H, W), reordered to NCHW.
#[cfg(feature = "cuda")]
fn nhwc_to_nchw_host(v: &[f32], shape: &[usize]) -> Vec<f32> {
    let (n, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
    let mut out = vec![0.0; v.len()];
    for i in 0..n {
        for p in 0..hw {
            for ch in 0..c {
                out[(i * c + ch) * hw + p] = v[(i * hw + p) * c + ch];
            }
        }
    }
    out
}

/// `x` rounded to the nearest bfloat16 (1 sign, 8 exponent, 7 mantissa bits), ties to even, and
/// widened back to f32: what a GPU stores when it writes `x` to a bf16 buffer. bf16 shares f32's
/// exponent range, so subnormals stay subnormal (rounded at bit 16 like any other value), a
/// value past the largest finite bf16 rounds to infinity, infinities stay, and a NaN stays a
/// (quiet) NaN of the same sign.
pub fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    if x.is_nan() {
        // Adding the rounding bias could carry a NaN's payload into the exponent (or lose it
        // to a zero mantissa): keep the sign and force the quiet bit instead.
        return f32::from_bits((bits | 0x0040_0000) & 0xffff_0000);
    }
    // Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate. A
    // carry out of the mantissa bumps the exponent, which is exactly the correct rounding
    // (up to infinity past the largest finite bf16).
    let lsb = (bits >> 16) & 1;
    f32::from_bits(bits.wrapping_add(0x7fff + lsb) & 0xffff_0000)
}

impl Tensor {
    /// A CPU tensor with every element rounded to bf16 (see [`round_bf16`]); a new id. An error
    /// for a GPU tensor (the bf16 mode is emulated on the CPU only so far).
    pub fn round_bf16(&self) -> Result<Tensor> {
        let v = self.cpu()?;
        self.like(v.iter().map(|&x| round_bf16(x)).collect())
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::nhwc_to_nchw_host;

    // (N, C, H, W) = (2, 3, 2, 2): element (n, c, h, w) is stored NHWC at ((n H + h) W + w) C + c
    // and must land at ((n C + c) H + h) W + w; the values encode their NCHW index.
    #[test]
    fn nhwc_host_copies_reorder_to_nchw() {
        let (n, c, h, w) = (2usize, 3usize, 2usize, 2usize);
        let mut stored = vec![0.0f32; n * c * h * w];
        for i in 0..n {
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let nchw = ((i * c + ch) * h + y) * w + x;
                        stored[((i * h + y) * w + x) * c + ch] = nchw as f32;
                    }
                }
            }
        }
        let out = nhwc_to_nchw_host(&stored, &[n, c, h, w]);
        let want: Vec<f32> = (0..n * c * h * w).map(|v| v as f32).collect();
        assert_eq!(out, want);
    }
}

#[cfg(test)]
mod format_tests {
    use super::{DType, Layout, Tensor};

    // CPU tensors are f32 NCHW: asking for that is the same tensor, anything else is an error
    // that says where bf16 / NHWC storage exists; NHWC is refused for non-4-d shapes and f32.
    #[test]
    fn cpu_formats_and_their_errors() {
        let t = Tensor::from_vec(vec![1.0, -2.5, 3.0, 0.5], &[1, 1, 2, 2]).unwrap();
        assert_eq!((t.dtype(), t.layout()), (DType::F32, Layout::Nchw));
        assert_eq!(t.to_dtype(DType::F32).unwrap().id(), t.id());
        assert_eq!(t.to_format(DType::F32, Layout::Nchw).unwrap().id(), t.id());
        let e = t.to_dtype(DType::Bf16).unwrap_err().to_string();
        assert!(e.contains("GPU"), "{e}");
        let e = t
            .to_format(DType::F32, Layout::Nhwc)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank-4 bf16"), "{e}");
        let flat = Tensor::from_vec(vec![1.0; 6], &[2, 3]).unwrap();
        let e = flat
            .to_format(DType::Bf16, Layout::Nhwc)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank-4 bf16"), "{e}");
        assert_eq!(DType::Bf16.size(), 2);
        assert_eq!(format!("{} {}", DType::Bf16, Layout::Nhwc), "bf16 NHWC");
    }
}
