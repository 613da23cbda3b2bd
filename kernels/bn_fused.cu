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
//
// bf16 activations (common.cuh "bf16 storage"), as batchnorm.cu: each kernel is one body
// templated on the storage type T of its (N, C, HW) tensors (x, residual, y, dy, dmasked, dx),
// instantiated as `*_f32` and `*_bf16`; half the memory traffic, f32 math, statistics and
// partials, one rounding per stored value. The ReLU mask of the backward passes is `y > 0` on
// the stored (bf16) output, as the CPU emulation's mask on its rounded output. Rounding is
// monotonic and keeps the sign, so round(max(t, 0)) = max(round(t), 0) and a negative t never
// passes the mask; a positive t rounds to a positive bf16 except for f32 subnormals below half
// the smallest bf16 subnormal (t < 2^-134), which round to +0 and are masked: their gradient is
// lost, as on the CPU emulation (both read the same stored y), and is immaterial next to
// anything a ReLU in the backbone passes. dmasked is dy or 0: exact in bf16.

// The emulator (tests/gpu_sim) compiles every kernel file in one unit and includes batchnorm.cu
// itself; nvcc compiles this file alone, so it brings batchnorm.cu's helpers in here (its kernels
// are compiled into this module too but not loaded from it).
#ifndef CARP_BATCHNORM_CU_INCLUDED
#include "batchnorm.cu"
#endif

// y = max((x - mean[c]) * invstd[c] * gamma[c] + beta[c] [+ residual], 0).
// x, residual, y: (N, C, HW); the rest (C,). Training: batch mean / invstd; eval: the running
// mean and bn_invstd_f32(running_var).
template <class T>
__device__ __forceinline__ void bn_act_forward(
    const T* __restrict__ x, const T* __restrict__ residual, const float* __restrict__ mean,
    const float* __restrict__ invstd, const float* __restrict__ gamma,
    const float* __restrict__ beta, T* __restrict__ y, i64 N, int C, i64 HW) {
    const bool has_r = residual != nullptr;
    if ((HW & 3) == 0 && aligned4(x) && aligned4(y) && (!has_r || aligned4(residual))) {
        bn_for_each(N * C * HW / 4, C, HW / 4, [&](i64 i, int c) {
            const float mu = mean[c], a = invstd[c] * gamma[c], b = beta[c];
            const float4 v = ld4(x, i);
            float4 t;
            t.x = (v.x - mu) * a + b;
            t.y = (v.y - mu) * a + b;
            t.z = (v.z - mu) * a + b;
            t.w = (v.w - mu) * a + b;
            if (has_r) {
                const float4 s = ld4(residual, i);
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
            st4(y, i, r);
        });
    } else if (HW == 1 && (C & 3) == 0 && aligned4(x) && aligned4(y) &&
               (!has_r || aligned4(residual))) {
        // Four channels of one row (batchnorm.cu bn_for_each_rows4), the one-element expression.
        bn_for_each_rows4(N, C, [&](i64 i, int c) {
            float4 t = lanes(ld4(x, i), c, [&](float v, int k) {
                return (v - mean[k]) * (invstd[k] * gamma[k]) + beta[k];
            });
            if (has_r) {
                const float4 s = ld4(residual, i);
                t.x += s.x;
                t.y += s.y;
                t.z += s.z;
                t.w += s.w;
            }
            st4(y, i, lanes(t, c, [](float v, int) { return fmaxf(v, 0.0f); }));
        });
    } else {
        bn_for_each(N * C * HW, C, HW, [&](i64 i, int c) {
            float t = (ld(x, i) - mean[c]) * (invstd[c] * gamma[c]) + beta[c];
            if (has_r) t += ld(residual, i);
            st(y, i, fmaxf(t, 0.0f));
        });
    }
}
extern "C" __global__ void bn_act_forward_f32(
    const float* __restrict__ x, const float* __restrict__ residual,
    const float* __restrict__ mean, const float* __restrict__ invstd,
    const float* __restrict__ gamma, const float* __restrict__ beta, float* __restrict__ y, i64 N,
    int C, i64 HW) {
    bn_act_forward(x, residual, mean, invstd, gamma, beta, y, N, C, HW);
}
extern "C" __global__ void bn_act_forward_bf16(
    const bf16* __restrict__ x, const bf16* __restrict__ residual,
    const float* __restrict__ mean, const float* __restrict__ invstd,
    const float* __restrict__ gamma, const float* __restrict__ beta, bf16* __restrict__ y, i64 N,
    int C, i64 HW) {
    bn_act_forward(x, residual, mean, invstd, gamma, beta, y, N, C, HW);
}

// Parameter-gradient partials of the fused op on the (C, S) grid (as bn_backward_partial_f32,
// combined by bn_backward_finalize_f32): part_g = sum dy' * xhat, part_b = sum dy' over block
// (c, s)'s slice, dy' = dy where y > 0 (y: the fused forward's output); dmasked = dy' when not
// null (the residual's gradient, read back by the dx pass). dy, y, x, dmasked: (N, C, HW);
// mean, invstd: (C,); part_g, part_b: (C, S). The slices partition every channel, so each
// element of dmasked is written by exactly one thread.
template <class T>
__device__ __forceinline__ void bn_act_backward_partial(
    const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ invstd, float* __restrict__ part_g,
    float* __restrict__ part_b, T* __restrict__ dmasked, i64 N, int C, i64 HW) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    const float mu = mean[c];
    i64 m0, m1;
    bn_slice(N * HW, &m0, &m1);
    float sg = 0.0f, sb = 0.0f;
    // dy is loaded whatever y holds: a load issued only after y's value is known would wait for
    // it, halving the loads in flight of this memory-bound pass (same values either way).
    if (dmasked != nullptr) {
        bn_channel_walk(c, C, HW, m0, m1, [&](i64 i) {
            const float d = ld(dy, i), g = ld(y, i) > 0.0f ? d : 0.0f;
            st(dmasked, i, g);
            sb += g;
            sg += g * (ld(x, i) - mu);
        });
    } else {
        bn_channel_walk(c, C, HW, m0, m1, [&](i64 i) {
            const float d = ld(dy, i), g = ld(y, i) > 0.0f ? d : 0.0f;
            sb += g;
            sg += g * (ld(x, i) - mu);
        });
    }
    bn_store_partials(sg, sb, c, invstd, part_g, part_b, scratch);
}
extern "C" __global__ void bn_act_backward_partial_f32(
    const float* __restrict__ dy, const float* __restrict__ y, const float* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ invstd, float* __restrict__ part_g,
    float* __restrict__ part_b, float* __restrict__ dmasked, i64 N, int C, i64 HW) {
    bn_act_backward_partial(dy, y, x, mean, invstd, part_g, part_b, dmasked, N, C, HW);
}
extern "C" __global__ void bn_act_backward_partial_bf16(
    const bf16* __restrict__ dy, const bf16* __restrict__ y, const bf16* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ invstd, float* __restrict__ part_g,
    float* __restrict__ part_b, bf16* __restrict__ dmasked, i64 N, int C, i64 HW) {
    bn_act_backward_partial(dy, y, x, mean, invstd, part_g, part_b, dmasked, N, C, HW);
}

// dy[i .. i + 4] where y > 0, else 0 (the ReLU's backward, four elements at once).
template <class T>
__device__ __forceinline__ float4 relu_masked4(const T* __restrict__ dy, const T* __restrict__ y,
                                               i64 i) {
    float4 g = ld4(dy, i);
    const float4 o = ld4(y, i);
    g.x = o.x > 0.0f ? g.x : 0.0f;
    g.y = o.y > 0.0f ? g.y : 0.0f;
    g.z = o.z > 0.0f ? g.z : 0.0f;
    g.w = o.w > 0.0f ? g.w : 0.0f;
    return g;
}

// The fused op's input gradient (after bn_backward_finalize_f32), with dy' = dy where y > 0,
// or dy' = dy when y is null (dy is then the partial pass's dmasked, already masked):
// training (batch statistics): dx = k * (M * dy' - dbeta - xhat * dgamma), k = gamma * invstd / M
// (bn_backward_dx_f32's expression); eval (constant running statistics): dx = dy' * gamma *
// invstd. All (N, C, HW) / (C,).
template <class T>
__device__ __forceinline__ void bn_act_backward_dx(
    const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ invstd,
    const float* __restrict__ gamma, const float* __restrict__ dgamma,
    const float* __restrict__ dbeta, T* __restrict__ dx, i64 N, int C, i64 HW, int training) {
    const float Mf = (float)(N * HW);
    const bool masked = y == nullptr;
    // dx of one element of channel c from its masked gradient g and input v, per mode.
    auto dx_train = [&](float g, float v, int c) {
        const float k = gamma[c] * invstd[c] / Mf;
        return k * (Mf * g - dbeta[c] - (v - mean[c]) * invstd[c] * dgamma[c]);
    };
    auto dx_eval = [&](float g, float, int c) { return g * gamma[c] * invstd[c]; };
    auto dx_of = [&](float g, float v, int c) {
        return training ? dx_train(g, v, c) : dx_eval(g, v, c);
    };
    if ((HW & 3) == 0 && aligned4(dy) && (masked || aligned4(y)) && aligned4(x) && aligned4(dx)) {
        bn_for_each(N * C * HW / 4, C, HW / 4, [&](i64 i, int c) {
            const float4 g = masked ? ld4(dy, i) : relu_masked4(dy, y, i);
            const float4 v = ld4(x, i);
            float4 r;
            r.x = dx_of(g.x, v.x, c);
            r.y = dx_of(g.y, v.y, c);
            r.z = dx_of(g.z, v.z, c);
            r.w = dx_of(g.w, v.w, c);
            st4(dx, i, r);
        });
    } else if (HW == 1 && (C & 3) == 0 && aligned4(dy) && (masked || aligned4(y)) &&
               aligned4(x) && aligned4(dx)) {
        // Four channels of one row (batchnorm.cu bn_for_each_rows4), one loop per mode: with
        // the mode's branch outside the loop, the per-channel parameters of a thread's fixed
        // channel quad are loaded once, not per unit (they bound this pass through the L1).
        auto rows4 = [&](auto one) {  // one: dx_train or dx_eval
            bn_for_each_rows4(N, C, [&](i64 i, int c) {
                const float4 g = masked ? ld4(dy, i) : relu_masked4(dy, y, i);
                const float4 v = ld4(x, i);
                float4 r;
                r.x = one(g.x, v.x, c);
                r.y = one(g.y, v.y, c + 1);
                r.z = one(g.z, v.z, c + 2);
                r.w = one(g.w, v.w, c + 3);
                st4(dx, i, r);
            });
        };
        if (training)
            rows4(dx_train);
        else
            rows4(dx_eval);
    } else {
        bn_for_each(N * C * HW, C, HW, [&](i64 i, int c) {
            const float d = ld(dy, i), g = masked || ld(y, i) > 0.0f ? d : 0.0f;
            st(dx, i, dx_of(g, ld(x, i), c));
        });
    }
}
extern "C" __global__ void bn_act_backward_dx_f32(
    const float* __restrict__ dy, const float* __restrict__ y, const float* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ invstd,
    const float* __restrict__ gamma, const float* __restrict__ dgamma,
    const float* __restrict__ dbeta, float* __restrict__ dx, i64 N, int C, i64 HW,
    int training) {
    bn_act_backward_dx(dy, y, x, mean, invstd, gamma, dgamma, dbeta, dx, N, C, HW, training);
}
extern "C" __global__ void bn_act_backward_dx_bf16(
    const bf16* __restrict__ dy, const bf16* __restrict__ y, const bf16* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ invstd,
    const float* __restrict__ gamma, const float* __restrict__ dgamma,
    const float* __restrict__ dbeta, bf16* __restrict__ dx, i64 N, int C, i64 HW,
    int training) {
    bn_act_backward_dx(dy, y, x, mean, invstd, gamma, dgamma, dbeta, dx, N, C, HW, training);
}

// NHWC (channels-last; batchnorm.cu "NHWC"): bn_act_backward_partial_T's partials and dmasked
// for (R, C) NHWC tensors dy, y, x, dmasked, on batchnorm.cu's NHWC geometry (V channels per
// thread, blocks of TX x TY threads: its "LAUNCH GEOMETRY"). part_g, part_b: (C, S), combined by
// bn_backward_finalize_f32. The slices partition the rows and each (row, group < G) belongs to
// one thread, so every element of dmasked (when not null) is written exactly once. The forward
// and dx passes are bn_act_forward_T / bn_act_backward_dx_T with (N = R, C, HW = 1).
template <int V, class T>
__device__ __forceinline__ void bn_act_backward_partial_nhwc_v(
    const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ invstd, float* __restrict__ part_g,
    float* __restrict__ part_b, T* __restrict__ dmasked, i64 R, int C) {
    const int G = C / V;
    const Lanes<V> mu = bn_nhwc_params<V>(mean, G);
    i64 r0, r1;
    bn_slice(R, &r0, &r1);
    Lanes<V> sg = {}, sb = {};
    // The masked gradient of unit u, accumulated; dy loaded whatever y holds (see
    // bn_act_backward_partial_T).
    auto step = [&](i64 u) {
        Lanes<V> g = ldv<V>(dy, u);
        const Lanes<V> o = ldv<V>(y, u), v = ldv<V>(x, u);
        for (int k = 0; k < V; ++k) {
            g.v[k] = o.v[k] > 0.0f ? g.v[k] : 0.0f;
            sb.v[k] += g.v[k];
            sg.v[k] += g.v[k] * (v.v[k] - mu.v[k]);
        }
        return g;
    };
    if (dmasked != nullptr)
        bn_nhwc_walk(G, r0, r1, [&](i64 u) { stv<V>(dmasked, u, step(u)); });
    else
        bn_nhwc_walk(G, r0, r1, [&](i64 u) { step(u); });
    bn_nhwc_store_partials(sg, sb, G, invstd, part_g, part_b);
}
template <class T>
__device__ __forceinline__ void bn_act_backward_partial_nhwc(
    const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ invstd, float* __restrict__ part_g,
    float* __restrict__ part_b, T* __restrict__ dmasked, i64 R, int C) {
    bn_nhwc_dispatch(bn_nhwc_v4(C, dy, y, x, (const T*)dmasked), [&](auto w) {
        bn_act_backward_partial_nhwc_v<decltype(w)::v>(dy, y, x, mean, invstd, part_g, part_b,
                                                       dmasked, R, C);
    });
}
extern "C" __global__ void bn_act_backward_partial_nhwc_f32(
    const float* __restrict__ dy, const float* __restrict__ y, const float* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ invstd, float* __restrict__ part_g,
    float* __restrict__ part_b, float* __restrict__ dmasked, i64 R, int C) {
    bn_act_backward_partial_nhwc(dy, y, x, mean, invstd, part_g, part_b, dmasked, R, C);
}
extern "C" __global__ void bn_act_backward_partial_nhwc_bf16(
    const bf16* __restrict__ dy, const bf16* __restrict__ y, const bf16* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ invstd, float* __restrict__ part_g,
    float* __restrict__ part_b, bf16* __restrict__ dmasked, i64 R, int C) {
    bn_act_backward_partial_nhwc(dy, y, x, mean, invstd, part_g, part_b, dmasked, R, C);
}
