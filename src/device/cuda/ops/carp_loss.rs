//! Launchers of `kernels/carp_loss.cu`: the fused partitioned CARP loss and its gradient.

use super::*;

/// Called on the (k,) pbar column sums between the softmax pass and their use: the multi-GPU
/// all-reduce goes here.
pub type PbarHook<'a> = &'a mut dyn FnMut(&mut DeviceBuffer) -> Result<()>;

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

impl CudaBackend {
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
        self.carp_loss_queued_scaled(
            student, teacher, perm, vs, n, k, nb, rows_total, pbar_hook, None,
        )
    }

    /// [`CudaBackend::carp_loss_queued`] with the uniformity gradient factor g multiplied by
    /// `entropy_grad_scale` when given (a data-parallel rank's loss: the world size, so that
    /// the average of the ranks' gradients is the global batch's, as the CPU's
    /// `carp_loss_pass2_scaled`); `None` launches exactly `carp_loss_queued`'s kernels.
    #[allow(clippy::too_many_arguments)]
    pub fn carp_loss_queued_scaled(
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
        entropy_grad_scale: Option<f32>,
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
        let mut g = g;
        if let Some(scale) = entropy_grad_scale {
            self.scale_in_place(&mut g, scale)?;
        }
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
