// The fused CARP loss (SPEC.md "Loss"), f32.
//
// Symbols: N rows per view (this GPU), K prototypes, NB block size, NP = K / NB blocks,
// VS student views (>= 2; views 0 and 1 are the global views, 2.. optional local crops),
// 2 teacher views. perm: (K,) the step's permutation; block j holds prototypes
// perm[j*NB .. (j+1)*NB].
//
// Passes (host order):
//   1. carp_softmax_gather_f32 (student, then teacher): gather each row's logits by the
//      permutation, block softmax, write P (gathered layout) and add every row into pbar_sum.
//      [one read of the N x K logits per view]
//   (multi-GPU: all-reduce pbar_sum here; R below is then the global row count)
//   2. carp_entropy_f32: pbar = pbar_sum / R, the uniformity term H and its gradient factor g.
//   3. carp_consistency_grad_f32: per (row, block) the consistency terms against the two
//      teacher views and the full gradient w.r.t. the student logits, scattered back to the
//      original prototype order. [one read of P, one write of the N x K gradient per view]
//   4. sum_f32 (elementwise.cu) over the per-(row, block) consistency partials.
//
// Pairs: (student view a, teacher view b) with a != b; P_pairs = 2 + 2 (VS - 2); consistency
// is the mean over pairs, blocks and rows of -log(clamp(<p_a, q_b>, eps, 1 - eps)).
// Uniformity rows: every student view (local crops included) and both teacher views,
// R = (VS + 2) N on one GPU, as the official code (modules/carp_loss.py concatenates all student
// and teacher outputs) and the CPU reference (src/ops/loss.rs); the uniformity gradient reaches
// every student view. For VS = 2 this is SPEC.md's 4N.
#include "common.cuh"

#define CARP_EPS 1.1920929e-7f

// Pass 1. grid = (NP, N, V), block = a multiple of 32 (<= 1024; NB need not be a multiple).
// logits: (V, N, K) in the original prototype order; perm: (K,) as int;
// P: (V, NP, N, NB) softmax in gathered order; pbar_sum: (NP, NB), zero-filled before the
// first launch; views v < pbar_views add their rows to it (the launcher passes all views).
extern "C" __global__ void carp_softmax_gather_f32(const float* logits, const int* perm, float* P,
                                                   float* pbar_sum, int N, int K, int NB,
                                                   int pbar_views) {
    __shared__ float scratch[32];
    const int j = blockIdx.x;
    const int i = blockIdx.y;
    const int v = blockIdx.z;
    const int NP = K / NB;
    const float* row = logits + ((i64)v * N + i) * K;
    const int* pj = perm + (i64)j * NB;
    float m = -CUDART_INF_F;
    for (int k = threadIdx.x; k < NB; k += blockDim.x) m = fmaxf(m, row[pj[k]]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int k = threadIdx.x; k < NB; k += blockDim.x) s += expf(row[pj[k]] - m);
    s = block_sum(s, scratch);
    const float inv = 1.0f / s;
    float* out = P + (((i64)v * NP + j) * N + i) * NB;
    const bool to_pbar = v < pbar_views;
    for (int k = threadIdx.x; k < NB; k += blockDim.x) {
        const float p = expf(row[pj[k]] - m) * inv;
        out[k] = p;
        if (to_pbar) atomicAdd(&pbar_sum[(i64)j * NB + k], p);
    }
}

// Pass 2. ONE block (any multiple of 32 up to 1024). pbar_sum, g: (NP, NB); h_out: (1,).
// R: the number of rows summed into pbar_sum ((VS + 2) N, global across GPUs).
// H = log NB + (1/NP) sum_{j,k} pbar log clamp(pbar);
// g = (log clamp(pbar) + [pbar not clamped]) / (R NP)  (dH/dp for one row's probability).
extern "C" __global__ void carp_entropy_f32(const float* pbar_sum, float* g, float* h_out, int K,
                                            int NB, float R) {
    __shared__ float scratch[32];
    const int NP = K / NB;
    float acc = 0.0f;
    for (int idx = threadIdx.x; idx < K; idx += blockDim.x) {
        const float pb = pbar_sum[idx] / R;
        const bool clamped = !(pb >= CARP_EPS && pb <= 1.0f - CARP_EPS);
        const float lc = logf(fminf(fmaxf(pb, CARP_EPS), 1.0f - CARP_EPS));
        acc += pb * lc;
        g[idx] = (lc + (clamped ? 0.0f : 1.0f)) / (R * (float)NP);
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) h_out[0] = logf((float)NB) + acc / (float)NP;
}

// Pass 3. grid = (NP, N), block = a multiple of 32 (<= 1024).
// Ps: (VS, NP, N, NB) student softmax; Pt: (2, NP, N, NB) teacher softmax; g: (NP, NB);
// dlogits: (VS, N, K) in the ORIGINAL prototype order (every element written);
// partial: (N * NP,) this (row, block)'s consistency contribution, already divided by
// (P_pairs N NP) so that their sum is the consistency term.
// Gradient for student view a (p = p_a, q_b the teacher views paired with a, s_b = <p, q_b>):
//   c * sum_b -p_k (q_bk - s_b) / s_b        (term dropped where s_b is clamped)
//   + p_k (g_k - <p, g>)                     (uniformity: every student view's rows are in pbar)
// with c = 1 / (P_pairs N NP).
extern "C" __global__ void carp_consistency_grad_f32(const float* Ps, const float* Pt,
                                                     const float* g, const int* perm,
                                                     float* dlogits, float* partial, int N,
                                                     int K, int NB, int VS) {
    __shared__ float scratch[32];
    const int j = blockIdx.x;
    const int i = blockIdx.y;
    const int NP = K / NB;
    const int n_pairs = 2 + 2 * (VS - 2);
    const float c = 1.0f / ((float)n_pairs * (float)N * (float)NP);
    const i64 plane = (i64)NP * N * NB;               // one view of P
    const i64 off = ((i64)j * N + i) * NB;            // this (block, row) inside a view
    const float* q0 = Pt + off;
    const float* q1 = Pt + plane + off;
    const float* gj = g + (i64)j * NB;
    const int* pj = perm + (i64)j * NB;
    float loss = 0.0f;
    for (int a = 0; a < VS; ++a) {
        const float* p = Ps + a * plane + off;
        float s0 = 0.0f, s1 = 0.0f, pg = 0.0f;
        for (int k = threadIdx.x; k < NB; k += blockDim.x) {
            const float pk = p[k];
            s0 += pk * q0[k];
            s1 += pk * q1[k];
            pg += pk * gj[k];
        }
        s0 = block_sum(s0, scratch);
        s1 = block_sum(s1, scratch);
        pg = block_sum(pg, scratch);
        // Which teacher views pair with a: all b != a (a = 0 -> t1, a = 1 -> t0, a >= 2 -> both).
        const bool use0 = a != 0;
        const bool use1 = a != 1;
        const bool live0 = use0 && s0 >= CARP_EPS && s0 <= 1.0f - CARP_EPS;
        const bool live1 = use1 && s1 >= CARP_EPS && s1 <= 1.0f - CARP_EPS;
        if (use0) loss -= logf(fminf(fmaxf(s0, CARP_EPS), 1.0f - CARP_EPS));
        if (use1) loss -= logf(fminf(fmaxf(s1, CARP_EPS), 1.0f - CARP_EPS));
        float* out = dlogits + ((i64)a * N + i) * K;
        for (int k = threadIdx.x; k < NB; k += blockDim.x) {
            const float pk = p[k];
            float d = 0.0f;
            if (live0) d -= c * pk * (q0[k] - s0) / s0;
            if (live1) d -= c * pk * (q1[k] - s1) / s1;
            d += pk * (gj[k] - pg);
            out[pj[k]] = d;
        }
    }
    if (threadIdx.x == 0) partial[(i64)i * NP + j] = loss * c;
}
