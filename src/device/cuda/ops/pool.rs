//! Launchers of `kernels/pool.cu`: max pool and global average pool (NCHW and channels-last).

use super::*;

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
}
