//! The fast cached probe: a `Linear(D, classes)` classifier trained on frozen, precomputed
//! pooled features of the evaluation view (SGD with momentum, cosine learning rate). It is NOT
//! the paper's protocol (`eval::probe` is: augmented training views through the frozen
//! backbone every epoch, lr 0.3, raw features): the features are cached once, so there is no
//! augmentation (every epoch sees the same feature vectors), and they are standardized. It is a
//! quick look at a checkpoint (`carp linear --protocol cached`), not a number to compare with
//! the paper's table.
//!
//! Preprocessing: each feature dimension is standardized (z-scored) with the mean and standard
//! deviation of the *training* features, and the same affine map is applied to the test
//! features. Pooled ResNet features are post-ReLU averages with very different scales per channel;
//! standardizing makes one learning rate fit every dimension (the role BatchNorm-without-affine
//! plays in front of the classifier in MAE/MoCo-v3 linear probes), and it leaves a linear problem
//! linear (an affine change of the inputs), so no accuracy is lost by it. Dimensions that are
//! constant on the training set (std < 1e-6) are only centred. The map is applied to each
//! gathered batch, never to a copy of the whole feature matrix.
//!
//! Optimization: weights and bias start at zero (the problem is convex, so no symmetry to break);
//! mini-batches of a seeded (ChaCha8) permutation per epoch, the last batch may be short; loss is
//! the mean softmax cross-entropy over the batch; SGD with (PyTorch-style) momentum
//! `v = mu v + g; w -= lr_t v`; weight decay `wd * w` is added to the weight gradient (not to the
//! bias); `lr_t` follows a cosine from `lr` to 0 over all steps, without warmup. Everything runs on
//! the CPU with `matmul_cpu` (gemm), and the result depends only on the inputs and the seed.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::bail;
use crate::error::Result;
use crate::ops::linear::matmul_cpu;
use crate::optim::schedule::cosine_lr;

/// Test features are scored in chunks of this many rows (bounds the logits buffer).
const EVAL_CHUNK: usize = 4096;

/// Hyper-parameters of the linear probe.
#[derive(Clone, Debug)]
pub struct LinearProbeConfig {
    /// Passes over the training features.
    pub epochs: usize,
    /// Mini-batch size (the last batch of an epoch may be shorter).
    pub batch: usize,
    /// Peak learning rate, used as given (not rescaled by the batch size); the cosine takes it to
    /// 0 over all steps. The default 0.1 is meant for batch 256 on standardized features; when
    /// changing the batch, scale it linearly (`0.1 * batch / 256`).
    pub lr: f32,
    /// SGD momentum, in [0, 1).
    pub momentum: f32,
    /// L2 penalty on the weights (not the bias), added to the gradient.
    pub weight_decay: f32,
    /// Seeds the per-epoch shuffling.
    pub seed: u64,
}

impl Default for LinearProbeConfig {
    /// 100 epochs (SPEC.md), batch 256, lr 0.1 (= 0.1 * 256 / 256), momentum 0.9, no weight decay
    /// (the usual choice for linear probes of self-supervised features), seed 0.
    fn default() -> Self {
        LinearProbeConfig {
            epochs: 100,
            batch: 256,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.0,
            seed: 0,
        }
    }
}

/// What the probe reports: test accuracies (fractions in [0, 1]) and the mean training loss of
/// every epoch.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LinearProbeReport {
    pub top1: f64,
    pub top5: f64,
    /// Mean cross-entropy over the training examples of each epoch (with the weights of the
    /// moment each batch was seen), one value per epoch.
    pub train_loss: Vec<f32>,
}

/// Trains `Linear(d, classes)` on `train` (n_train, d) row-major with `train_labels` (n_train,)
/// and reports top-1 / top-5 on `test` (n_test, d) with `test_labels` (n_test,). Features are
/// standardized with the training statistics (see the module doc). Top-k counts an example as
/// correct when fewer than k classes outrank its label (ties broken toward the lower class
/// index, as an argmax would); with fewer than 5 classes, top-5 is 1.
///
/// Errors on empty or mismatched inputs, labels outside `0..classes`, non-finite features, an
/// invalid configuration, or a diverging (non-finite) loss.
pub fn linear_probe(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    d: usize,
    classes: usize,
    cfg: &LinearProbeConfig,
) -> Result<LinearProbeReport> {
    check_inputs(train, train_labels, test, test_labels, d, classes, cfg)?;
    let n_train = train_labels.len();

    // Standardization statistics of the training features (d,); applied to each gathered batch
    // rather than to a copy of the features, which may be gigabytes (ImageNet: 1.28M x 2048).
    let (mean, inv_std) = feature_stats(train, d);

    let mut head = Classifier::zeros(classes, d);

    let steps_per_epoch = n_train.div_ceil(cfg.batch);
    let total_steps = steps_per_epoch * cfg.epochs;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..n_train).collect();
    // A batch larger than the training set is the whole set: size the buffers by the smaller.
    let bmax = cfg.batch.min(n_train);
    let mut xb = vec![0.0f32; bmax * d]; // (B, d) gathered batch
    let mut yb = vec![0u32; bmax]; // (B,)
    let mut grads = Grads::new(classes, d, bmax);
    let mut train_loss = Vec::with_capacity(cfg.epochs);
    let mut step = 0usize;

    for epoch in 0..cfg.epochs {
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0f64;
        for idx in order.chunks(cfg.batch) {
            let bsz = idx.len();
            // Gather and standardize the batch rows (B, d).
            xb[..bsz * d]
                .par_chunks_mut(d)
                .zip(idx.par_iter())
                .for_each(|(dst, &i)| {
                    standardize_row(&train[i * d..(i + 1) * d], &mean, &inv_std, dst)
                });
            for (y, &i) in yb.iter_mut().zip(idx) {
                *y = train_labels[i];
            }
            let loss = loss_and_grad(
                &xb[..bsz * d],
                &yb[..bsz],
                &head.w,
                &head.b,
                d,
                classes,
                &mut grads,
            )?;
            if !loss.is_finite() {
                bail!(
                    NonFinite,
                    "linear_probe: training loss became {loss} at epoch {epoch} (step {step}); \
                     lower the learning rate (now {})",
                    cfg.lr
                );
            }
            loss_sum += loss * bsz as f64;

            let lr = cosine_lr(step, total_steps, 0, cfg.lr, 0.0);
            head.sgd_step(&grads, lr, cfg.momentum, cfg.weight_decay);
            step += 1;
        }
        train_loss.push((loss_sum / n_train as f64) as f32);
    }

    let (top1, top5) = accuracy(
        test,
        test_labels,
        &mean,
        &inv_std,
        &head.w,
        &head.b,
        d,
        classes,
    )?;
    Ok(LinearProbeReport {
        top1,
        top5,
        train_loss,
    })
}

#[allow(clippy::too_many_arguments)] // the probe's own argument list, checked in one place
fn check_inputs(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    d: usize,
    classes: usize,
    cfg: &LinearProbeConfig,
) -> Result<()> {
    if d == 0 || classes == 0 {
        bail!(
            Shape,
            "linear_probe: feature dimension ({d}) and class count ({classes}) must be positive"
        );
    }
    for (what, x, labels) in [("train", train, train_labels), ("test", test, test_labels)] {
        if labels.is_empty() {
            bail!(Shape, "linear_probe: no {what} examples");
        }
        if x.len() != labels.len() * d {
            bail!(
                Shape,
                "linear_probe: {what} features have {} values, expected {} labels x d {d} = {}",
                x.len(),
                labels.len(),
                labels.len() * d
            );
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= classes)
        {
            bail!(
                Shape,
                "linear_probe: {what} label {l} at index {i} is outside 0..{classes}"
            );
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            bail!(
                NonFinite,
                "linear_probe: {what} feature {} of example {} is {}",
                i % d,
                i / d,
                x[i]
            );
        }
    }
    check_sgd(
        "linear_probe",
        cfg.epochs,
        cfg.batch,
        cfg.lr,
        cfg.momentum,
        cfg.weight_decay,
    )
}

/// The SGD settings both probes share: positive epochs, batch and learning rate, momentum in
/// [0, 1), weight decay >= 0. `what` names the caller in the error.
pub(crate) fn check_sgd(
    what: &str,
    epochs: usize,
    batch: usize,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
) -> Result<()> {
    if epochs == 0 || batch == 0 {
        bail!(
            Config,
            "{what}: epochs ({epochs}) and batch ({batch}) must be positive"
        );
    }
    if !(lr.is_finite() && lr > 0.0) {
        bail!(Config, "{what}: lr must be positive, got {lr}");
    }
    if !(0.0..1.0).contains(&momentum) {
        bail!(Config, "{what}: momentum must be in [0, 1), got {momentum}");
    }
    if !(weight_decay.is_finite() && weight_decay >= 0.0) {
        bail!(
            Config,
            "{what}: weight_decay must be >= 0, got {weight_decay}"
        );
    }
    Ok(())
}

/// Per-dimension mean and 1 / std of x (n, d), accumulated in f64; 1 / std is 1 for dimensions
/// with std < 1e-6 (constant ones: only centred).
fn feature_stats(x: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let n = (x.len() / d) as f64;
    let mut sum = vec![0.0f64; d];
    let mut sq = vec![0.0f64; d];
    for row in x.chunks_exact(d) {
        for ((s, q), &v) in sum.iter_mut().zip(sq.iter_mut()).zip(row) {
            *s += v as f64;
            *q += v as f64 * v as f64;
        }
    }
    let mut mean = vec![0.0f32; d];
    let mut inv_std = vec![1.0f32; d];
    for j in 0..d {
        let m = sum[j] / n;
        let var = (sq[j] / n - m * m).max(0.0);
        mean[j] = m as f32;
        let std = var.sqrt();
        if std >= 1e-6 {
            inv_std[j] = (1.0 / std) as f32;
        }
    }
    (mean, inv_std)
}

/// dst (d,) = (src - mean) * inv_std.
fn standardize_row(src: &[f32], mean: &[f32], inv_std: &[f32], dst: &mut [f32]) {
    for (((o, &v), &m), &s) in dst.iter_mut().zip(src).zip(mean).zip(inv_std) {
        *o = (v - m) * s;
    }
}

/// Gradient buffers of one step: dw (classes, d), db (classes,), and the scratch logits /
/// dlogits (B, classes).
pub(crate) struct Grads {
    dw: Vec<f32>,
    db: Vec<f32>,
    logits: Vec<f32>,
}

impl Grads {
    pub(crate) fn new(classes: usize, d: usize, batch: usize) -> Self {
        Grads {
            dw: vec![0.0; classes * d],
            db: vec![0.0; classes],
            logits: vec![0.0; batch * classes],
        }
    }
}

/// Mean softmax cross-entropy of logits (B, C) against labels (B,), computed stably (max
/// subtracted, log-sum-exp in f64). Overwrites `logits` with dlogits = (softmax - onehot) / B,
/// the gradient of the mean loss.
fn softmax_xent_grad(logits: &mut [f32], labels: &[u32], classes: usize) -> f64 {
    let bsz = labels.len();
    let inv_b = 1.0 / bsz as f64;
    let mut row_loss = vec![0.0f64; bsz];
    logits
        .par_chunks_mut(classes)
        .zip(labels.par_iter())
        .zip(row_loss.par_iter_mut())
        .for_each(|((row, &y), loss)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let lse = max + sum.ln();
            *loss = lse - row[y as usize] as f64;
            for (j, v) in row.iter_mut().enumerate() {
                let p = (*v as f64 - lse).exp();
                let onehot = if j == y as usize { 1.0 } else { 0.0 };
                *v = ((p - onehot) * inv_b) as f32;
            }
        });
    // Summed in a fixed order so the result does not depend on the thread count.
    row_loss.iter().sum::<f64>() * inv_b
}

/// Mean cross-entropy of `x w^T + b` on (x (B, d), labels (B,)) and its gradients, written to
/// `g.dw` (classes, d) and `g.db` (classes,). Returns the loss.
pub(crate) fn loss_and_grad(
    x: &[f32],
    labels: &[u32],
    w: &[f32],
    b: &[f32],
    d: usize,
    classes: usize,
    g: &mut Grads,
) -> Result<f64> {
    let bsz = labels.len();
    let logits = &mut g.logits[..bsz * classes]; // (B, C)
                                                 // logits = x (B, d) w^T (d, C) + b
    matmul_cpu(x, w, bsz, d, classes, false, true, logits, false)?;
    for row in logits.chunks_exact_mut(classes) {
        for (v, &bi) in row.iter_mut().zip(b) {
            *v += bi;
        }
    }
    let loss = softmax_xent_grad(logits, labels, classes);
    let dlogits = &g.logits[..bsz * classes]; // (B, C)
                                              // dw (C, d) = dlogits^T (C, B) x (B, d)
    matmul_cpu(dlogits, x, classes, bsz, d, true, false, &mut g.dw, false)?;
    // db (C,) = sum over rows of dlogits, in f64 for a result independent of the batch order.
    let mut db = vec![0.0f64; classes];
    for row in dlogits.chunks_exact(classes) {
        for (a, &v) in db.iter_mut().zip(row) {
            *a += v as f64;
        }
    }
    for (o, a) in g.db.iter_mut().zip(db) {
        *o = a as f32;
    }
    Ok(loss)
}

/// The classifier `x w^T + b` of both probes and its SGD momentum buffers, started at zero
/// (the problem is convex: no symmetry to break).
pub(crate) struct Classifier {
    pub(crate) w: Vec<f32>, // (classes, d)
    pub(crate) b: Vec<f32>, // (classes,)
    vw: Vec<f32>,           // momentum buffers, same shapes
    vb: Vec<f32>,
}

impl Classifier {
    pub(crate) fn zeros(classes: usize, d: usize) -> Classifier {
        Classifier {
            w: vec![0.0; classes * d],
            b: vec![0.0; classes],
            vw: vec![0.0; classes * d],
            vb: vec![0.0; classes],
        }
    }

    /// One SGD-with-momentum step on `g`'s gradients at learning rate `lr`; the weight decay
    /// applies to the weights, not the bias.
    pub(crate) fn sgd_step(&mut self, g: &Grads, lr: f32, momentum: f32, weight_decay: f32) {
        sgd_momentum(&mut self.w, &mut self.vw, &g.dw, lr, momentum, weight_decay);
        sgd_momentum(&mut self.b, &mut self.vb, &g.db, lr, momentum, 0.0);
    }
}

/// One SGD-with-momentum step: g' = g + wd * p; v = mu * v + g'; p -= lr * v.
fn sgd_momentum(p: &mut [f32], v: &mut [f32], g: &[f32], lr: f32, mu: f32, wd: f32) {
    p.par_iter_mut()
        .zip(v.par_iter_mut())
        .zip(g.par_iter())
        .for_each(|((p, v), &g)| {
            let g = g + wd * *p;
            *v = mu * *v + g;
            *p -= lr * *v;
        });
}

/// (top-1, top-5) of `z w^T + b` against labels (n,), z the standardized rows of x (n, d).
#[allow(clippy::too_many_arguments)] // data, statistics and weights, all needed
pub(crate) fn accuracy(
    x: &[f32],
    labels: &[u32],
    mean: &[f32],
    inv_std: &[f32],
    w: &[f32],
    b: &[f32],
    d: usize,
    classes: usize,
) -> Result<(f64, f64)> {
    let n = labels.len();
    let mut hits1 = 0usize;
    let mut hits5 = 0usize;
    let chunk = EVAL_CHUNK.min(n);
    let mut z = vec![0.0f32; chunk * d]; // (chunk, d) standardized rows
    let mut logits = vec![0.0f32; chunk * classes]; // (chunk, C)
    for (xc, yc) in x.chunks(EVAL_CHUNK * d).zip(labels.chunks(EVAL_CHUNK)) {
        let rows = yc.len();
        let zc = &mut z[..rows * d];
        zc.par_chunks_mut(d)
            .zip(xc.par_chunks(d))
            .for_each(|(dst, src)| standardize_row(src, mean, inv_std, dst));
        let lg = &mut logits[..rows * classes];
        matmul_cpu(zc, w, rows, d, classes, false, true, lg, false)?;
        let ranks: Vec<usize> = lg
            .par_chunks_mut(classes)
            .zip(yc.par_iter())
            .map(|(row, &y)| {
                for (v, &bi) in row.iter_mut().zip(b) {
                    *v += bi;
                }
                label_rank(row, y as usize)
            })
            .collect();
        hits1 += ranks.iter().filter(|&&r| r < 1).count();
        hits5 += ranks.iter().filter(|&&r| r < 5).count();
    }
    Ok((hits1 as f64 / n as f64, hits5 as f64 / n as f64))
}

/// How many classes outrank class `y` in `row`: a higher score, or an equal score at a lower
/// index (the tie-break of an argmax that keeps the first maximum).
fn label_rank(row: &[f32], y: usize) -> usize {
    let s = row[y];
    row.iter()
        .enumerate()
        .filter(|&(j, &v)| v > s || (v == s && j < y))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::testutil::{randn_vec, rng};
    use rand::Rng;

    /// Mean cross-entropy of x w^T + b in f64, written directly (no gemm, no shared code).
    fn loss_f64(x: &[f64], labels: &[u32], w: &[f64], b: &[f64], d: usize, c: usize) -> f64 {
        let n = labels.len();
        let mut total = 0.0;
        for i in 0..n {
            let z: Vec<f64> = (0..c)
                .map(|k| b[k] + (0..d).map(|j| x[i * d + j] * w[k * d + j]).sum::<f64>())
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            total += lse - z[labels[i] as usize];
        }
        total / n as f64
    }

    fn to_f64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        // Odd sizes, batch > 1, logits of order 1-3 so the softmax is not uniform.
        let (bsz, d, c) = (7, 5, 6);
        let x = randn_vec(bsz * d, 1);
        let w: Vec<f32> = randn_vec(c * d, 2).iter().map(|v| v * 0.7).collect();
        let b = randn_vec(c, 3);
        let mut r = rng(4);
        let labels: Vec<u32> = (0..bsz).map(|_| r.gen_range(0..c as u32)).collect();

        let mut g = Grads::new(c, d, bsz);
        let loss = loss_and_grad(&x, &labels, &w, &b, d, c, &mut g).unwrap();
        let (x64, w64, b64) = (to_f64(&x), to_f64(&w), to_f64(&b));
        let ref_loss = loss_f64(&x64, &labels, &w64, &b64, d, c);
        assert!(
            (loss - ref_loss).abs() < 1e-5 * ref_loss.abs().max(1.0),
            "loss {loss} vs f64 reference {ref_loss}"
        );

        // Central differences in f64 (eps 1e-5: truncation ~eps^2, rounding ~1e-16/eps).
        let eps = 1e-5;
        let mut fd_w = vec![0.0f64; c * d];
        for k in 0..c * d {
            let (mut wp, mut wm) = (w64.clone(), w64.clone());
            wp[k] += eps;
            wm[k] -= eps;
            fd_w[k] = (loss_f64(&x64, &labels, &wp, &b64, d, c)
                - loss_f64(&x64, &labels, &wm, &b64, d, c))
                / (2.0 * eps);
        }
        let mut fd_b = vec![0.0f64; c];
        for k in 0..c {
            let (mut bp, mut bm) = (b64.clone(), b64.clone());
            bp[k] += eps;
            bm[k] -= eps;
            fd_b[k] = (loss_f64(&x64, &labels, &w64, &bp, d, c)
                - loss_f64(&x64, &labels, &w64, &bm, d, c))
                / (2.0 * eps);
        }
        // The analytic gradient is computed in f32: a relative error bound of 1e-4.
        for (name, got, want) in [("dw", &g.dw, &fd_w), ("db", &g.db, &fd_b)] {
            let num: f64 = got
                .iter()
                .zip(want.iter())
                .map(|(&a, &b)| (a as f64 - b).powi(2))
                .sum::<f64>()
                .sqrt();
            let den: f64 = want.iter().map(|v| v * v).sum::<f64>().sqrt();
            assert!(den > 1e-3, "{name}: degenerate reference gradient");
            assert!(num / den < 1e-4, "{name}: relative error {}", num / den);
        }
        // The bias gradient of a softmax sums to zero over the classes.
        assert!(g.db.iter().map(|&v| v as f64).sum::<f64>().abs() < 1e-6);
    }

    #[test]
    fn softmax_xent_is_stable_for_large_logits() {
        // Logits of 1e4 would overflow a naive exp in f32 and f64.
        let mut logits = vec![1e4f32, 0.0, -1e4, 1e4 - 2.0, 5.0, 1e4];
        let loss = softmax_xent_grad(&mut logits, &[0, 1], 3);
        // Row 0: label is the max, others far below: loss ~ 0. Row 1 (label 1, logit 5): loss =
        // log(e^(1e4-2) + e^5 + e^1e4) - 5 ~ 1e4 + log(1 + e^-2) - 5 ~ 9995.127.
        let want = (0.0 + (1e4 - 5.0) + (1.0f64 + (-(2.0f64)).exp()).ln()) / 2.0;
        assert!((loss - want).abs() < 1e-2, "loss {loss}, want {want}");
        assert!(logits.iter().all(|v| v.is_finite()));
    }

    /// Gaussian clusters: class k is centred at a random point of norm ~ 3 sqrt(d), spread 0.5.
    fn clusters(n: usize, d: usize, c: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let centres: Vec<f32> = randn_vec(c * d, 100).iter().map(|v| 3.0 * v).collect();
        let noise = randn_vec(n * d, seed);
        let mut r = rng(seed + 1);
        let labels: Vec<u32> = (0..n).map(|_| r.gen_range(0..c as u32)).collect();
        let mut x = vec![0.0f32; n * d];
        for i in 0..n {
            let k = labels[i] as usize;
            for j in 0..d {
                // A per-dimension offset and scale, so standardization has work to do.
                x[i * d + j] =
                    10.0 + (j as f32 + 1.0) * (centres[k * d + j] + 0.5 * noise[i * d + j]);
            }
        }
        (x, labels)
    }

    fn small_cfg() -> LinearProbeConfig {
        LinearProbeConfig {
            epochs: 20,
            batch: 32,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            seed: 7,
        }
    }

    #[test]
    fn separable_clusters_reach_full_accuracy() {
        let (d, c) = (9, 5);
        let (xtr, ytr) = clusters(301, d, c, 11);
        let (xte, yte) = clusters(199, d, c, 12);
        let rep = linear_probe(&xtr, &ytr, &xte, &yte, d, c, &small_cfg()).unwrap();
        assert!(rep.top1 >= 0.99, "top1 {}", rep.top1);
        assert_eq!(rep.top5, 1.0, "5 classes: every label is in the top 5");
        assert_eq!(rep.train_loss.len(), 20);
        // Starts at ln(5) ~ 1.61 (zero weights) in the first batch, ends near 0.
        assert!(rep.train_loss[0] < 1.61 && rep.train_loss[0] > 0.0);
        assert!(
            rep.train_loss[19] < 0.05,
            "final loss {}",
            rep.train_loss[19]
        );
        assert!(rep.train_loss[19] < rep.train_loss[0]);
    }

    #[test]
    fn random_labels_stay_near_chance_and_top5_bounds_top1() {
        // 10 classes: chance top-1 0.1, top-5 0.5. Train labels are unrelated to the features,
        // so the probe can only memorize the training set; test accuracy must stay at chance.
        let (d, c) = (16, 10);
        let xtr = randn_vec(300 * d, 21);
        let xte = randn_vec(1000 * d, 22);
        let mut r = rng(23);
        let ytr: Vec<u32> = (0..300).map(|_| r.gen_range(0..c as u32)).collect();
        let yte: Vec<u32> = (0..1000).map(|_| r.gen_range(0..c as u32)).collect();
        let rep = linear_probe(&xtr, &ytr, &xte, &yte, d, c, &small_cfg()).unwrap();
        // Binomial std over 1000 test examples: 0.0095 (top-1), 0.016 (top-5); bounds ~4-5 std.
        assert!((rep.top1 - 0.1).abs() < 0.045, "top1 {}", rep.top1);
        assert!((rep.top5 - 0.5).abs() < 0.08, "top5 {}", rep.top5);
        assert!(rep.top5 >= rep.top1);
    }

    #[test]
    fn top5_counts_more_than_top1_on_a_hard_problem() {
        // Overlapping clusters (spread larger than the gaps): top-1 well below 1, top-5 above it.
        let (d, c) = (4, 12);
        let (xtr, ytr) = clusters(400, d, c, 31);
        let (xte, yte) = clusters(300, d, c, 32);
        let noisy = |x: &[f32], s| -> Vec<f32> {
            x.iter()
                .zip(randn_vec(x.len(), s))
                .enumerate()
                .map(|(i, (&v, n))| v + 6.0 * ((i % d) as f32 + 1.0) * n)
                .collect()
        };
        let (xtr, xte) = (noisy(&xtr, 33), noisy(&xte, 34));
        let rep = linear_probe(&xtr, &ytr, &xte, &yte, d, c, &small_cfg()).unwrap();
        assert!(rep.top1 < 0.9, "top1 {}", rep.top1);
        assert!(
            rep.top1 > 1.0 / 12.0,
            "top1 {} is not above chance",
            rep.top1
        );
        assert!(rep.top5 > rep.top1, "top5 {} top1 {}", rep.top5, rep.top1);
    }

    #[test]
    fn deterministic_under_a_seed() {
        let (d, c) = (7, 6);
        let (xtr, ytr) = clusters(150, d, c, 41);
        let (xte, yte) = clusters(90, d, c, 42);
        let noisy: Vec<f32> = xtr
            .iter()
            .zip(randn_vec(xtr.len(), 43))
            .map(|(&v, n)| v + 3.0 * n)
            .collect();
        let cfg = LinearProbeConfig {
            epochs: 5,
            ..small_cfg()
        };
        let a = linear_probe(&noisy, &ytr, &xte, &yte, d, c, &cfg).unwrap();
        let b = linear_probe(&noisy, &ytr, &xte, &yte, d, c, &cfg).unwrap();
        assert_eq!(a.train_loss, b.train_loss);
        assert_eq!((a.top1, a.top5), (b.top1, b.top5));
        // Another seed shuffles differently: the per-epoch losses change.
        let other = linear_probe(
            &noisy,
            &ytr,
            &xte,
            &yte,
            d,
            c,
            &LinearProbeConfig { seed: 8, ..cfg },
        )
        .unwrap();
        assert_ne!(a.train_loss, other.train_loss);
    }

    #[test]
    fn standardization_makes_per_dimension_affine_maps_irrelevant() {
        // z-scoring with training statistics undoes any per-dimension x -> a x + c (a > 0), so
        // the probe must train the same on both versions (up to f32 rounding).
        let (d, c) = (6, 4);
        let (xtr, ytr) = clusters(120, d, c, 51);
        let (xte, yte) = clusters(80, d, c, 52);
        let noisy: Vec<f32> = xtr
            .iter()
            .zip(randn_vec(xtr.len(), 53))
            .map(|(&v, n)| v + 4.0 * n)
            .collect();
        let affine = |x: &[f32]| -> Vec<f32> {
            x.iter()
                .enumerate()
                .map(|(i, &v)| (0.01 + 3.0 * (i % d) as f32) * v - 50.0 + (i % d) as f32)
                .collect()
        };
        let cfg = LinearProbeConfig {
            epochs: 4,
            ..small_cfg()
        };
        let a = linear_probe(&noisy, &ytr, &xte, &yte, d, c, &cfg).unwrap();
        let b = linear_probe(&affine(&noisy), &ytr, &affine(&xte), &yte, d, c, &cfg).unwrap();
        for (la, lb) in a.train_loss.iter().zip(&b.train_loss) {
            assert!((la - lb).abs() < 1e-3 * la.abs().max(1.0), "{la} vs {lb}");
        }
        assert!(
            (a.top1 - b.top1).abs() <= 2.0 / 80.0,
            "{} vs {}",
            a.top1,
            b.top1
        );
    }

    #[test]
    fn label_rank_breaks_ties_toward_lower_index() {
        let row = [1.0, 3.0, 3.0, 0.5];
        assert_eq!(label_rank(&row, 1), 0);
        assert_eq!(label_rank(&row, 2), 1);
        assert_eq!(label_rank(&row, 0), 2);
        assert_eq!(label_rank(&row, 3), 3);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let cfg = small_cfg();
        let x = randn_vec(6 * 3, 1);
        let y = vec![0u32, 1, 2, 0, 1, 2];
        // Feature length does not match labels x d.
        let e = linear_probe(&x[..17], &y, &x, &y, 3, 3, &cfg).unwrap_err();
        assert!(e.to_string().contains("train features have 17"), "{e}");
        let e = linear_probe(&x, &y, &x, &y[..5], 3, 3, &cfg).unwrap_err();
        assert!(e.to_string().contains("test features"), "{e}");
        // A label out of range.
        let mut bad = y.clone();
        bad[4] = 3;
        let e = linear_probe(&x, &bad, &x, &y, 3, 3, &cfg).unwrap_err();
        assert!(e.to_string().contains("label 3 at index 4"), "{e}");
        // Empty sets, zero sizes.
        assert!(linear_probe(&[], &[], &x, &y, 3, 3, &cfg).is_err());
        assert!(linear_probe(&x, &y, &x, &y, 0, 3, &cfg).is_err());
        assert!(linear_probe(&x, &y, &x, &y, 3, 0, &cfg).is_err());
        // Non-finite features.
        let mut nan = x.clone();
        nan[5] = f32::NAN;
        let e = linear_probe(&nan, &y, &x, &y, 3, 3, &cfg).unwrap_err();
        assert!(matches!(e, Error::NonFinite(_)), "{e}");
        // Bad configurations.
        for bad in [
            LinearProbeConfig {
                batch: 0,
                ..cfg.clone()
            },
            LinearProbeConfig {
                epochs: 0,
                ..cfg.clone()
            },
            LinearProbeConfig {
                lr: -1.0,
                ..cfg.clone()
            },
            LinearProbeConfig {
                momentum: 1.0,
                ..cfg.clone()
            },
            LinearProbeConfig {
                weight_decay: f32::NAN,
                ..cfg.clone()
            },
        ] {
            let e = linear_probe(&x, &y, &x, &y, 3, 3, &bad).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{e}");
        }
    }
}
