//! The projection head (Linear+BN+GELU, Linear+BN+GELU, Linear) and the assigner: K
//! weight-normalized prototypes without bias (gain frozen at 1). Names: `head.fc{1,2,3}`,
//! `head.bn{1,2}`, `prototypes.weight`.

use rand::Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::autograd::Tape;
use crate::error::Result;
use crate::nn::params::{ParamId, ParamLeaves, ParamStore};
use crate::nn::resnet::{add_bn, bn_forward, BnIds, BnUpdate};
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadConfig {
    /// Hidden width of the two BN/GELU layers (2048 in the paper).
    pub hidden: usize,
    /// Embedding size d (256 in the paper).
    pub out: usize,
    /// Number of prototypes K (65536 in the paper).
    pub prototypes: usize,
}

#[derive(Clone, Debug)]
pub struct Head {
    pub cfg: HeadConfig,
    fc1: (ParamId, ParamId),
    bn1: BnIds,
    fc2: (ParamId, ParamId),
    bn2: BnIds,
    fc3: (ParamId, ParamId),
    prototypes: ParamId,
}

/// Truncated normal, std 0.02, truncated to [-2, 2] as timm's `trunc_normal_` defaults do
/// (with std 0.02 the bound is never hit in practice, so this is a plain normal).
fn trunc_normal(n: usize, std: f32, rng: &mut impl Rng) -> Vec<f32> {
    let normal = Normal::new(0.0f32, std).expect("std is positive");
    (0..n)
        .map(|_| loop {
            let v = normal.sample(rng);
            if (-2.0..=2.0).contains(&v) {
                break v;
            }
        })
        .collect()
}

fn add_linear(
    params: &mut ParamStore,
    name: &str,
    out: usize,
    inp: usize,
    rng: &mut impl Rng,
) -> Result<(ParamId, ParamId)> {
    Ok((
        params.add(
            &format!("{name}.weight"),
            &[out, inp],
            trunc_normal(out * inp, 0.02, rng),
        )?,
        params.add(&format!("{name}.bias"), &[out], vec![0.0; out])?,
    ))
}

impl Head {
    pub fn new(
        cfg: &HeadConfig,
        in_dim: usize,
        params: &mut ParamStore,
        buffers: &mut ParamStore,
        rng: &mut impl Rng,
    ) -> Result<Head> {
        let h = cfg.hidden;
        let fc1 = add_linear(params, "head.fc1", h, in_dim, rng)?;
        let bn1 = add_bn(params, buffers, "head.bn1", h, 1.0)?;
        let fc2 = add_linear(params, "head.fc2", h, h, rng)?;
        let bn2 = add_bn(params, buffers, "head.bn2", h, 1.0)?;
        let fc3 = add_linear(params, "head.fc3", cfg.out, h, rng)?;
        // nn.Linear's default init (the reference's weight-normed last layer is not re-initialized):
        // U(-1/sqrt(d), 1/sqrt(d)). Only the directions matter after normalization.
        let bound = 1.0 / (cfg.out as f32).sqrt();
        let u = Uniform::new_inclusive(-bound, bound);
        let protos: Vec<f32> = (0..cfg.prototypes * cfg.out)
            .map(|_| u.sample(rng))
            .collect();
        let prototypes = params.add("prototypes.weight", &[cfg.prototypes, cfg.out], protos)?;
        Ok(Head {
            cfg: cfg.clone(),
            fc1,
            bn1,
            fc2,
            bn2,
            fc3,
            prototypes,
        })
    }

    /// features (N, in_dim) -> (embedding (N, out), logits (N, K)).
    pub fn forward(
        &self,
        tape: &mut Tape,
        leaves: &ParamLeaves,
        buffers: &ParamStore,
        features: &Tensor,
        train: bool,
        updates: &mut Vec<BnUpdate>,
    ) -> Result<(Tensor, Tensor)> {
        let mut h = tape.linear(features, &leaves[self.fc1.0], Some(&leaves[self.fc1.1]))?; // (N, hidden)
        h = bn_forward(tape, leaves, buffers, &self.bn1, &h, train, updates)?;
        h = tape.gelu(&h)?;
        h = tape.linear(&h, &leaves[self.fc2.0], Some(&leaves[self.fc2.1]))?; // (N, hidden)
        h = bn_forward(tape, leaves, buffers, &self.bn2, &h, train, updates)?;
        h = tape.gelu(&h)?;
        let e = tape.linear(&h, &leaves[self.fc3.0], Some(&leaves[self.fc3.1]))?; // (N, out)
                                                                                  // The embedding is not normalized; only the prototypes are (weight norm, gain 1).
        let logits = tape.wn_linear(&e, &leaves[self.prototypes])?; // (N, K)
        Ok((e, logits))
    }
}
