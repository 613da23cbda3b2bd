// Batch normalization, f32, NCHW. An (N, C) input (after a linear layer) is the case HW = 1.
// M = N * HW elements per channel. Training mode normalizes with the batch statistics (biased
// variance) and reports the unbiased variance for the running update (PyTorch's convention).
//
// Layout note: x[(n * C + c) * HW + hw]. The per-channel reductions run one block per channel;
// NHWC variants will add their own kernels beside these (the host picks by the tensor's layout).
#include "common.cuh"

__device__ __forceinline__ i64 bn_index(i64 m, int c, int C, i64 HW) {
    const i64 n = m / HW;
    const i64 hw = m - n * HW;
    return (n * C + c) * HW + hw;
}

// Training statistics. One block per channel (grid = C).
// x: (N, C, HW). mean, invstd, var_unbiased: (C,). invstd = 1 / sqrt(var_biased + eps).
// Two passes over the channel (mean, then squared deviations) for accuracy.
extern "C" __global__ void bn_stats_f32(const float* x, float* mean, float* invstd,
                                        float* var_unbiased, i64 N, int C, i64 HW, float eps) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    const i64 M = N * HW;
    float acc = 0.0f;
    for (i64 m = threadIdx.x; m < M; m += blockDim.x) acc += x[bn_index(m, c, C, HW)];
    const float mu = block_sum(acc, scratch) / (float)M;
    float acc2 = 0.0f;
    for (i64 m = threadIdx.x; m < M; m += blockDim.x) {
        const float d = x[bn_index(m, c, C, HW)] - mu;
        acc2 += d * d;
    }
    const float var = block_sum(acc2, scratch) / (float)M;
    if (threadIdx.x == 0) {
        mean[c] = mu;
        invstd[c] = rsqrtf(var + eps);
        // M == 1 has no unbiased estimate; report the biased one rather than dividing by 0.
        var_unbiased[c] = M > 1 ? var * (float)M / (float)(M - 1) : var;
    }
}

// y = (x - mean[c]) * invstd[c] * gamma[c] + beta[c]. x, y: (N, C, HW); the rest (C,).
// Used for training (batch mean/invstd) and, after bn_invstd_f32, for eval (running stats).
extern "C" __global__ void bn_forward_f32(const float* x, const float* mean,
                                          const float* invstd, const float* gamma,
                                          const float* beta, float* y, i64 N, int C, i64 HW) {
    GRID_STRIDE_LOOP(i, N * C * HW) {
        const int c = (int)((i / HW) % C);
        y[i] = (x[i] - mean[c]) * invstd[c] * gamma[c] + beta[c];
    }
}

// invstd[c] = 1 / sqrt(var[c] + eps) (eval mode: var is the running variance). (C,).
extern "C" __global__ void bn_invstd_f32(const float* var, float* invstd, int C, float eps) {
    GRID_STRIDE_LOOP(c, C) invstd[c] = rsqrtf(var[c] + eps);
}

// Parameter gradients. One block per channel (grid = C).
// dy, x: (N, C, HW); mean, invstd: (C,) (batch stats in training, running stats in eval).
// dgamma[c] = sum dy * xhat, dbeta[c] = sum dy, xhat = (x - mean) * invstd.
extern "C" __global__ void bn_backward_reduce_f32(const float* dy, const float* x,
                                                  const float* mean, const float* invstd,
                                                  float* dgamma, float* dbeta, i64 N, int C,
                                                  i64 HW) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    const i64 M = N * HW;
    const float mu = mean[c];
    const float is = invstd[c];
    float sg = 0.0f, sb = 0.0f;
    for (i64 m = threadIdx.x; m < M; m += blockDim.x) {
        const i64 idx = bn_index(m, c, C, HW);
        const float g = dy[idx];
        sb += g;
        sg += g * (x[idx] - mu) * is;
    }
    sg = block_sum(sg, scratch);
    sb = block_sum(sb, scratch);
    if (threadIdx.x == 0) {
        dgamma[c] = sg;
        dbeta[c] = sb;
    }
}

// Training-mode input gradient (after bn_backward_reduce_f32):
// dx = gamma * invstd / M * (M * dy - dbeta - xhat * dgamma). All (N, C, HW) / (C,).
extern "C" __global__ void bn_backward_dx_f32(const float* dy, const float* x,
                                              const float* mean, const float* invstd,
                                              const float* gamma, const float* dgamma,
                                              const float* dbeta, float* dx, i64 N, int C,
                                              i64 HW) {
    const float Mf = (float)(N * HW);
    GRID_STRIDE_LOOP(i, N * C * HW) {
        const int c = (int)((i / HW) % C);
        const float xhat = (x[i] - mean[c]) * invstd[c];
        dx[i] = gamma[c] * invstd[c] / Mf * (Mf * dy[i] - dbeta[c] - xhat * dgamma[c]);
    }
}

// Eval-mode input gradient: the statistics are constants, dx = dy * gamma * invstd.
extern "C" __global__ void bn_eval_backward_dx_f32(const float* dy, const float* invstd,
                                                   const float* gamma, float* dx, i64 N,
                                                   int C, i64 HW) {
    GRID_STRIDE_LOOP(i, N * C * HW) {
        const int c = (int)((i / HW) % C);
        dx[i] = dy[i] * gamma[c] * invstd[c];
    }
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
