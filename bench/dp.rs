//! `carp-bench --nproc N`: N data-parallel ranks stepping together (weak scaling: `--batch`
//! images per rank), against one rank measured in the same run: per-rank images/s, the
//! efficiency, and what the collectives cost per step (the gradient all-reduce apart from the
//! small all-reduces of synchronized batch norm and the loss).
//!
//! The ranks are threads of this process, each its own training state, connected by the same
//! TCP transport that CPU ranks use across processes (`carp train --nproc-per-node`); they
//! share this machine's cores, so on a CPU the efficiency shows the cores' sharing as much as
//! the communication.

use std::sync::Arc;
use std::time::{Duration, Instant};

use carp::device::collective::{CallRecord, Collective, Metered};
use carp::device::tcp::{Identity, Rendezvous, TcpGroup};
use carp::nn::ModelConfig;
use carp::tensor::{Device, Tensor};
use carp::testutil::randn;
use carp::train::step::CarpState;
use carp::{Error, Result};

use crate::cli::Args;
use crate::median;

/// What one rank measured: its timed steps and the collective calls of each.
struct RankRun {
    step_ms: Vec<f64>,
    calls: Vec<Vec<CallRecord>>,
    loss: f32,
}

/// The per-step cost of one kind of collective call on one rank (medians over the steps).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct CallCost {
    pub calls: f64,
    pub values: f64,
    /// On this transport's wire, each way: f64 values (8 bytes), sent and received.
    pub bytes: f64,
    pub ms: f64,
}

/// One rank's loop: `warmup` untimed steps, then `steps` timed ones on its own synthetic
/// inputs (seeded by the rank).
fn rank_loop(
    args: &Args,
    model: &ModelConfig,
    device: &Device,
    comm: Option<Arc<Metered>>,
) -> Result<RankRun> {
    let rank = comm.as_ref().map_or(0, |c| c.rank()) as u64;
    let mut state = CarpState::new(model, args.nb, 1e-6, 0)?;
    state.precision = args.precision;
    if let Some(c) = &comm {
        state = state.with_collective(c.clone() as Arc<dyn Collective>);
    }
    let (n, s) = (args.batch, args.image_size);
    let v1 = randn(&[n, 3, s, s], 1 + 3 * rank).to_device(device)?; // (N, 3, S, S)
    let v2 = randn(&[n, 3, s, s], 2 + 3 * rank).to_device(device)?;
    let ls = args
        .local_size
        .unwrap_or_else(|| carp::train::config::default_local_size(s));
    let locals: Option<Tensor> = match args.local_crops {
        0 => None,
        l => Some(randn(&[l * n, 3, ls, ls], 3 + 3 * rank).to_device(device)?), // (L N, 3, s, s)
    };
    let mut out = RankRun {
        step_ms: Vec::new(),
        calls: Vec::new(),
        loss: 0.0,
    };
    for i in 0..args.warmup + args.steps {
        let t0 = Instant::now();
        let st = state.train_step_multi(&v1, &v2, locals.as_ref(), 0.1, 0.996)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let calls = comm.as_ref().map(|c| c.take()).unwrap_or_default();
        if i >= args.warmup {
            out.step_ms.push(ms);
            out.calls.push(calls);
        }
        out.loss = st.loss;
    }
    Ok(out)
}

/// The median per-step cost of the calls `pick` selects.
fn cost(calls: &[Vec<CallRecord>], pick: impl Fn(&CallRecord) -> bool) -> CallCost {
    let per_step = |f: &dyn Fn(&CallRecord) -> f64| {
        median(
            &mut calls
                .iter()
                .map(|step| step.iter().filter(|c| pick(c)).map(f).sum())
                .collect::<Vec<f64>>(),
        )
    };
    let values = per_step(&|c| c.values as f64);
    CallCost {
        calls: per_step(&|_| 1.0),
        values,
        bytes: 8.0 * values,
        ms: per_step(&|c| 1e3 * c.secs),
    }
}

pub fn run(args: &Args, nproc: usize) -> Result<()> {
    if nproc < 2 {
        return Err(Error::Config(
            "--nproc N compares N ranks with one: give N of 2 or more".into(),
        ));
    }
    if args.loader.is_some() || args.data.is_some() || args.profile_steps.is_some() {
        return Err(Error::Config(
            "--nproc measures the step on synthetic inputs: drop --loader, --data and \
             --profile-steps"
                .into(),
        ));
    }
    let device = Device::parse(&args.device)?;
    if let Device::Cuda(_) = device {
        return Err(Error::Device(
            "--nproc on GPUs needs the NCCL backend, which this build does not have yet: \
             measure CPU ranks with --device cpu"
                .into(),
        ));
    }
    carp::options::install(
        args.run_options
            .resolve_over(carp::options::RunOptions::DEFAULT)?,
    );
    let mut model = ModelConfig::named(&args.arch)?;
    model.head.prototypes = args.k;
    if args.steps == 0 {
        return Err(Error::Config("--steps must be at least 1".into()));
    }

    eprintln!("one rank ...");
    let one = rank_loop(args, &model, &device, None)?;
    let one_ms = median(&mut one.step_ms.clone());

    eprintln!("{nproc} ranks ...");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| Error::Msg(format!("no free local port for the ranks: {e}")))?
        .port();
    let identity = Identity {
        config: serde_json::json!({"bench": "nproc"}),
        binary: "carp-bench".into(),
    };
    let handles: Vec<_> = (0..nproc)
        .map(|rank| {
            let (args, model, device, identity) = (
                args.clone(),
                model.clone(),
                device.clone(),
                identity.clone(),
            );
            std::thread::spawn(move || -> Result<RankRun> {
                let rv = Rendezvous {
                    rank,
                    world: nproc,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    timeout: Duration::from_secs(120),
                };
                let group: Arc<dyn Collective> = Arc::new(TcpGroup::join(&rv, &identity)?);
                rank_loop(&args, &model, &device, Some(Arc::new(Metered::new(group))))
            })
        })
        .collect();
    let mut ranks = Vec::with_capacity(nproc);
    for (r, h) in handles.into_iter().enumerate() {
        ranks.push(
            h.join()
                .map_err(|_| Error::Msg(format!("rank {r} panicked")))??,
        );
    }
    // The run goes at its slowest rank's pace.
    let many_ms = ranks
        .iter()
        .map(|r| median(&mut r.step_ms.clone()))
        .fold(0.0, f64::max);
    let n = args.batch as f64;
    let (one_ips, rank_ips) = (n / (one_ms / 1e3), n / (many_ms / 1e3));
    let efficiency = rank_ips / one_ips;
    // The flat gradient's all-reduce is the one call of the parameter count; the rest are
    // SyncBN's and the loss's.
    let params = {
        let (b, h, p) = carp::nn::Network::new(&model, 0)?.param_counts();
        b + h + p
    };
    let is_grad = |c: &CallRecord| c.op == "all_reduce" && c.values == params;
    let grad = cost(&ranks[0].calls, is_grad);
    let small = cost(&ranks[0].calls, |c| !is_grad(c));

    println!(
        "carp-bench --nproc {nproc}: {} batch {} per rank x 2 views {}x{}, K {} NB {}, {}, device {device}, ranks as threads over TCP (localhost)",
        args.arch, args.batch, args.image_size, args.image_size, args.k, args.nb, args.precision
    );
    println!("one rank      step {one_ms:>9.2} ms   {one_ips:>9.1} images/s");
    println!(
        "{nproc} ranks      step {many_ms:>9.2} ms   {rank_ips:>9.1} images/s per rank, {:.1} in all, efficiency {:.1}% of one rank",
        rank_ips * nproc as f64,
        100.0 * efficiency
    );
    println!(
        "collectives per step on rank 0 (medians; time includes waiting for the other ranks):"
    );
    for (name, c) in [("gradient all-reduce", grad), ("SyncBN + loss", small)] {
        println!(
            "  {name:<20} {:>5.0} calls {:>12.0} values {:>9.2} MB each way {:>9.2} ms",
            c.calls,
            c.values,
            c.bytes / 1e6,
            c.ms
        );
    }
    println!(
        "final loss: one rank {:.4}, rank 0 of {nproc} {:.4}",
        one.loss, ranks[0].loss
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "mode": "nproc", "nproc": nproc, "device": device.to_string(), "arch": args.arch,
                "batch_per_rank": args.batch, "image_size": args.image_size, "k": args.k, "nb": args.nb,
                "precision": args.precision.as_str(), "one_rank_step_ms": one_ms,
                "one_rank_images_per_s": one_ips, "step_ms": many_ms,
                "images_per_s_per_rank": rank_ips, "efficiency": efficiency,
                "gradient_allreduce": grad, "syncbn_and_loss": small, "params": params,
                "transport": "tcp-localhost-threads",
            })
        );
    }
    Ok(())
}
