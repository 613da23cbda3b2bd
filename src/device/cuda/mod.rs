//! The CUDA backend (feature `cuda`): one device, one stream, a caching allocator, the PTX
//! modules that build.rs compiled from `kernels/*.cu`, cuBLAS for matrix products and cuDNN for
//! convolutions.
//!
//! Everything returns `Result`: no driver, no GPU, no cuBLAS/cuDNN library, or out of memory are
//! `Error::Device` with a message saying what is missing, never a panic. (cudarc panics when a
//! dynamically loaded library is absent, so each library's presence is checked before its first
//! call.)
//!
//! Layout: `alloc` (pool + DeviceBuffer), `blas` (row-major gemm over cuBLAS), `dnn` (cuDNN
//! convolutions, per-shape algorithm + workspace cache), `ops` (typed launchers for every
//! kernel), `nvtx` (profiler ranges). NCCL is `device::nccl` (above the collectives, which
//! this backend does not import).

pub mod alloc;
pub mod augment;
pub mod blas;
pub mod dnn;
pub mod kernels;
pub mod nvtx;
pub mod ops;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, CudaContext, CudaFunction, CudaStream, LaunchConfig};

pub use alloc::{DeviceBuffer, Pool, PoolStats};
pub use dnn::{conv_find, conv_tf32, ConvShape};
pub use ops::{CarpLossGpu, CarpLossQueued, LarsPlan, PbarHook, Pool2dShape};

use crate::device::DType;
use crate::error::{Error, Result};

/// Number of CUDA devices, 0 when no driver (libcuda) is installed or it reports none.
pub fn device_count() -> usize {
    // SAFETY: is_culib_present only tries to dlopen libcuda; nothing else is touched.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    if result::init().is_err() {
        return 0;
    }
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}

static POISON: AtomicBool = AtomicBool::new(false);

/// Test aid: while on, every buffer handed out by `alloc_bytes`/`alloc_f32`/`alloc_bf16` (the
/// outputs of every op) is first filled with 0xff bytes, a NaN in f32 and in bf16 alike, so an
/// output element a kernel leaves unwritten shows up as NaN instead of a stale value from the
/// pool. Costs one memset per allocation.
pub fn set_poison_allocations(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

/// The process-wide backend of GPU `ordinal`, opened on first use and shared after: every
/// `Device::Cuda(n)` tensor of the process lives on the same context, stream and pool, so ops
/// never see two backends for one GPU. A failed open is not cached (the next call retries and
/// reports the error again).
pub fn backend(ordinal: usize) -> Result<Arc<CudaBackend>> {
    static BACKENDS: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();
    let map = BACKENDS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = map.get(&ordinal) {
        return Ok(b.clone());
    }
    let b = Arc::new(CudaBackend::new(ordinal)?);
    map.insert(ordinal, b.clone());
    Ok(b)
}

pub(crate) fn driver_err(what: &str, e: result::DriverError) -> Error {
    Error::Device(format!("{what}: {e:?}"))
}

/// A CUDA event with timing, recorded on a backend's stream ([`CudaBackend::timing_event`]).
pub struct TimingEvent(cudarc::driver::CudaEvent);

impl TimingEvent {
    /// GPU milliseconds from this event to `end` (a later one on the same stream). Waits for
    /// `end` to complete.
    pub fn elapsed_ms_to(&self, end: &TimingEvent) -> Result<f64> {
        self.0
            .elapsed_ms(&end.0)
            .map(f64::from)
            .map_err(|e| driver_err("reading a timing event pair", e))
    }
}

/// One GPU: context, stream, allocator, kernels, library handles.
///
/// Field order is drop order: the library handles go first (they may synchronize on the stream
/// when destroyed), then the kernels, the allocator, the stream, and the context last.
pub struct CudaBackend {
    blas: Option<blas::Blas>,
    blas_missing: String,
    dnn: Option<Mutex<dnn::Dnn>>,
    dnn_missing: String,
    funcs: HashMap<&'static str, CudaFunction>,
    pool: Arc<Pool>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    ordinal: usize,
    num_sms: u32,
    name: String,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend(cuda:{}, {})", self.ordinal, self.name)
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal`. Fails with `Error::Device` when there is no CUDA driver, no such
    /// GPU, or the PTX does not load (e.g. a driver older than the PTX's CUDA 13.0).
    /// cuBLAS and cuDNN are optional at this point: their absence is reported when an op
    /// first needs them.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        // SAFETY: only tries to dlopen libcuda.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Device(
                "no CUDA driver (libcuda.so) found: this machine has no NVIDIA driver; use \
                 --device cpu"
                    .into(),
            ));
        }
        result::init().map_err(|e| driver_err("cuInit (is an NVIDIA GPU present?)", e))?;
        let count = CudaContext::device_count().map_err(|e| driver_err("cuDeviceGetCount", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Device(format!(
                "cuda:{ordinal} requested but this machine has {count} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("creating the context", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_err("creating a stream", e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let num_sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| driver_err("reading the multiprocessor count", e))?
            .max(1) as u32;
        // Every entry point of every module, as build.rs read them off the PTX: a kernel the
        // launchers name but the .cu files lost fails here at start-up (and in CI, see the
        // tests below), not mid-step.
        let mut funcs = HashMap::new();
        for (module, ptx, names) in kernels::MODULES {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(*ptx))
                .map_err(|e| {
                    driver_err(
                        &format!(
                            "loading the PTX of kernels/{module}.cu (is the driver older than \
                             CUDA 13.0?)"
                        ),
                        e,
                    )
                })?;
            for &n in names.iter() {
                let f = m
                    .load_function(n)
                    .map_err(|e| driver_err(&format!("kernel {n} in {module}.ptx"), e))?;
                funcs.insert(n, f);
            }
        }
        let pool = Pool::new(ctx.clone());
        let (blas, blas_missing) = match blas::Blas::new(&ctx, &stream) {
            Ok(b) => (Some(b), String::new()),
            Err(e) => (None, e.to_string()),
        };
        let (dnn, dnn_missing) = match dnn::Dnn::new(&ctx, &stream) {
            Ok(d) => (Some(Mutex::new(d)), String::new()),
            Err(e) => (None, e.to_string()),
        };
        Ok(CudaBackend {
            ordinal,
            ctx,
            stream,
            pool,
            funcs,
            blas,
            blas_missing,
            dnn,
            dnn_missing,
            num_sms,
            name,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The GPU's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }
    /// Frees the allocator's cached blocks (e.g. before a phase with different shapes).
    pub fn release_cached(&self) -> Result<()> {
        self.pool.release_cached()
    }

    /// A timing event recorded on the stream now (after the work queued so far); two of them
    /// give the GPU time between them (`TimingEvent::elapsed_ms_to`) without a wait at
    /// recording time.
    pub fn timing_event(&self) -> Result<TimingEvent> {
        let ev = self
            .stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| driver_err("recording a timing event", e))?;
        Ok(TimingEvent(ev))
    }

    /// Waits for all queued work; surfaces asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("stream synchronize (a kernel failed?)", e))
    }

    /// Uninitialized device memory for `bytes` bytes (labelled f32), from the pool (NaN-filled
    /// while [`set_poison_allocations`] is on).
    pub fn alloc_bytes(&self, bytes: usize) -> Result<DeviceBuffer> {
        self.alloc_typed(bytes, DType::F32)
    }
    fn alloc_typed(&self, bytes: usize, dtype: DType) -> Result<DeviceBuffer> {
        let b = self.pool.alloc_typed(bytes, dtype)?;
        if POISON.load(Ordering::Relaxed) && bytes > 0 {
            self.bind()?;
            // SAFETY: the buffer is live and holds `bytes` bytes; stream-ordered like its users.
            unsafe { result::memset_d8_async(b.ptr(), 0xff, bytes, self.stream.cu_stream()) }
                .map_err(|e| driver_err("poisoning a new buffer", e))?;
        }
        Ok(b)
    }
    /// Uninitialized room for `n` f32 values.
    pub fn alloc_f32(&self, n: usize) -> Result<DeviceBuffer> {
        self.alloc_bytes(n * 4)
    }
    /// Uninitialized room for `n` bf16 values.
    pub fn alloc_bf16(&self, n: usize) -> Result<DeviceBuffer> {
        self.alloc_typed(n * 2, DType::Bf16)
    }
    /// Uninitialized room for `n` values of `dtype` (an op's output takes its input's type).
    pub fn alloc_dt(&self, dtype: DType, n: usize) -> Result<DeviceBuffer> {
        self.alloc_typed(n * dtype.size(), dtype)
    }
    /// `n` f32 zeros.
    pub fn zeros_f32(&self, n: usize) -> Result<DeviceBuffer> {
        let mut b = self.alloc_f32(n)?;
        self.fill(&mut b, 0.0)?;
        Ok(b)
    }

    /// Makes this backend's context current on the calling thread (before a call that uses
    /// the current device, such as creating an NCCL communicator).
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("binding the CUDA context", e))
    }

    fn htod<T: Copy>(&self, host: &[T]) -> Result<DeviceBuffer> {
        let buf = self.alloc_bytes(std::mem::size_of_val(host))?;
        if !host.is_empty() {
            self.bind()?;
            // SAFETY: buf holds at least size_of_val(host) bytes; the copy is waited for before
            // `host` can go away, so the async read of host memory stays valid.
            unsafe { result::memcpy_htod_async(buf.ptr(), host, self.stream.cu_stream()) }
                .map_err(|e| driver_err("host-to-device copy", e))?;
            self.synchronize()?;
        }
        Ok(buf)
    }

    fn dtoh<T: Copy + Default>(&self, buf: &DeviceBuffer, n: usize) -> Result<Vec<T>> {
        if n * std::mem::size_of::<T>() > buf.bytes() {
            return Err(Error::Device(format!(
                "device-to-host copy of {n} elements from a buffer of {} bytes",
                buf.bytes()
            )));
        }
        let mut host = vec![T::default(); n];
        if n > 0 {
            self.bind()?;
            // SAFETY: host has room for n elements, the buffer holds at least as many bytes;
            // we wait for the copy before returning host.
            unsafe { result::memcpy_dtoh_async(&mut host, buf.ptr(), self.stream.cu_stream()) }
                .map_err(|e| driver_err("device-to-host copy", e))?;
            self.synchronize()?;
        }
        Ok(host)
    }

    /// Copies f32 values to a new device buffer.
    pub fn upload_f32(&self, host: &[f32]) -> Result<DeviceBuffer> {
        self.htod(host)
    }
    /// Copies i32 values (permutations, indices) to a new device buffer.
    pub fn upload_i32(&self, host: &[i32]) -> Result<DeviceBuffer> {
        self.htod(host)
    }
    /// Copies the buffer's f32 contents back (all of it).
    pub fn download_f32(&self, buf: &DeviceBuffer) -> Result<Vec<f32>> {
        if buf.dtype() != DType::F32 {
            return Err(Error::Device(format!(
                "download_f32 of a {} buffer (use download_values)",
                buf.dtype()
            )));
        }
        self.dtoh(buf, buf.bytes() / 4)
    }
    /// Copies the buffer's values back as f32 (all of it): a bf16 buffer is widened on the host
    /// (exactly: every bf16 value is an f32 value).
    pub fn download_values(&self, buf: &DeviceBuffer) -> Result<Vec<f32>> {
        match buf.dtype() {
            DType::F32 => self.download_f32(buf),
            DType::Bf16 => {
                let raw: Vec<u16> = self.dtoh(buf, buf.len())?;
                Ok(raw
                    .into_iter()
                    .map(|b| f32::from_bits(u32::from(b) << 16))
                    .collect())
            }
        }
    }
    /// Copies the buffer's i32 contents back (all of it).
    pub fn download_i32(&self, buf: &DeviceBuffer) -> Result<Vec<i32>> {
        self.dtoh(buf, buf.bytes() / 4)
    }
    /// Overwrites a device buffer with host values (same byte length).
    pub fn copy_from_host_f32(&self, dst: &mut DeviceBuffer, host: &[f32]) -> Result<()> {
        if std::mem::size_of_val(host) != dst.bytes() {
            return Err(Error::Device(format!(
                "copy of {} f32 values into a buffer of {} bytes",
                host.len(),
                dst.bytes()
            )));
        }
        if host.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: sizes checked above; waited for before `host` can go away.
        unsafe { result::memcpy_htod_async(dst.ptr(), host, self.stream.cu_stream()) }
            .map_err(|e| driver_err("host-to-device copy", e))?;
        self.synchronize()
    }
    /// Device-to-device copy of a whole buffer into another of the same size.
    pub fn copy_dtod(&self, src: &DeviceBuffer, dst: &mut DeviceBuffer) -> Result<()> {
        if src.bytes() != dst.bytes() {
            return Err(Error::Device(format!(
                "device copy of {} bytes into {} bytes",
                src.bytes(),
                dst.bytes()
            )));
        }
        if src.bytes() == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both buffers are live and hold `bytes` bytes; stream-ordered.
        unsafe {
            result::memcpy_dtod_async(dst.ptr(), src.ptr(), src.bytes(), self.stream.cu_stream())
        }
        .map_err(|e| driver_err("device-to-device copy", e))
    }

    /// Device-to-device copy of `bytes` bytes from `src` at byte offset `src_off` into `dst` at
    /// `dst_off` (gathering views of a flat buffer into tensors and back), stream-ordered.
    pub fn copy_dtod_range(
        &self,
        src: &DeviceBuffer,
        src_off: usize,
        dst: &mut DeviceBuffer,
        dst_off: usize,
        bytes: usize,
    ) -> Result<()> {
        if src_off + bytes > src.bytes() || dst_off + bytes > dst.bytes() {
            return Err(Error::Device(format!(
                "device copy of {bytes} bytes from offset {src_off} of a {}-byte buffer to \
                 offset {dst_off} of a {}-byte buffer",
                src.bytes(),
                dst.bytes()
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges lie inside live buffers (checked above); stream-ordered.
        unsafe {
            result::memcpy_dtod_async(
                dst.ptr() + dst_off as u64,
                src.ptr() + src_off as u64,
                bytes,
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| driver_err("device-to-device copy", e))
    }

    pub(crate) fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| Error::Device(format!("kernel {name} not loaded")))
    }

    /// A 1-d grid for a grid-stride kernel over `n` elements: enough blocks to fill the GPU
    /// (32 per multiprocessor), no more than the elements need.
    pub(crate) fn grid_1d(&self, n: usize, threads: u32) -> LaunchConfig {
        let want = n.div_ceil(threads as usize).max(1);
        let cap = (self.num_sms as usize) * 32;
        LaunchConfig {
            grid_dim: (want.min(cap) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(crate) fn blas(&self) -> Result<&blas::Blas> {
        self.blas
            .as_ref()
            .ok_or_else(|| Error::Device(format!("cuBLAS is not available: {}", self.blas_missing)))
    }

    pub(crate) fn dnn(&self) -> Result<std::sync::MutexGuard<'_, dnn::Dnn>> {
        let m = self.dnn.as_ref().ok_or_else(|| {
            Error::Device(format!("cuDNN is not available: {}", self.dnn_missing))
        })?;
        Ok(m.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Launches kernel `$name` with config `$cfg` and the listed arguments (device pointers as
/// u64, sizes as i64/i32, scalars as f32). Every argument must be a local of the exact type the
/// kernel declares.
macro_rules! launch {
    ($be:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let f = $be.func($name)?;
        let mut b = $be.stream().launch_builder(f);
        $( b.arg(&$arg); )*
        // SAFETY: the argument list matches the kernel's signature in kernels/*.cu (checked by
        // the typed launcher that calls this), and every pointer is a live pool buffer whose
        // size the launcher checked against the kernel's index range.
        unsafe { b.launch($cfg) }
            .map_err(|e| $crate::device::cuda::driver_err(&format!("launching {}", $name), e))?;
    }};
}
pub(crate) use launch;

#[cfg(test)]
mod tests {
    use super::kernels::MODULES;

    /// One `launch!` call in a launcher source: where it starts, the kernels it may launch
    /// (`&kname("base", dt)` may launch base_f32 or base_bf16) and its arguments, the macro's
    /// (self, name, cfg) included.
    struct LaunchCall {
        start: usize,
        names: Vec<String>,
        args: Vec<String>,
    }

    /// The launch! calls of a launcher source. A kernel named by a variable is skipped (its
    /// callers are checked where they name it), as is the macro's own definition.
    fn launch_calls(src: &str) -> Vec<LaunchCall> {
        let mut out = Vec::new();
        let mut from = 0;
        while let Some(at) = src[from..].find("launch!(") {
            let start = from + at;
            from = start + "launch!(".len();
            let body = &src[from..];
            // The arguments up to the matching ')'.
            let mut depth = 0i32;
            let mut close = body.len();
            for (i, ch) in body.char_indices() {
                match ch {
                    '(' | '[' => depth += 1,
                    ')' | ']' if depth == 0 => {
                        close = i;
                        break;
                    }
                    ')' | ']' => depth -= 1,
                    _ => {}
                }
            }
            let args = split_top(&body[..close]);
            if args.len() < 3 || args[0].starts_with('$') {
                continue;
            }
            let name = &args[1];
            let names = if let Some(lit) = name.strip_prefix('"') {
                vec![lit.trim_end_matches('"').to_string()]
            } else if let Some(k) = name.strip_prefix("&kname(\"") {
                let base = &k[..k.find('"').unwrap_or(0)];
                vec![format!("{base}_f32"), format!("{base}_bf16")]
            } else {
                continue;
            };
            out.push(LaunchCall { start, names, args });
        }
        out
    }

    // Every launch! in the launchers passes as many arguments as its kernel declares (a kernel
    // whose signature changed without its launcher, or the wrong variant's argument list, fails
    // here in CI instead of as a garbled launch on a GPU). Both instantiations of a typed kernel
    // are checked, and each launched name must exist in the PTX.
    #[test]
    fn launch_argument_counts_match_the_kernels() {
        let mut checked = 0;
        for src in LAUNCHERS {
            for LaunchCall { names, args, .. } in launch_calls(src) {
                let nargs = args.len() - 3;
                let mut found = false;
                for n in &names {
                    if let Some(params) = ptx_param_types(n) {
                        found = true;
                        assert_eq!(
                            params.len(),
                            nargs,
                            "launch of {n} passes {nargs} arguments, the kernel takes {}",
                            params.len()
                        );
                        checked += 1;
                    }
                }
                assert!(found, "launched kernel {names:?} is not in the PTX");
            }
        }
        assert!(
            checked > 40,
            "only {checked} launches found: the parser missed them"
        );
    }

    /// The PTX parameter types of kernel `name` (`u64`, `u32`, `f32`, or the first word of an
    /// aggregate such as `align`), or None when no module declares it.
    fn ptx_param_types(name: &str) -> Option<Vec<String>> {
        let head = format!(".entry {name}(");
        for (_, ptx, _) in MODULES {
            if let Some(at) = ptx.find(&head) {
                let rest = &ptx[at + head.len()..];
                let end = rest.find(')')?;
                return Some(
                    rest[..end]
                        .lines()
                        .filter_map(|l| l.trim().strip_prefix(".param ."))
                        .map(|t| t.split_whitespace().next().unwrap_or("").to_string())
                        .collect(),
                );
            }
        }
        None
    }

    /// `s` split at its top-level commas (not inside (), [], {} or a closure's |..|).
    fn split_top(s: &str) -> Vec<String> {
        let (mut depth, mut out, mut cur) = (0i32, Vec::new(), String::new());
        for ch in s.chars() {
            match ch {
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(std::mem::take(&mut cur).trim().to_string());
                    continue;
                }
                _ => {}
            }
            cur.push(ch);
        }
        if !cur.trim().is_empty() {
            out.push(cur.trim().to_string());
        }
        out
    }

    /// The PTX type class an expression binds (`u64` for device pointers and i64 sizes, `u32`
    /// for i32, `f32`), following plain aliases back through `before`; None if unknown.
    fn class_of(expr: &str, before: &str, depth: u32) -> Option<&'static str> {
        let e = expr.trim();
        if e.contains("ptr()")
            || e.contains("i64_of(")
            || e.contains("as i64")
            || e.contains("as u64")
        {
            return Some("u64");
        }
        if e.contains("i32_of(") || e.contains("as i32") || e.contains("i32::from") {
            return Some("u32");
        }
        if e.ends_with("f32") || e.starts_with("*") && depth > 0 {
            // `x: f32` parameters, `1.0f32` literals; `*norm` (an aggregate) is skipped by the
            // caller through the kernel's type.
            return if e.ends_with("f32") {
                Some("f32")
            } else {
                None
            };
        }
        if depth < 4 && !e.is_empty() && e.chars().all(|c| c.is_alphanumeric() || c == '_') {
            return binding_class(e, before, depth + 1);
        }
        None
    }

    /// The type class of the nearest binding of `name` in `before` (a `let`, simple or tuple,
    /// including `if .. { (a, b) } else { (c, d) }` tuples, or an `name: f32` parameter).
    fn binding_class(name: &str, before: &str, depth: u32) -> Option<&'static str> {
        let lines: Vec<&str> = before.lines().collect();
        for k in (0..lines.len()).rev() {
            let line = lines[k];
            for pat in [format!("({name}: f32"), format!(" {name}: f32")] {
                if line.contains(&pat) {
                    return Some("f32");
                }
            }
            if line.trim_start().starts_with(&format!("{name}: f32")) {
                return Some("f32");
            }
            let Some(at) = line.find("let ") else {
                continue;
            };
            let after = &line[at + 4..];
            let Some(eq) = after.find(" = ") else {
                continue;
            };
            let pat = after[..eq].trim().trim_start_matches("mut ").trim();
            let pat = pat.split(':').next().unwrap_or("").trim();
            let names: Vec<String> = if let Some(t) = pat.strip_prefix('(') {
                split_top(t.trim_end_matches(')'))
                    .iter()
                    .map(|n| n.trim_start_matches("mut ").to_string())
                    .collect()
            } else {
                vec![pat.to_string()]
            };
            let Some(idx) = names.iter().position(|n| n == name) else {
                continue;
            };
            // The whole statement, to its ';'.
            let mut stmt = after[eq + 3..].to_string();
            let mut j = k + 1;
            while !stmt.contains(';') && j < lines.len() {
                stmt.push(' ');
                stmt.push_str(lines[j].trim());
                j += 1;
            }
            let rhs = stmt[..stmt.rfind(';').unwrap_or(stmt.len())]
                .trim()
                .to_string();
            let prior = lines[..k].join("\n");
            if names.len() == 1 {
                return class_of(&rhs, &prior, depth);
            }
            // Tuples: the literal one, or each branch's of an if/else.
            let mut tuples = Vec::new();
            let mut rest = rhs.as_str();
            if !rest.starts_with("if ") {
                let inner = rest.strip_prefix('(').and_then(|r| r.strip_suffix(')'));
                tuples.push(inner.unwrap_or(rest).to_string());
            } else {
                while let Some(o) = rest.find("{ (") {
                    let body = &rest[o + 3..];
                    let close = body.find(") }").unwrap_or(body.len());
                    tuples.push(body[..close].to_string());
                    rest = &body[close..];
                }
            }
            for t in tuples {
                let parts = split_top(&t);
                if parts.len() == names.len() {
                    if let Some(c) = class_of(&parts[idx], &prior, depth) {
                        return Some(c);
                    }
                }
            }
            return None;
        }
        None
    }

    // Every launch! passes each argument in the width and kind its kernel declares: a device
    // pointer or i64 size where the PTX has .u64, an i32 where it has .u32 (an `int`), an f32
    // where it has .f32 (the count test cannot see a usize or i32 passed for a long long, or an
    // i64 for an int: those launch with shifted, garbled arguments). Each argument's type is read
    // from its binding in the launcher (`x.ptr()`, `i64_of(..)`, `i32_of(..)?`, `.. as i32`,
    // an `f32` parameter); an argument whose binding cannot be read fails the test, so new
    // launchers keep to those forms. Aggregates (the augment kernels' structs) are skipped.
    #[test]
    fn launch_argument_types_match_the_kernels() {
        let mut checked = 0;
        for src in LAUNCHERS {
            for LaunchCall { start, names, args } in launch_calls(src) {
                let before = &src[..start];
                for n in &names {
                    let Some(types) = ptx_param_types(n) else {
                        continue;
                    };
                    assert_eq!(types.len(), args.len() - 3, "argument count of {n}");
                    for (i, (arg, ty)) in args[3..].iter().zip(&types).enumerate() {
                        if !matches!(ty.as_str(), "u64" | "u32" | "f32") {
                            continue; // an aggregate passed by value
                        }
                        let got = class_of(arg, before, 0);
                        assert_eq!(
                            got,
                            Some(ty.as_str()),
                            "launch of {n}: argument {i} `{arg}` is {got:?}, the kernel \
                             declares .{ty}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(
            checked > 300,
            "only {checked} arguments checked: the parser missed them"
        );
    }

    /// The launcher sources, whose kernel names the tests check against the PTX.
    const LAUNCHERS: [&str; super::ops::SOURCES.len()] = super::ops::SOURCES;

    /// Whether some module's PTX declares entry point `name`.
    fn is_entry(name: &str) -> bool {
        MODULES.iter().any(|(_, _, names)| names.contains(&name))
    }

    // build.rs's list of each module's entry points is what the PTX declares: an independent
    // count of `.entry` directives agrees, and every listed name heads one.
    #[test]
    fn module_entry_lists_match_the_ptx() {
        assert!(!MODULES.is_empty(), "build.rs listed no module");
        for (module, ptx, names) in MODULES {
            assert!(!names.is_empty(), "{module}: no entry point listed");
            assert_eq!(
                ptx.matches(".entry ").count(),
                names.len(),
                "{module}: entry count"
            );
            for n in names.iter() {
                assert!(
                    ptx.contains(&format!(".entry {n}(")),
                    "{n} is listed for {module} but not declared in {module}.ptx"
                );
            }
        }
    }

    // Every kernel name the launchers spell, whether passed to launch! directly or bound to a
    // variable first (`"..._f32"` / `"..._bf16"` literals, `kname("base", dt)`), is an entry
    // point of the compiled PTX: a kernel renamed or dropped in a .cu file fails here, in CI,
    // instead of when a GPU first launches it.
    #[test]
    fn every_kernel_the_launchers_name_is_in_the_compiled_ptx() {
        let mut checked = 0;
        for src in LAUNCHERS {
            for lit in src.split('"').skip(1).step_by(2) {
                let ident =
                    !lit.is_empty() && lit.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if ident && (lit.ends_with("_f32") || lit.ends_with("_bf16")) {
                    assert!(is_entry(lit), "kernel {lit} is named but not in the PTX");
                    checked += 1;
                }
            }
            for part in src.split("kname(\"").skip(1) {
                let base = &part[..part.find('"').unwrap_or(0)];
                assert!(
                    is_entry(&format!("{base}_f32")) || is_entry(&format!("{base}_bf16")),
                    "kname({base:?}, ..) names no kernel of the PTX"
                );
                checked += 1;
            }
        }
        assert!(
            checked > 60,
            "only {checked} kernel names found: the scan missed them"
        );
    }
}
