//! The EMA teacher: after every optimizer step, `t = m*t + (1-m)*s` over the whole flat
//! parameter buffer (prototypes included). BN running statistics live in a separate store and
//! are not averaged (SPEC.md, "Networks").

use rayon::prelude::*;

use crate::bail;
use crate::error::Result;

/// Elements per rayon task: large enough to amortize scheduling over a memory-bound pass.
const EMA_CHUNK: usize = 1 << 15;

/// t = m*t + (1-m)*s over the whole flat parameter buffer (one pass; rayon).
pub fn ema_update(teacher: &mut [f32], student: &[f32], m: f32) -> Result<()> {
    if teacher.len() != student.len() {
        bail!(
            Shape,
            "ema_update: teacher has {} parameters, student {} (the stores' layouts differ)",
            teacher.len(),
            student.len()
        );
    }
    if !(0.0..=1.0).contains(&m) {
        bail!(Config, "ema_update: momentum {m} is outside [0, 1]");
    }
    let a = 1.0 - m;
    teacher
        .par_chunks_mut(EMA_CHUNK)
        .zip(student.par_chunks(EMA_CHUNK))
        .for_each(|(t, s)| {
            for (t, &s) in t.iter_mut().zip(s) {
                // m*t + (1-m)*s, written so m = 1 leaves t bit-for-bit unchanged and m = 0
                // copies s exactly.
                *t = m * *t + a * s;
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn_vec;

    #[test]
    fn matches_formula() {
        // Odd length spanning several chunks.
        let n = 2 * EMA_CHUNK + 37;
        let t0 = randn_vec(n, 1);
        let s = randn_vec(n, 2);
        for &m in &[0.99f32, 0.5, 0.9999] {
            let mut t = t0.clone();
            ema_update(&mut t, &s, m).unwrap();
            for i in 0..n {
                let want = m as f64 * t0[i] as f64 + (1.0 - m as f64) * s[i] as f64;
                assert!((t[i] as f64 - want).abs() < 1e-6, "m {m} i {i}");
            }
        }
    }

    #[test]
    fn m_one_keeps_teacher_m_zero_copies_student() {
        let t0 = randn_vec(1001, 3);
        let s = randn_vec(1001, 4);
        let mut t = t0.clone();
        ema_update(&mut t, &s, 1.0).unwrap();
        assert_eq!(t, t0);
        ema_update(&mut t, &s, 0.0).unwrap();
        assert_eq!(t, s);
    }

    #[test]
    fn errors_on_mismatch() {
        let mut t = vec![0.0; 3];
        assert!(ema_update(&mut t, &[1.0; 4], 0.9).is_err());
        assert!(ema_update(&mut t, &[1.0; 3], 1.5).is_err());
        assert!(ema_update(&mut t, &[1.0; 3], f32::NAN).is_err());
    }
}
