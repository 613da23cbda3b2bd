// Weight normalization of the prototypes (gain frozen at 1): each row of v (rows, cols) is used
// as w_r = v_r / ||v_r||. One warp per row (cols = 256 for the CARP prototypes).
// A zero row divides by zero, exactly as the formula (and the CPU reference) does.
#include "common.cuh"

// norms[r] = ||v_r||. v: (rows, cols), norms: (rows,).
extern "C" __global__ void row_norms_f32(const float* v, float* norms, i64 rows, i64 cols) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 nwarps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 r = warp; r < rows; r += nwarps) {
        float acc = 0.0f;
        for (i64 j = lane; j < cols; j += 32) {
            const float t = v[r * cols + j];
            acc += t * t;
        }
        acc = warp_sum(acc);
        if (lane == 0) norms[r] = sqrtf(acc);
    }
}

// w = v / norms (row-wise). v, w: (rows, cols); norms: (rows,).
extern "C" __global__ void row_normalize_f32(const float* v, const float* norms, float* w,
                                             i64 rows, i64 cols) {
    GRID_STRIDE_LOOP(i, rows * cols) w[i] = v[i] / norms[i / cols];
}

// Backward of the normalization: dv_r = (dw_r - (dw_r . w_r) w_r) / ||v_r||.
// dw, w: (rows, cols); norms: (rows,); dv: (rows, cols).
extern "C" __global__ void row_normalize_bwd_f32(const float* dw, const float* w,
                                                 const float* norms, float* dv, i64 rows,
                                                 i64 cols) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 nwarps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 r = warp; r < rows; r += nwarps) {
        float dot = 0.0f;
        for (i64 j = lane; j < cols; j += 32) dot += dw[r * cols + j] * w[r * cols + j];
        dot = warp_sum(dot);
        const float inv = 1.0f / norms[r];
        for (i64 j = lane; j < cols; j += 32) {
            const i64 idx = r * cols + j;
            dv[idx] = (dw[idx] - dot * w[idx]) * inv;
        }
    }
}
