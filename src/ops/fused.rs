//! Fused batch norm + ReLU (+ residual add): `bn_relu` = relu(bn(x)), `bn_add_relu` =
//! relu(bn(x) + residual), in training mode (batch statistics, the same running-statistics
//! contract as [`Tape::batch_norm_train`]) and eval mode (running statistics). One tape op each
//! instead of two or three: the forward writes only the final output (no BN output, no sum);
//! the backward masks the incoming gradient with the saved output (dy' = dy * [y > 0]) inside its
//! reduction and dx passes instead of materializing it.
//!
//! Passes over the activation (N, C, S), fused vs the unfused composition:
//! - train forward: statistics + apply (2; unfused: statistics + apply + relu [+ add] = 3-4);
//! - backward: one reduction pass for sum(dy') and sum(dy' * (x - mean)), one pass for dx (and
//!   dresidual = dy', written by the same pass) (2; unfused: relu mask + reduction + dx = 3).
//!
//! Saved for backward: x (for xhat, recomputed from x, mean and the variance), the output y (the
//! ReLU mask; it is the next layer's input, kept alive anyway), gamma and the per-channel
//! statistics. The numerics equal the unfused ops': the same expressions in the same order (the
//! masked reduction adds exact zeros where the unfused one adds the relu-masked zeros).

use rayon::prelude::*;

use crate::autograd::Tape;
use crate::bail;
use crate::error::Result;
use crate::ops::batchnorm::{
    batch_norm_stats_cpu, bn_backward_coefs, bn_scale, channel_sums2, check_channel_params,
    check_eps, check_len, for_each_plane, BnDims, LANES, MIN_ELEMS_PER_TASK,
};
use crate::tensor::Tensor;

// ---------- CPU reference kernels ----------

/// y = max((x - mean) / sqrt(var + eps) * gamma + beta [+ residual], 0), per channel: x,
/// residual, y (N, C, S); gamma, beta, mean, var (C,). Training mode passes the batch statistics
/// (biased variance), eval mode the running ones.
#[allow(clippy::too_many_arguments)] // a kernel signature: every buffer is explicit
pub fn bn_act_apply_cpu(
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    d: BnDims,
    eps: f32,
    y: &mut [f32],
) -> Result<()> {
    let op = "bn_act_apply_cpu";
    check_len(op, "x", x.len(), d.numel())?;
    check_len(op, "y", y.len(), d.numel())?;
    if let Some(r) = residual {
        check_len(op, "residual", r.len(), d.numel())?;
    }
    for (what, v) in [
        ("gamma", gamma),
        ("beta", beta),
        ("mean", mean),
        ("var", var),
    ] {
        check_len(op, what, v.len(), d.c)?;
    }
    // Centered, as batch_norm_apply_cpu (not folded to x * scale + shift): the result then
    // equals the unfused bn -> add -> relu bit for bit, and the pass is memory bound anyway.
    let scale = bn_scale(gamma, var, eps);
    for_each_plane(y, d, |ch, p, plane| {
        let (sc, mu, b) = (scale[ch], mean[ch], beta[ch]);
        let r = p * d.s..(p + 1) * d.s;
        match residual {
            Some(res) => {
                for ((y, &x), &s) in plane.iter_mut().zip(&x[r.clone()]).zip(&res[r]) {
                    *y = ((x - mu) * sc + b + s).max(0.0);
                }
            }
            None => {
                for (y, &x) in plane.iter_mut().zip(&x[r]) {
                    *y = ((x - mu) * sc + b).max(0.0);
                }
            }
        }
    });
    Ok(())
}

/// Training-mode forward: batch statistics into mean (C,) and var (C,) (biased), then
/// [`bn_act_apply_cpu`] into y (N, C, S).
#[allow(clippy::too_many_arguments)] // a kernel signature: every buffer is explicit
pub fn bn_act_train_forward_cpu(
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    d: BnDims,
    eps: f32,
    y: &mut [f32],
    mean: &mut [f32],
    var: &mut [f32],
) -> Result<()> {
    batch_norm_stats_cpu(x, d, mean, var)?;
    bn_act_apply_cpu(x, residual, gamma, beta, mean, var, d, eps, y)
}

/// (sum(dy'), sum(dy' * (x - k))) with dy' = dy where y > 0, else 0, in f64 lanes.
fn masked_dot_sums(dy: &[f32], y: &[f32], x: &[f32], k: f32) -> (f64, f64) {
    let k = k as f64;
    let mut s1 = [0.0f64; LANES];
    let mut s2 = [0.0f64; LANES];
    let (gc, yc, xc) = (
        dy.chunks_exact(LANES),
        y.chunks_exact(LANES),
        x.chunks_exact(LANES),
    );
    let (gr, yr, xr) = (gc.remainder(), yc.remainder(), xc.remainder());
    for ((cg, cy), cx) in gc.zip(yc).zip(xc) {
        for l in 0..LANES {
            let u = if cy[l] > 0.0 { cg[l] as f64 } else { 0.0 };
            s1[l] += u;
            s2[l] += u * (cx[l] as f64 - k);
        }
    }
    let (mut t1, mut t2) = (s1.iter().sum::<f64>(), s2.iter().sum::<f64>());
    for ((&g, &yv), &xv) in gr.iter().zip(yr).zip(xr) {
        let u = if yv > 0.0 { g as f64 } else { 0.0 };
        t1 += u;
        t2 += u * (xv as f64 - k);
    }
    (t1, t2)
}

/// Backward of [`bn_act_apply_cpu`]'s output y: x, y, dy, dx, dresidual (N, C, S); gamma, mean,
/// var (C,) as the forward used them; outputs dgamma, dbeta (C,). With dy' = dy * [y > 0]:
/// dbeta = sum(dy'), dgamma = sum(dy' * xhat), dresidual = dy' (when given), and dx the BN
/// backward of dy' - with `batch_stats` (training mode) the full batch-statistics backward,
/// without it (eval mode, constant running statistics) dx = dy' * gamma / sqrt(var + eps).
/// Two passes: the masked reductions, then dx (and dresidual).
#[allow(clippy::too_many_arguments)] // a kernel signature: every buffer is explicit
pub fn bn_act_backward_cpu(
    batch_stats: bool,
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    d: BnDims,
    eps: f32,
    dx: &mut [f32],
    dresidual: Option<&mut [f32]>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    let op = "bn_act_backward_cpu";
    for (what, len) in [
        ("x", x.len()),
        ("y", y.len()),
        ("dy", dy.len()),
        ("dx", dx.len()),
    ] {
        check_len(op, what, len, d.numel())?;
    }
    if let Some(r) = &dresidual {
        check_len(op, "dresidual", r.len(), d.numel())?;
    }
    for (what, len) in [
        ("gamma", gamma.len()),
        ("mean", mean.len()),
        ("var", var.len()),
        ("dgamma", dgamma.len()),
        ("dbeta", dbeta.len()),
    ] {
        check_len(op, what, len, d.c)?;
    }
    let m = d.per_channel();
    if m == 0 {
        bail!(Shape, "{op}: no elements per channel");
    }
    let mut sums = vec![(0.0, 0.0); d.c];
    channel_sums2(
        d,
        |ch, r| masked_dot_sums(&dy[r.clone()], &y[r.clone()], &x[r], mean[ch]),
        &mut sums,
    );
    let coef = bn_backward_coefs(batch_stats, &sums, gamma, var, m, eps, dgamma, dbeta);
    // dx = a * dy' + b * (x - mean) + c per channel (bn_backward_coefs), dresidual = dy'.
    let plane = |ch: usize, p: usize, dxp: &mut [f32], mut drp: Option<&mut [f32]>| {
        let (a, b, c) = coef[ch];
        let mu = mean[ch];
        let r = p * d.s..(p + 1) * d.s;
        let (dyp, yp, xp) = (&dy[r.clone()], &y[r.clone()], &x[r]);
        for j in 0..dxp.len() {
            let g = if yp[j] > 0.0 { dyp[j] } else { 0.0 };
            dxp[j] = a * g + b * (xp[j] - mu) + c;
            if let Some(dr) = drp.as_deref_mut() {
                dr[j] = g;
            }
        }
    };
    match dresidual {
        None => for_each_plane(dx, d, |ch, p, dxp| plane(ch, p, dxp, None)),
        Some(dr) => for_each_plane_pair(dx, dr, d, |ch, p, a, b| plane(ch, p, a, Some(b))),
    }
    Ok(())
}

/// [`for_each_plane`] over two buffers of the same (N, C, S) layout at once:
/// `f(channel, plane_index, plane_of_a, plane_of_b)`.
fn for_each_plane_pair(
    a: &mut [f32],
    b: &mut [f32],
    d: BnDims,
    f: impl Fn(usize, usize, &mut [f32], &mut [f32]) + Sync + Send,
) {
    if d.s == 0 || d.c == 0 {
        return;
    }
    if d.s >= MIN_ELEMS_PER_TASK {
        a.par_chunks_mut(d.s)
            .zip(b.par_chunks_mut(d.s))
            .enumerate()
            .for_each(|(p, (pa, pb))| f(p % d.c, p, pa, pb));
    } else {
        let min_len = (MIN_ELEMS_PER_TASK / (d.c * d.s)).max(1);
        a.par_chunks_mut(d.c * d.s)
            .zip(b.par_chunks_mut(d.c * d.s))
            .enumerate()
            .with_min_len(min_len)
            .for_each(|(i, (sa, sb))| {
                for (ch, (pa, pb)) in sa.chunks_mut(d.s).zip(sb.chunks_mut(d.s)).enumerate() {
                    f(ch, i * d.c + ch, pa, pb);
                }
            });
    }
}

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

/// The recorded inputs and the closure of either mode's backward: gradients for x, gamma, beta
/// (and the residual when there is one).
#[allow(clippy::too_many_arguments)]
fn record_cpu_backward(
    tape: &mut Tape,
    op: &'static str,
    batch_stats: bool,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    y: &Tensor,
    mean: Vec<f32>,
    var: Vec<f32>,
    d: BnDims,
    eps: f32,
) {
    if !tape.is_recording() {
        return;
    }
    let mut inputs = vec![x, gamma, beta];
    inputs.extend(residual);
    let (sx, sy, sg) = (x.clone(), y.clone(), gamma.clone());
    let with_residual = residual.is_some();
    tape.record(op, y, &inputs, move |dy| {
        dy.expect_shape(&format!("{op} backward dy"), sx.shape())?;
        let mut dx = vec![0.0; d.numel()]; // (N, C, S)
        let mut dres = if with_residual {
            vec![0.0; d.numel()] // (N, C, S)
        } else {
            Vec::new()
        };
        let mut dgamma = vec![0.0; d.c];
        let mut dbeta = vec![0.0; d.c];
        bn_act_backward_cpu(
            batch_stats,
            sx.cpu()?,
            sy.cpu()?,
            dy.cpu()?,
            sg.cpu()?,
            &mean,
            &var,
            d,
            eps,
            &mut dx,
            with_residual.then_some(&mut dres[..]),
            &mut dgamma,
            &mut dbeta,
        )?;
        let mut grads = vec![
            Some(sx.like(dx)?),
            Some(Tensor::from_vec(dgamma, &[d.c])?),
            Some(Tensor::from_vec(dbeta, &[d.c])?),
        ];
        if with_residual {
            grads.push(Some(sx.like(dres)?));
        }
        Ok(grads)
    });
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
        let d = BnDims::of(op, x.shape())?;
        check_channel_params(op, x, d.c, &[("gamma", gamma), ("beta", beta)])?;
        check_residual(op, x, residual)?;
        check_eps(op, eps)?;
        let m = d.per_channel();
        if m < 2 {
            // As PyTorch: one value per channel has no variance to normalize with.
            bail!(
                Shape,
                "{op}: expected more than 1 value per channel in training mode, got input {:?}",
                x.shape()
            );
        }
        #[cfg(feature = "cuda")]
        {
            let mut all = vec![x, gamma, beta];
            all.extend(residual);
            if let Some(be) = crate::ops::cuda_backend(op, &all)? {
                return crate::ops::cuda::bn_act_train(
                    self, be, op, x, gamma, beta, residual, d, eps,
                );
            }
        }
        let mut y = vec![0.0; d.numel()]; // (N, C, S)
        let mut mean = vec![0.0; d.c]; // (C,)
        let mut var = vec![0.0; d.c]; // (C,) biased
        bn_act_train_forward_cpu(
            x.cpu()?,
            residual.map(|r| r.cpu()).transpose()?,
            gamma.cpu()?,
            beta.cpu()?,
            d,
            eps,
            &mut y,
            &mut mean,
            &mut var,
        )?;
        let y = x.like(y)?;
        let unbiased = m as f32 / (m - 1) as f32;
        let var_unbiased: Vec<f32> = var.iter().map(|&v| v * unbiased).collect();
        let mean_t = Tensor::from_vec(mean.clone(), &[d.c])?;
        let var_t = Tensor::from_vec(var_unbiased, &[d.c])?;
        record_cpu_backward(
            self, op, true, x, gamma, beta, residual, &y, mean, var, d, eps,
        );
        Ok((y, mean_t, var_t))
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
        #[cfg(feature = "cuda")]
        {
            let mut all = vec![x, gamma, beta, running_mean, running_var];
            all.extend(residual);
            if let Some(be) = crate::ops::cuda_backend(op, &all)? {
                return crate::ops::cuda::bn_act_eval(
                    self,
                    be,
                    op,
                    x,
                    gamma,
                    beta,
                    residual,
                    running_mean,
                    running_var,
                    d,
                    eps,
                );
            }
        }
        let (rm, rv) = (running_mean.cpu()?, running_var.cpu()?);
        let mut y = vec![0.0; d.numel()]; // (N, C, S)
        bn_act_apply_cpu(
            x.cpu()?,
            residual.map(|r| r.cpu()).transpose()?,
            gamma.cpu()?,
            beta.cpu()?,
            rm,
            rv,
            d,
            eps,
            &mut y,
        )?;
        let y = x.like(y)?;
        record_cpu_backward(
            self,
            op,
            false,
            x,
            gamma,
            beta,
            residual,
            &y,
            rm.to_vec(),
            rv.to_vec(),
            d,
            eps,
        );
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::batchnorm::BN_EPS;
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
        let m = d.per_channel() as f64;
        let eps = BN_EPS as f64;
        for ch in 0..3 {
            let ks: Vec<usize> = (0..d.n)
                .flat_map(|i| (0..d.s).map(move |j| (i * d.c + ch) * d.s + j))
                .collect();
            let mu = ks.iter().map(|&k| x[k] as f64).sum::<f64>() / m;
            let var = ks.iter().map(|&k| (x[k] as f64 - mu).powi(2)).sum::<f64>() / m;
            let istd = 1.0 / (var + eps).sqrt();
            let g = gamma[ch] as f64;
            // The forward in f64 decides the mask.
            let pre = |k: usize| (x[k] as f64 - mu) * istd * g + beta[ch] as f64 + res[k] as f64;
            let dyp = |k: usize| if pre(k) > 0.0 { dy[k] as f64 } else { 0.0 };
            for &k in &ks {
                assert!((y[k] as f64 - pre(k).max(0.0)).abs() < 1e-5 * (1.0 + pre(k).abs()));
                assert_eq!(dr[k] as f64, dyp(k), "dresidual[{k}]");
            }
            let dxhat = |k: usize| dyp(k) * g;
            let dvar: f64 = ks
                .iter()
                .map(|&k| dxhat(k) * (x[k] as f64 - mu) * -0.5 * istd.powi(3))
                .sum();
            let dmean: f64 = ks.iter().map(|&k| -dxhat(k) * istd).sum::<f64>()
                + dvar * ks.iter().map(|&k| -2.0 * (x[k] as f64 - mu)).sum::<f64>() / m;
            let want_db: f64 = ks.iter().map(|&k| dyp(k)).sum();
            let want_dg: f64 = ks.iter().map(|&k| dyp(k) * (x[k] as f64 - mu) * istd).sum();
            assert!((db[ch] as f64 - want_db).abs() < 1e-4 * (1.0 + want_db.abs()));
            assert!((dg[ch] as f64 - want_dg).abs() < 1e-4 * (1.0 + want_dg.abs()));
            for &k in &ks {
                let want = dxhat(k) * istd + dvar * 2.0 * (x[k] as f64 - mu) / m + dmean / m;
                assert!(
                    (dx[k] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "dx[{k}] = {} vs {want}",
                    dx[k]
                );
            }
        }
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
}
