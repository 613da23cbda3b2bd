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
use crate::bail;
use crate::error::Result;
use crate::ops::batchnorm::{check_channel_params, BnDims};
use crate::ops::conv::{
    conv2d_backward_data_cpu, conv2d_backward_filter_cpu, conv2d_forward_cpu, Conv2dShape,
};
use crate::ops::fused::{
    bn_act_apply_cpu, bn_act_backward_cpu, bn_act_train_forward_cpu, check_bn_act_train,
};
use crate::ops::pool::{max_pool2d_backward_cpu, max_pool2d_forward_cpu, Pool2dShape};
use crate::tensor::{round_bf16, Tensor};

/// The per-channel batch statistics a training-mode BN returns for its running update:
/// (batch mean (C,), unbiased batch variance (C,)).
pub type BatchStats = (Tensor, Tensor);

const OP: &str = "bn_relu_conv2d_train";
const TAIL: &str = "bn_relu_conv2d_bn_add_relu_train";
const POOL: &str = "bn_relu_max_pool2d_train";

/// Rounds every value to bf16 in place (the CPU's bf16 storage).
fn round_all(v: &mut [f32]) {
    for x in v {
        *x = round_bf16(*x);
    }
}

/// (mean, unbiased variance) tensors from the biased variance over `m` values per channel.
fn batch_stats(mean: &[f32], var: &[f32], m: usize) -> Result<BatchStats> {
    let unbiased = m as f32 / (m - 1) as f32;
    Ok((
        Tensor::from_vec(mean.to_vec(), &[mean.len()])?,
        Tensor::from_vec(var.iter().map(|&v| v * unbiased).collect(), &[var.len()])?,
    ))
}

/// What the CPU keeps of a training-mode BN + ReLU whose output is recomputed: x, the
/// parameters and the batch statistics.
struct BnReluCpu {
    x: Tensor,     // (N, C, H, W)
    gamma: Tensor, // (C,)
    beta: Tensor,  // (C,)
    mean: Vec<f32>,
    var: Vec<f32>, // biased
    d: BnDims,
    eps: f32,
    /// bf16 emulation: the output and the gradient reaching it are rounded to bf16.
    bf16_mid: bool,
}

/// A BN + ReLU output: `y` (the ReLU mask: unrounded, as the unfused op saves it) and, in bf16
/// mode, its rounded copy (what the next op reads).
struct BnReluOut {
    y: Vec<f32>,
    rounded: Option<Vec<f32>>,
}

impl BnReluOut {
    /// What the consumer reads: the bf16 copy in bf16 mode, else y.
    fn input(&self) -> &[f32] {
        self.rounded.as_deref().unwrap_or(&self.y)
    }
}

impl BnReluCpu {
    /// The forward: the batch statistics and the output; `d` from `check_bn_act_train`.
    fn forward(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        d: BnDims,
        eps: f32,
        bf16_mid: bool,
    ) -> Result<(BnReluCpu, BnReluOut)> {
        let mut mean = vec![0.0; d.c];
        let mut var = vec![0.0; d.c];
        let mut y = vec![0.0; d.numel()]; // (N, C, H, W)
        let (g, b) = (gamma.cpu()?, beta.cpu()?);
        bn_act_train_forward_cpu(x.cpu()?, None, g, b, d, eps, &mut y, &mut mean, &mut var)?;
        let bn = BnReluCpu {
            x: x.clone(),
            gamma: gamma.clone(),
            beta: beta.clone(),
            mean,
            var,
            d,
            eps,
            bf16_mid,
        };
        let out = bn.rounded(y);
        Ok((bn, out))
    }

    fn rounded(&self, y: Vec<f32>) -> BnReluOut {
        let rounded = self.bf16_mid.then(|| {
            let mut r = y.clone();
            round_all(&mut r);
            r
        });
        BnReluOut { y, rounded }
    }

    /// The forward's output again (the same apply pass on the same values).
    fn output(&self) -> Result<BnReluOut> {
        let mut y = vec![0.0; self.d.numel()]; // (N, C, H, W)
        let (g, b) = (self.gamma.cpu()?, self.beta.cpu()?);
        let (d, eps) = (self.d, self.eps);
        bn_act_apply_cpu(
            self.x.cpu()?,
            None,
            g,
            b,
            &self.mean,
            &self.var,
            d,
            eps,
            &mut y,
        )?;
        Ok(self.rounded(y))
    }

    /// [dx, dgamma, dbeta] from the gradient `dy` of the output (rounded to bf16 first in bf16
    /// mode, as the unfused op's bf16 output node rounds it).
    fn backward(&self, out: &BnReluOut, mut dy: Vec<f32>) -> Result<Vec<Option<Tensor>>> {
        let d = self.d;
        if self.bf16_mid {
            round_all(&mut dy);
        }
        let mut dx = vec![0.0; d.numel()]; // (N, C, H, W)
        let mut dgamma = vec![0.0; d.c];
        let mut dbeta = vec![0.0; d.c];
        bn_act_backward_cpu(
            true,
            self.x.cpu()?,
            &out.y,
            &dy,
            self.gamma.cpu()?,
            &self.mean,
            &self.var,
            d,
            self.eps,
            &mut dx,
            None,
            &mut dgamma,
            &mut dbeta,
        )?;
        Ok(vec![
            Some(self.x.like(dx)?),
            Some(Tensor::from_vec(dgamma, &[d.c])?),
            Some(Tensor::from_vec(dbeta, &[d.c])?),
        ])
    }

    fn stats(&self) -> Result<BatchStats> {
        batch_stats(&self.mean, &self.var, self.d.per_channel())
    }
}

/// What the CPU keeps of one bn -> ReLU -> conv segment, and its recomputation and backward.
struct BnReluConvCpu {
    bn: BnReluCpu,
    w: Tensor, // (O, C, KH, KW)
    s: Conv2dShape,
}

impl BnReluConvCpu {
    /// The forward: returns the segment and the convolution's output z (N, O, HO, WO); the BN
    /// output is dropped.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        d: BnDims,
        w: &Tensor,
        s: Conv2dShape,
        eps: f32,
        bf16_mid: bool,
    ) -> Result<(BnReluConvCpu, Vec<f32>)> {
        let (bn, out) = BnReluCpu::forward(x, gamma, beta, d, eps, bf16_mid)?;
        let seg = BnReluConvCpu {
            bn,
            w: w.clone(),
            s,
        };
        let z = seg.conv_output(&out)?;
        Ok((seg, z))
    }

    /// The convolution's output (N, O, HO, WO) of the BN output.
    fn conv_output(&self, out: &BnReluOut) -> Result<Vec<f32>> {
        let mut z = vec![0.0; self.s.y_len()];
        conv2d_forward_cpu(out.input(), self.w.cpu()?, &self.s, &mut z);
        Ok(z)
    }

    /// Gradients [dx, dgamma, dbeta, dw] from dz (N, O, HO, WO) and the recomputed BN output;
    /// `need_dw` / `need_bn` skip the weight's GEMM / the BN backward.
    fn backward(
        &self,
        out: &BnReluOut,
        dz: &[f32],
        need_dw: bool,
        need_bn: bool,
    ) -> Result<Vec<Option<Tensor>>> {
        let s = self.s;
        let dw = if need_dw {
            let mut dw = vec![0.0; s.w_len()]; // (O, C, KH, KW)
            conv2d_backward_filter_cpu(out.input(), dz, &s, &mut dw);
            Some(self.w.like(dw)?)
        } else {
            None
        };
        if !need_bn {
            return Ok(vec![None, None, None, dw]);
        }
        let mut dy = vec![0.0; self.bn.d.numel()]; // (N, C, H, W)
        conv2d_backward_data_cpu(dz, self.w.cpu()?, &s, &mut dy);
        let mut grads = self.bn.backward(out, dy)?;
        grads.push(dw);
        Ok(grads)
    }
}

impl Tape {
    /// Runs an op's f32 `body` on its activation operands `xs` in this tape's precision: in
    /// f32 as they are; in bf16 mode (Tape::bf16_inputs) on their bf16 copies with `bf16_mid`
    /// set (the body rounds where the unfused ops' bf16 outputs round), its output rounded.
    fn in_precision<R>(
        &mut self,
        op: &str,
        xs: &[&Tensor],
        body: impl FnOnce(&mut Tape, &[Tensor], bool) -> Result<(Tensor, R)>,
    ) -> Result<(Tensor, R)> {
        if !self.is_bf16() {
            let xs: Vec<Tensor> = xs.iter().map(|&t| t.clone()).collect();
            return body(self, &xs, false);
        }
        let r = self.bf16_inputs(op, xs, Bf16Path::Native)?;
        let (y, rest) = self.as_f32(|t| body(t, &r, true))?;
        Ok((self.bf16_output(&y)?, rest))
    }

    /// conv2d(relu(batch_norm_train(x)), w, stride, padding): x (N, C, H, W), gamma, beta (C,),
    /// w (O, C, KH, KW). Returns (z (N, O, HO, WO), the batch statistics for the running update
    /// as [`Tape::bn_relu_train`]). Backward: dx, dgamma, dbeta, dw. Saves x, gamma, beta, w
    /// and the statistics, not the BN output (see the module documentation).
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
    ) -> Result<(Tensor, BatchStats)> {
        self.in_precision(OP, &[x, w], |t, r, mid| {
            t.bn_relu_conv2d_body(&r[0], gamma, beta, &r[1], stride, padding, eps, mid)
        })
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
    ) -> Result<(Tensor, BatchStats)> {
        let d = check_bn_act_train(OP, x, gamma, beta, None, eps)?;
        let s = Conv2dShape::from_shapes(x.shape(), w.shape(), stride, padding)?;
        #[cfg(feature = "cuda")]
        if let Some(be) = crate::ops::cuda_backend(OP, &[x, gamma, beta, w])? {
            return crate::ops::cuda::bn_relu_conv2d_train(
                self,
                be,
                [x, gamma, beta, w],
                d,
                s,
                eps,
            );
        }
        let (seg, z) = BnReluConvCpu::forward(x, gamma, beta, d, w, s, eps, bf16_mid)?;
        let z_shape = [s.n, s.o, s.ho(), s.wo()];
        let z = Tensor::from_vec(z, &z_shape)?;
        let stats = seg.bn.stats()?;
        // Decided at forward time, as conv2d does: a frozen weight needs no dw, a frozen BN
        // with a constant input no BN backward.
        let need_dw = self.requires_grad(w);
        let need_bn = [x, gamma, beta].iter().any(|t| self.requires_grad(t));
        self.record(OP, &z, &[x, gamma, beta, w], move |dz| {
            dz.expect_shape(&format!("{OP} backward dz"), &z_shape)?;
            let out = seg.bn.output()?;
            seg.backward(&out, dz.cpu()?, need_dw, need_bn)
        });
        Ok((z, stats))
    }

    /// The end of a bottleneck block as one op: relu(bn3(conv2d(relu(bn2(x)), w)) + residual),
    /// training mode, the convolution 1x1 with stride 1 (ResNet's conv3). x (N, C, H, W),
    /// gamma2/beta2 (C,), w (O, C, 1, 1), gamma3/beta3 (O,), residual (N, O, H, W). Returns
    /// (y, bn2's statistics, bn3's statistics). Backward: dx, dgamma2, dbeta2, dw, dgamma3,
    /// dbeta3, dresidual.
    ///
    /// Keeps neither the BN outputs nor the convolution's output: backward recomputes bn2's
    /// output (an apply pass) and the convolution (a second forward of the 1x1 conv, ~1/4 of a
    /// bottleneck's FLOPs) from x. Saved: x, the output y (the ReLU mask; the next block's input
    /// anyway), the parameters and the statistics. Bit-identical to `bn_relu_train`, `conv2d`,
    /// `bn_add_relu_train` in a row, in f32 and in the bf16 emulation (there the convolution's
    /// output is rounded to bf16 before bn3, as the unfused conv's bf16 output is).
    #[allow(clippy::too_many_arguments)]
    pub fn bn_relu_conv2d_bn_add_relu_train(
        &mut self,
        x: &Tensor,
        gamma2: &Tensor,
        beta2: &Tensor,
        w: &Tensor,
        gamma3: &Tensor,
        beta3: &Tensor,
        residual: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, BatchStats, BatchStats)> {
        let (y, (s2, s3)) = self.in_precision(TAIL, &[x, w, residual], |t, r, mid| {
            let (y, s2, s3) = t.tail_body(
                [&r[0], gamma2, beta2, &r[1], gamma3, beta3, &r[2]],
                eps,
                mid,
            )?;
            Ok((y, (s2, s3)))
        })?;
        Ok((y, s2, s3))
    }

    /// The tail in f32 arithmetic (`bf16_mid`: the bf16 emulation's inner roundings). `t` =
    /// [x, gamma2, beta2, w, gamma3, beta3, residual].
    fn tail_body(
        &mut self,
        t: [&Tensor; 7],
        eps: f32,
        bf16_mid: bool,
    ) -> Result<(Tensor, BatchStats, BatchStats)> {
        let [x, gamma2, beta2, w, gamma3, beta3, residual] = t;
        let d2 = check_bn_act_train(TAIL, x, gamma2, beta2, None, eps)?;
        let s = Conv2dShape::from_shapes(x.shape(), w.shape(), 1, 0)?;
        if (s.kh, s.kw) != (1, 1) {
            bail!(
                Shape,
                "{TAIL}: expected a 1x1 convolution, got weight {:?}",
                w.shape()
            );
        }
        let y_shape = [s.n, s.o, s.ho(), s.wo()];
        if residual.shape() != y_shape {
            bail!(
                Shape,
                "{TAIL}: residual must have the convolution's output shape {y_shape:?}, got {:?}",
                residual.shape()
            );
        }
        let d3 = BnDims::of(TAIL, &y_shape)?;
        check_channel_params(
            TAIL,
            residual,
            d3.c,
            &[("gamma3", gamma3), ("beta3", beta3)],
        )?;
        #[cfg(feature = "cuda")]
        if let Some(be) = crate::ops::cuda_backend(TAIL, &t)? {
            return crate::ops::cuda::bottleneck_tail_train(self, be, t, d2, s, eps);
        }
        let (seg, mut x3) = BnReluConvCpu::forward(x, gamma2, beta2, d2, w, s, eps, bf16_mid)?;
        if bf16_mid {
            round_all(&mut x3);
        }
        let (mut mean3, mut var3) = (vec![0.0; d3.c], vec![0.0; d3.c]); // (O,), biased
        let mut y = vec![0.0; d3.numel()]; // (N, O, H, W)
        let (g3, b3) = (gamma3.cpu()?, beta3.cpu()?);
        let res = Some(residual.cpu()?);
        bn_act_train_forward_cpu(&x3, res, g3, b3, d3, eps, &mut y, &mut mean3, &mut var3)?;
        drop(x3);
        let y = Tensor::from_vec(y, &y_shape)?;
        let s2 = seg.bn.stats()?;
        let s3 = batch_stats(&mean3, &var3, d3.per_channel())?;
        let need_dw = self.requires_grad(w);
        let need_bn2 = [x, gamma2, beta2].iter().any(|t| self.requires_grad(t));
        let (sy, sg3) = (y.clone(), gamma3.clone());
        self.record(TAIL, &y, &t, move |dy| {
            dy.expect_shape(&format!("{TAIL} backward dy"), &y_shape)?;
            let y2 = seg.bn.output()?;
            let mut x3 = seg.conv_output(&y2)?;
            if bf16_mid {
                round_all(&mut x3);
            }
            let mut dx3 = vec![0.0; d3.numel()]; // (N, O, H, W)
            let mut dres = vec![0.0; d3.numel()]; // (N, O, H, W)
            let mut dgamma3 = vec![0.0; d3.c];
            let mut dbeta3 = vec![0.0; d3.c];
            bn_act_backward_cpu(
                true,
                &x3,
                sy.cpu()?,
                dy.cpu()?,
                sg3.cpu()?,
                &mean3,
                &var3,
                d3,
                eps,
                &mut dx3,
                Some(&mut dres),
                &mut dgamma3,
                &mut dbeta3,
            )?;
            drop(x3);
            if bf16_mid {
                round_all(&mut dx3);
            }
            let mut grads = seg.backward(&y2, &dx3, need_dw, need_bn2)?;
            grads.extend([
                Some(Tensor::from_vec(dgamma3, &[d3.c])?),
                Some(Tensor::from_vec(dbeta3, &[d3.c])?),
                Some(sy.like(dres)?),
            ]);
            Ok(grads)
        });
        Ok((y, s2, s3))
    }
}

impl Tape {
    /// max_pool2d(relu(batch_norm_train(x)), kernel, stride, padding) in training mode (the
    /// ImageNet stem's bn1 -> ReLU -> max pool): x (N, C, H, W), gamma, beta (C,). Returns (the
    /// pooled output (N, C, HO, WO), the batch statistics). Backward: dx, dgamma, dbeta.
    ///
    /// Keeps x, not the BN output (the stem's largest activation, 64 channels at half the image
    /// resolution) nor, on a GPU, the pool's argmax indices: backward recomputes the BN output
    /// and the pool's window maxima. Bit-identical to `bn_relu_train` then `max_pool2d`, in f32
    /// and in the bf16 emulation (the pool reads the bf16 BN output).
    #[allow(clippy::too_many_arguments)]
    pub fn bn_relu_max_pool2d_train(
        &mut self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        kernel: usize,
        stride: usize,
        padding: usize,
        eps: f32,
    ) -> Result<(Tensor, BatchStats)> {
        self.in_precision(POOL, &[x], |t, r, mid| {
            t.bn_relu_max_pool2d_body(&r[0], gamma, beta, kernel, stride, padding, eps, mid)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn bn_relu_max_pool2d_body(
        &mut self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        kernel: usize,
        stride: usize,
        padding: usize,
        eps: f32,
        bf16_mid: bool,
    ) -> Result<(Tensor, BatchStats)> {
        let d = check_bn_act_train(POOL, x, gamma, beta, None, eps)?;
        let s = Pool2dShape::from_shape(x.shape(), kernel, stride, padding)?;
        #[cfg(feature = "cuda")]
        if let Some(be) = crate::ops::cuda_backend(POOL, &[x, gamma, beta])? {
            return crate::ops::cuda::bn_relu_max_pool2d_train(
                self,
                be,
                [x, gamma, beta],
                d,
                s,
                eps,
            );
        }
        let (bn, out) = BnReluCpu::forward(x, gamma, beta, d, eps, bf16_mid)?;
        let mut p = vec![0.0; s.y_len()]; // (N, C, HO, WO)
        max_pool2d_forward_cpu(out.input(), &s, &mut p);
        drop(out);
        let p_shape = [s.n, s.c, s.ho(), s.wo()];
        let p = Tensor::from_vec(p, &p_shape)?;
        let stats = bn.stats()?;
        self.record(POOL, &p, &[x, gamma, beta], move |dp| {
            dp.expect_shape(&format!("{POOL} backward dp"), &p_shape)?;
            let out = bn.output()?;
            let mut dy = vec![0.0; s.x_len()]; // (N, C, H, W)
            max_pool2d_backward_cpu(out.input(), dp.cpu()?, &s, &mut dy);
            bn.backward(&out, dy)
        });
        Ok((p, stats))
    }
}

#[cfg(test)]
mod tests {
    use crate::autograd::{Precision, Tape};
    use crate::error::Result;
    use crate::ops::batchnorm::BN_EPS;
    use crate::tensor::Tensor;
    use crate::testutil::{check_grad_kinks, randn};

    /// An op under test: the tracked inputs to its outputs, the first one differentiated.
    type Op<'a> = &'a dyn Fn(&mut Tape, &[Tensor]) -> Result<Vec<Tensor>>;

    /// Every output of `f` on `xs`, then the gradient of every input for a random output
    /// gradient of the first output.
    fn run(precision: Precision, xs: &[Tensor], f: Op) -> Vec<Vec<f32>> {
        let mut tape = Tape::new().with_precision(precision);
        let v: Vec<Tensor> = xs.iter().map(|t| tape.track(t)).collect();
        let outs = f(&mut tape, &v).unwrap();
        let dy = randn(outs[0].shape(), 4242);
        let g = tape.backward_from(vec![(outs[0].clone(), dy)]).unwrap();
        let mut got: Vec<Vec<f32>> = outs.iter().map(|t| t.to_vec().unwrap()).collect();
        got.extend(v.iter().map(|t| g.get(t).unwrap().to_vec().unwrap()));
        got
    }

    /// `one_op` equals `unfused` bit for bit in f32 and in the bf16 emulation (no output or
    /// gradient all zero), and the two precisions differ (bf16 really rounds somewhere).
    fn assert_bit_identical(what: &str, xs: &[Tensor], one_op: Op, unfused: Op) {
        for precision in [Precision::F32, Precision::Bf16] {
            let (a, b) = (run(precision, xs, one_op), run(precision, xs, unfused));
            assert_eq!(a.len(), b.len());
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                assert!(
                    p.iter().any(|&v| v != 0.0),
                    "{what} {precision}: {i} is zero"
                );
                assert_eq!(p, q, "{what} {precision}: output or gradient {i}");
            }
        }
        assert_ne!(
            run(Precision::F32, xs, one_op)[0],
            run(Precision::Bf16, xs, one_op)[0],
            "{what}"
        );
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
            assert_bit_identical(
                &format!("k={k} stride={stride}"),
                &xs,
                &|t, v| {
                    let (z, (m, var)) = t.bn_relu_conv2d_train(
                        &v[0], &v[1], &v[2], &v[3], stride, padding, BN_EPS,
                    )?;
                    Ok(vec![z, m, var])
                },
                &|t, v| {
                    let (y, m, var) = t.bn_relu_train(&v[0], &v[1], &v[2], BN_EPS)?;
                    Ok(vec![t.conv2d(&y, &v[3], stride, padding)?, m, var])
                },
            );
        }
    }

    /// The tail equals bn_relu_train, conv2d, bn_add_relu_train bit for bit, in f32 and in the
    /// bf16 emulation.
    #[test]
    fn tail_equals_the_unfused_ops_bit_for_bit() {
        for (n, c, o, hw, seed) in [(3, 4, 8, 5, 60u64), (2, 6, 12, 7, 70)] {
            let xs = [
                randn(&[n, c, hw, hw], seed),
                randn(&[c], seed + 1),
                randn(&[c], seed + 2),
                randn(&[o, c, 1, 1], seed + 3),
                randn(&[o], seed + 4),
                randn(&[o], seed + 5),
                randn(&[n, o, hw, hw], seed + 6),
            ];
            assert_bit_identical(
                &format!("tail n={n} c={c}"),
                &xs,
                &|t, v| {
                    let (y, s2, s3) = t.bn_relu_conv2d_bn_add_relu_train(
                        &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], BN_EPS,
                    )?;
                    Ok(vec![y, s2.0, s2.1, s3.0, s3.1])
                },
                &|t, v| {
                    let (h, m2, v2) = t.bn_relu_train(&v[0], &v[1], &v[2], BN_EPS)?;
                    let h = t.conv2d(&h, &v[3], 1, 0)?;
                    let (y, m3, v3) = t.bn_add_relu_train(&h, &v[4], &v[5], &v[6], BN_EPS)?;
                    Ok(vec![y, m2, v2, m3, v3])
                },
            );
        }
    }

    /// The stem's bn -> ReLU -> max pool as one op equals the two ops bit for bit (f32 and the
    /// bf16 emulation), including the gradient routed through overlapping windows.
    #[test]
    fn pool_equals_bn_relu_then_max_pool_bit_for_bit() {
        let xs = [randn(&[3, 4, 9, 8], 71), randn(&[4], 72), randn(&[4], 73)];
        assert_bit_identical(
            "pool",
            &xs,
            &|t, v| {
                let (p, (m, var)) =
                    t.bn_relu_max_pool2d_train(&v[0], &v[1], &v[2], 3, 2, 1, BN_EPS)?;
                Ok(vec![p, m, var])
            },
            &|t, v| {
                let (y, m, var) = t.bn_relu_train(&v[0], &v[1], &v[2], BN_EPS)?;
                Ok(vec![t.max_pool2d(&y, 3, 2, 1)?, m, var])
            },
        );
    }

    /// Finite differences through the three ops (ReLU kinks left out as in fused.rs's checks).
    #[test]
    fn ops_match_finite_differences() {
        let bn = |seed: u64, c: usize| [randn(&[c], seed), randn(&[c], seed + 1)];
        let [g, b] = bn(42, 3);
        let xs = [randn(&[2, 3, 5, 4], 41), g, b, randn(&[4, 3, 3, 3], 44)];
        check_grad_kinks(&xs, 1e-2, 3e-3, 0.1, |tape, v| {
            Ok(tape
                .bn_relu_conv2d_train(&v[0], &v[1], &v[2], &v[3], 2, 1, BN_EPS)?
                .0)
        })
        .unwrap();
        let ([g2, b2], [g3, b3]) = (bn(82, 3), bn(85, 5));
        let xs = [
            randn(&[2, 3, 4, 3], 81),
            g2,
            b2,
            randn(&[5, 3, 1, 1], 84),
            g3,
            b3,
            randn(&[2, 5, 4, 3], 87),
        ];
        check_grad_kinks(&xs, 1e-2, 3e-3, 0.1, |tape, v| {
            Ok(tape
                .bn_relu_conv2d_bn_add_relu_train(
                    &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], BN_EPS,
                )?
                .0)
        })
        .unwrap();
        let [g, b] = bn(72, 4);
        let xs = [randn(&[3, 4, 9, 8], 71), g, b];
        check_grad_kinks(&xs, 1e-2, 3e-3, 0.1, |tape, v| {
            Ok(tape
                .bn_relu_max_pool2d_train(&v[0], &v[1], &v[2], 3, 2, 1, BN_EPS)?
                .0)
        })
        .unwrap();
    }

    /// Only the weight tracked: dw alone, the BN backward skipped.
    #[test]
    fn frozen_bn_gives_the_weight_gradient_alone() {
        let (x, g, b, w) = (
            randn(&[2, 3, 4, 4], 51),
            randn(&[3], 52),
            randn(&[3], 53),
            randn(&[2, 3, 1, 1], 54),
        );
        let mut tape = Tape::new();
        let wt = tape.track(&w);
        let (z, _) = tape
            .bn_relu_conv2d_train(&x, &g, &b, &wt, 1, 0, BN_EPS)
            .unwrap();
        let grads = tape
            .backward_from(vec![(z.clone(), randn(z.shape(), 55))])
            .unwrap();
        assert_eq!(grads.len(), 1);
        assert!(grads.get(&wt).is_some());
    }

    #[test]
    fn errors_name_the_op_and_the_argument() {
        let (x, g, b, w) = (
            randn(&[2, 3, 4, 4], 91),
            randn(&[3], 92),
            randn(&[3], 93),
            randn(&[5, 3, 1, 1], 94),
        );
        let (g5, r) = (randn(&[5], 95), randn(&[2, 5, 4, 4], 96));
        let mut t = Tape::no_grad();
        let msg = |e: crate::error::Error| e.to_string();
        let e = msg(t
            .bn_relu_conv2d_train(&x, &g, &b, &randn(&[2, 4, 1, 1], 97), 1, 0, BN_EPS)
            .unwrap_err());
        assert!(e.contains("conv"), "{e}");
        let e = msg(t
            .bn_relu_conv2d_train(&x, &randn(&[2], 98), &b, &w, 1, 0, BN_EPS)
            .unwrap_err());
        assert!(
            e.contains("bn_relu_conv2d_train") && e.contains("gamma"),
            "{e}"
        );
        let tail = |t: &mut Tape, w: &Tensor, g3: &Tensor, r: &Tensor| {
            msg(t
                .bn_relu_conv2d_bn_add_relu_train(&x, &g, &b, w, g3, &g5, r, BN_EPS)
                .unwrap_err())
        };
        let e = tail(&mut t, &w, &g5, &randn(&[2, 5, 4, 3], 99));
        assert!(e.contains("residual"), "{e}");
        let e = tail(&mut t, &w, &g, &r);
        assert!(e.contains("gamma3"), "{e}");
        let e = tail(&mut t, &randn(&[5, 3, 3, 3], 100), &g5, &r);
        assert!(
            e.contains("bn_relu_conv2d_bn_add_relu_train") && e.contains("1x1"),
            "{e}"
        );
        let e = msg(t
            .bn_relu_max_pool2d_train(&x, &g, &b, 3, 2, 5, BN_EPS)
            .unwrap_err());
        assert!(e.contains("pad"), "{e}");
    }
}
