//! The CUDA arms of the tape ops not yet written the one-closure way (feature `cuda`): batch
//! norm, its running update, the fused and recomputing BN ops. Each op file validates its
//! arguments (the same shape errors on every device), then calls the function here when its
//! inputs are on a GPU, which records a closure of its own. The ops converted so far (ReLU,
//! GELU, the pools, sum/mean, conv2d, matmul, linear, wn_linear) record one closure in their
//! own file, whose helpers match on `ops::Backend` (README: "Adding an op"). Forward and
//! backward run as launchers of `device::cuda` on the backend's one stream; outputs and
//! gradients stay on the inputs' GPU.

use crate::autograd::Tape;
use crate::device::cuda::{ConvShape, DeviceBuffer};
use crate::device::nvtx;
use crate::error::Result;
use crate::ops::batchnorm::BnDims;
use crate::ops::conv::{conv_shape, Conv2dShape};
use crate::ops::pool::{gpu_pool_shape, Pool2dShape};
use crate::tensor::{DType, Layout, Tensor};

use super::gpu::{alloc_fmt, dbuf, format_of, on_gpu_as, wrap, Be};

// ---------------------------------------------------------------- batch norm

/// Training mode; returns (y, batch mean (C,), unbiased batch variance (C,)), all on the GPU.
pub(crate) fn batch_norm_train(
    tape: &mut Tape,
    be: Be,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    d: BnDims,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let _r = nvtx::Range::new("batch_norm_train");
    let op = "batch_norm_train";
    let (mean, invstd, var_unbiased) = batch_stats(&be, op, x, d, eps)?;
    let y = bn_apply(&be, op, x, &mean, &invstd, gamma, beta, d)?;
    let mean = wrap(&be, mean, &[d.c])?;
    let var_t = wrap(&be, var_unbiased, &[d.c])?;
    record_bn_backward(tape, be, op, true, x, gamma, beta, &y, &mean, invstd, d);
    Ok((y, mean, var_t))
}

/// Eval mode with the running statistics (constants); differentiable w.r.t. x, gamma, beta.
#[allow(clippy::too_many_arguments)]
pub(crate) fn batch_norm_eval(
    tape: &mut Tape,
    be: Be,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    d: BnDims,
    eps: f32,
) -> Result<Tensor> {
    let _r = nvtx::Range::new("batch_norm_eval");
    let op = "batch_norm_eval";
    let mut invstd = be.alloc_f32(d.c)?; // (C,)
    be.batch_norm_invstd(dbuf(op, running_var)?, d.c, eps, &mut invstd)?;
    let y = bn_apply(&be, op, x, dbuf(op, running_mean)?, &invstd, gamma, beta, d)?;
    record_bn_backward(
        tape,
        be,
        op,
        false,
        x,
        gamma,
        beta,
        &y,
        running_mean,
        invstd,
        d,
    );
    Ok(y)
}

/// y = (x - mean) * invstd * gamma + beta, per channel: the forward shared by both modes.
#[allow(clippy::too_many_arguments)]
fn bn_apply(
    be: &Be,
    op: &str,
    x: &Tensor,
    mean: &DeviceBuffer,
    invstd: &DeviceBuffer,
    gamma: &Tensor,
    beta: &Tensor,
    d: BnDims,
) -> Result<Tensor> {
    let mut y = alloc_fmt(be, format_of(x), d.numel())?; // (N, C, S)
    be.batch_norm_forward(
        dbuf(op, x)?,
        mean,
        invstd,
        dbuf(op, gamma)?,
        dbuf(op, beta)?,
        d.n,
        d.c,
        d.s,
        &mut y,
    )?;
    wrap(be, y, x.shape())
}

/// Records the backward of either BN mode: `training` adds the batch-statistics terms to dx;
/// `mean`/`invstd` are the statistics the forward normalized with (batch or running).
#[allow(clippy::too_many_arguments)]
fn record_bn_backward(
    tape: &mut Tape,
    be: Be,
    op: &'static str,
    training: bool,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    y: &Tensor,
    mean: &Tensor,
    invstd: DeviceBuffer,
    d: BnDims,
) {
    if !tape.is_recording() {
        return;
    }
    let (sx, sg, sm) = (x.clone(), gamma.clone(), mean.clone());
    let f = format_of(x);
    tape.record(op, y, &[x, gamma, beta], move |dy| {
        let _r = nvtx::Range::new(&format!("{op} backward"));
        let dy = on_gpu_as(&be, dy, f)?;
        dy.expect_shape(&format!("{op} backward dy"), sx.shape())?;
        let mut dx = alloc_fmt(&be, f, d.numel())?;
        let mut dgamma = be.alloc_f32(d.c)?;
        let mut dbeta = be.alloc_f32(d.c)?;
        be.batch_norm_backward(
            training,
            dbuf(op, &dy)?,
            dbuf(op, &sx)?,
            dbuf(op, &sm)?,
            &invstd,
            dbuf(op, &sg)?,
            d.n,
            d.c,
            d.s,
            &mut dx,
            &mut dgamma,
            &mut dbeta,
        )?;
        Ok(vec![
            Some(wrap(&be, dx, sx.shape())?),
            Some(wrap(&be, dgamma, &[d.c])?),
            Some(wrap(&be, dbeta, &[d.c])?),
        ])
    });
}

/// The new (running_mean, running_var); the inputs are left untouched (copied, then updated in
/// place by the kernel).
pub(crate) fn bn_running_update(
    be: &Be,
    running_mean: &Tensor,
    running_var: &Tensor,
    batch_mean: &Tensor,
    batch_var_unbiased: &Tensor,
    momentum: f32,
) -> Result<(Tensor, Tensor)> {
    let op = "bn_running_update";
    let c = running_mean.numel();
    let mut rm = be.alloc_f32(c)?;
    let mut rv = be.alloc_f32(c)?;
    be.copy_dtod(dbuf(op, running_mean)?, &mut rm)?;
    be.copy_dtod(dbuf(op, running_var)?, &mut rv)?;
    be.batch_norm_running_update(
        &mut rm,
        &mut rv,
        dbuf(op, batch_mean)?,
        dbuf(op, batch_var_unbiased)?,
        c,
        momentum,
    )?;
    Ok((wrap(be, rm, &[c])?, wrap(be, rv, &[c])?))
}

// ---------------------------------------------------------------- fused BN + ReLU (+ add)

/// The batch statistics of x (N, C, S): (mean, 1 / sqrt(biased var + eps), unbiased var),
/// each (C,) in f32.
fn batch_stats(
    be: &Be,
    op: &str,
    x: &Tensor,
    d: BnDims,
    eps: f32,
) -> Result<(DeviceBuffer, DeviceBuffer, DeviceBuffer)> {
    let mut mean = be.alloc_f32(d.c)?;
    let mut invstd = be.alloc_f32(d.c)?;
    let mut var_unbiased = be.alloc_f32(d.c)?;
    be.batch_norm_stats(
        dbuf(op, x)?,
        d.n,
        d.c,
        d.s,
        eps,
        &mut mean,
        &mut invstd,
        &mut var_unbiased,
    )?;
    Ok((mean, invstd, var_unbiased))
}

/// relu(BN(x) [+ residual]) in training mode (src/ops/fused.rs): the batch statistics as
/// `batch_norm_train`, then one fused apply pass. Returns (y, batch mean (C,), unbiased batch
/// variance (C,)), all on the GPU.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_act_train(
    tape: &mut Tape,
    be: Be,
    op: &'static str,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    d: BnDims,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let _r = nvtx::Range::new(op);
    let (mean, invstd, var_unbiased) = batch_stats(&be, op, x, d, eps)?;
    let y = bn_act_apply(&be, op, x, residual, &mean, &invstd, gamma, beta, d)?;
    let mean = wrap(&be, mean, &[d.c])?;
    let var_t = wrap(&be, var_unbiased, &[d.c])?;
    record_bn_act_backward(
        tape, be, op, true, x, gamma, beta, residual, &y, &mean, invstd, d,
    );
    Ok((y, mean, var_t))
}

/// What the GPU keeps of a training-mode BN + ReLU whose output is recomputed
/// (src/ops/recompute.rs): x, the parameters and the batch statistics. The output is in x's
/// format (bf16 / NHWC); the statistics are f32.
struct BnReluGpu {
    be: Be,
    op: &'static str,
    x: Tensor,            // (N, C, H, W)
    gamma: Tensor,        // (C,)
    beta: Tensor,         // (C,)
    mean: Tensor,         // (C,)
    invstd: DeviceBuffer, // (C,) 1 / sqrt(biased var + eps)
    d: BnDims,
}

impl BnReluGpu {
    /// The batch statistics as `bn_act_train`. Returns the BN, its output and the unbiased
    /// batch variance (C,).
    fn forward(
        be: &Be,
        op: &'static str,
        [x, gamma, beta]: [&Tensor; 3],
        d: BnDims,
        eps: f32,
    ) -> Result<(BnReluGpu, Tensor, Tensor)> {
        let (mean, invstd, var_unbiased) = batch_stats(be, op, x, d, eps)?;
        let bn = BnReluGpu {
            be: be.clone(),
            op,
            x: x.clone(),
            gamma: gamma.clone(),
            beta: beta.clone(),
            mean: wrap(be, mean, &[d.c])?,
            invstd,
            d,
        };
        let y = bn.output()?;
        Ok((bn, y, wrap(be, var_unbiased, &[d.c])?))
    }

    /// The output (N, C, H, W); again in backward (deterministic: the same kernel and inputs).
    fn output(&self) -> Result<Tensor> {
        let mean = dbuf(self.op, &self.mean)?;
        let (x, g, b) = (&self.x, &self.gamma, &self.beta);
        bn_act_apply(&self.be, self.op, x, None, mean, &self.invstd, g, b, self.d)
    }

    /// [dx, dgamma, dbeta] from the output y and its gradient dy (in x's format).
    fn backward(&self, y: &Tensor, dy: &DeviceBuffer) -> Result<Vec<Option<Tensor>>> {
        let (be, d, op) = (&self.be, self.d, self.op);
        let mut dx = alloc_fmt(be, format_of(&self.x), d.numel())?; // (N, C, H, W)
        let mut dgamma = be.alloc_f32(d.c)?;
        let mut dbeta = be.alloc_f32(d.c)?;
        be.bn_act_backward(
            true,
            dy,
            dbuf(op, y)?,
            dbuf(op, &self.x)?,
            dbuf(op, &self.mean)?,
            &self.invstd,
            dbuf(op, &self.gamma)?,
            d.n,
            d.c,
            d.s,
            &mut dx,
            None,
            &mut dgamma,
            &mut dbeta,
        )?;
        Ok(vec![
            Some(wrap(be, dx, self.x.shape())?),
            Some(wrap(be, dgamma, &[d.c])?),
            Some(wrap(be, dbeta, &[d.c])?),
        ])
    }
}

/// What the GPU keeps of one bn -> ReLU -> conv segment in training mode, and its
/// recomputation and backward (the weight in x's format, as `conv2d`).
struct BnReluConvGpu {
    bn: BnReluGpu,
    wf: Tensor, // (O, C, KH, KW) in x's format
    w_shape: Vec<usize>,
    cs: ConvShape,
    s: Conv2dShape,
}

impl BnReluConvGpu {
    /// The forward; the BN output is dropped. Returns the segment, z (N, O, HO, WO) and the
    /// unbiased batch variance (C,).
    fn forward(
        be: &Be,
        op: &'static str,
        [x, gamma, beta, w]: [&Tensor; 4],
        d: BnDims,
        s: Conv2dShape,
        eps: f32,
    ) -> Result<(BnReluConvGpu, DeviceBuffer, Tensor)> {
        let (bn, y, var) = BnReluGpu::forward(be, op, [x, gamma, beta], d, eps)?;
        let f = format_of(x);
        let seg = BnReluConvGpu {
            bn,
            wf: w.to_format(f.0, f.1)?,
            w_shape: w.shape().to_vec(),
            cs: conv_shape(s),
            s,
        };
        let z = seg.conv_output(&y)?;
        Ok((seg, z, var))
    }

    /// The convolution's output (N, O, HO, WO) of the BN output `y`.
    fn conv_output(&self, y: &Tensor) -> Result<DeviceBuffer> {
        let (be, op) = (&self.bn.be, self.bn.op);
        let mut z = alloc_fmt(be, format_of(&self.bn.x), self.s.y_len())?;
        be.conv2d_forward(&self.cs, dbuf(op, y)?, dbuf(op, &self.wf)?, &mut z)?;
        Ok(z)
    }

    /// Gradients [dx, dgamma, dbeta, dw] from dz (in x's format) and the recomputed BN output
    /// y; `need_dw` / `need_bn` skip the filter gradient / the BN backward.
    fn backward(
        &self,
        y: &Tensor,
        dz: &DeviceBuffer,
        need_dw: bool,
        need_bn: bool,
    ) -> Result<Vec<Option<Tensor>>> {
        let (be, op) = (&self.bn.be, self.bn.op);
        let f = format_of(&self.bn.x);
        let dw = if need_dw {
            let mut dw = alloc_fmt(be, f, self.s.w_len())?; // (O, C, KH, KW)
            be.conv2d_backward_filter(&self.cs, dbuf(op, y)?, dz, &mut dw)?;
            // Widened at once, as conv2d does (f32 accumulation across uses of the weight).
            Some(wrap(be, dw, &self.w_shape)?.to_format(DType::F32, Layout::Nchw)?)
        } else {
            None
        };
        if !need_bn {
            return Ok(vec![None, None, None, dw]);
        }
        let mut dy = alloc_fmt(be, f, self.bn.d.numel())?; // (N, C, H, W)
        be.conv2d_backward_data(&self.cs, dbuf(op, &self.wf)?, dz, &mut dy)?;
        let mut grads = self.bn.backward(y, &dy)?;
        grads.push(dw);
        Ok(grads)
    }
}

/// conv2d(relu(BN(x)), w) in training mode without keeping the BN output
/// (src/ops/recompute.rs); `t` = [x, gamma, beta, w]. Returns (z, (batch mean, unbiased batch
/// variance)).
pub(crate) fn bn_relu_conv2d_train(
    tape: &mut Tape,
    be: Be,
    t: [&Tensor; 4],
    d: BnDims,
    s: Conv2dShape,
    eps: f32,
) -> Result<(Tensor, (Tensor, Tensor))> {
    let op = "bn_relu_conv2d_train";
    let _r = nvtx::Range::new(op);
    let (seg, z, var) = BnReluConvGpu::forward(&be, op, t, d, s, eps)?;
    let z_shape = [s.n, s.o, s.ho(), s.wo()];
    let z = wrap(&be, z, &z_shape)?;
    let mean = seg.bn.mean.clone();
    let [x, gamma, beta, w] = t;
    let need_dw = tape.requires_grad(w);
    let need_bn = [x, gamma, beta].iter().any(|t| tape.requires_grad(t));
    let f = format_of(x);
    tape.record(op, &z, &t, move |dz| {
        let _r = nvtx::Range::new(&format!("{op} backward"));
        let dz = on_gpu_as(&seg.bn.be, dz, f)?;
        dz.expect_shape(&format!("{op} backward dz"), &z_shape)?;
        let y = seg.bn.output()?;
        seg.backward(&y, dbuf(op, &dz)?, need_dw, need_bn)
    });
    Ok((z, (mean, var)))
}

/// relu(bn3(conv2d(relu(bn2(x)), w)) + residual) in training mode, keeping neither BN output
/// nor the convolution's output (src/ops/recompute.rs); `t` = [x, gamma2, beta2, w, gamma3,
/// beta3, residual]. Returns (y, bn2's statistics, bn3's statistics).
#[allow(clippy::type_complexity)]
pub(crate) fn bottleneck_tail_train(
    tape: &mut Tape,
    be: Be,
    t: [&Tensor; 7],
    d2: BnDims,
    s: Conv2dShape,
    eps: f32,
) -> Result<(Tensor, (Tensor, Tensor), (Tensor, Tensor))> {
    let op = "bn_relu_conv2d_bn_add_relu_train";
    let _r = nvtx::Range::new(op);
    let [x, gamma2, beta2, w, gamma3, beta3, residual] = t;
    let (seg, x3, var2) = BnReluConvGpu::forward(&be, op, [x, gamma2, beta2, w], d2, s, eps)?;
    let y_shape = [s.n, s.o, s.ho(), s.wo()];
    let d3 = BnDims::of(op, &y_shape)?;
    let x3 = wrap(&be, x3, &y_shape)?;
    let (y, mean3, var3, invstd3) = {
        let (mean, invstd, var_unbiased) = batch_stats(&be, op, &x3, d3, eps)?;
        let y = bn_act_apply(
            &be,
            op,
            &x3,
            Some(residual),
            &mean,
            &invstd,
            gamma3,
            beta3,
            d3,
        )?;
        let mean = wrap(&be, mean, &[d3.c])?;
        (y, mean, wrap(&be, var_unbiased, &[d3.c])?, invstd)
    };
    drop(x3);
    let stats2 = (seg.bn.mean.clone(), var2);
    let need_dw = tape.requires_grad(w);
    let need_bn2 = [x, gamma2, beta2].iter().any(|t| tape.requires_grad(t));
    let f = format_of(x);
    let (sy, sg3, sm3) = (y.clone(), gamma3.clone(), mean3.clone());
    tape.record(op, &y, &t, move |dy| {
        let _r = nvtx::Range::new(&format!("{op} backward"));
        let be = &seg.bn.be;
        let dy = on_gpu_as(be, dy, f)?;
        dy.expect_shape(&format!("{op} backward dy"), &y_shape)?;
        // The forward's bn2 output and convolution output, again.
        let y2 = seg.bn.output()?;
        let x3 = seg.conv_output(&y2)?;
        let mut dx3 = alloc_fmt(be, f, d3.numel())?; // (N, O, H, W)
        let mut dres = alloc_fmt(be, f, d3.numel())?; // (N, O, H, W)
        let mut dgamma3 = be.alloc_f32(d3.c)?;
        let mut dbeta3 = be.alloc_f32(d3.c)?;
        be.bn_act_backward(
            true,
            dbuf(op, &dy)?,
            dbuf(op, &sy)?,
            &x3,
            dbuf(op, &sm3)?,
            &invstd3,
            dbuf(op, &sg3)?,
            d3.n,
            d3.c,
            d3.s,
            &mut dx3,
            Some(&mut dres),
            &mut dgamma3,
            &mut dbeta3,
        )?;
        drop(x3);
        let mut grads = seg.backward(&y2, &dx3, need_dw, need_bn2)?;
        grads.extend([
            Some(wrap(be, dgamma3, &[d3.c])?),
            Some(wrap(be, dbeta3, &[d3.c])?),
            Some(wrap(be, dres, &y_shape)?),
        ]);
        Ok(grads)
    });
    Ok((y, stats2, (mean3, var3)))
}

/// max_pool2d(relu(BN(x))) in training mode (the stem), keeping neither the BN output nor the
/// pool's argmax (src/ops/recompute.rs): backward applies the BN again and reruns the pool's
/// forward for its argmax. `t` = [x, gamma, beta]. Returns (the pooled output, (batch mean,
/// unbiased batch variance)).
pub(crate) fn bn_relu_max_pool2d_train(
    tape: &mut Tape,
    be: Be,
    t: [&Tensor; 3],
    d: BnDims,
    s: Pool2dShape,
    eps: f32,
) -> Result<(Tensor, (Tensor, Tensor))> {
    let op = "bn_relu_max_pool2d_train";
    let _r = nvtx::Range::new(op);
    let (bn, y, var) = BnReluGpu::forward(&be, op, t, d, eps)?;
    let gs = gpu_pool_shape(s);
    let f = format_of(t[0]);
    // The pooled output and its argmax (i32 (N, C, HO, WO): the index in the plane) of y.
    let pool = move |be: &Be, y: &Tensor| -> Result<(DeviceBuffer, DeviceBuffer)> {
        let mut p = alloc_fmt(be, f, s.y_len())?;
        let mut argmax = be.alloc_bytes(s.y_len() * 4)?;
        be.max_pool2d_forward(&gs, dbuf(op, y)?, &mut p, &mut argmax)?;
        Ok((p, argmax))
    };
    let (p, _) = pool(&be, &y)?;
    drop(y);
    let p_shape = [s.n, s.c, s.ho(), s.wo()];
    let p = wrap(&be, p, &p_shape)?;
    let mean = bn.mean.clone();
    tape.record(op, &p, &t, move |dp| {
        let _r = nvtx::Range::new(&format!("{op} backward"));
        let be = &bn.be;
        let dp = on_gpu_as(be, dp, f)?;
        dp.expect_shape(&format!("{op} backward dp"), &p_shape)?;
        let y = bn.output()?;
        let (_, argmax) = pool(be, &y)?;
        let mut dy = alloc_fmt(be, f, s.x_len())?; // (N, C, H, W)
        be.max_pool2d_backward(&gs, dbuf(op, &dp)?, &argmax, &mut dy)?;
        bn.backward(&y, &dy)
    });
    Ok((p, (mean, var)))
}

/// relu(BN(x) [+ residual]) in eval mode with the running statistics (constants).
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_act_eval(
    tape: &mut Tape,
    be: Be,
    op: &'static str,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    running_mean: &Tensor,
    running_var: &Tensor,
    d: BnDims,
    eps: f32,
) -> Result<Tensor> {
    let _r = nvtx::Range::new(op);
    let mut invstd = be.alloc_f32(d.c)?; // (C,)
    be.batch_norm_invstd(dbuf(op, running_var)?, d.c, eps, &mut invstd)?;
    let y = bn_act_apply(
        &be,
        op,
        x,
        residual,
        dbuf(op, running_mean)?,
        &invstd,
        gamma,
        beta,
        d,
    )?;
    record_bn_act_backward(
        tape,
        be,
        op,
        false,
        x,
        gamma,
        beta,
        residual,
        &y,
        running_mean,
        invstd,
        d,
    );
    Ok(y)
}

/// The fused forward pass shared by both modes.
#[allow(clippy::too_many_arguments)]
fn bn_act_apply(
    be: &Be,
    op: &str,
    x: &Tensor,
    residual: Option<&Tensor>,
    mean: &DeviceBuffer,
    invstd: &DeviceBuffer,
    gamma: &Tensor,
    beta: &Tensor,
    d: BnDims,
) -> Result<Tensor> {
    let f = format_of(x);
    let residual = residual.map(|r| r.to_format(f.0, f.1)).transpose()?;
    let residual = residual.as_ref();
    let mut y = alloc_fmt(be, f, d.numel())?; // (N, C, S)
    be.bn_act_forward(
        dbuf(op, x)?,
        residual.map(|r| dbuf(op, r)).transpose()?,
        mean,
        invstd,
        dbuf(op, gamma)?,
        dbuf(op, beta)?,
        d.n,
        d.c,
        d.s,
        &mut y,
    )?;
    wrap(be, y, x.shape())
}

/// Records the fused backward of either mode: gradients for x, gamma, beta (and the residual).
/// Saves x, the output y (the ReLU mask), gamma and the statistics.
#[allow(clippy::too_many_arguments)]
fn record_bn_act_backward(
    tape: &mut Tape,
    be: Be,
    op: &'static str,
    training: bool,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    y: &Tensor,
    mean: &Tensor,
    invstd: DeviceBuffer,
    d: BnDims,
) {
    if !tape.is_recording() {
        return;
    }
    let mut inputs = vec![x, gamma, beta];
    inputs.extend(residual);
    let with_residual = residual.is_some();
    let (sx, sy, sg, sm) = (x.clone(), y.clone(), gamma.clone(), mean.clone());
    let f = format_of(x);
    tape.record(op, y, &inputs, move |dy| {
        let _r = nvtx::Range::new(&format!("{op} backward"));
        let dy = on_gpu_as(&be, dy, f)?;
        dy.expect_shape(&format!("{op} backward dy"), sx.shape())?;
        let mut dx = alloc_fmt(&be, f, d.numel())?; // (N, C, S)
        let mut dres = if with_residual {
            Some(alloc_fmt(&be, f, d.numel())?) // (N, C, S)
        } else {
            None
        };
        let mut dgamma = be.alloc_f32(d.c)?;
        let mut dbeta = be.alloc_f32(d.c)?;
        be.bn_act_backward(
            training,
            dbuf(op, &dy)?,
            dbuf(op, &sy)?,
            dbuf(op, &sx)?,
            dbuf(op, &sm)?,
            &invstd,
            dbuf(op, &sg)?,
            d.n,
            d.c,
            d.s,
            &mut dx,
            dres.as_mut(),
            &mut dgamma,
            &mut dbeta,
        )?;
        let mut grads = vec![
            Some(wrap(&be, dx, sx.shape())?),
            Some(wrap(&be, dgamma, &[d.c])?),
            Some(wrap(&be, dbeta, &[d.c])?),
        ];
        if let Some(r) = dres {
            grads.push(Some(wrap(&be, r, sx.shape())?));
        }
        Ok(grads)
    });
}
