//! NCCL on the CUDA backend (`carp::device::nccl::NcclGroup`), on the one GPU a test machine
//! has: a group of world size 1 (NCCL refuses two ranks on one GPU, so the multi-rank
//! equivalence runs on thread ranks in tests/gpu_data_parallel.rs). Its device all-reduce is a
//! real ncclAllReduce that leaves the gradient as it is (a sum over one rank, no scale), and a
//! training state with the group takes the same steps as one without a collective (up to the
//! GPU's run-to-run nondeterminism, 1e-4 relative). `nccl_group` of a world of one is the
//! control plane itself.
//!
//! Needs libnccl (NCCL 2.x) on the GPU machine: without it the tests fail with the error that
//! says so (the data-parallel NCCL path cannot be checked there). Without a GPU (or driver, or
//! the `cuda` feature) they print "SKIPPED: <test>: <reason>" and return.
#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;

use carp::device::collective::{Collective, SingleRank};
use carp::device::cuda::backend;
use carp::device::nccl::{nccl_group, NcclGroup};
use carp::testutil::gpu_for_test;
use carp::train::step::Unsynced;
use common::ranks::{deviation, rank_run};

fn group(dev: &carp::Device) -> Arc<dyn Collective> {
    match NcclGroup::new(Arc::new(SingleRank), dev) {
        Ok(g) => Arc::new(g),
        Err(e) => panic!("NCCL group of one rank on {dev}: {e}"),
    }
}

#[test]
fn nccl_group_of_one_reduces_on_the_device() {
    let Some((dev, _serial)) = gpu_for_test("nccl_group_of_one_reduces_on_the_device") else {
        return;
    };
    let g = group(&dev);
    assert_eq!((g.rank(), g.world_size()), (0, 1));
    let be = backend(0).unwrap();
    let host: Vec<f32> = (0..10_007)
        .map(|i| ((i * 37) % 101) as f32 * 1e-3 - 0.05)
        .collect();
    let mut buf = be.upload_f32(&host).unwrap();
    g.all_reduce_mean_device(&be, &mut buf).unwrap();
    let got = be.download_f32(&buf).unwrap();
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        host.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "an all-reduce over one rank changed the values"
    );
    // The host collectives are the control plane's.
    let mut v = vec![1.5f64, -2.0];
    g.all_reduce_sum_f64(&mut v).unwrap();
    assert_eq!(v, [1.5, -2.0]);
    g.barrier().unwrap();
    // A world of one needs no NCCL: the control plane comes back.
    let control: Arc<dyn Collective> = Arc::new(SingleRank);
    let same = nccl_group(control.clone(), &dev).unwrap();
    assert!(Arc::ptr_eq(&same, &control));
}

#[test]
fn nccl_group_of_one_takes_the_plain_step() {
    let Some((dev, _serial)) = gpu_for_test("nccl_group_of_one_takes_the_plain_step") else {
        return;
    };
    let plain = rank_run(None, false, Unsynced::default(), &dev);
    let with = rank_run(Some(group(&dev)), false, Unsynced::default(), &dev);
    // The same kernels on the same inputs; only the GPU's run-to-run nondeterminism (float
    // atomics in the loss and LARS, cuDNN's algorithms) may separate the two runs.
    let (d, field) = deviation(&with, &plain);
    eprintln!("NCCL group of one against no collective: max relative deviation {d:.3e} ({field})");
    assert!(
        d <= 1e-4,
        "a training state with an NCCL group of one rank took another step than one without \
         a collective: {field} deviates by {d:.3e} (relative)"
    );
}
