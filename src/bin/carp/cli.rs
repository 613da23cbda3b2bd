//! The `carp` command line: every subcommand and flag, as clap definitions. The binary
//! (`src/bin/carp.rs`) runs them; `tests/docs.rs` includes this file too, so the command lines
//! in README.md and docs/ are parsed by the real definitions and `docs/cli.md` is generated
//! from them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use carp::autograd::Precision;

#[derive(Parser)]
#[command(
    name = "carp",
    version,
    about = "Train ResNet50 with CARP (self-supervised), evaluate it, pack datasets",
    long_about = "carp trains a ResNet with the CARP self-supervised method (a student and an EMA \
teacher, a projection head and weight-normalized prototypes, the partitioned consistency + \
uniformity loss, LARS).\n\nStart with `carp train`: with no arguments it trains the small variant \
on the embedded Fashion-MNIST subset and prints the k-NN accuracy of the learned features next \
to that of the same network at random initialization."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Train (or resume) a CARP run.
    Train(Box<TrainArgs>),
    /// Pack an ImageFolder tree or IDX files into carp's shard format.
    Pack(carp::data::PackArgs),
    /// k-NN evaluation of a checkpoint's teacher backbone (or of a random init).
    Knn(KnnArgs),
    /// Linear evaluation of a checkpoint's frozen teacher backbone: the paper's protocol
    /// (augmented training views every epoch), or `--protocol cached` (fast, not the paper's).
    Linear(LinearArgs),
    /// Export the teacher backbone with torchvision's names (safetensors, f32).
    Export(ExportArgs),
    /// Draw a run's loss and k-NN curves into a PNG.
    Plot(PlotArgs),
    /// Print a shell completion script, e.g.
    /// `carp completions bash > ~/.local/share/bash-completion/completions/carp`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Which linear evaluation `carp linear` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// The paper's (appendix C.1): frozen backbone, Linear(D, classes), SGD momentum 0.9,
    /// lr 0.3, batch 256, 100 epochs, cosine; training views RandomResizedCrop + flip (the
    /// frozen forward runs on every epoch's views), validation the evaluation view.
    Paper,
    /// A fast probe on cached evaluation-view features (standardized, no augmentation,
    /// lr 0.1). Not the paper's protocol: a quick look, not a number for its table.
    Cached,
}

#[derive(Args)]
pub struct LinearArgs {
    /// A checkpoint (checkpoint.safetensors of a run folder).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The packed training split.
    #[arg(long)]
    pub data: PathBuf,
    /// The packed evaluation split.
    #[arg(long)]
    pub eval_data: PathBuf,
    /// `paper` (the paper's protocol, the default) or `cached` (a fast probe on cached
    /// features; not the paper's protocol).
    #[arg(long, value_enum, default_value_t = Protocol::Paper)]
    pub protocol: Protocol,
    /// Epochs of SGD.
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    /// Peak learning rate, cosine to 0 (default: 0.3 for `paper`, 0.1 for `cached`, both
    /// at batch 256).
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Side of the views (default: the checkpoint's training size).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// The frozen forward's numerical mode for `paper`: f32 or bf16 (default: bf16 on a GPU,
    /// f32 on the CPU).
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Seeds the epoch orders and the training views (`paper`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Recompute the features even if a cache exists (`cached`).
    #[arg(long)]
    pub no_cache: bool,
    /// auto, cpu, cuda or cuda:N (for the frozen forward).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// The last line printed is one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct PlotArgs {
    /// A run folder (with metrics.jsonl).
    pub run_dir: PathBuf,
    /// Output PNG (default: RUN_DIR/plot.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Start from a preset: `tiny` (the default: small ResNet on the embedded Fashion-MNIST),
    /// `fashion-mnist-resnet18` (ResNet18, CIFAR stem, on the full Fashion-MNIST packed into
    /// fashion-mnist/train and fashion-mnist/test; for a GPU), `imagenet-200ep` (the seed
    /// paper's table 1 run: ResNet50, batch 1024, LARS 0.6 -> 0.06, 200 epochs, bf16) or
    /// `imagenet-200ep-multicrop` (the same with 6 local 96x96 views, the official README's
    /// better row). Explicit flags override preset values; `--dry-run` lists the values that
    /// differ from the paper's and why.
    #[arg(long)]
    pub preset: Option<String>,
    /// Architecture: resnet50, resnet18 (torchvision's, ImageNet stem), resnet18-cifar (3x3/1
    /// stem, no max pool, for 32x32 views) or tiny.
    #[arg(long)]
    pub arch: Option<String>,
    /// Packed training dataset (from `carp pack`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Packed dataset for the k-NN evaluation queries.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Run folder (config.json, checkpoints, metrics.jsonl).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Images per step (each gives two global views, plus --local-crops local ones).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Total optimizer steps (overrides --epochs).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Epochs over the training set.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Side of the square views.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Number of prototypes K.
    #[arg(long)]
    pub k: Option<usize>,
    /// Prototype block size NB (must divide K).
    #[arg(long)]
    pub nb: Option<usize>,
    /// Projection head hidden width.
    #[arg(long)]
    pub head_hidden: Option<usize>,
    /// Embedding size d.
    #[arg(long)]
    pub head_out: Option<usize>,
    /// Base learning rate (cosine to --lr-final).
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long)]
    pub lr_final: Option<f32>,
    /// How --lr becomes the peak learning rate: `none` (the default and the paper's: --lr is
    /// the peak, 0.6 at batch 1024) or `linear` (the official script's rule: --lr x batch /
    /// 256, e.g. its 0.45 gives 1.8 at batch 1024; --lr-final is not scaled).
    #[arg(long, value_enum)]
    pub lr_scaling: Option<carp::train::config::LrScaling>,
    /// Linear warmup steps before the cosine.
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Teacher EMA momentum at the start (cosine to --momentum-end).
    #[arg(long)]
    pub momentum_start: Option<f32>,
    #[arg(long)]
    pub momentum_end: Option<f32>,
    /// Number of global views (always 2: the teacher sees those; see --local-crops).
    #[arg(long)]
    pub views: Option<usize>,
    /// Multi-crop (SPEC.md, beyond the seed paper): this many extra local views per image, for
    /// the student only (SPEC's option: 6). Each is a crop of scale 0.05-0.2, side
    /// --local-size, blurred with p 0.5 when --blur is on. The loss pairs every student view
    /// with the teacher's other global view(s). 0 (the default, and the paper's table 1 run):
    /// two views only.
    #[arg(long)]
    pub local_crops: Option<usize>,
    /// Side of the square local views (default: 96 scaled by --image-size / 224, i.e. 96 at 224
    /// and 14 at 32). Needs --local-crops.
    #[arg(long)]
    pub local_size: Option<usize>,
    /// Numerical mode: f32 (default) or bf16 (SPEC.md's mixed precision: bf16 activations and
    /// matmul/conv operands with f32 accumulation; f32 master weights, BN statistics, loss and
    /// optimizer). On a GPU, bf16 activations are stored in bf16 (convolutions, BN and pooling
    /// have bf16 kernels); on the CPU the same numerics are emulated in f32.
    #[arg(long, value_name = "f32|bf16")]
    pub precision: Option<Precision>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Checkpoint every N steps (and always at the end).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// k-NN evaluation every N steps (0: at the end only).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Loader threads (0: all cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Gaussian blur in the views (on for ImageNet, off for the 32x32 variant).
    #[arg(long)]
    pub blur: Option<bool>,
    /// Minimum random-resized-crop scale.
    #[arg(long)]
    pub min_scale: Option<f32>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many steps in this invocation (checkpointed; continue with --resume).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Print the resolved configuration, parameter counts and memory estimate, then exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Start even when the memory estimate exceeds the memory available (runs that cannot
    /// fit are refused before they start otherwise).
    #[arg(long)]
    pub force: bool,
    /// Open the CUDA profiler's capture range from step A to step B (inclusive, counted from
    /// 1), for `nsys profile --capture-range=cudaProfilerApi` (docs/profiling.md). On the CPU
    /// the run goes on without a capture (a notice says so).
    #[arg(long, value_name = "A:B")]
    pub profile_steps: Option<carp::device::profiler::ProfileSteps>,
    /// Skip the k-NN evaluations.
    #[arg(long)]
    pub no_eval: bool,
    /// The last line printed is one JSON object with the run's summary.
    #[arg(long)]
    pub json: bool,
    /// Testing aid: inject a NaN at this step to exercise the NaN guard.
    #[arg(long, hide = true)]
    pub inject_nan_at_step: Option<usize>,
    #[command(flatten)]
    pub run_options: carp::options::RunOptionArgs,
    #[command(flatten)]
    pub dist: DistArgs,
}

/// Data parallelism: several ranks (processes) share each step, `--batch` being the global
/// batch. Start them with `--nproc-per-node`, with torchrun, or with Slurm's `srun`
/// (docs/multi-gpu.md).
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Data parallel")]
pub struct DistArgs {
    /// Start N worker processes on this machine, one rank each (one GPU each with a CUDA
    /// device, CPU ranks with --device cpu), pass Ctrl-C on to them, and stop them all when
    /// one fails. Without it, a process started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or
    /// srun (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID) is one rank of the run.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Machines in the run (with --nproc-per-node): run the same command on each, with its
    /// own --node-rank and rank 0's machine as --master-addr.
    #[arg(long, default_value_t = 1, value_name = "M")]
    pub nnodes: usize,
    /// This machine's index among the --nnodes machines (0 hosts rank 0).
    #[arg(long, default_value_t = 0, value_name = "R")]
    pub node_rank: usize,
    /// Rank 0's host, which every rank must reach (default: MASTER_ADDR, else 127.0.0.1).
    #[arg(long, value_name = "HOST")]
    pub master_addr: Option<String>,
    /// The TCP port rank 0 listens on (default: MASTER_PORT, else 29500).
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// Seconds the rendezvous waits for every rank, and that a rank may stay silent (no
    /// heartbeat) before the others stop, naming it.
    #[arg(long, default_value_t = carp::train::launch::DEFAULT_DIST_TIMEOUT_S, value_name = "SECS")]
    pub dist_timeout: f64,
}

#[derive(Args)]
pub struct KnnArgs {
    /// A checkpoint (checkpoint.safetensors of a run folder).
    #[arg(long, required_unless_present_any = ["random_init", "raw_pixels"])]
    pub checkpoint: Option<PathBuf>,
    /// Evaluate the architecture at random initialization instead (the baseline).
    #[arg(long, conflicts_with = "checkpoint")]
    pub random_init: bool,
    /// The raw-pixel baseline: the same cosine k-NN on the images themselves (the network's
    /// input view of --image-size, default 32, normalized, flattened) instead of features.
    #[arg(long, conflicts_with_all = ["checkpoint", "random_init"])]
    pub raw_pixels: bool,
    /// Architecture for --random-init: tiny, resnet18-cifar, resnet18 or resnet50.
    #[arg(long, default_value = "tiny")]
    pub arch: String,
    /// Seed for --random-init.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The packed training split (the neighbour bank).
    #[arg(long)]
    pub data: PathBuf,
    /// The packed evaluation split (queries).
    #[arg(long)]
    pub eval_data: PathBuf,
    /// Image side (defaults to the checkpoint's training size, or 32 for a CIFAR-stem arch
    /// (tiny, resnet18-cifar) / 224).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// auto, cpu, cuda or cuda:N (for the feature extraction).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// The last line printed is one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A checkpoint (checkpoint.safetensors of a run folder).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output .safetensors file.
    #[arg(long)]
    pub out: PathBuf,
}
