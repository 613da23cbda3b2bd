//! The `carp` binary as a user runs it: pack an ImageFolder of real photos, a random-init k-NN
//! baseline, a short training run, then knn / linear / export / plot on its checkpoint.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs a binary of this crate: (success, stdout, stderr).
fn exec(exe: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(exe).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn carp(args: &[&str]) -> (bool, String, String) {
    exec(env!("CARGO_BIN_EXE_carp"), args)
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("no output")).expect("last line is JSON")
}

fn image_folder(root: &Path) {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    // Two classes, each photo a few times (the pipeline only needs distinct records).
    for (class, files) in [
        ("cats", ["chelsea.jpg", "chelsea.png"]),
        ("cups", ["coffee.jpg", "coffee.png"]),
    ] {
        let d = root.join(class);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..4 {
            let f = files[i % 2];
            let ext = Path::new(f).extension().unwrap().to_str().unwrap();
            std::fs::copy(fx.join(f), d.join(format!("{i}.{ext}"))).unwrap();
        }
    }
}

#[test]
fn pack_train_evaluate_export_plot() {
    let tmp: PathBuf = std::env::temp_dir().join(format!("carp-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let src = tmp.join("folder");
    image_folder(&src);
    let data = tmp.join("packed");
    let (ok, out, err) = carp(&[
        "pack",
        src.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
        "--no-progress",
    ]);
    assert!(ok, "pack failed: {out}{err}");
    let d = data.to_str().unwrap();

    let (ok, out, err) = carp(&[
        "knn",
        "--random-init",
        "--arch",
        "tiny",
        "--image-size",
        "16",
        "--data",
        d,
        "--eval-data",
        d,
        "--json",
    ]);
    assert!(ok, "knn failed: {err}");
    let v = last_json(&out);
    assert!(
        v["top1"].as_f64().is_some() && v["per_k"]["200"].is_number(),
        "{v}"
    );

    let run = tmp.join("run");
    let r = run.to_str().unwrap();
    let (ok, out, err) = carp(&[
        "train",
        "--data",
        d,
        "--eval-data",
        d,
        "--out",
        r,
        "--batch",
        "4",
        "--steps",
        "3",
        "--image-size",
        "16",
        "--k",
        "64",
        "--nb",
        "16",
        "--head-hidden",
        "32",
        "--head-out",
        "16",
        "--checkpoint-every",
        "2",
        "--json",
    ]);
    assert!(ok, "train failed: {err}");
    let v = last_json(&out);
    assert_eq!(v["steps"], 3);
    for key in ["loss", "knn_top1", "knn_top1_random_init", "images_per_s"] {
        assert!(v[key].is_number(), "missing {key} in {v}");
    }
    assert!(run.join("config.json").exists() && run.join("metrics.jsonl").exists());
    let ckpt = run.join("checkpoint.safetensors");
    let c = ckpt.to_str().unwrap();

    let (ok, out, err) = carp(&[
        "knn",
        "--checkpoint",
        c,
        "--data",
        d,
        "--eval-data",
        d,
        "--json",
    ]);
    assert!(ok, "knn on checkpoint failed: {err}");
    assert!(last_json(&out)["top1"].is_number());

    // The paper's protocol (the default): a line per epoch, then the last and best epochs.
    let (ok, out, err) = carp(&[
        "linear",
        "--checkpoint",
        c,
        "--data",
        d,
        "--eval-data",
        d,
        "--epochs",
        "2",
        "--batch",
        "4",
        "--json",
    ]);
    assert!(ok, "linear failed: {err}");
    assert!(
        err.contains("the paper's protocol") && err.contains("epoch 2/2"),
        "{err}"
    );
    let v = last_json(&out);
    assert_eq!(v["protocol"], "paper");
    assert!(
        v["top1"].as_f64().unwrap() >= 0.0
            && v["top5"].as_f64().unwrap() >= v["top1"].as_f64().unwrap()
            && v["best_top1"].as_f64().unwrap() >= v["top1"].as_f64().unwrap()
    );
    assert_eq!(v["epochs"].as_array().unwrap().len(), 2);
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
    // The fast cached probe says that it is not the paper's protocol; its second run uses
    // the feature cache.
    for run in 0..2 {
        let (ok, out, err) = carp(&[
            "linear",
            "--protocol",
            "cached",
            "--checkpoint",
            c,
            "--data",
            d,
            "--eval-data",
            d,
            "--epochs",
            "3",
            "--batch",
            "4",
            "--json",
        ]);
        assert!(ok && err.contains("NOT the paper's protocol"), "{err}");
        let v = last_json(&out);
        assert_eq!(v["protocol"], "cached");
        assert!(
            v["top1"].as_f64().unwrap() >= 0.0
                && v["top5"].as_f64().unwrap() >= v["top1"].as_f64().unwrap()
        );
        // (Both splits are the same folder here: the first run's second split is a hit.)
        assert_eq!(err.contains("features: extracting"), run == 0, "{err}");
    }

    let exported = tmp.join("backbone.safetensors");
    let (ok, _, err) = carp(&[
        "export",
        "--checkpoint",
        c,
        "--out",
        exported.to_str().unwrap(),
    ]);
    assert!(ok && exported.exists(), "export failed: {err}");

    let (ok, _, err) = carp(&["plot", r]);
    assert!(ok && run.join("plot.png").exists(), "plot failed: {err}");

    // Errors are messages, not panics.
    let (ok, _, err) = carp(&[
        "knn",
        "--checkpoint",
        "/nonexistent.safetensors",
        "--data",
        d,
        "--eval-data",
        d,
    ]);
    assert!(
        !ok && err.starts_with("error:") && !err.contains("panicked"),
        "{err}"
    );
    let (ok, _, err) = carp(&[
        "train",
        "--data",
        "/nonexistent",
        "--out",
        tmp.join("x").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("carp pack"), "{err}");
    let (ok, _, err) = carp(&["train", "--device", "cuda", "--dry-run"]);
    assert!(ok, "dry run does not need the device: {err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

fn bench(args: &[&str]) -> (bool, String, String) {
    exec(env!("CARGO_BIN_EXE_carp-bench"), args)
}

#[test]
fn carp_bench_runs_on_the_cpu_in_every_mode() {
    let small = [
        "--arch",
        "tiny",
        "--batch",
        "4",
        "--image-size",
        "16",
        "--k",
        "64",
        "--nb",
        "16",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--json",
    ];
    let (ok, out, err) = bench(&small);
    assert!(ok, "{err}");
    let v = last_json(&out);
    for key in ["images_per_s", "step_ms", "peak_mem_gib", "batch", "device"] {
        assert!(!v[key].is_null(), "missing {key}: {v}");
    }
    assert_eq!(v["batch"], 4);
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
    for phase in [
        "teacher forward",
        "student forward",
        "loss",
        "backward",
        "optimizer (LARS)",
        "EMA",
    ] {
        assert!(
            out.contains(phase) && v["phases_ms"][phase].is_number(),
            "phase {phase} missing"
        );
    }
    let emb = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/fashion-mnist-small/test");
    let e = emb.to_str().unwrap();
    let (ok, out, err) = bench(&[
        "--loader",
        e,
        "--batch",
        "32",
        "--image-size",
        "32",
        "--steps",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert!(last_json(&out)["images_per_s"].as_f64().unwrap() > 0.0);
    let mut end_to_end = small.to_vec();
    end_to_end.extend(["--data", e]);
    let (ok, out, err) = bench(&end_to_end);
    assert!(ok, "{err}");
    assert_eq!(last_json(&out)["mode"], "end-to-end");
    let (ok, _, err) = bench(&["--loader", "/nonexistent"]);
    assert!(!ok && err.starts_with("error:"), "{err}");
}

/// `--help` of the training and benchmark commands lists every run-option flag and the legacy
/// environment variable each one replaces, so an A/B run does not need the source.
#[test]
fn help_lists_the_run_options() {
    let flags = [
        "--fused-bn",
        "--recompute",
        "--bf16-layout",
        "--tf32",
        "--cudnn-find",
        "--bn-stats",
        "--view-finish",
        "--nan-guard",
        "--phase-sync",
    ];
    let vars = carp::options::env_var_names();
    assert_eq!(vars.len(), flags.len(), "one environment fallback per flag");
    for (what, (ok, out, err)) in [
        ("carp train --help", carp(&["train", "--help"])),
        ("carp-bench --help", bench(&["--help"])),
    ] {
        assert!(ok, "{what}: {err}");
        for s in flags.iter().chain(vars.iter()) {
            assert!(out.contains(s), "{what} does not mention {s}");
        }
    }
}
