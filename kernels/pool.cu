// Pooling, f32, NCHW: max pool with an argmax for the backward, global average pool.
//
// bf16 activations (common.cuh "bf16 storage"): every kernel is one body templated on the
// storage type T of x / y / dy / dx, instantiated as `*_f32` and `*_bf16` (half the memory
// traffic; argmax stays int, math f32). Max pool forward in bf16 is exact: it stores one of its
// inputs, which round_bf16 leaves unchanged. The other kernels accumulate in f32 and round once.
//
// Channels-last (NHWC) twins `*_nhwc_*` of every kernel are at the end of this file.
#include "common.cuh"

// The max of output (oh, ow)'s window over one channel's (H, W) plane whose element (h, w) is
// plane[(h * W + w) * step] (NCHW: step 1; NHWC: step C), and its index h * W + w: the first
// maximum in row-major window order wins on ties, a NaN wins over numbers. Shared by both
// layouts' forward kernels.
template <class T>
__device__ __forceinline__ void maxpool_window(const T* plane, i64 step, int H, int W, int oh,
                                               int ow, int k, int stride, int pad, float* best_out,
                                               int* idx_out) {
    float best = -CUDART_INF_F;
    int best_idx = -1;
    for (int kh = 0; kh < k; ++kh) {
        const int h = oh * stride - pad + kh;
        if (h < 0 || h >= H) continue;
        for (int kw = 0; kw < k; ++kw) {
            const int w = ow * stride - pad + kw;
            if (w < 0 || w >= W) continue;
            const float v = ld(plane, (i64)(h * W + w) * step);
            if (best_idx < 0 || v > best || (isnan(v) && !isnan(best))) {
                best = v;
                best_idx = h * W + w;
            }
        }
    }
    *best_out = best;
    *idx_out = best_idx;
}

// The gradient of input (h, w) of one channel: the sum of dy over the outputs (oh, ow) whose
// window contains it and whose argmax is h * W + w, in (oh, ow) order; output (oh, ow) of that
// channel is at base + (oh * WO + ow) * step in dy and argmax (NCHW: step 1; NHWC: step C).
// Shared by both layouts' backward kernels.
template <class T>
__device__ __forceinline__ float maxpool_gather(const T* dy, const int* argmax, i64 base, i64 step,
                                                int h, int w, int W, int HO, int WO, int k,
                                                int stride, int pad) {
    const int me = h * W + w;
    // Outputs whose window [o*stride - pad, o*stride - pad + k) contains h.
    const int oh_lo = max(0, (h + pad - k + stride) / stride);
    const int oh_hi = min(HO - 1, (h + pad) / stride);
    const int ow_lo = max(0, (w + pad - k + stride) / stride);
    const int ow_hi = min(WO - 1, (w + pad) / stride);
    float acc = 0.0f;
    for (int oh = oh_lo; oh <= oh_hi; ++oh) {
        for (int ow = ow_lo; ow <= ow_hi; ++ow) {
            const i64 o = base + (i64)(oh * WO + ow) * step;
            if (argmax[o] == me) acc += ld(dy, o);
        }
    }
    return acc;
}

// Grid-stride loop over i in [0, total), calling f(i) with i of type unsigned when total < 2^31
// (then i + the grid's thread count < 2^32: no wrap), else i64. The max-pool kernels locate each
// element with three divisions of i; as 64-bit divisions (a long emulated sequence) they made
// these kernels integer-bound (an H200 profile: 2.4 ms for the stem's forward, ~7x its memory
// time); as 32-bit ones they are a few instructions each. Same elements, same results.
// i = (q * B + b) * A + a with a < A, b < B: returns q and sets a, b (one division per level,
// in i's own width).
template <class I>
__device__ __forceinline__ I unravel2(I i, int A, int B, int* a, int* b) {
    const I p = i / (I)A;
    *a = (int)(i - p * (I)A);
    const I q = p / (I)B;
    *b = (int)(p - q * (I)B);
    return q;
}

// i = ((q * D + d) * B + b) * A + a: returns q and sets a, b, d.
template <class I>
__device__ __forceinline__ I unravel3(I i, int A, int B, int D, int* a, int* b, int* d) {
    const I p = i / (I)A;
    *a = (int)(i - p * (I)A);
    return unravel2(p, B, D, b, d);
}

template <class F>
__device__ __forceinline__ void pool_for_each(i64 total, F f) {
    if (total < 0x7fffffffLL) {
        const unsigned n = (unsigned)total, stride = blockDim.x * gridDim.x;
        for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
    } else {
        GRID_STRIDE_LOOP(i, total) f(i);
    }
}

// Max pool forward. x: (N, C, H, W), y and argmax: (N, C, HO, WO) with
// HO = (H + 2 pad - k) / stride + 1 (likewise WO). Padding acts as -inf. argmax holds the
// index h * W + w inside the input plane; the first maximum in row-major window order wins on
// ties (PyTorch's rule); a NaN in the window wins (NaN propagates, as PyTorch).
template <class T>
__device__ __forceinline__ void maxpool2d_fwd(const T* x, T* y, int* argmax, i64 NC, int H, int W,
                                              int HO, int WO, int k, int stride, int pad) {
    pool_for_each(NC * HO * WO, [&](auto i) {
        int ow, oh;
        const auto nc = unravel2(i, WO, HO, &ow, &oh);
        float best;
        int best_idx;
        maxpool_window(x + (i64)nc * H * W, 1, H, W, oh, ow, k, stride, pad, &best, &best_idx);
        st(y, (i64)i, best);
        argmax[i] = best_idx;
    });
}
extern "C" __global__ void maxpool2d_fwd_f32(const float* x, float* y, int* argmax, i64 NC,
                                             int H, int W, int HO, int WO, int k, int stride,
                                             int pad) {
    maxpool2d_fwd(x, y, argmax, NC, H, W, HO, WO, k, stride, pad);
}
extern "C" __global__ void maxpool2d_fwd_bf16(const bf16* x, bf16* y, int* argmax, i64 NC, int H,
                                              int W, int HO, int WO, int k, int stride, int pad) {
    maxpool2d_fwd(x, y, argmax, NC, H, W, HO, WO, k, stride, pad);
}

// Max pool backward, as a gather so that every dx element is written exactly once, without
// atomics (windows overlap when stride < k): dx[h, w] = sum of dy over the outputs whose
// argmax is (h, w). dy, argmax: (N, C, HO, WO); dx: (N, C, H, W).
template <class T>
__device__ __forceinline__ void maxpool2d_bwd(const T* dy, const int* argmax, T* dx, i64 NC, int H,
                                              int W, int HO, int WO, int k, int stride, int pad) {
    pool_for_each(NC * H * W, [&](auto i) {
        int w, h;
        const auto nc = unravel2(i, W, H, &w, &h);
        st(dx, (i64)i,
           maxpool_gather(dy, argmax, (i64)nc * HO * WO, 1, h, w, W, HO, WO, k, stride, pad));
    });
}
extern "C" __global__ void maxpool2d_bwd_f32(const float* dy, const int* argmax, float* dx,
                                             i64 NC, int H, int W, int HO, int WO, int k,
                                             int stride, int pad) {
    maxpool2d_bwd(dy, argmax, dx, NC, H, W, HO, WO, k, stride, pad);
}
extern "C" __global__ void maxpool2d_bwd_bf16(const bf16* dy, const int* argmax, bf16* dx,
                                              i64 NC, int H, int W, int HO, int WO, int k,
                                              int stride, int pad) {
    maxpool2d_bwd(dy, argmax, dx, NC, H, W, HO, WO, k, stride, pad);
}

// Global average pool forward: y[nc] = mean over the HW plane. x: (N*C, HW), y: (N*C,).
// One warp per plane (planes are at most 56x56 in ResNet50's last stages: 49 elements).
template <class T>
__device__ __forceinline__ void global_avgpool_fwd(const T* x, T* y, i64 NC, i64 HW) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 nwarps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 p = warp; p < NC; p += nwarps) {
        float acc = 0.0f;
        for (i64 j = lane; j < HW; j += 32) acc += ld(x, p * HW + j);
        acc = warp_sum(acc);
        if (lane == 0) st(y, p, acc / (float)HW);
    }
}
extern "C" __global__ void global_avgpool_fwd_f32(const float* x, float* y, i64 NC, i64 HW) {
    global_avgpool_fwd(x, y, NC, HW);
}
extern "C" __global__ void global_avgpool_fwd_bf16(const bf16* x, bf16* y, i64 NC, i64 HW) {
    global_avgpool_fwd(x, y, NC, HW);
}

// Global average pool backward: dx[nc, j] = dy[nc] / HW. dy: (N*C,), dx: (N*C, HW).
template <class T>
__device__ __forceinline__ void global_avgpool_bwd(const T* dy, T* dx, i64 NC, i64 HW) {
    const float inv = 1.0f / (float)HW;
    GRID_STRIDE_LOOP(i, NC * HW) st(dx, i, ld(dy, i / HW) * inv);
}
extern "C" __global__ void global_avgpool_bwd_f32(const float* dy, float* dx, i64 NC, i64 HW) {
    global_avgpool_bwd(dy, dx, NC, HW);
}
extern "C" __global__ void global_avgpool_bwd_bf16(const bf16* dy, bf16* dx, i64 NC, i64 HW) {
    global_avgpool_bwd(dy, dx, NC, HW);
}

// ---------------------------------------------------------------- NHWC (channels-last)
// Element (n, c, h, w) of an NHWC tensor is at ((n * H + h) * W + w) * C + c. The kernels below
// compute per element exactly what their NCHW twins compute (same expressions, same order), with
// consecutive threads on consecutive channels (coalesced). Grid-stride loops over the output
// elements: any 1-d grid is correct (the host uses its elementwise config, 256 threads).

// Max pool forward. x: (N, H, W, C) NHWC; y, argmax: (N, HO, WO, C) NHWC. argmax holds
// h * W + w (the index inside the input's (H, W) plane, as maxpool2d_fwd_T), so the NCHW
// backward's convention carries over. Same window order, tie and NaN rules as maxpool2d_fwd_T.
template <class T>
__device__ __forceinline__ void maxpool2d_fwd_nhwc(const T* x, T* y, int* argmax, i64 N, int C,
                                                   int H, int W, int HO, int WO, int k,
                                                   int stride, int pad) {
    pool_for_each(N * HO * WO * C, [&](auto i) {
        int c, ow, oh;
        const auto n = unravel3(i, C, WO, HO, &c, &ow, &oh);
        float best;
        int best_idx;
        // The (H, W) plane of channel c, stride C.
        maxpool_window(x + (i64)n * H * W * C + c, C, H, W, oh, ow, k, stride, pad, &best,
                       &best_idx);
        st(y, (i64)i, best);
        argmax[i] = best_idx;
    });
}
extern "C" __global__ void maxpool2d_fwd_nhwc_f32(const float* x, float* y, int* argmax, i64 N,
                                                  int C, int H, int W, int HO, int WO, int k,
                                                  int stride, int pad) {
    maxpool2d_fwd_nhwc(x, y, argmax, N, C, H, W, HO, WO, k, stride, pad);
}
extern "C" __global__ void maxpool2d_fwd_nhwc_bf16(const bf16* x, bf16* y, int* argmax, i64 N,
                                                   int C, int H, int W, int HO, int WO, int k,
                                                   int stride, int pad) {
    maxpool2d_fwd_nhwc(x, y, argmax, N, C, H, W, HO, WO, k, stride, pad);
}

// Max pool backward as a gather (every dx element written once, no atomics): dx[n, h, w, c] =
// sum of dy[n, oh, ow, c] over the outputs whose argmax is h * W + w, in maxpool2d_bwd_T's
// (oh, ow) order. dy, argmax: (N, HO, WO, C) NHWC; dx: (N, H, W, C) NHWC.
template <class T>
__device__ __forceinline__ void maxpool2d_bwd_nhwc(const T* dy, const int* argmax, T* dx, i64 N,
                                                   int C, int H, int W, int HO, int WO, int k,
                                                   int stride, int pad) {
    pool_for_each(N * H * W * C, [&](auto i) {
        int c, w, h;
        const auto n = unravel3(i, C, W, H, &c, &w, &h);
        st(dx, (i64)i,
           maxpool_gather(dy, argmax, (i64)n * HO * WO * C + c, C, h, w, W, HO, WO, k, stride,
                          pad));
    });
}
extern "C" __global__ void maxpool2d_bwd_nhwc_f32(const float* dy, const int* argmax, float* dx,
                                                  i64 N, int C, int H, int W, int HO, int WO,
                                                  int k, int stride, int pad) {
    maxpool2d_bwd_nhwc(dy, argmax, dx, N, C, H, W, HO, WO, k, stride, pad);
}
extern "C" __global__ void maxpool2d_bwd_nhwc_bf16(const bf16* dy, const int* argmax, bf16* dx,
                                                   i64 N, int C, int H, int W, int HO, int WO,
                                                   int k, int stride, int pad) {
    maxpool2d_bwd_nhwc(dy, argmax, dx, N, C, H, W, HO, WO, k, stride, pad);
}

// Global average pool forward: y[n, c] = (sum over hw of x[n, hw, c]) / HW. x: (N, HW, C) NHWC;
// y: (N, C) (the same (N, C) tensor as the NCHW kernel's). One thread per (n, c), consecutive
// threads on consecutive channels (coalesced), summing hw in order: the f32 sum differs from
// global_avgpool_fwd_T's (a warp-strided tree) only in summation order.
template <class T>
__device__ __forceinline__ void global_avgpool_fwd_nhwc(const T* x, T* y, i64 N, int C, i64 HW) {
    const float hwf = (float)HW;
    GRID_STRIDE_LOOP(i, N * C) {
        const i64 n = i / C;
        const i64 c = i - n * C;
        const T* p = x + n * HW * C + c;
        float acc = 0.0f;
        for (i64 j = 0; j < HW; ++j) acc += ld(p, j * C);
        st(y, i, acc / hwf);
    }
}
extern "C" __global__ void global_avgpool_fwd_nhwc_f32(const float* x, float* y, i64 N, int C,
                                                       i64 HW) {
    global_avgpool_fwd_nhwc(x, y, N, C, HW);
}
extern "C" __global__ void global_avgpool_fwd_nhwc_bf16(const bf16* x, bf16* y, i64 N, int C,
                                                        i64 HW) {
    global_avgpool_fwd_nhwc(x, y, N, C, HW);
}

// Global average pool backward: dx[n, hw, c] = dy[n, c] / HW (global_avgpool_bwd_T's
// expression). dy: (N, C); dx: (N, HW, C) NHWC.
template <class T>
__device__ __forceinline__ void global_avgpool_bwd_nhwc(const T* dy, T* dx, i64 N, int C, i64 HW) {
    const float inv = 1.0f / (float)HW;
    GRID_STRIDE_LOOP(i, N * HW * C) {
        const i64 c = i % C;
        const i64 n = i / (HW * C);
        st(dx, i, ld(dy, n * C + c) * inv);
    }
}
extern "C" __global__ void global_avgpool_bwd_nhwc_f32(const float* dy, float* dx, i64 N, int C,
                                                       i64 HW) {
    global_avgpool_bwd_nhwc(dy, dx, N, C, HW);
}
extern "C" __global__ void global_avgpool_bwd_nhwc_bf16(const bf16* dy, bf16* dx, i64 N, int C,
                                                        i64 HW) {
    global_avgpool_bwd_nhwc(dy, dx, N, C, HW);
}
