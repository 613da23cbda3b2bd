//! Data-parallel training on the CPU: W ranks (threads of one process, `ThreadGroup`) each
//! stepping on B / W rows of a global batch of B take the same steps as one rank stepping on
//! all B rows (synchronized batch norm, the loss's global batch mean, the gradient average),
//! up to the order of float sums; every rank ends bit-identical to the others. Leaving out
//! SyncBN or the world-size scaling of the uniformity gradient breaks the equivalence.

mod common;

use carp::train::step::Unsynced;
use carp::Device;
use common::ranks::{deviation, End, B};

/// One rank's run on the CPU (common::ranks::rank_run).
fn rank_run(
    comm: Option<std::sync::Arc<dyn carp::device::collective::Collective>>,
    multicrop: bool,
    unsynced: Unsynced,
) -> End {
    common::ranks::rank_run(comm, multicrop, unsynced, &Device::Cpu)
}

/// Every rank's end of a run on `world` thread ranks on the CPU, in rank order.
fn run(world: usize, multicrop: bool, unsynced: Unsynced) -> Vec<End> {
    common::ranks::run(world, multicrop, unsynced, &Device::Cpu)
}

/// The tolerance of the equivalence, relative to each field's largest magnitude. Measured
/// after 3 steps (2026-12-06): 2.8e-7 (W = 2) and 5.5e-7 (W = 4), 4.1e-7 and 3.7e-7 with local
/// views, all in the LARS momentum (float sums in another order); per-rank batch norm deviates
/// by 0.59, an unscaled uniformity gradient by 0.52.
const TOL: f64 = 1e-5;

fn check_equivalence(multicrop: bool) {
    let single = rank_run(None, multicrop, Unsynced::default());
    for world in [2, 4] {
        let ends = run(world, multicrop, Unsynced::default());
        for (r, e) in ends.iter().enumerate() {
            assert!(
                e.bits() == ends[0].bits(),
                "world {world}: rank {r} differs from rank 0"
            );
        }
        let (dev, field) = deviation(&ends[0], &single);
        eprintln!(
            "multicrop {multicrop}, world {world}: max relative deviation {dev:.3e} ({field})"
        );
        assert!(
            dev <= TOL,
            "world {world}: {field} deviates by {dev:.3e} (relative) from one rank at batch {B}"
        );
    }
}

#[test]
fn ranks_take_the_single_rank_step_of_the_global_batch() {
    check_equivalence(false);
}

#[test]
fn ranks_take_the_single_rank_step_with_local_views() {
    check_equivalence(true);
}

/// The equivalence fails when a part of the synchronization is left out: the tolerance above
/// separates the right implementation from each mistake.
#[test]
fn leaving_out_syncbn_or_the_entropy_scaling_breaks_the_equivalence() {
    let single = rank_run(None, false, Unsynced::default());
    for (what, unsynced) in [
        (
            "per-rank batch norm",
            Unsynced {
                batch_norm: true,
                ..Unsynced::default()
            },
        ),
        (
            "an unscaled uniformity gradient",
            Unsynced {
                entropy_scale: true,
                ..Unsynced::default()
            },
        ),
    ] {
        let ends = run(2, false, unsynced);
        let (dev, field) = deviation(&ends[0], &single);
        eprintln!("{what}: max relative deviation {dev:.3e} ({field})");
        assert!(
            dev > 10.0 * TOL,
            "{what}: deviation {dev:.3e} ({field}) is not far above the tolerance {TOL:.0e}"
        );
    }
}
