// Shared helpers for carp's CUDA kernels: block/warp reductions and index types.
//
// Conventions for every kernel in this directory:
// - entry points are `extern "C"` so the host loads them by their plain name;
// - tensors are f32, row-major; activations are NCHW (an (N, C) tensor is NCHW with H*W = 1);
//   the memory-bound backbone kernels also come as `*_bf16` instantiations whose activations
//   are stored as bf16 (see "bf16 storage" below): math, statistics and parameters stay f32;
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

// ---------------------------------------------------------------- bf16 storage
// bf16 activations (the GPU side of `--precision bf16`): a tensor's device storage holds the
// upper 16 bits of an f32 (bf16 = f32's sign and 8-bit exponent, 7 mantissa bits). Kernels read
// bf16, widen it to f32 (exact), compute exactly as their f32 instantiation and round only the
// values they store. Raw bits, not cuda_bf16.h's __nv_bfloat16: the kernel emulator
// (tests/gpu_sim) compiles these sources as host C++, and the explicit rounding below is the
// one the CPU emulation uses (src/tensor/mod.rs `round_bf16`), bit for bit.
typedef unsigned short bf16;

// Exact: every bf16 is an f32 with a zero lower half.
__device__ __forceinline__ float bf16_to_f32(bf16 b) { return __uint_as_float((unsigned)b << 16); }

// f32 -> bf16, round to nearest, ties to even (add 0x7fff plus the lowest kept bit, truncate;
// a carry out of the mantissa bumps the exponent, which is the correct rounding, up to infinity
// past the largest finite bf16). A NaN keeps its sign and gets the quiet bit (adding the bias
// could carry its payload into the exponent or truncate it to infinity). The NaN test is on
// the bits, so it holds under any float flags (-use_fast_math included).
__device__ __forceinline__ bf16 f32_to_bf16(float x) {
    const unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u | 0x00400000u) >> 16);
    // u <= 0xff800000 here: the sum cannot wrap.
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Element i of an activation buffer as f32, and the store of an f32 result (rounded for bf16):
// overloads, so one templated kernel body serves both storage types.
__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, i64 i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, i64 i, float v) { p[i] = f32_to_bf16(v); }

// Four consecutive elements 4i .. 4i+3 in one load / store: a float4 (16 bytes) for f32, one
// 8-byte uint2 holding four bf16 for bf16 (element 4i in the low half of .x: little-endian).
// Only where aligned4(p) holds (16-byte alignment for f32, 8-byte for bf16).
__device__ __forceinline__ float4 ld4(const float* p, i64 i) {
    return reinterpret_cast<const float4*>(p)[i];
}
__device__ __forceinline__ float4 ld4(const bf16* p, i64 i) {
    const uint2 u = reinterpret_cast<const uint2*>(p)[i];
    float4 r;
    r.x = __uint_as_float(u.x << 16);
    r.y = __uint_as_float(u.x & 0xffff0000u);
    r.z = __uint_as_float(u.y << 16);
    r.w = __uint_as_float(u.y & 0xffff0000u);
    return r;
}
__device__ __forceinline__ void st4(float* p, i64 i, float4 v) {
    reinterpret_cast<float4*>(p)[i] = v;
}
__device__ __forceinline__ void st4(bf16* p, i64 i, float4 v) {
    uint2 u;
    u.x = (unsigned)f32_to_bf16(v.x) | ((unsigned)f32_to_bf16(v.y) << 16);
    u.y = (unsigned)f32_to_bf16(v.z) | ((unsigned)f32_to_bf16(v.w) << 16);
    reinterpret_cast<uint2*>(p)[i] = u;
}
__device__ __forceinline__ bool aligned4(const float* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}
__device__ __forceinline__ bool aligned4(const bf16* p) {
    return (reinterpret_cast<unsigned long long>(p) & 7ull) == 0;
}
