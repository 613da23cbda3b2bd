//! The CARP training step on structured synthetic data: the loss falls, the uniformity term
//! stays low (no collapse onto a few prototypes), and the CPU run is bit-reproducible.

mod common;

use carp::optim::schedule::{cosine_lr, teacher_momentum};
use carp::testutil::{randn_vec, rng};
use carp::train::step::CarpState;
use carp::Tensor;
use common::small_model;
use rand::Rng;

/// Images from 4 classes (each a fixed random 3x12x12 pattern); each view is its class
/// pattern, randomly shifted by up to 2 pixels, scaled, plus noise: two views of one image
/// share the class, not the pixels.
fn batch(n: usize, seed: u64) -> (Tensor, Tensor) {
    let (c, s) = (3, 12);
    let protos: Vec<Vec<f32>> = (0..4).map(|k| randn_vec(c * s * s, 100 + k)).collect();
    let mut r = rng(seed);
    let mut views = [Vec::new(), Vec::new()];
    for _ in 0..n {
        let class = r.gen_range(0..4);
        for v in views.iter_mut() {
            let (dy, dx) = (
                r.gen_range(0..5) as isize - 2,
                r.gen_range(0..5) as isize - 2,
            );
            let scale = r.gen_range(0.7..1.3f32);
            for ch in 0..c {
                for y in 0..s as isize {
                    for x in 0..s as isize {
                        let (sy, sx) = (
                            (y + dy).rem_euclid(s as isize),
                            (x + dx).rem_euclid(s as isize),
                        );
                        let p = protos[class][ch * s * s + (sy as usize) * s + sx as usize];
                        v.push(scale * p + 0.3 * r.gen_range(-1.0..1.0f32));
                    }
                }
            }
        }
    }
    let [a, b] = views;
    (
        Tensor::from_vec(a, &[n, c, s, s]).unwrap(),
        Tensor::from_vec(b, &[n, c, s, s]).unwrap(),
    )
}

fn run(steps: usize, seed: u64) -> (CarpState, Vec<(f32, f32, f32)>) {
    let mut state = CarpState::new(&small_model(), 16, 1e-6, seed).unwrap();
    let mut log = Vec::new();
    for step in 0..steps {
        let (v1, v2) = batch(32, 1000 + step as u64);
        let lr = cosine_lr(step, steps, 0, 1.0, 0.1);
        let m = teacher_momentum(step, steps, 0.9, 1.0);
        let st = state.train_step(&v1, &v2, lr, m).unwrap();
        log.push((st.loss, st.consistency, st.entropy));
    }
    (state, log)
}

#[test]
fn small_model_learns_without_collapse_and_is_reproducible() {
    let steps = 100;
    let (a, log) = run(steps, 7);
    let mean = |r: &[(f32, f32, f32)]| r.iter().map(|x| x.0).sum::<f32>() / r.len() as f32;
    let (first, last) = (mean(&log[..5]), mean(&log[steps - 5..]));
    // At init both networks assign almost uniformly: consistency ~ log NB = log 16.
    assert!(
        (log[0].1 - 16f32.ln()).abs() < 0.3,
        "initial consistency {}",
        log[0].1
    );
    assert!(
        last < first - 0.1,
        "the loss did not fall: {first} -> {last}"
    );
    // No collapse: H = log NB - entropy(pbar), so exp(log NB - H) is the effective number of
    // prototypes the batch uses per block. Collapse is 1 (H = log NB); with 4 classes in the
    // data a consistent assignment needs at least 4, i.e. H <= log 16 - log 4.
    let max_h = log.iter().map(|x| x.2).fold(0.0f32, f32::max);
    assert!(
        max_h <= 16f32.ln() - 4f32.ln(),
        "uniformity term {max_h}: the batch uses fewer than 4 prototypes per block"
    );
    assert!(max_h > 0.0);
    // The teacher moved (EMA), and is not the student.
    assert!(a.teacher.params.data != a.student.params.data);

    // Same seed, same data: bit-identical parameters, teacher, statistics and optimizer state.
    let (b, log_b) = run(steps, 7);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.student.params.data), bits(&b.student.params.data));
    assert_eq!(bits(&a.teacher.params.data), bits(&b.teacher.params.data));
    assert_eq!(bits(&a.student.buffers.data), bits(&b.student.buffers.data));
    assert_eq!(bits(&a.lars.momentum_buf), bits(&b.lars.momentum_buf));
    assert_eq!(log, log_b);
    // Another seed gives another run.
    let (c, _) = run(3, 8);
    assert!(bits(&c.student.params.data) != bits(&a.student.params.data));
}

#[test]
fn a_non_finite_input_leaves_the_state_untouched() {
    let mut state = CarpState::new(&small_model(), 16, 1e-6, 1).unwrap();
    let before = state.try_clone().unwrap();
    let (v1, v2) = batch(8, 5);
    let mut bad = v1.to_vec().unwrap();
    bad[17] = f32::INFINITY;
    let v1 = Tensor::from_vec(bad, v1.shape()).unwrap();
    let err = state
        .train_step(&v1, &v2, 0.1, 0.99)
        .unwrap_err()
        .to_string();
    assert!(err.contains("step 0"), "{err}");
    assert_eq!(state.step, 0);
    assert_eq!(state.student.params.data, before.student.params.data);
    assert_eq!(state.teacher.params.data, before.teacher.params.data);
    assert_eq!(state.student.buffers.data, before.student.buffers.data);
    assert_eq!(state.teacher.buffers.data, before.teacher.buffers.data);
}

/// SPEC.md ("Networks"), as main_carp.py: the EMA runs from the student as it was when the loss
/// was computed, before the optimizer step. From teacher = student, after one step the teacher
/// is the initial student; after the next, m t1 + (1 - m) s1 with s1 the student of step 1
/// (not the student that step 2's LARS made). A one-step lag (the EMA after LARS) moves the
/// teacher by (1 - m) of the student's update, far outside the f32 rounding allowed here.
#[test]
fn the_ema_uses_the_student_before_this_steps_update() {
    let mut state = CarpState::new(&small_model(), 16, 1e-6, 3).unwrap();
    let s0 = state.student.params.data.clone();
    assert_eq!(
        state.teacher.params.data, s0,
        "the teacher starts as the student"
    );
    let m = 0.5;
    // Compare with an f64 EMA; `slack` is a few f32 roundings of the values' size.
    let max_dev = |got: &[f32], want: &[f64]| -> f64 {
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs() / (1.0 + w.abs()))
            .fold(0.0, f64::max)
    };
    let slack = 4.0 * f32::EPSILON as f64;

    let (v1, v2) = batch(16, 11);
    state.train_step(&v1, &v2, 1.0, m).unwrap();
    let s1 = state.student.params.data.clone();
    let moved = max_dev(&s1, &s0.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(
        moved > 1e-3,
        "the student barely moved ({moved:e}): the test needs an update"
    );
    let t1 = state.teacher.params.data.clone();
    let want: Vec<f64> = s0.iter().map(|&x| x as f64).collect();
    let dev = max_dev(&t1, &want);
    assert!(
        dev <= slack,
        "after step 1 the teacher is {dev:e} from the initial student (allowed {slack:e})"
    );

    let (v1, v2) = batch(16, 12);
    state.train_step(&v1, &v2, 1.0, m).unwrap();
    let s2 = &state.student.params.data;
    let ema = |s: &[f32]| -> Vec<f64> {
        t1.iter()
            .zip(s)
            .map(|(&t, &s)| m as f64 * t as f64 + (1.0 - m as f64) * s as f64)
            .collect()
    };
    let t2 = &state.teacher.params.data;
    let dev = max_dev(t2, &ema(&s1));
    assert!(
        dev <= slack,
        "after step 2 the teacher is {dev:e} from m t1 + (1 - m) s1 (allowed {slack:e})"
    );
    let lagged = max_dev(t2, &ema(s2));
    assert!(
        lagged > 100.0 * slack,
        "the teacher also matches the EMA of the updated student ({lagged:e}): the test cannot tell the orders apart"
    );
}
