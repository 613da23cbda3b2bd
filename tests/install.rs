//! An installed `carp` finds its demo data: `cargo install --root TMP --path .`, then
//! `carp train` in a folder outside the repository, with an empty cache folder.
//!
//! The install builds the release profile into this test build's own target folder (found from
//! the test executable's path, `TARGET/release/deps/install-HASH`), where `cargo test --release`
//! has just built the same crates, so it relinks at most instead of rebuilding everything.
//! `--locked --offline`: the crates of Cargo.lock, already downloaded for this very build.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target folder this test executable was built into.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // TARGET/PROFILE/deps/install-HASH
    exe.ancestors()
        .nth(3)
        .expect("the test executable lies in TARGET/PROFILE/deps")
        .to_path_buf()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("carp-install-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_installed_binary_trains_on_its_embedded_data_from_another_folder() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = tmp("root");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "install",
            "--locked",
            "--offline",
            "--bin",
            "carp",
            "--root",
        ])
        .arg(&root)
        .arg("--path")
        .arg(repo)
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo install failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exe = root.join("bin").join("carp");
    assert!(exe.is_file(), "{} not installed", exe.display());

    // Another folder, and a home with an empty cache: nothing of the repository is reachable
    // by a relative path, and the embedded data must be written out by this run.
    let work = tmp("work");
    let home = tmp("home");
    assert!(!work.join("datasets").exists());
    let out = Command::new(&exe)
        .args([
            "train",
            "--steps",
            "2",
            "--batch",
            "16",
            "--no-eval",
            "--json",
        ])
        .current_dir(&work)
        .env("HOME", &home)
        .env_remove("XDG_CACHE_HOME")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "carp train failed:\n{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("no output")).unwrap();
    assert_eq!(summary["steps"], 2, "{stdout}");
    assert!(summary["loss"].as_f64().unwrap().is_finite());
    // The default run folder is relative to where carp runs, and records the embedded path.
    let config = std::fs::read_to_string(work.join("runs/tiny/config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["data"], "embedded:fashion-mnist-small/train");
    assert!(work.join("runs/tiny/checkpoint.safetensors").is_file());

    // The data went to HOME/.cache/carp and is byte for byte the repository's subset.
    let cache = home.join(".cache/carp");
    let dirs: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    for f in [
        "train/manifest.json",
        "train/shard-00000.bin",
        "test/manifest.json",
        "test/shard-00000.bin",
    ] {
        let want = std::fs::read(repo.join("datasets/fashion-mnist-small").join(f)).unwrap();
        assert!(
            std::fs::read(dirs[0].join(f)).unwrap() == want,
            "{f} differs"
        );
    }
    for d in [root, work, home] {
        let _ = std::fs::remove_dir_all(d);
    }
}
