//! The training state a step runs on, behind one interface for every device: the step
//! (`train::step`) makes the same calls (leaves, gather the gradient, the NaN guard, its verdict,
//! BN running statistics, LARS, the EMA) and [`TrainState`] dispatches them, here and nowhere
//! else, to one of two implementations:
//! - [`TrainState::Host`]: on the CPU, the host stores of the `CarpState` are the state. Its
//!   arithmetic is the CPU reference the GPU is tested against: LARS pass 1 with the guard
//!   ([`lars_norms`]), the verdict, pass 2 ([`Lars::update_from_norms`]), [`ema_update`] and
//!   the BN updates.
//! - [`TrainState::Device`]: on a GPU, flat device buffers for the student parameters, the
//!   gradient, the LARS momentum, the teacher parameters and both networks' BN running
//!   statistics, created from the host stores at the first GPU step (and after a resume/load).
//!   While it exists it IS the state: the host stores are not read (a checkpoint refuses
//!   them) until `CarpState::move_to_host` copies the state home and drops the buffers, the
//!   explicit copy checkpoints and evaluation make. The state lives in one place at a time,
//!   so there is nothing to keep consistent.
//!
//! On a GPU nothing crosses the bus per step except one download of `3 * n_entries + 3` floats
//! at the END of the step: the NaN guard's per-entry statistics (non-finite gradient counts
//! fused into LARS pass 1, the norms), the loss terms and the device-side verdict. The verdict
//! (`step_ok`: loss finite AND every gradient finite AND every trust ratio finite) is an i32
//! flag on the device that the BN running-statistics updates, LARS pass 2 and the EMA read:
//! they do nothing when it is 0, so the whole step is queued without a wait in the middle and
//! a non-finite step still changes nothing. The host then reads the verdict ([`GuardStats`], the
//! same reading on both implementations) and names the first offending entry. `--nan-guard
//! sync` reads the verdict before queuing the updates (one wait mid-step) and runs the ungated
//! update kernels instead (the A/B and fallback of the gating kernels).
//!
//! Without the `cuda` feature the device state is an uninhabited stub (as candle's dummy
//! backend), so that the step is one body that compiles everywhere.

use std::sync::Arc;
use std::time::Instant;

use crate::autograd::{Gradients, Tape};
use crate::bail;
use crate::carp::teacher::ema_update;
use crate::device::collective::{self, Collective};
use crate::error::{Error, Result};
use crate::nn::model::apply_bn_updates;
use crate::nn::params::{ParamLeaves, ParamStore};
use crate::nn::resnet::BnUpdate;
use crate::optim::lars::{lars_norms, Lars, LarsNorms};
use crate::tensor::{Device, Tensor};

/// True when the run option `nan_guard` is sync: the device step reads the NaN verdict before
/// the updates (a wait mid-step) and runs the ungated update kernels, instead of gating them on
/// the device.
pub fn step_sync_forced() -> bool {
    crate::options::current().nan_guard == crate::options::NanGuard::Sync
}

/// What the NaN guard found in one step, read the same way on every device: LARS pass 1's
/// per-entry norms and non-finite gradient counts, the loss terms, and the verdict.
#[derive(Clone, Debug)]
pub struct GuardStats {
    pub norms: LarsNorms,
    pub entropy: f32,
    pub consistency: f32,
    /// The verdict (`step_ok`): the loss, every gradient and every trust ratio finite.
    pub ok: bool,
}

impl GuardStats {
    /// The verdict rule of the GPU's `step_ok_f32`, on the host.
    pub fn judge(params: &ParamStore, norms: LarsNorms, entropy: f32, consistency: f32) -> Self {
        let ratios_finite =
            params.entries.iter().enumerate().all(|(i, e)| {
                e.is_1d() || (norms.w_sq[i].is_finite() && norms.g_sq[i].is_finite())
            });
        let ok = (entropy + consistency).is_finite()
            && norms.non_finite.iter().all(|&c| c == 0)
            && ratios_finite;
        GuardStats {
            norms,
            entropy,
            consistency,
            ok,
        }
    }

    /// The loss terms (loss, consistency, entropy) when the step was finite, else the error:
    /// the non-finite loss first, then the first entry (in layout order, so the one holding the
    /// first non-finite element) with a non-finite gradient, then one with a non-finite trust
    /// ratio (non-finite weights). The reported loss is `entropy + consistency` in f32.
    pub fn verdict(&self, params: &ParamStore, step: usize) -> Result<(f32, f32, f32)> {
        let n = params.len();
        let norms = &self.norms;
        if norms.w_sq.len() != n || norms.g_sq.len() != n || norms.non_finite.len() != n {
            bail!(
                Shape,
                "training state: guard statistics of {} entries for a store of {n}",
                norms.w_sq.len()
            );
        }
        let (entropy, consistency) = (self.entropy, self.consistency);
        let loss = entropy + consistency;
        if !loss.is_finite() {
            bail!(
                NonFinite,
                "step {step}: the loss is {loss} (consistency {consistency}, entropy {entropy}); stopping before any weight changes (causes: a non-finite input, or a prototype row of zero norm; --nan-guard sync checks the rows and names one)"
            );
        }
        if let Some(i) = (0..n).find(|&i| norms.non_finite[i] != 0) {
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
            .find(|(i, e)| {
                !e.is_1d() && (!norms.w_sq[*i].is_finite() || !norms.g_sq[*i].is_finite())
            })
            .map(|(_, e)| e)
        {
            bail!(
                NonFinite,
                "step {step}: lars: trust ratio of {} is NaN (non-finite weights or gradients); stopping before any weight changes",
                e.name
            );
        }
        if !self.ok {
            bail!(
                Device,
                "step {step}: the device verdict is 0 but the host finds the step finite \
                 (a bug in step_ok_f32); rerun with --nan-guard sync"
            );
        }
        Ok((loss, consistency, entropy))
    }
}

/// The host stores as the training state of a CPU step.
pub struct HostState {
    /// This step's guard, from [`TrainState::queue_check`].
    guard: Option<GuardStats>,
}

impl HostState {
    fn guard(&self) -> Result<&GuardStats> {
        self.guard.as_ref().ok_or_else(|| {
            Error::Msg("training state: an update before queue_check (a bug)".into())
        })
    }

    /// Whether a `gated` update may run: always when not gated (`--nan-guard sync` read the
    /// verdict first), else only on a good verdict, as the GPU's gated kernels.
    fn may_update(&self, gated: bool) -> Result<bool> {
        Ok(!gated || self.guard()?.ok)
    }
}

/// The state a training step runs on (see the module's documentation).
pub enum TrainState {
    Host(HostState),
    /// Boxed: hundreds of bytes of device handles against the host state's few.
    Device(Box<DeviceTrainState>),
}

/// GPU time between two points of the queued work on a device state, wall time on the host.
pub enum StepTimer {
    Wall(Instant),
    Device(DeviceTimer),
}

impl StepTimer {
    /// Milliseconds from this point to `end` (taken on the same state).
    pub fn elapsed_ms_to(&self, end: &StepTimer) -> Result<f64> {
        match (self, end) {
            (StepTimer::Wall(a), StepTimer::Wall(b)) => {
                Ok(b.duration_since(*a).as_secs_f64() * 1e3)
            }
            (StepTimer::Device(a), StepTimer::Device(b)) => a.elapsed_ms_to(b),
            _ => bail!(Msg, "step timer: a wall-clock and a device point (a bug)"),
        }
    }
}

impl TrainState {
    /// The state for a step on `device`: the device-resident one on a GPU (uploaded from the
    /// host stores), the host stores themselves on the CPU.
    pub fn for_step(
        device: &Device,
        student: (&ParamStore, &ParamStore),
        teacher: (&ParamStore, &ParamStore),
        momentum: &[f32],
    ) -> Result<TrainState> {
        Ok(match device {
            Device::Cuda(i) => TrainState::Device(Box::new(DeviceTrainState::upload_to(
                *i, student, teacher, momentum,
            )?)),
            Device::Cpu => TrainState::Host(HostState { guard: None }),
        })
    }

    /// Whether this is the state [`TrainState::for_step`] would make for `device`.
    pub fn serves(&self, device: &Device) -> bool {
        match self {
            TrainState::Host(_) => *device == Device::Cpu,
            TrainState::Device(ds) => *device == Device::Cuda(ds.ordinal()),
        }
    }

    /// The device-resident state, when the steps run on one.
    pub fn device_state(&self) -> Option<&DeviceTrainState> {
        match self {
            TrainState::Host(_) => None,
            TrainState::Device(ds) => Some(&**ds),
        }
    }

    /// Copies a device state into host stores of its layout (waits for the device); nothing to
    /// do for the host state, which is the host stores.
    pub fn copy_to_host(
        &self,
        student: (&mut ParamStore, &mut ParamStore),
        teacher: (&mut ParamStore, &mut ParamStore),
        momentum: &mut [f32],
    ) -> Result<()> {
        match self {
            TrainState::Host(_) => Ok(()),
            TrainState::Device(ds) => ds.download(student, teacher, momentum),
        }
    }

    /// A point in the step's timeline (on a GPU, in its queue: no wait).
    pub fn timing_event(&self) -> Result<StepTimer> {
        match self {
            TrainState::Host(_) => Ok(StepTimer::Wall(Instant::now())),
            TrainState::Device(ds) => Ok(StepTimer::Device(ds.timing_event()?)),
        }
    }

    /// Leaves of the student or the teacher (`teacher`, whose store `params` is) on the step's
    /// device.
    pub fn leaves(
        &self,
        params: &ParamStore,
        teacher: bool,
        tape: &mut Tape,
    ) -> Result<ParamLeaves> {
        match self {
            TrainState::Host(_) => params.leaves_on(tape, &Device::Cpu),
            TrainState::Device(ds) => ds.leaves(params, teacher, tape),
        }
    }

    /// This step's gradients of the student's leaves into the state's flat gradient (the host
    /// store's `grad`, or the device's), zeros where an entry has none; with a collective of
    /// more than one rank, averaged over the ranks (before the NaN guard and LARS, which then
    /// run on the same values on every rank).
    pub fn gather_grads(
        &mut self,
        params: &mut ParamStore,
        leaves: &ParamLeaves,
        grads: &Gradients,
        comm: Option<&Arc<dyn Collective>>,
    ) -> Result<()> {
        let comm = collective::multi(comm);
        match self {
            TrainState::Host(_) => {
                params.zero_grad();
                params.accumulate_grads(leaves, grads)?;
                if let Some(c) = comm {
                    c.all_reduce_sum(&mut params.grad)?;
                    let w = c.world_size() as f32;
                    params.grad.iter_mut().for_each(|g| *g /= w);
                }
                Ok(())
            }
            TrainState::Device(ds) => {
                ds.gather_grads(params, leaves, grads)?;
                if let Some(c) = comm {
                    ds.average_grads(&**c)?;
                }
                Ok(())
            }
        }
    }

    /// The NaN guard fused with LARS pass 1 (per-entry norms and non-finite gradient counts),
    /// then the verdict from them and the loss terms `loss_terms` (2,) = [H, consistency]. On a
    /// GPU queued; [`TrainState::verdict`] reads the result.
    pub fn queue_check(
        &mut self,
        params: &ParamStore,
        weight_decay: f32,
        loss_terms: &Tensor,
    ) -> Result<()> {
        match self {
            TrainState::Host(h) => {
                loss_terms.expect_shape("loss terms [H, consistency]", &[2])?;
                let terms = loss_terms.to_vec()?;
                let norms = lars_norms(params, weight_decay)?;
                h.guard = Some(GuardStats::judge(params, norms, terms[0], terms[1]));
                Ok(())
            }
            TrainState::Device(ds) => ds.queue_check(params, weight_decay, loss_terms),
        }
    }

    /// The step's verdict (on a GPU its one download, which waits for everything queued so
    /// far): the loss terms (loss, consistency, entropy), or the error naming what was not
    /// finite ([`GuardStats::verdict`]); the gated updates did nothing in that case.
    pub fn verdict(&self, params: &ParamStore, step: usize) -> Result<(f32, f32, f32)> {
        match self {
            TrainState::Host(h) => h.guard()?.verdict(params, step),
            TrainState::Device(ds) => ds.verdict(params, step),
        }
    }

    /// BN running-statistics updates into the teacher's (`teacher`) or the student's
    /// statistics, whose host store (and layout) is `buffers`; `gated`: only on a good verdict.
    pub fn apply_bn_updates(
        &mut self,
        teacher: bool,
        buffers: &mut ParamStore,
        updates: Vec<BnUpdate>,
        momentum: f32,
        gated: bool,
    ) -> Result<()> {
        match self {
            TrainState::Host(h) => {
                if !h.may_update(gated)? {
                    return Ok(());
                }
                apply_bn_updates(buffers, updates, momentum)
            }
            TrainState::Device(ds) => {
                ds.apply_bn_updates(teacher, buffers, updates, momentum, gated)
            }
        }
    }

    /// LARS pass 2 on the student with the norms `queue_check` left (`lars` holds the
    /// configuration and, on the host, the momentum); `gated`: only on a good verdict.
    pub fn lars(
        &mut self,
        lars: &mut Lars,
        params: &mut ParamStore,
        lr: f32,
        gated: bool,
    ) -> Result<()> {
        match self {
            TrainState::Host(h) => {
                if !h.may_update(gated)? {
                    return Ok(());
                }
                lars.update_from_norms(params, &h.guard()?.norms, lr)
            }
            TrainState::Device(ds) => ds.lars(&lars.cfg, lr, gated),
        }
    }

    /// teacher = m teacher + (1 - m) student; `gated`: only on a good verdict.
    pub fn ema(
        &mut self,
        teacher: &mut ParamStore,
        student: &ParamStore,
        m: f32,
        gated: bool,
    ) -> Result<()> {
        match self {
            TrainState::Host(h) => {
                if !h.may_update(gated)? {
                    return Ok(());
                }
                ema_update(&mut teacher.data, &student.data, m)
            }
            TrainState::Device(ds) => ds.ema(m, gated),
        }
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{DeviceTimer, DeviceTrainState};
#[cfg(not(feature = "cuda"))]
pub use stub::{DeviceTimer, DeviceTrainState};

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use crate::autograd::{Gradients, Tape};
    use crate::bail;
    use crate::device::collective::Collective;
    use crate::device::cuda::{CudaBackend, DeviceBuffer, LarsPlan};
    use crate::error::Result;
    use crate::nn::params::{ParamLeaves, ParamStore};
    use crate::nn::resnet::BnUpdate;
    use crate::optim::lars::{LarsConfig, LarsNorms};
    use crate::resident::GuardStats;
    use crate::tensor::{Device, Storage, Tensor};

    /// GPU time between two points of the stream's queued work.
    pub type DeviceTimer = crate::device::cuda::TimingEvent;

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
        pub fn timing_event(&self) -> Result<DeviceTimer> {
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

        /// The gradient averaged over the ranks of `comm` (its device all-reduce: NCCL's on
        /// the device, any other transport's staged through the host), in place.
        pub fn average_grads(&mut self, comm: &dyn Collective) -> Result<()> {
            comm.all_reduce_mean_device(&self.be, &mut self.grad)
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

        /// The step's one download (waits for everything queued so far): the guard's
        /// statistics and the device verdict.
        pub fn guard_stats(&self, params: &ParamStore) -> Result<GuardStats> {
            let n = params.len();
            let s = self.be.download_f32(&self.stats)?; // (3 n + 3)
            if s.len() != 3 * n + 3 {
                bail!(
                    Shape,
                    "device training state: {} statistics for {n} entries",
                    s.len()
                );
            }
            Ok(GuardStats {
                norms: LarsNorms {
                    w_sq: s[..n].iter().map(|&v| v as f64).collect(),
                    g_sq: s[n..2 * n].iter().map(|&v| v as f64).collect(),
                    // Exact counts (the kernel's comment): a float only tested against 0.
                    non_finite: s[2 * n..3 * n].iter().map(|&v| v as usize).collect(),
                },
                entropy: s[3 * n],
                consistency: s[3 * n + 1],
                ok: s[3 * n + 2] == 1.0,
            })
        }

        /// [`GuardStats::verdict`] on this step's download.
        pub fn verdict(&self, params: &ParamStore, step: usize) -> Result<(f32, f32, f32)> {
            self.guard_stats(params)?.verdict(params, step)
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
    use crate::device::collective::Collective;
    use crate::error::Result;
    use crate::nn::params::{ParamLeaves, ParamStore};
    use crate::nn::resnet::BnUpdate;
    use crate::optim::lars::LarsConfig;
    use crate::tensor::Tensor;

    /// No GPU time without a GPU.
    pub enum DeviceTimer {}

    impl DeviceTimer {
        pub fn elapsed_ms_to(&self, _end: &DeviceTimer) -> Result<f64> {
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

        pub fn timing_event(&self) -> Result<DeviceTimer> {
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

        pub fn average_grads(&mut self, _: &dyn Collective) -> Result<()> {
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
