//! LARS (You et al. 2017), as the reference code's `utils.LARS` (from Barlow Twins) and SPEC.md:
//! momentum 0.9, trust coefficient 0.001, no Nesterov. For a tensor with more than one dimension:
//! `g' = g + wd*w; q = trust*||w||/||g'||` (q = 1 when either norm is 0); `g' *= q`. 1-d tensors
//! (biases, BN gamma/beta) get neither weight decay nor adaptation: `g' = g`. Then
//! `mu = momentum*mu + g'; w -= lr*mu`. The trust ratio is per tensor (the whole prototype matrix
//! is one tensor).

use rayon::prelude::*;

use crate::bail;
use crate::error::Result;
use crate::nn::params::ParamStore;

/// Elements per rayon task in the norm and update passes.
const LARS_CHUNK: usize = 1 << 15;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LarsConfig {
    pub momentum: f32,
    pub trust_coef: f32,
    pub weight_decay: f32,
}

impl Default for LarsConfig {
    /// The seed paper's values (SPEC.md): momentum 0.9, trust 0.001, weight decay 1e-6.
    fn default() -> Self {
        LarsConfig {
            momentum: 0.9,
            trust_coef: 0.001,
            weight_decay: 1e-6,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Lars {
    pub cfg: LarsConfig,
    /// The momentum `mu`, same layout as the store's `data` (saved in checkpoints).
    pub momentum_buf: Vec<f32>,
}

/// Sum of squares in f64, deterministic: fixed chunks, partials added in order.
fn sum_sq(xs: &[f32]) -> f64 {
    let partial: Vec<f64> = xs
        .par_chunks(LARS_CHUNK)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .collect();
    partial.iter().sum()
}

/// `||g + wd*w||^2` without materializing g + wd*w (as it is rounded to f32 in the update).
fn sum_sq_decayed(g: &[f32], w: &[f32], wd: f32) -> f64 {
    let partial: Vec<f64> = g
        .par_chunks(LARS_CHUNK)
        .zip(w.par_chunks(LARS_CHUNK))
        .map(|(g, w)| {
            g.iter()
                .zip(w)
                .map(|(&g, &w)| {
                    let v = (g + wd * w) as f64;
                    v * v
                })
                .sum::<f64>()
        })
        .collect();
    partial.iter().sum()
}

impl Lars {
    pub fn new(cfg: LarsConfig, numel: usize) -> Lars {
        Lars {
            cfg,
            momentum_buf: vec![0.0; numel],
        }
    }

    /// The trust ratio and weight decay LARS applies to one tensor: `(q, wd)`; `(1, 0)` for 1-d.
    pub fn tensor_scale(&self, is_1d: bool, w: &[f32], g: &[f32]) -> (f32, f32) {
        if is_1d {
            return (1.0, 0.0);
        }
        let wd = self.cfg.weight_decay;
        self.scale_from_norms(false, sum_sq(w), sum_sq_decayed(g, w, wd))
    }

    /// [`Lars::tensor_scale`] from pass 1's squared norms `||w||^2` and `||g + wd w||^2`.
    pub fn scale_from_norms(&self, is_1d: bool, w_sq: f64, g_sq: f64) -> (f32, f32) {
        if is_1d {
            return (1.0, 0.0);
        }
        let (w_norm, g_norm) = (w_sq.sqrt(), g_sq.sqrt());
        let q = if !w_norm.is_finite() || !g_norm.is_finite() {
            // Reported by the step's guard (a NaN would otherwise fall through to the ratio-1
            // case).
            f32::NAN
        } else if w_norm > 0.0 && g_norm > 0.0 {
            (self.cfg.trust_coef as f64 * w_norm / g_norm) as f32
        } else {
            1.0
        };
        (q, self.cfg.weight_decay)
    }

    /// One update over the flat store: uses store.entries (is_1d, range), store.data, store.grad.
    /// Pass 1 ([`lars_norms`]) then pass 2 ([`Lars::update_from_norms`]), as the training step
    /// runs them with its NaN guard in between.
    pub fn step(&mut self, store: &mut ParamStore, lr: f32) -> Result<()> {
        let norms = lars_norms(store, self.cfg.weight_decay)?;
        self.update_from_norms(store, &norms, lr)
    }

    /// LARS pass 2 with the norms of pass 1: per entry `g' = (g + wd w) q`, `mu = momentum mu +
    /// g'`, `w -= lr mu` (the CPU twin of the GPU's `lars_update_f32`). An error, before any
    /// value changes, when a trust ratio is not finite.
    pub fn update_from_norms(
        &mut self,
        store: &mut ParamStore,
        norms: &LarsNorms,
        lr: f32,
    ) -> Result<()> {
        let n = store.data.len();
        if store.grad.len() != n || self.momentum_buf.len() != n {
            bail!(
                Shape,
                "lars: store has {n} values and {} gradients, momentum buffer {}",
                store.grad.len(),
                self.momentum_buf.len()
            );
        }
        if norms.w_sq.len() != store.len() || norms.g_sq.len() != store.len() {
            bail!(
                Shape,
                "lars: norms of {} entries for a store of {}",
                norms.w_sq.len(),
                store.len()
            );
        }
        if !lr.is_finite() {
            bail!(NonFinite, "lars: learning rate {lr}");
        }
        let scales: Vec<(f32, f32)> = store
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| self.scale_from_norms(e.is_1d(), norms.w_sq[i], norms.g_sq[i]))
            .collect();
        if let Some((e, (q, _))) = store
            .entries
            .iter()
            .zip(&scales)
            .find(|(_, (q, _))| !q.is_finite())
        {
            bail!(
                NonFinite,
                "lars: trust ratio of {} is {q} (non-finite weights or gradients)",
                e.name
            );
        }
        let momentum = self.cfg.momentum;
        for (e, &(q, wd)) in store.entries.iter().zip(&scales) {
            let r = e.range();
            let w = &mut store.data[r.clone()];
            let g = &store.grad[r.clone()];
            let mu = &mut self.momentum_buf[r];
            w.par_chunks_mut(LARS_CHUNK)
                .zip(mu.par_chunks_mut(LARS_CHUNK))
                .zip(g.par_chunks(LARS_CHUNK))
                .for_each(|((w, mu), g)| {
                    for i in 0..w.len() {
                        let gp = (g[i] + wd * w[i]) * q;
                        mu[i] = momentum * mu[i] + gp;
                        w[i] -= lr * mu[i];
                    }
                });
        }
        Ok(())
    }
}

/// LARS pass 1 per entry of a store, in layout order, with the training step's NaN guard fused
/// in: what the GPU's `lars_norms_f32_checked` (kernels/lars.cu) leaves in its statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct LarsNorms {
    /// `||w||^2` (0 for 1-d entries, which LARS does not adapt).
    pub w_sq: Vec<f64>,
    /// `||g + wd w||^2` (0 for 1-d entries).
    pub g_sq: Vec<f64>,
    /// How many gradient values are NaN or +-inf (every entry).
    pub non_finite: Vec<usize>,
}

/// LARS pass 1 over `store` (its data and grad) with weight decay `wd`: the CPU twin of the
/// GPU's `lars_norms_f32_checked`, in f64 with fixed chunks (deterministic).
pub fn lars_norms(store: &ParamStore, wd: f32) -> Result<LarsNorms> {
    let n = store.data.len();
    if store.grad.len() != n {
        bail!(
            Shape,
            "lars: store has {n} values and {} gradients",
            store.grad.len()
        );
    }
    let mut norms = LarsNorms {
        w_sq: Vec::with_capacity(store.len()),
        g_sq: Vec::with_capacity(store.len()),
        non_finite: Vec::with_capacity(store.len()),
    };
    for e in &store.entries {
        let r = e.range();
        if r.end > n {
            bail!(
                Shape,
                "lars: parameter {} spans {:?} beyond the store's {n} values",
                e.name,
                r
            );
        }
        let (w, g) = (&store.data[r.clone()], &store.grad[r]);
        let (w_sq, g_sq) = if e.is_1d() {
            (0.0, 0.0)
        } else {
            (sum_sq(w), sum_sq_decayed(g, w, wd))
        };
        norms.w_sq.push(w_sq);
        norms.g_sq.push(g_sq);
        norms.non_finite.push(
            g.par_chunks(LARS_CHUNK)
                .map(|c| c.iter().filter(|v| !v.is_finite()).count())
                .sum(),
        );
    }
    Ok(norms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn_vec;

    /// The update restated literally in f64, one tensor at a time.
    fn reference_step(
        entries: &[(Vec<usize>, usize)], // (shape, offset)
        w: &mut [f64],
        g: &[f64],
        mu: &mut [f64],
        cfg: LarsConfig,
        lr: f64,
    ) {
        for (shape, off) in entries {
            let len: usize = shape.iter().product();
            let r = *off..*off + len;
            let mut gp: Vec<f64> = g[r.clone()].to_vec();
            if shape.len() > 1 {
                for (gp, w) in gp.iter_mut().zip(&w[r.clone()]) {
                    *gp += cfg.weight_decay as f64 * w;
                }
                let wn = w[r.clone()].iter().map(|v| v * v).sum::<f64>().sqrt();
                let gn = gp.iter().map(|v| v * v).sum::<f64>().sqrt();
                let q = if wn > 0.0 && gn > 0.0 {
                    cfg.trust_coef as f64 * wn / gn
                } else {
                    1.0
                };
                gp.iter_mut().for_each(|v| *v *= q);
            }
            for (i, j) in r.enumerate() {
                mu[j] = cfg.momentum as f64 * mu[j] + gp[i];
                w[j] -= lr * mu[j];
            }
        }
    }

    #[test]
    fn matches_literal_update_over_steps() {
        let mut store = ParamStore::new();
        // A conv weight, a bias (1-d), a zero-weight matrix (ratio 1), a zero-grad matrix
        // (ratio 1), a BN gamma (1-d), and a large odd-sized matrix spanning several chunks.
        let shapes: Vec<(&str, Vec<usize>)> = vec![
            ("conv.weight", vec![4, 3, 3, 3]),
            ("conv.bias", vec![4]),
            ("zero_w.weight", vec![5, 7]),
            ("zero_g.weight", vec![3, 11]),
            ("bn.weight", vec![9]),
            ("big.weight", vec![257, 301]),
        ];
        for (i, (name, shape)) in shapes.iter().enumerate() {
            let n: usize = shape.iter().product();
            let v = if *name == "zero_w.weight" {
                vec![0.0; n]
            } else {
                randn_vec(n, 10 + i as u64)
            };
            store.add(name, shape, v).unwrap();
        }
        // A weight decay large enough to matter against the gradients.
        let cfg = LarsConfig {
            momentum: 0.9,
            trust_coef: 0.001,
            weight_decay: 0.05,
        };
        let mut lars = Lars::new(cfg, store.numel());
        let entries: Vec<(Vec<usize>, usize)> = store
            .entries
            .iter()
            .map(|e| (e.shape.clone(), e.offset))
            .collect();
        let mut w: Vec<f64> = store.data.iter().map(|&v| v as f64).collect();
        let mut mu = vec![0.0f64; w.len()];
        let zg = store.entry(store.id("zero_g.weight").unwrap()).range();
        let zw = store.entry(store.id("zero_w.weight").unwrap()).range();
        for step in 0..4 {
            let mut g = randn_vec(store.numel(), 100 + step);
            // Zero gradient: g' = wd*w alone sets the ratio (q = trust/wd).
            g[zg.clone()].iter_mut().for_each(|v| *v = 0.0);
            if step == 0 {
                // Zero weights and zero gradient: ||w|| = ||g'|| = 0 -> ratio 1, mu stays 0;
                // at later steps zero weights with a gradient: ratio 1 (not 0).
                g[zw.clone()].iter_mut().for_each(|v| *v = 0.0);
            }
            store.grad.copy_from_slice(&g);
            let lr = 0.6 - 0.1 * step as f32;
            lars.step(&mut store, lr).unwrap();
            let gd: Vec<f64> = g.iter().map(|&v| v as f64).collect();
            reference_step(&entries, &mut w, &gd, &mut mu, cfg, lr as f64);
            for i in 0..w.len() {
                let tol = 1e-5 * (1.0 + w[i].abs());
                assert!(
                    (store.data[i] as f64 - w[i]).abs() < tol,
                    "step {step} i {i}: {} vs {}",
                    store.data[i],
                    w[i]
                );
                assert!((lars.momentum_buf[i] as f64 - mu[i]).abs() < 1e-5 * (1.0 + mu[i].abs()));
            }
        }
        // The zero-weight tensor got a gradient step with ratio 1 (not 0) after step 0.
        assert!(store.data[zw].iter().any(|&v| v != 0.0));
    }

    #[test]
    fn ratio_rules_and_1d_exclusion() {
        let cfg = LarsConfig {
            momentum: 0.9,
            trust_coef: 0.001,
            weight_decay: 0.1,
        };
        let lars = Lars::new(cfg, 0);
        let w = [3.0f32, 4.0]; // ||w|| = 5
        let g = [0.0f32, 0.0];
        // g' = wd*w = (0.3, 0.4), ||g'|| = 0.5 -> q = 0.001*5/0.5 = 0.01.
        let (q, wd) = lars.tensor_scale(false, &w, &g);
        assert!((q - 0.01).abs() < 1e-8 && wd == 0.1);
        // Zero weights: ratio 1.
        assert_eq!(lars.tensor_scale(false, &[0.0, 0.0], &[1.0, 2.0]).0, 1.0);
        // Zero weights and zero grads: ratio 1.
        assert_eq!(lars.tensor_scale(false, &[0.0, 0.0], &[0.0, 0.0]).0, 1.0);
        // Zero gradient without weight decay: ||g'|| = 0 -> ratio 1 (not inf), and a step
        // leaves the weights as they are (no 0 * inf = NaN).
        let no_wd = Lars::new(
            LarsConfig {
                weight_decay: 0.0,
                ..cfg
            },
            2,
        );
        assert_eq!(no_wd.tensor_scale(false, &w, &g).0, 1.0);
        let mut store = ParamStore::new();
        store.add("w", &[1, 2], w.to_vec()).unwrap();
        let mut no_wd = no_wd;
        no_wd.step(&mut store, 0.5).unwrap();
        assert_eq!(store.data, w.to_vec());
        // 1-d: no adaptation, no weight decay.
        assert_eq!(lars.tensor_scale(true, &w, &[1.0, 1.0]), (1.0, 0.0));

        // A 1-d step is plain momentum SGD: w -= lr*(0.9*mu + g).
        let mut store = ParamStore::new();
        store.add("b", &[2], vec![1.0, -2.0]).unwrap();
        let mut lars = Lars::new(cfg, 2);
        store.grad.copy_from_slice(&[0.5, 0.25]);
        lars.step(&mut store, 0.1).unwrap();
        assert_eq!(store.data, vec![1.0 - 0.1 * 0.5, -2.0 - 0.1 * 0.25]);
        lars.step(&mut store, 0.1).unwrap();
        let mu = [0.9 * 0.5 + 0.5, 0.9 * 0.25 + 0.25];
        assert!((store.data[0] - (0.95 - 0.1 * mu[0])).abs() < 1e-7);
        assert!((store.data[1] - (-2.025 - 0.1 * mu[1])).abs() < 1e-7);
    }

    #[test]
    fn pass_one_norms_and_non_finite_counts_match_f64() {
        let mut store = ParamStore::new();
        store
            .add("a.weight", &[37, 1200], randn_vec(37 * 1200, 1))
            .unwrap();
        store.add("a.bias", &[37], randn_vec(37, 2)).unwrap();
        store.add("b.weight", &[5, 3], randn_vec(15, 3)).unwrap();
        store.grad = randn_vec(store.numel(), 4);
        let wd = 0.05;
        let norms = lars_norms(&store, wd).unwrap();
        for (i, e) in store.entries.iter().enumerate() {
            let r = e.range();
            let (w, g) = (&store.data[r.clone()], &store.grad[r]);
            let want_w: f64 = w.iter().map(|&v| (v as f64).powi(2)).sum();
            let want_g: f64 = g
                .iter()
                .zip(w)
                .map(|(&g, &w)| (g as f64 + wd as f64 * w as f64).powi(2))
                .sum();
            if e.is_1d() {
                assert_eq!((norms.w_sq[i], norms.g_sq[i]), (0.0, 0.0), "{}", e.name);
            } else {
                assert!((norms.w_sq[i] - want_w).abs() < 1e-9 * want_w, "{}", e.name);
                assert!((norms.g_sq[i] - want_g).abs() < 1e-6 * want_g, "{}", e.name);
            }
            assert_eq!(norms.non_finite[i], 0);
        }
        // Non-finite gradients are counted per entry, 1-d entries included.
        let a = store.entry(store.id("a.weight").unwrap()).range();
        let b = store.entry(store.id("a.bias").unwrap()).range();
        store.grad[a.start + 40_000] = f32::NAN;
        store.grad[a.start + 3] = f32::NEG_INFINITY;
        store.grad[b.start + 36] = f32::INFINITY;
        let norms = lars_norms(&store, wd).unwrap();
        assert_eq!(norms.non_finite, vec![2, 1, 0]);
        assert!(!norms.g_sq[0].is_finite() && norms.g_sq[2].is_finite());
        // Pass 2 refuses the non-finite trust ratio before any value changes.
        let before = store.data.clone();
        let mut lars = Lars::new(LarsConfig::default(), store.numel());
        assert!(lars.update_from_norms(&mut store, &norms, 0.1).is_err());
        assert_eq!(store.data, before);
    }

    #[test]
    fn errors_on_bad_sizes() {
        let mut store = ParamStore::new();
        store.add("w", &[2, 2], vec![1.0; 4]).unwrap();
        let mut lars = Lars::new(LarsConfig::default(), 3);
        assert!(lars.step(&mut store, 0.1).is_err());
        let mut lars = Lars::new(LarsConfig::default(), 4);
        store.grad[0] = f32::NAN;
        assert!(lars.step(&mut store, 0.1).is_err());
    }
}
