// The colour half of SPEC.md's views on the GPU: u8 (B, S, S, 3) crops and one ColorParams per
// image -> normalized f32 (B, 3, S, S). A transcription of the CPU `finish`
// (src/data/augment.rs), which is the specification: the same operations in the same order
// (jitter in the drawn order, grayscale, Gaussian blur, solarize, normalize), the same formulas
// (torchvision's tensor definitions on [0, 1] floats, each clamping to [0, 1]).
//
// The horizontal flip is NOT applied here: the CPU geometry (`resample`) already mirrored the
// crop, and `ColorParams::flipped` only records that it did (the CPU `finish` ignores it too).
//
// Launch sequence (src/device/cuda/augment.rs, mirrored by tests/gpu_sim/sim_test.cpp):
// 1. aug_color_f32, one block per image: u8 -> [0, 1], the jitter ops, grayscale; the contrast
//    op needs the mean of the image's grayscale at its point in the order, so each contrast op
//    ends a pass over the image with a block reduction (at most 5 passes, 2 with the sampler's
//    permutations). Images without blur are also solarized and normalized here (done);
//    images with blur are left un-normalized in `out` for:
// 2. aug_blur_h_f32, one block per (row, image * channel): the row pass of the separable blur,
//    out -> tmp (blurred images only; others return at once);
// 3. aug_blur_v_f32, same grid: the column pass, tmp -> out, fused with solarize + normalize.
#include "common.cuh"

// Bit-for-bit the layout of Rust's `#[repr(C)] ColorParams` (28 bytes, 4-byte aligned).
struct ColorParams {
    float brightness;
    float contrast;
    float saturation;
    float hue;
    float blur_sigma;  // 0 = no blur
    unsigned char order[4];  // 0 brightness, 1 contrast, 2 saturation, 3 hue
    unsigned char jitter;
    unsigned char grayscale;
    unsigned char solarize;
    unsigned char flipped;  // informational: the crop is already mirrored
};

// Normalization constants and the solarize threshold (already on [0, 1], computed on the host
// as the CPU computes it, so a pixel exactly at the threshold is decided the same way).
struct AugNorm {
    float mean[3];
    float inv_std[3];
    float threshold;
};

// Largest blur radius the kernels hold weights for: ceil(3 * 100) for ViewConfig's sigma <= 100.
#define AUG_MAX_RADIUS 300

__device__ __forceinline__ float aug_clamp01(float v) { return fminf(fmaxf(v, 0.0f), 1.0f); }

__device__ __forceinline__ float aug_gray(float r, float g, float b) {
    return 0.299f * r + 0.587f * g + 0.114f * b;
}

// Rust's f32::rem_euclid(1.0): fmod, then shifted into [0, 1).
__device__ __forceinline__ float aug_rem1(float x) {
    float r = fmodf(x, 1.0f);
    return r < 0.0f ? r + 1.0f : r;
}

// The hue rotation of one pixel, the CPU's rotate_hue (src/data/augment.rs, which derives it):
// torchvision's _rgb2hsv, (h + f) % 1 and _hsv2rgb in one division and no selection by sextant.
// With the hue in sextants (H = 6 h), v = max and c = max - min, channel n (red 5, green 3,
// blue 1) is v - c clamp(min(k, 4 - k), 0, 1) with k = (H + n) mod 6: continuous in H, so a
// rounding across a sextant boundary moves the colour by a rounding, not a sextant. The
// emulator test (tests/gpu_kernels_sim.rs) holds the kernel and the CPU twin together.
__device__ __forceinline__ float aug_hue_channel(float hs, float n, float v, float c) {
    float k = hs + n;  // in [0, 11)
    if (k >= 6.0f) k -= 6.0f;
    const float w = aug_clamp01(fminf(k, 4.0f - k));
    return aug_clamp01(v - c * w);
}

__device__ __forceinline__ void aug_hue(float& r, float& g, float& b, float f) {
    const float maxc = fmaxf(fmaxf(r, g), b);
    const float minc = fminf(fminf(r, g), b);
    const float c = maxc - minc;
    const float inv = 1.0f / (c == 0.0f ? 1.0f : c);
    // torchvision's choice: red's formula where red is the maximum, then green's, then blue's.
    float h;
    if (maxc == r) h = (g - b) * inv;
    else if (maxc == g) h = 2.0f + (b - r) * inv;
    else h = 4.0f + (r - g) * inv;
    // h in [-1, 5] and the shift in [0, 6]: the rotated hue, reduced to [-1, 6).
    float hs = h + 6.0f * aug_rem1(f);
    if (hs >= 6.0f) hs -= 6.0f;
    const float nr = aug_hue_channel(hs, 5.0f, maxc, c);
    const float ng = aug_hue_channel(hs, 3.0f, maxc, c);
    const float nb = aug_hue_channel(hs, 1.0f, maxc, c);
    r = nr;
    g = ng;
    b = nb;
}

// One per-pixel jitter op (brightness, saturation or hue; contrast is handled by the caller).
__device__ __forceinline__ void aug_pixel_op(int op, const ColorParams& p, float& r, float& g,
                                             float& b) {
    if (op == 0) {
        r = aug_clamp01(r * p.brightness);
        g = aug_clamp01(g * p.brightness);
        b = aug_clamp01(b * p.brightness);
    } else if (op == 2) {
        const float l = (1.0f - p.saturation) * aug_gray(r, g, b);
        r = aug_clamp01(p.saturation * r + l);
        g = aug_clamp01(p.saturation * g + l);
        b = aug_clamp01(p.saturation * b + l);
    } else {
        aug_hue(r, g, b, p.hue);
    }
}

// Solarize (when drawn) and normalize one value of channel c.
__device__ __forceinline__ float aug_finish(float v, int c, const ColorParams& p,
                                            const AugNorm& nm) {
    if (p.solarize && v >= nm.threshold) v = 1.0f - v;
    return (v - nm.mean[c]) * nm.inv_std[c];
}

// Step 1. crops: (B, S, S, 3) u8; params: (B); out: (B, 3, S, S). Grid (B), any block size.
extern "C" __global__ void aug_color_f32(const unsigned char* crops, const ColorParams* params,
                                         float* out, int S, AugNorm nm) {
    __shared__ float scratch[32];
    const i64 b = blockIdx.x;
    const ColorParams p = params[b];
    const i64 n = (i64)S * S;
    const unsigned char* src = crops + b * n * 3;
    float* o = out + b * 3 * n;
    const int nops = p.jitter ? 4 : 0;
    const bool blur = p.blur_sigma > 0.0f;
    // Ops [k, next contrast) run per pixel; a contrast op ends the pass with the grayscale sum,
    // and the next pass starts by applying it with that mean. Every thread revisits only its
    // own pixels, so passes need no barrier besides the reduction's.
    int k = 0;
    bool first = true;
    float cm = 0.0f, cf = 1.0f;  // pending contrast: factor, (1 - f) * mean
    bool pending = false;
    while (true) {
        int stop = k;
        while (stop < nops && p.order[stop] != 1) ++stop;
        const bool last = stop >= nops;
        float acc = 0.0f;
        for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
            float r, g, bl;
            if (first) {
                r = (float)src[3 * i] * (1.0f / 255.0f);
                g = (float)src[3 * i + 1] * (1.0f / 255.0f);
                bl = (float)src[3 * i + 2] * (1.0f / 255.0f);
            } else {
                r = o[i];
                g = o[n + i];
                bl = o[2 * n + i];
            }
            if (pending) {
                r = aug_clamp01(cf * r + cm);
                g = aug_clamp01(cf * g + cm);
                bl = aug_clamp01(cf * bl + cm);
            }
            for (int j = k; j < stop; ++j) aug_pixel_op(p.order[j], p, r, g, bl);
            if (!last) {
                acc += aug_gray(r, g, bl);
            } else {
                if (p.grayscale) r = g = bl = aug_gray(r, g, bl);
                if (!blur) {
                    r = aug_finish(r, 0, p, nm);
                    g = aug_finish(g, 1, p, nm);
                    bl = aug_finish(bl, 2, p, nm);
                }
            }
            o[i] = r;
            o[n + i] = g;
            o[2 * n + i] = bl;
        }
        if (last) break;
        // The CPU sums in f64; an f32 per-thread sum plus a tree reduction is within ~1e-6
        // relative of it for S <= 1024.
        const float mean = block_sum(acc, scratch) / (float)(n > 0 ? n : 1);
        cf = p.contrast;
        cm = (1.0f - cf) * mean;
        pending = true;
        first = false;
        k = stop + 1;
    }
}

// The blur's normalized weights for sigma, in shared memory: w[0 .. 2r], r = ceil(3 sigma)
// (summed in order by one thread, as the CPU does). Returns r. Called by every thread.
__device__ __forceinline__ int aug_blur_weights(float sigma, float* w) {
    const int r = min((int)ceilf(3.0f * sigma), AUG_MAX_RADIUS);
    const int taps = 2 * r + 1;
    for (int j = threadIdx.x; j < taps; j += blockDim.x) {
        const int d = j - r;
        w[j] = expf((float)(-(d * d)) / (2.0f * sigma * sigma));
    }
    __syncthreads();
    __shared__ float total;
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int j = 0; j < taps; ++j) s += w[j];
        total = s;
    }
    __syncthreads();
    const float t = total;
    __syncthreads();
    for (int j = threadIdx.x; j < taps; j += blockDim.x) w[j] = w[j] / t;
    __syncthreads();
    return r;
}

// Step 2. Row pass of the blur, edges clamped. x, tmp: (B, 3, S, S). Grid (S, B * 3): block
// (y, b * 3 + c) does row y of plane (b, c).
extern "C" __global__ void aug_blur_h_f32(const float* x, const ColorParams* params, float* tmp,
                                          int S) {
    __shared__ float w[2 * AUG_MAX_RADIUS + 1];
    const i64 plane = blockIdx.y;
    const float sigma = params[plane / 3].blur_sigma;
    if (!(sigma > 0.0f)) return;  // uniform over the block: no barrier is skipped by a part
    const int r = aug_blur_weights(sigma, w);
    const i64 row = (plane * S + blockIdx.x) * S;
    const float* src = x + row;
    for (int xo = threadIdx.x; xo < S; xo += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j <= 2 * r; ++j) {
            const int sx = min(max(xo + j - r, 0), S - 1);
            acc += w[j] * src[sx];
        }
        tmp[row + xo] = acc;
    }
}

// Step 3. Column pass, edges clamped, then solarize + normalize. tmp -> out, both
// (B, 3, S, S). Same grid as step 2.
extern "C" __global__ void aug_blur_v_f32(const float* tmp, const ColorParams* params, float* out,
                                          int S, AugNorm nm) {
    __shared__ float w[2 * AUG_MAX_RADIUS + 1];
    const i64 plane = blockIdx.y;
    const ColorParams p = params[plane / 3];
    if (!(p.blur_sigma > 0.0f)) return;
    const int r = aug_blur_weights(p.blur_sigma, w);
    const int c = (int)(plane % 3);
    const int y = blockIdx.x;
    const float* src = tmp + plane * S * S;
    for (int xo = threadIdx.x; xo < S; xo += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j <= 2 * r; ++j) {
            const int sy = min(max(y + j - r, 0), S - 1);
            acc += w[j] * src[(i64)sy * S + xo];
        }
        out[(plane * S + y) * S + xo] = aug_finish(acc, c, p, nm);
    }
}
