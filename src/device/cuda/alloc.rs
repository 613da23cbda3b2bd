//! A caching device allocator: freed blocks go to per-size free lists and are handed out again,
//! so a training step with static shapes calls `cuMemAlloc` only during its first iteration.
//!
//! All work runs on the backend's one stream, so a block returned to the pool while kernels
//! that use it are still queued is safe to hand out again: the next user's work is queued
//! behind them (stream order). A second stream would need an event per block.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext};

use crate::device::{DType, Layout};
use crate::error::{Error, Result};

/// Rounds a request up to its bucket: 512-byte steps below 1 MiB, above that steps of 1/8 of
/// the enclosing power of two (at most 12.5% waste). Equal requests share a bucket, which is
/// all that static shapes need.
pub fn bucket_size(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes < (1 << 20) {
        return bytes.div_ceil(512) * 512;
    }
    let pow = usize::BITS - 1 - bytes.leading_zeros(); // 2^pow <= bytes
    let step = 1usize << (pow - 3);
    bytes.div_ceil(step) * step
}

/// Counters for tests and the benchmark (is the steady state free of cudaMalloc?).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Calls to cuMemAlloc so far.
    pub device_allocs: u64,
    /// Requests served from a free list.
    pub reuses: u64,
    /// Bytes held in live buffers (bucket sizes).
    pub bytes_in_use: usize,
    /// Bytes held in free lists.
    pub bytes_cached: usize,
    /// The largest `bytes_in_use` so far (the working set's high-water mark).
    pub peak_bytes_in_use: usize,
    /// The largest `bytes_in_use + bytes_cached` so far: device memory the pool held from
    /// the driver at its peak (what `nvidia-smi` would show, less the context's own).
    pub peak_device_bytes: usize,
    /// Bytes live buffers asked for (before rounding to buckets).
    pub bytes_requested: usize,
    /// The largest `bytes_requested` so far: what the tensors needed at once, the measure
    /// PyTorch's `max_memory_allocated` gives (it rounds requests to 512 bytes only).
    pub peak_bytes_requested: usize,
}

impl PoolStats {
    fn note_alloc(&mut self, cap: usize, bytes: usize) {
        self.bytes_in_use += cap;
        self.bytes_requested += bytes;
        self.peak_bytes_requested = self.peak_bytes_requested.max(self.bytes_requested);
        self.note_peaks();
    }

    fn note_peaks(&mut self) {
        self.peak_bytes_in_use = self.peak_bytes_in_use.max(self.bytes_in_use);
        self.peak_device_bytes = self
            .peak_device_bytes
            .max(self.bytes_in_use + self.bytes_cached);
    }
}

#[derive(Default)]
struct PoolInner {
    free: HashMap<usize, Vec<sys::CUdeviceptr>>,
    stats: PoolStats,
}

/// The pool; shared (`Arc`) by the backend and every live buffer.
pub struct Pool {
    ctx: Arc<CudaContext>,
    inner: Mutex<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({:?})", self.stats())
    }
}

fn driver_err(what: &str, e: result::DriverError) -> Error {
    Error::Device(format!("{what}: {e:?}"))
}

impl Pool {
    pub fn new(ctx: Arc<CudaContext>) -> Arc<Pool> {
        Arc::new(Pool {
            ctx,
            inner: Mutex::new(PoolInner::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        // A poisoned lock only means another thread panicked mid-update of plain counters and
        // lists of pointers; they stay usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> PoolStats {
        self.lock().stats
    }

    /// A buffer of at least `bytes` bytes (contents undefined), labelled f32.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        self.alloc_typed(bytes, DType::F32)
    }

    /// A buffer of at least `bytes` bytes (contents undefined) holding elements of `dtype`.
    pub fn alloc_typed(self: &Arc<Self>, bytes: usize, dtype: DType) -> Result<DeviceBuffer> {
        let cap = bucket_size(bytes);
        {
            let mut inner = self.lock();
            if let Some(ptr) = inner.free.get_mut(&cap).and_then(|v| v.pop()) {
                inner.stats.reuses += 1;
                inner.stats.bytes_cached -= cap;
                inner.stats.note_alloc(cap, bytes);
                return Ok(DeviceBuffer {
                    ptr,
                    bytes,
                    cap,
                    dtype,
                    layout: Layout::Nchw,
                    pool: self.clone(),
                });
            }
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("binding the CUDA context", e))?;
        // SAFETY: cuMemAlloc with a valid, current context; the memory is only used through
        // the returned buffer and freed once (Pool::release_cached or Pool's drop).
        let ptr = match unsafe { result::malloc_sync(cap) } {
            Ok(p) => p,
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                // Give the cached blocks back to the driver and try once more.
                self.release_cached()?;
                // SAFETY: as above.
                unsafe { result::malloc_sync(cap) }.map_err(|_| {
                    let s = self.stats();
                    Error::Device(format!(
                        "out of GPU memory allocating {:.1} MiB ({:.1} MiB in use by live \
                         buffers); lower the batch size",
                        cap as f64 / (1 << 20) as f64,
                        s.bytes_in_use as f64 / (1 << 20) as f64
                    ))
                })?
            }
            Err(e) => return Err(driver_err(&format!("cuMemAlloc({cap} bytes)"), e)),
        };
        let mut inner = self.lock();
        inner.stats.device_allocs += 1;
        inner.stats.note_alloc(cap, bytes);
        Ok(DeviceBuffer {
            ptr,
            bytes,
            cap,
            dtype,
            layout: Layout::Nchw,
            pool: self.clone(),
        })
    }

    /// Frees every cached (unused) block back to the driver. Waits for the device first, since
    /// queued kernels may still use a block that went back to its free list.
    pub fn release_cached(&self) -> Result<()> {
        self.ctx
            .synchronize()
            .map_err(|e| driver_err("cuCtxSynchronize", e))?;
        let mut inner = self.lock();
        let lists: Vec<(usize, Vec<sys::CUdeviceptr>)> = inner.free.drain().collect();
        for (cap, ptrs) in lists {
            for p in ptrs {
                // SAFETY: p came from cuMemAlloc, sits in a free list (no live buffer holds
                // it) and the device is idle.
                unsafe { result::free_sync(p) }.map_err(|e| driver_err("cuMemFree", e))?;
                inner.stats.bytes_cached -= cap;
            }
        }
        Ok(())
    }

    fn give_back(&self, ptr: sys::CUdeviceptr, cap: usize, bytes: usize) {
        let mut inner = self.lock();
        inner.stats.bytes_in_use -= cap;
        inner.stats.bytes_requested -= bytes;
        inner.stats.bytes_cached += cap;
        inner.free.entry(cap).or_default().push(ptr);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Every live buffer holds an Arc<Pool>, so only cached blocks are left here.
        if self.ctx.bind_to_thread().is_err() || self.ctx.synchronize().is_err() {
            return; // the context is gone; the driver reclaims its memory
        }
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, ptrs) in inner.free.drain() {
            for p in ptrs {
                // SAFETY: as in release_cached; errors at teardown are ignored on purpose.
                let _ = unsafe { result::free_sync(p) };
            }
        }
    }
}

/// Device memory from the pool; returns to the pool when dropped. The bytes carry an element
/// type label, f32 (also used for 4-byte int32 buffers such as argmax and permutations) or bf16,
/// and a layout label (NCHW or NHWC) for rank-4 activations. Launchers pick the kernel by them
/// and refuse a buffer no kernel of theirs reads.
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    cap: usize,
    dtype: DType,
    layout: Layout,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer({:#x}, {} bytes, {} {})",
            self.ptr, self.bytes, self.dtype, self.layout
        )
    }
}

impl DeviceBuffer {
    /// The device address (a kernel argument).
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }
    /// Requested size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Number of 4-byte elements (f32 or i32), whatever the label.
    pub fn len32(&self) -> usize {
        self.bytes / 4
    }
    /// The element type label.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The memory layout label of a rank-4 activation (NCHW unless an NHWC op wrote it).
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// The same buffer labelled with `layout` (set by whoever writes it in that layout).
    pub fn with_layout(mut self, layout: Layout) -> DeviceBuffer {
        self.layout = layout;
        self
    }
    /// Number of elements of its element type.
    pub fn len(&self) -> usize {
        self.bytes / self.dtype.size()
    }
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.pool.give_back(self.ptr, self.cap, self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::bucket_size;

    #[test]
    fn buckets_cover_the_request_with_bounded_waste() {
        for &b in &[
            1usize,
            511,
            512,
            513,
            4096,
            (1 << 20) - 1,
            1 << 20,
            3_000_001,
            1 << 30,
        ] {
            let c = bucket_size(b);
            assert!(c >= b, "{b} -> {c}");
            assert!(c as f64 <= (b as f64) * 1.125 + 512.0, "{b} -> {c}");
        }
        assert_eq!(bucket_size(1000), bucket_size(1000));
        assert_eq!(bucket_size(1), 512);
    }
}
