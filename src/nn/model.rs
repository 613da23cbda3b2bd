//! One CARP network (student or teacher): backbone + head + prototypes, its flat parameter
//! store and its BN running-statistics store.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::autograd::{Precision, Tape};
use crate::bail;
use crate::error::Result;
use crate::nn::head::{Head, HeadConfig};
use crate::nn::params::{ParamLeaves, ParamStore};
use crate::nn::resnet::{BnUpdate, ResNet, ResNetConfig, Stem};
use crate::ops::batchnorm::bn_running_update;
use crate::tensor::{Device, Tensor};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// Variant name (`resnet50`, `resnet18`, `resnet18-cifar`, `tiny`).
    pub arch: String,
    pub backbone: ResNetConfig,
    pub head: HeadConfig,
}

impl ModelConfig {
    pub fn resnet50() -> Self {
        ModelConfig {
            arch: "resnet50".into(),
            backbone: ResNetConfig::resnet50(),
            head: HeadConfig {
                hidden: 2048,
                out: 256,
                prototypes: 65536,
            },
        }
    }
    pub fn tiny() -> Self {
        ModelConfig {
            arch: "tiny".into(),
            backbone: ResNetConfig::tiny(),
            head: HeadConfig {
                hidden: 512,
                out: 128,
                prototypes: 1024,
            },
        }
    }
    /// torchvision's ResNet18 (basic blocks, 512 features) with the ImageNet stem, and the
    /// paper's head (hidden 2048, d 256) with K = 16384 prototypes.
    pub fn resnet18() -> Self {
        ModelConfig {
            arch: "resnet18".into(),
            backbone: ResNetConfig::resnet18(Stem::Imagenet),
            head: HeadConfig {
                hidden: 2048,
                out: 256,
                prototypes: 16384,
            },
        }
    }
    /// ResNet18 with the CIFAR stem (3x3/1 conv, no max pool) for 32x32 images; the same
    /// parameter names as torchvision's, only conv1.weight is (64, 3, 3, 3).
    pub fn resnet18_cifar() -> Self {
        ModelConfig {
            arch: "resnet18-cifar".into(),
            backbone: ResNetConfig::resnet18(Stem::Cifar),
            ..Self::resnet18()
        }
    }
    /// The named variant, with the head's default sizes.
    pub fn named(arch: &str) -> Result<Self> {
        match arch {
            "resnet50" => Ok(Self::resnet50()),
            "resnet18" => Ok(Self::resnet18()),
            "resnet18-cifar" => Ok(Self::resnet18_cifar()),
            "tiny" => Ok(Self::tiny()),
            other => bail!(
                Config,
                "unknown arch {other:?}: use resnet50, resnet18, resnet18-cifar or tiny"
            ),
        }
    }
    /// The view side the architecture is made for: 32 with the CIFAR stem, 224 with
    /// ImageNet's.
    pub fn default_image_size(&self) -> usize {
        match self.backbone.stem {
            Stem::Cifar => 32,
            Stem::Imagenet => 224,
        }
    }
}

/// What one forward pass returns.
pub struct Forward {
    /// (N, feature_dim) pooled backbone features.
    pub features: Tensor,
    /// (N, d) embedding.
    pub embedding: Tensor,
    /// (N, K) logits against the normalized prototypes.
    pub logits: Tensor,
    /// Queued BN running-statistics updates (training mode).
    pub bn_updates: Vec<BnUpdate>,
}

#[derive(Clone)]
pub struct Network {
    pub cfg: ModelConfig,
    pub params: ParamStore,
    pub buffers: ParamStore,
    pub backbone: ResNet,
    pub head: Head,
}

impl Network {
    /// A freshly initialized network; the same seed gives the same weights.
    pub fn new(cfg: &ModelConfig, seed: u64) -> Result<Network> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = ParamStore::new();
        let mut buffers = ParamStore::new();
        let backbone = ResNet::new(&cfg.backbone, &mut params, &mut buffers, &mut rng)?;
        let head = Head::new(
            &cfg.head,
            cfg.backbone.feature_dim(),
            &mut params,
            &mut buffers,
            &mut rng,
        )?;
        Ok(Network {
            cfg: cfg.clone(),
            params,
            buffers,
            backbone,
            head,
        })
    }

    /// Trainable scalars of the backbone (torchvision names), the head, and the prototypes.
    pub fn param_counts(&self) -> (usize, usize, usize) {
        let head = self.params.numel_with_prefix("head.");
        let protos = self.params.numel_with_prefix("prototypes.");
        (self.params.numel() - head - protos, head, protos)
    }

    /// The full forward. `leaves` come from `self.params.leaves(tape)`.
    pub fn forward(
        &self,
        tape: &mut Tape,
        leaves: &ParamLeaves,
        x: &Tensor,
        train: bool,
    ) -> Result<Forward> {
        let mut bn_updates = Vec::new();
        let features =
            self.backbone
                .forward(tape, leaves, &self.buffers, x, train, &mut bn_updates)?;
        let (embedding, logits) = self.head.forward(
            tape,
            leaves,
            &self.buffers,
            &features,
            train,
            &mut bn_updates,
        )?;
        Ok(Forward {
            features,
            embedding,
            logits,
            bn_updates,
        })
    }

    /// Backbone features only (evaluation), BN in eval mode, nothing recorded; runs on `x`'s
    /// device.
    pub fn features_eval(&self, x: &Tensor) -> Result<Tensor> {
        self.features_eval_in(x, Precision::F32)
    }

    /// [`Network::features_eval`] in `precision` (bf16: the frozen forward of a linear
    /// evaluation, bf16 activations with f32 accumulation, as training's forward).
    pub fn features_eval_in(&self, x: &Tensor, precision: Precision) -> Result<Tensor> {
        let mut tape = Tape::no_grad().with_precision(precision);
        let leaves = self.params.leaves_on(&mut tape, &x.device())?;
        let mut updates = Vec::new();
        self.backbone
            .forward(&mut tape, &leaves, &self.buffers, x, false, &mut updates)
    }
}

/// Applies queued running-statistics updates to a BN buffers store (its running means and
/// variances; PyTorch's momentum 0.1 is `BN_MOMENTUM`), on the host: the batch statistics are
/// brought there first.
pub fn apply_bn_updates(
    buffers: &mut ParamStore,
    updates: Vec<BnUpdate>,
    momentum: f32,
) -> Result<()> {
    for u in updates {
        let rm = buffers.tensor(u.ids.running_mean)?;
        let rv = buffers.tensor(u.ids.running_var)?;
        let (bm, bv) = (
            u.batch_mean.to_device(&Device::Cpu)?,
            u.batch_var.to_device(&Device::Cpu)?,
        );
        let (rm, rv) = bn_running_update(&rm, &rv, &bm, &bv, momentum)?;
        buffers.set(u.ids.running_mean, &rm)?;
        buffers.set(u.ids.running_var, &rv)?;
    }
    Ok(())
}
