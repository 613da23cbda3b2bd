//! `carp knn --raw-pixels` against a direct computation: IDX files of random images with a
//! class structure are packed with `carp pack`, evaluated by the binary, and the same cosine
//! k-NN (SPEC.md "Evaluation": L2-normalized features, top-k neighbours voting with weight
//! exp(sim / 0.07)) is computed here in f64 from the IDX bytes themselves, with nothing from
//! the library.

use std::path::Path;
use std::process::Command;

use rand::{Rng, SeedableRng};

/// The ImageNet mean and std the views are normalized with (SPEC.md).
const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

fn write_idx(path: &Path, dims: &[u32], data: &[u8]) {
    let magic: u32 = 0x0800 | dims.len() as u32; // unsigned bytes, then the rank
    let mut b = magic.to_be_bytes().to_vec();
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

/// `n` grayscale side x side images, each a noisy copy of its class's random template, and
/// their labels.
fn make_split(rng: &mut impl Rng, templates: &[Vec<f64>], n: usize) -> (Vec<u8>, Vec<u8>) {
    let mut px = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..n {
        let c = rng.gen_range(0..templates.len());
        labels.push(c as u8);
        for &t in &templates[c] {
            let v = t + rng.gen_range(-90.0..90.0);
            px.push(v.clamp(0.0, 255.0) as u8);
        }
    }
    (px, labels)
}

/// Naive weighted cosine k-NN in f64: the fraction of queries whose top-k vote is right.
fn naive_knn(bank: &[Vec<f64>], bl: &[u8], queries: &[Vec<f64>], ql: &[u8], k: usize) -> f64 {
    let unit = |v: &Vec<f64>| {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| x / n).collect::<Vec<f64>>()
    };
    let bank: Vec<Vec<f64>> = bank.iter().map(unit).collect();
    let mut right = 0;
    for (q, &y) in queries.iter().zip(ql) {
        let q = unit(q);
        let mut sims: Vec<(f64, u8)> = bank
            .iter()
            .zip(bl)
            .map(|(b, &l)| (b.iter().zip(&q).map(|(a, b)| a * b).sum(), l))
            .collect();
        sims.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        let mut votes = [0.0f64; 256];
        for &(s, l) in sims.iter().take(k) {
            votes[l as usize] += (s / 0.07).exp();
        }
        let pred = (0..256)
            .max_by(|&a, &b| votes[a].partial_cmp(&votes[b]).unwrap())
            .unwrap();
        right += usize::from(pred == y as usize);
    }
    right as f64 / queries.len() as f64
}

/// The evaluation view of a grayscale `side` x `side` image at size `side - 2`, as the k-NN
/// feature. SPEC's view resizes the short side to round(S * 256 / 224) and crops the centre
/// S x S: with S = 14 and side 16 the resize is to 16 (the image itself) and the crop the
/// centre with a 1-pixel margin, so no resampling is involved. The gray value in each of the 3
/// channels, scaled to [0, 1] and normalized per channel, (3, S, S).
fn raw_feature(img: &[u8], side: usize) -> Vec<f64> {
    let s = side - 2;
    assert_eq!((s as f64 * 256.0 / 224.0).round() as usize, side);
    (0..3)
        .flat_map(|c| {
            (1..=s).flat_map(move |y| {
                (1..=s).map(move |x| (img[y * side + x] as f64 / 255.0 - MEAN[c]) / STD[c])
            })
        })
        .collect()
}

#[test]
fn raw_pixel_knn_matches_a_direct_computation() {
    let tmp = std::env::temp_dir().join(format!("carp-rawknn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let side = 16usize;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    // Class templates close to a shared base, so that the noise makes some queries wrong.
    let base: Vec<f64> = (0..side * side)
        .map(|_| rng.gen_range(40.0..215.0))
        .collect();
    let templates: Vec<Vec<f64>> = (0..4)
        .map(|_| {
            base.iter()
                .map(|b| b + rng.gen_range(-12.0..12.0))
                .collect()
        })
        .collect();
    let (ntr, nte) = (150usize, 40usize);
    let mut dirs = Vec::new();
    let mut splits = Vec::new();
    for (name, n) in [("train", ntr), ("test", nte)] {
        let (px, labels) = make_split(&mut rng, &templates, n);
        let (im, lb) = (
            tmp.join(format!("{name}-img")),
            tmp.join(format!("{name}-lbl")),
        );
        write_idx(&im, &[n as u32, side as u32, side as u32], &px);
        write_idx(&lb, &[n as u32], &labels);
        let out = tmp.join(name);
        let o = Command::new(env!("CARGO_BIN_EXE_carp"))
            .args([
                "pack",
                im.to_str().unwrap(),
                "--labels",
                lb.to_str().unwrap(),
            ])
            .args(["--out", out.to_str().unwrap(), "--no-progress"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        dirs.push(out);
        let feats: Vec<Vec<f64>> = px
            .chunks(side * side)
            .map(|im| raw_feature(im, side))
            .collect();
        splits.push((feats, labels));
    }
    let o = Command::new(env!("CARGO_BIN_EXE_carp"))
        .args([
            "knn",
            "--raw-pixels",
            "--image-size",
            &(side - 2).to_string(),
        ])
        .args(["--data", dirs[0].to_str().unwrap()])
        .args(["--eval-data", dirs[1].to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let ((bank, bl), (queries, ql)) = (&splits[0], &splits[1]);
    for k in [10usize, 20, 100, 200] {
        let want = naive_knn(bank, bl, queries, ql, k.min(ntr));
        let got = v["per_k"][k.to_string()].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-9,
            "k={k}: carp {got} vs direct {want}"
        );
    }
    assert_eq!(v["top1"], v["per_k"]["20"]);
    // Not a degenerate set: the classes are separable but not trivially.
    let top1 = v["top1"].as_f64().unwrap();
    assert!(top1 > 0.3 && top1 < 1.0, "k=20 top-1 {top1}: {v}");
    // The ResNet18 baseline at random init runs through the same command (and its features
    // are not the pixels: a different accuracy profile is allowed, a failure is not).
    let o = Command::new(env!("CARGO_BIN_EXE_carp"))
        .args(["knn", "--random-init", "--arch", "resnet18-cifar"])
        .args(["--image-size", &side.to_string(), "--device", "cpu"])
        .args(["--data", dirs[0].to_str().unwrap()])
        .args(["--eval-data", dirs[1].to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert!(r["top1"].as_f64().is_some(), "{r}");
    // --raw-pixels takes no network.
    let o = Command::new(env!("CARGO_BIN_EXE_carp"))
        .args(["knn", "--raw-pixels", "--random-init"])
        .args(["--data", dirs[0].to_str().unwrap()])
        .args(["--eval-data", dirs[1].to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let _ = std::fs::remove_dir_all(&tmp);
}
