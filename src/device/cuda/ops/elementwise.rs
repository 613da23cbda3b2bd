//! Launchers of `kernels/elementwise.cu`: add, convert, accumulate, scale, fill, ReLU, GELU,
//! bias add, column and full sums.

use super::*;

impl CudaBackend {
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
}
