// Batch normalization, f32, NCHW. An (N, C) input (after a linear layer) is the case HW = 1.
// M = N * HW elements per channel. Training mode normalizes with the batch statistics (biased
// variance) and reports the unbiased variance for the running update (PyTorch's convention).
//
// Layout note: x[(n * C + c) * HW + hw]. Channels-last (NHWC) tensors have their own
// per-channel reductions at the end of this file (`*_nhwc_*`); the elementwise kernels serve
// both layouts (an NHWC tensor is the case (N = N * H * W, C, HW = 1)).
//
// Performance layout (why the kernels look like this):
// - The per-channel reductions run on a (C, S) grid: block (c, s) reduces the s-th contiguous
//   slice of channel c's M elements (flattened m = n * HW + hw, slices of ceil(M / S)), so a
//   small C (the stem: 64 channels of 6.4M elements) still fills the GPU. Each block writes one
//   partial per channel to a workspace, part[c * S + s]; a finalize kernel (one block per
//   channel) combines them. Statistics use two passes for accuracy: partial sums -> mean, then
//   partial sums of squared deviations from that mean -> variance (no E[x^2] - E[x]^2).
// - No per-element 64-bit division: a thread locates its first element once (one division)
//   and then advances (n, hw) / (c, hw) incrementally by its constant stride.
// - The elementwise kernels load/store float4 when HW % 4 == 0 and the pointers are 16-byte
//   aligned (all four lanes then lie in one (n, c) plane), or when HW == 1 and C % 4 == 0 (an
//   (N, C) tensor or an NHWC one launched as (R, C, 1): the lanes are four channels of one row,
//   each computed with the one-element path's expression); otherwise one float at a time.
// - Pointers are __restrict__ (the launchers take &mut outputs, so they never alias inputs):
//   read-only data may go through the non-coherent cache and loads may be reordered.
//
// bf16 activations (common.cuh "bf16 storage"): the kernels that touch an (N, C, HW) tensor are
// templated on its storage type T, with an `extern "C"` `*_f32` (T = float) and `*_bf16`
// (T = bf16) instantiation of the same body; only the activation pointers change type. bf16
// halves their memory traffic (these kernels are memory bound); math, statistics, parameters
// and partials stay f32, and each stored activation is rounded once, so a bf16 kernel's output
// is round_bf16(the f32 kernel's output on the widened inputs), its partials equal the f32
// kernel's bit for bit (same grid, same reduction order). The 4-wide paths load four bf16 in
// one 8-byte access (ld4 / st4): they need HW % 4 == 0 and 8-byte aligned bf16 pointers.
#include "common.cuh"

// Calls f(offset) for every element of channel c whose flattened per-channel index
// m = n * HW + hw lies in [m0, m1), thread t taking m0 + t, m0 + t + blockDim.x, ...
// (consecutive threads read consecutive addresses inside a plane: coalesced).
template <class F>
__device__ __forceinline__ void bn_channel_walk(int c, int C, i64 HW, i64 m0, i64 m1, F f) {
    i64 m = m0 + threadIdx.x;
    if (m >= m1) return;
    const i64 B = blockDim.x;
    const i64 plane = (i64)C * HW;  // distance between (n, c, 0) and (n + 1, c, 0)
    i64 n = m / HW;                 // the only divisions: once per thread
    i64 hw = m - n * HW;
    i64 base = (n * C + c) * HW;  // offset of (n, c, 0)
    const i64 dn = B / HW;
    const i64 dhw = B - dn * HW;
    const i64 dbase = dn * plane;
    auto next = [&]() {
        const i64 o = base + hw;
        hw += dhw;
        base += dbase;
        if (hw >= HW) {
            hw -= HW;
            base += plane;
        }
        return o;
    };
    // Four elements per iteration, offsets first: the four loads are independent and issue
    // back to back (a reduction is memory bound and needs several loads in flight per thread).
    for (; m + 3 * B < m1; m += 4 * B) {
        const i64 o0 = next(), o1 = next(), o2 = next(), o3 = next();
        f(o0);
        f(o1);
        f(o2);
        f(o3);
    }
    for (; m < m1; m += B) f(next());
}

// The slice [m0, m1) of channel blockIdx.x's M elements that block (c, s = blockIdx.y) reduces.
__device__ __forceinline__ void bn_slice(i64 M, i64* m0, i64* m1) {
    const i64 S = gridDim.y;
    const i64 chunk = (M + S - 1) / S;
    const i64 a = (i64)blockIdx.y * chunk;
    *m0 = a < M ? a : M;
    *m1 = a + chunk < M ? a + chunk : M;
}

// Sum of part[0..S) over the block (every thread gets it).
__device__ __forceinline__ float bn_sum_parts(const float* part, int S, float* scratch) {
    float acc = 0.0f;
    for (int j = threadIdx.x; j < S; j += blockDim.x) acc += part[j];
    return block_sum(acc, scratch);
}

// Grid-stride loop over the flat index i of an (N, C, HW / V) array of V-wide units, calling
// f(i, c) with c = (i / HWV) % C tracked incrementally (no per-element division).
template <class F>
__device__ __forceinline__ void bn_for_each(i64 total, int C, i64 HWV, F f) {
    const i64 start = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (start >= total) return;
    const i64 stride = (i64)blockDim.x * gridDim.x;
    i64 hw = start % HWV;
    int c = (int)((start / HWV) % C);
    const i64 dhw = stride % HWV;
    const int dc = (int)((stride / HWV) % C);
    for (i64 i = start; i < total; i += stride) {
        f(i, c);
        hw += dhw;
        int carry = 0;
        if (hw >= HWV) {
            hw -= HWV;
            carry = 1;
        }
        // c < C, dc <= C - 1, carry <= 1: one subtraction brings it back below C.
        c += dc + carry;
        if (c >= C) c -= C;
    }
}


// The 4-wide path of the elementwise kernels for HW == 1 (an (N, C) tensor, or an NHWC tensor
// launched as (R, C, 1)) with C % 4 == 0: unit i holds elements 4i .. 4i+3, which are the
// channels c .. c+3 (c = 4 (i % (C / 4))) of one row. f(i, c) is called per unit; each lane then
// computes the one-element path's expression with its own channel (lanes(v, c, g) below), so
// both paths store the same bits.
//
// When the grid's thread count is a multiple of C / 4 (the launchers' large grids: grid_1d caps
// them at 32 blocks of 256 threads per SM, 8192 x num_SMs threads, a multiple of every power of
// two up to 8192; ResNet50's C / 4 are 16 .. 1024), every thread stays on one channel quad, so the loop below runs with c constant: the per-channel
// parameters f reads (mean[c], gamma[c], ...) are loop invariant and loaded once per thread
// instead of once per unit. This matters: a warp's unit spans up to 128 channels, so each
// parameter load costs up to four L1 wavefronts against the two of its 8-byte bf16 data load,
// and with four parameters per lane the L1, not DRAM, bounded these kernels (profiled on an
// H200: 2-2.7 TB/s). Same units, same f, same bits; any other grid takes the general loop.
template <class F>
__device__ __forceinline__ void bn_for_each_rows4(i64 rows, int C, F f) {
    const int CQ = C / 4;
    const i64 total = rows * CQ;
    const i64 stride = (i64)blockDim.x * gridDim.x;
    if (stride % CQ == 0) {
        const i64 start = (i64)blockIdx.x * blockDim.x + threadIdx.x;
        const int c = 4 * (int)(start % CQ);
        for (i64 i = start; i < total; i += stride) f(i, c);
        return;
    }
    bn_for_each(total, CQ, 1, [&](i64 i, int cq) { f(i, 4 * cq); });
}

// (g(v.x, c), g(v.y, c + 1), g(v.z, c + 2), g(v.w, c + 3)): one float4 of four channels.
template <class G>
__device__ __forceinline__ float4 lanes(float4 v, int c, G g) {
    float4 r;
    r.x = g(v.x, c);
    r.y = g(v.y, c + 1);
    r.z = g(v.z, c + 2);
    r.w = g(v.w, c + 3);
    return r;
}


// ---------------------------------------------------------------- training statistics
// Launch order: bn_sum_partial_f32 and bn_sqdev_partial_f32 on the same (C, S) grid, then
// bn_stats_finalize_f32 on C blocks. part_sum, part_sq: (C, S) workspaces.

// part_sum[c * S + s] = sum of x over block (c, s)'s slice. x: (N, C, HW).
template <class T>
__device__ __forceinline__ void bn_sum_partial(const T* __restrict__ x, float* __restrict__ part_sum,
                                               i64 N, int C, i64 HW) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    i64 m0, m1;
    bn_slice(N * HW, &m0, &m1);
    float acc = 0.0f;
    bn_channel_walk(c, C, HW, m0, m1, [&](i64 i) { acc += ld(x, i); });
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) part_sum[(i64)c * gridDim.y + blockIdx.y] = acc;
}
extern "C" __global__ void bn_sum_partial_f32(
    const float* __restrict__ x, float* __restrict__ part_sum, i64 N, int C, i64 HW) {
    bn_sum_partial(x, part_sum, N, C, HW);
}
extern "C" __global__ void bn_sum_partial_bf16(
    const bf16* __restrict__ x, float* __restrict__ part_sum, i64 N, int C, i64 HW) {
    bn_sum_partial(x, part_sum, N, C, HW);
}

// part_sq[c * S + s] = sum of (x - mean_c)^2 over block (c, s)'s slice, with
// mean_c = sum_s part_sum[c * S + s] / M (recomputed per block: S values, cheap).
template <class T>
__device__ __forceinline__ void bn_sqdev_partial(
    const T* __restrict__ x, const float* __restrict__ part_sum, float* __restrict__ part_sq,
    i64 N, int C, i64 HW) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    const int S = gridDim.y;
    const i64 M = N * HW;
    const float mu = bn_sum_parts(part_sum + (i64)c * S, S, scratch) / (float)M;
    i64 m0, m1;
    bn_slice(M, &m0, &m1);
    float acc = 0.0f;
    bn_channel_walk(c, C, HW, m0, m1, [&](i64 i) {
        const float d = ld(x, i) - mu;
        acc += d * d;
    });
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) part_sq[(i64)c * S + blockIdx.y] = acc;
}
extern "C" __global__ void bn_sqdev_partial_f32(
    const float* __restrict__ x, const float* __restrict__ part_sum, float* __restrict__ part_sq,
    i64 N, int C, i64 HW) {
    bn_sqdev_partial(x, part_sum, part_sq, N, C, HW);
}
extern "C" __global__ void bn_sqdev_partial_bf16(
    const bf16* __restrict__ x, const float* __restrict__ part_sum, float* __restrict__ part_sq,
    i64 N, int C, i64 HW) {
    bn_sqdev_partial(x, part_sum, part_sq, N, C, HW);
}

// One block per channel (grid = C). mean, invstd, var_unbiased: (C,).
// invstd = 1 / sqrt(var_biased + eps).
extern "C" __global__ void bn_stats_finalize_f32(const float* part_sum, const float* part_sq,
                                                 float* mean, float* invstd,
                                                 float* var_unbiased, i64 N, i64 HW, int S,
                                                 float eps) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    const i64 M = N * HW;
    const float mu = bn_sum_parts(part_sum + (i64)c * S, S, scratch) / (float)M;
    const float var = bn_sum_parts(part_sq + (i64)c * S, S, scratch) / (float)M;
    if (threadIdx.x == 0) {
        mean[c] = mu;
        invstd[c] = rsqrtf(var + eps);
        // M == 1 has no unbiased estimate; report the biased one rather than dividing by 0.
        var_unbiased[c] = M > 1 ? var * (float)M / (float)(M - 1) : var;
    }
}

// ---------------------------------------------------------------- elementwise

// y = (x - mean[c]) * invstd[c] * gamma[c] + beta[c]. x, y: (N, C, HW); the rest (C,).
// Used for training (batch mean/invstd) and, after bn_invstd_f32, for eval (running stats).
template <class T>
__device__ __forceinline__ void bn_forward(
    const T* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ invstd,
    const float* __restrict__ gamma, const float* __restrict__ beta, T* __restrict__ y, i64 N,
    int C, i64 HW) {
    // (x - mean) * (invstd * gamma) + beta: centering first keeps the result accurate when
    // |mean| >> std (folding mean into the shift would cancel catastrophically).
    if ((HW & 3) == 0 && aligned4(x) && aligned4(y)) {
        bn_for_each(N * C * HW / 4, C, HW / 4, [&](i64 i, int c) {
            const float mu = mean[c], a = invstd[c] * gamma[c], b = beta[c];
            const float4 v = ld4(x, i);
            float4 r;
            r.x = (v.x - mu) * a + b;
            r.y = (v.y - mu) * a + b;
            r.z = (v.z - mu) * a + b;
            r.w = (v.w - mu) * a + b;
            st4(y, i, r);
        });
    } else if (HW == 1 && (C & 3) == 0 && aligned4(x) && aligned4(y)) {
        bn_for_each_rows4(N, C, [&](i64 i, int c) {
            st4(y, i, lanes(ld4(x, i), c, [&](float v, int k) {
                    return (v - mean[k]) * (invstd[k] * gamma[k]) + beta[k];
                }));
        });
    } else {
        bn_for_each(N * C * HW, C, HW, [&](i64 i, int c) {
            st(y, i, (ld(x, i) - mean[c]) * (invstd[c] * gamma[c]) + beta[c]);
        });
    }
}
extern "C" __global__ void bn_forward_f32(
    const float* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ invstd,
    const float* __restrict__ gamma, const float* __restrict__ beta, float* __restrict__ y, i64 N,
    int C, i64 HW) {
    bn_forward(x, mean, invstd, gamma, beta, y, N, C, HW);
}
extern "C" __global__ void bn_forward_bf16(
    const bf16* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ invstd,
    const float* __restrict__ gamma, const float* __restrict__ beta, bf16* __restrict__ y, i64 N,
    int C, i64 HW) {
    bn_forward(x, mean, invstd, gamma, beta, y, N, C, HW);
}

// invstd[c] = 1 / sqrt(var[c] + eps) (eval mode: var is the running variance). (C,).
extern "C" __global__ void bn_invstd_f32(const float* var, float* invstd, int C, float eps) {
    GRID_STRIDE_LOOP(c, C) invstd[c] = rsqrtf(var[c] + eps);
}

// ---------------------------------------------------------------- backward

// The end of a (C, S)-grid backward partial (one block per (channel c, slice)): the block's
// sums of dy' * (x - mean) and of dy', summed over the block, stored at [c * S + slice] with
// invstd applied once. Every thread of the block must call it (block_sum's barriers).
__device__ __forceinline__ void bn_store_partials(float sg, float sb, int c,
                                                  const float* __restrict__ invstd,
                                                  float* __restrict__ part_g,
                                                  float* __restrict__ part_b, float* scratch) {
    sg = block_sum(sg, scratch) * invstd[c];
    sb = block_sum(sb, scratch);
    if (threadIdx.x == 0) {
        const i64 o = (i64)c * gridDim.y + blockIdx.y;
        part_g[o] = sg;
        part_b[o] = sb;
    }
}

// Parameter-gradient partials on the (C, S) grid. dy, x: (N, C, HW); mean, invstd: (C,)
// (batch stats in training, running stats in eval); part_g, part_b: (C, S) workspaces with
// part_g = sum dy * xhat, part_b = sum dy over block (c, s)'s slice, xhat = (x - mean) * invstd.
template <class T>
__device__ __forceinline__ void bn_backward_partial(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ invstd, float* __restrict__ part_g, float* __restrict__ part_b,
    i64 N, int C, i64 HW) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    const float mu = mean[c];
    i64 m0, m1;
    bn_slice(N * HW, &m0, &m1);
    // sum dy * (x - mu) first; invstd is a per-channel constant, applied once at the end.
    float sg = 0.0f, sb = 0.0f;
    bn_channel_walk(c, C, HW, m0, m1, [&](i64 i) {
        const float g = ld(dy, i);
        sb += g;
        sg += g * (ld(x, i) - mu);
    });
    bn_store_partials(sg, sb, c, invstd, part_g, part_b, scratch);
}
extern "C" __global__ void bn_backward_partial_f32(
    const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ invstd, float* __restrict__ part_g, float* __restrict__ part_b,
    i64 N, int C, i64 HW) {
    bn_backward_partial(dy, x, mean, invstd, part_g, part_b, N, C, HW);
}
extern "C" __global__ void bn_backward_partial_bf16(
    const bf16* __restrict__ dy, const bf16* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ invstd, float* __restrict__ part_g, float* __restrict__ part_b,
    i64 N, int C, i64 HW) {
    bn_backward_partial(dy, x, mean, invstd, part_g, part_b, N, C, HW);
}

// One block per channel (grid = C): dgamma[c] = sum_s part_g[c * S + s], dbeta likewise.
extern "C" __global__ void bn_backward_finalize_f32(const float* part_g, const float* part_b,
                                                    float* dgamma, float* dbeta, int S) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    const float g = bn_sum_parts(part_g + (i64)c * S, S, scratch);
    const float b = bn_sum_parts(part_b + (i64)c * S, S, scratch);
    if (threadIdx.x == 0) {
        dgamma[c] = g;
        dbeta[c] = b;
    }
}

// Training-mode input gradient (after bn_backward_finalize_f32):
// dx = gamma * invstd / M * (M * dy - dbeta - xhat * dgamma). All (N, C, HW) / (C,).
// Per channel: dx = k * (dy - mean_dy - xhat * mean_dyxhat) with k = gamma * invstd,
// mean_dy = dbeta / M, mean_dyxhat = dgamma / M (the same expression, divided through by M).
template <class T>
__device__ __forceinline__ void bn_backward_dx(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ invstd, const float* __restrict__ gamma,
    const float* __restrict__ dgamma, const float* __restrict__ dbeta, T* __restrict__ dx,
    i64 N, int C, i64 HW) {
    const float Mf = (float)(N * HW);
    if ((HW & 3) == 0 && aligned4(dy) && aligned4(x) && aligned4(dx)) {
        bn_for_each(N * C * HW / 4, C, HW / 4, [&](i64 i, int c) {
            const float mu = mean[c], is = invstd[c], k = gamma[c] * invstd[c] / Mf;
            const float db = dbeta[c], dg = dgamma[c];
            const float4 g = ld4(dy, i), v = ld4(x, i);
            float4 r;
            r.x = k * (Mf * g.x - db - (v.x - mu) * is * dg);
            r.y = k * (Mf * g.y - db - (v.y - mu) * is * dg);
            r.z = k * (Mf * g.z - db - (v.z - mu) * is * dg);
            r.w = k * (Mf * g.w - db - (v.w - mu) * is * dg);
            st4(dx, i, r);
        });
    } else if (HW == 1 && (C & 3) == 0 && aligned4(dy) && aligned4(x) && aligned4(dx)) {
        bn_for_each_rows4(N, C, [&](i64 i, int c) {
            const float4 g = ld4(dy, i), v = ld4(x, i);
            float4 r;
            auto one = [&](float gv, float xv, int k) {
                const float xhat = (xv - mean[k]) * invstd[k];
                return gamma[k] * invstd[k] / Mf * (Mf * gv - dbeta[k] - xhat * dgamma[k]);
            };
            r.x = one(g.x, v.x, c);
            r.y = one(g.y, v.y, c + 1);
            r.z = one(g.z, v.z, c + 2);
            r.w = one(g.w, v.w, c + 3);
            st4(dx, i, r);
        });
    } else {
        bn_for_each(N * C * HW, C, HW, [&](i64 i, int c) {
            const float xhat = (ld(x, i) - mean[c]) * invstd[c];
            st(dx, i, gamma[c] * invstd[c] / Mf * (Mf * ld(dy, i) - dbeta[c] - xhat * dgamma[c]));
        });
    }
}
extern "C" __global__ void bn_backward_dx_f32(
    const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ invstd, const float* __restrict__ gamma,
    const float* __restrict__ dgamma, const float* __restrict__ dbeta, float* __restrict__ dx,
    i64 N, int C, i64 HW) {
    bn_backward_dx(dy, x, mean, invstd, gamma, dgamma, dbeta, dx, N, C, HW);
}
extern "C" __global__ void bn_backward_dx_bf16(
    const bf16* __restrict__ dy, const bf16* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ invstd, const float* __restrict__ gamma,
    const float* __restrict__ dgamma, const float* __restrict__ dbeta, bf16* __restrict__ dx,
    i64 N, int C, i64 HW) {
    bn_backward_dx(dy, x, mean, invstd, gamma, dgamma, dbeta, dx, N, C, HW);
}

// Eval-mode input gradient: the statistics are constants, dx = dy * gamma * invstd.
template <class T>
__device__ __forceinline__ void bn_eval_backward_dx(
    const T* __restrict__ dy, const float* __restrict__ invstd, const float* __restrict__ gamma,
    T* __restrict__ dx, i64 N, int C, i64 HW) {
    if ((HW & 3) == 0 && aligned4(dy) && aligned4(dx)) {
        bn_for_each(N * C * HW / 4, C, HW / 4, [&](i64 i, int c) {
            const float k = gamma[c] * invstd[c];
            const float4 g = ld4(dy, i);
            float4 r;
            r.x = g.x * k;
            r.y = g.y * k;
            r.z = g.z * k;
            r.w = g.w * k;
            st4(dx, i, r);
        });
    } else if (HW == 1 && (C & 3) == 0 && aligned4(dy) && aligned4(dx)) {
        // The one-element path's (dy * gamma) * invstd, per lane (the HW % 4 path above
        // multiplies by gamma * invstd: up to 1 ulp apart).
        bn_for_each_rows4(N, C, [&](i64 i, int c) {
            st4(dx, i, lanes(ld4(dy, i), c, [&](float g, int k) { return g * gamma[k] * invstd[k]; }));
        });
    } else {
        bn_for_each(N * C * HW, C, HW,
                    [&](i64 i, int c) { st(dx, i, ld(dy, i) * gamma[c] * invstd[c]); });
    }
}
extern "C" __global__ void bn_eval_backward_dx_f32(
    const float* __restrict__ dy, const float* __restrict__ invstd,
    const float* __restrict__ gamma, float* __restrict__ dx, i64 N, int C, i64 HW) {
    bn_eval_backward_dx(dy, invstd, gamma, dx, N, C, HW);
}
extern "C" __global__ void bn_eval_backward_dx_bf16(
    const bf16* __restrict__ dy, const float* __restrict__ invstd,
    const float* __restrict__ gamma, bf16* __restrict__ dx, i64 N, int C, i64 HW) {
    bn_eval_backward_dx(dy, invstd, gamma, dx, N, C, HW);
}

// Running statistics, in place: r = (1 - momentum) r + momentum * batch (PyTorch's update;
// the variance uses the unbiased batch variance). All (C,).
extern "C" __global__ void bn_running_update_f32(float* running_mean, float* running_var,
                                                 const float* batch_mean,
                                                 const float* batch_var_unbiased,
                                                 float momentum, int C) {
    GRID_STRIDE_LOOP(c, C) {
        running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * batch_mean[c];
        running_var[c] = (1.0f - momentum) * running_var[c] + momentum * batch_var_unbiased[c];
    }
}

// `bn_running_update_f32` gated by the step's device-side "step ok" flag (kernels/lars.cu
// `step_ok_f32`): the running statistics stay bit-identical while *ok == 0.
extern "C" __global__ void bn_running_update_gated_f32(float* running_mean, float* running_var,
                                                       const float* batch_mean,
                                                       const float* batch_var_unbiased,
                                                       float momentum, int C, const int* ok) {
    if (*ok == 0) return;
    GRID_STRIDE_LOOP(c, C) {
        running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * batch_mean[c];
        running_var[c] = (1.0f - momentum) * running_var[c] + momentum * batch_var_unbiased[c];
    }
}

// ---------------------------------------------------------------- NHWC (channels-last)
// An NHWC activation stores element (n, c, h, w) at ((n * H + h) * W + w) * C + c: R = N * H * W
// rows of C contiguous channels. The host picks these kernels by the buffer's layout.
//
// Elementwise kernels: none here. bn_forward_T, bn_backward_dx_T, bn_eval_backward_dx_T (and
// bn_fused.cu's bn_act_forward_T, bn_act_backward_dx_T) launched with (N = R, C, HW = 1) read
// the channel as c = i % C, which is exactly the NHWC channel: same kernels, same numerics
// (HW = 1 takes their one-element path, or with C % 4 == 0 and aligned buffers their 4-channel
// path, whose lanes compute the one-element expression: the same bits either way).
//
// Per-channel reductions: the (C, S) partial layout of the NCHW kernels (part[c * S + s],
// S = gridDim.y), so bn_stats_finalize_f32 (with N = R, HW = 1) and bn_backward_finalize_f32
// combine them unchanged. Slice s covers rows [s * chunk, min((s + 1) * chunk, R)),
// chunk = ceil(R / S): the rows r = n * HW + hw are the NCHW kernels' per-channel indices m, so
// both layouts reduce the same elements per slice (only the summation order differs).
//
// LAUNCH GEOMETRY (the kernels rely on it; the host's CudaBackend::bn_nhwc_reduce_cfg and the
// emulator's nhwc_geom compute it): a thread reduces V consecutive channels, a "group": V = 4
// when C % 4 == 0 and every activation pointer is aligned4 (bn_nhwc_v4; the host applies the same
// rule to its buffers), else V = 1. G = C / V groups; block (TX, TY, 1) with TX = min(32, the
// power of two >= G), TY = 256 / TX; grid (ceil(G / TX), S, 1). threadIdx.x picks the group
// g = blockIdx.x * TX + threadIdx.x (a warp reads TX consecutive groups in each of 32 / TX rows:
// contiguous runs of 8-byte bf16 / 16-byte f32 loads), threadIdx.y walks the slice's rows
// r0 + y, r0 + y + TY, ...; the TY row partials of each channel are combined in shared memory
// in y order and thread y == 0 writes the group's partials. Threads with g >= G only take part
// in the barriers. (The first version ran V = 1 on (32, 8) blocks: a warp moved 64 bytes of bf16
// per load, and the 64-channel tensors, the largest in ResNet50, left half of each block idle.)
#define BN_NHWC_THREADS 256

// Whether a channels-last reduction over C channels takes V = 4: C % 4 == 0 and every pointer
// that is not null aligned4.
template <class T>
__device__ __forceinline__ bool bn_nhwc_v4(int C, const T* a, const T* b = nullptr,
                                           const T* c = nullptr, const T* d = nullptr) {
    return (C & 3) == 0 && aligned4(a) && (b == nullptr || aligned4(b)) &&
           (c == nullptr || aligned4(c)) && (d == nullptr || aligned4(d));
}

// The V channels of one group, as f32.
template <int V>
struct Lanes {
    float v[V];
};
// Unit u of p: its V elements V u .. V u + V - 1 (V = 4: one ld4).
template <int V, class T>
__device__ __forceinline__ Lanes<V> ldv(const T* __restrict__ p, i64 u) {
    Lanes<V> r;
    if constexpr (V == 4) {
        const float4 q = ld4(p, u);
        r.v[0] = q.x;
        r.v[1] = q.y;
        r.v[2] = q.z;
        r.v[3] = q.w;
    } else {
        r.v[0] = ld(p, u);
    }
    return r;
}
template <int V, class T>
__device__ __forceinline__ void stv(T* __restrict__ p, i64 u, const Lanes<V>& a) {
    if constexpr (V == 4) {
        float4 q;
        q.x = a.v[0];
        q.y = a.v[1];
        q.z = a.v[2];
        q.w = a.v[3];
        st4(p, u, q);
    } else {
        st(p, u, a.v[0]);
    }
}

// Calls f(u) for every row r in [r0, r1) that this thread walks (r0 + threadIdx.y + TY k), with
// u = r * G + g the unit index of its group's channels in row r. Nothing when g >= G.
template <class F>
__device__ __forceinline__ void bn_nhwc_walk(int G, i64 r0, i64 r1, F f) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= G) return;
    const i64 TY = blockDim.y;
    const i64 step = TY * G;  // units between this thread's consecutive rows
    i64 r = r0 + threadIdx.y;
    i64 u = r * G + g;
    // Four rows per iteration, offsets first (several loads in flight, as bn_channel_walk).
    for (; r + 3 * TY < r1; r += 4 * TY, u += 4 * step) {
        f(u);
        f(u + step);
        f(u + 2 * step);
        f(u + 3 * step);
    }
    for (; r < r1; r += TY, u += step) f(u);
}

// Per lane, the sum of a over threadIdx.y (the row walkers of one group), in y order; every
// thread of the column gets it (the same bits). Every thread of the block must call it
// (barriers); the trailing barrier lets the caller call it again right away.
template <int V>
__device__ __forceinline__ Lanes<V> bn_nhwc_rows_sum(const Lanes<V>& a) {
    __shared__ float sh[BN_NHWC_THREADS * V];
    const int tx = threadIdx.x, TX = blockDim.x;
    for (int k = 0; k < V; ++k) sh[(threadIdx.y * TX + tx) * V + k] = a.v[k];
    __syncthreads();
    Lanes<V> r;
    for (int k = 0; k < V; ++k) r.v[k] = 0.0f;
    for (int j = 0; j < (int)blockDim.y; ++j)
        for (int k = 0; k < V; ++k) r.v[k] += sh[(j * TX + tx) * V + k];
    __syncthreads();
    return r;
}

// part[(g V + k) * S + slice] = a.v[k] for the V channels of this thread's group (thread y == 0
// of a group g < G; S = gridDim.y).
template <int V>
__device__ __forceinline__ void bn_nhwc_store(float* __restrict__ part, int G,
                                              const Lanes<V>& a) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (threadIdx.y != 0 || g >= G) return;
    for (int k = 0; k < V; ++k) part[(i64)(g * V + k) * gridDim.y + blockIdx.y] = a.v[k];
}

// The per-lane parameters of this thread's group (v[k] = p[g V + k]), zeros past the end.
template <int V>
__device__ __forceinline__ Lanes<V> bn_nhwc_params(const float* __restrict__ p, int G) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    Lanes<V> r;
    for (int k = 0; k < V; ++k) r.v[k] = g < G ? p[g * V + k] : 0.0f;
    return r;
}

// The NHWC twin of bn_store_partials: each channel's sums over its walkers, stored at
// [c * S + slice] with invstd applied. Every thread of the block must call it (barriers).
template <int V>
__device__ __forceinline__ void bn_nhwc_store_partials(Lanes<V> sg, Lanes<V> sb, int G,
                                                       const float* __restrict__ invstd,
                                                       float* __restrict__ part_g,
                                                       float* __restrict__ part_b) {
    sg = bn_nhwc_rows_sum(sg);
    sb = bn_nhwc_rows_sum(sb);
    const Lanes<V> is = bn_nhwc_params<V>(invstd, G);
    for (int k = 0; k < V; ++k) sg.v[k] *= is.v[k];
    bn_nhwc_store(part_g, G, sg);
    bn_nhwc_store(part_b, G, sb);
}

// Calls f(VW<4>{}) when `v4`, else f(VW<1>{}): each kernel below is one body for both widths,
// whose V is decltype(w)::v.
template <int W>
struct VW {
    static constexpr int v = W;
};
template <class F>
__device__ __forceinline__ void bn_nhwc_dispatch(bool v4, F f) {
    if (v4)
        f(VW<4>{});
    else
        f(VW<1>{});
}

// part_sum[c * S + s] = sum of x over slice s of channel c. x: (R, C) NHWC; part_sum: (C, S).
template <int V, class T>
__device__ __forceinline__ void bn_sum_partial_nhwc_v(const T* __restrict__ x,
                                                      float* __restrict__ part_sum, i64 R, int C) {
    const int G = C / V;
    i64 r0, r1;
    bn_slice(R, &r0, &r1);
    Lanes<V> acc = {};
    bn_nhwc_walk(G, r0, r1, [&](i64 u) {
        const Lanes<V> v = ldv<V>(x, u);
        for (int k = 0; k < V; ++k) acc.v[k] += v.v[k];
    });
    bn_nhwc_store(part_sum, G, bn_nhwc_rows_sum(acc));
}
template <class T>
__device__ __forceinline__ void bn_sum_partial_nhwc(const T* __restrict__ x,
                                                    float* __restrict__ part_sum, i64 R, int C) {
    bn_nhwc_dispatch(bn_nhwc_v4(C, x), [&](auto w) {
        bn_sum_partial_nhwc_v<decltype(w)::v>(x, part_sum, R, C);
    });
}
extern "C" __global__ void bn_sum_partial_nhwc_f32(const float* __restrict__ x,
                                                   float* __restrict__ part_sum, i64 R, int C) {
    bn_sum_partial_nhwc(x, part_sum, R, C);
}
extern "C" __global__ void bn_sum_partial_nhwc_bf16(const bf16* __restrict__ x,
                                                    float* __restrict__ part_sum, i64 R, int C) {
    bn_sum_partial_nhwc(x, part_sum, R, C);
}

// part_sq[c * S + s] = sum of (x - mean_c)^2 over slice s of channel c, mean_c = (sum over s of
// part_sum[c * S + s]) / R (the S partials split over the TY row threads, then combined: S can be
// hundreds when C is small). x: (R, C) NHWC; part_sum, part_sq: (C, S).
template <int V, class T>
__device__ __forceinline__ void bn_sqdev_partial_nhwc_v(const T* __restrict__ x,
                                                        const float* __restrict__ part_sum,
                                                        float* __restrict__ part_sq, i64 R,
                                                        int C) {
    const int G = C / V, g = blockIdx.x * blockDim.x + threadIdx.x;
    const int S = gridDim.y;
    Lanes<V> mu = {};
    if (g < G)
        for (int j = threadIdx.y; j < S; j += blockDim.y)
            for (int k = 0; k < V; ++k) mu.v[k] += part_sum[(i64)(g * V + k) * S + j];
    mu = bn_nhwc_rows_sum(mu);
    for (int k = 0; k < V; ++k) mu.v[k] /= (float)R;
    i64 r0, r1;
    bn_slice(R, &r0, &r1);
    Lanes<V> acc = {};
    bn_nhwc_walk(G, r0, r1, [&](i64 u) {
        const Lanes<V> v = ldv<V>(x, u);
        for (int k = 0; k < V; ++k) {
            const float d = v.v[k] - mu.v[k];
            acc.v[k] += d * d;
        }
    });
    bn_nhwc_store(part_sq, G, bn_nhwc_rows_sum(acc));
}
template <class T>
__device__ __forceinline__ void bn_sqdev_partial_nhwc(const T* __restrict__ x,
                                                      const float* __restrict__ part_sum,
                                                      float* __restrict__ part_sq, i64 R, int C) {
    bn_nhwc_dispatch(bn_nhwc_v4(C, x), [&](auto w) {
        bn_sqdev_partial_nhwc_v<decltype(w)::v>(x, part_sum, part_sq, R, C);
    });
}
extern "C" __global__ void bn_sqdev_partial_nhwc_f32(const float* __restrict__ x,
                                                     const float* __restrict__ part_sum,
                                                     float* __restrict__ part_sq, i64 R, int C) {
    bn_sqdev_partial_nhwc(x, part_sum, part_sq, R, C);
}
extern "C" __global__ void bn_sqdev_partial_nhwc_bf16(const bf16* __restrict__ x,
                                                      const float* __restrict__ part_sum,
                                                      float* __restrict__ part_sq, i64 R, int C) {
    bn_sqdev_partial_nhwc(x, part_sum, part_sq, R, C);
}

// One-pass statistics (the channels-last default; CARP_BN_TWO_PASS=1 runs the two kernels above):
// one read of x instead of two. Sums of deviations from a per-channel shift k_c = x[row 0, c]
// (one of the channel's own values, so |mean - k| is a few standard deviations at most for
// any sample that is not an outlier): part_sum[c * S + s] = sum of (x - k_c), part_sq[c * S + s]
// = sum of (x - k_c)^2 over slice s, and shift[c] = k_c (written by slice 0). The variance is
// then E[(x - k)^2] - (E[x - k])^2 (bn_stats_finalize_shifted_f32): the cancellation that makes
// E[x^2] - E[x]^2 unusable is bounded by (mean - k)^2 / var, a small factor, not by mean^2 / var.
// x: (R, C) NHWC; part_sum, part_sq: (C, S); shift: (C,).
// This thread's sums of (x - k) and (x - k)^2 over its rows of the block's slice, reduced over
// the block's rows into part_sum and part_sq (C, S): the shifted statistics' partials, with the
// shift k of this thread's channel group. x: (R, C) NHWC.
template <int V, class T>
__device__ __forceinline__ void bn_nhwc_shifted_sums(const T* __restrict__ x, const Lanes<V>& k,
                                                     float* __restrict__ part_sum,
                                                     float* __restrict__ part_sq, i64 R, int C) {
    const int G = C / V;
    i64 r0, r1;
    bn_slice(R, &r0, &r1);
    Lanes<V> s1 = {}, s2 = {};
    bn_nhwc_walk(G, r0, r1, [&](i64 u) {
        const Lanes<V> v = ldv<V>(x, u);
        for (int j = 0; j < V; ++j) {
            const float d = v.v[j] - k.v[j];
            s1.v[j] += d;
            s2.v[j] += d * d;
        }
    });
    bn_nhwc_store(part_sum, G, bn_nhwc_rows_sum(s1));
    bn_nhwc_store(part_sq, G, bn_nhwc_rows_sum(s2));
}
template <int V, class T>
__device__ __forceinline__ void bn_stats_partial_nhwc_v(const T* __restrict__ x,
                                                        float* __restrict__ part_sum,
                                                        float* __restrict__ part_sq,
                                                        float* __restrict__ shift, i64 R, int C) {
    const int G = C / V, g = blockIdx.x * blockDim.x + threadIdx.x;
    Lanes<V> k = {};
    if (g < G && R > 0) k = ldv<V>(x, g);  // row 0's unit of this group
    bn_nhwc_shifted_sums<V>(x, k, part_sum, part_sq, R, C);
    if (blockIdx.y == 0 && threadIdx.y == 0 && g < G)
        for (int j = 0; j < V; ++j) shift[g * V + j] = k.v[j];
}
template <class T>
__device__ __forceinline__ void bn_stats_partial_nhwc(const T* __restrict__ x,
                                                      float* __restrict__ part_sum,
                                                      float* __restrict__ part_sq,
                                                      float* __restrict__ shift, i64 R, int C) {
    bn_nhwc_dispatch(bn_nhwc_v4(C, x), [&](auto w) {
        bn_stats_partial_nhwc_v<decltype(w)::v>(x, part_sum, part_sq, shift, R, C);
    });
}
extern "C" __global__ void bn_stats_partial_nhwc_f32(const float* __restrict__ x,
                                                     float* __restrict__ part_sum,
                                                     float* __restrict__ part_sq,
                                                     float* __restrict__ shift, i64 R, int C) {
    bn_stats_partial_nhwc(x, part_sum, part_sq, shift, R, C);
}
extern "C" __global__ void bn_stats_partial_nhwc_bf16(const bf16* __restrict__ x,
                                                      float* __restrict__ part_sum,
                                                      float* __restrict__ part_sq,
                                                      float* __restrict__ shift, i64 R, int C) {
    bn_stats_partial_nhwc(x, part_sum, part_sq, shift, R, C);
}

// bn_stats_finalize_f32 for bn_stats_partial_nhwc_T's shifted partials, one block per channel:
// d = sum_s part_sum / M, mean = shift + d, var = max(sum_s part_sq / M - d^2, 0) (rounding can
// take a constant channel's difference below 0; NaN stays NaN), invstd and var_unbiased as bn_stats_finalize_f32.
extern "C" __global__ void bn_stats_finalize_shifted_f32(const float* part_sum,
                                                         const float* part_sq, const float* shift,
                                                         float* mean, float* invstd,
                                                         float* var_unbiased, i64 M, int S,
                                                         float eps) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    const float d = bn_sum_parts(part_sum + (i64)c * S, S, scratch) / (float)M;
    const float q = bn_sum_parts(part_sq + (i64)c * S, S, scratch) / (float)M;
    if (threadIdx.x == 0) {
        float var = q - d * d;
        if (var < 0.0f) var = 0.0f;  // not fmaxf: a NaN stays NaN, as in the two-pass kernels
        mean[c] = shift[c] + d;
        invstd[c] = rsqrtf(var + eps);
        var_unbiased[c] = M > 1 ? var * (float)M / (float)(M - 1) : var;
    }
}

// Parameter-gradient partials (bn_backward_partial_T's, NHWC): part_g = invstd[c] * sum of
// dy * (x - mean[c]), part_b = sum of dy over slice s of channel c. dy, x: (R, C) NHWC; mean,
// invstd: (C,); part_g, part_b: (C, S).
template <int V, class T>
__device__ __forceinline__ void bn_backward_partial_nhwc_v(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ invstd, float* __restrict__ part_g, float* __restrict__ part_b,
    i64 R, int C) {
    const int G = C / V;
    const Lanes<V> mu = bn_nhwc_params<V>(mean, G);
    i64 r0, r1;
    bn_slice(R, &r0, &r1);
    Lanes<V> sg = {}, sb = {};
    bn_nhwc_walk(G, r0, r1, [&](i64 u) {
        const Lanes<V> g = ldv<V>(dy, u), v = ldv<V>(x, u);
        for (int k = 0; k < V; ++k) {
            sb.v[k] += g.v[k];
            sg.v[k] += g.v[k] * (v.v[k] - mu.v[k]);
        }
    });
    bn_nhwc_store_partials(sg, sb, G, invstd, part_g, part_b);
}
template <class T>
__device__ __forceinline__ void bn_backward_partial_nhwc(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ invstd, float* __restrict__ part_g, float* __restrict__ part_b,
    i64 R, int C) {
    bn_nhwc_dispatch(bn_nhwc_v4(C, dy, x), [&](auto w) {
        bn_backward_partial_nhwc_v<decltype(w)::v>(dy, x, mean, invstd, part_g, part_b, R, C);
    });
}
extern "C" __global__ void bn_backward_partial_nhwc_f32(
    const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ invstd, float* __restrict__ part_g, float* __restrict__ part_b,
    i64 R, int C) {
    bn_backward_partial_nhwc(dy, x, mean, invstd, part_g, part_b, R, C);
}
extern "C" __global__ void bn_backward_partial_nhwc_bf16(
    const bf16* __restrict__ dy, const bf16* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ invstd, float* __restrict__ part_g, float* __restrict__ part_b,
    i64 R, int C) {
    bn_backward_partial_nhwc(dy, x, mean, invstd, part_g, part_b, R, C);
}

// ---------------------------------------------------------------- synchronized statistics
// Synchronized batch norm across data-parallel ranks (src/ops/batchnorm.rs
// `bn_batch_stats`, the CUDA arm with a collective): the statistics of the global batch come
// from per-channel sums that every rank computes on its own rows, the host all-reduces and
// turns into the mean and variance, as the CPU's `batch_norm_stats_sync_cpu`. Two launches of
// the kernels below with a given per-channel shift k (0 for the sums, then the global mean
// rounded to f32, the same on every rank): part_sum[c * S + s] = sum of (x - k_c) and
// part_sq[c * S + s] = sum of (x - k_c)^2 over slice s of channel c, on the grids of the
// kernels above; bn_backward_finalize_f32 then sums the S partials of each channel.

// NCHW: x (N, C, HW); shift (C,); part_sum, part_sq (C, S), grid (C, S).
template <class T>
__device__ __forceinline__ void bn_shifted_partial(const T* __restrict__ x,
                                                   const float* __restrict__ shift,
                                                   float* __restrict__ part_sum,
                                                   float* __restrict__ part_sq, i64 N, int C,
                                                   i64 HW) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    const float k = shift[c];
    i64 m0, m1;
    bn_slice(N * HW, &m0, &m1);
    float s1 = 0.0f, s2 = 0.0f;
    bn_channel_walk(c, C, HW, m0, m1, [&](i64 i) {
        const float d = ld(x, i) - k;
        s1 += d;
        s2 += d * d;
    });
    s1 = block_sum(s1, scratch);
    s2 = block_sum(s2, scratch);
    if (threadIdx.x == 0) {
        part_sum[(i64)c * gridDim.y + blockIdx.y] = s1;
        part_sq[(i64)c * gridDim.y + blockIdx.y] = s2;
    }
}
extern "C" __global__ void bn_shifted_partial_f32(const float* __restrict__ x,
                                                  const float* __restrict__ shift,
                                                  float* __restrict__ part_sum,
                                                  float* __restrict__ part_sq, i64 N, int C,
                                                  i64 HW) {
    bn_shifted_partial(x, shift, part_sum, part_sq, N, C, HW);
}
extern "C" __global__ void bn_shifted_partial_bf16(const bf16* __restrict__ x,
                                                   const float* __restrict__ shift,
                                                   float* __restrict__ part_sum,
                                                   float* __restrict__ part_sq, i64 N, int C,
                                                   i64 HW) {
    bn_shifted_partial(x, shift, part_sum, part_sq, N, C, HW);
}

// Channels-last: x (R, C) NHWC; shift (C,); part_sum, part_sq (C, S), on the grid of
// bn_nhwc_reduce_cfg (blocks of bn_nhwc_block, V channels per thread as bn_nhwc_v4 says).
template <int V, class T>
__device__ __forceinline__ void bn_shifted_partial_nhwc_v(const T* __restrict__ x,
                                                          const float* __restrict__ shift,
                                                          float* __restrict__ part_sum,
                                                          float* __restrict__ part_sq, i64 R,
                                                          int C) {
    bn_nhwc_shifted_sums<V>(x, bn_nhwc_params<V>(shift, C / V), part_sum, part_sq, R, C);
}
template <class T>
__device__ __forceinline__ void bn_shifted_partial_nhwc(const T* __restrict__ x,
                                                        const float* __restrict__ shift,
                                                        float* __restrict__ part_sum,
                                                        float* __restrict__ part_sq, i64 R,
                                                        int C) {
    bn_nhwc_dispatch(bn_nhwc_v4(C, x), [&](auto w) {
        bn_shifted_partial_nhwc_v<decltype(w)::v>(x, shift, part_sum, part_sq, R, C);
    });
}
extern "C" __global__ void bn_shifted_partial_nhwc_f32(const float* __restrict__ x,
                                                       const float* __restrict__ shift,
                                                       float* __restrict__ part_sum,
                                                       float* __restrict__ part_sq, i64 R,
                                                       int C) {
    bn_shifted_partial_nhwc(x, shift, part_sum, part_sq, R, C);
}
extern "C" __global__ void bn_shifted_partial_nhwc_bf16(const bf16* __restrict__ x,
                                                        const float* __restrict__ shift,
                                                        float* __restrict__ part_sum,
                                                        float* __restrict__ part_sq, i64 R,
                                                        int C) {
    bn_shifted_partial_nhwc(x, shift, part_sum, part_sq, R, C);
}
