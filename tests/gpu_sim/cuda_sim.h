// Minimal CPU emulation of the CUDA execution model for carp's kernels: blocks run one after
// another, a block's threads run as real threads (barriers for __syncthreads and warp shuffles),
// __shared__ becomes static (one block at a time). Blocks may be 1-, 2- or 3-d: threads are
// numbered x fastest, then y, then z (CUDA's linear thread id), and warps are 32 consecutive
// linear ids, as on the hardware.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
using std::max;
using std::min;
using std::isnan;
// CUDA's float4: 16-byte aligned, so float4 loads need 16-byte aligned pointers as on a GPU.
struct alignas(16) float4 { float x, y, z, w; };
// CUDA's uint2 (8-byte aligned: the 4 x bf16 loads of common.cuh's ld4 / st4).
struct alignas(8) uint2 { unsigned x, y; };
struct dim3s { unsigned x = 1, y = 1, z = 1; };
thread_local dim3s threadIdx, blockIdx;
dim3s blockDim, gridDim;
std::barrier<>* g_block;
std::vector<std::unique_ptr<std::barrier<>>> g_warps;
float g_slots[1024];
std::mutex g_atomic;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
// CUDA's bit casts (the bf16 conversions of common.cuh).
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline void __syncthreads() { g_block->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z), w = t / 32;
    g_slots[t] = v;
    g_warps[w]->arrive_and_wait();
    float r = g_slots[t ^ o];
    g_warps[w]->arrive_and_wait();
    return r;
}
inline float atomicAdd(float* a, float v) {
    std::lock_guard<std::mutex> l(g_atomic);
    float old = *a;
    *a = old + v;
    return old;
}
// One OS thread per thread of a block, created once per launch: each runs its thread of every
// block in turn, blocks in (z, y, x) order, and a barrier after each block keeps one block at a
// time (the static __shared__ arrays are reused by the next block only after every thread is done
// with them). Creating the threads per launch rather than per block keeps large grids cheap.
template <class F, class... A>
void launch(dim3s g, dim3s bd, F f, A... a) {
    gridDim = g;
    blockDim = bd;
    const unsigned bx = bd.x * bd.y * bd.z;  // threads per block
    std::barrier<> b(bx), done(bx);
    g_block = &b;
    g_warps.clear();
    for (unsigned w = 0; w < (bx + 31) / 32; ++w)
        g_warps.emplace_back(new std::barrier<>(std::min(32u, bx - 32 * w)));
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < bx; ++t)
        ts.emplace_back([=, &done] {
            threadIdx = {t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
            for (unsigned z = 0; z < g.z; ++z)
                for (unsigned y = 0; y < g.y; ++y)
                    for (unsigned x = 0; x < g.x; ++x) {
                        blockIdx = {x, y, z};
                        f(a...);
                        done.arrive_and_wait();
                    }
        });
    for (auto& t : ts) t.join();
}
// A 1-d block of bx threads.
template <class F, class... A>
void launch(dim3s g, unsigned bx, F f, A... a) {
    launch(g, dim3s{bx, 1, 1}, f, a...);
}
