//! conv2d(relu(batch_norm_train(x)), w) as one tape op that does not keep the BN + ReLU output
//! for backward: its backward recomputes it from x and the per-channel batch statistics (one
//! elementwise pass) instead.
//!
//! Why: in a bottleneck the outputs of bn1 + ReLU and bn2 + ReLU are saved only as the inputs of
//! conv2 and conv3 (for their weight gradients) and as the ReLU masks, while the BN inputs x are
//! saved anyway (for x-hat). Dropping them frees 2 of the 12 activation-widths a bottleneck
//! keeps, ~15% of the backbone's saved activations, for one extra apply pass per layer in
//! backward (memory bound: ~0.1 ms for the largest layer at batch 256 on an H200). It is also
//! the shape of cuDNN's fused "scale-bias-relu-conv" forward, where the BN output is never
//! written at all.
//!
//! The values equal the unfused `bn_relu_train` then `conv2d`, bit for bit, on every device and
//! in both precisions: the same kernels on the same inputs, and the recomputed output is the
//! forward's (the apply pass is deterministic). In bf16 the rounding points are the unfused
//! ones: the conv's input is the bf16 BN output, its data gradient is rounded to bf16 before the
//! BN backward (on a GPU both are bf16 storage), and the ReLU mask comes from the unrounded
//! output, as the unfused op saves it.

use crate::autograd::{Bf16Path, Tape};
use crate::error::Result;
use crate::ops::conv::{
    conv2d_backward_data_cpu, conv2d_backward_filter_cpu, conv2d_forward_cpu, Conv2dShape,
};
use crate::ops::fused::{
    bn_act_apply_cpu, bn_act_backward_cpu, bn_act_train_forward_cpu, check_bn_act_train,
};
use crate::tensor::{round_bf16, Tensor};

/// Rounds every value to bf16 in place (the CPU's bf16 storage).
fn round_all(v: &mut [f32]) {
    for x in v {
        *x = round_bf16(*x);
    }
}

impl Tape {
    /// conv2d(relu(batch_norm_train(x)), w, stride, padding): x (N, C, H, W), gamma, beta (C,),
    /// w (O, C, KH, KW). Returns (z (N, O, HO, WO), batch_mean (C,), batch_var_unbiased (C,)),
    /// the last two for the running update as [`Tape::bn_relu_train`]. Backward: dx, dgamma,
    /// dbeta, dw. Saves x, gamma, beta, w and the statistics, not the BN output (see the
    /// module documentation).
    #[allow(clippy::too_many_arguments)]
    pub fn bn_relu_conv2d_train(
        &mut self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        w: &Tensor,
        stride: usize,
        padding: usize,
        eps: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        // Bf16 mode (Tape::bf16_inputs): a bf16 x and weight copy, the f32 body rounding where
        // the unfused ops' bf16 outputs round, a bf16 output.
        if self.is_bf16() {
            let r = self.bf16_inputs("bn_relu_conv2d_train", &[x, w], Bf16Path::Native)?;
            let (z, mean, var) = self.as_f32(|t| {
                t.bn_relu_conv2d_body(&r[0], gamma, beta, &r[1], stride, padding, eps, true)
            })?;
            return Ok((self.bf16_output(&z)?, mean, var));
        }
        self.bn_relu_conv2d_body(x, gamma, beta, w, stride, padding, eps, false)
    }

    /// The op in f32 arithmetic; `bf16_mid` rounds the BN output and its gradient to bf16 (the
    /// CPU emulation; on a GPU the bf16 storage rounds them).
    #[allow(clippy::too_many_arguments)]
    fn bn_relu_conv2d_body(
        &mut self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        w: &Tensor,
        stride: usize,
        padding: usize,
        eps: f32,
        bf16_mid: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let op = "bn_relu_conv2d_train";
        let d = check_bn_act_train(op, x, gamma, beta, None, eps)?;
        let s = Conv2dShape::from_shapes(x.shape(), w.shape(), stride, padding)?;
        #[cfg(feature = "cuda")]
        if let Some(be) = crate::ops::cuda_backend(op, &[x, gamma, beta, w])? {
            return crate::ops::cuda::bn_relu_conv2d_train(self, be, x, gamma, beta, w, d, s, eps);
        }
        let (g, b) = (gamma.cpu()?, beta.cpu()?);
        let mut mean = vec![0.0; d.c]; // (C,)
        let mut var = vec![0.0; d.c]; // (C,) biased
        let mut y = vec![0.0; d.numel()]; // (N, C, H, W), dropped after the conv
        bn_act_train_forward_cpu(x.cpu()?, None, g, b, d, eps, &mut y, &mut mean, &mut var)?;
        if bf16_mid {
            round_all(&mut y);
        }
        let mut z = vec![0.0; s.y_len()]; // (N, O, HO, WO)
        conv2d_forward_cpu(&y, w.cpu()?, &s, &mut z);
        drop(y);
        let z_shape = [s.n, s.o, s.ho(), s.wo()];
        let z = Tensor::from_vec(z, &z_shape)?;
        let m = d.per_channel();
        let unbiased = m as f32 / (m - 1) as f32;
        let mean_t = Tensor::from_vec(mean.clone(), &[d.c])?;
        let var_t = Tensor::from_vec(var.iter().map(|&v| v * unbiased).collect(), &[d.c])?;
        // Decided at forward time, as conv2d does: a frozen weight needs no dw, a frozen BN
        // with a constant input no BN backward.
        let need_dw = self.requires_grad(w);
        let need_bn = [x, gamma, beta].iter().any(|t| self.requires_grad(t));
        let (sx, sg, sb, sw) = (x.clone(), gamma.clone(), beta.clone(), w.clone());
        self.record(op, &z, &[x, gamma, beta, w], move |dz| {
            dz.expect_shape(&format!("{op} backward dz"), &z_shape)?;
            let (xv, gv) = (sx.cpu()?, sg.cpu()?);
            let mut y = vec![0.0; d.numel()]; // (N, C, H, W): the forward's BN + ReLU output
            bn_act_apply_cpu(xv, None, gv, sb.cpu()?, &mean, &var, d, eps, &mut y)?;
            // The conv's input: the bf16 copy in bf16 mode (the mask stays the unrounded y).
            let y_in = if bf16_mid {
                let mut r = y.clone();
                round_all(&mut r);
                Some(r)
            } else {
                None
            };
            let y_in = y_in.as_deref().unwrap_or(&y);
            let dw = if need_dw {
                let mut dw = vec![0.0; s.w_len()]; // (O, C, KH, KW)
                conv2d_backward_filter_cpu(y_in, dz.cpu()?, &s, &mut dw);
                Some(sw.like(dw)?)
            } else {
                None
            };
            if !need_bn {
                return Ok(vec![None, None, None, dw]);
            }
            let mut dy = vec![0.0; d.numel()]; // (N, C, H, W)
            conv2d_backward_data_cpu(dz.cpu()?, sw.cpu()?, &s, &mut dy);
            if bf16_mid {
                round_all(&mut dy);
            }
            let mut dx = vec![0.0; d.numel()]; // (N, C, H, W)
            let mut dgamma = vec![0.0; d.c];
            let mut dbeta = vec![0.0; d.c];
            bn_act_backward_cpu(
                true,
                xv,
                &y,
                &dy,
                gv,
                &mean,
                &var,
                d,
                eps,
                &mut dx,
                None,
                &mut dgamma,
                &mut dbeta,
            )?;
            Ok(vec![
                Some(sx.like(dx)?),
                Some(Tensor::from_vec(dgamma, &[d.c])?),
                Some(Tensor::from_vec(dbeta, &[d.c])?),
                dw,
            ])
        });
        Ok((z, mean_t, var_t))
    }
}

#[cfg(test)]
mod tests {
    use crate::autograd::{Precision, Tape};
    use crate::ops::batchnorm::BN_EPS;
    use crate::tensor::Tensor;
    use crate::testutil::{check_grad_kinks, randn};

    /// (z, mean, var, dx, dgamma, dbeta, dw) of conv(relu(bn(x))) with output gradient dz, as
    /// the one op (`recompute`) or as bn_relu_train then conv2d.
    fn run(
        precision: Precision,
        recompute: bool,
        xs: &[Tensor; 4],
        stride: usize,
        padding: usize,
        dz_seed: u64,
    ) -> Vec<Vec<f32>> {
        let mut tape = Tape::new().with_precision(precision);
        let v: Vec<Tensor> = xs.iter().map(|t| tape.track(t)).collect();
        let (z, mean, var) = if recompute {
            tape.bn_relu_conv2d_train(&v[0], &v[1], &v[2], &v[3], stride, padding, BN_EPS)
                .unwrap()
        } else {
            let (y, mean, var) = tape.bn_relu_train(&v[0], &v[1], &v[2], BN_EPS).unwrap();
            (tape.conv2d(&y, &v[3], stride, padding).unwrap(), mean, var)
        };
        let dz = randn(z.shape(), dz_seed);
        let g = tape.backward_from(vec![(z.clone(), dz)]).unwrap();
        let mut out = vec![
            z.to_vec().unwrap(),
            mean.to_vec().unwrap(),
            var.to_vec().unwrap(),
        ];
        for t in &v {
            out.push(g.get(t).unwrap().to_vec().unwrap());
        }
        out
    }

    /// The op equals the unfused composition bit for bit (the same kernels on the same values,
    /// the BN output recomputed deterministically), in f32 and in the bf16 emulation (the
    /// rounding points of the unfused ops' bf16 outputs), for 3x3 stride-2 padded and 1x1
    /// convolutions. The composition's ops are checked against references in their own files.
    #[test]
    fn equals_bn_relu_then_conv_bit_for_bit() {
        for (k, stride, padding, seed) in [(3, 2, 1, 10u64), (1, 1, 0, 20), (3, 1, 1, 30)] {
            let xs = [
                randn(&[3, 4, 7, 6], seed),
                randn(&[4], seed + 1),
                randn(&[4], seed + 2),
                randn(&[5, 4, k, k], seed + 3),
            ];
            for precision in [Precision::F32, Precision::Bf16] {
                let a = run(precision, true, &xs, stride, padding, seed + 4);
                let b = run(precision, false, &xs, stride, padding, seed + 4);
                let what = ["z", "mean", "var", "dx", "dgamma", "dbeta", "dw"];
                for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                    assert!(p.iter().any(|&v| v != 0.0), "{precision} {}", what[i]);
                    assert_eq!(p, q, "{precision} k={k} stride={stride}: {}", what[i]);
                }
            }
            // bf16 really rounds somewhere: the two precisions differ.
            let f = run(Precision::F32, true, &xs, stride, padding, seed + 4);
            let h = run(Precision::Bf16, true, &xs, stride, padding, seed + 4);
            assert_ne!(f[0], h[0]);
        }
    }

    /// Finite differences through the op (ReLU kinks left out as in fused.rs's checks).
    #[test]
    fn matches_finite_differences() {
        let xs = [
            randn(&[2, 3, 5, 4], 41),
            randn(&[3], 42),
            randn(&[3], 43),
            randn(&[4, 3, 3, 3], 44),
        ];
        check_grad_kinks(&xs, 1e-2, 3e-3, 0.1, |tape, v| {
            Ok(tape
                .bn_relu_conv2d_train(&v[0], &v[1], &v[2], &v[3], 2, 1, BN_EPS)?
                .0)
        })
        .unwrap();
    }

    /// Only the weight tracked: dw alone, the BN backward skipped; and the op's errors name it.
    #[test]
    fn frozen_bn_and_errors() {
        let (x, g, b, w) = (
            randn(&[2, 3, 4, 4], 51),
            randn(&[3], 52),
            randn(&[3], 53),
            randn(&[2, 3, 1, 1], 54),
        );
        let mut tape = Tape::new();
        let wt = tape.track(&w);
        let (z, _, _) = tape
            .bn_relu_conv2d_train(&x, &g, &b, &wt, 1, 0, BN_EPS)
            .unwrap();
        let grads = tape
            .backward_from(vec![(z.clone(), randn(z.shape(), 55))])
            .unwrap();
        assert_eq!(grads.len(), 1);
        assert!(grads.get(&wt).is_some());
        let e = Tape::no_grad()
            .bn_relu_conv2d_train(&x, &g, &b, &randn(&[2, 4, 1, 1], 56), 1, 0, BN_EPS)
            .unwrap_err();
        assert!(e.to_string().contains("conv"), "{e}");
        let e = Tape::no_grad()
            .bn_relu_conv2d_train(&x, &randn(&[2], 57), &b, &w, 1, 0, BN_EPS)
            .unwrap_err();
        assert!(e.to_string().contains("bn_relu_conv2d_train"), "{e}");
    }
}
