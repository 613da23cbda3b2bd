//! Launchers of `kernels/lars.cu`: LARS in one call (`lars_step`) and, for the device-resident
//! training state (`resident::DeviceTrainState`), the NaN guard fused with pass 1
//! (`lars_norms_checked`), the step's verdict (`step_ok`) and pass 2 on its statistics.

use super::*;

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

impl CudaBackend {
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
