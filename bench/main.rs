//! carp-bench: measures one CARP training configuration on synthetic inputs (per-phase
//! breakdown, median step time, images/s, peak memory), the data loader alone (`--loader`), or
//! the loader feeding the step (`--data`), or N data-parallel ranks against one (`--nproc`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;

mod cli;
mod dp;
use cli::Args;

use carp::data::{Dataset, LoaderConfig, TwoViewLoader};
use carp::nn::ModelConfig;
use carp::tensor::Device;
use carp::testutil::randn;
use carp::train::step::{CarpState, PhaseTimes};
use carp::{Error, Result};

/// Whether this run's cuDNN convolutions may use TF32 (false on the CPU).
fn conv_tf32(device: &carp::Device) -> bool {
    #[cfg(feature = "cuda")]
    if matches!(device, carp::Device::Cuda(_)) {
        return carp::device::cuda::conv_tf32();
    }
    let _ = device;
    false
}

/// Whether cuDNN algorithms were timed (`cudnnFind*`, `--cudnn-find`), on a GPU.
fn cudnn_find(device: &carp::Device) -> bool {
    #[cfg(feature = "cuda")]
    if matches!(device, carp::Device::Cuda(_)) {
        return carp::device::cuda::conv_find();
    }
    let _ = device;
    false
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

/// Peak resident memory of this process in GiB (Linux's VmHWM), 0 where unknown.
fn peak_rss_gib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / (1024.0 * 1024.0))
        .unwrap_or(0.0)
}

/// Waits for the GPU's queued work (no-op on the CPU).
fn sync(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(i) = device {
        carp::device::cuda::backend(*i)?.synchronize()?;
    }
    let _ = device;
    Ok(())
}

/// cuMemAlloc calls so far on the GPU (None on the CPU).
fn gpu_allocs(device: &Device) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(i) = device {
        return Ok(Some(
            carp::device::cuda::backend(*i)?.pool_stats().device_allocs,
        ));
    }
    let _ = device;
    Ok(None)
}

/// Peak device memory the caching allocator held from the driver, and the peak held by live
/// buffers (the rest was cached blocks waiting for a request of their size), in GiB (None on
/// the CPU).
/// (pool held at its peak, live requested bytes at their peak, the cuDNN workspace) in GiB.
fn gpu_peak_gib(device: &Device) -> Result<Option<(f64, f64, f64)>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(i) = device {
        let be = carp::device::cuda::backend(*i)?;
        let st = be.pool_stats();
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        return Ok(Some((
            gib(st.peak_device_bytes),
            gib(st.peak_bytes_requested),
            gib(be.cudnn_workspace_bytes()),
        )));
    }
    let _ = device;
    Ok(None)
}

fn run(args: Args) -> Result<()> {
    if let Some(n) = args.nproc {
        return dp::run(&args, n);
    }
    if let Some(dir) = &args.loader {
        let dir = match args.make_imagenet_like {
            Some(n) => {
                let m = carp::data::benchset::make_imagenet_like(dir, n, 0, args.max_side)?;
                println!(
                    "wrote {} ImageNet-like JPEGs ({:.0} px, {:.2} B/px at quality 90) to {}",
                    m.images,
                    m.mean_pixels,
                    m.bytes_per_pixel,
                    m.packed.display()
                );
                m.packed
            }
            None => dir.clone(),
        };
        let r = carp::data::bench_loader(
            &dir,
            args.batch,
            args.image_size,
            args.steps.max(1),
            args.workers,
        )?;
        println!("{r}");
        if args.json {
            println!(
                "{}",
                serde_json::json!({"mode": "loader", "images_per_s": r.images_per_sec,
                    "crop_images_per_s": r.crop_images_per_sec, "batch": r.batch,
                    "size": r.size, "workers": r.workers, "device": "cpu",
                    "images_per_cpu_s": r.images_per_cpu_sec,
                    "crop_images_per_cpu_s": r.crop_images_per_cpu_sec,
                    "per_core_crops": r.stages.crops_per_core(),
                    "per_core_full": r.stages.full_per_core(),
                    "ms_decode": 1e3 * r.stages.decode_s, "ms_resize": 1e3 * r.stages.resize_s,
                    "ms_colour": 1e3 * r.stages.colour_s, "ms_blur": 1e3 * r.stages.blur_s,
                    "mean_pixels": r.mean_pixels, "bytes_per_pixel": r.bytes_per_pixel})
            );
        }
        return Ok(());
    }
    let device = Device::parse(&args.device)?;
    // The benchmark's table wants per-phase GPU times: phases are synchronized unless asked
    // otherwise (training's default is the opposite).
    let mut base = carp::options::RunOptions::DEFAULT;
    base.phase_sync = carp::options::Switch::On;
    let mut run_options = args.run_options.resolve_over(base)?;
    if args.no_phase_sync {
        run_options.phase_sync = carp::options::Switch::Off;
    }
    carp::options::install(run_options);
    let mut model = ModelConfig::named(&args.arch)?;
    model.head.prototypes = args.k;
    if args.steps == 0 {
        return Err(Error::Config("--steps must be at least 1".into()));
    }
    let mut state = CarpState::new(&model, args.nb, 1e-6, 0)?;
    state.precision = args.precision;
    let (n, s) = (args.batch, args.image_size);
    let (n_local, ls) = (
        args.local_crops,
        args.local_size
            .unwrap_or_else(|| carp::train::config::default_local_size(s)),
    );
    if n_local > 0 && !(1..=s).contains(&ls) {
        return Err(Error::Config(format!(
            "--local-size {ls} must be in 1..={s} (the global view size)"
        )));
    }

    let loader = match &args.data {
        Some(dir) => {
            let ds = Arc::new(Dataset::open(dir)?);
            let mut view = carp::data::ViewConfig::imagenet(s);
            view.size = s;
            view.local_count = n_local;
            view.local_size = ls;
            Some(TwoViewLoader::new(
                ds,
                LoaderConfig {
                    batch: n,
                    workers: args.workers,
                    drop_last: true,
                    view,
                    ..LoaderConfig::default()
                },
            )?)
        }
        None => None,
    };
    // Loader batches (with their local views under multi-crop): finished on the GPU from u8
    // crops on CUDA unless --view-finish cpu (as in training), else by the loader threads.
    let mut batches = loader.as_ref().map(|l| {
        let dev = device.clone();
        (0..).flat_map(move |e| carp::train::trainer::epoch_batches(l, e, 0, &dev))
    });
    let finish = carp::train::views::finish_path(&device);
    let view_cfg = loader
        .as_ref()
        .map(|l| l.config().view.clone())
        .unwrap_or_default();
    // Synthetic inputs go to the device once; loader batches are uploaded (and finished, on the
    // GPU path) per step: part of the measured step, as in training.
    let synthetic = (
        randn(&[n, 3, s, s], 1).to_device(&device)?,
        randn(&[n, 3, s, s], 2).to_device(&device)?,
        match n_local {
            0 => None,
            l => Some(randn(&[l * n, 3, ls, ls], 3).to_device(&device)?), // (L N, 3, s, s)
        },
    );

    let mut step_ms = Vec::new();
    let mut phases: Vec<PhaseTimes> = Vec::new();
    let mut loss = 0.0;
    let mut allocs_after_warmup = gpu_allocs(&device)?;
    if let Some(p) = &args.profile_steps {
        p.validate(0, args.warmup + args.steps)?;
    }
    let mut profiler = carp::device::profiler::Profiler::new(args.profile_steps, &device)?;
    if let Some(n) = profiler.notice() {
        eprintln!("{n}");
    }
    for i in 0..args.warmup + args.steps {
        profiler.before_step(i + 1)?;
        let t0 = Instant::now();
        let (v1, v2, locals) = match batches.as_mut() {
            Some(it) => {
                let b = it
                    .next()
                    .ok_or_else(|| Error::Msg("the loader produced no batch".into()))??;
                b.to_tensors(&view_cfg, &device, false)?
            }
            None => synthetic.clone(),
        };
        let st = state.train_step_multi(&v1, &v2, locals.as_ref(), 0.1, 0.996)?;
        // train_step waits for the GPU at the end of each GPU phase (without --no-phase-sync;
        // its host phases are synchronous), and for the step's verdict at its end; the sync
        // makes sure the clock here covers all of the step's work either way.
        sync(&device)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        profiler.after_step(i + 1)?;
        loss = st.loss;
        if i + 1 == args.warmup {
            allocs_after_warmup = gpu_allocs(&device)?;
        }
        if i >= args.warmup {
            step_ms.push(ms);
            phases.push(st.phases);
        }
        eprintln!(
            "step {}/{}: {ms:.1} ms, loss {:.4}",
            i + 1,
            args.warmup + args.steps,
            st.loss
        );
    }
    let med = median(&mut step_ms.clone());
    let ph = |f: fn(&PhaseTimes) -> f64| median(&mut phases.iter().map(f).collect::<Vec<_>>());
    let rows = [
        ("teacher forward", ph(|p| p.teacher_forward_ms)),
        ("student forward", ph(|p| p.student_forward_ms)),
        ("loss", ph(|p| p.loss_ms)),
        ("backward", ph(|p| p.backward_ms)),
        ("EMA", ph(|p| p.ema_ms)),
        ("optimizer (LARS)", ph(|p| p.optimizer_ms)),
    ];
    let ips = n as f64 / (med / 1e3);
    // Live: what tensors held at once (PyTorch's max_memory_allocated is the same measure);
    // held: what the process kept from the system (cached free blocks included).
    let (peak, peak_live, workspace, peak_what) = match gpu_peak_gib(&device)? {
        Some((g, live, ws)) => (g, live, ws, "GPU memory held by the allocator"),
        None => (
            peak_rss_gib(),
            carp::tensor::cpu_storage_bytes().1 as f64 / (1u64 << 30) as f64,
            0.0,
            "host RSS",
        ),
    };
    let local_desc = match n_local {
        0 => String::new(),
        l => format!(" + {l} local {ls}x{ls}"),
    };
    println!(
        "carp-bench: {} batch {n} x 2 views {s}x{s}{local_desc}, K {} NB {}, {}, device {device}{}",
        args.arch,
        args.k,
        args.nb,
        args.precision,
        if args.data.is_some() {
            format!(", end to end from the loader (views finished on the {finish})")
        } else {
            ", synthetic inputs".to_string()
        }
    );
    // Where BN updates, LARS and the EMA ran: the device-resident state on a GPU, the host
    // stores on the CPU.
    let optimizer = if state.has_device_state() {
        "device"
    } else {
        "host"
    };
    println!("run options: {}", run_options.summary());
    println!("{:<18} {:>10}", "phase", "median ms");
    for (name, v) in rows {
        println!("{name:<18} {v:>10.2}");
    }
    println!("{:<18} {med:>10.2}", "step");
    let gpu_step = ph(|p| p.step_ms);
    println!(
        "{:<18} {gpu_step:>10.2}   (one event pair on the device path; wall time elsewhere)",
        "gpu step"
    );
    println!("images/s {ips:.1}   peak memory {peak:.2} GiB ({peak_what})   final loss {loss:.4}");
    println!("peak memory in live tensors {peak_live:.2} GiB (the rest: cached free blocks, code, loader)");
    if workspace > 0.0 {
        // Live for the whole run here; PyTorch's is live only during each convolution call.
        println!("  of which the cuDNN workspace {workspace:.2} GiB (kept for the whole run)");
    }
    let timed_allocs = gpu_allocs(&device)?
        .zip(allocs_after_warmup)
        .map(|(a, b)| a - b);
    if let Some(a) = timed_allocs {
        println!("cuMemAlloc calls during the timed steps: {a} (0 in the steady state)");
    }
    if args.json {
        let phases: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "images_per_s": ips, "step_ms": med, "peak_mem_gib": peak, "peak_mem_what": peak_what, "peak_live_gib": peak_live, "cudnn_workspace_gib": workspace,
                "batch": n, "device": device.to_string(), "conv_tf32": conv_tf32(&device), "cudnn_find": cudnn_find(&device), "arch": args.arch, "image_size": s, "local_crops": n_local, "local_size": ls, "precision": args.precision.as_str(), "k": args.k, "nb": args.nb,
                "phases_ms": phases, "phase_sync": run_options.phase_sync.on(), "run_options": run_options, "gpu_step_ms": gpu_step, "optimizer_state": optimizer, "timed_device_allocs": timed_allocs, "mode": if args.data.is_some() { "end-to-end" } else { "synthetic" },
                "view_finish": if args.data.is_some() { finish } else { "none" },
            })
        );
    }
    Ok(())
}

// Ops allocate fresh buffers; mimalloc keeps freed pages instead of returning them to the
// kernel, which removed ~15% of the CPU step time spent in page faults with glibc's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
