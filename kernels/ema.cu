// The teacher's EMA update over the flat parameter buffer, one pass:
// t = m * t + (1 - m) * s. t, s: (n,) (every trainable parameter, prototypes included; BN
// running statistics live elsewhere and are not averaged).
#include "common.cuh"

extern "C" __global__ void ema_update_f32(float* teacher, const float* student, float m, i64 n) {
    const float one_minus_m = 1.0f - m;
    GRID_STRIDE_LOOP(i, n) teacher[i] = m * teacher[i] + one_minus_m * student[i];
}

// `ema_update_f32` gated by the step's device-side "step ok" flag (kernels/lars.cu
// `step_ok_f32`): nothing changes while *ok == 0.
extern "C" __global__ void ema_update_gated_f32(float* teacher, const float* student, float m,
                                                i64 n, const int* ok) {
    if (*ok == 0) return;
    const float one_minus_m = 1.0f - m;
    GRID_STRIDE_LOOP(i, n) teacher[i] = m * teacher[i] + one_minus_m * student[i];
}
