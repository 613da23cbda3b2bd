//! The paper's linear evaluation (appendix C.1; SPEC.md "Evaluation"): the backbone frozen (BN
//! in eval mode, nothing recorded), `Linear(D, classes)` on its pooled features, SGD with
//! momentum 0.9, lr 0.3, batch 256, 100 epochs, cosine; the training images are seen through
//! `RandomResizedCrop(S)` + horizontal flip, a new draw every epoch, so every epoch runs the
//! frozen forward on the whole training split; validation is the evaluation view
//! (`data::augment::eval_crop`). The last epoch and the best are reported.
//!
//! Choices the paper leaves open, made as DINO's `eval_linear.py` (which the official CARP
//! evaluation follows): torchvision's default crop scale (0.08, 1) and ratio (3/4, 4/3);
//! no weight decay; the last short batch of an epoch is kept. The learning rate follows the
//! cosine per step rather than per epoch, and the classifier starts at zero rather than
//! N(0, 0.01) (the problem is convex; from zero, the first step is the plain gradient).
//!
//! The validation features are computed once (the evaluation view is deterministic and the
//! backbone frozen), and scored with the classifier after every epoch. The training views are
//! made by a producer thread while the previous batch runs through the backbone.

use std::sync::mpsc::sync_channel;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::autograd::Precision;
use crate::bail;
use crate::data::augment::{finish_view, sample_view, ViewConfig};
use crate::data::loader::image_rng;
use crate::data::{eval_batches, Dataset};
use crate::error::{Error, Result};
use crate::eval::linear::{accuracy, check_sgd, loss_and_grad, Classifier, Grads};
use crate::nn::Network;
use crate::optim::schedule::cosine_lr;
use crate::tensor::{Device, Tensor};

/// The protocol's hyper-parameters (defaults: the paper's).
#[derive(Clone, Debug, PartialEq)]
pub struct LinearEvalConfig {
    pub epochs: usize,
    /// Images per SGD step (the last batch of an epoch may be shorter).
    pub batch: usize,
    /// Peak learning rate; cosine to 0 over all steps.
    pub lr: f32,
    pub momentum: f32,
    /// On the weights (not the bias), added to the gradient.
    pub weight_decay: f32,
    /// Side of the training and validation views (224 for ResNet50).
    pub size: usize,
    /// Seeds the epoch orders and the training views.
    pub seed: u64,
    /// The frozen forward's numerical mode (bf16 on a GPU: the forward is the protocol's cost).
    pub precision: Precision,
}

impl LinearEvalConfig {
    /// The paper's protocol at view side `size`: 100 epochs, batch 256, lr 0.3, momentum 0.9,
    /// no weight decay.
    pub fn paper(size: usize) -> LinearEvalConfig {
        LinearEvalConfig {
            epochs: 100,
            batch: 256,
            lr: 0.3,
            momentum: 0.9,
            weight_decay: 0.0,
            size,
            seed: 0,
            precision: Precision::F32,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.size < 8 {
            bail!(
                Config,
                "linear evaluation: the view size ({}) must be at least 8",
                self.size
            );
        }
        check_sgd(
            "linear evaluation",
            self.epochs,
            self.batch,
            self.lr,
            self.momentum,
            self.weight_decay,
        )
    }
}

/// The training views' recipe: `RandomResizedCrop(size)` (torchvision's scale (0.08, 1),
/// ratio (3/4, 4/3), bicubic as everywhere in carp) and a horizontal flip with p 0.5; no colour
/// operation, no blur; normalized as every view.
pub fn train_view_config(size: usize) -> ViewConfig {
    let mut v = ViewConfig::imagenet(size);
    v.min_scale = 0.08;
    v.max_scale = 1.0;
    v.jitter_p = 0.0;
    v.grayscale_p = 0.0;
    v.blur_p = [0.0, 0.0];
    v.solarize_p = [0.0, 0.0];
    v
}

/// The training views of the images `indices` in `epoch`, normalized, (B, 3, S, S) in the
/// order given. Each image's draw depends only on (seed, epoch, index).
pub fn train_views(
    ds: &Dataset,
    indices: &[usize],
    cfg: &ViewConfig,
    seed: u64,
    epoch: usize,
) -> Result<Vec<f32>> {
    let per = 3 * cfg.size * cfg.size;
    let mut out = vec![0f32; indices.len() * per]; // (B, 3, S, S)
    out.par_chunks_mut(per)
        .zip(indices.par_iter())
        .try_for_each(|(o, &i)| -> Result<()> {
            let img = ds.image(i)?;
            let mut rng = image_rng(seed, epoch, i);
            let (crop, params) = sample_view(&img, cfg, 0, &mut rng);
            finish_view(&crop, &params, cfg, o);
            Ok(())
        })?;
    Ok(out)
}

/// One epoch's result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EpochResult {
    /// Counted from 1.
    pub epoch: usize,
    /// Mean training cross-entropy over the epoch.
    pub train_loss: f32,
    pub top1: f64,
    pub top5: f64,
    /// Training images through the views, the frozen forward and the SGD step, per second of
    /// the epoch's wall time.
    pub images_per_s: f64,
}

/// The protocol's report: every epoch, and the last and best validation accuracies.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LinearEvalReport {
    pub epochs: Vec<EpochResult>,
    pub last_top1: f64,
    pub last_top5: f64,
    pub best_top1: f64,
    /// The top-5 of the epoch with the best top-1.
    pub best_top5: f64,
    pub best_epoch: usize,
    /// Training images per second over all epochs.
    pub images_per_s: f64,
    /// Seconds spent on the validation features (once).
    pub val_features_s: f64,
}

/// Pooled features (N, D) of normalized views `x` (N, 3, S, S), forward on `device`.
fn pooled(
    net: &Network,
    x: Vec<f32>,
    size: usize,
    device: &Device,
    precision: Precision,
) -> Result<Vec<f32>> {
    let n = x.len() / (3 * size * size);
    let t = Tensor::from_vec(x, &[n, 3, size, size])?.to_device(device)?;
    net.features_eval_in(&t, precision)?.to_vec()
}

/// Runs the protocol on `net`'s frozen backbone: trains on `train` (augmented views), scores on
/// `val` (evaluation views) after every epoch. `on_epoch` sees each epoch's result as it ends
/// (progress, ETA). Labels must lie below the larger of the two splits' class counts.
pub fn linear_eval(
    net: &Network,
    train: &Dataset,
    val: &Dataset,
    cfg: &LinearEvalConfig,
    device: &Device,
    on_epoch: &mut dyn FnMut(&EpochResult),
) -> Result<LinearEvalReport> {
    cfg.validate()?;
    let (n_train, n_val) = (train.len(), val.len());
    if n_train == 0 || n_val == 0 {
        bail!(
            Config,
            "linear evaluation needs images in both splits ({n_train} training, {n_val} validation)"
        );
    }
    let d = net.cfg.backbone.feature_dim();
    let classes = train.num_classes().max(val.num_classes()).max(1);
    let size = cfg.size;

    // Validation features, once: (n_val, D).
    let t0 = Instant::now();
    let mut val_x = Vec::with_capacity(n_val * d);
    let mut val_y = Vec::with_capacity(n_val);
    for b in eval_batches(val, size, cfg.batch) {
        let (x, y) = b?;
        val_x.extend_from_slice(&pooled(net, x, size, device, cfg.precision)?);
        val_y.extend_from_slice(&y);
    }
    let val_features_s = t0.elapsed().as_secs_f64();
    // The classifier sees the raw pooled features: no standardization in this protocol.
    let (zero, one) = (vec![0.0f32; d], vec![1.0f32; d]);

    let view = train_view_config(size);
    let mut head = Classifier::zeros(classes, d);
    let bmax = cfg.batch.min(n_train);
    let mut grads = Grads::new(classes, d, bmax);
    let total_steps = n_train.div_ceil(cfg.batch) * cfg.epochs;
    let mut step = 0usize;
    let mut epochs = Vec::with_capacity(cfg.epochs);
    let mut train_secs = 0.0f64;
    let mut order_rng = ChaCha8Rng::seed_from_u64(cfg.seed);

    for epoch in 0..cfg.epochs {
        let t_epoch = Instant::now();
        let mut order: Vec<usize> = (0..n_train).collect();
        order.shuffle(&mut order_rng);
        let mut loss_sum = 0.0f64;
        // Views of batch k + 1 are made while batch k runs through the backbone.
        let (tx, rx) = sync_channel::<Result<(Vec<f32>, Vec<u32>)>>(2);
        std::thread::scope(|s| -> Result<()> {
            // Owned here, so that an error below drops it before the scope joins the producer
            // (which then stops at its next send instead of waiting on a full channel).
            let rx = rx;
            let order = &order;
            let view = &view;
            s.spawn(move || {
                for idx in order.chunks(cfg.batch) {
                    let item = train_views(train, idx, view, cfg.seed, epoch)
                        .map(|x| (x, idx.iter().map(|&i| train.label(i)).collect()));
                    let failed = item.is_err();
                    // A closed channel means the consumer stopped on an error: stop too.
                    if tx.send(item).is_err() || failed {
                        break;
                    }
                }
            });
            for item in rx.iter() {
                let (x, y) = item?;
                let bsz = y.len();
                let f = pooled(net, x, size, device, cfg.precision)?; // (B, D)
                let loss = loss_and_grad(&f, &y, &head.w, &head.b, d, classes, &mut grads)?;
                if !loss.is_finite() {
                    bail!(
                        NonFinite,
                        "linear evaluation: training loss became {loss} at epoch {} (step {step}); lower --lr (now {})",
                        epoch + 1,
                        cfg.lr
                    );
                }
                loss_sum += loss * bsz as f64;
                let lr = cosine_lr(step, total_steps, 0, cfg.lr, 0.0);
                head.sgd_step(&grads, lr, cfg.momentum, cfg.weight_decay);
                step += 1;
            }
            Ok(())
        })?;
        let secs = t_epoch.elapsed().as_secs_f64();
        train_secs += secs;
        let (top1, top5) = accuracy(&val_x, &val_y, &zero, &one, &head.w, &head.b, d, classes)?;
        let r = EpochResult {
            epoch: epoch + 1,
            train_loss: (loss_sum / n_train as f64) as f32,
            top1,
            top5,
            images_per_s: n_train as f64 / secs.max(1e-9),
        };
        on_epoch(&r);
        epochs.push(r);
    }
    let last = epochs
        .last()
        .ok_or_else(|| Error::Msg("linear evaluation ran no epoch (a bug)".into()))?;
    // The first epoch with the highest top-1.
    let best = epochs
        .iter()
        .fold(&epochs[0], |b, e| if e.top1 > b.top1 { e } else { b });
    Ok(LinearEvalReport {
        last_top1: last.top1,
        last_top5: last.top5,
        best_top1: best.top1,
        best_top5: best.top5,
        best_epoch: best.epoch,
        images_per_s: (n_train * cfg.epochs) as f64 / train_secs.max(1e-9),
        val_features_s,
        epochs,
    })
}
