//! Fused batch norm + ReLU (+ residual add): `bn_relu` = relu(bn(x)), `bn_add_relu` =
//! relu(bn(x) + residual), in training mode (batch statistics, the same running-statistics
//! contract as [`Tape::batch_norm_train`]) and eval mode (running statistics). One tape op each
//! instead of two or three: the forward writes only the final output (no BN output, no sum);
//! the backward masks the incoming gradient with the saved output (dy' = dy * \[y > 0\]) inside its
//! reduction and dx passes instead of materializing it.
//!
//! Passes over the activation (N, C, S), fused vs the unfused composition:
//! - train forward: statistics + apply (2; unfused: statistics + apply + relu [+ add] = 3-4);
//! - backward: one reduction pass for sum(dy') and sum(dy' * (x - mean)) (which also writes
//!   dresidual = dy'), one pass for dx (reading dresidual instead of dy and y when there is one)
//!   (2; unfused: relu mask + reduction + dx = 3).
//!
//! Saved for backward: x (for xhat, recomputed from x, mean and the variance), the output y (the
//! ReLU mask; it is the next layer's input, kept alive anyway), gamma and the per-channel
//! statistics. The numerics equal the unfused ops': the same expressions in the same order (the
//! masked reduction adds exact zeros where the unfused one adds the relu-masked zeros).

use crate::autograd::{Bf16Path, Tape};
use crate::bail;
use crate::error::Result;
use crate::ops::batchnorm::{check_channel_params, check_eps, Act, BnDims};
use crate::tensor::Tensor;

// ---------- tape ops ----------

/// Checks the residual's shape against x's.
fn check_residual(op: &str, x: &Tensor, residual: Option<&Tensor>) -> Result<()> {
    if let Some(r) = residual {
        if r.shape() != x.shape() {
            bail!(
                Shape,
                "{op}: residual must have the input's shape {:?}, got {:?}",
                x.shape(),
                r.shape()
            );
        }
    }
    Ok(())
}

/// The argument checks of a training-mode BN + ReLU (+ add): the dimensions of x, with more
/// than one value per channel.
pub(crate) fn check_bn_act_train(
    op: &str,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    eps: f32,
) -> Result<BnDims> {
    let d = BnDims::of(op, x.shape())?;
    check_channel_params(op, x, d.c, &[("gamma", gamma), ("beta", beta)])?;
    check_residual(op, x, residual)?;
    check_eps(op, eps)?;
    if d.per_channel() < 2 {
        // As PyTorch: one value per channel has no variance to normalize with.
        bail!(
            Shape,
            "{op}: expected more than 1 value per channel in training mode, got input {:?}",
            x.shape()
        );
    }
    Ok(d)
}

impl Tape {
    /// relu(batch_norm_train(x)): training-mode BN with the batch statistics, then ReLU, as one
    /// op. Returns (y, batch_mean (C,), batch_var_unbiased (C,)) exactly as
    /// [`Tape::batch_norm_train`] (the latter two for the running update, not differentiated).
    /// Backward: dx, dgamma, dbeta.
    pub fn bn_relu_train(
        &mut self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        self.bn_act_train("bn_relu_train", x, gamma, beta, None, eps)
    }

    /// relu(batch_norm_train(x) + residual) as one op (the end of a bottleneck block): the
    /// residual has x's shape. Returns (y, batch_mean, batch_var_unbiased) as
    /// [`Tape::batch_norm_train`]. Backward: dx, dgamma, dbeta, dresidual.
    pub fn bn_add_relu_train(
        &mut self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        residual: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        self.bn_act_train("bn_add_relu_train", x, gamma, beta, Some(residual), eps)
    }

    /// relu(batch_norm_eval(x)) with the running statistics, as one op; differentiable w.r.t.
    /// x, gamma, beta.
    pub fn bn_relu_eval(
        &mut self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        self.bn_act_eval(
            "bn_relu_eval",
            x,
            gamma,
            beta,
            None,
            running_mean,
            running_var,
            eps,
        )
    }

    /// relu(batch_norm_eval(x) + residual) with the running statistics, as one op;
    /// differentiable w.r.t. x, gamma, beta and the residual.
    #[allow(clippy::too_many_arguments)]
    pub fn bn_add_relu_eval(
        &mut self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        residual: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        self.bn_act_eval(
            "bn_add_relu_eval",
            x,
            gamma,
            beta,
            Some(residual),
            running_mean,
            running_var,
            eps,
        )
    }

    fn bn_act_train(
        &mut self,
        op: &'static str,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        residual: Option<&Tensor>,
        eps: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        // Bf16 mode (Tape::bf16_inputs): bf16 x and residual, f32 gamma/beta and statistics,
        // a bf16 output.
        if self.is_bf16() {
            let mut xs = vec![x];
            xs.extend(residual);
            let r = self.bf16_inputs(op, &xs, Bf16Path::Native)?;
            let (y, mean, var) =
                self.as_f32(|t| t.bn_act_train(op, &r[0], gamma, beta, r.get(1), eps))?;
            return Ok((self.bf16_output(&y)?, mean, var));
        }
        let d = check_bn_act_train(op, x, gamma, beta, residual, eps)?;
        self.bn_train(op, Act::Relu, [x, gamma, beta], residual, d, eps)
    }

    #[allow(clippy::too_many_arguments)]
    fn bn_act_eval(
        &mut self,
        op: &'static str,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        residual: Option<&Tensor>,
        running_mean: &Tensor,
        running_var: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        // Bf16 mode (Tape::bf16_inputs): bf16 x and residual, f32 gamma/beta and statistics,
        // a bf16 output.
        if self.is_bf16() {
            let mut xs = vec![x];
            xs.extend(residual);
            let r = self.bf16_inputs(op, &xs, Bf16Path::Native)?;
            let y = self.as_f32(|t| {
                t.bn_act_eval(
                    op,
                    &r[0],
                    gamma,
                    beta,
                    r.get(1),
                    running_mean,
                    running_var,
                    eps,
                )
            })?;
            return self.bf16_output(&y);
        }
        let d = BnDims::of(op, x.shape())?;
        check_channel_params(
            op,
            x,
            d.c,
            &[
                ("gamma", gamma),
                ("beta", beta),
                ("running_mean", running_mean),
                ("running_var", running_var),
            ],
        )?;
        check_residual(op, x, residual)?;
        check_eps(op, eps)?;
        let running = [running_mean, running_var];
        self.bn_eval(op, Act::Relu, [x, gamma, beta], residual, running, d, eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::batchnorm::{
        bn_act_backward_cpu, bn_act_train_forward_cpu, check_bn_train_backward_f64, BN_EPS,
    };
    use crate::testutil::{check_grad_kinks, randn};

    /// The unfused composition: relu(bn(x) [+ residual]) through the existing tape ops.
    fn unfused(
        tape: &mut Tape,
        xs: &[Tensor],
        train: bool,
        stats: Option<(&Tensor, &Tensor)>,
    ) -> (Tensor, Option<(Tensor, Tensor)>) {
        let (h, st) = if train {
            let (h, m, v) = tape
                .batch_norm_train(&xs[0], &xs[1], &xs[2], BN_EPS)
                .unwrap();
            (h, Some((m, v)))
        } else {
            let (rm, rv) = stats.unwrap();
            let h = tape
                .batch_norm_eval(&xs[0], &xs[1], &xs[2], rm, rv, BN_EPS)
                .unwrap();
            (h, None)
        };
        let h = match xs.get(3) {
            Some(r) => tape.add(&h, r).unwrap(),
            None => h,
        };
        (tape.relu(&h).unwrap(), st)
    }

    fn fused(
        tape: &mut Tape,
        xs: &[Tensor],
        train: bool,
        stats: Option<(&Tensor, &Tensor)>,
    ) -> (Tensor, Option<(Tensor, Tensor)>) {
        match (train, xs.get(3)) {
            (true, None) => {
                let (y, m, v) = tape.bn_relu_train(&xs[0], &xs[1], &xs[2], BN_EPS).unwrap();
                (y, Some((m, v)))
            }
            (true, Some(r)) => {
                let (y, m, v) = tape
                    .bn_add_relu_train(&xs[0], &xs[1], &xs[2], r, BN_EPS)
                    .unwrap();
                (y, Some((m, v)))
            }
            (false, r) => {
                let (rm, rv) = stats.unwrap();
                let y = match r {
                    None => tape.bn_relu_eval(&xs[0], &xs[1], &xs[2], rm, rv, BN_EPS),
                    Some(r) => tape.bn_add_relu_eval(&xs[0], &xs[1], &xs[2], r, rm, rv, BN_EPS),
                };
                (y.unwrap(), None)
            }
        }
    }

    fn max_rel(got: &Tensor, want: &Tensor) -> f64 {
        let (g, w) = (got.to_vec().unwrap(), want.to_vec().unwrap());
        assert_eq!(g.len(), w.len());
        g.iter()
            .zip(&w)
            .map(|(&a, &b)| (a as f64 - b as f64).abs() / (1.0 + (b as f64).abs()))
            .fold(0.0, f64::max)
    }

    /// Forward output, statistics and every gradient of the fused op against the unfused
    /// composition on random inputs (odd shapes; 4-d and 2-d; a plane above MIN_ELEMS_PER_TASK;
    /// with and without a residual; both modes). Tolerance: 1e-5 relative to 1 + |value|.
    /// The expressions are the same, so the results agree to rounding (in practice exactly).
    #[test]
    fn fused_matches_unfused_composition_forward_and_gradients() {
        let shapes: [&[usize]; 5] = [
            &[3, 5, 7, 3],
            &[5, 6],
            &[2, 3, 1, 1],
            &[2, 3, 64, 65],
            &[4, 130],
        ];
        for (si, shape) in shapes.iter().enumerate() {
            let c = shape[1];
            for residual in [false, true] {
                for train in [true, false] {
                    let seed = 100 * si as u64 + 10 * residual as u64 + train as u64;
                    // Shifted x and beta so that the ReLU cuts a non-trivial part of the output.
                    let x = randn(shape, seed);
                    let gamma = randn(&[c], seed + 1);
                    let beta = randn(&[c], seed + 2);
                    let mut xs = vec![x, gamma, beta];
                    if residual {
                        xs.push(randn(shape, seed + 3));
                    }
                    let dy = randn(shape, seed + 4);
                    let rm = randn(&[c], seed + 5);
                    let rv = Tensor::from_vec(
                        randn(&[c], seed + 6)
                            .to_vec()
                            .unwrap()
                            .iter()
                            .map(|v| 0.3 + v * v)
                            .collect(),
                        &[c],
                    )
                    .unwrap();
                    let run = |fuse: bool| {
                        let mut tape = Tape::new();
                        let leaves: Vec<Tensor> = xs.iter().map(|t| tape.track(t)).collect();
                        let (y, st) = if fuse {
                            fused(&mut tape, &leaves, train, Some((&rm, &rv)))
                        } else {
                            unfused(&mut tape, &leaves, train, Some((&rm, &rv)))
                        };
                        assert_eq!(tape.len(), if fuse { 1 } else { 2 + residual as usize });
                        let g = tape.backward_from(vec![(y.clone(), dy.clone())]).unwrap();
                        let grads: Vec<Tensor> =
                            leaves.iter().map(|l| g.get(l).unwrap().clone()).collect();
                        (y, st, grads)
                    };
                    let (yf, stf, gf) = run(true);
                    let (yu, stu, gu) = run(false);
                    let tag = format!("{shape:?} residual={residual} train={train}");
                    let yv = yf.to_vec().unwrap();
                    let zeros = yv.iter().filter(|&&v| v == 0.0).count();
                    assert!(
                        zeros > 0 && zeros < yv.len(),
                        "{tag}: the ReLU must cut some but not all ({zeros} of {})",
                        yv.len()
                    );
                    assert!(max_rel(&yf, &yu) <= 1e-5, "{tag}: y");
                    if let (Some((mf, vf)), Some((mu, vu))) = (&stf, &stu) {
                        assert!(max_rel(mf, mu) <= 1e-6, "{tag}: batch mean");
                        assert!(max_rel(vf, vu) <= 1e-6, "{tag}: batch var");
                    }
                    for (i, what) in ["dx", "dgamma", "dbeta", "dresidual"]
                        .iter()
                        .enumerate()
                        .take(xs.len())
                    {
                        let e = max_rel(&gf[i], &gu[i]);
                        assert!(e <= 1e-5, "{tag}: {what} differs by {e}");
                    }
                }
            }
        }
    }

    /// An independent f64 reference of the fused training backward, written from the chain rule
    /// (mask, then dxhat = dy' * gamma, dvar, dmean), on a shape with a residual.
    #[test]
    fn train_backward_kernel_matches_f64_chain_rule() {
        let shape = [4, 3, 2, 5];
        let d = BnDims::of("test", &shape).unwrap();
        let x = randn(&shape, 7).to_vec().unwrap();
        let res = randn(&shape, 8).to_vec().unwrap();
        let dy = randn(&shape, 9).to_vec().unwrap();
        let gamma = randn(&[3], 10).to_vec().unwrap();
        let beta = randn(&[3], 11).to_vec().unwrap();
        let (mut mean, mut var) = (vec![0.0; 3], vec![0.0; 3]);
        let mut y = vec![0.0; d.numel()];
        bn_act_train_forward_cpu(
            &x,
            Some(&res),
            &gamma,
            &beta,
            d,
            BN_EPS,
            &mut y,
            &mut mean,
            &mut var,
        )
        .unwrap();
        let n = d.numel();
        let (mut dx, mut dr, mut dg, mut db) =
            (vec![0.0; n], vec![0.0; n], vec![0.0; 3], vec![0.0; 3]);
        bn_act_backward_cpu(
            true,
            &x,
            &y,
            &dy,
            &gamma,
            &mean,
            &var,
            d,
            BN_EPS,
            &mut dx,
            Some(&mut dr),
            &mut dg,
            &mut db,
        )
        .unwrap();
        // The forward in f64 decides the mask: per-channel statistics, then the pre-activation.
        let m = d.per_channel() as f64;
        let stats: Vec<(f64, f64)> = (0..d.c)
            .map(|ch| {
                let ks = (0..d.n).flat_map(|i| (0..d.s).map(move |j| (i * d.c + ch) * d.s + j));
                let mu = ks.clone().map(|k| x[k] as f64).sum::<f64>() / m;
                let var = ks.map(|k| (x[k] as f64 - mu).powi(2)).sum::<f64>() / m;
                (mu, 1.0 / (var + BN_EPS as f64).sqrt())
            })
            .collect();
        let pre = |k: usize| {
            let ch = (k / d.s) % d.c;
            let (mu, istd) = stats[ch];
            (x[k] as f64 - mu) * istd * gamma[ch] as f64 + beta[ch] as f64 + res[k] as f64
        };
        let dyp = |k: usize| if pre(k) > 0.0 { dy[k] as f64 } else { 0.0 };
        for k in 0..n {
            assert!((y[k] as f64 - pre(k).max(0.0)).abs() < 1e-5 * (1.0 + pre(k).abs()));
            assert_eq!(dr[k] as f64, dyp(k), "dresidual[{k}]");
        }
        check_bn_train_backward_f64(&x, dyp, &gamma, d, &dx, &dg, &db);
    }

    // Finite differences: step 3e-3 (BN's outputs are O(1) and their f32 rounding limits a
    // smaller step; batchnorm.rs's checks pass at 1e-3), relative bound 1e-2, with the kink
    // detector of check_grad_kinks: an element whose own output sits within a step of the
    // ReLU's kink is left out (at most 10% of the elements may be).

    #[test]
    fn bn_add_relu_train_matches_finite_differences() {
        let shape = [3, 4, 3, 3];
        let xs = [
            randn(&shape, 21),
            randn(&[4], 22),
            randn(&[4], 23),
            randn(&shape, 24),
        ];
        check_grad_kinks(&xs, 1e-2, 3e-3, 0.1, |tape, v| {
            Ok(tape
                .bn_add_relu_train(&v[0], &v[1], &v[2], &v[3], BN_EPS)?
                .0)
        })
        .unwrap();
    }

    #[test]
    fn bn_relu_train_and_eval_match_finite_differences() {
        let xs = [randn(&[5, 6], 25), randn(&[6], 26), randn(&[6], 27)];
        check_grad_kinks(&xs, 1e-2, 3e-3, 0.1, |tape, v| {
            Ok(tape.bn_relu_train(&v[0], &v[1], &v[2], BN_EPS)?.0)
        })
        .unwrap();
        let shape = [2, 3, 2, 3];
        let xs = [
            randn(&shape, 28),
            randn(&[3], 29),
            randn(&[3], 30),
            randn(&shape, 31),
        ];
        let rm = randn(&[3], 32);
        let rv = Tensor::from_vec(vec![0.7, 1.3, 2.0], &[3]).unwrap();
        check_grad_kinks(&xs, 1e-2, 3e-3, 0.1, |tape, v| {
            tape.bn_add_relu_eval(&v[0], &v[1], &v[2], &v[3], &rm, &rv, BN_EPS)
        })
        .unwrap();
    }

    #[test]
    fn shape_errors_name_the_op() {
        let x = randn(&[2, 3, 4, 4], 1);
        let g = randn(&[3], 2);
        let e = Tape::no_grad()
            .bn_add_relu_train(&x, &g, &g, &randn(&[2, 3, 4, 5], 3), BN_EPS)
            .unwrap_err();
        assert!(e.to_string().contains("bn_add_relu_train"), "{e}");
        assert!(e.to_string().contains("residual"), "{e}");
        let e = Tape::no_grad()
            .bn_relu_train(&x, &randn(&[4], 2), &g, BN_EPS)
            .unwrap_err();
        assert!(e.to_string().contains("gamma"), "{e}");
        assert!(Tape::no_grad()
            .bn_relu_train(&randn(&[1, 3], 3), &g, &g, BN_EPS)
            .is_err());
        assert!(Tape::no_grad()
            .bn_relu_eval(&x, &g, &g, &g, &randn(&[2], 4), BN_EPS)
            .is_err());
    }

    /// Process CPU time (user + system) in seconds, from /proc/self/stat (10 ms ticks): on a
    /// shared machine it moves less with other jobs' load than wall time.
    fn cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the ")" that closes the command name: utime and stime are the 12th and
        // 13th of them.
        let rest = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<f64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse().ok())
            .collect();
        f.iter().sum::<f64>() / 100.0
    }

    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn time_fused_vs_unfused() {
        // tiny's layer1 activation at batch 128 x 2 views (256, 32, 32, 32), with a residual
        // (a block's last BN) and without; forward + backward, fused vs unfused alternating,
        // min wall time and mean process CPU time over the repetitions.
        let shape = [256, 32, 32, 32];
        let c = shape[1];
        let xs = [
            randn(&shape, 1),
            randn(&[c], 2),
            randn(&[c], 3),
            randn(&shape, 4),
        ];
        let dy = randn(&shape, 5);
        for residual in [false, true] {
            let inputs = &xs[..if residual { 4 } else { 3 }];
            let reps = 7;
            // [fused, unfused] x [forward, backward]: min wall, mean CPU.
            let mut wall = [[f64::MAX; 2]; 2];
            let mut cpu = [[0.0; 2]; 2];
            for _ in 0..reps {
                for (k, fuse) in [true, false].into_iter().enumerate() {
                    let (t, c0) = (std::time::Instant::now(), cpu_seconds());
                    let mut tape = Tape::new();
                    let leaves: Vec<Tensor> = inputs.iter().map(|v| tape.track(v)).collect();
                    let (y, _) = if fuse {
                        fused(&mut tape, &leaves, true, None)
                    } else {
                        unfused(&mut tape, &leaves, true, None)
                    };
                    let (t1, c1) = (t.elapsed().as_secs_f64(), cpu_seconds());
                    tape.backward_from(vec![(y, dy.clone())]).unwrap();
                    let (t2, c2) = (t.elapsed().as_secs_f64(), cpu_seconds());
                    wall[k][0] = wall[k][0].min(t1);
                    wall[k][1] = wall[k][1].min(t2 - t1);
                    cpu[k][0] += (c1 - c0) / reps as f64;
                    cpu[k][1] += (c2 - c1) / reps as f64;
                }
            }
            let name = if residual { "bn_add_relu" } else { "bn_relu" };
            for (k, what) in ["fused", "unfused"].iter().enumerate() {
                println!(
                    "{name} train {shape:?} {what}: forward {:.1} ms wall (min), {:.0} ms CPU; \
                     backward {:.1} ms wall, {:.0} ms CPU",
                    wall[k][0] * 1e3,
                    cpu[k][0] * 1e3,
                    wall[k][1] * 1e3,
                    cpu[k][1] * 1e3
                );
            }
        }
    }
}
