//! ResNet in torchvision's layout (bottleneck blocks, stride on the 3x3 conv, 1x1 projection
//! shortcut with BN, zero-initialized last BN gamma per block), ending in the global average
//! pool. Parameter and buffer names are torchvision's state_dict names, so weights can be
//! exchanged with `torchvision.models.resnet50()`.

use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::autograd::Tape;
use crate::bail;
use crate::error::Result;
use crate::nn::params::{ParamId, ParamLeaves, ParamStore};
use crate::ops::batchnorm::BN_EPS;
use crate::tensor::Tensor;

/// The stem: ImageNet's 7x7/2 conv + 3x3/2 max pool, or a CIFAR-style 3x3/1 conv without pool
/// for 32x32 inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    Imagenet,
    Cifar,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResNetConfig {
    /// Bottleneck blocks per stage ([3, 4, 6, 3] for ResNet50).
    pub layers: Vec<usize>,
    /// Width of the first stage's 3x3 conv (64 for ResNet50); stage i uses width * 2^i.
    pub base_width: usize,
    pub stem: Stem,
}

/// Bottleneck expansion: a stage's output has 4x its inner width.
pub const EXPANSION: usize = 4;

impl ResNetConfig {
    pub fn resnet50() -> Self {
        ResNetConfig {
            layers: vec![3, 4, 6, 3],
            base_width: 64,
            stem: Stem::Imagenet,
        }
    }
    /// A small variant that trains on 32x32 images on a CPU in minutes.
    pub fn tiny() -> Self {
        ResNetConfig {
            layers: vec![1, 1, 1, 1],
            base_width: 8,
            stem: Stem::Cifar,
        }
    }
    /// Dimension of the pooled features (2048 for ResNet50).
    pub fn feature_dim(&self) -> usize {
        self.base_width * (1 << (self.layers.len() - 1)) * EXPANSION
    }
    pub fn validate(&self) -> Result<()> {
        if self.layers.is_empty() || self.layers.contains(&0) {
            bail!(
                Config,
                "resnet layers must be non-empty and positive, got {:?}",
                self.layers
            );
        }
        if self.base_width == 0 {
            bail!(Config, "resnet base width must be positive");
        }
        Ok(())
    }
}

/// One BN layer's parameter and buffer ids.
#[derive(Clone, Debug)]
pub struct BnIds {
    pub gamma: ParamId,
    pub beta: ParamId,
    pub running_mean: ParamId,
    pub running_var: ParamId,
}

#[derive(Clone, Debug)]
struct Bottleneck {
    conv1: ParamId,
    bn1: BnIds,
    conv2: ParamId,
    bn2: BnIds,
    conv3: ParamId,
    bn3: BnIds,
    stride: usize,
    downsample: Option<(ParamId, BnIds)>,
}

/// The backbone's layer table (ids into the owning network's stores).
#[derive(Clone, Debug)]
pub struct ResNet {
    pub cfg: ResNetConfig,
    conv1: ParamId,
    bn1: BnIds,
    blocks: Vec<Bottleneck>,
}

/// A running-statistics update produced by a training-mode BN forward, applied after the pass.
pub struct BnUpdate {
    pub ids: BnIds,
    pub batch_mean: Tensor,
    pub batch_var: Tensor,
}

/// Registers a BN layer `name` (gamma `name.weight`, beta `name.bias`, buffers
/// `name.running_mean`, `name.running_var`).
pub fn add_bn(
    params: &mut ParamStore,
    buffers: &mut ParamStore,
    name: &str,
    c: usize,
    gamma: f32,
) -> Result<BnIds> {
    Ok(BnIds {
        gamma: params.add(&format!("{name}.weight"), &[c], vec![gamma; c])?,
        beta: params.add(&format!("{name}.bias"), &[c], vec![0.0; c])?,
        running_mean: buffers.add(&format!("{name}.running_mean"), &[c], vec![0.0; c])?,
        running_var: buffers.add(&format!("{name}.running_var"), &[c], vec![1.0; c])?,
    })
}

/// Kaiming-normal, fan_out mode, ReLU gain (torchvision's ResNet conv init):
/// std = sqrt(2 / (out_channels * kh * kw)).
fn kaiming_conv(
    params: &mut ParamStore,
    name: &str,
    o: usize,
    c: usize,
    k: usize,
    rng: &mut impl Rng,
) -> Result<ParamId> {
    let std = (2.0 / (o * k * k) as f64).sqrt() as f32;
    let normal = Normal::new(0.0f32, std).map_err(|e| crate::Error::Msg(e.to_string()))?;
    let values = (0..o * c * k * k).map(|_| normal.sample(rng)).collect();
    params.add(name, &[o, c, k, k], values)
}

/// BN in the requested mode; in training mode the running-statistics update is queued.
pub fn bn_forward(
    tape: &mut Tape,
    leaves: &ParamLeaves,
    buffers: &ParamStore,
    ids: &BnIds,
    x: &Tensor,
    train: bool,
    updates: &mut Vec<BnUpdate>,
) -> Result<Tensor> {
    if train {
        let (y, mean, var) =
            tape.batch_norm_train(x, &leaves[ids.gamma], &leaves[ids.beta], BN_EPS)?;
        updates.push(BnUpdate {
            ids: ids.clone(),
            batch_mean: mean,
            batch_var: var,
        });
        Ok(y)
    } else {
        tape.batch_norm_eval(
            x,
            &leaves[ids.gamma],
            &leaves[ids.beta],
            &buffers.tensor_on(ids.running_mean, &x.device())?,
            &buffers.tensor_on(ids.running_var, &x.device())?,
            BN_EPS,
        )
    }
}

impl ResNet {
    /// Registers all backbone parameters (torchvision names, no prefix) in `params` and the BN
    /// running statistics in `buffers`, initialized as torchvision does.
    pub fn new(
        cfg: &ResNetConfig,
        params: &mut ParamStore,
        buffers: &mut ParamStore,
        rng: &mut impl Rng,
    ) -> Result<ResNet> {
        cfg.validate()?;
        let w0 = cfg.base_width;
        let conv1 = match cfg.stem {
            Stem::Imagenet => kaiming_conv(params, "conv1.weight", w0, 3, 7, rng)?,
            Stem::Cifar => kaiming_conv(params, "conv1.weight", w0, 3, 3, rng)?,
        };
        let bn1 = add_bn(params, buffers, "bn1", w0, 1.0)?;
        let mut blocks = Vec::new();
        let mut inplanes = w0;
        for (stage, &nblocks) in cfg.layers.iter().enumerate() {
            let width = w0 << stage;
            let out = width * EXPANSION;
            for b in 0..nblocks {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let p = format!("layer{}.{}", stage + 1, b);
                let conv1 = kaiming_conv(
                    params,
                    &format!("{p}.conv1.weight"),
                    width,
                    inplanes,
                    1,
                    rng,
                )?;
                let bn1 = add_bn(params, buffers, &format!("{p}.bn1"), width, 1.0)?;
                let conv2 =
                    kaiming_conv(params, &format!("{p}.conv2.weight"), width, width, 3, rng)?;
                let bn2 = add_bn(params, buffers, &format!("{p}.bn2"), width, 1.0)?;
                let conv3 = kaiming_conv(params, &format!("{p}.conv3.weight"), out, width, 1, rng)?;
                // Zero-init residual: each block starts as the identity on its shortcut.
                let bn3 = add_bn(params, buffers, &format!("{p}.bn3"), out, 0.0)?;
                let downsample = if stride != 1 || inplanes != out {
                    let w = kaiming_conv(
                        params,
                        &format!("{p}.downsample.0.weight"),
                        out,
                        inplanes,
                        1,
                        rng,
                    )?;
                    let bn = add_bn(params, buffers, &format!("{p}.downsample.1"), out, 1.0)?;
                    Some((w, bn))
                } else {
                    None
                };
                blocks.push(Bottleneck {
                    conv1,
                    bn1,
                    conv2,
                    bn2,
                    conv3,
                    bn3,
                    stride,
                    downsample,
                });
                inplanes = out;
            }
        }
        Ok(ResNet {
            cfg: cfg.clone(),
            conv1,
            bn1,
            blocks,
        })
    }

    /// x: (N, 3, H, W) normalized images -> (N, feature_dim) pooled features.
    pub fn forward(
        &self,
        tape: &mut Tape,
        leaves: &ParamLeaves,
        buffers: &ParamStore,
        x: &Tensor,
        train: bool,
        updates: &mut Vec<BnUpdate>,
    ) -> Result<Tensor> {
        x.expect_rank("resnet input (N, 3, H, W)", 4)?;
        if x.dim(1) != 3 {
            bail!(
                Shape,
                "resnet input must have 3 channels, got shape {:?}",
                x.shape()
            );
        }
        let mut h = match self.cfg.stem {
            Stem::Imagenet => tape.conv2d(x, &leaves[self.conv1], 2, 3)?, // (N, 64, H/2, W/2)
            Stem::Cifar => tape.conv2d(x, &leaves[self.conv1], 1, 1)?,    // (N, w0, H, W)
        };
        h = bn_forward(tape, leaves, buffers, &self.bn1, &h, train, updates)?;
        h = tape.relu(&h)?;
        if self.cfg.stem == Stem::Imagenet {
            h = tape.max_pool2d(&h, 3, 2, 1)?; // (N, 64, H/4, W/4)
        }
        for (i, blk) in self.blocks.iter().enumerate() {
            // One NVTX range per bottleneck (a no-op without the profiler).
            let _range = crate::device::nvtx::Range::new(&format!("block {i}"));
            h = self.bottleneck(tape, leaves, buffers, blk, &h, train, updates)?;
        }
        tape.global_avg_pool(&h) // (N, feature_dim)
    }

    #[allow(clippy::too_many_arguments)]
    fn bottleneck(
        &self,
        tape: &mut Tape,
        leaves: &ParamLeaves,
        buffers: &ParamStore,
        blk: &Bottleneck,
        x: &Tensor,
        train: bool,
        updates: &mut Vec<BnUpdate>,
    ) -> Result<Tensor> {
        let mut h = tape.conv2d(x, &leaves[blk.conv1], 1, 0)?; // (N, width, H, W)
        h = bn_forward(tape, leaves, buffers, &blk.bn1, &h, train, updates)?;
        h = tape.relu(&h)?;
        h = tape.conv2d(&h, &leaves[blk.conv2], blk.stride, 1)?; // (N, width, H/s, W/s)
        h = bn_forward(tape, leaves, buffers, &blk.bn2, &h, train, updates)?;
        h = tape.relu(&h)?;
        h = tape.conv2d(&h, &leaves[blk.conv3], 1, 0)?; // (N, 4*width, H/s, W/s)
        h = bn_forward(tape, leaves, buffers, &blk.bn3, &h, train, updates)?;
        let shortcut = match &blk.downsample {
            Some((w, bn)) => {
                let s = tape.conv2d(x, &leaves[*w], blk.stride, 0)?;
                bn_forward(tape, leaves, buffers, bn, &s, train, updates)?
            }
            None => x.clone(),
        };
        let h = tape.add(&h, &shortcut)?;
        tape.relu(&h)
    }
}
