//! Launchers of `kernels/batchnorm.cu`: batch-norm statistics (NCHW and channels-last, one or
//! two passes), forward, backward and running-statistics updates, and the launch geometry the
//! fused ops (`bn_fused`) share.

use super::*;

/// The all-reduce of a synchronized batch norm: replaces the f64 values on every rank with
/// their sum over the ranks (a `Collective`'s `all_reduce_sum_f64`; the launchers stay below
/// the collectives, which they do not import).
pub type AllReduceF64<'a> = &'a dyn Fn(&mut [f64]) -> Result<()>;

/// A synchronized batch norm's backward on the device: the all-reduce over the ranks and the
/// global number of values per channel; `None` for a single rank.
pub type BnSyncDev<'a> = Option<(AllReduceF64<'a>, usize)>;

/// Slices per channel for the BN reductions over `m` elements per channel (see
/// `CudaBackend::bn_reduce_cfg`): enough that c * s reaches 8 blocks per SM, none shorter
/// than BN_MIN_SLICE elements, in [1, BN_MAX_SLICES].
pub(super) fn bn_slices(c: usize, m: usize, num_sms: usize) -> usize {
    const BN_MIN_SLICE: usize = 4096;
    const BN_MAX_SLICES: usize = 1024;
    (8 * num_sms)
        .div_ceil(c.max(1))
        .min(m.div_ceil(BN_MIN_SLICE))
        .clamp(1, BN_MAX_SLICES)
}

/// The (n, hw) the elementwise BN kernels run over for a tensor of `layout`: NCHW as it is;
/// NHWC as (n * hw, 1), where the flat index's `i % c` is the channel.
pub(super) fn bn_rows(layout: Layout, n: usize, hw: usize) -> (usize, usize) {
    match layout {
        Layout::Nchw => (n, hw),
        Layout::Nhwc => (n * hw, 1),
    }
}

/// Row slices for the channels-last BN reductions over `r` rows, with `col_blocks` blocks across
/// the channels (`CudaBackend::bn_nhwc_reduce_cfg`): enough that col_blocks * s reaches 8 blocks
/// per SM, none shorter than 256 rows, in [1, 1024].
pub(super) fn bn_nhwc_slices(col_blocks: usize, r: usize, num_sms: usize) -> usize {
    (8 * num_sms)
        .div_ceil(col_blocks.max(1))
        .min(r.div_ceil(256))
        .clamp(1, 1024)
}

/// Whether the channels-last reductions take 4 channels per thread (kernels/batchnorm.cu
/// `bn_nhwc_v4`, the same rule): c % 4 == 0 and every activation pointer (0: absent) aligned to
/// 4 elements of `dt`. The grid depends on it, so host and kernel must agree.
pub(super) fn nhwc_v4(c: usize, dt: DType, ptrs: &[u64]) -> bool {
    let align = 4 * dt.size() as u64;
    c.is_multiple_of(4) && ptrs.iter().all(|&p| p % align == 0)
}

/// The channels-last reduction block for `g` channel groups (kernels/batchnorm.cu "LAUNCH
/// GEOMETRY"): (tx, ty) with tx = min(32, g rounded up to a power of two), tx * ty = 256.
pub(super) fn bn_nhwc_block(g: usize) -> (u32, u32) {
    let tx = g.max(1).next_power_of_two().min(32) as u32;
    (tx, 256 / tx)
}

/// Whether channels-last BN statistics take two passes over x (sums, then squared deviations
/// from the mean: the NCHW kernels' method) instead of one pass of shifted sums: the run option
/// `bn_stats`, for A/B runs and as a fallback.
pub(super) fn bn_two_pass() -> bool {
    crate::options::current().bn_stats == crate::options::BnStats::TwoPass
}

impl CudaBackend {
    /// Grid for the per-channel partial reductions over `m` = n * hw elements per channel:
    /// (c, s) blocks, with s slices per channel so that c * s reaches ~8 blocks per SM (a small
    /// c, like the stem's 64 channels of 6.4M elements, would otherwise leave most SMs idle),
    /// but no slice shorter than BN_MIN_SLICE elements (tiny reductions stay one block). The
    /// partials are combined by a finalize kernel (`bn_finalize_cfg`). Returns (config, s).
    pub(super) fn bn_reduce_cfg(&self, c: usize, m: usize) -> (LaunchConfig, u32) {
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
    pub(super) fn bn_nhwc_reduce_cfg(&self, c: usize, r: usize, v4: bool) -> (LaunchConfig, u32) {
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
    pub(super) fn bn_reduce_cfg_for(
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
    pub(super) fn bn_finalize_cfg(c: usize, s: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (c as u32, 1, 1),
            block_dim: (reduce_threads(s as usize, 256), 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Grid for the elementwise BN kernels over (n, c, hw): they take float4 steps when
    /// hw % 4 == 0 (and the buffers are 16-byte aligned), so a quarter of the threads suffice.
    pub(super) fn bn_elementwise_cfg(&self, total: usize, hw: usize) -> LaunchConfig {
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
        self.batch_norm_backward_sync(
            training, dy, x, mean, invstd, gamma, n, c, hw, dx, dgamma, dbeta, None,
        )
    }

    /// [`CudaBackend::batch_norm_backward`] of a synchronized batch norm with `sync` (the ranks
    /// and the global number of values per channel; training mode only): dgamma and dbeta stay
    /// this rank's sums, while dx uses the global batch's ([`CudaBackend::bn_sync_dx_sums`]),
    /// as the CPU's `bn_backward_coefs_sync`. Without `sync` the kernels of the single-rank
    /// backward, unchanged.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_backward_sync(
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
        sync: BnSyncDev<'_>,
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
        // A synchronized BN's dx reads the global sums (scaled to this rank's count).
        let global = self.bn_sync_dx_sums(sync.filter(|_| training), dgamma, dbeta, c, n * hw)?;
        // (An if-else of tuples, the form the launch-argument test follows to the pointers.)
        let (pdg, pdb) = if let Some((g, b)) = &global {
            (g.ptr(), b.ptr())
        } else {
            (pdg, pdb)
        };
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

    /// The sums (sum of (x - k), sum of (x - k)^2) per channel, (c,) each, of x (n, c, hw) in
    /// either layout and element type around the per-channel shift k (c,): the partials on the
    /// statistics' (c, s) grid (kernels/batchnorm.cu `bn_shifted_partial*`), then
    /// `bn_backward_finalize_f32` over the s partials of each channel.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_shifted_sums(
        &self,
        x: &DeviceBuffer,
        n: usize,
        c: usize,
        hw: usize,
        shift: &DeviceBuffer,
        sum: &mut DeviceBuffer,
        sum_sq: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "batch_norm_shifted_sums";
        let dt = x.dtype();
        need_dt(op, "x", x, n * c * hw, dt)?;
        need(op, "shift", shift, c)?;
        need(op, "sum", sum, c)?;
        need(op, "sum_sq", sum_sq, c)?;
        if n * hw == 0 {
            return Err(Error::Shape(format!("{op}: empty batch (n={n}, hw={hw})")));
        }
        if c == 0 {
            return Ok(());
        }
        let cc = i32_of(op, c)?;
        let v4 = nhwc_v4(c, dt, &[x.ptr()]);
        let (rcfg, s) = self.bn_reduce_cfg_for(x.layout(), c, n * hw, v4);
        // (c, s) workspaces: the partial sums of (x - k) and (x - k)^2.
        let part_sum = self.alloc_f32(c * s as usize)?;
        let part_sq = self.alloc_f32(c * s as usize)?;
        let (px, pk, pps, ppq) = (x.ptr(), shift.ptr(), part_sum.ptr(), part_sq.ptr());
        if x.layout() == Layout::Nhwc {
            let rr = i64_of(n * hw);
            launch!(
                self,
                &kname("bn_shifted_partial_nhwc", dt),
                rcfg,
                px,
                pk,
                pps,
                ppq,
                rr,
                cc
            );
        } else {
            let (nn, hh) = (i64_of(n), i64_of(hw));
            launch!(
                self,
                &kname("bn_shifted_partial", dt),
                rcfg,
                px,
                pk,
                pps,
                ppq,
                nn,
                cc,
                hh
            );
        }
        let (p1, p2, ss) = (sum.ptr(), sum_sq.ptr(), s as i32);
        launch!(
            self,
            "bn_backward_finalize_f32",
            Self::bn_finalize_cfg(c, s),
            pps,
            ppq,
            p1,
            p2,
            ss
        );
        Ok(())
    }

    /// Synchronized batch norm's training statistics: [`CudaBackend::batch_norm_stats`]'s
    /// outputs (mean, invstd, unbiased variance, (c,) each) for the global batch of the ranks
    /// `all_reduce` sums over, x (n, c, hw) being this rank's part of it. The algorithm of the CPU's
    /// `batch_norm_stats_sync_cpu`, with the per-channel sums on the device: the sums and the
    /// count, all-reduced, give the global mean; the sums of (x - k) and (x - k)^2 around
    /// k = that mean rounded to f32 (the same on every rank), all-reduced, give the variance.
    /// Each all-reduce stages its (c,) vectors through the host (waits for the device).
    /// Returns the global number of values per channel.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_stats_sync(
        &self,
        x: &DeviceBuffer,
        n: usize,
        c: usize,
        hw: usize,
        eps: f32,
        all_reduce: AllReduceF64<'_>,
        mean: &mut DeviceBuffer,
        invstd: &mut DeviceBuffer,
        var_unbiased: &mut DeviceBuffer,
    ) -> Result<usize> {
        let op = "batch_norm_stats_sync";
        for (nm, b) in [
            ("mean", &*mean),
            ("invstd", &*invstd),
            ("var", &*var_unbiased),
        ] {
            if b.dtype() != DType::F32 || b.len32() != c {
                return Err(Error::Shape(format!(
                    "{op}: {nm} must be an f32 buffer of exactly {c} values, got {b:?}"
                )));
            }
        }
        let mut s1 = self.alloc_f32(c)?; // (C,)
        let mut s2 = self.alloc_f32(c)?; // (C,)
        let zero = self.zeros_f32(c)?; // (C,)
        self.batch_norm_shifted_sums(x, n, c, hw, &zero, &mut s1, &mut s2)?;
        let mut buf: Vec<f64> = self
            .dtoh::<f32>(&s1, c)?
            .iter()
            .map(|&v| v as f64)
            .collect();
        buf.push((n * hw) as f64);
        all_reduce(&mut buf)?;
        let m = buf[c] as usize;
        if m == 0 {
            return Err(Error::Shape(format!(
                "{op}: no elements per channel on any rank"
            )));
        }
        let mf = m as f64;
        let shift: Vec<f32> = buf[..c].iter().map(|&s| (s / mf) as f32).collect();
        let dshift = self.upload_f32(&shift)?;
        self.batch_norm_shifted_sums(x, n, c, hw, &dshift, &mut s1, &mut s2)?;
        let (h1, h2) = (self.dtoh::<f32>(&s1, c)?, self.dtoh::<f32>(&s2, c)?);
        let mut buf: Vec<f64> = h1
            .iter()
            .zip(&h2)
            .flat_map(|(&a, &b)| [a as f64, b as f64])
            .collect();
        all_reduce(&mut buf)?;
        let (mut hm, mut hi, mut hv) = (vec![0.0f32; c], vec![0.0f32; c], vec![0.0f32; c]);
        // The unbiased variance as the CPU arm rounds it (M / (M - 1) in f32).
        let unbiased = m as f32 / (m - 1).max(1) as f32;
        for ch in 0..c {
            let (a, b) = (buf[2 * ch], buf[2 * ch + 1]);
            let dm = a / mf;
            hm[ch] = (shift[ch] as f64 + dm) as f32;
            let var = (b / mf - dm * dm).max(0.0) as f32;
            hi[ch] = (1.0 / (var as f64 + eps as f64).sqrt()) as f32;
            hv[ch] = var * unbiased;
        }
        self.copy_from_host_f32(mean, &hm)?;
        self.copy_from_host_f32(invstd, &hi)?;
        self.copy_from_host_f32(var_unbiased, &hv)?;
        Ok(m)
    }

    /// For the dx pass of a synchronized BN backward: this rank's parameter-gradient sums
    /// `dgamma` = sum(dy * xhat) and `dbeta` = sum(dy) (c,), all-reduced over the ranks by
    /// `all_reduce` (staged through the host: waits for the device) and scaled by m_local / m_global,
    /// so that the single-rank dx kernels, which divide by this rank's m_local values per
    /// channel, compute dx = gamma * invstd * (dy - sum_global(dy) / M - xhat
    /// sum_global(dy xhat) / M) with M = m_global, the CPU's `bn_backward_coefs_sync`.
    /// Returns the (dgamma, dbeta) buffers for the dx kernel; None without `sync` (one rank, or
    /// eval mode), where the dx kernel reads this rank's sums as they are.
    pub(super) fn bn_sync_dx_sums(
        &self,
        sync: BnSyncDev<'_>,
        dgamma: &DeviceBuffer,
        dbeta: &DeviceBuffer,
        c: usize,
        m_local: usize,
    ) -> Result<Option<(DeviceBuffer, DeviceBuffer)>> {
        let Some((all_reduce, m_global)) = sync else {
            return Ok(None);
        };
        if m_global == 0 {
            return Err(Error::Shape(
                "synchronized batch norm backward: no values per channel on any rank".into(),
            ));
        }
        let (g, b) = (self.dtoh::<f32>(dgamma, c)?, self.dtoh::<f32>(dbeta, c)?);
        // Per channel (sum dy, sum dy * xhat): the CPU arm's pairs.
        let mut buf: Vec<f64> = b
            .iter()
            .zip(&g)
            .flat_map(|(&b, &g)| [b as f64, g as f64])
            .collect();
        all_reduce(&mut buf)?;
        let scale = m_local as f64 / m_global as f64;
        let gb: Vec<f32> = buf.iter().step_by(2).map(|&v| (v * scale) as f32).collect();
        let gg: Vec<f32> = buf[1..]
            .iter()
            .step_by(2)
            .map(|&v| (v * scale) as f32)
            .collect();
        Ok(Some((self.upload_f32(&gg)?, self.upload_f32(&gb)?)))
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
