//! The carp CLI: train, evaluate, export, pack data.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use carp::autograd::Precision;
use carp::nn::{ModelConfig, Network};
use carp::train::checkpoint;
use carp::train::config::TrainConfig;
use carp::train::launch;
use carp::train::step::CarpState;
use carp::train::trainer::{self, DistOptions, TrainOptions};
use carp::{Error, Result};

#[path = "carp/cli.rs"]
mod cli;
use cli::{Cli, Cmd, DistArgs, KnnArgs, LinearArgs, Protocol, TrainArgs};

/// Features of one split, cached next to the checkpoint and keyed by the checkpoint's CRC and
/// the dataset's manifest, so a stale cache is never used.
fn cached_features(
    ckpt: &std::path::Path,
    crc: &str,
    net: &Network,
    data: &std::path::Path,
    size: usize,
    no_cache: bool,
    device: &carp::Device,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let dir = carp::data::embedded::resolve(data)?;
    let manifest = std::fs::read(dir.join("manifest.json")).map_err(|e| Error::io(&*dir, e))?;
    let key = format!("{crc}-{:08x}-{size}", crc32fast::hash(&manifest));
    let split = data.file_name().and_then(|s| s.to_str()).unwrap_or("data");
    let cache = ckpt.with_extension(format!("features-{split}.bin"));
    if !no_cache {
        if let Ok(bytes) = std::fs::read(&cache) {
            if let Some(v) = parse_cache(&bytes, &key) {
                eprintln!("features: using the cache {}", cache.display());
                return Ok(v);
            }
        }
    }
    eprintln!("features: extracting {} ...", data.display());
    let ds = carp::data::Dataset::open(data)?;
    let (f, l) = trainer::extract_pooled(net, &ds, size, 256, device)?;
    let mut out = Vec::new();
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&(l.len() as u64).to_le_bytes());
    out.extend_from_slice(bytemuck::cast_slice(&l));
    out.extend_from_slice(bytemuck::cast_slice(&f));
    checkpoint::write_atomic(&cache, &out)?;
    Ok((f, l))
}

/// Reads a feature cache written by `cached_features`; `None` if it is stale or malformed.
fn parse_cache(b: &[u8], key: &str) -> Option<(Vec<f32>, Vec<u32>)> {
    let kl = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?) as usize;
    if b.get(4..4 + kl)? != key.as_bytes() {
        return None;
    }
    let mut o = 4 + kl;
    let n = u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?) as usize;
    o += 8;
    let lb = b.get(o..o + 4 * n)?;
    let labels: Vec<u32> = lb
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    o += 4 * n;
    let rest = b.get(o..)?;
    if n == 0 || rest.len() % (4 * n) != 0 {
        return None;
    }
    let f = rest
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some((f, labels))
}

impl TrainArgs {
    fn resolve(&self) -> Result<TrainConfig> {
        let mut c = TrainConfig::preset(self.preset.as_deref().unwrap_or("tiny"))?;
        if let Some(a) = &self.arch {
            let m = ModelConfig::named(a)?;
            // A different arch brings its own head sizes and view size unless given explicitly
            // below.
            if m.arch != c.model.arch {
                c.image_size = m.default_image_size();
                c.model = m;
            }
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
            batch,
            image_size,
            nb,
            lr,
            lr_final,
            lr_scaling,
            warmup_steps,
            weight_decay,
            momentum_start,
            momentum_end,
            views,
            seed,
            device,
            checkpoint_every,
            eval_every,
            workers,
            blur,
            min_scale,
            local_crops,
            precision,
            out,
            data
        );
        // The local views follow the global size unless given.
        c.local_size = match self.local_size {
            Some(s) => {
                if c.local_crops == 0 {
                    return Err(Error::Config(format!(
                        "--local-size {s} without local views: add --local-crops L (e.g. 6)"
                    )));
                }
                s
            }
            None => carp::train::config::default_local_size(c.image_size),
        };
        if self.eval_data.is_some() {
            c.eval_data = self.eval_data.clone();
        }
        if let Some(s) = self.steps {
            c.steps = Some(s);
        }
        if let Some(e) = self.epochs {
            c.epochs = Some(e);
            if self.steps.is_none() {
                c.steps = None;
            }
        }
        if let Some(k) = self.k {
            c.model.head.prototypes = k;
        }
        if let Some(h) = self.head_hidden {
            c.model.head.hidden = h;
        }
        if let Some(d) = self.head_out {
            c.model.head.out = d;
        }
        c.run_options = self.run_options.resolve_over(c.run_options)?;
        c.validate()?;
        Ok(c)
    }
}

/// Rebuilds a training state from a checkpoint file's embedded config and loads it.
/// Also returns the checkpoint's CRC (the key of the feature cache).
fn load_checkpoint(path: &std::path::Path) -> Result<(TrainConfig, CarpState, String)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(path, format!("not a carp checkpoint: {e}")))?;
    let meta = header.metadata().as_ref();
    let cfg_json = meta
        .and_then(|m| m.get("config").cloned())
        .ok_or_else(|| Error::format(path, "not a carp checkpoint (no config)"))?;
    let crc = meta
        .and_then(|m| m.get("crc32").cloned())
        .unwrap_or_default();
    let cfg: TrainConfig = serde_json::from_str(&cfg_json)
        .map_err(|e| Error::format(path, format!("bad config in checkpoint: {e}")))?;
    let mut state = CarpState::new(&cfg.model, cfg.nb, cfg.weight_decay, cfg.seed)?;
    checkpoint::from_bytes(&bytes, path, &mut state)?;
    Ok((cfg, state, crc))
}

/// `carp knn` on a network's features: a checkpoint's teacher or a random init.
fn knn_of_network(args: &KnnArgs) -> Result<Vec<(usize, f64)>> {
    let (net, size) = if args.random_init {
        let m = ModelConfig::named(&args.arch)?;
        let size = args.image_size.unwrap_or(m.default_image_size());
        (Network::new(&m, args.seed)?, size)
    } else {
        let path = args
            .checkpoint
            .as_ref()
            .ok_or_else(|| Error::Config("give --checkpoint or --random-init".into()))?;
        let (cfg, state, _) = load_checkpoint(path)?;
        (state.teacher, args.image_size.unwrap_or(cfg.image_size))
    };
    let train_ds = carp::data::Dataset::open(&args.data)?;
    let test_ds = carp::data::Dataset::open(&args.eval_data)?;
    let device = trainer::resolve_device(&args.device)?;
    trainer::knn_eval(&net, &train_ds, &test_ds, size, &device)
}

/// `carp linear --protocol paper`: the paper's linear evaluation, with a line per epoch
/// (validation accuracy, best so far, images/s, ETA) on stderr.
fn linear_paper(args: &LinearArgs) -> Result<()> {
    let (cfg, state, _) = load_checkpoint(&args.checkpoint)?;
    let net = &state.teacher;
    let device = trainer::resolve_device(&args.device)?;
    let train_ds = carp::data::Dataset::open(&args.data)?;
    let val_ds = carp::data::Dataset::open(&args.eval_data)?;
    let mut probe =
        carp::eval::probe::LinearEvalConfig::paper(args.image_size.unwrap_or(cfg.image_size));
    probe.epochs = args.epochs;
    probe.batch = args.batch;
    probe.lr = args.lr.unwrap_or(probe.lr);
    probe.weight_decay = args.weight_decay;
    probe.seed = args.seed;
    probe.precision = args.precision.unwrap_or(match device {
        carp::Device::Cuda(_) => Precision::Bf16,
        carp::Device::Cpu => Precision::F32,
    });
    eprintln!(
        "linear evaluation (the paper's protocol): {} training / {} validation images at {}x{}, \
         {} epochs, batch {}, lr {}, frozen forward in {} on {device}",
        train_ds.len(),
        val_ds.len(),
        probe.size,
        probe.size,
        probe.epochs,
        probe.batch,
        probe.lr,
        probe.precision
    );
    let start = std::time::Instant::now();
    let mut best = (0.0f64, 0usize);
    let r = carp::eval::probe::linear_eval(net, &train_ds, &val_ds, &probe, &device, &mut |e| {
        if e.top1 > best.0 || e.epoch == 1 {
            best = (e.top1, e.epoch);
        }
        let left = start.elapsed() / e.epoch as u32 * (probe.epochs - e.epoch) as u32;
        eprintln!(
            "epoch {}/{}: loss {:.4}, top-1 {:.2}% top-5 {:.2}% (best {:.2}% at epoch {}), \
             {:.0} images/s, ETA {}",
            e.epoch,
            probe.epochs,
            e.train_loss,
            100.0 * e.top1,
            100.0 * e.top5,
            100.0 * best.0,
            best.1,
            e.images_per_s,
            indicatif::HumanDuration(left)
        );
    })?;
    println!(
        "linear (paper protocol): last top-1 {:.2}% top-5 {:.2}%; best top-1 {:.2}% top-5 {:.2}% \
         (epoch {}); {:.0} training images/s",
        100.0 * r.last_top1,
        100.0 * r.last_top5,
        100.0 * r.best_top1,
        100.0 * r.best_top5,
        r.best_epoch,
        r.images_per_s
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "protocol": "paper", "top1": r.last_top1, "top5": r.last_top5,
                "best_top1": r.best_top1, "best_top5": r.best_top5, "best_epoch": r.best_epoch,
                "images_per_s": r.images_per_s, "precision": probe.precision.as_str(),
                "epochs": r.epochs,
            })
        );
    }
    Ok(())
}

/// `carp linear --protocol cached`: the fast probe on cached, standardized evaluation-view
/// features.
fn linear_cached(args: &LinearArgs) -> Result<()> {
    let (cfg, state, crc) = load_checkpoint(&args.checkpoint)?;
    let net = &state.teacher;
    let d = net.cfg.backbone.feature_dim();
    let size = args.image_size.unwrap_or(cfg.image_size);
    let device = trainer::resolve_device(&args.device)?;
    let (trf, trl) = cached_features(
        &args.checkpoint,
        &crc,
        net,
        &args.data,
        size,
        args.no_cache,
        &device,
    )?;
    let (tef, tel) = cached_features(
        &args.checkpoint,
        &crc,
        net,
        &args.eval_data,
        size,
        args.no_cache,
        &device,
    )?;
    let classes = (trl.iter().chain(&tel).copied().max().unwrap_or(0) + 1) as usize;
    let probe = carp::eval::linear::LinearProbeConfig {
        epochs: args.epochs,
        batch: args.batch,
        lr: args.lr.unwrap_or(0.1),
        weight_decay: args.weight_decay,
        ..Default::default()
    };
    eprintln!(
        "linear probe on cached features (NOT the paper's protocol: no augmentation, \
         standardized features; `--protocol paper` is): {} x {d} features, {classes} classes, {} epochs",
        trl.len(),
        args.epochs
    );
    let r = carp::eval::linear::linear_probe(&trf, &trl, &tef, &tel, d, classes, &probe)?;
    println!(
        "linear (cached probe) top-1 {:.2}%  top-5 {:.2}%",
        100.0 * r.top1,
        100.0 * r.top5
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({"protocol": "cached", "top1": r.top1, "top5": r.top5, "train_loss": r.train_loss})
        );
    }
    Ok(())
}

/// `--dist-timeout` as a duration, refusing what is not a positive number of seconds.
fn dist_timeout(d: &DistArgs) -> Result<std::time::Duration> {
    if !(d.dist_timeout.is_finite() && d.dist_timeout > 0.0) {
        return Err(Error::Config(format!(
            "--dist-timeout {}: give a positive number of seconds",
            d.dist_timeout
        )));
    }
    Ok(std::time::Duration::from_secs_f64(d.dist_timeout))
}

/// This process's rank when a launcher (carp's, torchrun or srun) started it as one of
/// several; None for a single process.
fn dist_options(d: &DistArgs) -> Result<Option<DistOptions>> {
    let Some(w) = launch::world_from_env(&|k| std::env::var(k).ok())? else {
        return Ok(None);
    };
    if w.world == 1 {
        return Ok(None);
    }
    Ok(Some(DistOptions {
        rendezvous: w.rendezvous(d.master_addr.as_deref(), d.master_port, dist_timeout(d)?)?,
        local_rank: w.local_rank,
    }))
}

/// `--nproc-per-node N`: checks what can be checked before anything starts (the batch, the
/// GPUs, the port), then starts the N workers of this machine and waits for them.
fn launch_workers(d: &DistArgs, nproc: usize, cfg: &TrainConfig) -> Result<()> {
    if let Some(w) = launch::world_from_env(&|k| std::env::var(k).ok())? {
        return Err(Error::Config(format!(
            "--nproc-per-node starts the ranks itself, but this process already is rank {} of \
             {} (set by {}): drop --nproc-per-node under torchrun or srun",
            w.rank, w.world, w.source
        )));
    }
    // The flags, else the environment, else a single machine's defaults.
    let (env_addr, env_port) = launch::master_from_env(&|k| std::env::var(k).ok())?;
    let plan = launch::LaunchPlan {
        nproc,
        nnodes: d.nnodes,
        node_rank: d.node_rank,
        master_addr: d
            .master_addr
            .clone()
            .or(env_addr)
            .unwrap_or_else(|| launch::DEFAULT_MASTER_ADDR.into()),
        master_port: d
            .master_port
            .or(env_port)
            .unwrap_or(launch::DEFAULT_MASTER_PORT),
    };
    plan.validate(cfg.batch)?;
    dist_timeout(d)?;
    if let carp::Device::Cuda(_) = carp::Device::parse(&cfg.device)? {
        let gpus = carp::device::gpu_count();
        if nproc > gpus {
            return Err(Error::Config(format!(
                "--nproc-per-node {nproc} with a CUDA device, but this machine has {gpus} GPU(s): \
                 one rank per GPU, so at most {gpus} (or --device cpu for CPU ranks)"
            )));
        }
    }
    if d.node_rank == 0 {
        // Rank 0 will listen there: a busy port is reported now, not by a worker.
        std::net::TcpListener::bind(("0.0.0.0", plan.master_port)).map_err(|e| {
            Error::Config(format!(
                "port {} is not free on this machine ({e}): pick another --master-port",
                plan.master_port
            ))
        })?;
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::Msg(format!("cannot find this program's executable: {e}")))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    launch::launch(&plan, &exe, &launch::worker_args(&args), &|s| {
        eprintln!("carp launcher: {s}")
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train(args) => {
            let cfg = args.resolve()?;
            if args.dry_run {
                let net = Network::new(&cfg.model, cfg.seed)?;
                let (b, h, p) = net.param_counts();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&cfg).map_err(|e| Error::Msg(e.to_string()))?
                );
                println!(
                    "parameters: backbone {b}, head {h}, prototypes {p}, total {}",
                    b + h + p
                );
                println!("precision: {}", cfg.precision);
                // Each rank of a data-parallel run holds its share of the global batch.
                let world = match args.dist.nproc_per_node {
                    Some(n) => n * args.dist.nnodes,
                    None => {
                        launch::world_from_env(&|k| std::env::var(k).ok())?.map_or(1, |w| w.world)
                    }
                };
                launch::check_batch_divides(cfg.batch, world)?;
                let mut per_rank = cfg.clone();
                per_rank.batch = cfg.batch / world;
                if world > 1 {
                    println!(
                        "data parallel: {world} ranks, global batch {} = {} per rank",
                        cfg.batch, per_rank.batch
                    );
                }
                // A dry run does not need the device: without it, no estimate.
                let mem = match carp::Device::parse(&cfg.device) {
                    Ok(device) => Some(carp::train::memory::estimate(&per_rank, &device)?),
                    Err(e) => {
                        println!("memory estimate: none ({e})");
                        None
                    }
                };
                if let Some(mem) = &mem {
                    let each = if world > 1 { " per rank" } else { "" };
                    println!("memory estimate{each}: {}", mem.summary());
                    if mem.exceeds_available() {
                        println!("memory: this run would be refused (it does not fit; --force starts it anyway)");
                    }
                }
                if cfg.local_crops > 0 {
                    println!(
                        "views per image: 2 global {0}x{0} (student and teacher) + {1} local {2}x{2} (student only)",
                        cfg.image_size, cfg.local_crops, cfg.local_size
                    );
                } else {
                    println!(
                        "views per image: 2 global {0}x{0} (no multi-crop)",
                        cfg.image_size
                    );
                }
                println!("run options: {}", cfg.run_options.summary());
                let preset = args.preset.as_deref().unwrap_or("tiny");
                let departures = cfg.departures_from_paper(preset);
                if departures.is_empty() {
                    println!("the paper's run (SPEC.md, table 1): every compared value matches");
                } else {
                    println!("differs from the paper's run (SPEC.md, table 1):");
                    for d in &departures {
                        println!("  {}: {} (paper {}): {}", d.field, d.value, d.paper, d.why);
                    }
                }
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"config": cfg, "params_backbone": b, "params_head": h, "params_prototypes": p, "memory": mem, "departures_from_paper": departures})
                    );
                }
                return Ok(());
            }
            if let Some(n) = args.dist.nproc_per_node {
                return launch_workers(&args.dist, n, &cfg);
            }
            let dist = dist_options(&args.dist)?;
            let rank = dist.as_ref().map_or(0, |d| d.rendezvous.rank);
            let opts = TrainOptions {
                resume: args.resume,
                stop_after: args.stop_after,
                no_eval: args.no_eval,
                inject_nan_at_step: args.inject_nan_at_step,
                // Rank 0 speaks for a data-parallel run.
                quiet: rank != 0,
                profile_steps: args.profile_steps,
                force: args.force,
                dist,
            };
            let report = trainer::train(&cfg, &opts).map_err(|e| match (rank, e) {
                (0, e) => e,
                (r, Error::Peer(m)) => Error::Peer(format!("rank {r}: {m}")),
                (r, e) => Error::Msg(format!("rank {r}: {e}")),
            })?;
            if args.json && rank == 0 {
                let knn: serde_json::Map<String, serde_json::Value> = report
                    .knn
                    .iter()
                    .map(|(k, a)| (k.to_string(), serde_json::json!(a)))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "steps": report.steps, "total_steps": report.total_steps,
                        "loss": report.loss, "consistency": report.consistency,
                        "entropy": report.entropy, "knn_top1": report.knn_top1,
                        "knn_top1_random_init": report.knn_top1_random_init, "knn": knn,
                        "images_per_s": report.images_per_s, "device": report.device,
                        "run_dir": report.run_dir,
                    })
                );
            }
            Ok(())
        }
        Cmd::Pack(args) => {
            let report = carp::data::run_pack(&args)?;
            println!("{report}");
            Ok(())
        }
        Cmd::Knn(args) => {
            let r = if args.raw_pixels {
                let train_ds = carp::data::Dataset::open(&args.data)?;
                let test_ds = carp::data::Dataset::open(&args.eval_data)?;
                let size = args.image_size.unwrap_or(32);
                trainer::knn_eval_raw_pixels(&train_ds, &test_ds, size)?
            } else {
                knn_of_network(&args)?
            };
            for (k, a) in &r {
                println!("k={k:<4} top-1 {:.2}%", 100.0 * a);
            }
            if args.json {
                let per_k: serde_json::Map<String, serde_json::Value> = r
                    .iter()
                    .map(|(k, a)| (k.to_string(), serde_json::json!(a)))
                    .collect();
                let top1 = r.iter().find(|(k, _)| *k == 20).map(|(_, a)| *a);
                println!("{}", serde_json::json!({"top1": top1, "per_k": per_k}));
            }
            Ok(())
        }
        Cmd::Linear(args) => match args.protocol {
            Protocol::Paper => linear_paper(&args),
            Protocol::Cached => linear_cached(&args),
        },
        Cmd::Plot(args) => {
            let out = args.out.unwrap_or_else(|| args.run_dir.clone());
            let path = carp::train::plot::plot_run(&args.run_dir, &out)?;
            println!("wrote {}", path.display());
            Ok(())
        }
        Cmd::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "carp", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Export(args) => {
            let (_, state, _) = load_checkpoint(&args.checkpoint)?;
            checkpoint::export_backbone(&state.teacher, &args.out)?;
            println!("wrote {}", args.out.display());
            Ok(())
        }
    }
}

// Ops allocate fresh buffers; mimalloc keeps freed pages instead of returning them to the
// kernel, which removed ~15% of the CPU step time spent in page faults with glibc's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                Error::Peer(_) => ExitCode::from(carp::error::PEER_EXIT_CODE),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
