//! Helpers of the integration tests that read the crate's own sources (tests/module_order.rs,
//! tests/run_options.rs). Each test file uses a part of them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The crate's `src/`.
pub fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every file under `dir` ending in `.rs`, appended to `out`.
pub fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `file`'s path below `src/`, '/'-separated (`ops/conv.rs`).
pub fn src_relative(file: &Path) -> String {
    file.strip_prefix(src_dir())
        .unwrap_or_else(|_| panic!("{} is not under src/", file.display()))
        .to_string_lossy()
        .replace('\\', "/")
}
