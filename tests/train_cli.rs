//! The training run as a user drives it: exact resume, torn and corrupt checkpoints, the NaN
//! guard, the dry run of the paper's preset, and the torchvision export round trip. A micro
//! model keeps each step to milliseconds.

use std::path::{Path, PathBuf};
use std::process::Command;

use carp::nn::head::HeadConfig;
use carp::nn::resnet::{BlockKind, ResNetConfig, Stem};
use carp::nn::{ModelConfig, Network};
use carp::train::checkpoint::{self, CheckpointMeta};
use carp::train::config::TrainConfig;
use carp::train::step::CarpState;
use carp::train::trainer::{train, TrainOptions};

fn micro_model() -> ModelConfig {
    ModelConfig {
        arch: "micro".into(),
        backbone: ResNetConfig {
            layers: vec![1, 1],
            base_width: 2,
            stem: Stem::Cifar,
            block: BlockKind::Bottleneck,
        },
        head: HeadConfig {
            hidden: 8,
            out: 4,
            prototypes: 16,
        },
    }
}

fn micro_config(out: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        model: micro_model(),
        out: out.to_path_buf(),
        batch: 8,
        steps: Some(steps),
        epochs: None,
        image_size: 12,
        nb: 4,
        checkpoint_every: 3,
        ..TrainConfig::tiny_default()
    }
}

fn quiet() -> TrainOptions {
    TrainOptions {
        no_eval: true,
        quiet: true,
        ..Default::default()
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("carp-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn load(dir: &Path, cfg: &TrainConfig) -> CarpState {
    let mut s = CarpState::new(&cfg.model, cfg.nb, cfg.weight_decay, cfg.seed).unwrap();
    checkpoint::load_file(&dir.join(checkpoint::LATEST), &mut s).unwrap();
    s
}

#[test]
fn resume_is_bit_exact() {
    // 7 steps straight vs 4 steps, stop, resume for the remaining 3 (crossing a checkpoint
    // boundary that is not the stopping point, so the loader must skip mid-epoch).
    let a = tmp("straight");
    let cfg_a = micro_config(&a, 7);
    let ra = train(&cfg_a, &quiet()).unwrap();
    assert_eq!(ra.steps, 7);

    let b = tmp("resumed");
    let cfg_b = micro_config(&b, 7);
    let rb = train(
        &cfg_b,
        &TrainOptions {
            stop_after: Some(4),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(rb.steps, 4);
    let rb = train(
        &cfg_b,
        &TrainOptions {
            resume: true,
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(rb.steps, 7);

    let (sa, sb) = (load(&a, &cfg_a), load(&b, &cfg_b));
    assert_eq!(sa.step, 7);
    assert_eq!(sb.step, 7);
    assert!(
        sa.student.params.data
            != CarpState::new(&cfg_a.model, 4, 1e-6, 0)
                .unwrap()
                .student
                .params
                .data
    );
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&sa.student.params.data),
        bits(&sb.student.params.data),
        "student weights differ"
    );
    assert_eq!(
        bits(&sa.teacher.params.data),
        bits(&sb.teacher.params.data),
        "teacher weights differ"
    );
    assert_eq!(
        bits(&sa.student.buffers.data),
        bits(&sb.student.buffers.data),
        "BN statistics differ"
    );
    assert_eq!(
        bits(&sa.lars.momentum_buf),
        bits(&sb.lars.momentum_buf),
        "LARS momentum differs"
    );
    assert_eq!(ra.loss.to_bits(), rb.loss.to_bits());

    // Starting over in a folder that holds a run is refused (nothing is overwritten).
    let err = train(&cfg_a, &quiet()).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

#[test]
fn torn_or_corrupt_checkpoints_are_rejected_and_the_previous_one_is_used() {
    let cfg = micro_config(&tmp("unused"), 4);
    let mut state = CarpState::new(&cfg.model, cfg.nb, cfg.weight_decay, 3).unwrap();
    let meta = |step| CheckpointMeta {
        step,
        epoch: 0,
        config_json: serde_json::to_string(&cfg).unwrap(),
    };
    let bytes = checkpoint::to_bytes(&state, &meta(5)).unwrap();
    let p = Path::new("mem");
    // Every truncation point is rejected with a clear error.
    for cut in 0..bytes.len() {
        let mut s = state.try_clone().unwrap();
        let err = checkpoint::from_bytes(&bytes[..cut], p, &mut s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("mem"), "error does not name the file: {err}");
        assert_eq!(
            s.step, state.step,
            "a rejected checkpoint changed the state"
        );
    }
    // A flipped byte in the tensor data fails the checksum.
    let mut bad = bytes.clone();
    let last = bad.len() - 3;
    bad[last] ^= 0x40;
    let err = checkpoint::from_bytes(&bad, p, &mut state.try_clone().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum") || err.contains("corrupt"), "{err}");
    // The intact bytes load.
    let mut s = state.try_clone().unwrap();
    assert_eq!(checkpoint::from_bytes(&bytes, p, &mut s).unwrap().step, 5);

    // On disk: a torn latest falls back to the previous checkpoint.
    let dir = tmp("torn");
    state.step = 3;
    checkpoint::save(&dir, &state, &meta(3)).unwrap();
    state.step = 6;
    checkpoint::save(&dir, &state, &meta(6)).unwrap();
    let latest = dir.join(checkpoint::LATEST);
    let full = std::fs::read(&latest).unwrap();
    for cut in [0, 1, 8, 100, full.len() / 2, full.len() - 1] {
        std::fs::write(&latest, &full[..cut]).unwrap();
        let mut s = CarpState::new(&cfg.model, cfg.nb, cfg.weight_decay, 3).unwrap();
        let (used, m, warnings) = checkpoint::load_latest(&dir, &mut s).unwrap();
        assert_eq!(used, dir.join(checkpoint::PREVIOUS));
        assert_eq!(m.step, 3);
        assert_eq!(s.step, 3);
        assert_eq!(warnings.len(), 1, "the torn file must be reported");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nan_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tmp("nan");
    let cfg = micro_config(&dir, 8);
    let err = train(
        &cfg,
        &TrainOptions {
            inject_nan_at_step: Some(4),
            ..quiet()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("step 4"),
        "the error must name the step: {err}"
    );
    let s = load(&dir, &cfg);
    assert_eq!(s.step, 3, "the checkpoint of step 3 must be the latest");
    assert!(s.student.params.data.iter().all(|v| v.is_finite()));
    assert!(s.teacher.params.data.iter().all(|v| v.is_finite()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn export_and_reimport_the_teacher_backbone() {
    let cfg = micro_model();
    let mut state = CarpState::new(&cfg, 4, 0.0, 1).unwrap();
    // Make the teacher differ from a fresh init everywhere.
    for (i, v) in state.teacher.params.data.iter_mut().enumerate() {
        *v += 0.001 * (i % 7) as f32;
    }
    for (i, v) in state.teacher.buffers.data.iter_mut().enumerate() {
        *v += 0.01 * (i % 5) as f32;
    }
    let dir = tmp("export");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("backbone.safetensors");
    checkpoint::export_backbone(&state.teacher, &path).unwrap();
    // torchvision names only: no head, no prototypes.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert!(names.contains(&"conv1.weight") && names.contains(&"layer1.0.bn1.running_var"));
    assert!(names
        .iter()
        .all(|n| !n.starts_with("head.") && !n.starts_with("prototypes.")));

    let mut fresh = Network::new(&cfg, 99).unwrap();
    let head_before = fresh
        .params
        .view(fresh.params.id("head.fc1.weight").unwrap())
        .to_vec();
    checkpoint::import_backbone(&path, &mut fresh).unwrap();
    for e in &state.teacher.params.entries {
        let got = fresh.params.view(fresh.params.id(&e.name).unwrap());
        if e.name.starts_with("head.") || e.name.starts_with("prototypes.") {
            continue;
        }
        assert_eq!(got, &state.teacher.params.data[e.range()], "{}", e.name);
    }
    assert_eq!(fresh.buffers.data.len(), state.teacher.buffers.data.len());
    let rv = state
        .teacher
        .buffers
        .id("layer1.0.bn1.running_var")
        .unwrap();
    assert_eq!(fresh.buffers.view(rv), state.teacher.buffers.view(rv));
    assert_eq!(
        fresh
            .params
            .view(fresh.params.id("head.fc1.weight").unwrap()),
        &head_before[..]
    );
    // A file from another architecture is refused with the tensor's name.
    let mut other = Network::new(&ModelConfig::tiny(), 0).unwrap();
    let err = checkpoint::import_backbone(&path, &mut other)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("conv1.weight") || err.contains("layer"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn paper_preset_dry_run_prints_the_paper_values() {
    let out = Command::new(env!("CARGO_BIN_EXE_carp"))
        .args(["train", "--preset", "imagenet-200ep", "--dry-run", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    let c = &v["config"];
    assert_eq!(c["model"]["arch"], "resnet50");
    assert_eq!(c["batch"], 1024);
    assert_eq!(c["image_size"], 224);
    assert_eq!(c["epochs"], 200);
    assert_eq!(c["nb"], 512);
    assert_eq!(c["model"]["head"]["prototypes"], 65536);
    assert_eq!(c["model"]["head"]["hidden"], 2048);
    assert_eq!(c["model"]["head"]["out"], 256);
    assert!((c["lr"].as_f64().unwrap() - 0.6).abs() < 1e-6);
    assert!((c["lr_final"].as_f64().unwrap() - 0.06).abs() < 1e-6);
    assert!((c["weight_decay"].as_f64().unwrap() - 1e-6).abs() < 1e-12);
    assert!((c["momentum_start"].as_f64().unwrap() - 0.99).abs() < 1e-6);
    assert!((c["momentum_end"].as_f64().unwrap() - 1.0).abs() < 1e-6);
    // Table 1 of the paper: two views, no multi-crop.
    assert_eq!(c["local_crops"], 0);
    assert_eq!(c["views"], 2);
    assert_eq!(v["params_backbone"], 23_508_032);
    assert_eq!(v["params_prototypes"], 65536 * 256);
    // Explicit flags override the preset.
    let out = Command::new(env!("CARGO_BIN_EXE_carp"))
        .args([
            "train",
            "--preset",
            "imagenet-200ep",
            "--batch",
            "256",
            "--dry-run",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["config"]["batch"], 256);
    assert_eq!(v["config"]["nb"], 512);
    // Bad values are refused with a message, not a panic.
    let out = Command::new(env!("CARGO_BIN_EXE_carp"))
        .args(["train", "--nb", "7", "--dry-run"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must divide K"));
}

#[test]
fn multicrop_resume_is_bit_exact() {
    // Micro model, 2 local views of 8x8 (12x12 globals): 5 steps straight vs 2, stop, resume
    // for 3. The resume lands inside an epoch, where the multi-crop loader skips batches.
    let with_locals = |out: &Path| TrainConfig {
        local_crops: 2,
        local_size: 8,
        ..micro_config(out, 5)
    };
    let a = tmp("mc-straight");
    let ra = train(&with_locals(&a), &quiet()).unwrap();
    assert_eq!(ra.steps, 5);
    assert!(ra.loss.is_finite());
    let b = tmp("mc-resumed");
    let stopped = train(
        &with_locals(&b),
        &TrainOptions {
            stop_after: Some(2),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(stopped.steps, 2);
    // Resuming with other local crops is another experiment: refused.
    let other = TrainConfig {
        local_crops: 3,
        ..with_locals(&b)
    };
    let err = train(
        &other,
        &TrainOptions {
            resume: true,
            ..quiet()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("local crops"), "{err}");
    let rb = train(
        &with_locals(&b),
        &TrainOptions {
            resume: true,
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(rb.steps, 5);
    let (sa, sb) = (load(&a, &with_locals(&a)), load(&b, &with_locals(&b)));
    assert_eq!(sa.student.params.data, sb.student.params.data);
    assert_eq!(sa.teacher.params.data, sb.teacher.params.data);
    assert_eq!(sa.student.buffers.data, sb.student.buffers.data);
    assert_eq!(ra.loss.to_bits(), rb.loss.to_bits());
    // The local crops changed the run: the same 5 steps without them end elsewhere.
    let c = tmp("mc-none");
    train(&micro_config(&c, 5), &quiet()).unwrap();
    assert_ne!(
        load(&c, &micro_config(&c, 5)).student.params.data,
        sa.student.params.data
    );
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn multicrop_cli_trains_the_tiny_model_and_records_it() {
    // The tiny model through the binary: 3 steps of 16 images, 2 local views of 14x14 (the
    // default local size at 32), on the CPU.
    let out = tmp("mc-cli");
    let run = Command::new(env!("CARGO_BIN_EXE_carp"))
        .args([
            "train",
            "--steps",
            "3",
            "--batch",
            "16",
            "--local-crops",
            "2",
            "--device",
            "cpu",
            "--workers",
            "2",
            "--no-eval",
            "--json",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("2 local views of 14x14"),
        "the run does not say it uses local views:\n{stderr}"
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["steps"], 3);
    assert!(v["loss"].as_f64().unwrap().is_finite());
    // The checkpoint's metadata carries the multi-crop settings.
    let cfg: TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!((cfg.local_crops, cfg.local_size), (2, 14));
    let mut st = CarpState::new(&cfg.model, cfg.nb, cfg.weight_decay, cfg.seed).unwrap();
    let (_, meta, _) = checkpoint::load_latest(&out, &mut st).unwrap();
    let saved: TrainConfig = serde_json::from_str(&meta.config_json).unwrap();
    assert_eq!((saved.local_crops, saved.local_size), (2, 14));
    assert_eq!(meta.step, 3);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn multicrop_flags_dry_run_and_errors() {
    let carp = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_carp"))
            .args(args)
            .output()
            .unwrap()
    };
    // SPEC's multi-crop on the paper's preset: 6 local views of 96 at 224.
    let out = carp(&[
        "train",
        "--preset",
        "imagenet-200ep",
        "--local-crops",
        "6",
        "--dry-run",
        "--json",
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("2 global 224x224 (student and teacher) + 6 local 96x96 (student only)"),
        "{stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["config"]["local_crops"], 6);
    assert_eq!(v["config"]["local_size"], 96);
    // Errors that say what to do.
    for (args, needle) in [
        (
            &["train", "--local-size", "20", "--dry-run"][..],
            "add --local-crops",
        ),
        (
            &[
                "train",
                "--local-crops",
                "2",
                "--local-size",
                "4",
                "--dry-run",
            ][..],
            "too small",
        ),
        (
            &[
                "train",
                "--local-crops",
                "2",
                "--local-size",
                "64",
                "--dry-run",
            ][..],
            "exceeds the global view size 32",
        ),
        (&["train", "--views", "8", "--dry-run"][..], "--local-crops"),
    ] {
        let out = carp(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
