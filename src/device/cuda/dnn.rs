//! cuDNN convolutions (f32 NCHW, or bf16 data with f32 accumulation in NCHW or NHWC): forward,
//! backward-data, backward-filter. For every distinct shape the descriptors, the three
//! algorithms and their workspace sizes are chosen once and cached; one workspace buffer, grown to the largest need, serves every call. The algorithms
//! are timed with `cudnnFind*` (the fastest that runs within the workspace limit with a math
//! type the mode allows, then run with the math type it was timed with), or, with
//! `--cudnn-find off` or when the search fails, cuDNN's heuristic first choice.
//!
//! Math mode: TF32 tensor cores allowed by default, as PyTorch does for cuDNN convolutions
//! (`torch.backends.cudnn.allow_tf32 = True`), so "f32" comparisons with it are like for like.
//! The run option `tf32` off (`--tf32 off`; the GPU-vs-CPU tests set it too) selects
//! FMA-only math, whose results match the CPU reference to f32 rounding. Plans are cached per
//! (shape, math mode, element type); bf16 plans use tensor-op math whatever the TF32 switch.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cudnn::{result as dr, sys as ds};
use cudarc::driver::{CudaContext, CudaStream};

use super::{CudaBackend, DeviceBuffer};
use crate::device::{DType, Layout};
use crate::error::{Error, Result};

/// Whether convolutions of f32 tensors may use TF32 tensor cores (run option `tf32`), for
/// plans made from now on.
pub fn conv_tf32() -> bool {
    crate::options::current().tf32.on()
}

/// Whether plans time the candidate algorithms (`cudnnFind*`, once per shape) instead of taking
/// cuDNN's heuristic first choice (run option `cudnn_find`). A failed search (e.g. cuDNN cannot
/// allocate its trial buffers) falls back to the heuristic choice.
pub fn conv_find() -> bool {
    crate::options::current().cudnn_find.on()
}

/// The fastest timed result that succeeded within the workspace limit with a math type the
/// mode allows (cudnnFind* returns them fastest first), as (algorithm, math type), or None when
/// the search failed or found nothing usable.
macro_rules! fastest {
    ($status:expr, $n:expr, $perf:expr, $tf32:expr, $limit:expr) => {{
        let ok = ds::cudnnStatus_t::CUDNN_STATUS_SUCCESS;
        if $status != ok {
            None
        } else {
            $perf[..($n.max(0) as usize).min($perf.len())]
                .iter()
                .find(|p| p.status == ok && p.memory <= $limit && math_ok(p.mathType, $tf32))
                .map(|p| (p.algo, p.mathType))
        }
    }};
}

/// Whether a cudnnFind* result's math type may run in this mode: FMA-only mode takes only FMA
/// math; TF32 mode takes default, tensor-op (TF32 for f32 data) or FMA math but not
/// ALLOW_CONVERSION (down-conversion to half precision, below what PyTorch's TF32 does).
fn math_ok(m: ds::cudnnMathType_t, tf32: bool) -> bool {
    use ds::cudnnMathType_t as M;
    if tf32 {
        m != M::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION
    } else {
        m == M::CUDNN_FMA_MATH
    }
}

/// Largest workspace an algorithm may ask for, unless the convolution's input or output is
/// larger (`workspace_limit`).
const WORKSPACE_LIMIT: usize = 1 << 30;

/// The workspace an algorithm of convolution `s` may ask for: 1 GiB, or the bytes of its larger
/// operand (x or y) when that is more. A fixed 1 GiB kept batch 256 under the memory
/// target (its largest bf16 activation is 0.8 GB: the limit is unchanged there), but at batch
/// 1024 (3.3 GB activations) it can exclude the algorithms that scale their workspace with the
/// batch; the backward of that step ran 12x slower than 4x the batch-256 one on an H200. PyTorch
/// lets cuDNN take whatever memory is free.
fn workspace_limit(s: &ConvShape, dt: DType) -> Result<usize> {
    let (ho, wo) = s.out_hw()?;
    let x = s.n * s.c * s.h * s.w;
    let y = s.n * s.o * ho * wo;
    Ok(WORKSPACE_LIMIT.max(x.max(y) * dt.size()))
}

/// A 2-d convolution: x (n, c, h, w), weights (o, c, kh, kw), no bias, the same stride and
/// zero padding in both directions; y (n, o, ho, wo) with ho = (h + 2 padding - kh) / stride + 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    /// (ho, wo), or a shape error naming the sizes.
    pub fn out_hw(&self) -> Result<(usize, usize)> {
        let ok = self.stride > 0
            && self.n > 0
            && self.c > 0
            && self.o > 0
            && self.kh > 0
            && self.kw > 0
            && self.h + 2 * self.padding >= self.kh
            && self.w + 2 * self.padding >= self.kw;
        if !ok {
            return Err(Error::Shape(format!("conv2d: invalid shape {self:?}")));
        }
        Ok((
            (self.h + 2 * self.padding - self.kh) / self.stride + 1,
            (self.w + 2 * self.padding - self.kw) / self.stride + 1,
        ))
    }
    pub fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn w_len(&self) -> usize {
        self.o * self.c * self.kh * self.kw
    }
    pub fn y_len(&self) -> Result<usize> {
        let (ho, wo) = self.out_hw()?;
        Ok(self.n * self.o * ho * wo)
    }
}

fn dnn_err(what: &str, e: dr::CudnnError) -> Error {
    Error::Device(format!("cuDNN {what}: {e:?}"))
}

fn c_int(x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::Shape(format!("conv2d: size {x} exceeds i32")))
}

struct TensorDesc(ds::cudnnTensorDescriptor_t);
impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created once by cudnnCreateTensorDescriptor, destroyed once here.
        let _ = unsafe { dr::destroy_tensor_descriptor(self.0) };
    }
}
struct FilterDesc(ds::cudnnFilterDescriptor_t);
impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { dr::destroy_filter_descriptor(self.0) };
    }
}
struct ConvDesc(ds::cudnnConvolutionDescriptor_t);
impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { dr::destroy_convolution_descriptor(self.0) };
    }
}

/// cuDNN's data type for an element type.
fn cudnn_type(dt: DType) -> ds::cudnnDataType_t {
    match dt {
        DType::F32 => ds::cudnnDataType_t::CUDNN_DATA_FLOAT,
        DType::Bf16 => ds::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
    }
}

/// cuDNN's tensor format for a layout (the filter of an NHWC convolution is (O, KH, KW, C)).
fn cudnn_format(layout: Layout) -> ds::cudnnTensorFormat_t {
    match layout {
        Layout::Nchw => ds::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        Layout::Nhwc => ds::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
    }
}

/// A 4-d tensor descriptor; `dims` is the logical (n, c, h, w) whatever the layout.
fn tensor_desc(dims: [usize; 4], dt: DType, layout: Layout) -> Result<TensorDesc> {
    let d = TensorDesc(dr::create_tensor_descriptor().map_err(|e| dnn_err("tensor desc", e))?);
    let dims = [
        c_int(dims[0])?,
        c_int(dims[1])?,
        c_int(dims[2])?,
        c_int(dims[3])?,
    ];
    // SAFETY: d.0 was just created.
    unsafe { dr::set_tensor4d_descriptor(d.0, cudnn_format(layout), cudnn_type(dt), dims) }
        .map_err(|e| dnn_err("set tensor desc", e))?;
    Ok(d)
}

/// Everything one shape needs, chosen once.
struct Plan {
    x: TensorDesc,
    y: TensorDesc,
    w: FilterDesc,
    conv: ConvDesc,
    // (algorithm, workspace bytes, math type): the math type the algorithm was timed with
    // (cudnnFind* reports it per result; cuDNN runs the algorithm with the descriptor's, so it
    // is set on `conv` before each call), else the mode's.
    fwd: (ds::cudnnConvolutionFwdAlgo_t, usize, ds::cudnnMathType_t),
    bwd_data: (
        ds::cudnnConvolutionBwdDataAlgo_t,
        usize,
        ds::cudnnMathType_t,
    ),
    bwd_filter: (
        ds::cudnnConvolutionBwdFilterAlgo_t,
        usize,
        ds::cudnnMathType_t,
    ),
}

struct Handle(ds::cudnnHandle_t);
impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate, destroyed once here.
        let _ = unsafe { dr::destroy_handle(self.0) };
    }
}

/// The cuDNN handle, the plan cache and the shared workspace (behind the backend's Mutex).
pub struct Dnn {
    handle: Handle,
    plans: HashMap<(ConvShape, bool, DType, Layout), Plan>,
    workspace: Option<DeviceBuffer>,
}

// SAFETY: the handle and descriptors are plain driver objects usable from any thread; the
// backend only reaches them through a Mutex, so calls never overlap.
unsafe impl Send for Dnn {}

impl Dnn {
    pub(crate) fn new(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<Dnn> {
        // SAFETY: only tries to dlopen libcudnn (cudarc panics on first use when it is absent).
        if !unsafe { ds::is_culib_present() } {
            return Err(Error::Device(
                "libcudnn.so not found (install cuDNN 9 for CUDA 13, e.g. the nvidia-cudnn-cu13 \
                 PyPI wheel, and add its lib/ to LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        ctx.bind_to_thread()
            .map_err(|e| super::driver_err("binding the CUDA context", e))?;
        let handle = Handle(dr::create_handle().map_err(|e| dnn_err("cudnnCreate", e))?);
        // SAFETY: valid handle; the stream outlives the backend's Dnn.
        unsafe { dr::set_stream(handle.0, stream.cu_stream() as ds::cudaStream_t) }
            .map_err(|e| dnn_err("cudnnSetStream", e))?;
        Ok(Dnn {
            handle,
            plans: HashMap::new(),
            workspace: None,
        })
    }

    fn plan(&mut self, s: &ConvShape, dt: DType, layout: Layout) -> Result<&Plan> {
        let key = (*s, conv_tf32(), dt, layout);
        if !self.plans.contains_key(&key) {
            let p = self.make_plan(s, key.1, dt, layout)?;
            self.plans.insert(key, p);
        }
        self.plans
            .get(&key)
            .ok_or_else(|| Error::Device("conv plan cache".into()))
    }

    /// `dt` bf16: bf16 tensors and filter with f32 accumulation (cuDNN's BFLOAT16 config,
    /// compute type float), tensor-core math whatever the TF32 switch (which concerns f32
    /// data only).
    fn make_plan(&self, s: &ConvShape, tf32: bool, dt: DType, layout: Layout) -> Result<Plan> {
        let (ho, wo) = s.out_hw()?;
        let x = tensor_desc([s.n, s.c, s.h, s.w], dt, layout)?;
        let y = tensor_desc([s.n, s.o, ho, wo], dt, layout)?;
        // Tensor cores for bf16 data; for f32 data as the TF32 switch says.
        let tf32 = tf32 || dt == DType::Bf16;
        let ws_limit = workspace_limit(s, dt)?;
        let w = FilterDesc(dr::create_filter_descriptor().map_err(|e| dnn_err("filter", e))?);
        let conv =
            ConvDesc(dr::create_convolution_descriptor().map_err(|e| dnn_err("conv desc", e))?);
        let h = self.handle.0;
        // SAFETY: every descriptor was just created and is set before use; the algorithm
        // queries write at most `requested` entries into arrays of that length.
        unsafe {
            dr::set_filter4d_descriptor(
                w.0,
                cudnn_type(dt),
                cudnn_format(layout),
                [c_int(s.o)?, c_int(s.c)?, c_int(s.kh)?, c_int(s.kw)?],
            )
            .map_err(|e| dnn_err("set filter", e))?;
            let (p, st) = (c_int(s.padding)?, c_int(s.stride)?);
            dr::set_convolution2d_descriptor(
                conv.0,
                p,
                p,
                st,
                st,
                1,
                1,
                ds::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                ds::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(|e| dnn_err("set conv", e))?;
            // bf16 data: tensor-op math asked for explicitly (the heuristic's pick then runs on
            // tensor cores; no down-conversion is involved, the data already is bf16).
            let math = if dt == DType::Bf16 {
                ds::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            } else if tf32 {
                ds::cudnnMathType_t::CUDNN_DEFAULT_MATH
            } else {
                ds::cudnnMathType_t::CUDNN_FMA_MATH
            };
            dr::set_convolution_math_type(conv.0, math).map_err(|e| dnn_err("set math type", e))?;

            const REQ: usize = 16;
            let ok = ds::cudnnStatus_t::CUDNN_STATUS_SUCCESS;
            let mut n = 0;
            let mut fwd: [ds::cudnnConvolutionFwdAlgoPerf_t; REQ] = std::mem::zeroed();
            dr::get_convolution_forward_algorithm(
                h,
                x.0,
                w.0,
                conv.0,
                y.0,
                REQ as i32,
                &mut n,
                fwd.as_mut_ptr(),
            )
            .map_err(|e| dnn_err("forward algorithm query", e))?;
            let f = fwd[..n.max(0) as usize]
                .iter()
                .find(|p| p.status == ok && p.memory <= ws_limit)
                .ok_or_else(|| Error::Device(format!("cuDNN: no forward algorithm for {s:?}")))?;
            // Timed search (cached with the plan: once per shape and math mode). It runs every
            // candidate on cuDNN's own scratch buffers and waits for them; the descriptor's math
            // mode (FMA-only or TF32 allowed) applies to the trials as to the real calls.
            let find = conv_find();
            let (mut f_algo, mut f_math) = (f.algo, math);
            if find {
                let mut perf: [ds::cudnnConvolutionFwdAlgoPerf_t; REQ] = std::mem::zeroed();
                let st = ds::cudnnFindConvolutionForwardAlgorithm(
                    h,
                    x.0,
                    w.0,
                    conv.0,
                    y.0,
                    REQ as i32,
                    &mut n,
                    perf.as_mut_ptr(),
                );
                (f_algo, f_math) =
                    fastest!(st, n, perf, tf32, ws_limit).unwrap_or((f_algo, f_math));
            }
            // The workspace for the math type the algorithm will run with; then the mode's
            // math type back on the descriptor for the next queries (it bounds their choice).
            dr::set_convolution_math_type(conv.0, f_math).map_err(|e| dnn_err("math type", e))?;
            let f_ws = dr::get_convolution_forward_workspace_size(h, x.0, w.0, conv.0, y.0, f_algo)
                .map_err(|e| dnn_err("forward workspace", e))?;
            dr::set_convolution_math_type(conv.0, math).map_err(|e| dnn_err("math type", e))?;

            let mut bd: [ds::cudnnConvolutionBwdDataAlgoPerf_t; REQ] = std::mem::zeroed();
            dr::get_convolution_backward_data_algorithm(
                h,
                w.0,
                y.0,
                conv.0,
                x.0,
                REQ as i32,
                &mut n,
                bd.as_mut_ptr(),
            )
            .map_err(|e| dnn_err("backward-data algorithm query", e))?;
            let d = bd[..n.max(0) as usize]
                .iter()
                .find(|p| p.status == ok && p.memory <= ws_limit)
                .ok_or_else(|| {
                    Error::Device(format!("cuDNN: no backward-data algorithm for {s:?}"))
                })?;
            let (mut d_algo, mut d_math) = (d.algo, math);
            if find {
                let mut perf: [ds::cudnnConvolutionBwdDataAlgoPerf_t; REQ] = std::mem::zeroed();
                let st = ds::cudnnFindConvolutionBackwardDataAlgorithm(
                    h,
                    w.0,
                    y.0,
                    conv.0,
                    x.0,
                    REQ as i32,
                    &mut n,
                    perf.as_mut_ptr(),
                );
                (d_algo, d_math) =
                    fastest!(st, n, perf, tf32, ws_limit).unwrap_or((d_algo, d_math));
            }
            dr::set_convolution_math_type(conv.0, d_math).map_err(|e| dnn_err("math type", e))?;
            let d_ws =
                dr::get_convolution_backward_data_workspace_size(h, w.0, y.0, conv.0, x.0, d_algo)
                    .map_err(|e| dnn_err("backward-data workspace", e))?;
            dr::set_convolution_math_type(conv.0, math).map_err(|e| dnn_err("math type", e))?;

            let mut bf: [ds::cudnnConvolutionBwdFilterAlgoPerf_t; REQ] = std::mem::zeroed();
            dr::get_convolution_backward_filter_algorithm(
                h,
                x.0,
                y.0,
                conv.0,
                w.0,
                REQ as i32,
                &mut n,
                bf.as_mut_ptr(),
            )
            .map_err(|e| dnn_err("backward-filter algorithm query", e))?;
            let g = bf[..n.max(0) as usize]
                .iter()
                .find(|p| p.status == ok && p.memory <= ws_limit)
                .ok_or_else(|| {
                    Error::Device(format!("cuDNN: no backward-filter algorithm for {s:?}"))
                })?;
            let (mut g_algo, mut g_math) = (g.algo, math);
            if find {
                let mut perf: [ds::cudnnConvolutionBwdFilterAlgoPerf_t; REQ] = std::mem::zeroed();
                let st = ds::cudnnFindConvolutionBackwardFilterAlgorithm(
                    h,
                    x.0,
                    y.0,
                    conv.0,
                    w.0,
                    REQ as i32,
                    &mut n,
                    perf.as_mut_ptr(),
                );
                (g_algo, g_math) =
                    fastest!(st, n, perf, tf32, ws_limit).unwrap_or((g_algo, g_math));
            }
            dr::set_convolution_math_type(conv.0, g_math).map_err(|e| dnn_err("math type", e))?;
            let g_ws = dr::get_convolution_backward_filter_workspace_size(
                h, x.0, y.0, conv.0, w.0, g_algo,
            )
            .map_err(|e| dnn_err("backward-filter workspace", e))?;
            Ok(Plan {
                x,
                y,
                w,
                conv,
                fwd: (f_algo, f_ws, f_math),
                bwd_data: (d_algo, d_ws, d_math),
                bwd_filter: (g_algo, g_ws, g_math),
            })
        }
    }
}

/// `buf` holds at least `need` elements of `dt` in `layout` (x, w and y of one convolution share
/// a type and a layout).
fn check(
    name: &str,
    buf: &DeviceBuffer,
    need: usize,
    (dt, layout): (DType, Layout),
    s: &ConvShape,
) -> Result<()> {
    if buf.layout() != layout {
        return Err(Error::Device(format!(
            "conv2d: {name} is {}, the others {layout} ({s:?}): convert to one layout",
            buf.layout()
        )));
    }
    if buf.dtype() != dt {
        return Err(Error::Device(format!(
            "conv2d: {name} is a {} buffer, the others {dt} ({s:?}): cast the weights and \
             activations to one type",
            buf.dtype()
        )));
    }
    if buf.len() < need {
        return Err(Error::Shape(format!(
            "conv2d: {name} holds {} values, {s:?} needs {need}",
            buf.len()
        )));
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Which {
    Fwd,
    BwdData,
    BwdFilter,
}

impl CudaBackend {
    /// Bytes of the shared cuDNN workspace (kept for the backend's life, grown to the largest
    /// plan's need; 0 without cuDNN or before the first convolution). It counts in the pool's
    /// live bytes at every moment, where PyTorch's workspace is live only during a call.
    pub fn cudnn_workspace_bytes(&self) -> usize {
        self.dnn()
            .ok()
            .and_then(|d| d.workspace.as_ref().map(|w| w.bytes()))
            .unwrap_or(0)
    }

    /// Makes sure the shared workspace holds `bytes`, returning its address (0 when none).
    fn conv_run(
        &self,
        s: &ConvShape,
        (dt, layout): (DType, Layout),
        which: Which,
        a: u64,
        b: u64,
        out: u64,
    ) -> Result<()> {
        // Bound before the plan: making one runs cudnnFind* (cudaMalloc and kernel launches
        // through the runtime API), which must land on this backend's context, not whatever
        // (or no) context is current on the calling thread.
        self.context()
            .bind_to_thread()
            .map_err(|e| super::driver_err("binding the CUDA context", e))?;
        let mut dnn = self.dnn()?;
        let ws_need = {
            let p = dnn.plan(s, dt, layout)?;
            match which {
                Which::Fwd => p.fwd.1,
                Which::BwdData => p.bwd_data.1,
                Which::BwdFilter => p.bwd_filter.1,
            }
        };
        if ws_need > dnn.workspace.as_ref().map_or(0, |w| w.bytes()) {
            dnn.workspace = None; // back to the pool first, then a larger one
            dnn.workspace = Some(self.alloc_bytes(ws_need)?);
        }
        let (ws_ptr, ws_bytes) = dnn
            .workspace
            .as_ref()
            .map_or((0, 0), |w| (w.ptr(), w.bytes()));
        let h = dnn.handle.0;
        let p = dnn.plan(s, dt, layout)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let al = &alpha as *const f32 as *const std::ffi::c_void;
        let be = &beta as *const f32 as *const std::ffi::c_void;
        let ws = ws_ptr as *mut std::ffi::c_void;
        let math = match which {
            Which::Fwd => p.fwd.2,
            Which::BwdData => p.bwd_data.2,
            Which::BwdFilter => p.bwd_filter.2,
        };
        // SAFETY: the caller checked every buffer against the shape; descriptors belong to this
        // plan (shared by its three directions; the Dnn lock keeps the math-type set and the call
        // together); the workspace holds at least the plan's size; alpha/beta outlive the call.
        unsafe {
            dr::set_convolution_math_type(p.conv.0, math)
                .map_err(|e| dnn_err(&format!("convolution math type {s:?}"), e))?;
            match which {
                Which::Fwd => dr::convolution_forward(
                    h, al, p.x.0, a as _, p.w.0, b as _, p.conv.0, p.fwd.0, ws, ws_bytes, be,
                    p.y.0, out as _,
                )
                .map_err(|e| dnn_err(&format!("convolution forward {s:?}"), e)),
                Which::BwdData => dr::convolution_backward_data(
                    h,
                    al,
                    p.w.0,
                    a as _,
                    p.y.0,
                    b as _,
                    p.conv.0,
                    p.bwd_data.0,
                    ws,
                    ws_bytes,
                    be,
                    p.x.0,
                    out as _,
                )
                .map_err(|e| dnn_err(&format!("convolution backward data {s:?}"), e)),
                Which::BwdFilter => dr::convolution_backward_filter(
                    h,
                    al,
                    p.x.0,
                    a as _,
                    p.y.0,
                    b as _,
                    p.conv.0,
                    p.bwd_filter.0,
                    ws,
                    ws_bytes,
                    be,
                    p.w.0,
                    out as _,
                )
                .map_err(|e| dnn_err(&format!("convolution backward filter {s:?}"), e)),
            }
        }
    }

    /// y = conv(x, w). x (n, c, h, w), w (o, c, kh, kw), y (n, o, ho, wo), overwritten.
    pub fn conv2d_forward(
        &self,
        s: &ConvShape,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        y: &mut DeviceBuffer,
    ) -> Result<()> {
        let f = (x.dtype(), x.layout());
        check("x", x, s.x_len(), f, s)?;
        check("w", w, s.w_len(), f, s)?;
        check("y", y, s.y_len()?, f, s)?;
        self.conv_run(s, f, Which::Fwd, x.ptr(), w.ptr(), y.ptr())
    }

    /// dx = conv^T(dy, w). dy (n, o, ho, wo), w (o, c, kh, kw), dx (n, c, h, w), overwritten.
    pub fn conv2d_backward_data(
        &self,
        s: &ConvShape,
        w: &DeviceBuffer,
        dy: &DeviceBuffer,
        dx: &mut DeviceBuffer,
    ) -> Result<()> {
        let f = (w.dtype(), w.layout());
        check("w", w, s.w_len(), f, s)?;
        check("dy", dy, s.y_len()?, f, s)?;
        check("dx", dx, s.x_len(), f, s)?;
        self.conv_run(s, f, Which::BwdData, w.ptr(), dy.ptr(), dx.ptr())
    }

    /// dw = sum over the batch of x (*) dy. x (n, c, h, w), dy (n, o, ho, wo), dw (o, c, kh, kw),
    /// overwritten.
    pub fn conv2d_backward_filter(
        &self,
        s: &ConvShape,
        x: &DeviceBuffer,
        dy: &DeviceBuffer,
        dw: &mut DeviceBuffer,
    ) -> Result<()> {
        let f = (x.dtype(), x.layout());
        check("x", x, s.x_len(), f, s)?;
        check("dy", dy, s.y_len()?, f, s)?;
        check("dw", dw, s.w_len(), f, s)?;
        self.conv_run(s, f, Which::BwdFilter, x.ptr(), dy.ptr(), dw.ptr())
    }
}

#[cfg(test)]
mod tests {
    use super::{ds, math_ok, workspace_limit, ConvShape, WORKSPACE_LIMIT};
    use crate::device::DType;

    // ResNet50's layer1 conv3 (1x1, 64 -> 256 channels at 56x56) over both views: at batch 256
    // (512 images) its bf16 output is 0.82 GB and the limit stays 1 GiB; at batch 1024 it is
    // 3.3 GB and so is the limit.
    #[test]
    fn workspace_limit_grows_with_the_operands_past_1_gib() {
        let conv = |n| ConvShape {
            n,
            c: 64,
            h: 56,
            w: 56,
            o: 256,
            kh: 1,
            kw: 1,
            stride: 1,
            padding: 0,
        };
        assert_eq!(
            workspace_limit(&conv(512), DType::Bf16).unwrap(),
            WORKSPACE_LIMIT
        );
        assert_eq!(
            workspace_limit(&conv(2048), DType::Bf16).unwrap(),
            2048 * 256 * 56 * 56 * 2
        );
        assert_eq!(
            workspace_limit(&conv(2048), DType::F32).unwrap(),
            2048 * 256 * 56 * 56 * 4
        );
    }

    // FMA-only mode (the GPU-vs-CPU tests) must never run a cudnnFind* result that may use
    // tensor cores; TF32 mode takes anything but the half-precision down-conversion.
    #[test]
    fn find_results_keep_the_mode_math() {
        use ds::cudnnMathType_t as M;
        assert!(math_ok(M::CUDNN_FMA_MATH, false));
        for m in [
            M::CUDNN_DEFAULT_MATH,
            M::CUDNN_TENSOR_OP_MATH,
            M::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
        ] {
            assert!(!math_ok(m, false), "{m:?} in FMA mode");
        }
        for m in [
            M::CUDNN_DEFAULT_MATH,
            M::CUDNN_TENSOR_OP_MATH,
            M::CUDNN_FMA_MATH,
        ] {
            assert!(math_ok(m, true), "{m:?} in TF32 mode");
        }
        assert!(!math_ok(M::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION, true));
    }
}
