//! Communication between the ranks of a data-parallel run: the one interface through which
//! synchronized batch norm, the loss's batch mean and the gradient average reach the other
//! ranks. Nothing else in the crate knows about ranks.
//!
//! [`SingleRank`] is the world of one (every call a no-op, so a single-process run computes
//! exactly what it computes without a collective); [`ThreadGroup`] runs the ranks as threads
//! of one process (the executable specification of the multi-process transports).

use std::sync::{Arc, Barrier, Mutex};

use crate::bail;
use crate::error::Result;

/// The collective operations of one rank. Every rank must make the same calls in the same
/// order with the same lengths (as with MPI or NCCL); the results are bit-identical on every
/// rank.
pub trait Collective: Send + Sync {
    /// This rank, in 0..world_size().
    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// Replaces `buf` on every rank with the elementwise sum over the ranks, accumulated in
    /// rank order (0, 1, ..): the same bits on every rank, whatever the arrival order.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;

    /// As [`Collective::all_reduce_sum_f64`] for f32 values: accumulated in f64, rounded once.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let mut wide: Vec<f64> = buf.iter().map(|&v| v as f64).collect();
        self.all_reduce_sum_f64(&mut wide)?;
        for (b, w) in buf.iter_mut().zip(&wide) {
            *b = *w as f32;
        }
        Ok(())
    }

    /// Replaces `buf` on every rank with rank `root`'s values.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;

    /// Every rank's `mine` (all of the same length), concatenated in rank order, on every
    /// rank.
    fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<f64>>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Tells the other ranks that this one is giving up (`why`), so that they stop with that
    /// message instead of waiting for it. A transport without peers to tell does nothing.
    fn abort(&self, _why: &str) {}

    /// Replaces the f32 device buffer `buf` (all of it, on `be`'s device) on every rank with
    /// the elementwise mean over the ranks: the gradient average of a data-parallel step on
    /// the CUDA backend. The default stages through the host, so that any host transport
    /// (threads, TCP) serves the CUDA backend: one download (which waits for the work queued
    /// on `be`), [`Collective::all_reduce_sum`], a division by the world size in f32 (the CPU
    /// gradient average's arithmetic, value for value), one upload. A device transport (NCCL)
    /// overrides it with a native all-reduce on the device.
    #[cfg(feature = "cuda")]
    fn all_reduce_mean_device(
        &self,
        be: &crate::device::cuda::CudaBackend,
        buf: &mut crate::device::cuda::DeviceBuffer,
    ) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let mut host = be.download_f32(buf)?;
        self.all_reduce_sum(&mut host)?;
        let w = self.world_size() as f32;
        host.iter_mut().for_each(|g| *g /= w);
        be.copy_from_host_f32(buf, &host)
    }
}

/// The collective of a one-rank world: every operation leaves its buffer as it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root, 1)
    }

    fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<f64>> {
        Ok(mine.to_vec())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

fn check_root(root: usize, world: usize) -> Result<()> {
    if root >= world {
        bail!(
            Config,
            "broadcast from rank {root} in a world of {world} ranks: pick a root below {world}"
        );
    }
    Ok(())
}

/// What the ranks of a [`ThreadGroup`] share: one slot per rank for its contribution, and the
/// barrier that separates writing the slots from reading them.
struct Shared {
    world: usize,
    slots: Mutex<Vec<Vec<f64>>>,
    barrier: Barrier,
}

/// One rank of an in-process group whose ranks are threads (one thread per rank, each calling
/// the collective operations in the same order).
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    /// The `world` ranks of a new group, rank r at index r: hand each to its own thread.
    pub fn ranks(world: usize) -> Result<Vec<Arc<dyn Collective>>> {
        if world == 0 {
            bail!(Config, "a thread group needs at least one rank, got 0");
        }
        let shared = Arc::new(Shared {
            world,
            slots: Mutex::new(vec![Vec::new(); world]),
            barrier: Barrier::new(world),
        });
        Ok((0..world)
            .map(|rank| {
                Arc::new(ThreadGroup {
                    rank,
                    shared: shared.clone(),
                }) as Arc<dyn Collective>
            })
            .collect())
    }

    fn slots(&self) -> Result<std::sync::MutexGuard<'_, Vec<Vec<f64>>>> {
        self.shared.slots.lock().map_err(|_| {
            crate::error::Error::Msg(
                "a rank of the thread group panicked while holding its buffers: the group is \
                 unusable, restart the run"
                    .into(),
            )
        })
    }

    /// Publishes this rank's values, waits for every rank's, and hands all of them (in rank
    /// order) to `read`; a second barrier keeps a fast rank from overwriting its slot before
    /// the others have read it.
    fn exchange(&self, mine: Vec<f64>, read: impl FnOnce(&[Vec<f64>]) -> Result<()>) -> Result<()> {
        let n = mine.len();
        self.slots()?[self.rank] = mine;
        self.shared.barrier.wait();
        let r = {
            let slots = self.slots()?;
            match slots.iter().position(|s| s.len() != n) {
                Some(other) => Err(crate::error::Error::Config(format!(
                    "collective call with {n} values on rank {} but {} on rank {other}: every \
                     rank must make the same calls with the same lengths",
                    self.rank,
                    slots[other].len()
                ))),
                None => read(&slots),
            }
        };
        self.shared.barrier.wait();
        r
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        self.exchange(buf.to_vec(), |slots| {
            buf.fill(0.0);
            for s in slots {
                for (b, v) in buf.iter_mut().zip(s) {
                    *b += v;
                }
            }
            Ok(())
        })
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root, self.shared.world)?;
        let mine = buf.iter().map(|&v| v as f64).collect();
        self.exchange(mine, |slots| {
            for (b, v) in buf.iter_mut().zip(&slots[root]) {
                *b = *v as f32;
            }
            Ok(())
        })
    }

    fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(mine.len() * self.shared.world);
        self.exchange(mine.to_vec(), |slots| {
            slots.iter().for_each(|s| out.extend_from_slice(s));
            Ok(())
        })?;
        Ok(out)
    }

    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
}

/// One call a [`Metered`] collective saw: the operation, the values this rank contributed and
/// how long the call took (waiting for the slowest rank included).
#[derive(Clone, Debug, PartialEq)]
pub struct CallRecord {
    pub op: &'static str,
    pub values: usize,
    pub secs: f64,
}

/// A collective that records every call it passes on (for `carp-bench --nproc`).
pub struct Metered {
    inner: Arc<dyn Collective>,
    calls: Mutex<Vec<CallRecord>>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Collective>) -> Metered {
        Metered {
            inner,
            calls: Mutex::new(Vec::new()),
        }
    }

    /// The calls recorded since the last `take`, in order.
    pub fn take(&self) -> Vec<CallRecord> {
        self.calls
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }

    fn timed<T>(
        &self,
        op: &'static str,
        values: usize,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let t0 = std::time::Instant::now();
        let r = f();
        if let Ok(mut c) = self.calls.lock() {
            c.push(CallRecord {
                op,
                values,
                secs: t0.elapsed().as_secs_f64(),
            });
        }
        r
    }
}

impl Collective for Metered {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let n = buf.len();
        self.timed("all_reduce", n, || self.inner.all_reduce_sum_f64(buf))
    }

    fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<f64>> {
        self.timed("all_gather", mine.len(), || self.inner.all_gather_f64(mine))
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let n = buf.len();
        self.timed("broadcast", n, || self.inner.broadcast(buf, root))
    }

    fn barrier(&self) -> Result<()> {
        self.timed("barrier", 0, || self.inner.barrier())
    }

    fn abort(&self, why: &str) {
        self.inner.abort(why)
    }

    #[cfg(feature = "cuda")]
    fn all_reduce_mean_device(
        &self,
        be: &crate::device::cuda::CudaBackend,
        buf: &mut crate::device::cuda::DeviceBuffer,
    ) -> Result<()> {
        let n = buf.len();
        self.timed("all_reduce_device", n, || {
            self.inner.all_reduce_mean_device(be, buf)
        })
    }
}

/// The world size of an optional collective (none: a single rank).
pub fn world_size(c: Option<&Arc<dyn Collective>>) -> usize {
    c.map_or(1, |c| c.world_size())
}

/// The collective when there is more than one rank to talk to; `None` for no collective or a
/// world of one, so callers keep the single-rank code path as it is.
pub fn multi(c: Option<&Arc<dyn Collective>>) -> Option<&Arc<dyn Collective>> {
    c.filter(|c| c.world_size() > 1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Runs `f(rank, collective)` on each rank of a `world`-rank thread group and returns the
    /// results in rank order.
    fn on_ranks<R: Send + 'static>(
        world: usize,
        f: impl Fn(usize, Arc<dyn Collective>) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let f = Arc::new(f);
        let handles: Vec<_> = ThreadGroup::ranks(world)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let f = f.clone();
                std::thread::spawn(move || f(r, c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Rank r's contribution: values spread over magnitudes so the summation order matters.
    pub(crate) fn values(r: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((r * 31 + i * 7) % 13) as f32 * 10f32.powi((i % 5) as i32 - 2) - 0.3)
            .collect()
    }

    #[test]
    fn all_reduce_matches_the_direct_sum_on_every_rank() {
        for world in [1, 2, 4] {
            let n = 37;
            let got = on_ranks(world, move |r, c| {
                assert_eq!((c.rank(), c.world_size()), (r, world));
                let mut v = values(r, n);
                c.all_reduce_sum(&mut v).unwrap();
                // Several calls in a row: the slots are reused safely.
                let mut w = vec![r as f64; 3];
                c.all_reduce_sum_f64(&mut w).unwrap();
                (v, w)
            });
            let want: Vec<f32> = (0..n)
                .map(|i| (0..world).map(|r| values(r, n)[i] as f64).sum::<f64>() as f32)
                .collect();
            let want_w = (0..world).map(|r| r as f64).sum::<f64>();
            for (r, (v, w)) in got.iter().enumerate() {
                assert_eq!(v, &want, "world {world} rank {r}");
                assert_eq!(w, &vec![want_w; 3], "world {world} rank {r}");
                // Bit-identical across ranks.
                assert_eq!(
                    v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    got[0].0.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn broadcast_and_barrier() {
        for world in [1, 2, 4] {
            let root = world - 1;
            let got = on_ranks(world, move |r, c| {
                let mut v = values(r, 5);
                c.broadcast(&mut v, root).unwrap();
                c.barrier().unwrap();
                let g = c.all_gather_f64(&[r as f64, 10.0 * r as f64]).unwrap();
                let want: Vec<f64> = (0..world)
                    .flat_map(|q| [q as f64, 10.0 * q as f64])
                    .collect();
                assert_eq!(g, want);
                assert!(c.broadcast(&mut v, world).is_err());
                v
            });
            for v in got {
                assert_eq!(v, values(root, 5));
            }
        }
    }

    #[test]
    fn metered_records_each_call_and_changes_nothing() {
        let got = on_ranks(2, |r, c| {
            let m = Metered::new(c);
            let mut v = values(r, 7);
            m.all_reduce_sum(&mut v).unwrap();
            m.barrier().unwrap();
            (v, m.take(), m.take())
        });
        let want: Vec<f32> = (0..7)
            .map(|i| (values(0, 7)[i] as f64 + values(1, 7)[i] as f64) as f32)
            .collect();
        for (v, calls, again) in got {
            assert_eq!(v, want);
            let ops: Vec<_> = calls.iter().map(|c| (c.op, c.values)).collect();
            assert_eq!(ops, [("all_reduce", 7), ("barrier", 0)]);
            assert!(again.is_empty());
        }
    }

    #[test]
    fn single_rank_leaves_buffers_alone() {
        let c = SingleRank;
        let mut v = values(3, 9);
        c.all_reduce_sum(&mut v).unwrap();
        c.broadcast(&mut v, 0).unwrap();
        assert_eq!(v, values(3, 9));
        assert_eq!((c.rank(), c.world_size()), (0, 1));
    }

    #[test]
    fn mismatched_lengths_are_an_error_on_every_rank() {
        let got = on_ranks(2, |r, c| {
            let mut v = vec![1.0f64; 2 + r];
            c.all_reduce_sum_f64(&mut v).map_err(|e| e.to_string())
        });
        for g in got {
            assert!(g.unwrap_err().contains("same lengths"));
        }
    }
}
