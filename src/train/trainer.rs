//! The training loop: data → step → metrics → checkpoints → k-NN, top to bottom.

use std::fs::{self, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::bail;
use crate::data::{eval_batches, Dataset, LoaderConfig, LocalViews, TwoViewLoader, ViewConfig};
use crate::device::collective::Collective;
use crate::device::profiler::{ProfileSteps, Profiler};
use crate::device::tcp::{Identity, Rendezvous, TcpGroup};
use crate::error::{Error, Result};
use crate::eval::knn::{knn_top1, l2_normalize_rows, KNN_KS};
use crate::nn::Network;
use crate::optim::schedule::{cosine_lr, teacher_momentum};
use crate::tensor::{Device, Tensor};
use crate::train::checkpoint::{self, CheckpointMeta};
use crate::train::config::TrainConfig;
use crate::train::step::{CarpState, StepStats};
use crate::train::views::{self, crops_to_locals, LoaderBatch};

/// How to run (not part of the model's configuration).
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// Continue from the run folder's last checkpoint.
    pub resume: bool,
    /// Stop (after checkpointing) once this invocation has taken this many steps.
    pub stop_after: Option<usize>,
    /// Skip the k-NN evaluations (random-init baseline and final).
    pub no_eval: bool,
    /// Testing aid: poison the input at this step so the NaN guard fires.
    pub inject_nan_at_step: Option<usize>,
    /// Print nothing but errors (the JSON line still prints when asked).
    pub quiet: bool,
    /// Open the CUDA profiler's capture range around these steps (`--profile-steps A:B`).
    pub profile_steps: Option<ProfileSteps>,
    /// Start even when the memory estimate exceeds the memory available (`--force`).
    pub force: bool,
    /// This process as one rank of a data-parallel run (None: a single process).
    pub dist: Option<DistOptions>,
}

/// One rank of a data-parallel run: where the ranks meet, and which GPU of its machine it
/// takes. `--batch` stays the global batch; each rank steps on batch / world images.
#[derive(Clone, Debug)]
pub struct DistOptions {
    pub rendezvous: Rendezvous,
    /// The rank within its machine: a CUDA rank takes GPU `local_rank`.
    pub local_rank: usize,
}

impl TrainOptions {
    /// The world size of the run (1 without `dist`).
    pub fn world(&self) -> usize {
        self.dist.as_ref().map_or(1, |d| d.rendezvous.world)
    }

    /// This process's rank (0 without `dist`).
    pub fn rank(&self) -> usize {
        self.dist.as_ref().map_or(0, |d| d.rendezvous.rank)
    }
}

/// The summary of a run (the `--json` line).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrainReport {
    pub steps: usize,
    pub total_steps: usize,
    pub loss: f32,
    pub consistency: f32,
    pub entropy: f32,
    pub knn_top1: Option<f64>,
    pub knn_top1_random_init: Option<f64>,
    /// k -> top-1 for the trained teacher.
    pub knn: Vec<(usize, f64)>,
    pub images_per_s: f64,
    pub device: String,
    pub run_dir: PathBuf,
}

/// Resolves `--device` (`auto` takes the first GPU when this build has the `cuda` feature and
/// the machine a GPU; otherwise the CPU). A requested GPU is opened here, so a missing driver or
/// library is reported before any work starts.
pub fn resolve_device(spec: &str) -> Result<Device> {
    let device = Device::parse(spec)?;
    device.open()?;
    Ok(device)
}

/// The view recipe a config asks for.
pub fn view_config(cfg: &TrainConfig) -> ViewConfig {
    let mut v = ViewConfig::imagenet(cfg.image_size);
    v.min_scale = cfg.min_scale;
    if !cfg.blur {
        v.blur_p = [0.0, 0.0];
        // The local views' blur too (SPEC's p 0.5): off wherever the global views' is.
        v.local_blur_p = 0.0;
    }
    v.local_count = cfg.local_crops;
    v.local_size = cfg.local_size;
    v
}

/// One loader batch for the step: the global views (finished by the loader threads, or crops
/// for the GPU finish) and, with multi-crop on the CPU-finish path, the loader's finished local
/// views (on the GPU-finish path the crop batch carries the local crops).
pub struct StepBatch {
    pub globals: LoaderBatch,
    pub locals: Option<LocalViews>,
}

impl StepBatch {
    /// Images in the batch.
    pub fn batch(&self) -> usize {
        self.globals.batch()
    }

    /// The two global views, each (B, 3, S, S), and the local views (L B, 3, s, s) (view-major:
    /// block l is local view l of the whole batch, `train_step_multi`'s layout) on `device`.
    /// `poison` sets the first element of view 1 to NaN (the NaN-guard test hook).
    pub fn to_tensors(
        self,
        cfg: &ViewConfig,
        device: &Device,
        poison: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let locals = match (&self.globals, self.locals) {
            (_, Some(lv)) => Some(
                Tensor::from_vec(lv.views, &[lv.count * lv.batch, 3, lv.size, lv.size])?
                    .to_device(device)?,
            ),
            (LoaderBatch::Crops(c), None) => crops_to_locals(c, cfg, device)?,
            (LoaderBatch::Finished(_), None) => None,
        };
        let (v1, v2) = self.globals.to_views(cfg, device, poison)?;
        Ok((v1, v2, locals))
    }
}

/// The batches of `epoch` from batch `first` on, finished where `views::gpu_aug(device)` says,
/// with the local views when the loader makes them. Without local views this is
/// `views::epoch_batches`. A resume inside an epoch starts at batch `first` without decoding
/// the skipped batches (each image's crops depend only on seed, epoch and index).
pub fn epoch_batches<'a>(
    loader: &'a TwoViewLoader,
    epoch: usize,
    first: usize,
    device: &Device,
) -> Box<dyn Iterator<Item = Result<StepBatch>> + 'a> {
    let wrap = |globals| StepBatch {
        globals,
        locals: None,
    };
    if loader.config().view.local_count == 0 {
        // Crops finished on the GPU (kernels/augment.cu) on CUDA unless --view-finish cpu.
        return Box::new(
            views::epoch_batches(loader, epoch, first, device).map(move |r| r.map(wrap)),
        );
    }
    if views::gpu_aug(device) {
        Box::new(
            loader
                .epoch_crops(epoch, first)
                .map(move |r| r.map(|c| wrap(LoaderBatch::Crops(c)))),
        )
    } else {
        Box::new(loader.epoch_multi(epoch, first).map(|r| {
            r.map(|(b, l)| StepBatch {
                globals: LoaderBatch::Finished(b),
                locals: Some(l),
            })
        }))
    }
}

/// Pooled, L2-normalized backbone features (eval-mode BN) of a whole dataset, in order.
pub fn extract_features(
    net: &Network,
    ds: &Dataset,
    size: usize,
    batch: usize,
    device: &Device,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let (mut feats, labels) = extract_pooled(net, ds, size, batch, device)?;
    l2_normalize_rows(&mut feats, net.cfg.backbone.feature_dim());
    Ok((feats, labels))
}

/// Pooled backbone features (eval-mode BN) of a whole dataset, in order, unnormalized (N, D),
/// with the forward passes on `device`.
pub fn extract_pooled(
    net: &Network,
    ds: &Dataset,
    size: usize,
    batch: usize,
    device: &Device,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let d = net.cfg.backbone.feature_dim();
    let mut feats = Vec::with_capacity(ds.len() * d);
    let mut labels = Vec::with_capacity(ds.len());
    for b in eval_batches(ds, size, batch) {
        let (x, y) = b?;
        let n = y.len();
        let t = Tensor::from_vec(x, &[n, 3, size, size])?.to_device(device)?;
        feats.extend_from_slice(&net.features_eval(&t)?.to_vec()?);
        labels.extend_from_slice(&y);
    }
    Ok((feats, labels))
}

/// k-NN top-1 for every k in `KNN_KS`, with `train_ds` as the bank and `test_ds` as queries.
pub fn knn_eval(
    net: &Network,
    train_ds: &Dataset,
    test_ds: &Dataset,
    size: usize,
    device: &Device,
) -> Result<Vec<(usize, f64)>> {
    let d = net.cfg.backbone.feature_dim();
    let (trf, trl) = extract_features(net, train_ds, size, 256, device)?;
    let (tef, tel) = extract_features(net, test_ds, size, 256, device)?;
    let classes = train_ds.num_classes().max(test_ds.num_classes());
    let acc = knn_top1(&trf, &trl, &tef, &tel, d, classes, &KNN_KS)?;
    Ok(KNN_KS.iter().copied().zip(acc).collect())
}

/// The raw-pixel baseline: k-NN top-1 for every k in `KNN_KS` with each image's evaluation view
/// itself as its feature (the network's input: resized and centre-cropped to `size`,
/// normalized with the ImageNet mean and std, (3 * size * size) values), L2-normalized, the
/// same cosine k-NN as [`knn_eval`]. A learned representation should beat it.
pub fn knn_eval_raw_pixels(
    train_ds: &Dataset,
    test_ds: &Dataset,
    size: usize,
) -> Result<Vec<(usize, f64)>> {
    let d = 3 * size * size;
    let raw = |ds: &Dataset| -> Result<(Vec<f32>, Vec<u32>)> {
        let mut feats = Vec::with_capacity(ds.len() * d); // (N, 3 * size * size)
        let mut labels = Vec::with_capacity(ds.len());
        for b in eval_batches(ds, size, 256) {
            let (x, y) = b?;
            feats.extend_from_slice(&x);
            labels.extend_from_slice(&y);
        }
        l2_normalize_rows(&mut feats, d);
        Ok((feats, labels))
    };
    let (trf, trl) = raw(train_ds)?;
    let (tef, tel) = raw(test_ds)?;
    let classes = train_ds.num_classes().max(test_ds.num_classes());
    let acc = knn_top1(&trf, &trl, &tef, &tel, d, classes, &KNN_KS)?;
    Ok(KNN_KS.iter().copied().zip(acc).collect())
}

fn top1_k20(knn: &[(usize, f64)]) -> Option<f64> {
    knn.iter().find(|(k, _)| *k == 20).map(|(_, a)| *a)
}

/// metrics.jsonl, written by rank 0 only (the other ranks' `file` is None).
struct Metrics {
    file: Option<fs::File>,
    path: PathBuf,
}

impl Metrics {
    fn open(run_dir: &Path, lead: bool) -> Result<Metrics> {
        let path = run_dir.join("metrics.jsonl");
        if !lead {
            return Ok(Metrics { file: None, path });
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Metrics {
            file: Some(file),
            path,
        })
    }
    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        match &mut self.file {
            Some(f) => writeln!(f, "{v}").map_err(|e| Error::io(&self.path, e)),
            None => Ok(()),
        }
    }
}

/// What `--resume` reports about the run options: each one that differs from those the
/// checkpoint's run recorded, or that it recorded none (a checkpoint from before run options).
fn run_option_changes(checkpoint_config: &str, now: &crate::options::RunOptions) -> Vec<String> {
    let recorded = serde_json::from_str::<serde_json::Value>(checkpoint_config)
        .ok()
        .and_then(|v| v.get("run_options").cloned());
    let Some(recorded) = recorded else {
        return vec![format!(
            "the checkpoint records no run options (an older carp); this invocation uses {}",
            now.summary()
        )];
    };
    match crate::options::from_recorded(&recorded) {
        Err(e) => vec![format!("{e}; this invocation uses {}", now.summary())],
        Ok(before) => now
            .changes_from(&before)
            .into_iter()
            .chain(crate::options::retired_changes(&recorded))
            .map(|c| format!("run option changed since the checkpoint: {c}"))
            .collect(),
    }
}

fn open_dataset(path: &Path, what: &str) -> Result<Dataset> {
    Dataset::open(path).map_err(|e| {
        Error::Msg(format!(
            "cannot open the {what} dataset {}: {e}\n(make one with `carp pack`, or pass --data)",
            path.display()
        ))
    })
}

/// Runs (or resumes) a training run as configured; returns its summary.
pub fn train(cfg: &TrainConfig, opts: &TrainOptions) -> Result<TrainReport> {
    let run = open_run(cfg, opts)?;
    let report = run_phases(&run);
    if let (Err(e), Some(c)) = (&report, &run.comm) {
        // The other ranks stop with this rank's reason instead of waiting for it.
        c.abort(&e.to_string());
    }
    report
}

fn run_phases(run: &Run) -> Result<TrainReport> {
    let data = build_loaders(run)?;
    let (mut state, mut metrics) = resume_or_start(run, &data)?;
    let knn_random = evaluate_random_init(run, &data, &state, &mut metrics)?;
    let totals = epoch_loop(run, &data, &mut state, &mut metrics)?;
    save_final_checkpoint(run, &data, &mut state)?;
    let knn = evaluate_final(run, &data, &state, &mut metrics)?;
    if let Some(c) = &run.comm {
        // Every rank ends once rank 0 has written the final checkpoint and evaluated.
        c.barrier()?;
    }
    Ok(close(run, &data, &state, totals, knn, knn_random))
}

/// What every phase of a run reads: its configuration, how it runs, its device and folder, and
/// (data-parallel) its rank's place and collective.
struct Run<'a> {
    cfg: &'a TrainConfig,
    opts: &'a TrainOptions,
    device: Device,
    run_dir: PathBuf,
    rank: usize,
    world: usize,
    /// The other ranks (None: a single process).
    comm: Option<Arc<dyn Collective>>,
}

impl Run<'_> {
    /// A line for the user on stderr, unless `--quiet`; rank 0 speaks for the run.
    fn say(&self, s: String) {
        if !self.opts.quiet && self.lead() {
            eprintln!("{s}");
        }
    }

    /// Rank 0, which owns the run folder: checkpoints, metrics, progress and evaluation.
    fn lead(&self) -> bool {
        self.rank == 0
    }
}

/// What the ranks of a run must agree on: the configuration and every option that changes
/// what runs.
fn identity(cfg: &TrainConfig, opts: &TrainOptions) -> Result<Identity> {
    let mut config = serde_json::to_value(cfg).map_err(|e| Error::Msg(e.to_string()))?;
    if let serde_json::Value::Object(m) = &mut config {
        m.insert("resume".into(), opts.resume.into());
        m.insert("stop_after".into(), serde_json::json!(opts.stop_after));
        m.insert("no_eval".into(), opts.no_eval.into());
        m.insert(
            "inject_nan_at_step".into(),
            serde_json::json!(opts.inject_nan_at_step),
        );
        m.insert(
            "profile_steps".into(),
            format!("{:?}", opts.profile_steps).into(),
        );
        m.insert("force".into(), opts.force.into());
    }
    Ok(Identity {
        config,
        binary: crate::train::launch::binary_identity()?,
    })
}

/// Joins the other ranks of a data-parallel run (before anything is written): the rendezvous
/// checks that they run this binary with this configuration.
fn join_world(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    device: &Device,
) -> Result<Option<Arc<dyn Collective>>> {
    let Some(d) = opts.dist.as_ref().filter(|d| d.rendezvous.world > 1) else {
        return Ok(None);
    };
    // The TCP group is the run's control plane (rendezvous, heartbeats, SyncBN's and the
    // loss's small sums); on GPUs the gradient average goes over NCCL.
    let control: Arc<dyn Collective> =
        Arc::new(TcpGroup::join(&d.rendezvous, &identity(cfg, opts)?)?);
    crate::device::rank_collective(control, device).map(Some)
}

/// Validates the configuration, installs its run options, opens the device, refuses a run that
/// cannot fit in memory and creates the run folder.
fn open_run<'a>(cfg: &'a TrainConfig, opts: &'a TrainOptions) -> Result<Run<'a>> {
    cfg.validate()?;
    let (rank, world) = (opts.rank(), opts.world());
    crate::train::launch::check_batch_divides(cfg.batch, world)?;
    // Everything built and run from here on (the memory probe too) follows the run's recorded
    // options.
    crate::options::install(cfg.run_options);
    let device = match (Device::parse(&cfg.device)?, &opts.dist) {
        // One GPU per rank of a machine (opened only there: no rank touches another's GPU).
        (Device::Cuda(_), Some(d)) if world > 1 => Device::Cuda(d.local_rank),
        (device, _) => device,
    };
    device.open()?;
    let comm = join_world(cfg, opts, &device)?;
    let run = Run {
        cfg,
        opts,
        device,
        run_dir: cfg.out.clone(),
        rank,
        world,
        comm,
    };
    // Before anything big is allocated: a run that cannot fit is refused here (each rank
    // holds its share of the batch).
    let mut per_rank = cfg.clone();
    per_rank.batch = cfg.batch / world;
    let mem = crate::train::memory::estimate(&per_rank, &run.device)?;
    if let Some(warning) = crate::train::memory::check(&mem, opts.force)? {
        run.say(warning);
    }
    if cfg.run_options != crate::options::RunOptions::DEFAULT {
        run.say(format!(
            "run options (not all defaults): {}",
            cfg.run_options.summary()
        ));
    }
    if run.lead() {
        fs::create_dir_all(&run.run_dir).map_err(|e| Error::io(&run.run_dir, e))?;
    }
    Ok(run)
}

/// The datasets, the training loader and the step count they give.
struct Data {
    train_ds: Arc<Dataset>,
    /// None with `--no-eval` or no evaluation set.
    eval_ds: Option<Dataset>,
    view: ViewConfig,
    loader: TwoViewLoader,
    /// Batches per epoch.
    bpe: usize,
    /// Total optimizer steps of the run.
    total: usize,
    /// The configuration as config.json and every checkpoint record it.
    config_json: String,
}

impl Data {
    /// The checkpoint record of step `step`.
    fn meta_at(&self, step: usize) -> CheckpointMeta {
        CheckpointMeta {
            step,
            epoch: step / self.bpe,
            config_json: self.config_json.clone(),
        }
    }
}

/// Opens the datasets and builds the training loader; the run's total step count follows.
fn build_loaders(run: &Run) -> Result<Data> {
    let (cfg, opts) = (run.cfg, run.opts);
    let train_ds = Arc::new(open_dataset(&cfg.data, "training")?);
    // Rank 0 evaluates for the run.
    let eval_ds = match &cfg.eval_data {
        Some(p) if !opts.no_eval && run.lead() => Some(open_dataset(p, "evaluation")?),
        _ => None,
    };
    let view = view_config(cfg);
    let loader = TwoViewLoader::new(
        train_ds.clone(),
        LoaderConfig {
            // Each rank's share of the global batch: its slices of every global batch, so any
            // world size steps on the same images (each image's views depend only on the
            // seed, the epoch and its index).
            batch: cfg.batch / run.world,
            seed: cfg.seed,
            rank: run.rank,
            world: run.world,
            workers: cfg.workers,
            prefetch: 4,
            drop_last: true,
            view: view.clone(),
        },
    )?;
    let bpe = loader.batches_per_epoch();
    if bpe == 0 {
        bail!(
            Config,
            "the dataset {} has {} images, fewer than one batch of {}",
            cfg.data.display(),
            train_ds.len(),
            cfg.batch
        );
    }
    let total = cfg.total_steps(bpe)?;
    if let Some(p) = &opts.profile_steps {
        p.validate(0, total)?;
    }
    let config_json = serde_json::to_string_pretty(cfg).map_err(|e| Error::Msg(e.to_string()))?;
    Ok(Data {
        train_ds,
        eval_ds,
        view,
        loader,
        bpe,
        total,
        config_json,
    })
}

/// The training state, fresh or (`--resume`) from the run folder's last checkpoint, and the
/// metrics file with this invocation's first record; says what is about to run.
fn resume_or_start(run: &Run, data: &Data) -> Result<(CarpState, Metrics)> {
    let cfg = run.cfg;
    let mut state = CarpState::new(&cfg.model, cfg.nb, cfg.weight_decay, cfg.seed)?;
    state.precision = cfg.precision;
    if let Some(c) = &run.comm {
        state = state.with_collective(c.clone());
    }
    let mut metrics = Metrics::open(&run.run_dir, run.lead())?;
    if run.opts.resume {
        resume(run, data, &mut state)?;
    } else if run.lead() {
        if run.run_dir.join(checkpoint::LATEST).exists() {
            bail!(
                Config,
                "{} already holds a run: pass --resume to continue it, or choose another --out",
                run.run_dir.display()
            );
        }
        checkpoint::write_atomic(
            &run.run_dir.join("config.json"),
            data.config_json.as_bytes(),
        )?;
    }
    agree_on_step(run, state.step)?;
    let (backbone, head, protos) = state.student.param_counts();
    let ranks = if run.world > 1 {
        format!(
            " ({} per rank on {} ranks, {})",
            cfg.batch / run.world,
            run.world,
            run.device
        )
    } else {
        String::new()
    };
    run.say(format!(
        "carp: {} ({backbone} backbone + {head} head + {protos} prototype parameters) on {}, {} images, batch {}{ranks}, {} steps ({} per epoch)",
        cfg.model.arch,
        run.device,
        data.train_ds.len(),
        cfg.batch,
        data.total,
        data.bpe
    ));
    if cfg.local_crops > 0 {
        run.say(format!(
            "multi-crop: 2 global views of {0}x{0} + {1} local views of {2}x{2} per image (local views for the student only)",
            cfg.image_size, cfg.local_crops, cfg.local_size
        ));
    }

    // Each invocation's first record says how it runs (a fresh run's first line).
    metrics.write(serde_json::json!({
        "type": "run", "step": state.step, "resume": run.opts.resume,
        "device": run.device.to_string(), "precision": cfg.precision,
        "run_options": cfg.run_options, "world_size": run.world,
    }))?;
    Ok((state, metrics))
}

/// Every rank starts from the same step (they read the same checkpoint). Also the point where
/// the other ranks learn that rank 0 refused the run folder.
fn agree_on_step(run: &Run, step: usize) -> Result<()> {
    let Some(c) = &run.comm else {
        return Ok(());
    };
    let steps = c.all_gather_f64(&[step as f64])?;
    if let Some(r) = steps.iter().position(|&s| s != steps[0]) {
        bail!(
            Config,
            "rank {r} starts at step {} but rank 0 at step {}: the ranks read different run \
             folders (with several machines, --out must be on a shared filesystem)",
            steps[r],
            steps[0]
        );
    }
    Ok(())
}

/// Loads the run folder's last checkpoint into `state`, refusing one made with another model,
/// seed, batch, NB or local crops; reports the run options that changed since.
fn resume(run: &Run, data: &Data, state: &mut CarpState) -> Result<()> {
    let cfg = run.cfg;
    let (path, meta, warnings) = checkpoint::load_latest(&run.run_dir, state).map_err(|e| {
        if run.lead() {
            e
        } else {
            Error::Msg(format!(
                "rank {} cannot resume from rank 0's run folder: {e} (with several machines, \
                 --out must be on a shared filesystem)",
                run.rank
            ))
        }
    })?;
    for w in warnings {
        run.say(format!("warning: {w}"));
    }
    let saved: TrainConfig = serde_json::from_str(&meta.config_json)
        .map_err(|e| Error::format(&path, format!("bad config in checkpoint: {e}")))?;
    if saved.model != cfg.model
        || saved.nb != cfg.nb
        || saved.seed != cfg.seed
        || saved.batch != cfg.batch
        || saved.local_crops != cfg.local_crops
        || (cfg.local_crops > 0 && saved.local_size != cfg.local_size)
    {
        bail!(
            Config,
            "--resume: the checkpoint {} was made with another model/seed/batch/NB/local crops; resume with the run's own config.json",
            path.display()
        );
    }
    run.say(format!(
        "resumed from {} at step {}",
        path.display(),
        state.step
    ));
    for change in run_option_changes(&meta.config_json, &cfg.run_options) {
        run.say(format!("note: {change}"));
    }
    if let Some(p) = &run.opts.profile_steps {
        p.validate(state.step, data.total)?;
    }
    Ok(())
}

/// The baseline: k-NN top-1 (k = 20) of the same network (same seed) at random
/// initialization; None without an evaluation set.
fn evaluate_random_init(
    run: &Run,
    data: &Data,
    state: &CarpState,
    metrics: &mut Metrics,
) -> Result<Option<f64>> {
    let Some(eval_ds) = &data.eval_ds else {
        return Ok(None);
    };
    let cfg = run.cfg;
    // A fresh run's student is still its initialization; a resumed one rebuilds it.
    let rebuilt;
    let init = if run.opts.resume {
        rebuilt = Network::new(&cfg.model, cfg.seed)?;
        &rebuilt
    } else {
        &state.student
    };
    let r = knn_eval(init, &data.train_ds, eval_ds, cfg.image_size, &run.device)?;
    run.say(format!(
        "k-NN at random init: top-1 {:.2}% (k=20)",
        100.0 * top1_k20(&r).unwrap_or(0.0)
    ));
    if !run.opts.resume {
        // The teacher starts as this very network, so this is the curve's step-0 point.
        metrics.write(serde_json::json!({"type": "knn", "step": 0, "top1": r}))?;
    }
    Ok(top1_k20(&r))
}

/// What the epoch loop hands the report: the last step's statistics and the throughput.
#[derive(Default)]
struct LoopTotals {
    last: StepStats,
    train_secs: f64,
    images: usize,
}

/// The steps from the state's step to the run's end (or `--stop-after`), epoch by epoch:
/// each step logged to metrics.jsonl, checkpointed and evaluated on its schedule.
fn epoch_loop(
    run: &Run,
    data: &Data,
    state: &mut CarpState,
    metrics: &mut Metrics,
) -> Result<LoopTotals> {
    let (cfg, opts, total) = (run.cfg, run.opts, data.total);
    let pb = progress_bar(opts.quiet || !run.lead(), total, state.step)?;
    run.say(format!(
        "views finished on the {}",
        views::finish_path(&run.device)
    ));
    let mut profiler = Profiler::new(opts.profile_steps, &run.device)?;
    if let Some(n) = profiler.notice() {
        run.say(n);
    }
    let start_step = state.step;
    let mut totals = LoopTotals::default();
    'outer: while state.step < total {
        let epoch = state.step / data.bpe;
        let done_in_epoch = state.step % data.bpe;
        for batch in epoch_batches(&data.loader, epoch, done_in_epoch, &run.device) {
            if state.step >= total
                || opts
                    .stop_after
                    .is_some_and(|s| state.step - start_step >= s)
            {
                break 'outer;
            }
            let batch = batch?;
            // Steps count from 1 in the logs and in --profile-steps.
            profiler.before_step(state.step + 1)?;
            let t0 = Instant::now();
            let n = batch.batch();
            let poison = opts.inject_nan_at_step == Some(state.step);
            // locals: (L B, 3, s, s) with multi-crop.
            let (v1, v2, locals) = batch.to_tensors(&data.view, &run.device, poison)?;
            let lr = cosine_lr(
                state.step,
                total,
                cfg.warmup_steps,
                cfg.peak_lr(),
                cfg.lr_final,
            );
            let m = teacher_momentum(state.step, total, cfg.momentum_start, cfg.momentum_end);
            let stats = match state.train_step_multi(&v1, &v2, locals.as_ref(), lr, m) {
                Ok(s) => s,
                Err(e) => {
                    pb.abandon();
                    let msg = format!(
                        "{e}\nthe run stopped; the last good checkpoint in {} is untouched",
                        run.run_dir.display()
                    );
                    return Err(match e {
                        Error::Peer(_) => Error::Peer(msg),
                        _ => Error::Msg(msg),
                    });
                }
            };
            let dt = t0.elapsed().as_secs_f64();
            profiler.after_step(state.step)?;
            // The whole run's images: every rank steps on n.
            let n = n * run.world;
            totals.train_secs += dt;
            totals.images += n;
            totals.last = stats;
            log_step(
                run,
                data,
                state.step,
                epoch,
                &stats,
                n as f64 / dt,
                &pb,
                metrics,
            )?;
            after_step(run, data, state, metrics)?;
        }
    }
    pb.finish_and_clear();
    Ok(totals)
}

/// The progress bar on a terminal (hidden otherwise, or with `--quiet`), at step `step`.
fn progress_bar(quiet: bool, total: usize, step: usize) -> Result<ProgressBar> {
    let pb = if quiet || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total as u64)
    };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | ETA {eta}")
            .map_err(|e| Error::Msg(e.to_string()))?,
    );
    pb.set_position(step as u64);
    Ok(pb)
}

/// One step's record in metrics.jsonl, on the progress bar, and (without a bar) on stderr
/// twenty times a run.
#[allow(clippy::too_many_arguments)] // the step's numbers and the three places they go
fn log_step(
    run: &Run,
    data: &Data,
    step: usize,
    epoch: usize,
    stats: &StepStats,
    ips: f64,
    pb: &ProgressBar,
    metrics: &mut Metrics,
) -> Result<()> {
    let total = data.total;
    // For choosing a batch size: what live tensors needed at once so far.
    let peak_gib = crate::tensor::peak_live_bytes(&run.device)? as f64 / (1u64 << 30) as f64;
    metrics.write(serde_json::json!({
        "type": "step", "step": step, "epoch": epoch, "loss": stats.loss,
        "consistency": stats.consistency, "entropy": stats.entropy, "lr": stats.lr,
        "teacher_momentum": stats.momentum, "images_per_s": ips,
        "peak_live_gib": peak_gib,
    }))?;
    pb.set_position(step as u64);
    pb.set_message(format!(
        "loss {:.4} (H {:.4}) | {:.0} img/s | peak {:.2} GiB",
        stats.loss, stats.entropy, ips, peak_gib
    ));
    let log_every = (total / 20).max(1);
    if pb.is_hidden()
        && !run.opts.quiet
        && run.lead()
        && (step.is_multiple_of(log_every) || step == total)
    {
        eprintln!(
            "step {step}/{total}: loss {:.4} consistency {:.4} entropy {:.4} lr {:.4} m {:.5} {:.0} img/s, peak {:.2} GiB",
            stats.loss, stats.consistency, stats.entropy, stats.lr, stats.momentum, ips, peak_gib
        );
    }
    Ok(())
}

/// The checkpoint and the k-NN evaluation a step is due (`--checkpoint-every`,
/// `--eval-every`; the last step's are the run's close).
fn after_step(run: &Run, data: &Data, state: &mut CarpState, metrics: &mut Metrics) -> Result<()> {
    let cfg = run.cfg;
    if run.lead() && cfg.checkpoint_every > 0 && state.step.is_multiple_of(cfg.checkpoint_every) {
        let meta = data.meta_at(state.step);
        state.move_to_host()?; // the file is made of the host stores
        checkpoint::save(&run.run_dir, state, &meta)?;
    }
    if let (Some(eval_ds), true) = (
        &data.eval_ds,
        cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every) && state.step < data.total,
    ) {
        state.move_to_host()?; // k-NN reads the teacher's host stores
        let r = knn_eval(
            &state.teacher,
            &data.train_ds,
            eval_ds,
            cfg.image_size,
            &run.device,
        )?;
        metrics.write(serde_json::json!({"type": "knn", "step": state.step, "top1": r}))?;
    }
    Ok(())
}

/// The checkpoint of the step the loop stopped at (the end, or `--stop-after`).
fn save_final_checkpoint(run: &Run, data: &Data, state: &mut CarpState) -> Result<()> {
    if !run.lead() {
        return Ok(());
    }
    let meta = data.meta_at(state.step);
    // Checkpoint and the final k-NN below read the host stores.
    state.move_to_host()?;
    let ckpt = checkpoint::save(&run.run_dir, state, &meta)?;
    run.say(format!("checkpoint: {}", ckpt.display()));
    Ok(())
}

/// k-NN top-1 for every k of the trained teacher, once the run is complete (empty without an
/// evaluation set or when `--stop-after` stopped it early).
fn evaluate_final(
    run: &Run,
    data: &Data,
    state: &CarpState,
    metrics: &mut Metrics,
) -> Result<Vec<(usize, f64)>> {
    let mut knn = Vec::new();
    if let Some(eval_ds) = &data.eval_ds {
        if state.step >= data.total {
            knn = knn_eval(
                &state.teacher,
                &data.train_ds,
                eval_ds,
                run.cfg.image_size,
                &run.device,
            )?;
            metrics.write(serde_json::json!({"type": "knn", "step": state.step, "top1": knn}))?;
        }
    }
    Ok(knn)
}

/// The run's summary, and the trained-vs-random k-NN line when both were measured.
fn close(
    run: &Run,
    data: &Data,
    state: &CarpState,
    totals: LoopTotals,
    knn: Vec<(usize, f64)>,
    knn_random: Option<f64>,
) -> TrainReport {
    let LoopTotals {
        last,
        train_secs,
        images,
    } = totals;
    let report = TrainReport {
        steps: state.step,
        total_steps: data.total,
        loss: last.loss,
        consistency: last.consistency,
        entropy: last.entropy,
        knn_top1: top1_k20(&knn),
        knn_top1_random_init: knn_random,
        knn,
        images_per_s: if train_secs > 0.0 {
            images as f64 / train_secs
        } else {
            0.0
        },
        device: run.device.to_string(),
        run_dir: run.run_dir.clone(),
    };
    if let (Some(a), Some(b)) = (report.knn_top1, report.knn_top1_random_init) {
        run.say(format!(
            "k-NN top-1 (k=20): {:.2}% trained vs {:.2}% at random init ({:+.2} points)",
            100.0 * a,
            100.0 * b,
            100.0 * (a - b)
        ));
    }
    report
}
