//! The training state kept on the GPU while a step runs there: flat device buffers for the
//! student parameters, the gradient, the LARS momentum, the teacher parameters and both
//! networks' BN running statistics. Created from the host stores at the first GPU step (and
//! after a resume/load); while it exists it is the source of truth and the host stores lag
//! behind until `CarpState::sync_to_host`.
//!
//! Per step nothing crosses the bus except one download of `3 * n_entries + 3` floats at the
//! END of the step: the NaN guard's per-entry statistics (non-finite gradient counts fused
//! into LARS pass 1, the norms), the loss terms and the device-side verdict. The verdict
//! (`step_ok`: loss finite AND every gradient finite AND every trust ratio finite) is an i32
//! flag on the device that the BN running-statistics updates, LARS pass 2 and the EMA read:
//! they do nothing when it is 0, so the whole step is queued without a wait in the middle and
//! a non-finite step still changes nothing. The host then reads the verdict and names the
//! first offending entry. `--nan-guard sync` reads the verdict before queuing the updates
//! (one wait mid-step) and runs the ungated update kernels instead (the A/B and fallback of the
//! gating kernels).
//!
//! The `train` step drives it through this module's interface, with no backend code of its
//! own; without the `cuda` feature [`DeviceTrainState`] is an uninhabited stub (as candle's
//! dummy backend), so that the step is one body that compiles everywhere.
//!
//! `--optimizer-state host` keeps the host path (upload the parameters per forward, download the
//! gradients and BN statistics, LARS/EMA on the host) for A/B runs and as a fallback.

/// True when the run option `optimizer_state` is host: GPU steps run BN updates, LARS and the
/// EMA on the host.
pub fn host_optim_forced() -> bool {
    crate::options::current().optimizer_state == crate::options::OptimizerState::Host
}

/// True when the run option `nan_guard` is sync: the device step reads the NaN verdict before
/// the updates (a wait mid-step) and runs the ungated update kernels, instead of gating them on
/// the device.
pub fn step_sync_forced() -> bool {
    crate::options::current().nan_guard == crate::options::NanGuard::Sync
}

/// Where a `CarpState` keeps its device copy, and whether its host stores lag behind it.
#[derive(Default)]
pub struct DeviceSlot {
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
            state: None,
            host_stale: self.host_stale,
        }
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{DeviceTrainState, StepTimer};
#[cfg(not(feature = "cuda"))]
pub use stub::{DeviceTrainState, StepTimer};

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use crate::autograd::{Gradients, Tape};
    use crate::bail;
    use crate::device::cuda::{CudaBackend, DeviceBuffer, LarsPlan};
    use crate::error::Result;
    use crate::nn::params::{ParamLeaves, ParamStore};
    use crate::nn::resnet::BnUpdate;
    use crate::optim::lars::LarsConfig;
    use crate::tensor::{Device, Storage, Tensor};

    /// GPU time between two points of the stream's queued work.
    pub type StepTimer = crate::device::cuda::TimingEvent;

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
        /// (3 n_entries + 3): ||w||^2, ||g + wd w||^2, non-finite gradient count per entry,
        /// then [entropy H, consistency, ok] (`step_ok`): the step's one download.
        stats: DeviceBuffer,
        /// (1,) i32: this step's device-side verdict, 1 when the whole step is finite. The
        /// gated updates read it.
        ok: DeviceBuffer,
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
                stats: be.zeros_f32(3 * sp.len() + 3)?,
                ok: be.upload_i32(&[0])?,
                plan,
                numel,
                n_buffers,
                be,
            })
        }

        /// [`DeviceTrainState::upload`] to GPU `ordinal` (its backend opened on first use).
        pub fn upload_to(
            ordinal: usize,
            student: (&ParamStore, &ParamStore),
            teacher: (&ParamStore, &ParamStore),
            momentum: &[f32],
        ) -> Result<DeviceTrainState> {
            let be = crate::device::cuda::backend(ordinal)?;
            DeviceTrainState::upload(be, student, teacher, momentum)
        }

        pub fn ordinal(&self) -> usize {
            self.be.ordinal()
        }

        /// A point in this GPU's queue: two of them give the GPU time between them
        /// ([`StepTimer::elapsed_ms_to`]) without a wait in the middle.
        pub fn timing_event(&self) -> Result<StepTimer> {
            self.be.timing_event()
        }

        /// Leaves of the student or the teacher (`teacher`) on the GPU, made from its
        /// device-resident flat copy without touching the host: one stream-ordered device copy
        /// per entry of `params` (the store whose layout the state has).
        ///
        /// Copies rather than sub-buffer views: LARS and the EMA rewrite the flat buffer in
        /// place while a leaf could still be alive (a caller holding a `Forward`), and a
        /// `DeviceBuffer` view would alias it; the copies cost one pass over the parameters in
        /// device memory (~0.1 ms for ResNet50's 25M floats on an H100-class GPU) and no host
        /// synchronization.
        pub fn leaves(
            &self,
            params: &ParamStore,
            teacher: bool,
            tape: &mut Tape,
        ) -> Result<ParamLeaves> {
            self.check_store(params)?;
            let flat = if teacher {
                &self.teacher
            } else {
                &self.student
            };
            let entries = params.flat_entries();
            let tensors = crate::ops::flat::split_flat_gpu(&self.be, flat, &entries)?;
            let tensors = tensors.iter().map(|t| tape.track(t)).collect();
            Ok(ParamLeaves(tensors))
        }

        /// This step's gradients of the student's leaves into `grad` (P,), the layout of
        /// `params`: zero-filled first (an entry without a gradient gets zeros, as after
        /// `zero_grad`), then one stream-ordered device copy per entry; a CPU gradient among
        /// GPU ones is uploaded into its range. Nothing waits for the device.
        pub fn gather_grads(
            &mut self,
            params: &ParamStore,
            leaves: &ParamLeaves,
            grads: &Gradients,
        ) -> Result<()> {
            self.check_store(params)?;
            let parts = params.leaf_grads(leaves, grads)?;
            crate::ops::flat::gather_flat_gpu(&self.be, &parts, &mut self.grad)
        }

        /// An error unless `params` has this state's parameter count.
        fn check_store(&self, params: &ParamStore) -> Result<()> {
            if params.numel() != self.numel {
                bail!(
                    Shape,
                    "device training state of {} parameters, a store of {}",
                    self.numel,
                    params.numel()
                );
            }
            Ok(())
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

        /// The NaN guard and LARS pass 1, queued: per-entry norms and non-finite gradient
        /// counts, then the device-side verdict from them and the loss terms `loss_terms` (2,)
        /// = [H, consistency] on this GPU (`step_ok`). Nothing waits; `verdict` reads the result.
        pub fn queue_check(
            &mut self,
            params: &ParamStore,
            weight_decay: f32,
            loss_terms: &Tensor,
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
            loss_terms.expect_shape("loss terms [H, consistency]", &[2])?;
            let loss_terms = on_gpu(loss_terms, self.ordinal())?;
            self.be.step_ok(
                &self.plan,
                &mut self.stats,
                &loss_terms.cuda()?.buf,
                &mut self.ok,
            )
        }

        /// The step's one download (waits for everything queued so far): the loss terms
        /// (loss, consistency, entropy) when the step was finite, else the error the host guard
        /// would raise: the non-finite loss first, then the first entry (in layout order) with a
        /// non-finite gradient, then one with a non-finite trust ratio (non-finite weights).
        /// The gated updates did nothing in that case.
        pub fn verdict(&self, params: &ParamStore, step: usize) -> Result<(f32, f32, f32)> {
            let n = params.len();
            let s = self.be.download_f32(&self.stats)?; // (3 n + 3)
            if s.len() != 3 * n + 3 {
                bail!(
                    Shape,
                    "device training state: {} statistics for {n} entries",
                    s.len()
                );
            }
            let (entropy, consistency, ok) = (s[3 * n], s[3 * n + 1], s[3 * n + 2]);
            let loss = entropy + consistency;
            if !loss.is_finite() {
                bail!(
                    NonFinite,
                    "step {step}: the loss is {loss} (consistency {consistency}, entropy {entropy}); stopping before any weight changes (causes: a non-finite input, or a prototype row of zero norm; --nan-guard sync checks the rows and names one)"
                );
            }
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
            if ok != 1.0 {
                bail!(
                    Device,
                    "step {step}: the device verdict is {ok} but the host finds the step finite \
                     (a bug in step_ok_f32); rerun with --nan-guard sync"
                );
            }
            Ok((loss, consistency, entropy))
        }

        /// LARS pass 2 on the device, with the norms `queue_check` left; `gated`: only when
        /// the device verdict is ok.
        pub fn lars(&mut self, cfg: &LarsConfig, lr: f32, gated: bool) -> Result<()> {
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
                gated.then_some(&self.ok),
            )
        }

        /// teacher = m teacher + (1 - m) student on the device; `gated`: only when the device
        /// verdict is ok.
        pub fn ema(&mut self, m: f32, gated: bool) -> Result<()> {
            if !(0.0..=1.0).contains(&m) {
                bail!(Config, "ema_update: momentum {m} is outside [0, 1]");
            }
            if gated {
                self.be
                    .ema_update_gated(&mut self.teacher, &self.student, m, &self.ok)
            } else {
                self.be.ema_update(&mut self.teacher, &self.student, m)
            }
        }

        /// Queued BN running-statistics updates into the teacher's (`teacher`) or the
        /// student's flat device statistics; `buffers` gives their layout; `gated`: only when
        /// the device verdict is ok.
        pub fn apply_bn_updates(
            &mut self,
            teacher: bool,
            buffers: &ParamStore,
            updates: Vec<BnUpdate>,
            momentum: f32,
            gated: bool,
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
            let ok = gated.then_some(&self.ok);
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
                    ok,
                )?;
            }
            Ok(())
        }
    }
}

/// Without the `cuda` feature no tensor lives on a GPU, so no device state is ever made: the
/// types exist (uninhabited) so that the training step is one body that compiles everywhere.
#[cfg(not(feature = "cuda"))]
mod stub {
    use crate::autograd::{Gradients, Tape};
    use crate::bail;
    use crate::error::Result;
    use crate::nn::params::{ParamLeaves, ParamStore};
    use crate::nn::resnet::BnUpdate;
    use crate::optim::lars::LarsConfig;
    use crate::tensor::Tensor;

    /// No GPU time without a GPU.
    pub enum StepTimer {}

    impl StepTimer {
        pub fn elapsed_ms_to(&self, _end: &StepTimer) -> Result<f64> {
            match *self {}
        }
    }

    /// No device state without a GPU (uninhabited).
    pub enum DeviceTrainState {}

    impl DeviceTrainState {
        /// An error: this build has no CUDA backend.
        pub fn upload_to(
            _ordinal: usize,
            _student: (&ParamStore, &ParamStore),
            _teacher: (&ParamStore, &ParamStore),
            _momentum: &[f32],
        ) -> Result<DeviceTrainState> {
            bail!(Device, "{}", crate::device::NO_CUDA)
        }

        pub fn ordinal(&self) -> usize {
            match *self {}
        }

        pub fn timing_event(&self) -> Result<StepTimer> {
            match *self {}
        }

        pub fn leaves(&self, _: &ParamStore, _: bool, _: &mut Tape) -> Result<ParamLeaves> {
            match *self {}
        }

        pub fn gather_grads(
            &mut self,
            _: &ParamStore,
            _: &ParamLeaves,
            _: &Gradients,
        ) -> Result<()> {
            match *self {}
        }

        pub fn download(
            &self,
            _: (&mut ParamStore, &mut ParamStore),
            _: (&mut ParamStore, &mut ParamStore),
            _: &mut [f32],
        ) -> Result<()> {
            match *self {}
        }

        pub fn queue_check(&mut self, _: &ParamStore, _: f32, _: &Tensor) -> Result<()> {
            match *self {}
        }

        pub fn verdict(&self, _: &ParamStore, _: usize) -> Result<(f32, f32, f32)> {
            match *self {}
        }

        pub fn lars(&mut self, _: &LarsConfig, _: f32, _: bool) -> Result<()> {
            match *self {}
        }

        pub fn ema(&mut self, _: f32, _: bool) -> Result<()> {
            match *self {}
        }

        pub fn apply_bn_updates(
            &mut self,
            _: bool,
            _: &ParamStore,
            _: Vec<BnUpdate>,
            _: f32,
            _: bool,
        ) -> Result<()> {
            match *self {}
        }
    }
}
