//! Launchers of `kernels/bn_fused.cu`: batch norm fused with ReLU (and a residual add), forward
//! and backward, on the geometry of `batchnorm`.

use super::batchnorm::*;
use super::*;

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
        self.bn_act_backward_sync(
            training, dy, y, x, mean, invstd, gamma, n, c, hw, dx, dresidual, dgamma, dbeta, None,
        )
    }

    /// [`CudaBackend::bn_act_backward`] of a synchronized batch norm with `sync` (training
    /// mode only): dgamma and dbeta stay this rank's sums, dx uses the global batch's
    /// (`bn_sync_dx_sums`), as `batch_norm_backward_sync`. Without `sync` the single-rank
    /// kernels, unchanged.
    #[allow(clippy::too_many_arguments)]
    pub fn bn_act_backward_sync(
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
        sync: BnSyncDev<'_>,
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
        // A synchronized BN's dx reads the global sums (scaled to this rank's count).
        let global = self.bn_sync_dx_sums(sync.filter(|_| training), dgamma, dbeta, c, n * hw)?;
        // (An if-else of tuples, the form the launch-argument test follows to the pointers.)
        let (pdg, pdb) = if let Some((g, b)) = &global {
            (g.ptr(), b.ptr())
        } else {
            (pdg, pdb)
        };
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
