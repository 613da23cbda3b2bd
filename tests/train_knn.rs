//! What a newcomer sees: `carp train` with its defaults (the tiny model, 2 epochs of the
//! embedded Fashion-MNIST subset) must give features whose k-NN top-1 beats the same network
//! at random initialization by at least 3 points, with no collapse of the assignments.
//! This is the longest test (a few minutes on 2 cores).

use carp::train::config::TrainConfig;
use carp::train::trainer::{train, TrainOptions};

// As in the binaries: the training loop allocates per op, and glibc's allocator spends a
// large share of the time in page faults.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[test]
fn default_training_beats_random_init_knn_by_3_points() {
    let out = std::env::temp_dir().join(format!("carp-knn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let cfg = TrainConfig {
        out: out.clone(),
        ..TrainConfig::tiny_default()
    };
    let r = train(
        &cfg,
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (trained, random) = (r.knn_top1.unwrap(), r.knn_top1_random_init.unwrap());
    eprintln!(
        "k-NN top-1 (k=20): trained {:.2}% vs random init {:.2}%; loss {:.4}, entropy term {:.4}, {:.0} img/s",
        100.0 * trained,
        100.0 * random,
        r.loss,
        r.entropy,
        r.images_per_s
    );
    assert!(
        trained >= random + 0.03,
        "trained {trained} vs random init {random}"
    );
    // No collapse: H = log NB - entropy(pbar); exp(log NB - H) is the effective number of
    // prototypes per block the batch uses. Require at least half of the block (32 of 64).
    let nb = cfg.nb as f32;
    assert!(
        r.entropy < nb.ln() - (nb / 2.0).ln(),
        "entropy term {} suggests collapse",
        r.entropy
    );
    // The loss fell: the first steps' mean against the last steps' mean, from metrics.jsonl.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "step")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), r.steps);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    assert!(mean(&losses[losses.len() - 10..]) < mean(&losses[..10]) - 0.1);
    // Each step reports the process's live-tensor peak so far: positive, never falling, and
    // for the tiny model at batch 128 of 32x32 views well under 1 GiB.
    let peaks: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "step")
        .map(|v| v["peak_live_gib"].as_f64().unwrap())
        .collect();
    assert!(peaks[0] > 0.0 && peaks[peaks.len() - 1] < 1.0, "{peaks:?}");
    assert!(peaks.windows(2).all(|w| w[1] >= w[0]), "{peaks:?}");
    let _ = std::fs::remove_dir_all(&out);
}
