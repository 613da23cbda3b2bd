//! The training state kept on the GPU while a step runs there: flat device buffers for the
//! student parameters, the gradient, the LARS momentum, the teacher parameters and both
//! networks' BN running statistics. Created from the host stores at the first GPU step (and
//! after a resume/load); while it exists it is the source of truth and the host stores lag
//! behind until `CarpState::sync_to_host`.
//!
//! Per step nothing crosses the bus except one download of `3 * n_entries` floats: the NaN
//! guard (per-entry counts of non-finite gradients, fused into LARS pass 1), which must name the
//! first offending entry before any weight changes. One small download per step is acceptable
//! for now; it is the state's only host synchronization (the step's phase clocks and the loss
//! scalars wait for the device too). A CUDA-graph step would read the flags after the graph and
//! roll back, or keep a device-side "skip the update" flag instead.
//!
//! `CARP_HOST_OPTIM=1` keeps today's host path (upload the parameters per forward, download the
//! gradients and BN statistics, LARS/EMA on the host) for A/B runs and as a fallback.

/// True when `CARP_HOST_OPTIM=1`: GPU steps run BN updates, LARS and the EMA on the host.
pub fn host_optim_forced() -> bool {
    std::env::var("CARP_HOST_OPTIM").is_ok_and(|v| v.trim() == "1")
}

/// Where a `CarpState` keeps its device copy, and whether its host stores lag behind it.
#[derive(Default)]
pub struct DeviceSlot {
    #[cfg(feature = "cuda")]
    pub(crate) state: Option<DeviceTrainState>,
    /// The host stores are older than the device state (a step ran since the last sync).
    pub(crate) host_stale: bool,
}

impl Clone for DeviceSlot {
    /// A clone gets no device state (device buffers are not shared); it keeps the staleness
    /// flag, so a clone of an unsynced state refuses to train or save instead of silently using
    /// old host values.
    fn clone(&self) -> Self {
        DeviceSlot {
            #[cfg(feature = "cuda")]
            state: None,
            host_stale: self.host_stale,
        }
    }
}

#[cfg(feature = "cuda")]
pub use gpu::DeviceTrainState;

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use crate::bail;
    use crate::device::cuda::{CudaBackend, DeviceBuffer, LarsPlan};
    use crate::error::Result;
    use crate::nn::params::ParamStore;
    use crate::nn::resnet::BnUpdate;
    use crate::optim::lars::LarsConfig;
    use crate::tensor::{Device, Storage, Tensor};

    /// The device-resident training state of one GPU.
    pub struct DeviceTrainState {
        pub be: Arc<CudaBackend>,
        /// Student parameters, (P,) in the student `ParamStore` layout.
        pub student: DeviceBuffer,
        /// This step's gradient, (P,).
        pub grad: DeviceBuffer,
        /// LARS momentum, (P,).
        pub momentum: DeviceBuffer,
        /// Teacher parameters, (P,).
        pub teacher: DeviceBuffer,
        /// Student BN running statistics, (B,) in the student buffers-store layout.
        pub student_bn: DeviceBuffer,
        /// Teacher BN running statistics, (B,).
        pub teacher_bn: DeviceBuffer,
        plan: LarsPlan,
        /// (3, n_entries): ||w||^2, ||g + wd w||^2, non-finite gradient count per entry.
        stats: DeviceBuffer,
        numel: usize,
        n_buffers: usize,
    }

    /// A host store onto the device (one upload, one wait).
    fn up(be: &CudaBackend, what: &str, v: &[f32], n: usize) -> Result<DeviceBuffer> {
        if v.len() != n {
            bail!(
                Shape,
                "device training state: {what} has {} values, expected {n}",
                v.len()
            );
        }
        be.upload_f32(v)
    }

    /// A device buffer into a host store of the same length.
    fn down(be: &CudaBackend, buf: &DeviceBuffer, host: &mut [f32]) -> Result<()> {
        let v = be.download_f32(buf)?;
        if v.len() != host.len() {
            bail!(
                Shape,
                "device training state: {} device values for {} host values",
                v.len(),
                host.len()
            );
        }
        host.copy_from_slice(&v);
        Ok(())
    }

    /// Batch statistics on this GPU (they are already there on the device path).
    fn on_gpu(t: &Tensor, ordinal: usize) -> Result<Tensor> {
        match t.storage() {
            Storage::Cuda(_) => Ok(t.clone()),
            Storage::Cpu(_) => t.to_device(&Device::Cuda(ordinal)),
        }
    }

    impl DeviceTrainState {
        /// Uploads the host stores. The teacher must have the student's layout (EMA).
        pub fn upload(
            be: Arc<CudaBackend>,
            student: (&ParamStore, &ParamStore),
            teacher: (&ParamStore, &ParamStore),
            momentum: &[f32],
        ) -> Result<DeviceTrainState> {
            let (sp, sb) = student;
            let (tp, tb) = teacher;
            if !sp.same_layout(tp) || !sb.same_layout(tb) {
                bail!(
                    Shape,
                    "device training state: the teacher's stores do not have the student's layout"
                );
            }
            let (numel, n_buffers) = (sp.numel(), sb.numel());
            let plan = be.lars_plan(&sp.segments(), numel)?;
            Ok(DeviceTrainState {
                student: up(&be, "student parameters", &sp.data, numel)?,
                grad: be.zeros_f32(numel)?,
                momentum: up(&be, "LARS momentum", momentum, numel)?,
                teacher: up(&be, "teacher parameters", &tp.data, numel)?,
                student_bn: up(&be, "student BN statistics", &sb.data, n_buffers)?,
                teacher_bn: up(&be, "teacher BN statistics", &tb.data, n_buffers)?,
                stats: be.zeros_f32(3 * sp.len())?,
                plan,
                numel,
                n_buffers,
                be,
            })
        }

        pub fn ordinal(&self) -> usize {
            self.be.ordinal()
        }

        /// Copies every device buffer into the host stores (student, teacher, their BN
        /// statistics, the momentum and the last gradient). Waits for the device.
        pub fn download(
            &self,
            student: (&mut ParamStore, &mut ParamStore),
            teacher: (&mut ParamStore, &mut ParamStore),
            momentum: &mut [f32],
        ) -> Result<()> {
            let (sp, sb) = student;
            let (tp, tb) = teacher;
            if sp.numel() != self.numel || sb.numel() != self.n_buffers {
                bail!(
                    Shape,
                    "device training state of {} parameters and {} BN values, host stores of {} and {}",
                    self.numel,
                    self.n_buffers,
                    sp.numel(),
                    sb.numel()
                );
            }
            let be = &self.be;
            down(be, &self.student, &mut sp.data)?;
            down(be, &self.grad, &mut sp.grad)?;
            down(be, &self.momentum, momentum)?;
            down(be, &self.teacher, &mut tp.data)?;
            down(be, &self.student_bn, &mut sb.data)?;
            down(be, &self.teacher_bn, &mut tb.data)
        }

        /// The NaN guard and LARS pass 1: per-entry norms and non-finite gradient counts, then
        /// one small download (3 floats per entry; the step's one host synchronization). An
        /// error names the first entry (in layout order, as the host guard) with a non-finite
        /// gradient, or with a non-finite trust ratio (non-finite weights); nothing has changed
        /// at that point.
        pub fn check_and_norms(
            &mut self,
            params: &ParamStore,
            weight_decay: f32,
            step: usize,
        ) -> Result<()> {
            let n = params.len();
            if self.plan.num_segments() != n {
                bail!(
                    Shape,
                    "device training state: LARS plan of {} entries for a store of {n}",
                    self.plan.num_segments()
                );
            }
            self.be.lars_norms_checked(
                &self.plan,
                &self.student,
                &self.grad,
                weight_decay,
                &mut self.stats,
            )?;
            let s = self.be.download_f32(&self.stats)?; // (3, n)
                                                        // Entries are in layout order, so the first flagged entry holds the first
                                                        // non-finite element, the one the host guard names.
            if let Some(i) = (0..n).find(|&i| s[2 * n + i] != 0.0) {
                bail!(
                    NonFinite,
                    "step {step}: non-finite gradient in {}; stopping before any weight changes",
                    params.entries[i].name
                );
            }
            if let Some(e) = params
                .entries
                .iter()
                .enumerate()
                .find(|(i, e)| !e.is_1d() && (!s[*i].is_finite() || !s[n + *i].is_finite()))
                .map(|(_, e)| e)
            {
                bail!(
                    NonFinite,
                    "step {step}: lars: trust ratio of {} is NaN (non-finite weights or gradients); stopping before any weight changes",
                    e.name
                );
            }
            Ok(())
        }

        /// LARS pass 2 on the device, with the norms `check_and_norms` left.
        pub fn lars(&mut self, cfg: &LarsConfig, lr: f32) -> Result<()> {
            if !lr.is_finite() {
                bail!(NonFinite, "lars: learning rate {lr}");
            }
            self.be.lars_update_from_stats(
                &self.plan,
                &mut self.student,
                &self.grad,
                &mut self.momentum,
                &self.stats,
                lr,
                cfg.momentum,
                cfg.trust_coef,
                cfg.weight_decay,
            )
        }

        /// teacher = m teacher + (1 - m) student on the device.
        pub fn ema(&mut self, m: f32) -> Result<()> {
            if !(0.0..=1.0).contains(&m) {
                bail!(Config, "ema_update: momentum {m} is outside [0, 1]");
            }
            self.be.ema_update(&mut self.teacher, &self.student, m)
        }

        /// Queued BN running-statistics updates into the teacher's (`teacher`) or the
        /// student's flat device statistics; `buffers` gives their layout.
        pub fn apply_bn_updates(
            &mut self,
            teacher: bool,
            buffers: &ParamStore,
            updates: Vec<BnUpdate>,
            momentum: f32,
        ) -> Result<()> {
            if buffers.numel() != self.n_buffers {
                bail!(
                    Shape,
                    "device BN statistics hold {} values, the store {}",
                    self.n_buffers,
                    buffers.numel()
                );
            }
            let ordinal = self.ordinal();
            let flat = if teacher {
                &mut self.teacher_bn
            } else {
                &mut self.student_bn
            };
            for u in updates {
                let (em, ev) = (
                    buffers.entry(u.ids.running_mean),
                    buffers.entry(u.ids.running_var),
                );
                let c = em.len();
                u.batch_mean.expect_shape(&em.name, &[c])?;
                u.batch_var.expect_shape(&ev.name, &[c])?;
                let (m, v) = (
                    on_gpu(&u.batch_mean, ordinal)?,
                    on_gpu(&u.batch_var, ordinal)?,
                );
                self.be.batch_norm_running_update_at(
                    flat,
                    em.offset,
                    ev.offset,
                    &m.cuda()?.buf,
                    &v.cuda()?.buf,
                    c,
                    momentum,
                )?;
            }
            Ok(())
        }
    }
}
