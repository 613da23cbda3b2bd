// Elementwise kernels (f32, any shape flattened to n elements) plus two small reductions the
// other ops need (bias add / column sums for linear layers, and a one-block sum).
// All are grid-stride loops: any grid size is correct; the launcher picks one that fills the GPU
// (except the NCHW <-> NHWC layout conversions at the end, tiled transposes with their own
// launch geometry).
//
// bf16 (common.cuh "bf16 storage"): the casts between f32 and bf16 storage, and add_bf16 (the
// residual adds of bf16 activations, half the memory traffic of add_f32). Each reads bf16,
// computes in f32 and rounds its output once: add_bf16 gives round_bf16(add_f32 of the widened
// inputs) bit for bit.
#include "common.cuh"

// y = a + b. a, b, y: (n,). y may alias a or b.
extern "C" __global__ void add_f32(const float* a, const float* b, float* y, i64 n) {
    GRID_STRIDE_LOOP(i, n) y[i] = a[i] + b[i];
}

// y += x (gradient accumulation). x, y: (n,).
extern "C" __global__ void accumulate_f32(float* y, const float* x, i64 n) {
    GRID_STRIDE_LOOP(i, n) y[i] += x[i];
}

// y = alpha * x. x, y: (n,).
extern "C" __global__ void scale_f32(const float* x, float alpha, float* y, i64 n) {
    GRID_STRIDE_LOOP(i, n) y[i] = alpha * x[i];
}

// y[i] = value (zeroing, or NaN poisoning in tests). y: (n,).
extern "C" __global__ void fill_f32(float* y, float value, i64 n) {
    GRID_STRIDE_LOOP(i, n) y[i] = value;
}

// y = max(x, 0). x, y: (n,).
extern "C" __global__ void relu_fwd_f32(const float* x, float* y, i64 n) {
    GRID_STRIDE_LOOP(i, n) y[i] = fmaxf(x[i], 0.0f);
}

// dx = dy where x > 0, else 0 (x may be the forward input or output: same sign test).
// x, dy, dx: (n,).
extern "C" __global__ void relu_bwd_f32(const float* x, const float* dy, float* dx, i64 n) {
    GRID_STRIDE_LOOP(i, n) dx[i] = x[i] > 0.0f ? dy[i] : 0.0f;
}

// Exact GELU: y = 0.5 x (1 + erf(x / sqrt 2)). x, y: (n,).
extern "C" __global__ void gelu_fwd_f32(const float* x, float* y, i64 n) {
    GRID_STRIDE_LOOP(i, n) {
        const float v = x[i];
        y[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    }
}

// dx = dy * (Phi(x) + x phi(x)), Phi the normal CDF, phi its density. x, dy, dx: (n,).
extern "C" __global__ void gelu_bwd_f32(const float* x, const float* dy, float* dx, i64 n) {
    GRID_STRIDE_LOOP(i, n) {
        const float v = x[i];
        const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
        const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
        dx[i] = dy[i] * (cdf + v * pdf);
    }
}

// y[r, c] += b[c]. y: (rows, cols), b: (cols,).
extern "C" __global__ void bias_add_f32(float* y, const float* b, i64 rows, i64 cols) {
    GRID_STRIDE_LOOP(i, rows * cols) y[i] += b[i % cols];
}

// out[c] = sum_r x[r, c] (bias gradient). x: (rows, cols), out: (cols,).
// One thread per column; consecutive threads read consecutive columns (coalesced).
extern "C" __global__ void col_sum_f32(const float* x, float* out, i64 rows, i64 cols) {
    GRID_STRIDE_LOOP(c, cols) {
        float acc = 0.0f;
        for (i64 r = 0; r < rows; ++r) acc += x[r * cols + c];
        out[c] = acc;
    }
}

// out[0] = sum of x. x: (n,). Launch with ONE block (any multiple of 32 up to 1024 threads):
// meant for small buffers (loss partials), deterministic order.
extern "C" __global__ void sum_f32(const float* x, float* out, i64 n) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) acc += x[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = acc;
}

// The bf16 kernels take 4 elements per step (ld4 / st4: one 8-byte access per bf16 operand, 16
// bytes per f32 one) when every pointer is aligned for it: the units 0 .. n/4 - 1, then the
// n % 4 trailing elements one at a time; otherwise every element one at a time. Any grid is
// correct (the launcher's grid for n elements has 4x the threads the 4-wide loop needs).
// Elementwise: both paths store the same bits.

// y = round_bf16(x) (f32 -> bf16 storage). x: (n,) f32, y: (n,) bf16.
extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16* __restrict__ y,
                                         i64 n) {
    i64 done = 0;
    if (aligned4(x) && aligned4(y)) {
        const i64 n4 = n / 4;
        GRID_STRIDE_LOOP(i, n4) st4(y, i, ld4(x, i));
        done = 4 * n4;
    }
    GRID_STRIDE_LOOP(i, n - done) st(y, done + i, x[done + i]);
}

// y = x widened (exact). x: (n,) bf16, y: (n,) f32.
extern "C" __global__ void cast_bf16_f32(const bf16* __restrict__ x, float* __restrict__ y,
                                         i64 n) {
    i64 done = 0;
    if (aligned4(x) && aligned4(y)) {
        const i64 n4 = n / 4;
        GRID_STRIDE_LOOP(i, n4) st4(y, i, ld4(x, i));
        done = 4 * n4;
    }
    GRID_STRIDE_LOOP(i, n - done) y[done + i] = ld(x, done + i);
}

// y = round_bf16(a + b), the sum in f32. a, b, y: (n,) bf16. y may alias a or b (no
// __restrict__; each element, or 4-element unit, is read before it is written, by the same
// thread).
extern "C" __global__ void add_bf16(const bf16* a, const bf16* b, bf16* y, i64 n) {
    i64 done = 0;
    if (aligned4(a) && aligned4(b) && aligned4(y)) {
        const i64 n4 = n / 4;
        GRID_STRIDE_LOOP(i, n4) {
            const float4 u = ld4(a, i), v = ld4(b, i);
            float4 r;
            r.x = u.x + v.x;
            r.y = u.y + v.y;
            r.z = u.z + v.z;
            r.w = u.w + v.w;
            st4(y, i, r);
        }
        done = 4 * n4;
    }
    GRID_STRIDE_LOOP(i, n - done) st(y, done + i, ld(a, done + i) + ld(b, done + i));
}

// ---------------------------------------------------------------- NCHW <-> NHWC
// Layout conversions of (N, C, HW) tensors: NCHW stores (n, c, hw) at (n * C + c) * HW + hw,
// NHWC at (n * HW + hw) * C + c; for each n that is the transpose of a (C, HW) matrix. Images
// and activations: HW = H * W; conv weights (O, C, KH, KW): N = O, HW = KH * KW. Each element is
// converted exactly as cast_f32_bf16 / cast_bf16_f32 would (f32 -> bf16: f32_to_bf16, RNE; bf16
// -> f32: exact widening; bf16 -> bf16: the bits copied unchanged, NaN payloads included).
//
// Tiled shared-memory transpose. LAUNCH GEOMETRY (the kernels rely on it): block (32, 8, 1),
// grid (ceil(HW / 32), ceil(C / 32), min(N, 65535)), the same grid for both directions. Block
// (bx, by) moves the 32 x 32 tile hw in [32 bx, 32 bx + 32), c in [32 by, 32 by + 32) of images
// n = blockIdx.z, blockIdx.z + gridDim.z, ...: it reads the tile along the input's contiguous
// axis into shared memory (8 rows of 32 per pass, 4 passes) and writes it along the output's
// contiguous axis, so both the loads and the stores of a warp are 32 consecutive elements.
// Edge tiles are guarded (any C, HW >= 1); the tile is padded to 33 columns against shared-
// memory bank conflicts on the transposed access. HW == 1 or C == 1 (both layouts coincide:
// 1x1 conv weights) is a plain elementwise cast on the same grid (transpose_trivial).
// C <= 8 with HW > 1 (the images, the stem's weights) takes a per-pixel path instead
// (transpose_small_c), on a 1-d grid sized to the pixels.
#define TRANSPOSE_TILE 32
#define TRANSPOSE_ROWS 8

// Stores one converted element: bf16 -> bf16 copies the bits; the others as the casts.
__device__ __forceinline__ void cvt_st(bf16* p, i64 i, bf16 v) { p[i] = v; }
__device__ __forceinline__ void cvt_st(bf16* p, i64 i, float v) { p[i] = f32_to_bf16(v); }
__device__ __forceinline__ void cvt_st(float* p, i64 i, bf16 v) { p[i] = bf16_to_f32(v); }

// HW == 1 (1x1 conv weights, (N, C) tensors) or C == 1: both layouts are the same array, so the
// conversion is an elementwise cast. Every block of the transpose grid takes this branch (it
// depends on the arguments only), as a grid-stride loop over all N * C * HW elements with the
// grid's threads numbered linearly (any grid is correct; the transpose grid has 256 threads per
// 32 x 32 tile, more than the elements unless N > 65535). Returns whether it did the work.
template <class Tin, class Tout>
__device__ __forceinline__ bool transpose_trivial(const Tin* __restrict__ x, Tout* __restrict__ y,
                                                  i64 N, int C, i64 HW) {
    if (HW != 1 && C != 1) return false;
    const i64 block = ((i64)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const i64 threads = (i64)blockDim.x * blockDim.y;
    const i64 stride = threads * gridDim.x * gridDim.y * gridDim.z;
    const i64 total = N * C * HW;
    for (i64 i = block * threads + threadIdx.y * blockDim.x + threadIdx.x; i < total; i += stride)
        cvt_st(y, i, x[i]);
    return true;
}

// C <= TRANSPOSE_SMALL_C (the 3 image channels, the stem conv's weights), HW > 1: a thread
// converts whole pixels, reading the pixel's C values from the C planes (consecutive threads on
// consecutive hw: coalesced per plane) and writing them as one contiguous run (or the reverse
// for NHWC -> NCHW), grid-stride over the N * HW pixels with the grid's threads numbered
// linearly (any grid is correct; the host sizes it to the pixels). The tiles would use C of
// their 32 rows: an H200 profile measured 1.4 ms for the (256, 3, 224, 224) images, 30x their
// memory time. Same per-element conversion (cvt_st), same bits. Returns whether it did the work.
#define TRANSPOSE_SMALL_C 8
template <class Tin, class Tout>
__device__ __forceinline__ bool transpose_small_c(const Tin* __restrict__ x, Tout* __restrict__ y,
                                                  i64 N, int C, i64 HW, bool to_nhwc) {
    if (C > TRANSPOSE_SMALL_C || HW == 1) return false;
    const i64 block = ((i64)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const i64 threads = (i64)blockDim.x * blockDim.y;
    const i64 stride = threads * gridDim.x * gridDim.y * gridDim.z;
    for (i64 p = block * threads + threadIdx.y * blockDim.x + threadIdx.x; p < N * HW;
         p += stride) {
        const i64 n = p / HW, hw = p - n * HW;
        for (int c = 0; c < C; ++c) {
            const i64 planar = (n * C + c) * HW + hw, packed = p * C + c;
            if (to_nhwc)
                cvt_st(y, packed, x[planar]);
            else
                cvt_st(y, planar, x[packed]);
        }
    }
    return true;
}

// y (N, B, A) = x (N, A, B) transposed per n, converted from Tin to Tout, for the tile of this
// block whose corner is (a0, b0): it loads rows a (consecutive threads on consecutive b) and
// stores rows b (consecutive threads on consecutive a). Both directions are this one transpose:
// NCHW -> NHWC is (A, B) = (C, HW), NHWC -> NCHW is (A, B) = (HW, C).
template <class Tin, class Tout>
__device__ __forceinline__ void transpose_planes(const Tin* __restrict__ x, Tout* __restrict__ y,
                                                 i64 N, i64 A, i64 B, i64 a0, i64 b0) {
    __shared__ Tin tile[TRANSPOSE_TILE][TRANSPOSE_TILE + 1];  // [a - a0][b - b0]
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (i64 n = blockIdx.z; n < N; n += gridDim.z) {
        for (int j = ty; j < TRANSPOSE_TILE; j += TRANSPOSE_ROWS) {
            const i64 a = a0 + j, b = b0 + tx;
            if (a < A && b < B) tile[j][tx] = x[(n * A + a) * B + b];
        }
        __syncthreads();
        for (int j = ty; j < TRANSPOSE_TILE; j += TRANSPOSE_ROWS) {
            const i64 b = b0 + j, a = a0 + tx;
            if (a < A && b < B) cvt_st(y, (n * B + b) * A + a, tile[tx][j]);
        }
        __syncthreads();  // the tile is reused by the next n
    }
}

// y (N, HW, C) = x (N, C, HW) transposed per n, converted from Tin to Tout.
template <class Tin, class Tout>
__device__ __forceinline__ void nchw_to_nhwc(const Tin* __restrict__ x, Tout* __restrict__ y,
                                             i64 N, int C, i64 HW) {
    if (transpose_trivial(x, y, N, C, HW) || transpose_small_c(x, y, N, C, HW, true)) return;
    transpose_planes(x, y, N, (i64)C, HW, (i64)blockIdx.y * TRANSPOSE_TILE,
                     (i64)blockIdx.x * TRANSPOSE_TILE);
}

// y (N, C, HW) = x (N, HW, C) transposed per n, converted from Tin to Tout.
template <class Tin, class Tout>
__device__ __forceinline__ void nhwc_to_nchw(const Tin* __restrict__ x, Tout* __restrict__ y,
                                             i64 N, int C, i64 HW) {
    if (transpose_trivial(x, y, N, C, HW) || transpose_small_c(x, y, N, C, HW, false)) return;
    transpose_planes(x, y, N, HW, (i64)C, (i64)blockIdx.x * TRANSPOSE_TILE,
                     (i64)blockIdx.y * TRANSPOSE_TILE);
}

// f32 NCHW -> bf16 NHWC (images, conv weights): round_bf16 of each element. x: (N, C, HW) f32,
// y: (N, HW, C) bf16.
extern "C" __global__ void nchw_to_nhwc_f32_bf16(const float* __restrict__ x,
                                                 bf16* __restrict__ y, i64 N, int C, i64 HW) {
    nchw_to_nhwc(x, y, N, C, HW);
}
// bf16 NCHW -> bf16 NHWC, bits unchanged. x: (N, C, HW), y: (N, HW, C).
extern "C" __global__ void nchw_to_nhwc_bf16_bf16(const bf16* __restrict__ x,
                                                  bf16* __restrict__ y, i64 N, int C, i64 HW) {
    nchw_to_nhwc(x, y, N, C, HW);
}
// bf16 NHWC -> f32 NCHW (weight gradients, activations going back to f32): exact. x: (N, HW, C)
// bf16, y: (N, C, HW) f32.
extern "C" __global__ void nhwc_to_nchw_bf16_f32(const bf16* __restrict__ x,
                                                 float* __restrict__ y, i64 N, int C, i64 HW) {
    nhwc_to_nchw(x, y, N, C, HW);
}
// bf16 NHWC -> bf16 NCHW, bits unchanged. x: (N, HW, C), y: (N, C, HW).
extern "C" __global__ void nhwc_to_nchw_bf16_bf16(const bf16* __restrict__ x,
                                                  bf16* __restrict__ y, i64 N, int C, i64 HW) {
    nhwc_to_nchw(x, y, N, C, HW);
}
