//! ResNet in torchvision's layout (bottleneck blocks with the stride on the 3x3 conv, or basic
//! blocks of two 3x3 convs; 1x1 projection shortcut with BN, zero-initialized last BN gamma per
//! block), ending in the global average pool. Parameter and buffer names are torchvision's
//! state_dict names, so weights can be exchanged with `torchvision.models.resnet50()` and
//! `resnet18()`.

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

/// The residual block type: torchvision's `Bottleneck` (1x1, 3x3, 1x1; ResNet50) or
/// `BasicBlock` (3x3, 3x3; ResNet18/34).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Configurations written before basic blocks existed have no `block` field: bottleneck.
    #[default]
    Bottleneck,
    Basic,
}

impl BlockKind {
    /// How much wider a stage's output is than its inner width (torchvision's `expansion`).
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Bottleneck => EXPANSION,
            BlockKind::Basic => 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResNetConfig {
    /// Blocks per stage ([3, 4, 6, 3] for ResNet50, [2, 2, 2, 2] for ResNet18).
    pub layers: Vec<usize>,
    /// Width of the first stage's 3x3 conv (64 for ResNet50); stage i uses width * 2^i.
    pub base_width: usize,
    pub stem: Stem,
    #[serde(default)]
    pub block: BlockKind,
}

/// Bottleneck expansion: a stage's output has 4x its inner width.
pub const EXPANSION: usize = 4;

impl ResNetConfig {
    pub fn resnet50() -> Self {
        ResNetConfig {
            layers: vec![3, 4, 6, 3],
            base_width: 64,
            stem: Stem::Imagenet,
            block: BlockKind::Bottleneck,
        }
    }
    /// torchvision's `resnet18()`: basic blocks [2, 2, 2, 2], width 64, 512 features; with
    /// `Stem::Cifar` the 3x3/1 stem without max pool that CIFAR-scale SSL work uses.
    pub fn resnet18(stem: Stem) -> Self {
        ResNetConfig {
            layers: vec![2, 2, 2, 2],
            base_width: 64,
            stem,
            block: BlockKind::Basic,
        }
    }
    /// A small variant that trains on 32x32 images on a CPU in minutes.
    pub fn tiny() -> Self {
        ResNetConfig {
            layers: vec![1, 1, 1, 1],
            base_width: 8,
            stem: Stem::Cifar,
            block: BlockKind::Bottleneck,
        }
    }
    /// Dimension of the pooled features (2048 for ResNet50, 512 for ResNet18).
    pub fn feature_dim(&self) -> usize {
        self.base_width * (1 << (self.layers.len() - 1)) * self.block.expansion()
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

/// torchvision's `Bottleneck`: conv1 (1x1), conv2 (3x3, the stride), conv3 (1x1, 4x wider).
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

/// torchvision's `BasicBlock`: conv1 (3x3, the stride), conv2 (3x3), same width out.
#[derive(Clone, Debug)]
struct BasicBlock {
    conv1: ParamId,
    bn1: BnIds,
    conv2: ParamId,
    bn2: BnIds,
    stride: usize,
    downsample: Option<(ParamId, BnIds)>,
}

#[derive(Clone, Debug)]
enum BlockParams {
    Bottleneck(Bottleneck),
    Basic(BasicBlock),
}

/// One residual block and its torchvision module name (`layer3.2`), which also names its NVTX
/// range.
#[derive(Clone, Debug)]
struct Block {
    name: String,
    params: BlockParams,
}

/// The backbone's layer table (ids into the owning network's stores).
#[derive(Clone, Debug)]
pub struct ResNet {
    pub cfg: ResNetConfig,
    conv1: ParamId,
    bn1: BnIds,
    blocks: Vec<Block>,
    /// BN + ReLU (+ residual add) as single fused tape ops (run option `fused_bn`); the unfused
    /// composition computes the same values (kept for A/B runs and as a fallback).
    fused_bn: bool,
    /// What training with the fused ops recomputes in backward instead of keeping
    /// ([`Recompute`], run option `recompute`); the same values either way.
    recompute: Recompute,
}

pub use crate::options::Recompute;

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

/// The 1x1 projection shortcut `{p}.downsample.0` + BN `{p}.downsample.1`, where the block
/// changes the resolution or the width (torchvision's rule); `None` for the identity.
fn add_downsample(
    params: &mut ParamStore,
    buffers: &mut ParamStore,
    p: &str,
    inplanes: usize,
    out: usize,
    stride: usize,
    rng: &mut impl Rng,
) -> Result<Option<(ParamId, BnIds)>> {
    if stride == 1 && inplanes == out {
        return Ok(None);
    }
    let w = kaiming_conv(
        params,
        &format!("{p}.downsample.0.weight"),
        out,
        inplanes,
        1,
        rng,
    )?;
    let bn = add_bn(params, buffers, &format!("{p}.downsample.1"), out, 1.0)?;
    Ok(Some((w, bn)))
}

/// relu(BN(x) [+ residual]) as one fused op in the requested mode; in training mode the
/// running-statistics update is queued (the same contract as [`bn_forward`]).
#[allow(clippy::too_many_arguments)]
pub fn bn_relu_forward(
    tape: &mut Tape,
    leaves: &ParamLeaves,
    buffers: &ParamStore,
    ids: &BnIds,
    x: &Tensor,
    residual: Option<&Tensor>,
    train: bool,
    updates: &mut Vec<BnUpdate>,
) -> Result<Tensor> {
    let (gamma, beta) = (&leaves[ids.gamma], &leaves[ids.beta]);
    if train {
        let (y, mean, var) = match residual {
            Some(r) => tape.bn_add_relu_train(x, gamma, beta, r, BN_EPS)?,
            None => tape.bn_relu_train(x, gamma, beta, BN_EPS)?,
        };
        updates.push(BnUpdate {
            ids: ids.clone(),
            batch_mean: mean,
            batch_var: var,
        });
        Ok(y)
    } else {
        let rm = buffers.tensor_on(ids.running_mean, &x.device())?;
        let rv = buffers.tensor_on(ids.running_var, &x.device())?;
        match residual {
            Some(r) => tape.bn_add_relu_eval(x, gamma, beta, r, &rm, &rv, BN_EPS),
            None => tape.bn_relu_eval(x, gamma, beta, &rm, &rv, BN_EPS),
        }
    }
}

/// conv(relu(BN(x)), w) in training mode with the BN output recomputed in backward
/// ([`Tape::bn_relu_conv2d_train`]); the running-statistics update is queued as
/// [`bn_relu_forward`] queues it.
#[allow(clippy::too_many_arguments)]
fn bn_relu_conv_train(
    tape: &mut Tape,
    leaves: &ParamLeaves,
    ids: &BnIds,
    x: &Tensor,
    w: ParamId,
    stride: usize,
    padding: usize,
    updates: &mut Vec<BnUpdate>,
) -> Result<Tensor> {
    let (gamma, beta) = (&leaves[ids.gamma], &leaves[ids.beta]);
    let (z, (mean, var)) =
        tape.bn_relu_conv2d_train(x, gamma, beta, &leaves[w], stride, padding, BN_EPS)?;
    updates.push(BnUpdate {
        ids: ids.clone(),
        batch_mean: mean,
        batch_var: var,
    });
    Ok(z)
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
            let out = width * cfg.block.expansion();
            for b in 0..nblocks {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let name = format!("layer{}.{}", stage + 1, b);
                let p = &name;
                let params = match cfg.block {
                    BlockKind::Bottleneck => {
                        let conv1 = kaiming_conv(
                            params,
                            &format!("{p}.conv1.weight"),
                            width,
                            inplanes,
                            1,
                            rng,
                        )?;
                        let bn1 = add_bn(params, buffers, &format!("{p}.bn1"), width, 1.0)?;
                        let conv2 = kaiming_conv(
                            params,
                            &format!("{p}.conv2.weight"),
                            width,
                            width,
                            3,
                            rng,
                        )?;
                        let bn2 = add_bn(params, buffers, &format!("{p}.bn2"), width, 1.0)?;
                        let conv3 =
                            kaiming_conv(params, &format!("{p}.conv3.weight"), out, width, 1, rng)?;
                        // Zero-init residual: each block starts as the identity on its shortcut.
                        let bn3 = add_bn(params, buffers, &format!("{p}.bn3"), out, 0.0)?;
                        let downsample =
                            add_downsample(params, buffers, p, inplanes, out, stride, rng)?;
                        BlockParams::Bottleneck(Bottleneck {
                            conv1,
                            bn1,
                            conv2,
                            bn2,
                            conv3,
                            bn3,
                            stride,
                            downsample,
                        })
                    }
                    BlockKind::Basic => {
                        let conv1 = kaiming_conv(
                            params,
                            &format!("{p}.conv1.weight"),
                            width,
                            inplanes,
                            3,
                            rng,
                        )?;
                        let bn1 = add_bn(params, buffers, &format!("{p}.bn1"), width, 1.0)?;
                        let conv2 = kaiming_conv(
                            params,
                            &format!("{p}.conv2.weight"),
                            width,
                            width,
                            3,
                            rng,
                        )?;
                        // Zero-init residual, as for the bottleneck's bn3 (torchvision's
                        // zero_init_residual zeroes a BasicBlock's bn2).
                        let bn2 = add_bn(params, buffers, &format!("{p}.bn2"), width, 0.0)?;
                        let downsample =
                            add_downsample(params, buffers, p, inplanes, out, stride, rng)?;
                        BlockParams::Basic(BasicBlock {
                            conv1,
                            bn1,
                            conv2,
                            bn2,
                            stride,
                            downsample,
                        })
                    }
                };
                blocks.push(Block { name, params });
                inplanes = out;
            }
        }
        let options = crate::options::current();
        Ok(ResNet {
            cfg: cfg.clone(),
            conv1,
            bn1,
            blocks,
            fused_bn: options.fused_bn.on(),
            recompute: options.recompute,
        })
    }

    /// Sets what training recomputes in backward (the default is the run option `recompute`
    /// in force when the network was built); it applies with the fused BN ops only.
    pub fn set_recompute(&mut self, level: Recompute) {
        self.recompute = level;
    }

    /// Switches between the fused BN + ReLU (+ add) ops and the unfused composition (the
    /// default is the run option `fused_bn` in force when the network was built); both compute
    /// the same values.
    pub fn set_fused_bn(&mut self, on: bool) {
        self.fused_bn = on;
    }

    pub fn fused_bn(&self) -> bool {
        self.fused_bn
    }

    /// relu(BN(x) [+ residual]): fused or as the separate ops, by `self.fused_bn`.
    #[allow(clippy::too_many_arguments)]
    fn bn_relu(
        &self,
        tape: &mut Tape,
        leaves: &ParamLeaves,
        buffers: &ParamStore,
        ids: &BnIds,
        x: &Tensor,
        residual: Option<&Tensor>,
        train: bool,
        updates: &mut Vec<BnUpdate>,
    ) -> Result<Tensor> {
        if self.fused_bn {
            return bn_relu_forward(tape, leaves, buffers, ids, x, residual, train, updates);
        }
        let mut h = bn_forward(tape, leaves, buffers, ids, x, train, updates)?;
        if let Some(r) = residual {
            h = tape.add(&h, r)?;
        }
        tape.relu(&h)
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
        let recompute = train && self.fused_bn && self.recompute != Recompute::Nothing;
        if recompute && self.cfg.stem == Stem::Imagenet {
            let (gamma, beta) = (&leaves[self.bn1.gamma], &leaves[self.bn1.beta]);
            let (p, (batch_mean, batch_var)) =
                tape.bn_relu_max_pool2d_train(&h, gamma, beta, 3, 2, 1, BN_EPS)?; // (N, 64, H/4, W/4)
            updates.push(BnUpdate {
                ids: self.bn1.clone(),
                batch_mean,
                batch_var,
            });
            h = p;
        } else {
            h = self.bn_relu(tape, leaves, buffers, &self.bn1, &h, None, train, updates)?;
            if self.cfg.stem == Stem::Imagenet {
                h = tape.max_pool2d(&h, 3, 2, 1)?; // (N, 64, H/4, W/4)
            }
        }
        for blk in &self.blocks {
            // One NVTX range per block under its torchvision name, `layer3.2` (a no-op without
            // the profiler).
            let _range = crate::device::nvtx::Range::new(&blk.name);
            h = match &blk.params {
                BlockParams::Bottleneck(b) => {
                    self.bottleneck(tape, leaves, buffers, b, &h, train, updates)?
                }
                BlockParams::Basic(b) => {
                    self.basic_block(tape, leaves, buffers, b, &h, train, updates)?
                }
            };
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
        let recompute = if train && self.fused_bn {
            self.recompute
        } else {
            Recompute::Nothing
        };
        let mut h = tape.conv2d(x, &leaves[blk.conv1], 1, 0)?; // (N, width, H, W)
        if recompute == Recompute::Nothing {
            h = self.bn_relu(tape, leaves, buffers, &blk.bn1, &h, None, train, updates)?;
            h = tape.conv2d(&h, &leaves[blk.conv2], blk.stride, 1)?; // (N, width, H/s, W/s)
            h = self.bn_relu(tape, leaves, buffers, &blk.bn2, &h, None, train, updates)?;
            h = tape.conv2d(&h, &leaves[blk.conv3], 1, 0)?; // (N, 4*width, H/s, W/s)
        } else {
            h = bn_relu_conv_train(
                tape, leaves, &blk.bn1, &h, blk.conv2, blk.stride, 1, updates,
            )?;
            if recompute == Recompute::BnOutputs {
                h = bn_relu_conv_train(tape, leaves, &blk.bn2, &h, blk.conv3, 1, 0, updates)?;
            }
        }

        // The shortcut is computed before bn3 (the fused ops consume it), but its BN update is
        // queued after bn3's, in the order the updates always had.
        let mut shortcut_updates = Vec::new();
        let shortcut = match &blk.downsample {
            Some((w, bn)) => {
                let s = tape.conv2d(x, &leaves[*w], blk.stride, 0)?;
                bn_forward(tape, leaves, buffers, bn, &s, train, &mut shortcut_updates)?
            }
            None => x.clone(),
        };
        let y = if recompute == Recompute::BnAndConv3 {
            // h is conv2's output: bn2 -> ReLU -> conv3 -> bn3 + shortcut -> ReLU in one op.
            let (bn2, bn3) = (&blk.bn2, &blk.bn3);
            let (y, s2, s3) = tape.bn_relu_conv2d_bn_add_relu_train(
                &h,
                &leaves[bn2.gamma],
                &leaves[bn2.beta],
                &leaves[blk.conv3],
                &leaves[bn3.gamma],
                &leaves[bn3.beta],
                &shortcut,
                BN_EPS,
            )?; // (N, 4*width, H/s, W/s)
            for (ids, (batch_mean, batch_var)) in [(bn2, s2), (bn3, s3)] {
                updates.push(BnUpdate {
                    ids: ids.clone(),
                    batch_mean,
                    batch_var,
                });
            }
            y
        } else {
            let bn3 = &blk.bn3;
            self.bn_relu(
                tape,
                leaves,
                buffers,
                bn3,
                &h,
                Some(&shortcut),
                train,
                updates,
            )?
        };
        updates.append(&mut shortcut_updates);
        Ok(y)
    }

    /// The blocks' torchvision module names in forward order (`layer1.0`, ...), as their NVTX
    /// ranges are named.
    pub fn block_names(&self) -> Vec<&str> {
        self.blocks.iter().map(|b| b.name.as_str()).collect()
    }

    /// A basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)). The ops are the
    /// bottleneck's (so it runs wherever they do); with recomputation on, bn1 + ReLU + conv2 is
    /// [`Tape::bn_relu_conv2d_train`] (bn1's output is recomputed in backward). The bottleneck's
    /// fused tail is for a 1x1 conv3 and has no counterpart here: `BnAndConv3` recomputes what
    /// `BnOutputs` does. Per block the tape keeps 4 activation-widths (conv1's output, bn1 +
    /// ReLU's, conv2's, the block output), 3 with recomputation.
    #[allow(clippy::too_many_arguments)]
    fn basic_block(
        &self,
        tape: &mut Tape,
        leaves: &ParamLeaves,
        buffers: &ParamStore,
        blk: &BasicBlock,
        x: &Tensor,
        train: bool,
        updates: &mut Vec<BnUpdate>,
    ) -> Result<Tensor> {
        let recompute = train && self.fused_bn && self.recompute != Recompute::Nothing;
        let mut h = tape.conv2d(x, &leaves[blk.conv1], blk.stride, 1)?; // (N, width, H/s, W/s)
        if recompute {
            h = bn_relu_conv_train(tape, leaves, &blk.bn1, &h, blk.conv2, 1, 1, updates)?;
        } else {
            h = self.bn_relu(tape, leaves, buffers, &blk.bn1, &h, None, train, updates)?;
            h = tape.conv2d(&h, &leaves[blk.conv2], 1, 1)?; // (N, width, H/s, W/s)
        }
        // bn2's update is queued before the shortcut's, the bottleneck's order.
        let mut shortcut_updates = Vec::new();
        let shortcut = match &blk.downsample {
            Some((w, bn)) => {
                let s = tape.conv2d(x, &leaves[*w], blk.stride, 0)?; // (N, width, H/s, W/s)
                bn_forward(tape, leaves, buffers, bn, &s, train, &mut shortcut_updates)?
            }
            None => x.clone(),
        };
        let y = self.bn_relu(
            tape,
            leaves,
            buffers,
            &blk.bn2,
            &h,
            Some(&shortcut),
            train,
            updates,
        )?; // (N, width, H/s, W/s)
        updates.append(&mut shortcut_updates);
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::params::ParamLeaves;
    use crate::testutil::{randn, randn_vec};

    /// Configurations (config.json, checkpoints) written before basic blocks existed have no
    /// `block` field and keep meaning bottleneck blocks.
    #[test]
    fn a_config_without_block_kind_is_a_bottleneck_resnet() {
        let old = r#"{"layers":[3,4,6,3],"base_width":64,"stem":"imagenet"}"#;
        let cfg: ResNetConfig = serde_json::from_str(old).unwrap();
        assert_eq!(cfg, ResNetConfig::resnet50());
        let r18 = serde_json::to_string(&ResNetConfig::resnet18(Stem::Cifar)).unwrap();
        assert!(r18.contains(r#""block":"basic""#), "{r18}");
        assert_eq!(ResNetConfig::resnet18(Stem::Cifar).feature_dim(), 512);
    }

    /// A two-stage ResNet (identity and projection shortcuts, stride 2) forward + backward in
    /// both modes, fused vs unfused: the output, every parameter's gradient, the input's
    /// gradient and the queued BN updates (same layers, same order, same statistics) agree to
    /// 1e-5 relative to 1 + |value| (the same expressions in the same order: in practice they
    /// agree exactly); the fused ops with the inner BN outputs recomputed in backward agree
    /// with the fused ops bit for bit.
    #[test]
    fn fused_and_unfused_resnet_agree_forward_backward_and_bn_updates() {
        fused_recomputed_and_unfused_agree(Stem::Cifar, BlockKind::Bottleneck, [3, 3, 7, 6]);
    }

    /// The same with the ImageNet stem (7x7 stride-2 conv, BN + ReLU, 3x3 stride-2 max pool,
    /// whose BN + ReLU output the recomputing levels also drop).
    #[test]
    fn fused_and_unfused_resnet_agree_with_the_imagenet_stem() {
        fused_recomputed_and_unfused_agree(Stem::Imagenet, BlockKind::Bottleneck, [2, 3, 17, 14]);
    }

    /// The same with basic blocks (ResNet18's), both stems: an identity shortcut in stage 1
    /// (the width does not change), a projection in stage 2.
    #[test]
    fn fused_and_unfused_basic_block_resnet_agree() {
        fused_recomputed_and_unfused_agree(Stem::Cifar, BlockKind::Basic, [3, 3, 7, 6]);
        fused_recomputed_and_unfused_agree(Stem::Imagenet, BlockKind::Basic, [2, 3, 17, 14]);
    }

    fn fused_recomputed_and_unfused_agree(stem: Stem, block: BlockKind, x_shape: [usize; 4]) {
        // Basic blocks are 4x narrower than bottlenecks at the same base width: 4 rather than
        // 3 so that eval mode's random running statistics do not kill every ReLU of a stage
        // (a zero input gradient would hide the comparison).
        let cfg = ResNetConfig {
            layers: vec![2, 1],
            base_width: if block == BlockKind::Basic { 4 } else { 3 },
            stem,
            block,
        };
        let basic = block == BlockKind::Basic;
        let mut params = ParamStore::new();
        let mut buffers = ParamStore::new();
        let mut net = ResNet::new(
            &cfg,
            &mut params,
            &mut buffers,
            &mut crate::testutil::rng(3),
        )
        .unwrap();
        // Random BN affine parameters and running statistics (the zero-init gamma of bn3 would
        // hide the residual branch; the initial running stats make eval mode the identity).
        let noise = randn_vec(params.numel(), 4);
        for e in params.entries.clone() {
            if e.is_1d() {
                for i in e.range() {
                    params.data[i] = 0.2 + 0.5 * noise[i];
                }
            }
        }
        let noise = randn_vec(buffers.numel(), 5);
        for e in buffers.entries.clone() {
            let var = e.name.ends_with("running_var");
            for i in e.range() {
                buffers.data[i] = if var {
                    0.5 + noise[i] * noise[i]
                } else {
                    noise[i]
                };
            }
        }
        let x = randn(&x_shape, 6);
        let dy = randn(&[x_shape[0], cfg.feature_dim()], 7);
        for train in [true, false] {
            let run = |net: &ResNet| {
                let mut tape = Tape::new();
                let leaves = params.leaves(&mut tape).unwrap();
                let xt = tape.track(&x);
                let mut updates = Vec::new();
                let y = net
                    .forward(&mut tape, &leaves, &buffers, &xt, train, &mut updates)
                    .unwrap();
                let nodes = tape.len();
                let g = tape.backward_from(vec![(y.clone(), dy.clone())]).unwrap();
                let mut grads = vec![g.get(&xt).unwrap().to_vec().unwrap()];
                let ParamLeaves(ls) = &leaves;
                for l in ls {
                    grads.push(g.get(l).unwrap().to_vec().unwrap());
                }
                (y.to_vec().unwrap(), grads, updates, nodes)
            };
            net.set_fused_bn(true);
            let mut recomputed = Vec::new();
            for level in [Recompute::BnOutputs, Recompute::BnAndConv3] {
                net.set_recompute(level);
                recomputed.push((level, run(&net)));
            }
            net.set_recompute(Recompute::Nothing);
            let (yf, gf, uf, nf) = run(&net);
            net.set_fused_bn(false);
            let (yu, gu, uu, nu) = run(&net);
            // Stem: 2 ops fused into 1; each bottleneck's bn1, bn2: 2 -> 1; bn3 + add + relu:
            // 3 -> 1 (a basic block: bn1 2 -> 1, bn2 + add + relu 3 -> 1).
            let per_block = if basic { 3 } else { 4 };
            assert_eq!(nu - nf, 1 + 3 * per_block, "train={train}: recorded ops");
            // Recomputation (training only), per block: bn1 + conv2 and bn2 + conv3: 2 -> 1
            // each; with conv3 recomputed, bn2 + conv3 + bn3 (+ add + relu): 3 -> 1. The same
            // values bit for bit.
            for (level, (y, g, u, n)) in recomputed {
                let stem_ops = usize::from(stem == Stem::Imagenet);
                // A basic block fuses bn1 + conv2 at both levels: 2 -> 1.
                let fewer = match (train, level) {
                    (false, _) => 0,
                    (true, _) if basic => 3 + stem_ops,
                    (true, Recompute::BnOutputs) => 3 * 2 + stem_ops,
                    (true, _) => 3 * 3 + stem_ops,
                };
                assert_eq!(nf - n, fewer, "train={train} {level:?}: recorded ops");
                assert_eq!(y, yf, "train={train} {level:?}: features");
                assert_eq!(g, gf, "train={train} {level:?}: gradients");
                assert_eq!(u.len(), uf.len());
                for (a, b) in u.iter().zip(&uf) {
                    assert_eq!(a.ids.gamma, b.ids.gamma);
                    assert_eq!(
                        a.batch_mean.to_vec().unwrap(),
                        b.batch_mean.to_vec().unwrap()
                    );
                    assert_eq!(a.batch_var.to_vec().unwrap(), b.batch_var.to_vec().unwrap());
                }
            }
            let close = |a: &[f32], b: &[f32], what: &str| {
                assert_eq!(a.len(), b.len());
                for (i, (&p, &q)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (p - q).abs() as f64 <= 1e-5 * (1.0 + q.abs() as f64),
                        "train={train} {what}[{i}]: fused {p} vs unfused {q}"
                    );
                }
            };
            close(&yf, &yu, "features");
            assert!(yf.iter().any(|&v| v != 0.0));
            for (i, (a, b)) in gf.iter().zip(&gu).enumerate() {
                assert!(
                    a.iter().any(|&v| v != 0.0),
                    "train={train} {stem:?} {block:?}: grad {i} is all zero"
                );
                close(a, b, &format!("grad {i}"));
            }
            assert_eq!(uf.len(), uu.len());
            // The stem, each block's BNs, the projection shortcuts (a basic layer1.0 keeps
            // the width: identity).
            let bns = if basic { 1 + 3 * 2 + 1 } else { 1 + 3 * 3 + 2 };
            assert_eq!(uf.len(), if train { bns } else { 0 });
            for (a, b) in uf.iter().zip(&uu) {
                assert_eq!(a.ids.gamma, b.ids.gamma);
                assert_eq!(a.ids.running_var, b.ids.running_var);
                close(
                    &a.batch_mean.to_vec().unwrap(),
                    &b.batch_mean.to_vec().unwrap(),
                    "mean",
                );
                close(
                    &a.batch_var.to_vec().unwrap(),
                    &b.batch_var.to_vec().unwrap(),
                    "var",
                );
            }
        }
    }
}
