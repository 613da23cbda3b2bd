//! The paper's linear evaluation (`carp::eval::probe`, SPEC.md "Evaluation"): its training
//! views are augmented (a new crop and flip every epoch, no colour operation), and on a
//! problem a frozen random backbone separates, the protocol learns it.

use std::path::PathBuf;

use carp::data::idx::write_idx;
use carp::data::{run_pack, Dataset, PackArgs};
use carp::eval::probe::{linear_eval, train_view_config, train_views, LinearEvalConfig};
use carp::nn::{ModelConfig, Network};
use carp::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("carp-probe-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Packs `labels.len()` gray `side` x `side` images: class c has mean level `levels[c]`, plus a
/// random texture of +-`noise`.
fn dataset(
    name: &str,
    labels: &[u8],
    levels: &[f64],
    side: usize,
    noise: f64,
    seed: u64,
) -> Dataset {
    let dir = tmpdir(name);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let px: Vec<u8> = labels
        .iter()
        .flat_map(|&c| {
            (0..side * side)
                .map(|_| {
                    (levels[c as usize] + rng.gen_range(-noise..=noise)).clamp(0.0, 255.0) as u8
                })
                .collect::<Vec<u8>>()
        })
        .collect();
    let n = labels.len();
    write_idx(&dir.join("img.idx"), &[n, side, side], &px).unwrap();
    write_idx(&dir.join("lbl.idx"), &[n], labels).unwrap();
    let mut a = PackArgs::new(dir.join("img.idx"), dir.join("packed"));
    a.labels = Some(dir.join("lbl.idx"));
    run_pack(&a).unwrap();
    Dataset::open(&dir.join("packed")).unwrap()
}

#[test]
fn training_views_change_every_epoch_and_keep_colours() {
    let labels: Vec<u8> = (0..6).map(|i| (i % 2) as u8).collect();
    let ds = dataset("views", &labels, &[60.0, 190.0], 24, 60.0, 1);
    let cfg = train_view_config(16);
    let idx = [0usize, 3, 5];
    let e0 = train_views(&ds, &idx, &cfg, 7, 0).unwrap();
    assert_eq!(e0.len(), idx.len() * 3 * 16 * 16);
    // Reproducible under (seed, epoch, index), and in any batch composition.
    assert_eq!(e0, train_views(&ds, &idx, &cfg, 7, 0).unwrap());
    let one = train_views(&ds, &[3], &cfg, 7, 0).unwrap();
    assert_eq!(&e0[3 * 256..6 * 256], &one[..]);
    // The augmentation is on: another epoch (or seed) gives every image another view.
    let e1 = train_views(&ds, &idx, &cfg, 7, 1).unwrap();
    for (k, &i) in idx.iter().enumerate() {
        let r = k * 3 * 256..(k + 1) * 3 * 256;
        assert_ne!(
            e0[r.clone()],
            e1[r],
            "image {i} has the same view in two epochs"
        );
    }
    // Crops and flips only: a constant image of level 200 gives (200 / 255 - mean) / std
    // everywhere in every epoch, which a brightness jitter or a solarize (200 > 128) would
    // change.
    let flat = dataset("flat", &[0, 1, 0, 1], &[200.0, 200.0], 24, 0.0, 1);
    for epoch in 0..4 {
        let v = train_views(&flat, &[0, 1, 2, 3], &cfg, 7, epoch).unwrap();
        for (j, x) in v.iter().enumerate() {
            let c = (j / 256) % 3;
            let want = (200.0 / 255.0 - cfg.mean[c]) / cfg.std[c];
            assert!(
                (x - want).abs() < 1e-5,
                "epoch {epoch} value {j}: {x} vs {want}"
            );
        }
    }
}

#[test]
fn the_protocol_learns_a_problem_the_frozen_features_separate() {
    // Three brightness classes under heavy texture: a frozen random tiny ResNet separates
    // them linearly (its pooled features follow the mean level), chance is 1/3.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let train_labels: Vec<u8> = (0..48).map(|_| rng.gen_range(0..3)).collect();
    let val_labels: Vec<u8> = (0..30).map(|i| (i % 3) as u8).collect();
    let levels = [40.0, 128.0, 215.0];
    let train = dataset("sep-train", &train_labels, &levels, 20, 35.0, 4);
    let val = dataset("sep-val", &val_labels, &levels, 20, 35.0, 5);
    let net = Network::new(&ModelConfig::tiny(), 0).unwrap();
    let mut cfg = LinearEvalConfig::paper(16);
    cfg.epochs = 8;
    cfg.batch = 16;
    let mut seen = Vec::new();
    let r = linear_eval(&net, &train, &val, &cfg, &Device::Cpu, &mut |e| {
        seen.push(e.epoch)
    })
    .unwrap();
    assert_eq!(seen, (1..=8).collect::<Vec<_>>());
    assert_eq!(r.epochs.len(), 8);
    assert!(
        r.best_top1 >= 0.9,
        "best top-1 {}: {:?}",
        r.best_top1,
        r.epochs
    );
    assert!(r.best_top1 >= r.last_top1 && r.last_top1 == r.epochs[7].top1);
    assert!(r.epochs[r.best_epoch - 1].top1 == r.best_top1);
    // It learned: the last epoch's training loss is below the first's, which starts at
    // ln 3 (a zero classifier) and falls within the epoch.
    let (first, last) = (r.epochs[0].train_loss, r.epochs[7].train_loss);
    assert!(
        first < 3f32.ln() + 1e-3 && last < 0.5 * first,
        "loss {first} -> {last}"
    );
    assert!(r.images_per_s > 0.0);
}

#[test]
fn bad_configurations_are_errors() {
    let labels = [0u8, 1];
    let ds = dataset("bad", &labels, &[50.0, 200.0], 12, 10.0, 2);
    let net = Network::new(&ModelConfig::tiny(), 0).unwrap();
    for edit in [
        (|c: &mut LinearEvalConfig| c.epochs = 0) as fn(&mut LinearEvalConfig),
        |c| c.batch = 0,
        |c| c.lr = f32::NAN,
        |c| c.momentum = 1.0,
        |c| c.size = 4,
    ] {
        let mut cfg = LinearEvalConfig::paper(16);
        edit(&mut cfg);
        let e = linear_eval(&net, &ds, &ds, &cfg, &Device::Cpu, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("linear evaluation"), "{e}");
    }
}
