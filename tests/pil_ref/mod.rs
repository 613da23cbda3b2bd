//! PIL's resampling kernel, the independent reference the resampler tests share.

/// PIL's bicubic kernel (Keys, a = -0.5; Catmull-Rom), as PIL's `bicubic_filter` defines it.
pub fn cubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        (a + 2.0) * x * x * x - (a + 3.0) * x * x + 1.0
    } else if x < 2.0 {
        a * x * x * x - 5.0 * a * x * x + 8.0 * a * x - 4.0 * a
    } else {
        0.0
    }
}
