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
//! The ops are compositions of the BN, convolution and pool backends' forward and backward
//! helpers (batchnorm.rs, conv.rs, pool.rs), so they hold no device code of their own. The
//! values equal the unfused `bn_relu_train` then `conv2d`, bit for bit, on every device and in
//! both precisions: the same kernels on the same inputs, and the recomputed output is the
//! forward's (the apply pass is deterministic). In bf16 the rounding points are the unfused
//! ones: the conv's input is the bf16 BN output, its data gradient is rounded to bf16 before the
//! BN backward (on a GPU both are bf16 storage), and the ReLU mask comes from the unrounded
//! output, as the unfused op saves it.

use std::sync::Arc;

use crate::autograd::{Bf16Path, Tape};
use crate::bail;
use crate::device::collective::Collective;
use crate::device::nvtx;
use crate::error::Result;
use crate::ops::batchnorm::{
    bn_apply, bn_backward, bn_batch_stats, check_channel_params, Act, BnDims, BnStats,
};
use crate::ops::conv::{conv2d_backward, conv2d_forward, Conv2dShape};
use crate::ops::fused::check_bn_act_train;
use crate::ops::pool::{max_pool2d_backward, max_pool2d_forward, max_pool2d_saved, Pool2dShape};
use crate::tensor::{DType, Tensor};

pub use crate::ops::batchnorm::BatchStats;

const OP: &str = "bn_relu_conv2d_train";
const TAIL: &str = "bn_relu_conv2d_bn_add_relu_train";
const POOL: &str = "bn_relu_max_pool2d_train";

/// `t` at one of the unfused ops' bf16 rounding points: with `bf16_mid` (the bf16 mode), its
/// values as bf16 storage holds them (a CPU tensor, the emulation's f32 storage, is rounded; a
/// GPU activation in bf16 mode is bf16 storage already); otherwise `t` as it is.
fn at_bf16_point(t: Tensor, bf16_mid: bool) -> Result<Tensor> {
    match (bf16_mid, t.dtype()) {
        (false, _) | (true, DType::Bf16) => Ok(t),
        (true, DType::F32) => t.round_bf16(),
    }
}

/// What a training-mode BN + ReLU whose output is recomputed keeps: x, the parameters and the
/// batch statistics.
struct BnRelu {
    op: &'static str,
    x: Tensor,     // (N, C, H, W)
    gamma: Tensor, // (C,)
    beta: Tensor,  // (C,)
    stats: BnStats,
    d: BnDims,
    /// bf16 emulation: the output and the gradient reaching it are rounded to bf16.
    bf16_mid: bool,
}

/// A BN + ReLU output (N, C, H, W): `y` (the ReLU mask: unrounded, as the unfused op saves it)
/// and `input`, what the next op reads (its bf16 copy in the bf16 emulation, else y).
struct BnReluOut {
    y: Tensor,
    input: Tensor,
}

impl BnRelu {
    /// The forward: the batch statistics and the output; `d` from `check_bn_act_train`.
    /// Returns the BN, its output and the statistics for the running update.
    fn forward(
        op: &'static str,
        [x, gamma, beta]: [&Tensor; 3],
        d: BnDims,
        eps: f32,
        bf16_mid: bool,
        comm: Option<&Arc<dyn Collective>>,
    ) -> Result<(BnRelu, BnReluOut, BatchStats)> {
        let (stats, batch) = bn_batch_stats(op, x, d, eps, comm)?;
        let bn = BnRelu {
            op,
            x: x.clone(),
            gamma: gamma.clone(),
            beta: beta.clone(),
            stats,
            d,
            bf16_mid,
        };
        let out = bn.output()?;
        Ok((bn, out, batch))
    }

    /// The output; again in backward (the same apply pass on the same values).
    fn output(&self) -> Result<BnReluOut> {
        let (x, g, b) = (&self.x, &self.gamma, &self.beta);
        let y = bn_apply(self.op, Act::Relu, x, None, g, b, &self.stats, self.d)?;
        let input = at_bf16_point(y.clone(), self.bf16_mid)?;
        Ok(BnReluOut { y, input })
    }

    /// [dx, dgamma, dbeta] from the gradient `dy` of the output (rounded to bf16 first in bf16
    /// mode, as the unfused op's bf16 output node rounds it).
    fn backward(&self, out: &BnReluOut, dy: Tensor) -> Result<Vec<Option<Tensor>>> {
        let dy = at_bf16_point(dy, self.bf16_mid)?;
        let (op, x, g) = (self.op, &self.x, &self.gamma);
        let grads = bn_backward(
            op,
            Act::Relu,
            true,
            &self.stats,
            x,
            Some(&out.y),
            g,
            &dy,
            self.d,
            false,
        )?;
        Ok(grads.into_vec())
    }
}

/// What one bn -> ReLU -> conv segment keeps, and its recomputation and backward.
struct BnReluConv {
    bn: BnRelu,
    w: Tensor, // (O, C, KH, KW) as conv2d_forward returned it (on a GPU in x's format)
    s: Conv2dShape,
}

impl BnReluConv {
    /// The forward; the BN output is dropped. Returns the segment, the convolution's output
    /// z (N, O, HO, WO) and the BN's statistics.
    fn forward(
        op: &'static str,
        [x, gamma, beta, w]: [&Tensor; 4],
        d: BnDims,
        s: Conv2dShape,
        eps: f32,
        bf16_mid: bool,
        comm: Option<&Arc<dyn Collective>>,
    ) -> Result<(BnReluConv, Tensor, BatchStats)> {
        let (bn, out, stats) = BnRelu::forward(op, [x, gamma, beta], d, eps, bf16_mid, comm)?;
        let (z, w) = conv2d_forward(&out.input, w, s)?;
        Ok((BnReluConv { bn, w, s }, z, stats))
    }

    /// The convolution's output (N, O, HO, WO) of the BN output.
    fn conv_output(&self, out: &BnReluOut) -> Result<Tensor> {
        Ok(conv2d_forward(&out.input, &self.w, self.s)?.0)
    }

    /// Gradients [dx, dgamma, dbeta, dw] from dz (N, O, HO, WO) and the recomputed BN output;
    /// `need_dw` / `need_bn` skip the filter gradient / the BN backward.
    fn backward(
        &self,
        out: &BnReluOut,
        dz: &Tensor,
        need_dw: bool,
        need_bn: bool,
    ) -> Result<Vec<Option<Tensor>>> {
        let (dy, dw) = conv2d_backward(&out.input, &self.w, dz, self.s, (need_bn, need_dw))?;
        let Some(dy) = dy else {
            return Ok(vec![None, None, None, dw]);
        };
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
        let _r = nvtx::Range::new(OP);
        let d = check_bn_act_train(OP, x, gamma, beta, None, eps)?;
        let s = Conv2dShape::from_shapes(x.shape(), w.shape(), stride, padding)?;
        let t = [x, gamma, beta, w];
        let (seg, z, stats) = BnReluConv::forward(OP, t, d, s, eps, bf16_mid, self.collective())?;
        // Decided at forward time, as conv2d does: a frozen weight needs no dw, a frozen BN
        // with a constant input no BN backward.
        let need_dw = self.requires_grad(w);
        let need_bn = [x, gamma, beta].iter().any(|t| self.requires_grad(t));
        self.record(OP, &z, &t, move |dz| {
            let _r = nvtx::Range::new(&format!("{OP} backward"));
            let out = seg.bn.output()?;
            seg.backward(&out, dz, need_dw, need_bn)
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
        let _r = nvtx::Range::new(TAIL);
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
        let seg_in = [x, gamma2, beta2, w];
        let (seg, x3, s2) =
            BnReluConv::forward(TAIL, seg_in, d2, s, eps, bf16_mid, self.collective())?;
        // The convolution's output (N, O, H, W), rounded where the unfused conv's bf16 output is.
        let x3 = at_bf16_point(x3, bf16_mid)?;
        let (stats3, s3) = bn_batch_stats(TAIL, &x3, d3, eps, self.collective())?;
        let y = bn_apply(
            TAIL,
            Act::Relu,
            &x3,
            Some(residual),
            gamma3,
            beta3,
            &stats3,
            d3,
        )?;
        drop(x3);
        let need_dw = self.requires_grad(w);
        let need_bn2 = [x, gamma2, beta2].iter().any(|t| self.requires_grad(t));
        let (sy, sg3) = (y.clone(), gamma3.clone());
        self.record(TAIL, &y, &t, move |dy| {
            let _r = nvtx::Range::new(&format!("{TAIL} backward"));
            // The forward's bn2 output and convolution output, again.
            let y2 = seg.bn.output()?;
            let x3 = seg.conv_output(&y2)?;
            let x3 = at_bf16_point(x3, bf16_mid)?;
            let g3 = bn_backward(
                TAIL,
                Act::Relu,
                true,
                &stats3,
                &x3,
                Some(&sy),
                &sg3,
                dy,
                d3,
                true,
            )?;
            drop(x3);
            let dx3 = at_bf16_point(g3.dx, bf16_mid)?;
            let mut grads = seg.backward(&y2, &dx3, need_dw, need_bn2)?;
            grads.extend([Some(g3.dgamma), Some(g3.dbeta), g3.dresidual]);
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
        let _r = nvtx::Range::new(POOL);
        let d = check_bn_act_train(POOL, x, gamma, beta, None, eps)?;
        let s = Pool2dShape::from_shape(x.shape(), kernel, stride, padding)?;
        let t = [x, gamma, beta];
        let (bn, out, stats) = BnRelu::forward(POOL, t, d, eps, bf16_mid, self.collective())?;
        let (p, _) = max_pool2d_forward(&out.input, s)?; // (N, C, HO, WO)
        drop(out);
        self.record(POOL, &p, &t, move |dp| {
            let _r = nvtx::Range::new(&format!("{POOL} backward"));
            let out = bn.output()?;
            let dy = max_pool2d_backward(&max_pool2d_saved(&out.input, s)?, dp, s)?;
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
    use crate::options::Bf16Layout;
    use crate::tensor::{Device, Tensor};
    use crate::test_device;
    use crate::testutil::{check_grad_kinks, randn, randn_vec};

    /// An op under test: the tracked inputs to its outputs, the first one differentiated.
    type Op<'a> = &'a dyn Fn(&mut Tape, &[Tensor]) -> Result<Vec<Tensor>>;

    /// `f` on `xs` moved to `dev`: every output, then the gradient of every input for a random
    /// output gradient of the first output, all on the host.
    fn run(dev: &Device, precision: Precision, xs: &[Tensor], f: Op) -> [Vec<Vec<f32>>; 2] {
        let mut tape = Tape::new().with_precision(precision);
        let v: Vec<Tensor> = xs
            .iter()
            .map(|t| tape.track(&t.to_device(dev).unwrap()))
            .collect();
        let outs = f(&mut tape, &v).unwrap();
        let dy = randn(outs[0].shape(), 4242).to_device(dev).unwrap();
        let g = tape.backward_from(vec![(outs[0].clone(), dy)]).unwrap();
        let host = |t: &Tensor| t.to_vec().unwrap();
        [
            outs.iter().map(host).collect(),
            v.iter().map(|t| host(g.get(t).unwrap())).collect(),
        ]
    }

    /// `one_op` equals `unfused` on `dev`, in f32 and in bf16 (the CPU emulation's rounding
    /// points; on a GPU in both bf16 layouts): outputs and batch statistics bit for bit (the
    /// same kernels on the same values, the BN output recomputed deterministically); gradients
    /// bit for bit on the CPU, and on a GPU within 1e-5 (f32) / 1e-2 (bf16) of each gradient's
    /// largest value (cuDNN's backward algorithms may sum in a run-dependent order, which can
    /// move a bf16 rounding by one step). No output or gradient is all zero, and the two
    /// precisions differ (bf16 really rounds somewhere).
    fn assert_equal_on(dev: &Device, what: &str, xs: &[Tensor], one_op: Op, unfused: Op) {
        let layouts: &[Bf16Layout] = match dev {
            Device::Cpu => &[Bf16Layout::Nhwc], // the CPU is NCHW whatever the option says
            Device::Cuda(_) => &[Bf16Layout::Nhwc, Bf16Layout::Nchw],
        };
        let modes = [(Precision::F32, layouts[0])]
            .into_iter()
            .chain(layouts.iter().map(|&l| (Precision::Bf16, l)));
        for (precision, layout) in modes {
            crate::options::update(|o| o.bf16_layout = layout);
            let what = format!("{what} on {dev} {precision} {layout:?}");
            let [ya, ga] = run(dev, precision, xs, one_op);
            let [yb, gb] = run(dev, precision, xs, unfused);
            assert_eq!((ya.len(), ga.len()), (yb.len(), gb.len()), "{what}");
            for (i, (p, q)) in ya.iter().zip(&yb).enumerate() {
                assert!(p.iter().any(|&v| v != 0.0), "{what}: output {i} is zero");
                assert_eq!(p, q, "{what}: output {i}");
            }
            let tol = match (dev, precision) {
                (Device::Cpu, _) => 0.0,
                (_, Precision::F32) => 1e-5,
                (_, Precision::Bf16) => 1e-2,
            };
            for (i, (p, q)) in ga.iter().zip(&gb).enumerate() {
                assert!(p.iter().any(|&v| v != 0.0), "{what}: gradient {i} is zero");
                assert_within(&format!("{what}: gradient {i}"), p, q, tol);
            }
        }
        crate::options::update(|o| o.bf16_layout = Bf16Layout::Nhwc);
        assert_ne!(
            run(dev, Precision::F32, xs, one_op)[0][0],
            run(dev, Precision::Bf16, xs, one_op)[0][0],
            "{what} on {dev}: bf16 equals f32"
        );
    }

    /// |got - want| <= tol * max |want| everywhere (tol 0: bit for bit; a NaN fails), naming the
    /// worst element.
    fn assert_within(what: &str, got: &[f32], want: &[f32], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(1e-6f64, |m, &v| m.max(v.abs() as f64));
        let (at, worst) = got
            .iter()
            .zip(want)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .enumerate()
            .fold(
                (0, 0.0f64),
                |m, (i, d)| if d > m.1 || d.is_nan() { (i, d) } else { m },
            );
        assert!(
            worst <= tol * scale,
            "{what}: element {at} is {} against {}, off by {worst:e} (largest value {scale:e})",
            got[at],
            want[at]
        );
    }

    /// A BN scale (C,) around 1 (non-trivial, and no channel switched off by a tiny gamma).
    fn scale(c: usize, seed: u64) -> Tensor {
        let v = randn_vec(c, seed).iter().map(|v| 1.0 + 0.3 * v).collect();
        Tensor::from_vec(v, &[c]).unwrap()
    }

    /// bn_relu_conv2d_train equals bn_relu_train then conv2d (3x3 stride-2 padded, 1x1 and
    /// 3x3 stride-1 convolutions, and a bottleneck-sized 3x3/2); the composition's ops are
    /// checked against references in their own files.
    fn bn_relu_conv_equals_the_unfused_ops(dev: &Device) {
        let cases = [
            ([3, 4, 7, 6], 5, 3, 2, 1, 10u64),
            ([3, 4, 7, 6], 5, 1, 1, 0, 20),
            ([3, 4, 7, 6], 5, 3, 1, 1, 30),
            ([4, 16, 14, 14], 24, 3, 2, 1, 1001),
        ];
        for (xs, o, k, stride, padding, seed) in cases {
            let c = xs[1];
            let xs = [
                randn(&xs, seed),
                scale(c, seed + 1),
                randn(&[c], seed + 2),
                randn(&[o, c, k, k], seed + 3),
            ];
            assert_equal_on(
                dev,
                &format!(
                    "bn_relu_conv2d_train {:?} k={k} stride={stride}",
                    xs[0].shape()
                ),
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
    test_device!(
        bn_relu_conv_equals_the_unfused_ops,
        bn_relu_conv_equals_the_unfused_ops_cpu,
        bn_relu_conv_equals_the_unfused_ops_cuda
    );

    /// The tail equals bn_relu_train, conv2d, bn_add_relu_train in a row.
    fn tail_equals_the_unfused_ops(dev: &Device) {
        for (n, c, o, hw, seed) in [
            (3, 4, 8, 5, 60u64),
            (2, 6, 12, 7, 70),
            (4, 16, 64, 14, 1011),
        ] {
            let xs = [
                randn(&[n, c, hw, hw], seed),
                scale(c, seed + 1),
                randn(&[c], seed + 2),
                randn(&[o, c, 1, 1], seed + 3),
                scale(o, seed + 4),
                randn(&[o], seed + 5),
                randn(&[n, o, hw, hw], seed + 6),
            ];
            assert_equal_on(
                dev,
                &format!("tail n={n} c={c} o={o}"),
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
    test_device!(
        tail_equals_the_unfused_ops,
        tail_equals_the_unfused_ops_cpu,
        tail_equals_the_unfused_ops_cuda
    );

    /// The stem's bn -> ReLU -> max pool as one op equals the two ops, including the gradient
    /// routed through overlapping windows.
    fn pool_equals_the_unfused_ops(dev: &Device) {
        for (shape, seed) in [([3, 4, 9, 8], 71u64), ([4, 8, 18, 17], 1021)] {
            let c = shape[1];
            let xs = [
                randn(&shape, seed),
                scale(c, seed + 1),
                randn(&[c], seed + 2),
            ];
            assert_equal_on(
                dev,
                &format!("bn_relu_max_pool2d_train {shape:?}"),
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
    }
    test_device!(
        pool_equals_the_unfused_ops,
        pool_equals_the_unfused_ops_cpu,
        pool_equals_the_unfused_ops_cuda
    );

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

    /// Only the weight tracked: dw alone (the BN backward skipped), equal to the dw of a run
    /// with every input tracked (bit for bit on the CPU, 1e-5 of its largest value on a GPU).
    fn frozen_bn_gives_the_weight_gradient_alone(dev: &Device) {
        let xs = [
            randn(&[2, 3, 4, 4], 51),
            scale(3, 52),
            randn(&[3], 53),
            randn(&[2, 3, 1, 1], 54),
        ];
        let op: Op = &|t, v| {
            Ok(vec![
                t.bn_relu_conv2d_train(&v[0], &v[1], &v[2], &v[3], 1, 0, BN_EPS)?
                    .0,
            ])
        };
        let [_, g_all] = run(dev, Precision::F32, &xs, op);
        let on: Vec<Tensor> = xs.iter().map(|t| t.to_device(dev).unwrap()).collect();
        let mut tape = Tape::new();
        let wt = tape.track(&on[3]);
        let (z, _) = tape
            .bn_relu_conv2d_train(&on[0], &on[1], &on[2], &wt, 1, 0, BN_EPS)
            .unwrap();
        let dz = randn(z.shape(), 4242).to_device(dev).unwrap();
        let grads = tape.backward_from(vec![(z, dz)]).unwrap();
        assert_eq!(grads.len(), 1, "only the weight's gradient");
        let dw = grads.get(&wt).unwrap().to_vec().unwrap();
        let tol = if *dev == Device::Cpu { 0.0 } else { 1e-5 };
        assert_within("dw alone vs with everything tracked", &dw, &g_all[3], tol);
    }
    test_device!(
        frozen_bn_gives_the_weight_gradient_alone,
        frozen_bn_gives_the_weight_gradient_alone_cpu,
        frozen_bn_gives_the_weight_gradient_alone_cuda
    );

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
