//! Per-step schedules: the cosine learning rate (optional linear warmup) and the cosine teacher
//! momentum.
//!
//! Follows the reference code's `cosine_scheduler` (DINO): after the warmup,
//! `v = final + (base - final) * (1 + cos(pi * t / T)) / 2` with `t` the step past the warmup and
//! `T` the steps left after the warmup. One departure, as SPEC.md asks: the cosine reaches `final`
//! exactly at `step == total` (and stays there), so the midpoint is `(base + final) / 2`.
//! The warmup is linear from 0 at step 0 to `base` at step `warmup` (where the cosine starts).

/// Cosine from `base` to `final_` over `total` steps, with optional linear warmup from 0 over
/// `warmup` steps (then the cosine runs over the remaining steps); step >= total gives final_.
pub fn cosine_lr(step: usize, total: usize, warmup: usize, base: f32, final_: f32) -> f32 {
    if step >= total {
        return final_;
    }
    if step < warmup {
        // Linear from 0 (step 0) toward base (reached at step == warmup).
        return (base as f64 * step as f64 / warmup as f64) as f32;
    }
    // Here warmup <= step < total, so the cosine span is at least 1.
    let span = (total - warmup) as f64;
    let t = (step - warmup) as f64 / span;
    cosine(t, base as f64, final_ as f64) as f32
}

/// Teacher momentum, cosine from m0 (0.99) at step 0 to m1 (1.0) at step total.
pub fn teacher_momentum(step: usize, total: usize, m0: f32, m1: f32) -> f32 {
    if step >= total {
        return m1;
    }
    cosine(step as f64 / total as f64, m0 as f64, m1 as f64) as f32
}

/// `final + (base - final) * (1 + cos(pi t)) / 2` for t in [0, 1] (in f64: the momentum's
/// 1 - m is small and must not lose its digits).
fn cosine(t: f64, base: f64, final_: f64) -> f64 {
    final_ + 0.5 * (base - final_) * (1.0 + (std::f64::consts::PI * t).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-6 * (1.0 + b.abs())
    }

    #[test]
    fn cosine_endpoints_and_midpoint() {
        let (base, fin) = (0.6f32, 0.06f32);
        assert!(close(cosine_lr(0, 100, 0, base, fin), base));
        assert!(close(cosine_lr(50, 100, 0, base, fin), (base + fin) / 2.0));
        // A quarter of the way: final + (base-final)(1+cos(pi/4))/2.
        let q = fin + (base - fin) * (1.0 + (std::f32::consts::FRAC_PI_4).cos()) / 2.0;
        assert!(close(cosine_lr(25, 100, 0, base, fin), q));
        assert!(close(cosine_lr(100, 100, 0, base, fin), fin));
        assert!(close(cosine_lr(1000, 100, 0, base, fin), fin));
        // Monotone decreasing over the run.
        let v: Vec<f32> = (0..=100).map(|s| cosine_lr(s, 100, 0, base, fin)).collect();
        assert!(v.windows(2).all(|w| w[1] <= w[0]));
        // Degenerate run length.
        assert!(close(cosine_lr(0, 0, 0, base, fin), fin));
    }

    #[test]
    fn warmup_is_linear_then_cosine() {
        let (base, fin) = (0.6f32, 0.06f32);
        // 10 warmup steps, then a cosine over the 90 left.
        assert_eq!(cosine_lr(0, 100, 10, base, fin), 0.0);
        assert!(close(cosine_lr(5, 100, 10, base, fin), base / 2.0));
        assert!(close(cosine_lr(9, 100, 10, base, fin), base * 0.9));
        assert!(close(cosine_lr(10, 100, 10, base, fin), base));
        assert!(close(cosine_lr(55, 100, 10, base, fin), (base + fin) / 2.0));
        assert!(close(cosine_lr(100, 100, 10, base, fin), fin));
    }

    #[test]
    fn momentum_endpoints_and_midpoint() {
        assert!(close(teacher_momentum(0, 1000, 0.99, 1.0), 0.99));
        assert!(close(teacher_momentum(500, 1000, 0.99, 1.0), 0.995));
        assert_eq!(teacher_momentum(1000, 1000, 0.99, 1.0), 1.0);
        assert_eq!(teacher_momentum(5000, 1000, 0.99, 1.0), 1.0);
        // Odd total: the midpoint between steps still follows the formula.
        let m = teacher_momentum(1, 3, 0.99, 1.0);
        let want = 1.0 - 0.01 * (1.0 + (std::f64::consts::PI / 3.0).cos()) / 2.0;
        assert!((m as f64 - want).abs() < 1e-7);
    }
}
