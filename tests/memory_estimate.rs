//! The memory estimate (`train::memory`) against the bytes a real training step holds, measured
//! by the CPU tensor-storage counter at sizes and batches the estimate's probes do not use. The
//! counter is process-wide, so this file holds one test (its own process).

use carp::nn::head::HeadConfig;
use carp::nn::resnet::{BlockKind, ResNetConfig, Stem};
use carp::nn::ModelConfig;
use carp::tensor::{cpu_storage_bytes, reset_cpu_storage_peak, Device};
use carp::testutil::randn;
use carp::train::config::TrainConfig;
use carp::train::memory::estimate;
use carp::train::step::CarpState;

fn model(stem: Stem) -> ModelConfig {
    if stem == Stem::Imagenet {
        // ResNet50's backbone with a smaller head: at a few images of 96 pixels its gradients
        // outweigh its activations, the case where a step's peak alone misleads.
        let mut m = ModelConfig::resnet50();
        m.head.prototypes = 1024;
        return m;
    }
    ModelConfig {
        arch: "small".into(),
        backbone: ResNetConfig {
            layers: vec![1, 1, 1],
            base_width: 4,
            stem,
            block: BlockKind::Bottleneck,
        },
        head: HeadConfig {
            hidden: 32,
            out: 16,
            prototypes: 64,
        },
    }
}

/// The peak tensor bytes of one real step, above what was alive before its inputs existed.
fn measured(cfg: &TrainConfig) -> f64 {
    let mut state = CarpState::new(&cfg.model, cfg.nb, cfg.weight_decay, 5).unwrap();
    let base = cpu_storage_bytes().0 as f64;
    reset_cpu_storage_peak();
    let (b, s) = (cfg.batch, cfg.image_size);
    let v1 = randn(&[b, 3, s, s], 11);
    let v2 = randn(&[b, 3, s, s], 12);
    let l = cfg.local_crops;
    let locals = (l > 0).then(|| randn(&[l * b, 3, cfg.local_size, cfg.local_size], 13));
    state
        .train_step_multi(&v1, &v2, locals.as_ref(), 0.1, 0.99)
        .unwrap();
    drop((v1, v2, locals));
    cpu_storage_bytes().1 as f64 - base
}

#[test]
fn the_estimate_matches_a_measured_step() {
    let base = TrainConfig {
        nb: 16,
        ..TrainConfig::tiny_default()
    };
    // (stem, batch, size, local crops, local size, tolerance). At or below 64 pixels the
    // probes run at the run's own size (only the batch is extrapolated: exact up to rounding);
    // above it the size is extrapolated from 32 and 64 too.
    let cases = [
        (Stem::Cifar, 12, 40, 0, 0, 0.02),
        (Stem::Cifar, 6, 96, 0, 0, 0.02),
        (Stem::Cifar, 6, 40, 3, 16, 0.02),
        (Stem::Cifar, 4, 160, 2, 64, 0.05),
        (Stem::Imagenet, 2, 96, 0, 0, 0.08),
    ];
    for (stem, batch, size, locals, local_size, tol) in cases {
        let cfg = TrainConfig {
            model: model(stem),
            batch,
            image_size: size,
            local_crops: locals,
            local_size: if locals > 0 { local_size } else { 14 },
            ..base.clone()
        };
        cfg.validate().unwrap();
        let est = estimate(&cfg, &Device::Cpu).unwrap();
        let got = est.activation_bytes + est.step_fixed_bytes;
        let want = measured(&cfg);
        let err = (got - want).abs() / want;
        println!(
            "{stem:?} batch {batch} size {size} locals {locals}x{local_size}: estimated {got:.0} B, measured {want:.0} B ({:+.2}%)",
            100.0 * (got - want) / want
        );
        assert!(
            err <= tol,
            "{stem:?} b{batch} s{size}: estimate {got} vs measured {want} ({:.1}% off, {:.0}% allowed)",
            100.0 * err,
            100.0 * tol
        );
        // The parts add up, and the state is what the parameters alone take at least (f32
        // values and gradients of student and teacher, and the LARS momentum).
        let sum = est.activation_bytes + est.step_fixed_bytes + est.state_bytes + est.other_bytes;
        assert!((est.total_bytes - sum).abs() <= 1e-6 * sum);
        let state = CarpState::new(&cfg.model, cfg.nb, 0.0, 0).unwrap();
        let params = state.student.params.data.len() as f64;
        assert!(est.state_bytes >= 5.0 * 4.0 * params, "{}", est.state_bytes);
        // The loader's batches: at least the two finished global views of one batch in f32.
        assert!(est.other_bytes >= (batch * 2 * 3 * size * size * 4) as f64);
    }
}
