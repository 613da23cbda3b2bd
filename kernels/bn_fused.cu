// Fused batch norm + ReLU (+ residual add), f32, NCHW: y = max(bn(x) [+ residual], 0), the tape
// ops bn_relu / bn_add_relu (src/ops/fused.rs). The training statistics come from batchnorm.cu's
// kernels (bn_sum_partial_f32, bn_sqdev_partial_f32, bn_stats_finalize_f32; eval mode:
// bn_invstd_f32 of the running variance) and the parameter-gradient partials are combined by its
// bn_backward_finalize_f32; this file adds the passes that differ:
// - forward: one elementwise pass writing only the final output (no BN output, no sum);
// - backward: one partial-reduction pass of sum(dy') and sum(dy' * xhat) with the ReLU mask
//   applied on the fly (dy' = dy where y > 0), on batchnorm.cu's (C, S) grid of slices, which
//   also writes dresidual = dy' for bn_add_relu; then one elementwise pass for dx that reads the
//   masked dresidual instead of dy and y when there is one (5 tensor passes instead of the 6 of
//   relu backward -> BN backward; 6 without a residual, and one write fewer than unfused).
// The residual / dresidual pointers may be null (bn_relu: no residual).
//
// The numerics equal the unfused kernels' (bn_forward_f32 -> add_f32 -> relu_fwd_f32 and
// relu_bwd_f32 -> bn_backward_*): the same expressions in the same order.

// The emulator (tests/gpu_sim) compiles every kernel file in one unit and includes batchnorm.cu
// itself; nvcc compiles this file alone, so it brings batchnorm.cu's helpers in here (its kernels
// are compiled into this module too but not loaded from it).
#ifndef CARP_BATCHNORM_CU_INCLUDED
#include "batchnorm.cu"
#endif

// y = max((x - mean[c]) * invstd[c] * gamma[c] + beta[c] [+ residual], 0).
// x, residual, y: (N, C, HW); the rest (C,). Training: batch mean / invstd; eval: the running
// mean and bn_invstd_f32(running_var).
extern "C" __global__ void bn_act_forward_f32(
    const float* __restrict__ x, const float* __restrict__ residual,
    const float* __restrict__ mean, const float* __restrict__ invstd,
    const float* __restrict__ gamma, const float* __restrict__ beta, float* __restrict__ y, i64 N,
    int C, i64 HW) {
    const bool has_r = residual != nullptr;
    if ((HW & 3) == 0 && bn_aligned16(x) && bn_aligned16(y) && (!has_r || bn_aligned16(residual))) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
        const float4* r4 = reinterpret_cast<const float4*>(residual);
        float4* y4 = reinterpret_cast<float4*>(y);
        bn_for_each(N * C * HW / 4, C, HW / 4, [&](i64 i, int c) {
            const float mu = mean[c], a = invstd[c] * gamma[c], b = beta[c];
            const float4 v = x4[i];
            float4 t;
            t.x = (v.x - mu) * a + b;
            t.y = (v.y - mu) * a + b;
            t.z = (v.z - mu) * a + b;
            t.w = (v.w - mu) * a + b;
            if (has_r) {
                const float4 s = r4[i];
                t.x += s.x;
                t.y += s.y;
                t.z += s.z;
                t.w += s.w;
            }
            float4 r;
            r.x = fmaxf(t.x, 0.0f);
            r.y = fmaxf(t.y, 0.0f);
            r.z = fmaxf(t.z, 0.0f);
            r.w = fmaxf(t.w, 0.0f);
            y4[i] = r;
        });
    } else {
        bn_for_each(N * C * HW, C, HW, [&](i64 i, int c) {
            float t = (x[i] - mean[c]) * (invstd[c] * gamma[c]) + beta[c];
            if (has_r) t += residual[i];
            y[i] = fmaxf(t, 0.0f);
        });
    }
}

// Parameter-gradient partials of the fused op on the (C, S) grid (as bn_backward_partial_f32,
// combined by bn_backward_finalize_f32): part_g = sum dy' * xhat, part_b = sum dy' over block
// (c, s)'s slice, dy' = dy where y > 0 (y: the fused forward's output); dmasked = dy' when not
// null (the residual's gradient, read back by the dx pass). dy, y, x, dmasked: (N, C, HW);
// mean, invstd: (C,); part_g, part_b: (C, S). The slices partition every channel, so each
// element of dmasked is written by exactly one thread.
extern "C" __global__ void bn_act_backward_partial_f32(
    const float* __restrict__ dy, const float* __restrict__ y, const float* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ invstd, float* __restrict__ part_g,
    float* __restrict__ part_b, float* __restrict__ dmasked, i64 N, int C, i64 HW) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    const float mu = mean[c];
    i64 m0, m1;
    bn_slice(N * HW, &m0, &m1);
    float sg = 0.0f, sb = 0.0f;
    if (dmasked != nullptr) {
        bn_channel_walk(c, C, HW, m0, m1, [&](i64 i) {
            const float g = y[i] > 0.0f ? dy[i] : 0.0f;
            dmasked[i] = g;
            sb += g;
            sg += g * (x[i] - mu);
        });
    } else {
        bn_channel_walk(c, C, HW, m0, m1, [&](i64 i) {
            const float g = y[i] > 0.0f ? dy[i] : 0.0f;
            sb += g;
            sg += g * (x[i] - mu);
        });
    }
    sg = block_sum(sg, scratch) * invstd[c];
    sb = block_sum(sb, scratch);
    if (threadIdx.x == 0) {
        const i64 o = (i64)c * gridDim.y + blockIdx.y;
        part_g[o] = sg;
        part_b[o] = sb;
    }
}

// The fused op's input gradient (after bn_backward_finalize_f32), with dy' = dy where y > 0,
// or dy' = dy when y is null (dy is then the partial pass's dmasked, already masked):
// training (batch statistics): dx = k * (M * dy' - dbeta - xhat * dgamma), k = gamma * invstd / M
// (bn_backward_dx_f32's expression); eval (constant running statistics): dx = dy' * gamma *
// invstd. All (N, C, HW) / (C,).
extern "C" __global__ void bn_act_backward_dx_f32(
    const float* __restrict__ dy, const float* __restrict__ y, const float* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ invstd,
    const float* __restrict__ gamma, const float* __restrict__ dgamma,
    const float* __restrict__ dbeta, float* __restrict__ dx, i64 N, int C, i64 HW,
    int training) {
    const float Mf = (float)(N * HW);
    const bool masked = y == nullptr;
    // dx of one element from its masked gradient g (the two modes' expressions).
    auto dx_of = [&](float g, float v, int c) {
        if (training) {
            const float k = gamma[c] * invstd[c] / Mf;
            return k * (Mf * g - dbeta[c] - (v - mean[c]) * invstd[c] * dgamma[c]);
        }
        return g * gamma[c] * invstd[c];
    };
    if ((HW & 3) == 0 && bn_aligned16(dy) && (masked || bn_aligned16(y)) && bn_aligned16(x) &&
        bn_aligned16(dx)) {
        const float4* dy4 = reinterpret_cast<const float4*>(dy);
        const float4* y4 = reinterpret_cast<const float4*>(y);
        const float4* x4 = reinterpret_cast<const float4*>(x);
        float4* dx4 = reinterpret_cast<float4*>(dx);
        bn_for_each(N * C * HW / 4, C, HW / 4, [&](i64 i, int c) {
            float4 g = dy4[i];
            if (!masked) {
                const float4 o = y4[i];
                g.x = o.x > 0.0f ? g.x : 0.0f;
                g.y = o.y > 0.0f ? g.y : 0.0f;
                g.z = o.z > 0.0f ? g.z : 0.0f;
                g.w = o.w > 0.0f ? g.w : 0.0f;
            }
            const float4 v = x4[i];
            float4 r;
            r.x = dx_of(g.x, v.x, c);
            r.y = dx_of(g.y, v.y, c);
            r.z = dx_of(g.z, v.z, c);
            r.w = dx_of(g.w, v.w, c);
            dx4[i] = r;
        });
    } else {
        bn_for_each(N * C * HW, C, HW, [&](i64 i, int c) {
            const float g = masked || y[i] > 0.0f ? dy[i] : 0.0f;
            dx[i] = dx_of(g, x[i], c);
        });
    }
}
