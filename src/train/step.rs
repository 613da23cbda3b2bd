//! One CARP training step, top to bottom: teacher forward on both views (no tape), student
//! forward on both views, the partitioned loss and its analytic gradient, backward, LARS, EMA.
//! Nothing in the state changes unless the whole step is finite.

use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::autograd::Tape;
use crate::bail;
use crate::carp::loss::{carp_loss, random_partition};
use crate::carp::teacher::ema_update;
use crate::error::{Error, Result};
use crate::nn::{ModelConfig, Network};
use crate::optim::lars::{Lars, LarsConfig};
use crate::tensor::Tensor;

/// LARS as SPEC.md fixes it: momentum 0.9, trust coefficient 0.001.
pub fn lars_config(weight_decay: f32) -> LarsConfig {
    LarsConfig {
        momentum: 0.9,
        trust_coef: 0.001,
        weight_decay,
    }
}

/// Everything that evolves during training (and goes into a checkpoint).
#[derive(Clone)]
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
        if nb == 0 || k % nb != 0 {
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
        })
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
        view1.expect_rank("view 1 (N, 3, S, S)", 4)?;
        view2.expect_shape("view 2", view1.shape())?;
        let n = view1.dim(0);
        let k = self.student.cfg.head.prototypes;
        // Both views go through each network as one batch of 2N: BN statistics are taken over
        // both views, as the reference (DINO's multi-crop wrapper) does.
        let mut both = view1.to_vec()?; // (2N, 3, S, S)
        both.extend_from_slice(&view2.to_vec()?);
        let mut shape = view1.shape().to_vec();
        shape[0] = 2 * n;
        let x = Tensor::from_vec(both, &shape)?;

        let mut phases = PhaseTimes::default();
        let mut clock = Instant::now();
        // Teacher: forward only, BN in training mode, nothing recorded.
        let mut ttape = Tape::no_grad();
        let tleaves = self.teacher.params.leaves(&mut ttape)?;
        let tfwd = self.teacher.forward(&mut ttape, &tleaves, &x, true)?;
        let t_logits = tfwd.logits.to_vec()?; // (2N, K)
        phases.teacher_forward_ms = ms_since(&mut clock);

        // Student: forward on the tape.
        let mut tape = Tape::new();
        let leaves = self.student.params.leaves(&mut tape)?;
        let sfwd = self.student.forward(&mut tape, &leaves, &x, true)?;
        let s_logits = sfwd.logits.to_vec()?; // (2N, K)
        phases.student_forward_ms = ms_since(&mut clock);

        let perm = random_partition(k, &mut self.partition_rng);
        let nk = n * k;
        let out = carp_loss(
            &[&s_logits[..nk], &s_logits[nk..]],
            &[&t_logits[..nk], &t_logits[nk..]],
            n,
            k,
            self.nb,
            &perm,
        )
        .map_err(|e| Error::NonFinite(format!("step {}: {e}", self.step)))?;
        if !out.loss.is_finite() {
            bail!(
                NonFinite,
                "step {}: the loss is {} (consistency {}, entropy {}); stopping before any weight changes",
                self.step,
                out.loss,
                out.consistency,
                out.entropy
            );
        }

        phases.loss_ms = ms_since(&mut clock);

        // Backward from the analytic gradient of the student logits.
        let mut dlogits = Vec::with_capacity(2 * nk); // (2N, K)
        for d in &out.dstudent {
            dlogits.extend_from_slice(d);
        }
        let dlogits = Tensor::from_vec(dlogits, &[2 * n, k])?;
        let grads = tape.backward_from(vec![(sfwd.logits.clone(), dlogits)])?;
        self.student.params.zero_grad();
        self.student.params.accumulate_grads(&leaves, &grads)?;
        if let Some(bad) = self.student.params.grad.iter().position(|g| !g.is_finite()) {
            let name = self
                .student
                .params
                .entries
                .iter()
                .find(|e| e.range().contains(&bad))
                .map(|e| e.name.clone())
                .unwrap_or_default();
            bail!(
                NonFinite,
                "step {}: non-finite gradient in {name}; stopping before any weight changes",
                self.step
            );
        }

        phases.backward_ms = ms_since(&mut clock);

        // The step is good: commit BN statistics, LARS, then the EMA.
        self.teacher.apply_bn_updates(tfwd.bn_updates)?;
        self.student.apply_bn_updates(sfwd.bn_updates)?;
        self.lars.step(&mut self.student.params, lr)?;
        phases.optimizer_ms = ms_since(&mut clock);
        ema_update(&mut self.teacher.params.data, &self.student.params.data, m)?;
        phases.ema_ms = ms_since(&mut clock);
        self.step += 1;
        Ok(StepStats {
            loss: out.loss,
            consistency: out.consistency,
            entropy: out.entropy,
            lr,
            momentum: m,
            phases,
        })
    }
}
