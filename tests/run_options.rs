//! Run options as a user meets them: flags of `carp train` and `carp-bench`, recorded in
//! config.json, the metrics, the checkpoint and the benchmark's JSON; a resume that changes one
//! says so; the legacy `CARP_*` variables still work, lose to a flag, and refuse unknown values.
//! And the engine reads no other switch from the environment.

use std::path::PathBuf;
use std::process::Command;

mod common;
use common::{rust_files, src_dir, src_relative};

use carp::train::checkpoint;
use carp::train::config::TrainConfig;
use carp::train::step::CarpState;

/// Runs a binary of this crate with none of the legacy variables set (whatever the shell that
/// runs the tests has), plus `env`: (success, stdout, stderr).
fn exec(exe: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(exe);
    for v in carp::options::env_var_names()
        .into_iter()
        .chain(carp::options::retired_env_var_names())
    {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn carp(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    exec(env!("CARGO_BIN_EXE_carp"), args, env)
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("no output")).expect("last line is JSON")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("carp-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn train_args<'a>(out: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--steps",
        steps,
        "--batch",
        "8",
        "--checkpoint-every",
        "2",
        "--device",
        "cpu",
        "--workers",
        "1",
        "--no-eval",
        "--json",
        "--out",
        out,
    ];
    a.extend_from_slice(extra);
    a
}

#[test]
fn a_run_records_its_options_and_a_resume_names_what_changed() {
    let dir = tmp("run-options");
    let out = dir.to_str().unwrap();
    let (ok, _, err) = carp(
        &train_args(out, "2", &["--fused-bn", "off", "--recompute", "bn"]),
        &[],
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("run options (not all defaults): fused_bn=off recompute=bn"),
        "the run does not say which options it changed:\n{err}"
    );

    // config.json: the options as flag values, the untouched ones at their defaults.
    let cfg_text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg_json: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    let ro = &cfg_json["run_options"];
    assert_eq!(ro["fused_bn"], "off", "{ro}");
    assert_eq!(ro["recompute"], "bn", "{ro}");
    assert_eq!(ro["tf32"], "on", "{ro}");
    assert_eq!(ro["nan_guard"], "gated", "{ro}");
    let cfg: TrainConfig = serde_json::from_str(&cfg_text).unwrap();

    // The metrics start with the run's own record.
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(first["type"], "run", "{first}");
    assert_eq!(first["resume"], false);
    assert_eq!(first["run_options"], *ro);

    // The checkpoint's config carries them too.
    let mut st = CarpState::new(&cfg.model, cfg.nb, cfg.weight_decay, cfg.seed).unwrap();
    let (_, meta, _) = checkpoint::load_latest(&dir, &mut st).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&meta.config_json).unwrap();
    assert_eq!(saved["run_options"], *ro);

    // Resume with fused BN back on: a note names that change and no other.
    let (ok, _, err) = carp(
        &train_args(
            out,
            "3",
            &["--resume", "--fused-bn", "on", "--recompute", "bn"],
        ),
        &[],
    );
    assert!(ok, "{err}");
    let notes: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("note: run option"))
        .collect();
    assert_eq!(
        notes,
        ["note: run option changed since the checkpoint: fused_bn: off -> on"],
        "{err}"
    );
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let runs: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "run")
        .collect();
    assert_eq!(runs.len(), 2, "{metrics}");
    assert_eq!(runs[1]["resume"], true);
    assert_eq!(runs[1]["step"], 2);
    assert_eq!(runs[1]["run_options"]["fused_bn"], "on");

    // The same options again: nothing to note.
    let (ok, _, err) = carp(
        &train_args(out, "4", &["--resume", "--recompute", "bn"]),
        &[],
    );
    assert!(ok, "{err}");
    assert!(!err.contains("note: run option"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run of an older carp recorded `optimizer_state` (removed): its checkpoint still resumes,
/// with a note when it recorded `host`; `CARP_HOST_OPTIM=1` is refused before anything runs.
#[test]
fn a_run_that_recorded_a_retired_option_resumes_with_a_note() {
    let dir = tmp("retired-option");
    let out = dir.to_str().unwrap();
    let (ok, _, err) = carp(&train_args(out, "2", &[]), &[]);
    assert!(ok, "{err}");
    // The checkpoint as an older carp with `--optimizer-state host` wrote it.
    let cfg: TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let mut st = CarpState::new(&cfg.model, cfg.nb, cfg.weight_decay, cfg.seed).unwrap();
    let (_, mut meta, _) = checkpoint::load_latest(&dir, &mut st).unwrap();
    let mut saved: serde_json::Value = serde_json::from_str(&meta.config_json).unwrap();
    saved["run_options"]["optimizer_state"] = "host".into();
    meta.config_json = saved.to_string();
    checkpoint::save(&dir, &st, &meta).unwrap();

    let (ok, _, err) = carp(&train_args(out, "3", &["--resume"]), &[]);
    assert!(ok, "{err}");
    let notes: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("note: run option"))
        .collect();
    assert_eq!(notes.len(), 1, "{err}");
    assert!(
        notes[0].contains("optimizer_state: host -> device") && notes[0].contains("removed"),
        "{err}"
    );

    let (ok, _, err) = carp(
        &train_args(out, "4", &["--resume"]),
        &[("CARP_HOST_OPTIM", "1")],
    );
    assert!(!ok, "CARP_HOST_OPTIM=1 was accepted");
    assert!(
        err.contains("CARP_HOST_OPTIM") && err.contains("removed"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dry_run_shows_the_options_and_the_environment_fallback_is_strict() {
    let dry = |extra: &[&str], env: &[(&str, &str)]| {
        let mut a = vec!["train", "--dry-run", "--json"];
        a.extend_from_slice(extra);
        carp(&a, env)
    };
    let (ok, out, err) = dry(&[], &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("run options: fused_bn=on recompute=all bf16_layout=nhwc"),
        "{out}"
    );
    assert_eq!(
        last_json(&out)["config"]["run_options"]["bf16_layout"],
        "nhwc"
    );

    // A legacy variable with its old meaning...
    let (ok, out, err) = dry(&[], &[("CARP_NHWC", "0"), ("CARP_STEP_SYNC", "1")]);
    assert!(ok, "{err}");
    let ro = &last_json(&out)["config"]["run_options"];
    assert_eq!(ro["bf16_layout"], "nchw", "{ro}");
    assert_eq!(ro["nan_guard"], "sync", "{ro}");
    // ...loses to the flag.
    let (ok, out, err) = dry(&["--bf16-layout", "nhwc"], &[("CARP_NHWC", "0")]);
    assert!(ok, "{err}");
    assert_eq!(
        last_json(&out)["config"]["run_options"]["bf16_layout"],
        "nhwc"
    );

    // An unknown value is refused, naming the variable, its values and the flag.
    let (ok, _, err) = dry(&[], &[("CARP_NHWC", "maybe")]);
    assert!(!ok, "CARP_NHWC=maybe was accepted");
    for needle in ["CARP_NHWC", "maybe", "--bf16-layout"] {
        assert!(err.contains(needle), "missing {needle:?}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    let (ok, _, err) = dry(&["--recompute", "some"], &[]);
    assert!(!ok);
    for needle in ["all", "bn", "none"] {
        assert!(err.contains(needle), "missing {needle:?}: {err}");
    }
}

#[test]
fn the_benchmark_reports_the_options_it_ran_with() {
    let bench = |extra: &[&str]| {
        let mut a = vec![
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
            "1",
            "--device",
            "cpu",
            "--json",
        ];
        a.extend_from_slice(extra);
        exec(env!("CARGO_BIN_EXE_carp-bench"), &a, &[])
    };
    let (ok, out, err) = bench(&["--fused-bn", "off"]);
    assert!(ok, "{err}");
    assert!(out.contains("run options: fused_bn=off"), "{out}");
    let ro = &last_json(&out)["run_options"];
    assert_eq!(ro["fused_bn"], "off", "{ro}");
    // The benchmark waits per phase unless told not to.
    assert_eq!(ro["phase_sync"], "on", "{ro}");
    let (ok, out, err) = bench(&["--no-phase-sync"]);
    assert!(ok, "{err}");
    assert_eq!(last_json(&out)["run_options"]["phase_sync"], "off");
}

/// What the engine computes is chosen by recorded run options, never by a variable read deep
/// in the code: only `options.rs` (the legacy fallback, read once by the CLIs), the binaries,
/// the embedded data's cache directory, the test helpers' debug output and an ignored timing
/// harness read the environment.
#[test]
fn the_library_reads_no_other_switch_from_the_environment() {
    let src = src_dir();
    let allowed = [
        "options.rs",
        "data/embedded.rs",
        "testutil.rs",
        // `time_conv_*` (#[ignore]d timing): image and batch sizes of the measurement.
        "ops/conv.rs",
    ];
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "found only {} files", files.len());
    let mut offenders = Vec::new();
    for f in files {
        let rel = src_relative(&f);
        if rel.starts_with("bin/") || allowed.contains(&rel.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            if line.contains("env::var") || line.contains("env!(\"CARP_") {
                offenders.push(format!("src/{rel}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "environment reads outside src/options.rs (add a run option instead):\n{}",
        offenders.join("\n")
    );
}
