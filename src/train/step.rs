//! One CARP training step, top to bottom, the same calls on every device: teacher forward on
//! both views (no tape), student forward on both views (and on the optional multi-crop local
//! views), the partitioned loss and its analytic gradient, backward, the NaN guard, then the
//! EMA (from the student the loss saw), BN running statistics and LARS on the training state
//! (`resident::TrainState`: the host stores on the CPU, device buffers on a GPU). Nothing in
//! the state changes unless the whole step is finite.

use std::sync::Arc;
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::autograd::{Precision, Tape};
use crate::bail;
use crate::device::collective::Collective;
use crate::device::nvtx;
use crate::error::{Error, Result};
use crate::nn::model::Forward;
use crate::nn::params::ParamLeaves;
use crate::nn::{ModelConfig, Network};
use crate::ops::batchnorm::BN_MOMENTUM;
use crate::ops::loss::{carp_loss_forward_scaled, check_permutation, random_partition, Partition};
use crate::ops::rows::stack_rows;
use crate::optim::lars::{Lars, LarsConfig};
use crate::resident::{step_sync_forced, DeviceTrainState, TrainState};
use crate::tensor::{Device, Tensor};

/// LARS as SPEC.md fixes it: momentum 0.9, trust coefficient 0.001.
pub fn lars_config(weight_decay: f32) -> LarsConfig {
    LarsConfig {
        momentum: 0.9,
        trust_coef: 0.001,
        weight_decay,
    }
}

/// Everything that evolves during training (and goes into a checkpoint).
///
/// The state lives in one place at a time. On the CPU that is the host stores below (the
/// networks' parameters and BN statistics, the LARS momentum). From the first step on a GPU it
/// is device buffers (`resident`), and the host stores are not read until
/// [`CarpState::move_to_host`] copies the state home: checkpoints, evaluation and tests make
/// that copy explicitly (a checkpoint of a state on the GPU is refused), and the next GPU step
/// uploads it again. Whatever writes the host stores directly calls
/// [`CarpState::discard_device_state`] after. A copy is [`CarpState::try_clone`] (it reads a
/// device state), not `Clone`.
pub struct CarpState {
    pub student: Network,
    pub teacher: Network,
    pub lars: Lars,
    /// Optimizer steps taken.
    pub step: usize,
    /// Draws each step's prototype partition.
    pub partition_rng: ChaCha8Rng,
    /// Prototype block size.
    pub nb: usize,
    /// The numerical mode of both networks' forwards and the student's backward (the tapes'
    /// precision); the parameters, BN statistics, loss, LARS and the EMA stay f32.
    pub precision: Precision,
    /// The state the steps run on: the host stores (the CPU), or the device buffers that hold
    /// it while steps run on a GPU; none before the first step and after `move_to_host`.
    pub(crate) state: Option<TrainState>,
    /// The ranks of a data-parallel run this state is one of (none: a single process). Each
    /// rank steps on its own rows of the global batch; batch norm, the loss's batch mean and
    /// the gradient average span the ranks, so every rank takes the global batch's step.
    pub collective: Option<Arc<dyn Collective>>,
    /// Parts of the data-parallel synchronization to leave out: only for the tests that show
    /// each part is needed (training leaves nothing out).
    #[doc(hidden)]
    pub unsynced: Unsynced,
}

/// What a data-parallel step leaves out ([`CarpState::unsynced`]); the default is nothing.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Unsynced {
    /// Batch norm normalizes with each rank's own statistics (DDP without SyncBN).
    pub batch_norm: bool,
    /// The uniformity gradient is not scaled by the world size (the gradient average then
    /// divides it by the world size).
    pub entropy_scale: bool,
}

/// What one step measured.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StepStats {
    pub loss: f32,
    pub consistency: f32,
    pub entropy: f32,
    pub lr: f32,
    pub momentum: f32,
    /// Wall time of each phase of the step.
    pub phases: PhaseTimes,
}

/// Milliseconds per phase of one step (the CPU runs synchronously, so wall time is exact).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PhaseTimes {
    pub teacher_forward_ms: f64,
    pub student_forward_ms: f64,
    pub loss_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    pub ema_ms: f64,
    /// The whole step: on the device-resident GPU path the GPU time between two CUDA events
    /// around the step's queued work (no wait in between); elsewhere wall time.
    pub step_ms: f64,
}

/// Milliseconds of a phase on `device`. With the run option `phase_sync` (carp-bench's
/// default) a GPU phase is waited for first, so that [`PhaseTimes`] holds each phase's GPU time
/// (the launches are asynchronous, so the clock alone measures only the queuing). Off (the
/// training default), a GPU step only queues work and waits once at its end; its per-phase
/// times are then the host's queuing times, and `step_ms` the step's GPU time.
fn phase_ms(device: &Device, t: &mut Instant) -> Result<f64> {
    if crate::options::current().phase_sync.on() {
        device.synchronize()?;
    }
    Ok(ms_since(t))
}

fn ms_since(t: &mut Instant) -> f64 {
    let now = Instant::now();
    let ms = (now - *t).as_secs_f64() * 1e3;
    *t = now;
    ms
}

impl CarpState {
    /// Student initialized from `seed`; the teacher starts as an exact copy (as the reference).
    pub fn new(model: &ModelConfig, nb: usize, weight_decay: f32, seed: u64) -> Result<CarpState> {
        let k = model.head.prototypes;
        if nb == 0 || !k.is_multiple_of(nb) {
            bail!(Config, "the block size NB ({nb}) must divide K ({k})");
        }
        let student = Network::new(model, seed)?;
        let teacher = student.clone();
        let lars = Lars::new(lars_config(weight_decay), student.params.numel());
        Ok(CarpState {
            student,
            teacher,
            lars,
            step: 0,
            // A separate stream from the init RNG, so changing the model does not change partitions.
            partition_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
            nb,
            precision: Precision::F32,
            state: None,
            collective: None,
            unsynced: Unsynced::default(),
        })
    }

    /// This state as one rank of `collective` (see [`CarpState::collective`]). Every rank
    /// must start from the same state (the same seed), which keeps the prototype partitions
    /// the same on every rank.
    pub fn with_collective(mut self, collective: Arc<dyn Collective>) -> CarpState {
        self.collective = Some(collective);
        self
    }

    /// A tape of this state's precision, its batch norms synchronized across the ranks.
    fn tape(&self, record: bool) -> Tape {
        let t = if record { Tape::new() } else { Tape::no_grad() };
        let t = t.with_precision(self.precision);
        match &self.collective {
            Some(c) if !self.unsynced.batch_norm => t.with_collective(c.clone()),
            _ => t,
        }
    }

    /// Moves the training state home: a device-resident state is copied into the host stores
    /// (parameters, the last gradient, momentum, teacher, BN statistics; waits for the device)
    /// and its buffers are dropped, so that the host stores are the state again (the next GPU
    /// step uploads them). A no-op on the CPU. If the copy fails the device state is kept, so
    /// nothing is lost.
    pub fn move_to_host(&mut self) -> Result<()> {
        if let Some(ts) = &self.state {
            let _r = nvtx::Range::new("state to host");
            ts.copy_to_host(
                (&mut self.student.params, &mut self.student.buffers),
                (&mut self.teacher.params, &mut self.teacher.buffers),
                &mut self.lars.momentum_buf,
            )?;
        }
        self.state = None;
        Ok(())
    }

    /// A copy of this state with its current values in the copy's host stores (read from the
    /// device when the state is there; this one is unchanged and stays where it is). Waits
    /// for the device.
    pub fn try_clone(&self) -> Result<CarpState> {
        let mut copy = self.clone_host_stores();
        if let Some(ts) = &self.state {
            ts.copy_to_host(
                (&mut copy.student.params, &mut copy.student.buffers),
                (&mut copy.teacher.params, &mut copy.teacher.buffers),
                &mut copy.lars.momentum_buf,
            )?;
        }
        Ok(copy)
    }

    /// A copy of the host stores as they are, without the training state: their values are
    /// old while the state is on a GPU, so this is only for a caller that overwrites every
    /// value (a checkpoint load); everyone else wants [`CarpState::try_clone`].
    pub(crate) fn clone_host_stores(&self) -> CarpState {
        CarpState {
            student: self.student.clone(),
            teacher: self.teacher.clone(),
            lars: self.lars.clone(),
            step: self.step,
            partition_rng: self.partition_rng.clone(),
            nb: self.nb,
            precision: self.precision,
            state: None,
            collective: self.collective.clone(),
            unsynced: self.unsynced,
        }
    }

    /// The device-resident state, while steps run on a GPU (tests compare it with the host).
    pub fn device_state(&self) -> Option<&DeviceTrainState> {
        self.state.as_ref().and_then(TrainState::device_state)
    }

    /// Whether the state is on a GPU (the last step ran there, and no `move_to_host` since).
    pub fn has_device_state(&self) -> bool {
        self.device_state().is_some()
    }

    /// Whether the host stores are the state (no device-resident state holds it). Checkpoints
    /// refuse a state that is not.
    pub fn host_is_current(&self) -> bool {
        !self.has_device_state()
    }

    /// Drops a device-resident state after the host stores were replaced (a load/resume, a
    /// test editing weights): the host stores become the state and the next GPU step uploads
    /// them. Values the device held are lost.
    pub fn discard_device_state(&mut self) {
        self.state = None;
    }

    /// Makes the training state match the step's device: the host stores on the CPU, a
    /// device-resident state on a GPU, created (uploaded) at the first GPU step and moved home
    /// when the step moves elsewhere.
    fn prepare_state(&mut self, device: &Device) -> Result<&mut TrainState> {
        if self.state.as_ref().is_some_and(|ts| !ts.serves(device)) {
            self.move_to_host()?;
        }
        if self.state.is_none() {
            self.state = Some(TrainState::for_step(
                device,
                (&self.student.params, &self.student.buffers),
                (&self.teacher.params, &self.teacher.buffers),
                &self.lars.momentum_buf,
            )?);
        }
        self.state
            .as_mut()
            .ok_or_else(|| Error::Msg("prepare_state: no training state (a bug)".into()))
    }

    /// The state the current step runs on (made by `prepare_state`).
    fn state(&self) -> Result<&TrainState> {
        self.state
            .as_ref()
            .ok_or_else(|| Error::Msg("a training step without a training state (a bug)".into()))
    }

    /// One step on a batch of two views, each (N, 3, S, S), with this step's learning rate and
    /// teacher momentum.
    pub fn train_step(
        &mut self,
        view1: &Tensor,
        view2: &Tensor,
        lr: f32,
        m: f32,
    ) -> Result<StepStats> {
        self.train_step_multi(view1, view2, None, lr, m)
    }

    /// One step with optional multi-crop local views (SPEC.md, beyond the seed): `locals` is
    /// (L N, 3, s, s), view-major (rows l N .. (l + 1) N are local view l of the N images, the
    /// layout of the loader's `LocalViews`), on the globals' device; `s` may differ from the
    /// globals' S. The student sees the 2 global views (one 2N batch) and the L local views
    /// (one L N batch) through its backbone, then the head on all (2 + L) N features at once
    /// (DINO's multi-crop wrapper); the teacher sees the globals only; the loss pairs every
    /// student view with every teacher view of another index. `None` is `train_step`.
    pub fn train_step_multi(
        &mut self,
        view1: &Tensor,
        view2: &Tensor,
        locals: Option<&Tensor>,
        lr: f32,
        m: f32,
    ) -> Result<StepStats> {
        self.step_with(view1, view2, locals, None, lr, m)
    }

    /// `train_step` with this step's prototype partition given instead of drawn: `perm` is a
    /// permutation of 0..K, block j holding `perm[j NB .. (j + 1) NB]` (the layout of
    /// [`random_partition`] and of the official `RandomPartition`'s indices). For replaying
    /// another implementation's step (tests/official_parity.rs); the partition RNG is not
    /// advanced, so the drawn partitions of later steps are those they would have been.
    pub fn train_step_with_partition(
        &mut self,
        view1: &Tensor,
        view2: &Tensor,
        perm: Vec<u32>,
        lr: f32,
        m: f32,
    ) -> Result<StepStats> {
        check_permutation(
            &format!("step {}: the given partition", self.step),
            &perm,
            self.student.cfg.head.prototypes,
        )?;
        self.step_with(view1, view2, None, Some(perm), lr, m)
    }

    /// The step, with the partition drawn (`perm` None) or given.
    fn step_with(
        &mut self,
        view1: &Tensor,
        view2: &Tensor,
        locals: Option<&Tensor>,
        perm: Option<Vec<u32>>,
        lr: f32,
        m: f32,
    ) -> Result<StepStats> {
        let step = self.step;
        // Host values: checked before anything is queued.
        if !lr.is_finite() || !(0.0..=1.0).contains(&m) {
            bail!(
                Config,
                "step {step}: learning rate {lr} or teacher momentum {m} out of range; stopping before any weight changes"
            );
        }
        view1.expect_rank("view 1 (N, 3, S, S)", 4)?;
        view2.expect_shape("view 2", view1.shape())?;
        // The views decide where the step runs: both networks' forward and backward, and the
        // loss, run on their device; on a GPU so do BN running statistics, LARS and the EMA, on
        // the device-resident state.
        let device = crate::ops::common_device("train_step views", &[view1, view2])?;
        self.prepare_state(&device)?;
        let n = view1.dim(0);
        let k = self.student.cfg.head.prototypes;
        // This step's partition, drawn on a copy of the RNG that is committed only when the
        // step succeeds (nothing in the state changes otherwise), and put on the step's device
        // here, while a GPU's queue is empty (the last step ended with its one wait).
        let mut partition_rng = self.partition_rng.clone();
        let perm = match perm {
            Some(given) => given,
            None => random_partition(k, &mut partition_rng),
        };
        let partition = Partition::on(perm, &device)?;
        // The step's time: on a GPU one event pair around its queued work.
        let start = self.state()?.timing_event()?;
        let n_local = match locals {
            None => 0,
            Some(l) => {
                l.expect_rank("local views (L N, 3, s, s)", 4)?;
                if l.dim(1) != view1.dim(1) || l.dim(0) == 0 || !l.dim(0).is_multiple_of(n) {
                    bail!(
                        Shape,
                        "local views {:?}: need (L N, {}, s, s) with L >= 1 and N = {n} (the global batch)",
                        l.shape(),
                        view1.dim(1)
                    );
                }
                crate::ops::common_device("train_step views and local views", &[view1, l])?;
                l.dim(0) / n
            }
        };
        let vs = 2 + n_local; // student views
                              // Both views go through each network as one batch of 2N: BN statistics are taken over
                              // both views, as the reference (DINO's multi-crop wrapper) does.
        let x = stack_rows(view1, view2)?; // (2N, 3, S, S)

        let mut phases = PhaseTimes::default();
        let mut clock = Instant::now();
        // Teacher: forward only, BN in training mode, nothing recorded.
        let tfwd = {
            let _r = nvtx::Range::new("teacher forward");
            let mut ttape = self.tape(false);
            let tleaves = self
                .state()?
                .leaves(&self.teacher.params, true, &mut ttape)?;
            self.teacher.forward(&mut ttape, &tleaves, &x, true)?
        };
        phases.teacher_forward_ms = phase_ms(&device, &mut clock)?;

        // Student: forward on the tape.
        let mut tape = self.tape(true);
        let (leaves, sfwd) = {
            let _r = nvtx::Range::new("student forward");
            let leaves = self
                .state()?
                .leaves(&self.student.params, false, &mut tape)?;
            let sfwd = match locals {
                None => self.student.forward(&mut tape, &leaves, &x, true)?,
                Some(xl) => self.student_forward_multi(&mut tape, &leaves, &x, xl)?,
            };
            (leaves, sfwd)
        };
        phases.student_forward_ms = phase_ms(&device, &mut clock)?;

        // The loss on the logits' device; on a GPU nothing waits for it.
        let loss = {
            let _r = nvtx::Range::new("loss");
            let (s, t, comm) = (&sfwd.logits, &tfwd.logits, self.collective.as_ref());
            let scaled = !self.unsynced.entropy_scale;
            carp_loss_forward_scaled(s, t, vs, self.nb, &partition, comm, scaled)
                .map_err(|e| Error::NonFinite(format!("step {}: {e}", self.step)))?
        };
        phases.loss_ms = phase_ms(&device, &mut clock)?;

        // The rest on the training state, queued on a GPU without a wait in the middle:
        // backward from the analytic gradient of the student logits, the gradients gathered into
        // the state's flat gradient, the NaN guard (LARS pass 1 with non-finite counts) and its
        // verdict (`step_ok`, with the loss terms), then the EMA, BN statistics and LARS pass 2
        // gated by the verdict, then the verdict read (on a GPU the step's one download). A
        // non-finite step is an error naming the step and the entry, and changed no state value
        // (the gated updates did nothing). `--nan-guard sync` reads the verdict before the
        // (ungated) updates.
        let sync = step_sync_forced();
        let ts = self
            .state
            .as_mut()
            .ok_or_else(|| Error::Msg("a training step without a training state (a bug)".into()))?;
        {
            let _r = nvtx::Range::new("backward");
            let grads = tape.backward_from(vec![(sfwd.logits.clone(), loss.dstudent)])?;
            let comm = self.collective.as_ref();
            ts.gather_grads(&mut self.student.params, &leaves, &grads, comm)?;
            drop(leaves);
            // The NaN guard, fused with LARS pass 1 (its norms are kept for pass 2), and the
            // verdict the updates below read.
            ts.queue_check(
                &self.student.params,
                self.lars.cfg.weight_decay,
                &loss.terms,
            )?;
        }
        let mut terms = None;
        if sync {
            terms = Some(ts.verdict(&self.student.params, step)?);
        }
        phases.backward_ms = phase_ms(&device, &mut clock)?;

        // The EMA, then BN statistics and LARS, each doing nothing unless the verdict is ok.
        // The EMA comes first, from the student as it was when the loss was computed (SPEC.md,
        // "Networks"; main_carp.py's EMA block precedes `backward` and `step`): from teacher =
        // student, after one step the teacher is the initial student.
        let gated = !sync;
        {
            let _r = nvtx::Range::new("ema");
            ts.ema(&mut self.teacher.params, &self.student.params, m, gated)?;
        }
        phases.ema_ms = phase_ms(&device, &mut clock)?;
        {
            let _r = nvtx::Range::new("optimizer");
            ts.apply_bn_updates(
                true,
                &mut self.teacher.buffers,
                tfwd.bn_updates,
                BN_MOMENTUM,
                gated,
            )?;
            ts.apply_bn_updates(
                false,
                &mut self.student.buffers,
                sfwd.bn_updates,
                BN_MOMENTUM,
                gated,
            )?;
            ts.lars(&mut self.lars, &mut self.student.params, lr, gated)?;
        }
        phases.optimizer_ms = phase_ms(&device, &mut clock)?;
        // Not `?`: the updates are queued (and run when the verdict is ok), so an error from
        // here on must not return before the step is counted; it only loses the step's time.
        let end = ts.timing_event();
        // The step's one wait: the verdict and the loss terms (--nan-guard sync read them
        // above).
        let (loss, consistency, entropy) = match terms {
            Some(t) => t,
            // On an error the gated updates did nothing: the state is as before the step.
            None => ts.verdict(&self.student.params, step)?,
        };
        phases.step_ms = end
            .and_then(|end| start.elapsed_ms_to(&end))
            .unwrap_or(f64::NAN);
        self.step += 1;
        self.partition_rng = partition_rng;
        Ok(StepStats {
            loss,
            consistency,
            entropy,
            lr,
            momentum: m,
            phases,
        })
    }

    /// The student forward with local views: the backbone on the globals `x` (2N, 3, S, S), then
    /// on the locals `xl` (L N, 3, s, s), then the head once on the concatenated ((2 + L) N, D)
    /// features, as DINO's multi-crop wrapper (same-resolution crops share a backbone batch;
    /// every BN in the backbone updates its running statistics once per batch, the head's once).
    fn student_forward_multi(
        &self,
        tape: &mut Tape,
        leaves: &ParamLeaves,
        x: &Tensor,
        xl: &Tensor,
    ) -> Result<Forward> {
        let net = &self.student;
        let mut bn_updates = Vec::new();
        let fg = net
            .backbone
            .forward(tape, leaves, &net.buffers, x, true, &mut bn_updates)?; // (2N, D)
        let fl = net
            .backbone
            .forward(tape, leaves, &net.buffers, xl, true, &mut bn_updates)?; // (L N, D)
        let features = tape.concat_rows(&fg, &fl)?; // ((2 + L) N, D)
        let (embedding, logits) =
            net.head
                .forward(tape, leaves, &net.buffers, &features, true, &mut bn_updates)?;
        Ok(Forward {
            features,
            embedding,
            logits,
            bn_updates,
        })
    }
}
