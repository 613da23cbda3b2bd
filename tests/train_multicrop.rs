//! The multi-crop training step (SPEC.md, beyond the seed: local views for the student only)
//! on the CPU, against independent references: the step's loss equals `carp_loss` on logits
//! from separate forwards (backbone per resolution, head on all crops, teacher on the globals),
//! and the gradient it applies, local branch included, matches finite differences of the step
//! loss.

use carp::autograd::Tape;
use carp::nn::head::HeadConfig;
use carp::nn::resnet::{BlockKind, ResNetConfig, Stem};
use carp::nn::ModelConfig;
use carp::ops::loss::{carp_loss, random_partition};
use carp::testutil::randn;
use carp::train::step::CarpState;
use carp::{Device, Tensor};

fn small_model() -> ModelConfig {
    ModelConfig {
        arch: "small".into(),
        backbone: ResNetConfig {
            layers: vec![1, 1],
            base_width: 4,
            stem: Stem::Cifar,
            block: BlockKind::Bottleneck,
        },
        head: HeadConfig {
            hidden: 24,
            out: 16,
            prototypes: 96,
        },
    }
}

/// Globals (N, 3, 12, 12) x 2 and L locals (L N, 3, 8, 8), random normal.
fn views(n: usize, l: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
    (
        randn(&[n, 3, 12, 12], seed),
        randn(&[n, 3, 12, 12], seed + 1),
        randn(&[l * n, 3, 8, 8], seed + 2),
    )
}

fn cat(a: &Tensor, b: &Tensor) -> Tensor {
    let mut shape = a.shape().to_vec();
    shape[0] += b.dim(0);
    let mut v = a.to_vec().unwrap();
    v.extend(b.to_vec().unwrap());
    Tensor::from_vec(v, &shape).unwrap()
}

#[test]
fn multicrop_step_loss_equals_carp_loss_on_independent_forwards() {
    let (n, l, nb) = (5, 3, 16);
    let mut state = CarpState::new(&small_model(), nb, 1e-6, 11).unwrap();
    // Train one plain step first so that the teacher differs from the student.
    let (a, b, _) = views(n, l, 40);
    state.train_step(&a, &b, 0.5, 0.9).unwrap();
    let (v1, v2, loc) = views(n, l, 50);

    // Reference: separate no-grad forwards, features joined on the host, the CPU loss.
    let k = state.student.cfg.head.prototypes;
    let perm = random_partition(k, &mut state.partition_rng.clone());
    let x = cat(&v1, &v2);
    let mut tape = Tape::no_grad();
    let sl = state
        .student
        .params
        .leaves_on(&mut tape, &Device::Cpu)
        .unwrap();
    let tl = state
        .teacher
        .params
        .leaves_on(&mut tape, &Device::Cpu)
        .unwrap();
    let s = &state.student;
    let mut upd = Vec::new();
    let fg = s
        .backbone
        .forward(&mut tape, &sl, &s.buffers, &x, true, &mut upd)
        .unwrap();
    let fl = s
        .backbone
        .forward(&mut tape, &sl, &s.buffers, &loc, true, &mut upd)
        .unwrap();
    let (_, s_logits) = s
        .head
        .forward(&mut tape, &sl, &s.buffers, &cat(&fg, &fl), true, &mut upd)
        .unwrap();
    let t_logits = state
        .teacher
        .forward(&mut tape, &tl, &x, true)
        .unwrap()
        .logits
        .to_vec()
        .unwrap();
    let s_logits = s_logits.to_vec().unwrap();
    assert_eq!(s_logits.len(), (2 + l) * n * k);
    let sv: Vec<&[f32]> = s_logits.chunks_exact(n * k).collect();
    let tv: Vec<&[f32]> = t_logits.chunks_exact(n * k).collect();
    let want = carp_loss(&sv, &tv, n, k, nb, &perm).unwrap();

    let st = state
        .train_step_multi(&v1, &v2, Some(&loc), 0.5, 0.99)
        .unwrap();
    // Same f32 arithmetic in the same order except the host-side concatenation: 1e-5 relative.
    for (name, got, want) in [
        ("loss", st.loss, want.loss),
        ("consistency", st.consistency, want.consistency),
        ("entropy", st.entropy, want.entropy),
    ] {
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{name}: step {got} vs reference {want}"
        );
    }
    // With 3 local views the pairs are 2 + 2 * 3 = 8, not 2: the plain two-view loss differs.
    let two = carp_loss(&sv[..2], &tv, n, k, nb, &perm).unwrap();
    assert!(
        (two.loss - st.loss).abs() > 1e-4,
        "locals made no difference"
    );
    assert_eq!(state.step, 2);
}

/// The step loss of `state` (which is left as it was) with the student's parameters moved by
/// `t * dir`.
fn loss_at(state: &CarpState, dir: &[f32], t: f32, v: &(Tensor, Tensor, Tensor)) -> f64 {
    let mut s = state.try_clone().unwrap();
    for (p, d) in s.student.params.data.iter_mut().zip(dir) {
        *p += t * d;
    }
    s.train_step_multi(&v.0, &v.1, Some(&v.2), 0.0, 1.0)
        .unwrap()
        .loss as f64
}

#[test]
fn multicrop_step_gradient_matches_finite_differences() {
    let (n, l, nb) = (4, 2, 16);
    let state = CarpState::new(&small_model(), nb, 0.0, 3).unwrap();
    let v = views(n, l, 60);
    // The analytic gradient the step applies (lr 0: the weights stay, the gradient is kept).
    let mut g_state = state.try_clone().unwrap();
    g_state
        .train_step_multi(&v.0, &v.1, Some(&v.2), 0.0, 1.0)
        .unwrap();
    let grad = g_state.student.params.grad.clone();
    // Directional derivatives along the gradient restricted to one parameter group (unit
    // direction u = g_group / |g_group|, so d/dt L(w + t u) = |g_group|): the stem conv (reached
    // through both the global and the local backbone batches), the whole backbone, the head,
    // the prototypes. A direction, not single weights: the f32 loss then moves by far more
    // than its rounding.
    let entries = &state.student.params.entries;
    for (what, pick) in [
        (
            "stem conv",
            &(|name: &str| name.starts_with("conv1.")) as &dyn Fn(&str) -> bool,
        ),
        ("backbone", &|name: &str| {
            !name.starts_with("head.") && !name.starts_with("prototypes.")
        }),
        ("head", &|name: &str| name.starts_with("head.")),
        ("prototypes", &|name: &str| name.starts_with("prototypes.")),
    ] {
        let mut dir = vec![0f32; grad.len()];
        for e in entries.iter().filter(|e| pick(&e.name)) {
            for i in e.range() {
                dir[i] = grad[i];
            }
        }
        let norm = dir.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{what}: no gradient");
        dir.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
        // Central differences, t = 1e-2: the f32 rounding of the loss (~1e-6 / t) and the
        // curvature term (BN over 4 samples) stay near 2% each (measured); the tolerance is 5%, and
        // dropping the local branch's gradient is off by far more (checked when this test was written).
        let t = 1e-2f32;
        let fd = (loss_at(&state, &dir, t, &v) - loss_at(&state, &dir, -t, &v)) / (2.0 * t as f64);
        eprintln!("{what}: |g| {norm:.6e} finite difference {fd:.6e}");
        assert!(
            (fd - norm).abs() <= 0.05 * norm,
            "{what}: step gradient norm {norm} vs directional finite difference {fd}"
        );
    }
}
