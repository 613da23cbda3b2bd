//! Helpers of the integration tests: the source walker of the tests that read the crate's own
//! sources (tests/module_order.rs, tests/run_options.rs) and the small model of the step tests
//! (tests/train_step.rs, tests/data_parallel.rs); `ranks`, the data-parallel runs of
//! tests/data_parallel.rs and tests/gpu_data_parallel.rs. Each test file uses a part of them.
#![allow(dead_code)]

pub mod ranks;

use std::path::{Path, PathBuf};

use carp::nn::head::HeadConfig;
use carp::nn::resnet::{BlockKind, ResNetConfig, Stem};
use carp::nn::ModelConfig;

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

/// A two-stage bottleneck ResNet of width 4 with a 32 / 16 head and 128 prototypes: a CARP step
/// in milliseconds on the CPU.
pub fn small_model() -> ModelConfig {
    ModelConfig {
        arch: "small".into(),
        backbone: ResNetConfig {
            layers: vec![1, 1],
            base_width: 4,
            stem: Stem::Cifar,
            block: BlockKind::Bottleneck,
        },
        head: HeadConfig {
            hidden: 32,
            out: 16,
            prototypes: 128,
        },
    }
}
