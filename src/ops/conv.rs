//! 2-D convolution (NCHW, no bias): forward, backward data, backward filter.
//!
//! The CPU path is im2col + GEMM (the `gemm` crate). The batch is cut into groups of G
//! consecutive samples; each group is unfolded into one column matrix (C*KH*KW, G*HO*WO) and
//! multiplied by the weight in one GEMM, so the scratch stays small (one group per worker, not
//! the whole batch). G is 1 for large planes and grows for small ones (deep layers of small
//! images, HO*WO down to 1), where a one-sample GEMM would be a near matrix-vector product;
//! those groups go through a gather/scatter between (G, O, HO*WO) and (O, G*HO*WO). 1x1
//! stride-1 unpadded convolutions with G = 1 skip im2col: the input plane (C, H*W) already is
//! the column matrix.
//!
//! Parallelism: with at least as many groups as rayon threads, groups run in parallel and each
//! GEMM is single-threaded (`Parallelism::None`); otherwise (batch 1) groups run one after the
//! other and each GEMM uses all threads (`Parallelism::Rayon`). On the 2-core development
//! machine the first was ~10% faster than one multi-threaded GEMM per sample for ResNet50's
//! convolutions at batch 2 (see the ignored `time_resnet50_convs_batch2` test).
//!
//! Backward data: dcol = W^T * dy per group, then col2im. Backward filter: dW = sum over groups
//! of dy * col^T, one partial sum per thread over a contiguous range of groups, added in a
//! fixed order (deterministic).

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::autograd::{Bf16Path, Tape};
use crate::bail;
use crate::error::Result;
#[cfg(feature = "cuda")]
use crate::ops::gpu;
use crate::ops::Backend;
use crate::tensor::Tensor;

/// The sizes of one convolution: input (N, C, H, W), weight (O, C, KH, KW), output
/// (N, O, HO, WO). Square stride and padding (all of ResNet's convolutions are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dShape {
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

impl Conv2dShape {
    /// Output height: (H + 2*padding - KH) / stride + 1 (floor, as PyTorch). Meaningful only
    /// for a shape that passes [`Conv2dShape::validate`].
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.padding - self.kh) / self.stride + 1
    }
    /// Output width: (W + 2*padding - KW) / stride + 1.
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.padding - self.kw) / self.stride + 1
    }
    /// Elements of the input x (N, C, H, W).
    pub fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    /// Elements of the weight (O, C, KH, KW).
    pub fn w_len(&self) -> usize {
        self.o * self.c * self.kh * self.kw
    }
    /// Elements of the output y (N, O, HO, WO).
    pub fn y_len(&self) -> usize {
        self.n * self.o * self.ho() * self.wo()
    }
    /// Rows of the column matrix: C*KH*KW (the GEMM's inner dimension).
    fn col_rows(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Columns of the column matrix: HO*WO.
    fn col_cols(&self) -> usize {
        self.ho() * self.wo()
    }
    /// A 1x1, stride-1, unpadded convolution: the input plane is the column matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// Checks that the sizes describe a valid convolution (call before the kernels, which
    /// assume it).
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("N", self.n),
            ("C", self.c),
            ("H", self.h),
            ("W", self.w),
            ("O", self.o),
            ("KH", self.kh),
            ("KW", self.kw),
            ("stride", self.stride),
        ];
        for (name, v) in dims {
            if v == 0 {
                bail!(Shape, "conv2d: {name} must be positive ({self:?})");
            }
        }
        if self.h + 2 * self.padding < self.kh || self.w + 2 * self.padding < self.kw {
            bail!(
                Shape,
                "conv2d: kernel {}x{} is larger than the padded input {}x{} (H={}, W={}, padding={})",
                self.kh,
                self.kw,
                self.h + 2 * self.padding,
                self.w + 2 * self.padding,
                self.h,
                self.w,
                self.padding
            );
        }
        Ok(())
    }

    /// The shape of `conv2d(x, w)` for x (N, C, H, W) and w (O, C, KH, KW), validated.
    pub fn from_shapes(
        x: &[usize],
        w: &[usize],
        stride: usize,
        padding: usize,
    ) -> Result<Conv2dShape> {
        if x.len() != 4 {
            bail!(Shape, "conv2d: input must be (N, C, H, W), got shape {x:?}");
        }
        if w.len() != 4 {
            bail!(
                Shape,
                "conv2d: weight must be (O, C, KH, KW), got shape {w:?}"
            );
        }
        if x[1] != w[1] {
            bail!(
                Shape,
                "conv2d: input {x:?} has {} channels but weight {w:?} expects {}",
                x[1],
                w[1]
            );
        }
        let s = Conv2dShape {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            o: w[0],
            kh: w[2],
            kw: w[3],
            stride,
            padding,
        };
        s.validate()?;
        Ok(s)
    }
}

// ---------- GEMM and im2col helpers ----------

/// A row-major-or-strided matrix operand: `data[i * rs + j * cs]` is element (i, j).
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major (rows x cols) matrix.
    fn rm(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major (rows x cols) matrix, i.e. a (cols x rows) operand.
    fn rm_t(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
    /// Panics unless every element of a (rows x cols) view is inside `data`.
    fn check(&self, rows: usize, cols: usize, what: &str) {
        let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
        assert!(
            rows > 0 && cols > 0 && last < self.data.len(),
            "conv2d gemm: {what} ({rows}x{cols}) does not fit its buffer of {}",
            self.data.len()
        );
    }
}

/// dst (m x n, row-major) = a (m x k) * b (k x n), or dst += a * b when `accumulate`.
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    a: Mat,
    b: Mat,
    accumulate: bool,
    par: Parallelism,
) {
    assert!(m > 0 && n > 0 && k > 0, "conv2d gemm: empty matrix");
    assert!(dst.len() >= m * n, "conv2d gemm: destination too small");
    a.check(m, k, "lhs");
    b.check(k, n, "rhs");
    // SAFETY: the asserts above guarantee that every element the GEMM reads
    // (a: (m-1)*rs + (k-1)*cs, b likewise) and writes (dst: m*n row-major) lies inside the
    // corresponding slice; `dst` is a unique borrow so it aliases neither input. gemm computes
    // dst := alpha*dst + beta*a*b, reading dst only when `read_dst` is true.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// The output columns [lo, hi) whose input column `o*stride + k - padding` lies in [0, len).
fn valid_range(k: usize, padding: usize, stride: usize, len: usize, out: usize) -> (usize, usize) {
    let lo = if k >= padding {
        0
    } else {
        (padding - k).div_ceil(stride)
    };
    let hi_num = len + padding;
    let hi = if hi_num <= k {
        0
    } else {
        (hi_num - k).div_ceil(stride)
    };
    let lo = lo.min(out);
    (lo, hi.clamp(lo, out))
}

/// Unfolds one sample x (C, H, W) into its block of a column matrix: row (c, ki, kj) of the
/// block holds the input pixel under kernel tap (ki, kj) for every output position (HO*WO
/// values, 0 where the tap falls in the padding). Rows are `ld` apart in `col`, so several
/// samples can sit side by side in one (C*KH*KW, G*HO*WO) matrix.
fn im2col(x: &[f32], s: &Conv2dShape, col: &mut [f32], ld: usize) {
    let (ho, wo) = (s.ho(), s.wo());
    let plane = s.h * s.w;
    let ncols = ho * wo;
    for c in 0..s.c {
        let xc = &x[c * plane..(c + 1) * plane]; // (H, W)
        for ki in 0..s.kh {
            for kj in 0..s.kw {
                let row = (c * s.kh + ki) * s.kw + kj;
                let dst = &mut col[row * ld..row * ld + ncols]; // (HO, WO)
                let (lo, hi) = valid_range(kj, s.padding, s.stride, s.w, wo);
                for oy in 0..ho {
                    let d = &mut dst[oy * wo..(oy + 1) * wo];
                    let iy = oy * s.stride + ki;
                    if iy < s.padding || iy - s.padding >= s.h {
                        d.fill(0.0);
                        continue;
                    }
                    let xr = &xc[(iy - s.padding) * s.w..(iy - s.padding + 1) * s.w]; // (W)
                    d[..lo].fill(0.0);
                    d[hi..].fill(0.0);
                    if lo < hi {
                        // First input column of the valid range (>= 0 by construction of lo).
                        let ix0 = lo * s.stride + kj - s.padding;
                        if s.stride == 1 {
                            d[lo..hi].copy_from_slice(&xr[ix0..ix0 + (hi - lo)]);
                        } else {
                            for (dv, &xv) in
                                d[lo..hi].iter_mut().zip(xr[ix0..].iter().step_by(s.stride))
                            {
                                *dv = xv;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: dx (C, H, W) = for each input pixel, the sum of the entries of
/// its sample's column block (rows `ld` apart) at every tap that reads it. Overwrites dx.
fn col2im(col: &[f32], s: &Conv2dShape, ld: usize, dx: &mut [f32]) {
    let (ho, wo) = (s.ho(), s.wo());
    let plane = s.h * s.w;
    let ncols = ho * wo;
    dx.fill(0.0);
    for c in 0..s.c {
        let dxc = &mut dx[c * plane..(c + 1) * plane]; // (H, W)
        for ki in 0..s.kh {
            for kj in 0..s.kw {
                let row = (c * s.kh + ki) * s.kw + kj;
                let src = &col[row * ld..row * ld + ncols]; // (HO, WO)
                let (lo, hi) = valid_range(kj, s.padding, s.stride, s.w, wo);
                if lo >= hi {
                    continue;
                }
                for oy in 0..ho {
                    let iy = oy * s.stride + ki;
                    if iy < s.padding || iy - s.padding >= s.h {
                        continue;
                    }
                    let r = &mut dxc[(iy - s.padding) * s.w..(iy - s.padding + 1) * s.w]; // (W)
                    let sv = &src[oy * wo + lo..oy * wo + hi];
                    let ix0 = lo * s.stride + kj - s.padding;
                    if s.stride == 1 {
                        for (rv, &v) in r[ix0..ix0 + (hi - lo)].iter_mut().zip(sv) {
                            *rv += v;
                        }
                    } else {
                        for (rv, &v) in r[ix0..].iter_mut().step_by(s.stride).zip(sv) {
                            *rv += v;
                        }
                    }
                }
            }
        }
    }
}

/// Copies per-sample blocks src[g] (rows, cols), g < G, into dst (rows, G*cols) side by side.
fn gather_blocks(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    let g_count = src.len() / (rows * cols);
    let ld = g_count * cols;
    for (g, block) in src.chunks_exact(rows * cols).enumerate() {
        for (r, row) in block.chunks_exact(cols).enumerate() {
            dst[r * ld + g * cols..r * ld + (g + 1) * cols].copy_from_slice(row);
        }
    }
}

/// The inverse of [`gather_blocks`]: src (rows, G*cols) -> dst[g] (rows, cols).
fn scatter_blocks(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    let g_count = dst.len() / (rows * cols);
    let ld = g_count * cols;
    for (g, block) in dst.chunks_exact_mut(rows * cols).enumerate() {
        for (r, row) in block.chunks_exact_mut(cols).enumerate() {
            row.copy_from_slice(&src[r * ld + g * cols..r * ld + (g + 1) * cols]);
        }
    }
}

/// Narrowest GEMM (in output columns) worth running alone: below this, samples are batched
/// into one GEMM (deep layers of small images have HO*WO of 1..16, and a GEMM with so few
/// columns runs several times below the machine's peak).
const MIN_GEMM_COLS: usize = 128;

/// How a convolution's batch is spread over GEMMs and rayon's threads.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Samples per group: one im2col matrix (C*KH*KW, G*HO*WO) and one GEMM per group.
    g: usize,
    /// Number of groups: ceil(N / G).
    groups: usize,
    /// Groups run in parallel with single-threaded GEMMs (true), or one after the other with
    /// multi-threaded GEMMs (false, when there are fewer groups than threads).
    outer: bool,
    /// The parallelism of each GEMM.
    par: Parallelism,
}

impl Plan {
    fn new(s: &Conv2dShape) -> Plan {
        let threads = rayon::current_num_threads().max(1);
        let ncols = s.col_cols();
        // Enough samples for MIN_GEMM_COLS columns, but not so many that threads go idle.
        let g = MIN_GEMM_COLS
            .div_ceil(ncols)
            .min(s.n.div_ceil(threads))
            .max(1);
        let groups = s.n.div_ceil(g);
        let outer = groups >= threads;
        let par = if outer || threads == 1 {
            Parallelism::None
        } else {
            Parallelism::Rayon(threads)
        };
        Plan {
            g,
            groups,
            outer,
            par,
        }
    }
    /// The samples of group `i`.
    fn samples(&self, i: usize, n: usize) -> std::ops::Range<usize> {
        i * self.g..((i + 1) * self.g).min(n)
    }
    /// Whether the input plane can serve as the column matrix directly (1x1 stride-1 unpadded
    /// convs, one sample per GEMM).
    fn direct(&self, s: &Conv2dShape) -> bool {
        self.g == 1 && s.is_pointwise()
    }
}

/// Per-worker scratch: a column matrix and a gathered (O, G*HO*WO) block.
struct Scratch {
    col: Vec<f32>,
    ybuf: Vec<f32>,
}

impl Scratch {
    fn new(s: &Conv2dShape, plan: &Plan) -> Scratch {
        let gcols = plan.g * s.col_cols();
        Scratch {
            col: if plan.direct(s) {
                Vec::new()
            } else {
                vec![0.0; s.col_rows() * gcols]
            },
            ybuf: if plan.g > 1 {
                vec![0.0; s.o * gcols]
            } else {
                Vec::new()
            },
        }
    }
}

/// Runs `f(group index, scratch)` for every group, in parallel when the plan says so.
fn for_each_group<F>(s: &Conv2dShape, plan: &Plan, f: F)
where
    F: Fn(usize, &mut Scratch) + Sync,
{
    if plan.outer {
        (0..plan.groups)
            .into_par_iter()
            .for_each_init(|| Scratch::new(s, plan), |sc, i| f(i, sc));
    } else {
        let mut sc = Scratch::new(s, plan);
        for i in 0..plan.groups {
            f(i, &mut sc);
        }
    }
}

/// Hands out disjoint per-group chunks of an output buffer to parallel workers.
struct GroupChunks {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the pointer is only used through `get`, whose callers access disjoint ranges (one per
// group) while the borrow it came from is alive (the body of the kernel that made it).
unsafe impl Sync for GroupChunks {}

impl GroupChunks {
    fn new(buf: &mut [f32]) -> Self {
        GroupChunks {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }
    /// The elements [start, end) of the buffer.
    ///
    /// # Safety
    /// Ranges handed out at the same time must be disjoint, and the buffer passed to `new` must
    /// still be mutably borrowed by the caller of `new`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, start: usize, end: usize) -> &mut [f32] {
        assert!(start <= end && end <= self.len, "group chunk out of range");
        // SAFETY: in range (assert above); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), end - start) }
    }
}

/// Fills `sc.col` with the column matrix (C*KH*KW, G*HO*WO) of the samples `r` of x and
/// returns it, or returns the input plane itself for direct (pointwise, single-sample) convs.
fn columns<'a>(
    x: &'a [f32],
    s: &Conv2dShape,
    plan: &Plan,
    r: &std::ops::Range<usize>,
    col: &'a mut [f32],
) -> &'a [f32] {
    let x_per = s.c * s.h * s.w;
    let ncols = s.col_cols();
    let ld = r.len() * ncols;
    if plan.direct(s) {
        return &x[r.start * x_per..r.end * x_per]; // (C, H*W)
    }
    for (j, i) in r.clone().enumerate() {
        im2col(&x[i * x_per..(i + 1) * x_per], s, &mut col[j * ncols..], ld);
    }
    &col[..s.col_rows() * ld]
}

// ---------- CPU kernels ----------

/// y (N, O, HO, WO) = conv(x (N, C, H, W), w (O, C, KH, KW)). Overwrites y.
///
/// # Panics
/// If a buffer length does not match `s`, or `s` is invalid (see [`Conv2dShape::validate`]).
pub fn conv2d_forward_cpu(x: &[f32], w: &[f32], s: &Conv2dShape, y: &mut [f32]) {
    s.validate().expect("conv2d_forward_cpu: invalid shape");
    assert_eq!(x.len(), s.x_len(), "conv2d_forward_cpu: x length");
    assert_eq!(w.len(), s.w_len(), "conv2d_forward_cpu: w length");
    assert_eq!(y.len(), s.y_len(), "conv2d_forward_cpu: y length");
    let (k, ncols) = (s.col_rows(), s.col_cols());
    let y_per = s.o * ncols;
    let plan = Plan::new(s);
    let ys = GroupChunks::new(y);
    for_each_group(s, &plan, |gi, sc| {
        let r = plan.samples(gi, s.n);
        let gcols = r.len() * ncols;
        // SAFETY: groups cover disjoint sample ranges, each visited once; `y` stays borrowed
        // for this call.
        let y_g = unsafe { ys.get(r.start * y_per, r.end * y_per) }; // (G, O, HO*WO)
        let cols = columns(x, s, &plan, &r, &mut sc.col); // (C*KH*KW, G*HO*WO)
                                                          // dst (O, G*HO*WO) = w (O, C*KH*KW) * cols (C*KH*KW, G*HO*WO)
        let gemm_into = |dst: &mut [f32]| {
            matmul(
                (s.o, gcols, k),
                dst,
                Mat::rm(w, k),
                Mat::rm(cols, gcols),
                false,
                plan.par,
            )
        };
        if r.len() == 1 {
            // One sample: its output (O, HO*WO) is the GEMM's destination.
            gemm_into(y_g);
        } else {
            // Several: (O, G*HO*WO) in scratch, scattered to (G, O, HO*WO).
            gemm_into(&mut sc.ybuf);
            scatter_blocks(&sc.ybuf[..s.o * gcols], s.o, ncols, y_g);
        }
    });
}

/// dx (N, C, H, W) = the gradient of conv2d w.r.t. its input, given dy (N, O, HO, WO) and
/// w (O, C, KH, KW): per group dcol = w^T * dy, then col2im. Overwrites dx.
///
/// # Panics
/// If a buffer length does not match `s`, or `s` is invalid.
pub fn conv2d_backward_data_cpu(dy: &[f32], w: &[f32], s: &Conv2dShape, dx: &mut [f32]) {
    s.validate()
        .expect("conv2d_backward_data_cpu: invalid shape");
    assert_eq!(dy.len(), s.y_len(), "conv2d_backward_data_cpu: dy length");
    assert_eq!(w.len(), s.w_len(), "conv2d_backward_data_cpu: w length");
    assert_eq!(dx.len(), s.x_len(), "conv2d_backward_data_cpu: dx length");
    let (k, ncols) = (s.col_rows(), s.col_cols());
    let x_per = s.c * s.h * s.w;
    let y_per = s.o * ncols;
    let plan = Plan::new(s);
    let dxs = GroupChunks::new(dx);
    for_each_group(s, &plan, |gi, sc| {
        let r = plan.samples(gi, s.n);
        let gcols = r.len() * ncols;
        // SAFETY: groups cover disjoint sample ranges, each visited once; `dx` stays borrowed
        // for this call.
        let dx_g = unsafe { dxs.get(r.start * x_per, r.end * x_per) }; // (G, C, H, W)
        let dy_g = &dy[r.start * y_per..r.end * y_per]; // (G, O, HO*WO)
        let dy_cols: &[f32] = if r.len() == 1 {
            dy_g // (O, HO*WO)
        } else {
            gather_blocks(dy_g, s.o, ncols, &mut sc.ybuf);
            &sc.ybuf[..s.o * gcols] // (O, G*HO*WO)
        };
        // dcol (C*KH*KW, G*HO*WO) = w^T (C*KH*KW, O) * dy_cols (O, G*HO*WO)
        let gemm_into = |dst: &mut [f32]| {
            matmul(
                (k, gcols, s.o),
                dst,
                Mat::rm_t(w, k),
                Mat::rm(dy_cols, gcols),
                false,
                plan.par,
            )
        };
        if plan.direct(s) {
            // dx (C, H*W) is the column matrix itself.
            gemm_into(dx_g);
        } else {
            gemm_into(&mut sc.col);
            for (j, dx_n) in dx_g.chunks_exact_mut(x_per).enumerate() {
                col2im(&sc.col[j * ncols..], s, gcols, dx_n);
            }
        }
    });
}

/// dw (O, C, KH, KW) = the gradient of conv2d w.r.t. its weight, given x (N, C, H, W) and
/// dy (N, O, HO, WO): the sum over groups of dy_g * col_g^T. Each worker accumulates a partial
/// sum over a contiguous range of groups; the partials are added in a fixed order, so the
/// result does not depend on scheduling. Overwrites dw.
///
/// # Panics
/// If a buffer length does not match `s`, or `s` is invalid.
pub fn conv2d_backward_filter_cpu(x: &[f32], dy: &[f32], s: &Conv2dShape, dw: &mut [f32]) {
    s.validate()
        .expect("conv2d_backward_filter_cpu: invalid shape");
    assert_eq!(x.len(), s.x_len(), "conv2d_backward_filter_cpu: x length");
    assert_eq!(dy.len(), s.y_len(), "conv2d_backward_filter_cpu: dy length");
    assert_eq!(dw.len(), s.w_len(), "conv2d_backward_filter_cpu: dw length");
    let (k, ncols) = (s.col_rows(), s.col_cols());
    let y_per = s.o * ncols;
    let plan = Plan::new(s);

    // Accumulates, over the groups in `range`, dy_g * col_g^T into acc (O, C*KH*KW).
    let accumulate_range = |range: std::ops::Range<usize>, acc: &mut [f32]| {
        let mut sc = Scratch::new(s, &plan);
        for (j, gi) in range.enumerate() {
            let r = plan.samples(gi, s.n);
            let gcols = r.len() * ncols;
            let dy_g = &dy[r.start * y_per..r.end * y_per]; // (G, O, HO*WO)
            let dy_cols: &[f32] = if r.len() == 1 {
                dy_g // (O, HO*WO)
            } else {
                gather_blocks(dy_g, s.o, ncols, &mut sc.ybuf);
                &sc.ybuf[..s.o * gcols] // (O, G*HO*WO)
            };
            let cols = columns(x, s, &plan, &r, &mut sc.col); // (C*KH*KW, G*HO*WO)
                                                              // acc (O, C*KH*KW) (+)= dy_cols (O, G*HO*WO) * cols^T (G*HO*WO, C*KH*KW)
            matmul(
                (s.o, k, gcols),
                acc,
                Mat::rm(dy_cols, gcols),
                Mat::rm_t(cols, gcols),
                j > 0,
                plan.par,
            );
        }
    };

    let threads = rayon::current_num_threads().max(1);
    if !plan.outer || threads == 1 {
        accumulate_range(0..plan.groups, dw);
        return;
    }
    // One contiguous range of groups per thread; the first range accumulates into dw itself.
    let per = plan.groups.div_ceil(threads);
    let ranges: Vec<std::ops::Range<usize>> = (0..plan.groups)
        .step_by(per)
        .map(|a| a..(a + per).min(plan.groups))
        .collect();
    let (first, rest) = ranges.split_first().expect("at least one group");
    let w_len = dw.len();
    let mut partials: Vec<Vec<f32>> = vec![Vec::new(); rest.len()];
    rayon::join(
        || accumulate_range(first.clone(), dw),
        || {
            partials
                .par_iter_mut()
                .zip(rest.par_iter())
                .for_each(|(p, r)| {
                    *p = vec![0.0f32; w_len];
                    accumulate_range(r.clone(), p);
                })
        },
    );
    for p in &partials {
        for (d, &v) in dw.iter_mut().zip(p) {
            *d += v;
        }
    }
}

// ---------- backend dispatch ----------

/// The launcher's copy of a convolution's sizes.
#[cfg(feature = "cuda")]
fn conv_shape(s: Conv2dShape) -> crate::device::cuda::ConvShape {
    crate::device::cuda::ConvShape {
        n: s.n,
        c: s.c,
        h: s.h,
        w: s.w,
        o: s.o,
        kh: s.kh,
        kw: s.kw,
        stride: s.stride,
        padding: s.padding,
    }
}

/// y (N, O, HO, WO) = conv(x, w) on x's device, and the weights as the backward uses them (on a
/// GPU in x's element type and layout: bf16 in cuDNN's bf16 config, NHWC in cuDNN's NHWC
/// filter order; a copy only where they differ).
pub(crate) fn conv2d_forward(x: &Tensor, w: &Tensor, s: Conv2dShape) -> Result<(Tensor, Tensor)> {
    let y_shape = [s.n, s.o, s.ho(), s.wo()];
    match Backend::of("conv2d", &[x, w])? {
        Backend::Cpu => {
            let mut y = vec![0.0f32; s.y_len()]; // (N, O, HO, WO)
            conv2d_forward_cpu(x.cpu()?, w.cpu()?, &s, &mut y);
            Ok((Tensor::from_vec(y, &y_shape)?, w.clone()))
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let _r = crate::device::nvtx::Range::new("conv2d");
            let f = gpu::format_of(x);
            let wf = w.to_format(f.0, f.1)?;
            let mut y = gpu::alloc_fmt(&be, f, s.y_len())?; // (N, O, HO, WO)
            be.conv2d_forward(
                &conv_shape(s),
                gpu::dbuf("conv2d", x)?,
                gpu::dbuf("conv2d", &wf)?,
                &mut y,
            )?;
            Ok((gpu::wrap(&be, y, &y_shape)?, wf))
        }
    }
}

/// (dx, dw) of a convolution from its input x, the weights `w` as the forward returned them and
/// dy, on x's device; `need` = (dx, dw) says which to compute. On a GPU dx is in x's format
/// and dw f32 NCHW: cuDNN's bf16 config writes dw in bf16 (the one documented rounding), and
/// widening it here lets a weight used by several convolutions in one tape (the global and the
/// local views' passes) accumulate its gradients in f32, as on the CPU.
pub(crate) fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    s: Conv2dShape,
    (need_dx, need_dw): (bool, bool),
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let y_shape = [s.n, s.o, s.ho(), s.wo()];
    dy.expect_shape("conv2d output gradient", &y_shape)?;
    match Backend::of("conv2d backward", &[x, w])? {
        Backend::Cpu => {
            let dyv = dy.cpu()?;
            let dx = if need_dx {
                let mut dx = vec![0.0f32; s.x_len()]; // (N, C, H, W)
                conv2d_backward_data_cpu(dyv, w.cpu()?, &s, &mut dx);
                Some(x.like(dx)?)
            } else {
                None
            };
            let dw = if need_dw {
                let mut dw = vec![0.0f32; s.w_len()]; // (O, C, KH, KW)
                conv2d_backward_filter_cpu(x.cpu()?, dyv, &s, &mut dw);
                Some(w.like(dw)?)
            } else {
                None
            };
            Ok((dx, dw))
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let _r = crate::device::nvtx::Range::new("conv2d backward");
            let (cs, f) = (conv_shape(s), gpu::format_of(x));
            let dy = gpu::on_gpu_as(&be, dy, f)?;
            let dyb = gpu::dbuf("conv2d backward", &dy)?;
            let dx = if need_dx {
                let mut dx = gpu::alloc_fmt(&be, f, s.x_len())?; // (N, C, H, W)
                be.conv2d_backward_data(&cs, gpu::dbuf("conv2d backward", w)?, dyb, &mut dx)?;
                Some(gpu::wrap(&be, dx, x.shape())?)
            } else {
                None
            };
            let dw = if need_dw {
                let mut dw = gpu::alloc_fmt(&be, f, s.w_len())?; // (O, C, KH, KW)
                be.conv2d_backward_filter(&cs, gpu::dbuf("conv2d backward", x)?, dyb, &mut dw)?;
                let dw = gpu::wrap(&be, dw, w.shape())?;
                Some(dw.to_format(crate::tensor::DType::F32, crate::tensor::Layout::Nchw)?)
            } else {
                None
            };
            Ok((dx, dw))
        }
    }
}

// ---------- tape op ----------

impl Tape {
    /// x: (N, C, H, W), w: (O, C, KH, KW); no bias. Output (N, O, HO, WO) with
    /// HO = (H + 2*padding - KH) / stride + 1. Records backward for x and w.
    pub fn conv2d(
        &mut self,
        x: &Tensor,
        w: &Tensor,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor> {
        // Bf16 mode (Tape::bf16_inputs): bf16 operands, the f32 body, a bf16 output.
        if self.is_bf16() {
            let r = self.bf16_inputs("conv2d", &[x, w], Bf16Path::Native)?;
            let y = self.as_f32(|t| t.conv2d(&r[0], &r[1], stride, padding))?;
            return self.bf16_output(&y);
        }
        let s = Conv2dShape::from_shapes(x.shape(), w.shape(), stride, padding)?;
        let (y, ws) = conv2d_forward(x, w, s)?;
        // Decided now, at forward time: the stem's input (the images) needs no dx, and a frozen
        // weight needs no dw; skipping them saves a GEMM each.
        let need = (self.requires_grad(x), self.requires_grad(w));
        let xs = x.clone();
        self.record("conv2d", &y, &[x, w], move |dy| {
            let (dx, dw) = conv2d_backward(&xs, &ws, dy, s, need)?;
            Ok(vec![dx, dw])
        });
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;
    use crate::testutil::{check_grad, check_tape_op, randn, randn_vec, rel_err, TapeRun, Tol};

    #[allow(clippy::too_many_arguments)]
    fn shape(
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        o: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Conv2dShape {
        let s = Conv2dShape {
            n,
            c,
            h,
            w,
            o,
            kh: k,
            kw: k,
            stride,
            padding,
        };
        s.validate().unwrap();
        s
    }

    /// The input pixel (iy, ix) under output (oy, ox) and tap (ki, kj), if not in the padding.
    fn tap(s: &Conv2dShape, oy: usize, ox: usize, ki: usize, kj: usize) -> Option<(usize, usize)> {
        let iy = (oy * s.stride + ki) as isize - s.padding as isize;
        let ix = (ox * s.stride + kj) as isize - s.padding as isize;
        if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
            None
        } else {
            Some((iy as usize, ix as usize))
        }
    }

    /// Direct seven-loop convolution in f64.
    fn naive_forward(x: &[f32], w: &[f32], s: &Conv2dShape) -> Vec<f64> {
        let (ho, wo) = (s.ho(), s.wo());
        let mut y = vec![0.0f64; s.y_len()];
        for n in 0..s.n {
            for o in 0..s.o {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = 0.0f64;
                        for c in 0..s.c {
                            for ki in 0..s.kh {
                                for kj in 0..s.kw {
                                    if let Some((iy, ix)) = tap(s, oy, ox, ki, kj) {
                                        let xv = x[((n * s.c + c) * s.h + iy) * s.w + ix];
                                        let wv = w[((o * s.c + c) * s.kh + ki) * s.kw + kj];
                                        acc += xv as f64 * wv as f64;
                                    }
                                }
                            }
                        }
                        y[((n * s.o + o) * ho + oy) * wo + ox] = acc;
                    }
                }
            }
        }
        y
    }

    /// Direct backward in f64: (dx, dw), by scattering every product of the forward sum.
    fn naive_backward(x: &[f32], w: &[f32], dy: &[f32], s: &Conv2dShape) -> (Vec<f64>, Vec<f64>) {
        let (ho, wo) = (s.ho(), s.wo());
        let mut dx = vec![0.0f64; s.x_len()];
        let mut dw = vec![0.0f64; s.w_len()];
        for n in 0..s.n {
            for o in 0..s.o {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let g = dy[((n * s.o + o) * ho + oy) * wo + ox] as f64;
                        for c in 0..s.c {
                            for ki in 0..s.kh {
                                for kj in 0..s.kw {
                                    if let Some((iy, ix)) = tap(s, oy, ox, ki, kj) {
                                        let xi = ((n * s.c + c) * s.h + iy) * s.w + ix;
                                        let wi = ((o * s.c + c) * s.kh + ki) * s.kw + kj;
                                        dx[xi] += w[wi] as f64 * g;
                                        dw[wi] += x[xi] as f64 * g;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (dx, dw)
    }

    fn to_f32(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&a| a as f32).collect()
    }

    fn cases() -> Vec<Conv2dShape> {
        vec![
            shape(2, 5, 7, 6, 3, 1, 1, 0),   // 1x1 pointwise (no im2col), O != C
            shape(3, 4, 9, 7, 6, 1, 2, 0),   // 1x1 stride 2 (projection shortcut)
            shape(2, 3, 9, 11, 5, 3, 1, 1),  // 3x3 pad 1
            shape(3, 4, 9, 8, 7, 3, 2, 1),   // 3x3 pad 1 stride 2, odd H, even W
            shape(2, 3, 15, 13, 4, 7, 2, 3), // 7x7 stride 2 pad 3 (the stem)
            shape(1, 6, 5, 5, 4, 3, 1, 1),   // batch 1: threaded GEMM path
            shape(5, 2, 6, 5, 3, 3, 2, 0),   // batch 5 (uneven split), no padding
            shape(2, 3, 1, 1, 2, 3, 1, 1),   // 1x1 input under a padded 3x3 kernel
            shape(2, 3, 2, 3, 2, 3, 2, 1),   // tiny input, stride 2
            shape(2, 2, 3, 9, 3, 7, 1, 3),   // kernel taller than the input (padding covers it)
            shape(4, 5, 3, 3, 6, 1, 1, 0),   // pointwise on a small plane: samples share a GEMM
            shape(7, 3, 5, 4, 5, 1, 2, 0),   // 1x1 stride 2, grouped, uneven last group
            shape(6, 8, 2, 2, 4, 3, 1, 1),   // a deep layer of a small image (2x2 planes)
        ]
    }

    /// Forward, backward data and backward filter of one case against the f64 references.
    fn check_against_naive(s: &Conv2dShape, seed: u64) {
        let x = randn_vec(s.x_len(), seed);
        let w = randn_vec(s.w_len(), seed + 1);
        let dy = randn_vec(s.y_len(), seed + 2);
        let mut y = vec![f32::NAN; s.y_len()];
        conv2d_forward_cpu(&x, &w, s, &mut y);
        let want = to_f32(&naive_forward(&x, &w, s));
        let e = rel_err(&y, &want);
        // f32 GEMM vs f64 sums of at most a few hundred products: well under 1e-5 of the max.
        let threads = rayon::current_num_threads();
        assert!(
            e < 1e-5,
            "{s:?} ({threads} threads): y relative error {e:.3e}"
        );
        let (want_dx, want_dw) = naive_backward(&x, &w, &dy, s);
        let mut dx = vec![f32::NAN; s.x_len()];
        let mut dw = vec![f32::NAN; s.w_len()];
        conv2d_backward_data_cpu(&dy, &w, s, &mut dx);
        conv2d_backward_filter_cpu(&x, &dy, s, &mut dw);
        let ex = rel_err(&dx, &to_f32(&want_dx));
        let ew = rel_err(&dw, &to_f32(&want_dw));
        assert!(
            ex < 1e-5,
            "{s:?} ({threads} threads): dx relative error {ex:.3e}"
        );
        assert!(
            ew < 1e-5,
            "{s:?} ({threads} threads): dw relative error {ew:.3e}"
        );
    }

    #[test]
    fn forward_and_backward_match_naive_f64() {
        let mut all = cases();
        all.push(shape(3, 8, 13, 11, 6, 3, 2, 1)); // a larger one
        for (t, s) in all.iter().enumerate() {
            check_against_naive(s, 10 * t as u64);
        }
    }

    #[test]
    fn every_batch_plan_matches_naive_f64() {
        // The batch is split differently with 1, 2 or 3 threads (samples in parallel or not,
        // several samples per GEMM or one, uneven last groups): all must agree with the naive
        // reference, whatever the machine's core count.
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for (t, s) in cases().iter().enumerate() {
                    let plan = Plan::new(s);
                    assert!(plan.g >= 1 && plan.groups * plan.g >= s.n);
                    check_against_naive(s, 1000 + 10 * t as u64);
                }
            });
        }
    }

    #[test]
    fn tape_forward_has_pytorch_output_shape() {
        let x = randn(&[2, 3, 15, 13], 1);
        let w = randn(&[4, 3, 7, 7], 2);
        let y = Tape::no_grad().conv2d(&x, &w, 2, 3).unwrap();
        assert_eq!(y.shape(), &[2, 4, 8, 7]);
        let s = shape(2, 3, 15, 13, 4, 7, 2, 3);
        let want = to_f32(&naive_forward(x.cpu().unwrap(), w.cpu().unwrap(), &s));
        assert!(rel_err(y.cpu().unwrap(), &want) < 1e-5);
    }

    #[test]
    fn gradients_match_finite_differences() {
        // Relative error bound 2e-3 on f32 central differences (step 1e-3): conv is linear in
        // each input, so the differences are exact up to the f32 rounding of the outputs
        // (passes at 1e-3; 2x margin).
        for (t, s) in [
            shape(2, 3, 5, 4, 2, 3, 1, 1), // 3x3 pad 1
            shape(2, 2, 5, 6, 3, 3, 2, 1), // 3x3 stride 2 pad 1
            shape(2, 3, 4, 3, 2, 1, 1, 0), // 1x1 pointwise
            shape(1, 2, 5, 5, 2, 1, 2, 0), // 1x1 stride 2
            shape(2, 2, 7, 6, 2, 5, 2, 2), // 5x5 stride 2 pad 2
        ]
        .iter()
        .enumerate()
        {
            let x = randn(&[s.n, s.c, s.h, s.w], 40 + t as u64);
            let w = randn(&[s.o, s.c, s.kh, s.kw], 400 + t as u64);
            check_grad(&[x, w], 2e-3, |tape, xs| {
                tape.conv2d(&xs[0], &xs[1], s.stride, s.padding)
            })
            .unwrap_or_else(|e| panic!("{s:?}: {e}"));
        }
    }

    #[test]
    fn only_tracked_inputs_get_gradients() {
        // The stem's images are not tracked: dw only, and it must still be right.
        let s = shape(2, 3, 9, 8, 4, 3, 2, 1);
        let x = randn(&[s.n, s.c, s.h, s.w], 5);
        let w = randn(&[s.o, s.c, s.kh, s.kw], 6);
        let dy = randn(&[s.n, s.o, s.ho(), s.wo()], 7);
        let mut tape = Tape::new();
        let w = tape.track(&w);
        let y = tape.conv2d(&x, &w, s.stride, s.padding).unwrap();
        let grads = tape.backward_from(vec![(y, dy.clone())]).unwrap();
        assert!(grads.get(&x).is_none());
        let (_, want_dw) =
            naive_backward(x.cpu().unwrap(), w.cpu().unwrap(), dy.cpu().unwrap(), &s);
        let dw = grads.get(&w).unwrap();
        assert_eq!(dw.shape(), w.shape());
        assert!(rel_err(dw.cpu().unwrap(), &to_f32(&want_dw)) < 1e-5);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut tape = Tape::new();
        let x = randn(&[2, 3, 5, 5], 1);
        // Channel mismatch.
        let e = tape.conv2d(&x, &randn(&[4, 2, 3, 3], 2), 1, 1).unwrap_err();
        assert!(e.to_string().contains("channels"), "{e}");
        // Kernel larger than the padded input.
        assert!(tape.conv2d(&x, &randn(&[4, 3, 7, 7], 2), 1, 0).is_err());
        // Stride 0.
        assert!(tape.conv2d(&x, &randn(&[4, 3, 3, 3], 2), 0, 1).is_err());
        // Wrong ranks.
        assert!(tape
            .conv2d(&randn(&[3, 5, 5], 1), &randn(&[4, 3, 3, 3], 2), 1, 1)
            .is_err());
        assert!(tape.conv2d(&x, &randn(&[4, 3, 9], 2), 1, 1).is_err());
    }

    /// Sum over (c, ki, kj) for one output element, in f64.
    fn naive_at(
        x: &[f32],
        w: &[f32],
        s: &Conv2dShape,
        n: usize,
        o: usize,
        oy: usize,
        ox: usize,
    ) -> f64 {
        let mut acc = 0.0f64;
        for c in 0..s.c {
            for ki in 0..s.kh {
                for kj in 0..s.kw {
                    if let Some((iy, ix)) = tap(s, oy, ox, ki, kj) {
                        acc += x[((n * s.c + c) * s.h + iy) * s.w + ix] as f64
                            * w[((o * s.c + c) * s.kh + ki) * s.kw + kj] as f64;
                    }
                }
            }
        }
        acc
    }

    #[test]
    fn resnet50_sized_conv_runs() {
        // A layer1 3x3 conv of ResNet50 at 224x224, batch 2, forward and backward through the
        // tape; spot-checks output elements (corners, edges, interior) against the direct sum.
        let s = shape(2, 64, 56, 56, 64, 3, 1, 1);
        let mut tape = Tape::new();
        let x = tape.track(&randn(&[2, 64, 56, 56], 11));
        let w = tape.track(&randn(&[64, 64, 3, 3], 12));
        let y = tape.conv2d(&x, &w, 1, 1).unwrap();
        assert_eq!(y.shape(), &[2, 64, 56, 56]);
        let (xv, wv, yv) = (x.cpu().unwrap(), w.cpu().unwrap(), y.cpu().unwrap());
        for &(n, o, oy, ox) in &[
            (0, 0, 0, 0),
            (1, 63, 55, 55),
            (0, 17, 0, 31),
            (1, 5, 28, 55),
            (1, 40, 23, 7),
        ] {
            let want = naive_at(xv, wv, &s, n, o, oy, ox);
            let got = yv[((n * 64 + o) * 56 + oy) * 56 + ox] as f64;
            assert!(
                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                "y[{n},{o},{oy},{ox}] = {got}, want {want}"
            );
        }
        let dy = randn(&[2, 64, 56, 56], 13);
        let grads = tape.backward_from(vec![(y, dy)]).unwrap();
        let dx = grads.get(&x).unwrap();
        let dw = grads.get(&w).unwrap();
        assert_eq!(dx.shape(), x.shape());
        assert_eq!(dw.shape(), w.shape());
        assert!(dx
            .cpu()
            .unwrap()
            .iter()
            .chain(dw.cpu().unwrap())
            .all(|v| v.is_finite()));
    }

    /// The convolutions of ResNet50 at image x image, as (C, H, O, k, stride, padding, count).
    fn resnet50_convs(image: usize) -> Vec<(usize, usize, usize, usize, usize, usize, usize)> {
        let mut v = vec![(3, image, 64, 7, 2, 3, 1)];
        let mut inp = 64;
        // After the stride-2 stem and the 3x3/2 pad-1 max pool.
        let mut h = ((image - 1) / 2 + 1 - 1) / 2 + 1;
        for (stage, (&width, &blocks)) in [64usize, 128, 256, 512]
            .iter()
            .zip(&[3usize, 4, 6, 3])
            .enumerate()
        {
            let out = width * 4;
            let stride = if stage == 0 { 1 } else { 2 };
            let ho = (h - 1) / stride + 1;
            // First block: 1x1 in->width at h, 3x3 width stride at h, 1x1 width->out at ho,
            // projection 1x1 in->out stride.
            v.push((inp, h, width, 1, 1, 0, 1));
            v.push((width, h, width, 3, stride, 1, 1));
            v.push((width, ho, out, 1, 1, 0, 1));
            v.push((inp, h, out, 1, stride, 0, 1));
            // Remaining blocks.
            v.push((out, ho, width, 1, 1, 0, blocks - 1));
            v.push((width, ho, width, 3, 1, 1, blocks - 1));
            v.push((width, ho, out, 1, 1, 0, blocks - 1));
            inp = out;
            h = ho;
        }
        v
    }

    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn time_resnet50_convs_batch2() {
        let image: usize = std::env::var("CONV_IMAGE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(224);
        let n: usize = std::env::var("CONV_BATCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        let (mut tf, mut td, mut tw) = (0.0, 0.0, 0.0);
        for (c, h, o, k, stride, padding, count) in resnet50_convs(image) {
            let s = shape(n, c, h, h, o, k, stride, padding);
            let x = randn_vec(s.x_len(), 1);
            let w = randn_vec(s.w_len(), 2);
            let dy = randn_vec(s.y_len(), 3);
            let mut y = vec![0.0; s.y_len()];
            let mut dx = vec![0.0; s.x_len()];
            let mut dw = vec![0.0; s.w_len()];
            let t0 = std::time::Instant::now();
            conv2d_forward_cpu(&x, &w, &s, &mut y);
            let t1 = std::time::Instant::now();
            if c != 3 {
                conv2d_backward_data_cpu(&dy, &w, &s, &mut dx);
            }
            let t2 = std::time::Instant::now();
            conv2d_backward_filter_cpu(&x, &dy, &s, &mut dw);
            let t3 = std::time::Instant::now();
            let (f, d, ww) = (
                (t1 - t0).as_secs_f64() * count as f64,
                (t2 - t1).as_secs_f64() * count as f64,
                (t3 - t2).as_secs_f64() * count as f64,
            );
            println!("C={c:4} H={h:3} O={o:4} k={k} s={stride} x{count}: fwd {f:.3}s data {d:.3}s filter {ww:.3}s");
            tf += f;
            td += d;
            tw += ww;
        }
        println!("ResNet50 convs, {image}x{image}, batch {n}: forward {tf:.2}s, backward data {td:.2}s, backward filter {tw:.2}s, total {:.2}s", tf + td + tw);
    }
    /// conv2d through the tape on `dev` (forward, dx and dw) against the naive f64 forward and
    /// backward, on odd small shapes and ResNet50's (batch 2): the stem, a layer1 3x3, the
    /// layer2.0 strided 3x3, a layer3 1x1 reduce and the layer4.0 strided downsample. CPU bound
    /// 1e-5 of the largest value (as [`check_against_naive`]); on a GPU also against the CPU op
    /// within 1e-4 (cuDNN without TF32, other summation orders; gpu_tape's former bound).
    fn conv2d_matches_naive_f64_on(dev: &Device) {
        // (n, c, h, w, o, k, stride, padding)
        let cases = [
            shape(2, 3, 9, 11, 5, 3, 2, 1),
            shape(3, 4, 7, 6, 6, 1, 1, 0),
            shape(1, 2, 5, 5, 3, 5, 1, 2),
            shape(2, 3, 224, 224, 64, 7, 2, 3),
            shape(2, 64, 56, 56, 64, 3, 1, 1),
            shape(2, 128, 56, 56, 128, 3, 2, 1),
            shape(2, 1024, 14, 14, 256, 1, 1, 0),
            shape(2, 1024, 14, 14, 2048, 1, 2, 0),
        ];
        for (i, s) in cases.iter().enumerate() {
            let (xs, ws) = ([s.n, s.c, s.h, s.w], [s.o, s.c, s.kh, s.kw]);
            let x = randn(&xs, 100 + i as u64);
            let w = randn(&ws, 200 + i as u64);
            let dy = randn(&[s.n, s.o, s.ho(), s.wo()], 300 + i as u64);
            let (xv, wv) = (x.cpu().unwrap(), w.cpu().unwrap());
            let (dx, dw) = naive_backward(xv, wv, dy.cpu().unwrap(), s);
            let want = TapeRun {
                outputs: vec![naive_forward(xv, wv, s)],
                grads: vec![Some(dx), Some(dw)],
            };
            let (stride, padding) = (s.stride, s.padding);
            let conv = move |t: &mut Tape, v: &[Tensor]| {
                Ok(vec![t.conv2d(&v[0], &v[1], stride, padding)?])
            };
            let name = format!("conv2d x{xs:?} w{ws:?} s{stride} p{padding}");
            let (cpu, gpu) = (Tol::new(1e-5, 1e-5), Tol::new(1e-4, 1e-4));
            check_tape_op(dev, &name, &[x, w], &dy, &conv, &want, cpu, gpu);
        }
    }
    crate::test_device!(
        conv2d_matches_naive_f64_on,
        conv2d_matches_naive_f64_cpu,
        conv2d_matches_naive_f64_cuda
    );
}
