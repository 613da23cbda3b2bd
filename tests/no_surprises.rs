//! What a user meets before a run starts: a run that cannot fit in memory is refused with the
//! estimate and the memory available, `--dry-run` prints the estimate, and `--profile-steps`
//! parses and validates (on the CPU, where it runs without a capture).

use std::path::PathBuf;
use std::process::Command;

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

fn bench(args: &[&str]) -> (bool, String, String) {
    exec(env!("CARGO_BIN_EXE_carp-bench"), args)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("carp-nosurprise-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The bytes of a size printed as `12.34 GiB` right after `after` in `text`.
fn bytes_after(text: &str, after: &str) -> f64 {
    let i = text
        .find(after)
        .unwrap_or_else(|| panic!("no {after:?} in {text}"))
        + after.len();
    let mut it = text[i..].split_whitespace();
    let v: f64 = it.next().unwrap().parse().unwrap();
    let unit = it.next().unwrap().trim_end_matches([',', ';', ')', '(']);
    let p = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        .iter()
        .position(|u| *u == unit)
        .unwrap_or_else(|| panic!("unit {unit:?}"));
    v * 1024f64.powi(p as i32)
}

fn mem_available() -> f64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap();
    let l = s.lines().find(|l| l.starts_with("MemAvailable:")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() * 1024.0
}

#[test]
fn a_run_that_cannot_fit_is_refused_with_the_estimate_and_the_memory_available() {
    let out = tmp("huge");
    let (ok, _, err) = carp(&[
        "train",
        "--image-size",
        "100000",
        "--no-eval",
        "--steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok, "{err}");
    assert!(err.starts_with("error: this run needs about"), "{err}");
    for says in [
        "CPU memory",
        "available",
        "--batch",
        "--image-size",
        "--force",
    ] {
        assert!(err.contains(says), "{says:?} missing: {err}");
    }
    // At least the two global views of one batch of 128 in f32, and those of the loader: an
    // independent lower bound.
    let need = bytes_after(&err, "needs about ");
    let views = 128.0 * 2.0 * 3.0 * 1e10 * 4.0;
    assert!(
        need > views,
        "estimate {need:e} below the views alone {views:e}"
    );
    // The memory available is this machine's (it moves a little between the two readings).
    let avail = bytes_after(&err, "more than the ");
    let here = mem_available();
    assert!(
        (avail - here).abs() < 0.25 * here,
        "reported {avail:e} B available, /proc/meminfo says {here:e}"
    );
    // Refused before it started: no checkpoint.
    assert!(!out.join("checkpoint.safetensors").exists());

    // --force skips the refusal: the run gets on to opening its data (missing here), so
    // nothing is allocated by this test.
    let (ok, _, err) = carp(&[
        "train",
        "--image-size",
        "100000",
        "--force",
        "--data",
        "/nonexistent/carp-data",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("warning: this run needs about") && err.contains("starting anyway"),
        "{err}"
    );
    assert!(err.contains("/nonexistent/carp-data"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn dry_run_prints_the_estimate_that_a_real_run_measures() {
    let (ok, stdout, err) = carp(&["train", "--dry-run", "--batch", "16", "--json"]);
    assert!(ok, "{err}");
    // The estimate stands with the parameter counts.
    let lines: Vec<&str> = stdout.lines().collect();
    let p = lines
        .iter()
        .position(|l| l.starts_with("parameters:"))
        .unwrap();
    let m = lines
        .iter()
        .position(|l| l.starts_with("memory estimate:"))
        .unwrap();
    assert!(m > p && m <= p + 2, "{stdout}");
    assert!(
        lines[m].contains("per image") && lines[m].contains("available"),
        "{}",
        lines[m]
    );
    let json: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let mem = &json["memory"];
    let f = |k: &str| mem[k].as_f64().unwrap_or_else(|| panic!("no {k} in {mem}"));
    assert_eq!(mem["batch"], 16);
    assert!((f("activation_bytes") - 16.0 * f("per_image_bytes")).abs() < 1.0);

    // A real run of the same configuration reports its peak of live tensors per step
    // (metrics.jsonl, peak_live_gib): the estimate's step part must match it.
    let out = tmp("measured");
    let (ok, _, err) = carp(&[
        "train",
        "--batch",
        "16",
        "--steps",
        "2",
        "--no-eval",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let peak = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["peak_live_gib"].as_f64())
        .fold(0.0f64, f64::max)
        * (1u64 << 30) as f64;
    let est = f("activation_bytes") + f("step_fixed_bytes");
    assert!(
        (est - peak).abs() < 0.05 * peak,
        "estimated {est:e} B for the step, the run measured {peak:e} B"
    );
    let _ = std::fs::remove_dir_all(&out);

    // A run that would be refused says so in its dry run, and is not refused there.
    let (ok, stdout, err) = carp(&["train", "--dry-run", "--image-size", "100000"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("would be refused"), "{stdout}");
}

#[test]
fn profile_steps_parse_and_validate_without_a_gpu() {
    // Format errors, from the flag's parser.
    for (spec, says) in [
        ("3", "expected A:B"),
        ("x:2", "not a step number"),
        ("0:2", "count from 1"),
        ("5:3", "comes after"),
    ] {
        let (ok, _, err) = carp(&["train", "--profile-steps", spec, "--dry-run"]);
        assert!(!ok && err.contains(says), "{spec}: {err}");
        assert!(err.contains("--profile-steps"), "{spec}: {err}");
    }
    // Beyond the run's steps: refused before the first step.
    let out = tmp("profile");
    let o = out.to_str().unwrap();
    let (ok, _, err) = carp(&[
        "train",
        "--steps",
        "2",
        "--no-eval",
        "--profile-steps",
        "2:3",
        "--out",
        o,
    ]);
    assert!(!ok && err.contains("the run has 2 steps"), "{err}");
    assert!(!out.join("checkpoint.safetensors").exists());
    // Valid on the CPU: the run goes on, without a capture, and says so once.
    let (ok, _, err) = carp(&[
        "train",
        "--steps",
        "2",
        "--batch",
        "16",
        "--no-eval",
        "--profile-steps",
        "2:2",
        "--out",
        o,
    ]);
    assert!(ok, "{err}");
    assert_eq!(err.matches("no CUDA profiler").count(), 1, "{err}");
    // Resuming: steps already taken cannot be profiled.
    let (ok, _, err) = carp(&[
        "train",
        "--steps",
        "3",
        "--batch",
        "16",
        "--no-eval",
        "--resume",
        "--profile-steps",
        "2:3",
        "--out",
        o,
    ]);
    assert!(!ok && err.contains("already taken"), "{err}");
    let _ = std::fs::remove_dir_all(&out);

    // carp-bench counts warm-up and timed steps together.
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
        "1",
        "--device",
        "cpu",
    ];
    let with = |spec: &str| {
        let mut a = small.to_vec();
        a.extend(["--profile-steps", spec]);
        bench(&a)
    };
    let (ok, _, err) = with("2:3");
    assert!(!ok && err.contains("the run has 2 steps"), "{err}");
    let (ok, _, err) = with("2:2");
    assert!(ok && err.contains("no CUDA profiler"), "{err}");
    let (ok, _, err) = with("2-2");
    assert!(!ok && err.contains("expected A:B"), "{err}");
    let (ok, _, err) = bench(&["--loader", "/nonexistent", "--profile-steps", "1:1"]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
}
