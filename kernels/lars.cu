// LARS over the flat parameter buffer (SPEC.md "Optimizer"): momentum, trust coefficient, no
// Nesterov; 1-d parameters (biases, BN) get neither weight decay nor adaptation; the trust ratio
// is per tensor.
//
// The flat buffer is cut into chunks that never straddle two tensors (the host builds the chunk
// table once from the parameter table: static shapes). One block per chunk:
//   chunk_seg[b]   the tensor (segment) index of chunk b
//   chunk_start[b] its first element in the flat buffer
//   chunk_len[b]   its length (<= the host's chunk size)
//   seg_is_1d[s]   1 for a 1-d tensor
// Pass 1 (`lars_norms_checked_f32`, below) accumulates per-tensor ||w||^2 and ||g + wd w||^2
// with atomics (zero them first); pass 2 applies the update. Two launches, each one read of w
// and g.
#include "common.cuh"

// The update, in place on w and mu (the momentum buffer, same layout as w):
//   multi-d: g' = (g + wd w) * q, q = trust * ||w|| / ||g + wd w|| (1 when either norm is 0)
//   1-d:     g' = g
//   mu = momentum * mu + g';  w -= lr * mu
__device__ __forceinline__ void lars_update_body(float* w, const float* g, float* mu,
                                                 const int* chunk_seg, const i64* chunk_start,
                                                 const int* chunk_len, const int* seg_is_1d,
                                                 const float* wnorm2, const float* gnorm2,
                                                 float lr, float momentum, float trust,
                                                 float wd) {
    const int seg = chunk_seg[blockIdx.x];
    const i64 start = chunk_start[blockIdx.x];
    const int len = chunk_len[blockIdx.x];
    const bool one_d = seg_is_1d[seg] != 0;
    float q = 1.0f;
    float decay = 0.0f;
    if (!one_d) {
        decay = wd;
        const float wn = sqrtf(wnorm2[seg]);
        const float gn = sqrtf(gnorm2[seg]);
        if (wn > 0.0f && gn > 0.0f) q = trust * wn / gn;
    }
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const i64 i = start + j;
        const float wv = w[i];
        const float gp = (g[i] + decay * wv) * q;
        const float m = momentum * mu[i] + gp;
        mu[i] = m;
        w[i] = wv - lr * m;
    }
}

extern "C" __global__ void lars_update_f32(float* w, const float* g, float* mu,
                                           const int* chunk_seg, const i64* chunk_start,
                                           const int* chunk_len, const int* seg_is_1d,
                                           const float* wnorm2, const float* gnorm2, float lr,
                                           float momentum, float trust, float wd) {
    lars_update_body(w, g, mu, chunk_seg, chunk_start, chunk_len, seg_is_1d, wnorm2, gnorm2, lr,
                     momentum, trust, wd);
}

// `lars_update_f32` gated by the step's device-side "step ok" flag (`step_ok_f32` below): does
// nothing while *ok == 0, so a non-finite step leaves w and mu bit-identical without the host
// having to look at the flag first (no wait in the middle of the step).
extern "C" __global__ void lars_update_gated_f32(float* w, const float* g, float* mu,
                                                 const int* chunk_seg, const i64* chunk_start,
                                                 const int* chunk_len, const int* seg_is_1d,
                                                 const float* wnorm2, const float* gnorm2,
                                                 float lr, float momentum, float trust, float wd,
                                                 const int* ok) {
    if (*ok == 0) return;  // grid-uniform
    lars_update_body(w, g, mu, chunk_seg, chunk_start, chunk_len, seg_is_1d, wnorm2, gnorm2, lr,
                     momentum, trust, wd);
}

// Pass 1 with the training step's NaN guard fused in, over EVERY segment (1-d included):
//   stats[s]              ||w||^2            (multi-d segments; 0 for 1-d)
//   stats[n_segs + s]     ||g + wd w||^2     (multi-d segments; 0 for 1-d)
//   stats[2 n_segs + s]   how many g of segment s are NaN or +-inf (every segment)
// stats: (3, n_segs), zero-filled before the launch. The host downloads the 3 n_segs floats
// once per step and names the first segment with a non-finite gradient before any weight
// changes; `lars_update_f32` then reads the norms from stats (wnorm2 = stats,
// gnorm2 = stats + n_segs). The count is exact (a float counts exactly up to 2^24 per block
// chunk, and the host only tests it against 0).
extern "C" __global__ void lars_norms_checked_f32(const float* w, const float* g,
                                                  const int* chunk_seg, const i64* chunk_start,
                                                  const int* chunk_len, const int* seg_is_1d,
                                                  float wd, float* stats, int n_segs) {
    __shared__ float scratch[32];
    const int seg = chunk_seg[blockIdx.x];
    const bool one_d = seg_is_1d[seg] != 0;  // block-uniform
    const i64 start = chunk_start[blockIdx.x];
    const int len = chunk_len[blockIdx.x];
    float sw = 0.0f, sg = 0.0f, bad = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float gr = g[start + j];
        // |x| < inf is false exactly for NaN and +-inf.
        if (!(fabsf(gr) < CUDART_INF_F)) bad += 1.0f;
        if (!one_d) {
            const float wv = w[start + j];
            const float gv = gr + wd * wv;
            sw += wv * wv;
            sg += gv * gv;
        }
    }
    bad = block_sum(bad, scratch);
    if (!one_d) {
        sw = block_sum(sw, scratch);
        sg = block_sum(sg, scratch);
    }
    if (threadIdx.x == 0) {
        if (bad != 0.0f) atomicAdd(&stats[2 * n_segs + seg], bad);
        if (!one_d) {
            atomicAdd(&stats[seg], sw);
            atomicAdd(&stats[n_segs + seg], sg);
        }
    }
}

// The step's device-side verdict, after `lars_norms_checked_f32` and the fused loss. ONE block
// (a multiple of 32, <= 1024). stats: (3 n_segs + 3), the first 3 n_segs as
// `lars_norms_checked_f32` left them; loss_hc: (2,) [entropy H, consistency] (the loss is
// H + consistency). Writes
//   *ok = 1 when the loss is finite, no gradient is non-finite and every multi-d segment has
//        finite ||w||^2 and ||g + wd w||^2 (a finite trust ratio); else 0
//   stats[3 n_segs .. 3 n_segs + 3) = [H, consistency, ok]
// so that ONE download of stats after the whole step is queued gives the host the loss terms,
// the verdict and (on failure) the entry to name. The gated update kernels read *ok.
extern "C" __global__ void step_ok_f32(float* stats, const int* seg_is_1d, int n_segs,
                                       const float* loss_hc, int* ok) {
    __shared__ float scratch[32];
    float bad = 0.0f;
    for (int s = threadIdx.x; s < n_segs; s += blockDim.x) {
        if (stats[2 * n_segs + s] != 0.0f) bad += 1.0f;
        if (seg_is_1d[s] == 0 &&
            !(fabsf(stats[s]) < CUDART_INF_F && fabsf(stats[n_segs + s]) < CUDART_INF_F))
            bad += 1.0f;
    }
    bad = block_sum(bad, scratch);
    if (threadIdx.x == 0) {
        const float h = loss_hc[0];
        const float c = loss_hc[1];
        const float loss = h + c;  // the host's loss = s[0] + s[1], in f32
        const int good = (bad == 0.0f && fabsf(loss) < CUDART_INF_F) ? 1 : 0;
        *ok = good;
        stats[3 * n_segs] = h;
        stats[3 * n_segs + 1] = c;
        stats[3 * n_segs + 2] = (float)good;
    }
}
