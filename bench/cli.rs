//! The `carp-bench` command line as clap definitions. `bench/main.rs` runs them; `tests/docs.rs`
//! includes this file too, so the `carp-bench` command lines in README.md and docs/ are parsed by
//! the real definitions and `docs/cli.md` is generated from them.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Clone)]
#[command(
    name = "carp-bench",
    version,
    about = "Benchmark one CARP training configuration",
    long_about = "Measures one CARP training step (teacher forward, student forward, loss, backward, \
LARS, EMA) on synthetic inputs: warm-up steps, then the median of timed steps, with a per-phase \
breakdown and peak memory. `--loader DIR` measures the data pipeline alone; `--data DIR` the \
loader feeding the step. The defaults are the paper's per-GPU configuration (ResNet50, batch 256, \
2 views of 224x224, K 65536, NB 512); on a CPU use a small one, e.g. `--arch tiny --batch 32 \
--image-size 32 --k 1024 --nb 64`. `--local-crops L` adds multi-crop local views (student only)."
)]
pub struct Args {
    /// resnet50, resnet18, resnet18-cifar or tiny.
    #[arg(long, default_value = "resnet50")]
    pub arch: String,
    /// Images per step (each gives two global views, plus --local-crops local ones).
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Multi-crop: local views per image for the student (SPEC's option: 6; 0: none).
    #[arg(long, default_value_t = 0)]
    pub local_crops: usize,
    /// Side of the local views (default: 96 scaled by --image-size / 224).
    #[arg(long)]
    pub local_size: Option<usize>,
    /// Prototypes K.
    #[arg(long, default_value_t = 65536)]
    pub k: usize,
    /// Block size NB.
    #[arg(long, default_value_t = 512)]
    pub nb: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Measure the data loader alone on this packed dataset (two-view images/s).
    #[arg(long, conflicts_with = "data")]
    pub loader: Option<PathBuf>,
    /// Measure end to end: this packed dataset's loader feeding the training step.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// With --loader DIR: first write an ImageNet-like packed set of this many JPEGs into
    /// DIR (DIR/packed; natural photos rescaled to ImageNet's sizes, ~0.6 B/px), then measure it.
    #[arg(long, requires = "loader")]
    pub make_imagenet_like: Option<usize>,
    /// With --make-imagenet-like: pack with this --max-side (longer side, re-encoded JPEG).
    #[arg(long, requires = "make_imagenet_like")]
    pub max_side: Option<u32>,
    /// Loader threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Numerical mode of the step: f32 or bf16 (bf16 storage on a GPU, emulated on the CPU).
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    pub precision: carp::autograd::Precision,
    /// Print one JSON line at the end.
    #[arg(long)]
    pub json: bool,
    /// GPU: no per-phase synchronization (as in training; the same as `--phase-sync off`): the
    /// step only queues work and waits once at its end, so the step time shows what the waits
    /// between phases cost; the phase rows are then the host's queuing times, and "gpu step"
    /// the GPU time between one CUDA event pair around the step.
    #[arg(long, conflicts_with = "phase_sync")]
    pub no_phase_sync: bool,
    /// Open the CUDA profiler's capture range from step A to step B (inclusive, counted from
    /// 1 over warm-up and timed steps, as the log prints them), for `nsys profile
    /// --capture-range=cudaProfilerApi`: e.g. `--warmup 2 --steps 3 --profile-steps 3:5`
    /// records the timed steps only. On the CPU the run goes on without a capture.
    #[arg(long, value_name = "A:B", conflicts_with = "loader")]
    pub profile_steps: Option<carp::device::profiler::ProfileSteps>,
    /// Data parallel: N ranks (threads over the TCP transport, `--batch` images each) against
    /// one rank in the same run: per-rank images/s, efficiency, and the collectives' calls,
    /// values and time per step (the gradient all-reduce apart from SyncBN's and the loss's).
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    #[command(flatten)]
    pub run_options: carp::options::RunOptionArgs,
}
