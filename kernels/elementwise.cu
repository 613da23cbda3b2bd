// Elementwise kernels (f32, any shape flattened to n elements) plus two small reductions the
// other ops need (bias add / column sums for linear layers, and a one-block sum).
// All are grid-stride loops: any grid size is correct; the launcher picks one that fills the GPU.
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
