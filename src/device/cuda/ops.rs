//! Typed launchers for every kernel in `kernels/*.cu`. Each checks the buffer sizes against the
//! shape it is given (an error names the op and the sizes), then queues the kernel on the
//! backend's stream. Outputs are overwritten unless the name says otherwise (`accumulate`).

use cudarc::driver::LaunchConfig;

use super::{launch, CudaBackend, DeviceBuffer};
use crate::device::{DType, Layout};
use crate::error::{Error, Result};

/// Threads per block for the elementwise (grid-stride) kernels.
const THREADS: u32 = 256;

/// An f32 (or int32) buffer of at least `n` elements: the kernels without a bf16 variant.
fn need(op: &str, name: &str, buf: &DeviceBuffer, n: usize) -> Result<()> {
    need_dt(op, name, buf, n, DType::F32)
}

/// A buffer of at least `n` elements of `dt` (an activation of a kernel with f32 and bf16
/// variants: every activation of one call has the first input's type).
fn need_dt(op: &str, name: &str, buf: &DeviceBuffer, n: usize, dt: DType) -> Result<()> {
    if buf.dtype() != dt {
        return Err(Error::Device(format!(
            "{op}: {name} is a {} buffer where {dt} is needed (this op has no {} kernel, or \
             its inputs mix element types)",
            buf.dtype(),
            buf.dtype()
        )));
    }
    if buf.len() < n {
        return Err(Error::Shape(format!(
            "{op}: {name} holds {} values, needs {n}",
            buf.len()
        )));
    }
    Ok(())
}

/// Every named buffer has `layout` (the activations of one call share the first input's).
fn need_layout(op: &str, bufs: &[(&str, &DeviceBuffer)], layout: Layout) -> Result<()> {
    for (name, b) in bufs {
        if b.layout() != layout {
            return Err(Error::Device(format!(
                "{op}: {name} is {} where {layout} is needed (convert it to the input's layout)",
                b.layout()
            )));
        }
    }
    Ok(())
}

/// The kernel `base` for element type `dt`: `bn_forward` -> `bn_forward_f32` / `_bf16`.
fn kname(base: &str, dt: DType) -> String {
    format!("{base}_{dt}")
}

fn i64_of(x: usize) -> i64 {
    // usize -> i64 cannot overflow for any buffer a GPU can hold (< 2^63 bytes).
    x as i64
}

fn i32_of(op: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::Shape(format!("{op}: size {x} exceeds i32")))
}

fn one_block(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads for a kernel whose block reduces `n` values: a multiple of 32 in [32, max].
fn reduce_threads(n: usize, max: u32) -> u32 {
    let t = (n.max(1).next_power_of_two() as u32).clamp(32, max);
    t.div_ceil(32) * 32
}

/// Slices per channel for the BN reductions over `m` elements per channel (see
/// `CudaBackend::bn_reduce_cfg`): enough that c * s reaches 8 blocks per SM, none shorter
/// than BN_MIN_SLICE elements, in [1, BN_MAX_SLICES].
fn bn_slices(c: usize, m: usize, num_sms: usize) -> usize {
    const BN_MIN_SLICE: usize = 4096;
    const BN_MAX_SLICES: usize = 1024;
    (8 * num_sms)
        .div_ceil(c.max(1))
        .min(m.div_ceil(BN_MIN_SLICE))
        .clamp(1, BN_MAX_SLICES)
}

/// The (n, hw) the elementwise BN kernels run over for a tensor of `layout`: NCHW as it is;
/// NHWC as (n * hw, 1), where the flat index's `i % c` is the channel.
fn bn_rows(layout: Layout, n: usize, hw: usize) -> (usize, usize) {
    match layout {
        Layout::Nchw => (n, hw),
        Layout::Nhwc => (n * hw, 1),
    }
}

/// Row slices for the channels-last BN reductions over `r` rows, with `col_blocks` blocks across
/// the channels (`CudaBackend::bn_nhwc_reduce_cfg`): enough that col_blocks * s reaches 8 blocks
/// per SM, none shorter than 256 rows, in [1, 1024].
fn bn_nhwc_slices(col_blocks: usize, r: usize, num_sms: usize) -> usize {
    (8 * num_sms)
        .div_ceil(col_blocks.max(1))
        .min(r.div_ceil(256))
        .clamp(1, 1024)
}

/// Whether the channels-last reductions take 4 channels per thread (kernels/batchnorm.cu
/// `bn_nhwc_v4`, the same rule): c % 4 == 0 and every activation pointer (0: absent) aligned to
/// 4 elements of `dt`. The grid depends on it, so host and kernel must agree.
fn nhwc_v4(c: usize, dt: DType, ptrs: &[u64]) -> bool {
    let align = 4 * dt.size() as u64;
    c.is_multiple_of(4) && ptrs.iter().all(|&p| p % align == 0)
}

/// The channels-last reduction block for `g` channel groups (kernels/batchnorm.cu "LAUNCH
/// GEOMETRY"): (tx, ty) with tx = min(32, g rounded up to a power of two), tx * ty = 256.
fn bn_nhwc_block(g: usize) -> (u32, u32) {
    let tx = g.max(1).next_power_of_two().min(32) as u32;
    (tx, 256 / tx)
}

/// Whether channels-last BN statistics take two passes over x (sums, then squared deviations
/// from the mean: the NCHW kernels' method) instead of one pass of shifted sums: the run option
/// `bn_stats`, for A/B runs and as a fallback.
fn bn_two_pass() -> bool {
    crate::options::current().bn_stats == crate::options::BnStats::TwoPass
}

/// Max-pool geometry over (n, c, h, w) planes: square window `k`, `stride`, zero-free
/// padding (padding acts as -inf). ho = (h + 2 pad - k) / stride + 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pool2dShape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Pool2dShape {
    pub fn out_hw(&self) -> Result<(usize, usize)> {
        if self.k == 0 || self.stride == 0 || self.padding * 2 > self.k {
            return Err(Error::Shape(format!(
                "max_pool2d: invalid window {self:?} (need k > 0, stride > 0, padding <= k / 2)"
            )));
        }
        if self.h + 2 * self.padding < self.k || self.w + 2 * self.padding < self.k {
            return Err(Error::Shape(format!(
                "max_pool2d: input smaller than the window: {self:?}"
            )));
        }
        Ok((
            (self.h + 2 * self.padding - self.k) / self.stride + 1,
            (self.w + 2 * self.padding - self.k) / self.stride + 1,
        ))
    }
}

impl CudaBackend {
    fn elementwise_cfg(&self, n: usize) -> LaunchConfig {
        self.grid_1d(n, THREADS)
    }

    // ---------------------------------------------------------------- elementwise.cu

    /// y = a + b, over all of `y`'s elements (a and b at least as long, all of y's element
    /// type; bf16: the f32 sum rounded once).
    pub fn add(&self, a: &DeviceBuffer, b: &DeviceBuffer, y: &mut DeviceBuffer) -> Result<()> {
        let dt = y.dtype();
        let n = y.len();
        need_dt("add", "a", a, n, dt)?;
        need_dt("add", "b", b, n, dt)?;
        // Elementwise over the raw arrays: correct only when all three share one layout (an
        // NHWC a plus an NCHW b would add unrelated elements without any error).
        need_layout("add", &[("a", a), ("b", b)], y.layout())?;
        if n == 0 {
            return Ok(());
        }
        let (pa, pb, py, nn) = (a.ptr(), b.ptr(), y.ptr(), i64_of(n));
        launch!(
            self,
            &kname("add", dt),
            self.elementwise_cfg(n),
            pa,
            pb,
            py,
            nn
        );
        Ok(())
    }

    /// y = x in y's element type and layout; x and y hold (n, c, hw) values (any shape is
    /// n = c = 1). f32 -> bf16 rounds to nearest even (as `tensor::round_bf16`), bf16 -> f32 is
    /// exact; NCHW <-> NHWC is for bf16 storage (f32 is NCHW only); the same format is a copy.
    pub fn convert(
        &self,
        x: &DeviceBuffer,
        n: usize,
        c: usize,
        hw: usize,
        y: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "convert";
        let total = n * c * hw;
        need_dt(op, "x", x, total, x.dtype())?;
        need_dt(op, "y", y, total, y.dtype())?;
        if total == 0 {
            return Ok(());
        }
        use DType::{Bf16, F32};
        use Layout::{Nchw, Nhwc};
        let (px, py) = (x.ptr(), y.ptr());
        let cfg = self.elementwise_cfg(total);
        let name = match ((x.dtype(), x.layout()), (y.dtype(), y.layout())) {
            (a, b) if a == b => {
                return self.copy_dtod_range(x, 0, y, 0, total * x.dtype().size());
            }
            ((F32, Nchw), (Bf16, Nchw)) => "cast_f32_bf16",
            ((Bf16, Nchw), (F32, Nchw)) => "cast_bf16_f32",
            ((F32, Nchw), (Bf16, Nhwc)) => "nchw_to_nhwc_f32_bf16",
            ((Bf16, Nchw), (Bf16, Nhwc)) => "nchw_to_nhwc_bf16_bf16",
            ((Bf16, Nhwc), (F32, Nchw)) => "nhwc_to_nchw_bf16_f32",
            ((Bf16, Nhwc), (Bf16, Nchw)) => "nhwc_to_nchw_bf16_bf16",
            (a, b) => {
                return Err(Error::Device(format!(
                    "{op}: no conversion from {} {} to {} {}",
                    a.0, a.1, b.0, b.1
                )))
            }
        };
        if name.starts_with("cast") {
            let nn = i64_of(total);
            launch!(self, name, cfg, px, py, nn);
        } else if c <= 8 && hw != 1 {
            // A few channels (the images; c <= TRANSPOSE_SMALL_C in kernels/elementwise.cu): the
            // kernels' per-pixel path, grid-stride over the n * hw pixels on any grid.
            let cfg = self.grid_1d(n * hw, THREADS);
            let (nn, cc, hh) = (i64_of(n), i32_of(op, c)?, i64_of(hw));
            launch!(self, name, cfg, px, py, nn, cc, hh);
        } else {
            // The tiled transposes' geometry (kernels/elementwise.cu): 32 x 32 tiles of each
            // sample's (C, HW) plane, blocks of (32, 8), samples along z (grid-stride past
            // 65535).
            let cfg = LaunchConfig {
                grid_dim: (
                    u32::try_from(hw.div_ceil(32))
                        .map_err(|_| Error::Shape(format!("{op}: plane of {hw} too large")))?,
                    u32::try_from(c.div_ceil(32))
                        .map_err(|_| Error::Shape(format!("{op}: {c} channels too many")))?,
                    n.min(65535) as u32,
                ),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            let (nn, cc, hh) = (i64_of(n), i32_of(op, c)?, i64_of(hw));
            launch!(self, name, cfg, px, py, nn, cc, hh);
        }
        Ok(())
    }

    /// y += x (gradient accumulation), over y's elements.
    pub fn accumulate(&self, y: &mut DeviceBuffer, x: &DeviceBuffer) -> Result<()> {
        let n = y.len32();
        need("accumulate", "y", y, n)?;
        need("accumulate", "x", x, n)?;
        if n == 0 {
            return Ok(());
        }
        let (py, px, nn) = (y.ptr(), x.ptr(), i64_of(n));
        launch!(self, "accumulate_f32", self.elementwise_cfg(n), py, px, nn);
        Ok(())
    }

    /// y = alpha * x, over y's elements.
    pub fn scale(&self, x: &DeviceBuffer, alpha: f32, y: &mut DeviceBuffer) -> Result<()> {
        let n = y.len32();
        need("scale", "y", y, n)?;
        need("scale", "x", x, n)?;
        if n == 0 {
            return Ok(());
        }
        let (px, py, nn) = (x.ptr(), y.ptr(), i64_of(n));
        launch!(
            self,
            "scale_f32",
            self.elementwise_cfg(n),
            px,
            alpha,
            py,
            nn
        );
        Ok(())
    }

    /// y *= alpha, in place.
    pub fn scale_in_place(&self, y: &mut DeviceBuffer, alpha: f32) -> Result<()> {
        let n = y.len32();
        need("scale_in_place", "y", y, n)?;
        if n == 0 {
            return Ok(());
        }
        let (py, nn) = (y.ptr(), i64_of(n));
        // The kernel reads x[i] then writes y[i] in the same thread: aliasing is safe.
        launch!(
            self,
            "scale_f32",
            self.elementwise_cfg(n),
            py,
            alpha,
            py,
            nn
        );
        Ok(())
    }

    /// Every f32 of y = value (zeros; NaN poisoning in tests).
    pub fn fill(&self, y: &mut DeviceBuffer, value: f32) -> Result<()> {
        let n = y.len32();
        need("fill", "y", y, n)?;
        if n == 0 {
            return Ok(());
        }
        let (py, nn) = (y.ptr(), i64_of(n));
        launch!(self, "fill_f32", self.elementwise_cfg(n), py, value, nn);
        Ok(())
    }

    fn unary(&self, name: &str, x: &DeviceBuffer, y: &mut DeviceBuffer) -> Result<()> {
        let n = y.len32();
        need(name, "y", y, n)?;
        need(name, "x", x, n)?;
        if n == 0 {
            return Ok(());
        }
        let (px, py, nn) = (x.ptr(), y.ptr(), i64_of(n));
        launch!(self, name, self.elementwise_cfg(n), px, py, nn);
        Ok(())
    }

    fn binary_bwd(
        &self,
        name: &str,
        x: &DeviceBuffer,
        dy: &DeviceBuffer,
        dx: &mut DeviceBuffer,
    ) -> Result<()> {
        let n = dx.len32();
        need(name, "dx", dx, n)?;
        need(name, "x", x, n)?;
        need(name, "dy", dy, n)?;
        if n == 0 {
            return Ok(());
        }
        let (px, pdy, pdx, nn) = (x.ptr(), dy.ptr(), dx.ptr(), i64_of(n));
        launch!(self, name, self.elementwise_cfg(n), px, pdy, pdx, nn);
        Ok(())
    }

    /// y = max(x, 0).
    pub fn relu_forward(&self, x: &DeviceBuffer, y: &mut DeviceBuffer) -> Result<()> {
        self.unary("relu_fwd_f32", x, y)
    }
    /// dx = dy where x > 0 (x: the forward input or output).
    pub fn relu_backward(
        &self,
        x: &DeviceBuffer,
        dy: &DeviceBuffer,
        dx: &mut DeviceBuffer,
    ) -> Result<()> {
        self.binary_bwd("relu_bwd_f32", x, dy, dx)
    }
    /// Exact (erf) GELU.
    pub fn gelu_forward(&self, x: &DeviceBuffer, y: &mut DeviceBuffer) -> Result<()> {
        self.unary("gelu_fwd_f32", x, y)
    }
    /// dx = dy * GELU'(x), x the forward input.
    pub fn gelu_backward(
        &self,
        x: &DeviceBuffer,
        dy: &DeviceBuffer,
        dx: &mut DeviceBuffer,
    ) -> Result<()> {
        self.binary_bwd("gelu_bwd_f32", x, dy, dx)
    }

    /// y (rows, cols) += b (cols,) on every row.
    pub fn bias_add(
        &self,
        y: &mut DeviceBuffer,
        b: &DeviceBuffer,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        need("bias_add", "y", y, rows * cols)?;
        need("bias_add", "b", b, cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let (py, pb, r, c) = (y.ptr(), b.ptr(), i64_of(rows), i64_of(cols));
        launch!(
            self,
            "bias_add_f32",
            self.elementwise_cfg(rows * cols),
            py,
            pb,
            r,
            c
        );
        Ok(())
    }

    /// out (cols,) = column sums of x (rows, cols) (the bias gradient).
    pub fn col_sum(
        &self,
        x: &DeviceBuffer,
        rows: usize,
        cols: usize,
        out: &mut DeviceBuffer,
    ) -> Result<()> {
        need("col_sum", "x", x, rows * cols)?;
        need("col_sum", "out", out, cols)?;
        if cols == 0 {
            return Ok(());
        }
        let (px, po, r, c) = (x.ptr(), out.ptr(), i64_of(rows), i64_of(cols));
        launch!(
            self,
            "col_sum_f32",
            self.elementwise_cfg(cols),
            px,
            po,
            r,
            c
        );
        Ok(())
    }

    /// out[0] = sum of the first `n` values of x (one block; for small buffers).
    pub fn sum(&self, x: &DeviceBuffer, n: usize, out: &mut DeviceBuffer) -> Result<()> {
        need("sum", "x", x, n)?;
        need("sum", "out", out, 1)?;
        let (px, po, nn) = (x.ptr(), out.ptr(), i64_of(n));
        launch!(self, "sum_f32", one_block(1024), px, po, nn);
        Ok(())
    }

    // ---------------------------------------------------------------- batchnorm.cu

    /// Grid for the per-channel partial reductions over `m` = n * hw elements per channel:
    /// (c, s) blocks, with s slices per channel so that c * s reaches ~8 blocks per SM (a small
    /// c, like the stem's 64 channels of 6.4M elements, would otherwise leave most SMs idle),
    /// but no slice shorter than BN_MIN_SLICE elements (tiny reductions stay one block). The
    /// partials are combined by a finalize kernel (`bn_finalize_cfg`). Returns (config, s).
    fn bn_reduce_cfg(&self, c: usize, m: usize) -> (LaunchConfig, u32) {
        let s = bn_slices(c, m, self.num_sms as usize);
        let cfg = LaunchConfig {
            grid_dim: (c as u32, s as u32, 1),
            block_dim: (reduce_threads(m.div_ceil(s), 256), 1, 1),
            shared_mem_bytes: 0,
        };
        (cfg, s as u32)
    }

    /// Grid for the channels-last partial reductions over `r` rows of `c` channels, `v4`
    /// (`nhwc_v4`) channels per thread in groups of 4: blocks of (tx, ty) = `bn_nhwc_block`
    /// threads, tx channel groups by ty row walkers, s row slices so that the blocks reach ~8 per
    /// SM, no slice shorter than 256 rows. The partials have the NCHW kernels' (c, s) layout,
    /// combined by the same finalize kernels. Returns (config, s).
    fn bn_nhwc_reduce_cfg(&self, c: usize, r: usize, v4: bool) -> (LaunchConfig, u32) {
        let groups = if v4 { c / 4 } else { c };
        let (tx, ty) = bn_nhwc_block(groups);
        let cb = groups.div_ceil(tx as usize).max(1);
        let s = bn_nhwc_slices(cb, r, self.num_sms as usize);
        let cfg = LaunchConfig {
            grid_dim: (cb as u32, s as u32, 1),
            block_dim: (tx, ty, 1),
            shared_mem_bytes: 0,
        };
        (cfg, s as u32)
    }

    /// The per-channel partial-reduction grid for x's `layout` over `m` = n * hw elements per
    /// channel (`bn_reduce_cfg` or `bn_nhwc_reduce_cfg`; `v4` only matters for NHWC). Returns
    /// (config, s).
    fn bn_reduce_cfg_for(
        &self,
        layout: Layout,
        c: usize,
        m: usize,
        v4: bool,
    ) -> (LaunchConfig, u32) {
        match layout {
            Layout::Nchw => self.bn_reduce_cfg(c, m),
            Layout::Nhwc => self.bn_nhwc_reduce_cfg(c, m, v4),
        }
    }

    /// One block per channel combining `s` partials each.
    fn bn_finalize_cfg(c: usize, s: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (c as u32, 1, 1),
            block_dim: (reduce_threads(s as usize, 256), 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Grid for the elementwise BN kernels over (n, c, hw): they take float4 steps when
    /// hw % 4 == 0 (and the buffers are 16-byte aligned), so a quarter of the threads suffice.
    fn bn_elementwise_cfg(&self, total: usize, hw: usize) -> LaunchConfig {
        if hw.is_multiple_of(4) {
            self.elementwise_cfg(total / 4)
        } else {
            self.elementwise_cfg(total)
        }
    }

    /// Training statistics of x (n, c, hw): mean, invstd = 1/sqrt(var_biased + eps) and the
    /// unbiased variance (for the running update), each (c,). Two passes over x on a (c, s)
    /// grid (partial sums -> mean, then partial squared deviations -> variance) and a finalize
    /// kernel; the (c, s) partials live in workspaces from the caching pool.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_stats(
        &self,
        x: &DeviceBuffer,
        n: usize,
        c: usize,
        hw: usize,
        eps: f32,
        mean: &mut DeviceBuffer,
        invstd: &mut DeviceBuffer,
        var_unbiased: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "batch_norm_stats";
        let dt = x.dtype();
        need_dt(op, "x", x, n * c * hw, dt)?;
        need(op, "mean", mean, c)?;
        need(op, "invstd", invstd, c)?;
        need(op, "var", var_unbiased, c)?;
        if n * hw == 0 {
            return Err(Error::Shape(format!("{op}: empty batch (n={n}, hw={hw})")));
        }
        if c == 0 {
            return Ok(());
        }
        let cc = i32_of(op, c)?;
        let nhwc = x.layout() == Layout::Nhwc;
        let v4 = nhwc_v4(c, dt, &[x.ptr()]);
        let (rcfg, s) = self.bn_reduce_cfg_for(x.layout(), c, n * hw, v4);
        // (c, s) workspaces: per-block partial sums, then partial squared deviations.
        let part_sum = self.alloc_f32(c * s as usize)?;
        let part_sq = self.alloc_f32(c * s as usize)?;
        let (px, pps, ppq) = (x.ptr(), part_sum.ptr(), part_sq.ptr());
        let (pm, pi, pv) = (mean.ptr(), invstd.ptr(), var_unbiased.ptr());
        // (R, C) rows of channels for NHWC, R = n * hw.
        let (nn, hh, ss, rr) = (i64_of(n), i64_of(hw), s as i32, i64_of(n * hw));
        let fcfg = Self::bn_finalize_cfg(c, s);
        if nhwc && !bn_two_pass() {
            // One read of x: shifted sums (kernels/batchnorm.cu bn_stats_partial_nhwc_T), the
            // shift per channel in a (c,) workspace.
            let shift = self.alloc_f32(c)?;
            let psh = shift.ptr();
            launch!(
                self,
                &kname("bn_stats_partial_nhwc", dt),
                rcfg,
                px,
                pps,
                ppq,
                psh,
                rr,
                cc
            );
            launch!(
                self,
                "bn_stats_finalize_shifted_f32",
                fcfg,
                pps,
                ppq,
                psh,
                pm,
                pi,
                pv,
                rr,
                ss,
                eps
            );
            return Ok(());
        }
        if nhwc {
            launch!(
                self,
                &kname("bn_sum_partial_nhwc", dt),
                rcfg,
                px,
                pps,
                rr,
                cc
            );
            launch!(
                self,
                &kname("bn_sqdev_partial_nhwc", dt),
                rcfg,
                px,
                pps,
                ppq,
                rr,
                cc
            );
        } else {
            launch!(
                self,
                &kname("bn_sum_partial", dt),
                rcfg,
                px,
                pps,
                nn,
                cc,
                hh
            );
            launch!(
                self,
                &kname("bn_sqdev_partial", dt),
                rcfg,
                px,
                pps,
                ppq,
                nn,
                cc,
                hh
            );
        }
        launch!(
            self,
            "bn_stats_finalize_f32",
            fcfg,
            pps,
            ppq,
            pm,
            pi,
            pv,
            nn,
            hh,
            ss,
            eps
        );
        Ok(())
    }

    /// y = (x - mean) * invstd * gamma + beta per channel. Training: the batch statistics;
    /// eval: running mean and `batch_norm_invstd(running_var)`.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_forward(
        &self,
        x: &DeviceBuffer,
        mean: &DeviceBuffer,
        invstd: &DeviceBuffer,
        gamma: &DeviceBuffer,
        beta: &DeviceBuffer,
        n: usize,
        c: usize,
        hw: usize,
        y: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "batch_norm_forward";
        let total = n * c * hw;
        let dt = x.dtype();
        need_dt(op, "x", x, total, dt)?;
        need_dt(op, "y", y, total, dt)?;
        for (nm, b) in [
            ("mean", mean),
            ("invstd", invstd),
            ("gamma", gamma),
            ("beta", beta),
        ] {
            need(op, nm, b, c)?;
        }
        if total == 0 {
            return Ok(());
        }
        let (px, pm, pi, pg, pb, py) = (
            x.ptr(),
            mean.ptr(),
            invstd.ptr(),
            gamma.ptr(),
            beta.ptr(),
            y.ptr(),
        );
        need_layout(op, &[("y", y)], x.layout())?;
        let (n, hw) = bn_rows(x.layout(), n, hw);
        let (nn, cc, hh) = (i64_of(n), i32_of(op, c)?, i64_of(hw));
        let cfg = self.bn_elementwise_cfg(total, hw);
        launch!(
            self,
            &kname("bn_forward", dt),
            cfg,
            px,
            pm,
            pi,
            pg,
            pb,
            py,
            nn,
            cc,
            hh
        );
        Ok(())
    }

    /// invstd = 1 / sqrt(var + eps), (c,) (eval mode, from the running variance).
    pub fn batch_norm_invstd(
        &self,
        var: &DeviceBuffer,
        c: usize,
        eps: f32,
        invstd: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "batch_norm_invstd";
        need(op, "var", var, c)?;
        need(op, "invstd", invstd, c)?;
        if c == 0 {
            return Ok(());
        }
        let (pv, pi, cc) = (var.ptr(), invstd.ptr(), i32_of(op, c)?);
        launch!(
            self,
            "bn_invstd_f32",
            self.elementwise_cfg(c),
            pv,
            pi,
            cc,
            eps
        );
        Ok(())
    }

    /// Backward of batch norm. `training`: the statistics were the batch's (mean/invstd from
    /// batch_norm_stats) and depend on x; otherwise they are the running ones (constants).
    /// Writes dx (n, c, hw), dgamma (c,), dbeta (c,).
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_backward(
        &self,
        training: bool,
        dy: &DeviceBuffer,
        x: &DeviceBuffer,
        mean: &DeviceBuffer,
        invstd: &DeviceBuffer,
        gamma: &DeviceBuffer,
        n: usize,
        c: usize,
        hw: usize,
        dx: &mut DeviceBuffer,
        dgamma: &mut DeviceBuffer,
        dbeta: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "batch_norm_backward";
        let total = n * c * hw;
        let dt = x.dtype();
        for (nm, b) in [("dy", dy), ("x", x)] {
            need_dt(op, nm, b, total, dt)?;
        }
        need_dt(op, "dx", dx, total, dt)?;
        for (nm, b) in [("mean", mean), ("invstd", invstd), ("gamma", gamma)] {
            need(op, nm, b, c)?;
        }
        need(op, "dgamma", dgamma, c)?;
        need(op, "dbeta", dbeta, c)?;
        if total == 0 {
            return Err(Error::Shape(format!(
                "{op}: empty input (n={n}, c={c}, hw={hw})"
            )));
        }
        let nhwc = x.layout() == Layout::Nhwc;
        need_layout(op, &[("dy", dy), ("dx", dx)], x.layout())?;
        let (pdy, px, pm, pi, pg) = (dy.ptr(), x.ptr(), mean.ptr(), invstd.ptr(), gamma.ptr());
        let (pdx, pdg, pdb) = (dx.ptr(), dgamma.ptr(), dbeta.ptr());
        let v4 = nhwc_v4(c, dt, &[pdy, px]);
        let (rcfg, s) = self.bn_reduce_cfg_for(x.layout(), c, n * hw, v4);
        let (n, hw) = bn_rows(x.layout(), n, hw);
        let (nn, cc, hh) = (i64_of(n), i32_of(op, c)?, i64_of(hw));
        // (c, s) workspaces: per-block partials of sum dy * xhat and sum dy.
        let part_g = self.alloc_f32(c * s as usize)?;
        let part_b = self.alloc_f32(c * s as usize)?;
        let (ppg, ppb, ss) = (part_g.ptr(), part_b.ptr(), s as i32);
        if nhwc {
            launch!(
                self,
                &kname("bn_backward_partial_nhwc", dt),
                rcfg,
                pdy,
                px,
                pm,
                pi,
                ppg,
                ppb,
                nn,
                cc
            );
        } else {
            launch!(
                self,
                &kname("bn_backward_partial", dt),
                rcfg,
                pdy,
                px,
                pm,
                pi,
                ppg,
                ppb,
                nn,
                cc,
                hh
            );
        }
        let fcfg = Self::bn_finalize_cfg(c, s);
        launch!(
            self,
            "bn_backward_finalize_f32",
            fcfg,
            ppg,
            ppb,
            pdg,
            pdb,
            ss
        );
        let cfg = self.bn_elementwise_cfg(total, hw);
        if training {
            launch!(
                self,
                &kname("bn_backward_dx", dt),
                cfg,
                pdy,
                px,
                pm,
                pi,
                pg,
                pdg,
                pdb,
                pdx,
                nn,
                cc,
                hh
            );
        } else {
            launch!(
                self,
                &kname("bn_eval_backward_dx", dt),
                cfg,
                pdy,
                pi,
                pg,
                pdx,
                nn,
                cc,
                hh
            );
        }
        Ok(())
    }

    /// In place: r = (1 - momentum) r + momentum * batch (unbiased variance for r_var).
    pub fn batch_norm_running_update(
        &self,
        running_mean: &mut DeviceBuffer,
        running_var: &mut DeviceBuffer,
        batch_mean: &DeviceBuffer,
        batch_var_unbiased: &DeviceBuffer,
        c: usize,
        momentum: f32,
    ) -> Result<()> {
        let op = "batch_norm_running_update";
        need(op, "running_mean", running_mean, c)?;
        need(op, "running_var", running_var, c)?;
        need(op, "batch_mean", batch_mean, c)?;
        need(op, "batch_var", batch_var_unbiased, c)?;
        if c == 0 {
            return Ok(());
        }
        let (a, b, m, v) = (
            running_mean.ptr(),
            running_var.ptr(),
            batch_mean.ptr(),
            batch_var_unbiased.ptr(),
        );
        let cc = i32_of(op, c)?;
        launch!(
            self,
            "bn_running_update_f32",
            self.elementwise_cfg(c),
            a,
            b,
            m,
            v,
            momentum,
            cc
        );
        Ok(())
    }

    // ---------------------------------------------------------------- pool.cu

    /// Max pool: y and argmax (i32, index inside the input plane) are (n, c, ho, wo).
    pub fn max_pool2d_forward(
        &self,
        s: &Pool2dShape,
        x: &DeviceBuffer,
        y: &mut DeviceBuffer,
        argmax: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "max_pool2d_forward";
        let (ho, wo) = s.out_hw()?;
        let nc = s.n * s.c;
        let dt = x.dtype();
        need_dt(op, "x", x, nc * s.h * s.w, dt)?;
        need_dt(op, "y", y, nc * ho * wo, dt)?;
        need(op, "argmax", argmax, nc * ho * wo)?;
        if nc == 0 {
            return Ok(());
        }
        let (px, py, pa) = (x.ptr(), y.ptr(), argmax.ptr());
        let (ncc, h, w) = (i64_of(nc), i32_of(op, s.h)?, i32_of(op, s.w)?);
        let (hoi, woi) = (i32_of(op, ho)?, i32_of(op, wo)?);
        let (k, st, p) = (
            i32_of(op, s.k)?,
            i32_of(op, s.stride)?,
            i32_of(op, s.padding)?,
        );
        let cfg = self.elementwise_cfg(nc * ho * wo);
        if x.layout() == Layout::Nhwc {
            need_layout(op, &[("y", &*y)], Layout::Nhwc)?;
            let (nb, cc) = (i64_of(s.n), i32_of(op, s.c)?);
            launch!(
                self,
                &kname("maxpool2d_fwd_nhwc", dt),
                cfg,
                px,
                py,
                pa,
                nb,
                cc,
                h,
                w,
                hoi,
                woi,
                k,
                st,
                p
            );
            return Ok(());
        }
        need_layout(op, &[("y", &*y)], Layout::Nchw)?;
        launch!(
            self,
            &kname("maxpool2d_fwd", dt),
            cfg,
            px,
            py,
            pa,
            ncc,
            h,
            w,
            hoi,
            woi,
            k,
            st,
            p
        );
        Ok(())
    }

    /// Max pool backward: dx (n, c, h, w), every element written (gather, no atomics).
    pub fn max_pool2d_backward(
        &self,
        s: &Pool2dShape,
        dy: &DeviceBuffer,
        argmax: &DeviceBuffer,
        dx: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "max_pool2d_backward";
        let (ho, wo) = s.out_hw()?;
        let nc = s.n * s.c;
        let dt = dy.dtype();
        need_dt(op, "dy", dy, nc * ho * wo, dt)?;
        need(op, "argmax", argmax, nc * ho * wo)?;
        need_dt(op, "dx", dx, nc * s.h * s.w, dt)?;
        if nc == 0 {
            return Ok(());
        }
        let (pdy, pa, pdx) = (dy.ptr(), argmax.ptr(), dx.ptr());
        let (ncc, h, w) = (i64_of(nc), i32_of(op, s.h)?, i32_of(op, s.w)?);
        let (hoi, woi) = (i32_of(op, ho)?, i32_of(op, wo)?);
        let (k, st, p) = (
            i32_of(op, s.k)?,
            i32_of(op, s.stride)?,
            i32_of(op, s.padding)?,
        );
        let cfg = self.elementwise_cfg(nc * s.h * s.w);
        if dy.layout() == Layout::Nhwc {
            need_layout(op, &[("dx", &*dx)], Layout::Nhwc)?;
            let (nb, cc) = (i64_of(s.n), i32_of(op, s.c)?);
            launch!(
                self,
                &kname("maxpool2d_bwd_nhwc", dt),
                cfg,
                pdy,
                pa,
                pdx,
                nb,
                cc,
                h,
                w,
                hoi,
                woi,
                k,
                st,
                p
            );
            return Ok(());
        }
        need_layout(op, &[("dx", &*dx)], Layout::Nchw)?;
        launch!(
            self,
            &kname("maxpool2d_bwd", dt),
            cfg,
            pdy,
            pa,
            pdx,
            ncc,
            h,
            w,
            hoi,
            woi,
            k,
            st,
            p
        );
        Ok(())
    }

    /// y (nc,) = mean of each plane of x (nc, hw).
    pub fn global_avg_pool_forward(
        &self,
        x: &DeviceBuffer,
        nc: usize,
        hw: usize,
        y: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "global_avg_pool_forward";
        let dt = x.dtype();
        need_layout(op, &[("x", x)], Layout::Nchw)?;
        need_dt(op, "x", x, nc * hw, dt)?;
        need_dt(op, "y", y, nc, dt)?;
        if nc == 0 {
            return Ok(());
        }
        if hw == 0 {
            return Err(Error::Shape(format!("{op}: empty planes")));
        }
        let (px, py, a, b) = (x.ptr(), y.ptr(), i64_of(nc), i64_of(hw));
        // One warp per plane.
        launch!(
            self,
            &kname("global_avgpool_fwd", dt),
            self.elementwise_cfg(nc * 32),
            px,
            py,
            a,
            b
        );
        Ok(())
    }

    /// dx (nc, hw) = dy (nc,) / hw broadcast over each plane.
    pub fn global_avg_pool_backward(
        &self,
        dy: &DeviceBuffer,
        nc: usize,
        hw: usize,
        dx: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "global_avg_pool_backward";
        let dt = dy.dtype();
        need_layout(op, &[("dx", &*dx)], Layout::Nchw)?;
        need_dt(op, "dy", dy, nc, dt)?;
        need_dt(op, "dx", dx, nc * hw, dt)?;
        if nc * hw == 0 {
            return Ok(());
        }
        let (pdy, pdx, a, b) = (dy.ptr(), dx.ptr(), i64_of(nc), i64_of(hw));
        launch!(
            self,
            &kname("global_avgpool_bwd", dt),
            self.elementwise_cfg(nc * hw),
            pdy,
            pdx,
            a,
            b
        );
        Ok(())
    }

    /// Channels-last x (n, c, hw) in NHWC order -> y (n, c) = the mean over each channel's hw
    /// positions.
    pub fn global_avg_pool_forward_nhwc(
        &self,
        x: &DeviceBuffer,
        n: usize,
        c: usize,
        hw: usize,
        y: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "global_avg_pool_forward_nhwc";
        let dt = x.dtype();
        need_dt(op, "x", x, n * c * hw, dt)?;
        need_dt(op, "y", y, n * c, dt)?;
        need_layout(op, &[("x", x)], Layout::Nhwc)?;
        if n * c == 0 {
            return Ok(());
        }
        if hw == 0 {
            return Err(Error::Shape(format!("{op}: empty planes")));
        }
        let (px, py, nn, cc, hh) = (x.ptr(), y.ptr(), i64_of(n), i32_of(op, c)?, i64_of(hw));
        launch!(
            self,
            &kname("global_avgpool_fwd_nhwc", dt),
            self.elementwise_cfg(n * c),
            px,
            py,
            nn,
            cc,
            hh
        );
        Ok(())
    }

    /// dx (n, c, hw) in NHWC order = dy (n, c) / hw broadcast over each channel's positions.
    pub fn global_avg_pool_backward_nhwc(
        &self,
        dy: &DeviceBuffer,
        n: usize,
        c: usize,
        hw: usize,
        dx: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "global_avg_pool_backward_nhwc";
        let dt = dy.dtype();
        need_dt(op, "dy", dy, n * c, dt)?;
        need_dt(op, "dx", dx, n * c * hw, dt)?;
        need_layout(op, &[("dx", &*dx)], Layout::Nhwc)?;
        if n * c * hw == 0 {
            return Ok(());
        }
        let (pdy, pdx, nn, cc, hh) = (dy.ptr(), dx.ptr(), i64_of(n), i32_of(op, c)?, i64_of(hw));
        launch!(
            self,
            &kname("global_avgpool_bwd_nhwc", dt),
            self.elementwise_cfg(n * c * hw),
            pdy,
            pdx,
            nn,
            cc,
            hh
        );
        Ok(())
    }

    // ---------------------------------------------------------------- weightnorm.cu

    /// norms (rows,) = L2 norm of each row of v (rows, cols).
    pub fn row_norms(
        &self,
        v: &DeviceBuffer,
        rows: usize,
        cols: usize,
        norms: &mut DeviceBuffer,
    ) -> Result<()> {
        need("row_norms", "v", v, rows * cols)?;
        need("row_norms", "norms", norms, rows)?;
        if rows == 0 {
            return Ok(());
        }
        let (pv, pn, r, c) = (v.ptr(), norms.ptr(), i64_of(rows), i64_of(cols));
        launch!(
            self,
            "row_norms_f32",
            self.elementwise_cfg(rows * 32),
            pv,
            pn,
            r,
            c
        );
        Ok(())
    }

    /// w = v / norms row-wise; v, w (rows, cols).
    pub fn row_normalize(
        &self,
        v: &DeviceBuffer,
        norms: &DeviceBuffer,
        rows: usize,
        cols: usize,
        w: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "row_normalize";
        need(op, "v", v, rows * cols)?;
        need(op, "norms", norms, rows)?;
        need(op, "w", w, rows * cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let (pv, pn, pw, r, c) = (v.ptr(), norms.ptr(), w.ptr(), i64_of(rows), i64_of(cols));
        launch!(
            self,
            "row_normalize_f32",
            self.elementwise_cfg(rows * cols),
            pv,
            pn,
            pw,
            r,
            c
        );
        Ok(())
    }

    /// dv = (dw - (dw . w) w) / ||v|| row-wise; dw, w, dv (rows, cols), norms (rows,).
    pub fn row_normalize_backward(
        &self,
        dw: &DeviceBuffer,
        w: &DeviceBuffer,
        norms: &DeviceBuffer,
        rows: usize,
        cols: usize,
        dv: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "row_normalize_backward";
        need(op, "dw", dw, rows * cols)?;
        need(op, "w", w, rows * cols)?;
        need(op, "norms", norms, rows)?;
        need(op, "dv", dv, rows * cols)?;
        if rows == 0 {
            return Ok(());
        }
        let (pdw, pw, pn, pdv) = (dw.ptr(), w.ptr(), norms.ptr(), dv.ptr());
        let (r, c) = (i64_of(rows), i64_of(cols));
        let cfg = self.elementwise_cfg(rows * 32);
        launch!(self, "row_normalize_bwd_f32", cfg, pdw, pw, pn, pdv, r, c);
        Ok(())
    }

    // ---------------------------------------------------------------- ema.cu

    /// teacher = m * teacher + (1 - m) * student over the flat buffers (same length).
    pub fn ema_update(
        &self,
        teacher: &mut DeviceBuffer,
        student: &DeviceBuffer,
        m: f32,
    ) -> Result<()> {
        let n = teacher.len32();
        if student.len32() != n {
            return Err(Error::Shape(format!(
                "ema_update: teacher has {n} values, student {}",
                student.len32()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let (pt, ps, nn) = (teacher.ptr(), student.ptr(), i64_of(n));
        launch!(
            self,
            "ema_update_f32",
            self.elementwise_cfg(n),
            pt,
            ps,
            m,
            nn
        );
        Ok(())
    }

    // ---------------------------------------------------------------- lars.cu

    /// Builds the chunk table for `lars_step` from the parameter table: one
    /// (offset, len, is_1d) per tensor of the flat buffer, in any order, non-overlapping.
    pub fn lars_plan(&self, segments: &[(usize, usize, bool)], numel: usize) -> Result<LarsPlan> {
        const CHUNK: usize = 1 << 16;
        let (mut seg, mut start, mut len) = (Vec::new(), Vec::new(), Vec::new());
        let mut is_1d = Vec::with_capacity(segments.len());
        for (s, &(off, l, one_d)) in segments.iter().enumerate() {
            if off + l > numel {
                return Err(Error::Shape(format!(
                    "lars_plan: segment {s} [{off}, {}) beyond the {numel} parameters",
                    off + l
                )));
            }
            is_1d.push(one_d as i32);
            let mut o = 0;
            while o < l {
                let c = CHUNK.min(l - o);
                seg.push(i32_of("lars_plan", s)?);
                start.push(i64_of(off + o));
                len.push(c as i32);
                o += c;
            }
        }
        let n_chunks = seg.len();
        let n_segs = segments.len();
        Ok(LarsPlan {
            n_chunks,
            n_segs,
            numel,
            chunk_seg: self.upload_i32(&seg)?,
            chunk_start: self.htod(&start)?,
            chunk_len: self.upload_i32(&len)?,
            seg_is_1d: self.upload_i32(&is_1d)?,
        })
    }

    /// One LARS step in place on w and mu (momentum buffer), gradients g; all `plan.numel`
    /// long: the training state's two passes (`lars_norms_checked`, then
    /// `lars_update_from_stats` without a gate) on a scratch statistics buffer. See
    /// kernels/lars.cu for the update.
    #[allow(clippy::too_many_arguments)]
    pub fn lars_step(
        &self,
        plan: &LarsPlan,
        w: &mut DeviceBuffer,
        g: &DeviceBuffer,
        mu: &mut DeviceBuffer,
        lr: f32,
        momentum: f32,
        trust: f32,
        weight_decay: f32,
    ) -> Result<()> {
        let mut stats = self.alloc_f32(3 * plan.n_segs)?; // (3, n_segs)
        self.lars_norms_checked(plan, w, g, weight_decay, &mut stats)?;
        self.lars_update_from_stats(
            plan,
            w,
            g,
            mu,
            &stats,
            lr,
            momentum,
            trust,
            weight_decay,
            None,
        )
    }

    // ---------------------------------------------------------------- carp_loss.cu

    /// The fused CARP loss and its gradient w.r.t. the student logits.
    /// student: (vs, n, k) logits, vs >= 2 (views 0, 1 global); teacher: (2, n, k);
    /// perm: (k,) i32 permutation of 0..k; block j = perm[j*nb .. (j+1)*nb].
    /// `rows_total`: rows in the uniformity mean ((vs + 2) n on one GPU: every student view and
    /// both teacher views; global across GPUs), and
    /// `pbar_hook` is called on the (k,) per-block column sums before they are used (the
    /// multi-GPU all-reduce goes there). Returns the loss terms and dstudent (vs, n, k) in the
    /// original prototype order.
    #[allow(clippy::too_many_arguments)]
    pub fn carp_loss(
        &self,
        student: &DeviceBuffer,
        teacher: &DeviceBuffer,
        perm: &DeviceBuffer,
        vs: usize,
        n: usize,
        k: usize,
        nb: usize,
        rows_total: usize,
        pbar_hook: Option<PbarHook<'_>>,
    ) -> Result<CarpLossGpu> {
        let q =
            self.carp_loss_queued(student, teacher, perm, vs, n, k, nb, rows_total, pbar_hook)?;
        // The one wait: the loss terms to the host.
        let s = self.download_f32(&q.scalars)?; // [H, consistency]
        Ok(CarpLossGpu {
            loss: s[0] + s[1],
            consistency: s[1],
            entropy: s[0],
            dstudent: q.dstudent,
        })
    }

    /// `carp_loss` without the download: every pass is queued and nothing waits for the
    /// device. The loss terms stay on the device, `scalars` (2,) = [entropy H, consistency]
    /// (the loss is their sum), for `step_ok` and one download at the end of the step.
    #[allow(clippy::too_many_arguments)]
    pub fn carp_loss_queued(
        &self,
        student: &DeviceBuffer,
        teacher: &DeviceBuffer,
        perm: &DeviceBuffer,
        vs: usize,
        n: usize,
        k: usize,
        nb: usize,
        rows_total: usize,
        pbar_hook: Option<PbarHook<'_>>,
    ) -> Result<CarpLossQueued> {
        let op = "carp_loss";
        if vs < 2 || n == 0 || nb == 0 || k == 0 || !k.is_multiple_of(nb) || rows_total == 0 {
            return Err(Error::Shape(format!(
                "{op}: need vs >= 2, n > 0, k % nb == 0, rows_total > 0; got vs={vs}, n={n}, \
                 k={k}, nb={nb}, rows_total={rows_total}"
            )));
        }
        need(op, "student", student, vs * n * k)?;
        need(op, "teacher", teacher, 2 * n * k)?;
        need(op, "perm", perm, k)?;
        let np = k / nb;
        let (ni, ki, nbi) = (i32_of(op, n)?, i32_of(op, k)?, i32_of(op, nb)?);
        if n > 65535 || vs > 65535 {
            return Err(Error::Shape(format!(
                "{op}: n={n} or vs={vs} beyond the grid limit"
            )));
        }
        let threads = reduce_threads(nb, 512);
        let ps = self.alloc_f32(vs * np * n * nb)?; // (vs, np, n, nb)
        let pt = self.alloc_f32(2 * np * n * nb)?; // (2, np, n, nb)
        let mut pbar = self.zeros_f32(k)?; // (np, nb)
        let pp = perm.ptr();
        for (logits, views, p) in [(student, vs, &ps), (teacher, 2, &pt)] {
            let cfg = LaunchConfig {
                grid_dim: (np as u32, n as u32, views as u32),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let (pl, pptr, pb) = (logits.ptr(), p.ptr(), pbar.ptr());
            // Every view's rows go into pbar (local crops included, as the reference code).
            let pbar_views = i32_of(op, views)?;
            launch!(
                self,
                "carp_softmax_gather_f32",
                cfg,
                pl,
                pp,
                pptr,
                pb,
                ni,
                ki,
                nbi,
                pbar_views
            );
        }
        if let Some(hook) = pbar_hook {
            hook(&mut pbar)?;
        }
        let g = self.alloc_f32(k)?; // (np, nb)
        let scalars = self.alloc_f32(2)?; // [H, consistency]
        let (pb, pg, ph, r) = (pbar.ptr(), g.ptr(), scalars.ptr(), rows_total as f32);
        launch!(
            self,
            "carp_entropy_f32",
            one_block(1024),
            pb,
            pg,
            ph,
            ki,
            nbi,
            r
        );
        let dstudent = self.alloc_f32(vs * n * k)?; // (vs, n, k)
        let partial = self.alloc_f32(n * np)?; // (n, np)
        let cfg = LaunchConfig {
            grid_dim: (np as u32, n as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (pps, ppt, pd, ppart) = (ps.ptr(), pt.ptr(), dstudent.ptr(), partial.ptr());
        let vsi = i32_of(op, vs)?;
        launch!(
            self,
            "carp_consistency_grad_f32",
            cfg,
            pps,
            ppt,
            pg,
            pp,
            pd,
            ppart,
            ni,
            ki,
            nbi,
            vsi
        );
        let pc = scalars.ptr() + 4; // &scalars[1]
        let (pparts, nparts) = (partial.ptr(), i64_of(n * np));
        launch!(self, "sum_f32", one_block(1024), pparts, pc, nparts);
        // The temporaries go back to the pool here; later users queue behind this stream's
        // work (one stream), so the kernels above still read them first.
        drop((ps, pt, g, partial));
        Ok(CarpLossQueued { scalars, dstudent })
    }
}

/// Called on the (k,) pbar column sums between the softmax pass and their use: the multi-GPU
/// all-reduce goes here.
pub type PbarHook<'a> = &'a mut dyn FnMut(&mut DeviceBuffer) -> Result<()>;

/// The chunk table for `lars_step` (built once: static shapes) plus its norm accumulators.
pub struct LarsPlan {
    n_chunks: usize,
    n_segs: usize,
    numel: usize,
    chunk_seg: DeviceBuffer,
    chunk_start: DeviceBuffer,
    chunk_len: DeviceBuffer,
    seg_is_1d: DeviceBuffer,
}

impl LarsPlan {
    pub fn num_segments(&self) -> usize {
        self.n_segs
    }
}

/// What `carp_loss_queued` returns: everything still on the device (nothing waited for).
pub struct CarpLossQueued {
    /// (2,): [entropy H, consistency]; the loss is their sum.
    pub scalars: DeviceBuffer,
    /// d loss / d student logits, (vs, n, k), original prototype order.
    pub dstudent: DeviceBuffer,
}

/// What `carp_loss` returns: the terms (host scalars) and the student gradient on the device.
pub struct CarpLossGpu {
    pub loss: f32,
    pub consistency: f32,
    pub entropy: f32,
    /// d loss / d student logits, (vs, n, k), original prototype order.
    pub dstudent: DeviceBuffer,
}

// ---------------------------------------------------------------- device-resident training state
// (lars.cu's checked pass 1, LARS pass 2 on its stats, BN running statistics inside a flat
// buffer): the launchers `resident::DeviceTrainState` drives.
impl CudaBackend {
    /// LARS pass 1 with the NaN guard fused in: zero-fills `stats` (3, n_segs) and accumulates
    /// per segment `[||w||^2 (multi-d), ||g + wd w||^2 (multi-d), count of non-finite g (every
    /// segment)]`. See `lars_norms_checked_f32` in kernels/lars.cu.
    pub fn lars_norms_checked(
        &self,
        plan: &LarsPlan,
        w: &DeviceBuffer,
        g: &DeviceBuffer,
        weight_decay: f32,
        stats: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "lars_norms_checked";
        need(op, "w", w, plan.numel)?;
        need(op, "g", g, plan.numel)?;
        need(op, "stats", stats, 3 * plan.n_segs)?;
        self.fill(stats, 0.0)?;
        if plan.n_chunks == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (plan.n_chunks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (pw, pg, ps) = (w.ptr(), g.ptr(), stats.ptr());
        let (cs, cst, cl, s1) = (
            plan.chunk_seg.ptr(),
            plan.chunk_start.ptr(),
            plan.chunk_len.ptr(),
            plan.seg_is_1d.ptr(),
        );
        let ns = i32_of(op, plan.n_segs)?;
        launch!(
            self,
            "lars_norms_checked_f32",
            cfg,
            pw,
            pg,
            cs,
            cst,
            cl,
            s1,
            weight_decay,
            ps,
            ns
        );
        Ok(())
    }

    /// LARS pass 2 in place on w and mu, with the norms `lars_norms_checked` left in `stats`
    /// (the same w and g: nothing may change them in between). With `ok` (an i32 device flag,
    /// `step_ok`'s) the kernel does nothing while the flag is 0.
    #[allow(clippy::too_many_arguments)]
    pub fn lars_update_from_stats(
        &self,
        plan: &LarsPlan,
        w: &mut DeviceBuffer,
        g: &DeviceBuffer,
        mu: &mut DeviceBuffer,
        stats: &DeviceBuffer,
        lr: f32,
        momentum: f32,
        trust: f32,
        weight_decay: f32,
        ok: Option<&DeviceBuffer>,
    ) -> Result<()> {
        let op = "lars_update_from_stats";
        if let Some(f) = ok {
            need(op, "ok", f, 1)?;
        }
        need(op, "w", w, plan.numel)?;
        need(op, "g", g, plan.numel)?;
        need(op, "mu", mu, plan.numel)?;
        need(op, "stats", stats, 3 * plan.n_segs)?;
        if plan.n_chunks == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (plan.n_chunks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (pw, pg, pmu) = (w.ptr(), g.ptr(), mu.ptr());
        let (cs, cst, cl, s1) = (
            plan.chunk_seg.ptr(),
            plan.chunk_start.ptr(),
            plan.chunk_len.ptr(),
            plan.seg_is_1d.ptr(),
        );
        // wnorm2 = stats[0..n_segs), gnorm2 = stats[n_segs..2 n_segs) (checked above).
        let (wn, gn) = (stats.ptr(), stats.ptr() + (4 * plan.n_segs) as u64);
        match ok {
            None => launch!(
                self,
                "lars_update_f32",
                cfg,
                pw,
                pg,
                pmu,
                cs,
                cst,
                cl,
                s1,
                wn,
                gn,
                lr,
                momentum,
                trust,
                weight_decay
            ),
            Some(f) => {
                let pok = f.ptr();
                launch!(
                    self,
                    "lars_update_gated_f32",
                    cfg,
                    pw,
                    pg,
                    pmu,
                    cs,
                    cst,
                    cl,
                    s1,
                    wn,
                    gn,
                    lr,
                    momentum,
                    trust,
                    weight_decay,
                    pok
                )
            }
        }
        Ok(())
    }

    /// `batch_norm_running_update` on running statistics that live inside one flat buffer:
    /// running_mean at element `mean_off`, running_var at `var_off`, `c` values each. With `ok`
    /// (an i32 device flag, `step_ok`'s) nothing changes while the flag is 0.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_running_update_at(
        &self,
        running: &mut DeviceBuffer,
        mean_off: usize,
        var_off: usize,
        batch_mean: &DeviceBuffer,
        batch_var_unbiased: &DeviceBuffer,
        c: usize,
        momentum: f32,
        ok: Option<&DeviceBuffer>,
    ) -> Result<()> {
        let op = "batch_norm_running_update_at";
        if let Some(f) = ok {
            need(op, "ok", f, 1)?;
        }
        need(op, "running (mean)", running, mean_off + c)?;
        need(op, "running (var)", running, var_off + c)?;
        need(op, "batch_mean", batch_mean, c)?;
        need(op, "batch_var", batch_var_unbiased, c)?;
        if mean_off < var_off + c && var_off < mean_off + c {
            return Err(Error::Shape(format!(
                "{op}: running mean [{mean_off}, +{c}) and var [{var_off}, +{c}) overlap"
            )));
        }
        if c == 0 {
            return Ok(());
        }
        let (a, b, m, v) = (
            running.ptr() + (4 * mean_off) as u64,
            running.ptr() + (4 * var_off) as u64,
            batch_mean.ptr(),
            batch_var_unbiased.ptr(),
        );
        let cc = i32_of(op, c)?;
        match ok {
            None => launch!(
                self,
                "bn_running_update_f32",
                self.elementwise_cfg(c),
                a,
                b,
                m,
                v,
                momentum,
                cc
            ),
            Some(f) => {
                let pok = f.ptr();
                launch!(
                    self,
                    "bn_running_update_gated_f32",
                    self.elementwise_cfg(c),
                    a,
                    b,
                    m,
                    v,
                    momentum,
                    cc,
                    pok
                )
            }
        }
        Ok(())
    }

    /// `ema_update` gated by an i32 device flag (`step_ok`'s): nothing changes while it is 0.
    pub fn ema_update_gated(
        &self,
        teacher: &mut DeviceBuffer,
        student: &DeviceBuffer,
        m: f32,
        ok: &DeviceBuffer,
    ) -> Result<()> {
        let n = teacher.len32();
        if student.len32() != n {
            return Err(Error::Shape(format!(
                "ema_update_gated: teacher has {n} values, student {}",
                student.len32()
            )));
        }
        need("ema_update_gated", "ok", ok, 1)?;
        if n == 0 {
            return Ok(());
        }
        let (pt, ps, nn, pok) = (teacher.ptr(), student.ptr(), i64_of(n), ok.ptr());
        launch!(
            self,
            "ema_update_gated_f32",
            self.elementwise_cfg(n),
            pt,
            ps,
            m,
            nn,
            pok
        );
        Ok(())
    }

    /// The step's device-side verdict (kernels/lars.cu `step_ok_f32`), after
    /// `lars_norms_checked` filled `stats` and the loss left `loss_hc` (2,) = [H, consistency]:
    /// `ok` (one i32) = 1 when the loss, every gradient and every multi-d trust ratio is
    /// finite, else 0; `stats` must hold 3 n_segs + 3 values, the last three become
    /// [H, consistency, ok] (one download then tells the host everything).
    pub fn step_ok(
        &self,
        plan: &LarsPlan,
        stats: &mut DeviceBuffer,
        loss_hc: &DeviceBuffer,
        ok: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "step_ok";
        need(op, "stats", stats, 3 * plan.n_segs + 3)?;
        need(op, "loss_hc", loss_hc, 2)?;
        need(op, "ok", ok, 1)?;
        let (pst, s1, ns, ph, pok) = (
            stats.ptr(),
            plan.seg_is_1d.ptr(),
            i32_of(op, plan.n_segs)?,
            loss_hc.ptr(),
            ok.ptr(),
        );
        launch!(self, "step_ok_f32", one_block(1024), pst, s1, ns, ph, pok);
        Ok(())
    }
}

// ---------------------------------------------------------------- bn_fused.cu

impl CudaBackend {
    /// y = max((x - mean) * invstd * gamma + beta [+ residual], 0) per channel, one pass: the
    /// fused BN + ReLU (+ add) forward. x, residual, y (n, c, hw); mean, invstd, gamma, beta (c,)
    /// (training: batch_norm_stats' batch statistics; eval: the running mean and
    /// `batch_norm_invstd(running_var)`).
    #[allow(clippy::too_many_arguments)]
    pub fn bn_act_forward(
        &self,
        x: &DeviceBuffer,
        residual: Option<&DeviceBuffer>,
        mean: &DeviceBuffer,
        invstd: &DeviceBuffer,
        gamma: &DeviceBuffer,
        beta: &DeviceBuffer,
        n: usize,
        c: usize,
        hw: usize,
        y: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "bn_act_forward";
        let total = n * c * hw;
        let dt = x.dtype();
        need_dt(op, "x", x, total, dt)?;
        need_dt(op, "y", y, total, dt)?;
        if let Some(r) = residual {
            need_dt(op, "residual", r, total, dt)?;
        }
        for (nm, b) in [
            ("mean", mean),
            ("invstd", invstd),
            ("gamma", gamma),
            ("beta", beta),
        ] {
            need(op, nm, b, c)?;
        }
        if total == 0 {
            return Ok(());
        }
        // A null residual pointer: the kernel skips the add.
        let pr = residual.map_or(0, |r| r.ptr());
        let (px, pm, pi, pg, pb, py) = (
            x.ptr(),
            mean.ptr(),
            invstd.ptr(),
            gamma.ptr(),
            beta.ptr(),
            y.ptr(),
        );
        need_layout(op, &[("y", &*y)], x.layout())?;
        if let Some(r) = residual {
            need_layout(op, &[("residual", r)], x.layout())?;
        }
        let (n, hw) = bn_rows(x.layout(), n, hw);
        let (nn, cc, hh) = (i64_of(n), i32_of(op, c)?, i64_of(hw));
        let cfg = self.bn_elementwise_cfg(total, hw);
        launch!(
            self,
            &kname("bn_act_forward", dt),
            cfg,
            px,
            pr,
            pm,
            pi,
            pg,
            pb,
            py,
            nn,
            cc,
            hh
        );
        Ok(())
    }

    /// Backward of [`CudaBackend::bn_act_forward`] from its output y: with dy' = dy where y > 0,
    /// dgamma = sum(dy' * xhat), dbeta = sum(dy') (c,) in one partial-reduction pass on the
    /// (c, s) grid (which also writes dresidual = dy' when given) plus batchnorm.cu's finalize,
    /// then one pass writing dx (n, c, hw) (from dresidual and x when given, else dy, y and x). `training`: the statistics were the batch's and dx includes their
    /// dependence on x; otherwise they are the running ones (constants).
    #[allow(clippy::too_many_arguments)]
    pub fn bn_act_backward(
        &self,
        training: bool,
        dy: &DeviceBuffer,
        y: &DeviceBuffer,
        x: &DeviceBuffer,
        mean: &DeviceBuffer,
        invstd: &DeviceBuffer,
        gamma: &DeviceBuffer,
        n: usize,
        c: usize,
        hw: usize,
        dx: &mut DeviceBuffer,
        dresidual: Option<&mut DeviceBuffer>,
        dgamma: &mut DeviceBuffer,
        dbeta: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "bn_act_backward";
        let total = n * c * hw;
        let dt = x.dtype();
        for (nm, b) in [("dy", dy), ("y", y), ("x", x)] {
            need_dt(op, nm, b, total, dt)?;
        }
        need_dt(op, "dx", dx, total, dt)?;
        if let Some(r) = &dresidual {
            need_dt(op, "dresidual", r, total, dt)?;
            need_layout(op, &[("dresidual", &**r)], x.layout())?;
        }
        need_layout(op, &[("dy", dy), ("y", y), ("dx", &*dx)], x.layout())?;
        for (nm, b) in [("mean", mean), ("invstd", invstd), ("gamma", gamma)] {
            need(op, nm, b, c)?;
        }
        need(op, "dgamma", dgamma, c)?;
        need(op, "dbeta", dbeta, c)?;
        if total == 0 {
            return Err(Error::Shape(format!(
                "{op}: empty input (n={n}, c={c}, hw={hw})"
            )));
        }
        let (pdy, py, px, pm, pi, pg) = (
            dy.ptr(),
            y.ptr(),
            x.ptr(),
            mean.ptr(),
            invstd.ptr(),
            gamma.ptr(),
        );
        let (pdx, pdg, pdb) = (dx.ptr(), dgamma.ptr(), dbeta.ptr());
        let pdr = dresidual.map_or(0, |r| r.ptr());
        let nhwc = x.layout() == Layout::Nhwc;
        let v4 = nhwc_v4(c, dt, &[pdy, py, px, pdr]);
        let (rcfg, s) = self.bn_reduce_cfg_for(x.layout(), c, n * hw, v4);
        let (n, hw) = bn_rows(x.layout(), n, hw);
        let (nn, cc, hh) = (i64_of(n), i32_of(op, c)?, i64_of(hw));
        // (c, s) workspaces: per-block partials of sum dy' * xhat and sum dy'.
        let part_g = self.alloc_f32(c * s as usize)?;
        let part_b = self.alloc_f32(c * s as usize)?;
        let (ppg, ppb, ss) = (part_g.ptr(), part_b.ptr(), s as i32);
        if nhwc {
            launch!(
                self,
                &kname("bn_act_backward_partial_nhwc", dt),
                rcfg,
                pdy,
                py,
                px,
                pm,
                pi,
                ppg,
                ppb,
                pdr,
                nn,
                cc
            );
        } else {
            launch!(
                self,
                &kname("bn_act_backward_partial", dt),
                rcfg,
                pdy,
                py,
                px,
                pm,
                pi,
                ppg,
                ppb,
                pdr,
                nn,
                cc,
                hh
            );
        }
        let fcfg = Self::bn_finalize_cfg(c, s);
        launch!(
            self,
            "bn_backward_finalize_f32",
            fcfg,
            ppg,
            ppb,
            pdg,
            pdb,
            ss
        );
        let cfg = self.bn_elementwise_cfg(total, hw);
        let tr = i32::from(training);
        // With a residual the dx pass reads the masked gradient the partial pass wrote (y null:
        // no mask) instead of dy and y: one tensor read fewer.
        let (pg_in, py_in) = if pdr != 0 { (pdr, 0) } else { (pdy, py) };
        launch!(
            self,
            &kname("bn_act_backward_dx", dt),
            cfg,
            pg_in,
            py_in,
            px,
            pm,
            pi,
            pg,
            pdg,
            pdb,
            pdx,
            nn,
            cc,
            hh,
            tr
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{bn_nhwc_block, bn_nhwc_slices, bn_slices, nhwc_v4};

    #[test]
    fn bn_nhwc_slices_fill_the_gpu_without_tiny_slices() {
        // ResNet50 at 512 images on a 132-SM H200, channels-last, 4 channels per thread: the
        // stem BN (64 channels = 16 groups: one 16 x 16 block across the channels, 512 * 112^2
        // rows) gets 1024 slices (the cap; ~6.3k rows each), layer4 (2048 channels = 512
        // groups: 16 blocks of 32 x 8, 512 * 7^2 rows) 66 (1056 blocks), the head's (n, c) BN
        // (4096 channels = 32 blocks, 512 rows) 2 (no slice under 256 rows).
        assert_eq!(bn_nhwc_block(16), (16, 16));
        assert_eq!(bn_nhwc_block(512), (32, 8));
        assert_eq!(bn_nhwc_block(3), (4, 64));
        assert_eq!(bn_nhwc_block(0), (1, 256));
        assert_eq!(bn_nhwc_slices(1, 512 * 112 * 112, 132), 1024);
        assert_eq!(bn_nhwc_slices(16, 512 * 49, 132), 66);
        assert!(16 * bn_nhwc_slices(16, 512 * 49, 132) >= 8 * 132);
        assert_eq!(bn_nhwc_slices(32, 512, 132), 2);
        assert_eq!(bn_nhwc_slices(1, 10, 132), 1);
        assert_eq!(bn_nhwc_slices(0, 0, 132), 1);
        assert_eq!(bn_nhwc_slices(1, usize::MAX / 2, 100_000), 1024);
    }

    #[test]
    fn nhwc_v4_needs_four_channels_and_aligned_pointers() {
        use crate::device::DType;
        assert!(nhwc_v4(64, DType::Bf16, &[256, 8, 0]));
        assert!(!nhwc_v4(64, DType::Bf16, &[256, 4]));
        assert!(!nhwc_v4(66, DType::Bf16, &[256]));
        assert!(nhwc_v4(64, DType::F32, &[256, 16]));
        assert!(!nhwc_v4(64, DType::F32, &[256, 8]));
    }

    #[test]
    fn bn_slices_fill_the_gpu_without_tiny_slices() {
        // ResNet50 at 512 images on a 132-SM H200: the stem BN (64 channels of 512 * 112^2)
        // gets 17 slices per channel (1088 blocks >= 8 per SM), layer4 (2048 channels of
        // 512 * 7^2) one, the projection head's (n, c) BN one.
        assert_eq!(bn_slices(64, 512 * 112 * 112, 132), 17);
        assert!(64 * bn_slices(64, 512 * 112 * 112, 132) >= 8 * 132);
        assert_eq!(bn_slices(2048, 512 * 49, 132), 1);
        assert_eq!(bn_slices(4096, 512, 132), 1);
        // Limited by the minimum slice length: 50176 / 4096 -> 13 slices.
        assert_eq!(bn_slices(64, 16 * 3136, 132), 13);
        // Degenerate sizes stay in [1, 1024].
        assert_eq!(bn_slices(0, 0, 132), 1);
        assert_eq!(bn_slices(1, usize::MAX / 2, 10_000), 1024);
    }
}
