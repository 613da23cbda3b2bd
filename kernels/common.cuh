// Shared helpers for carp's CUDA kernels: block/warp reductions and index types.
//
// Conventions for every kernel in this directory:
// - entry points are `extern "C"` so the host loads them by their plain name;
// - tensors are f32, row-major; activations are NCHW (an (N, C) tensor is NCHW with H*W = 1);
// - element counts and offsets are `long long` (int64 on the host side), so tensors beyond
//   2^31 elements index correctly;
// - block sizes are multiples of 32 and at most 1024 (the launchers guarantee it).
#pragma once

#include <math_constants.h>

typedef long long i64;

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds 32 floats of shared
// memory; the trailing barrier lets the caller reuse it right away.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = (threadIdx.x < nwarps) ? scratch[threadIdx.x] : 0.0f;
    if (warp == 0) {
        t = warp_sum(t);
        if (lane == 0) scratch[0] = t;
    }
    __syncthreads();
    const float r = scratch[0];
    __syncthreads();
    return r;
}

// Max over the whole block; every thread gets the result (same scratch contract as block_sum).
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = (threadIdx.x < nwarps) ? scratch[threadIdx.x] : -CUDART_INF_F;
    if (warp == 0) {
        t = warp_max(t);
        if (lane == 0) scratch[0] = t;
    }
    __syncthreads();
    const float r = scratch[0];
    __syncthreads();
    return r;
}

// Global thread index and stride for grid-stride loops over `n` elements.
#define GRID_STRIDE_LOOP(i, n)                                                  \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)(n);      \
         i += (i64)blockDim.x * gridDim.x)
