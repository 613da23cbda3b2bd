//! Data-parallel training on the CUDA backend: W = 2 ranks (threads of one process,
//! `ThreadGroup`, every rank its own `CarpState` on GPU 0), each stepping on B / 2 rows of a
//! global batch of B, take the steps one rank takes on all B rows on the same GPU: the
//! synchronized batch norm, the loss across ranks and the gradient average of the CUDA arms
//! (per-channel sums on the device, staged through the host for the all-reduces). The batch
//! is tests/data_parallel.rs's (rows whose statistics differ by rank), so per-rank batch norm
//! deviates far: the test also checks that leaving SyncBN out breaks the equivalence, which
//! shows the synchronized path is the one that ran. The gradient average through a host
//! transport gives the CPU average's bits.
//!
//! Tolerance: 2e-3 relative to each field's largest magnitude, the GPU-against-CPU tolerance of
//! a whole training step (tests/gpu_tape.rs): the ranks sum in another order than one rank
//! (f32 partial sums per rank, float atomics in the loss's pbar and in LARS's norms), over 3
//! steps. The ranks are not bit-identical to each other on a GPU (LARS's norms use float
//! atomics), so they are compared with the same tolerance.
//!
//! Without a GPU (or driver, or the `cuda` feature) every test prints
//! "SKIPPED: <test>: <reason>" and returns.

mod common;

use carp::testutil::gpu_for_test;
use carp::train::step::Unsynced;
use common::ranks::{deviation, rank_run, run, B};

const TOL: f64 = 2e-3;

fn check_equivalence(test: &str, multicrop: bool) {
    let Some((dev, _serial)) = gpu_for_test(test) else {
        return;
    };
    let single = rank_run(None, multicrop, Unsynced::default(), &dev);
    let ends = run(2, multicrop, Unsynced::default(), &dev);
    for (r, e) in ends.iter().enumerate() {
        let (dev_r, field) = deviation(e, &ends[0]);
        assert!(
            dev_r <= TOL,
            "rank {r} differs from rank 0 by {dev_r:.3e} (relative) in {field}"
        );
    }
    let (d, field) = deviation(&ends[0], &single);
    eprintln!("GPU, multicrop {multicrop}, world 2: max relative deviation {d:.3e} ({field})");
    assert!(
        d <= TOL,
        "world 2 on the GPU: {field} deviates by {d:.3e} (relative) from one rank at batch {B}"
    );
}

#[test]
fn gpu_ranks_take_the_single_rank_step_of_the_global_batch() {
    check_equivalence(
        "gpu_ranks_take_the_single_rank_step_of_the_global_batch",
        false,
    );
}

#[test]
fn gpu_ranks_take_the_single_rank_step_with_local_views() {
    check_equivalence("gpu_ranks_take_the_single_rank_step_with_local_views", true);
}

/// Per-rank batch norm (SyncBN left out) on the GPU deviates far beyond the tolerance: the
/// equivalence above comes from the synchronized CUDA arm.
#[test]
fn gpu_ranks_without_syncbn_deviate() {
    let Some((dev, _serial)) = gpu_for_test("gpu_ranks_without_syncbn_deviate") else {
        return;
    };
    let single = rank_run(None, false, Unsynced::default(), &dev);
    let unsynced = Unsynced {
        batch_norm: true,
        ..Unsynced::default()
    };
    let ends = run(2, false, unsynced, &dev);
    let (d, field) = deviation(&ends[0], &single);
    eprintln!("GPU, per-rank batch norm: max relative deviation {d:.3e} ({field})");
    assert!(
        d > 10.0 * TOL,
        "per-rank batch norm: deviation {d:.3e} ({field}) is not far above the tolerance {TOL:.0e}"
    );
}

/// The gradient average of the CUDA backend with a host transport (the trait's default
/// `all_reduce_mean_device`: download, all-reduce in f64, divide, upload) on 2 thread ranks:
/// every rank gets the CPU gradient average's values, bit for bit.
#[cfg(feature = "cuda")]
#[test]
fn gpu_gradient_average_through_the_host_is_the_cpu_average() {
    use carp::device::collective::ThreadGroup;
    let Some((_dev, _serial)) =
        gpu_for_test("gpu_gradient_average_through_the_host_is_the_cpu_average")
    else {
        return;
    };
    let be = carp::device::cuda::backend(0).unwrap();
    let n = 10_007;
    let values = |r: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 31 + r * 17) % 97) as f32 * 10f32.powi((i % 5) as i32 - 2) - 0.3)
            .collect()
    };
    let got: Vec<Vec<f32>> = std::thread::scope(|sc| {
        let hs: Vec<_> = ThreadGroup::ranks(2)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let (be, values) = (&be, &values);
                sc.spawn(move || {
                    let mut buf = be.upload_f32(&values(r)).unwrap();
                    c.all_reduce_mean_device(be, &mut buf).unwrap();
                    be.download_f32(&buf).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The CPU arm of TrainState::gather_grads: all_reduce_sum (f64, rounded once), then / W.
    let (a, b) = (values(0), values(1));
    let want: Vec<u32> = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| ((x as f64 + y as f64) as f32 / 2.0).to_bits())
        .collect();
    for (r, g) in got.iter().enumerate() {
        let bits: Vec<u32> = g.iter().map(|v| v.to_bits()).collect();
        assert!(bits == want, "rank {r}: not the CPU gradient average");
    }
}
