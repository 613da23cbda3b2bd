//! NCCL for data-parallel training on the CUDA backend: [`NcclGroup`], a [`Collective`] whose
//! gradient average is one ncclAllReduce on the device, built over a host collective (the
//! control plane: threads, TCP) that exchanges NCCL's unique id and keeps the small host
//! collectives.
//!
//! What runs where:
//! - `all_reduce_mean_device` (the gradient average, every parameter: the large transfer):
//!   ncclAllReduce (sum, f32) in place on the backend's stream, then a scale by 1 / world.
//! - `all_reduce_sum_f64`, `broadcast`, `barrier`: the control plane's. They carry a few
//!   thousand values per step (batch-norm statistics, the loss's pbar and terms) that the step
//!   needs on the host anyway, and the trait promises sums accumulated in f64 in rank order,
//!   the same bits on every rank, which NCCL's f32/f64 reductions do not promise (their order
//!   depends on the topology and algorithm). Staging them through NCCL would add a copy each
//!   way for nothing.
//!
//! It lives beside the collectives rather than in `device::cuda`: it implements `Collective`,
//! whose device method takes the CUDA backend's buffers, so the backend cannot import it back.
//!
//! libnccl is loaded at run time (cudarc's dynamic loading): without NCCL 2.x the group is not
//! made and the error says to install it or to use another transport.

use std::ffi::c_char;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use cudarc::nccl::{result as nccl, sys};

use crate::device::collective::Collective;
use crate::device::cuda::{backend, CudaBackend, DeviceBuffer};
use crate::device::{DType, Device};
use crate::error::{Error, Result};

/// Bytes in an NCCL unique id (ncclUniqueId's `internal`).
const ID_BYTES: usize = 128;

/// One NCCL communicator. ncclComm_t is a raw pointer: not Send or Sync by itself.
struct Comm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as no two calls on it run
// at once; NcclGroup keeps it behind a Mutex, so every call holds the lock.
unsafe impl Send for Comm {}

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: the communicator came from ncclCommInitRank and is destroyed once, here, by
        // its only owner (no call on it is in flight: they all hold the group's lock, which
        // dropping the group excludes). A failure cannot be reported from drop; the process
        // keeps running either way.
        let _ = unsafe { nccl::comm_destroy(self.0) };
    }
}

/// A [`Collective`] over NCCL for the ranks of `control` (one GPU per rank): see the module
/// documentation for which operation runs where.
pub struct NcclGroup {
    control: Arc<dyn Collective>,
    be: Arc<CudaBackend>,
    comm: Mutex<Comm>,
}

/// Whether libnccl can be loaded; the error to report when not.
fn nccl_present() -> std::result::Result<(), String> {
    // SAFETY: is_culib_present only tries to dlopen libnccl; nothing else is touched.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(
            "the NCCL library (libnccl.so.2) cannot be loaded: install NCCL 2.x (e.g. the \
             nvidia-nccl-cu13 wheel or the libnccl2 package) and put its folder on \
             LD_LIBRARY_PATH, or train with --device cpu"
                .into(),
        )
    }
}

fn nccl_err(what: &str, e: nccl::NcclError) -> Error {
    Error::Device(format!(
        "NCCL {what} failed: {e:?} (check that every rank runs on its own GPU, that the ranks \
         can reach each other, and NCCL_DEBUG=INFO for NCCL's own account)"
    ))
}

impl NcclGroup {
    /// The NCCL communicator of this rank of `control`'s ranks, on GPU `device` (each rank
    /// its own GPU: NCCL refuses two ranks on one device). Every rank of `control` must call
    /// it at the same point: rank 0 makes the unique id and broadcasts its bytes over the
    /// control plane, then every rank joins the communicator (which waits for all of them).
    /// When NCCL is missing on any rank, every rank returns the error (nobody waits forever).
    pub fn new(control: Arc<dyn Collective>, device: &Device) -> Result<NcclGroup> {
        let Device::Cuda(ordinal) = *device else {
            return Err(Error::Config(format!(
                "NCCL needs a CUDA device, got {device}: use --device cuda, or the host \
                 collectives for a CPU run"
            )));
        };
        let (rank, world) = (control.rank(), control.world_size());
        // Every rank says whether it has its GPU and NCCL before anyone waits on the id, so a
        // rank that cannot go on does not leave the others waiting.
        let be = backend(ordinal);
        let present = nccl_present();
        let mut failed = [f64::from(u8::from(be.is_err() || present.is_err()))];
        control.all_reduce_sum_f64(&mut failed)?;
        let be = be?;
        if let Err(why) = present {
            return Err(Error::Device(format!("rank {rank}: {why}")));
        }
        if failed[0] > 0.0 {
            return Err(Error::Device(format!(
                "{} of the {world} ranks cannot open their GPU or load the NCCL library (see \
                 their errors): install NCCL 2.x on every machine of the run, or train with \
                 --device cpu",
                failed[0]
            )));
        }
        // The id: a status then its 128 bytes as f32 values 0..=255 (exact), from rank 0.
        let mut msg = vec![0.0f32; 1 + ID_BYTES];
        let mut made = None;
        if rank == 0 {
            match nccl::get_uniqueid() {
                Ok(id) => {
                    for (m, &b) in msg[1..].iter_mut().zip(id.internal.iter()) {
                        *m = f32::from(b as u8);
                    }
                }
                Err(e) => {
                    msg[0] = 1.0;
                    made = Some(nccl_err("ncclGetUniqueId", e));
                }
            }
        }
        control.broadcast(&mut msg, 0)?;
        if let Some(e) = made {
            return Err(e);
        }
        if msg[0] != 0.0 {
            return Err(Error::Device(
                "rank 0 could not make the NCCL unique id: see its error".into(),
            ));
        }
        let mut internal = [0 as c_char; ID_BYTES];
        for (b, &v) in internal.iter_mut().zip(&msg[1..]) {
            if !(0.0..=255.0).contains(&v) || v.fract() != 0.0 {
                return Err(Error::Device(format!(
                    "the NCCL unique id arrived damaged ({v} is not a byte): the control \
                     plane must carry f32 values exactly"
                )));
            }
            *b = v as u8 as c_char;
        }
        let id = sys::ncclUniqueId { internal };
        let nranks = i32::try_from(world)
            .map_err(|_| Error::Config(format!("{world} ranks: too many for NCCL")))?;
        // NCCL binds the communicator to the current device: the rank's GPU first.
        be.bind()?;
        let mut comm = MaybeUninit::uninit();
        // SAFETY: `comm` is a valid place for the handle; `id` is the same on every rank
        // (broadcast above); rank < nranks (the control plane's). The call blocks until every
        // rank has joined.
        unsafe { nccl::comm_init_rank(comm.as_mut_ptr(), nranks, id, rank as i32) }
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        // SAFETY: ncclCommInitRank succeeded, so it wrote the handle.
        let comm = Comm(unsafe { comm.assume_init() });
        Ok(NcclGroup {
            control,
            be,
            comm: Mutex::new(comm),
        })
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.control.rank()
    }

    fn world_size(&self) -> usize {
        self.control.world_size()
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.control.all_reduce_sum_f64(buf)
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.control.all_reduce_sum(buf)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.control.broadcast(buf, root)
    }

    fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<f64>> {
        self.control.all_gather_f64(mine)
    }

    fn barrier(&self) -> Result<()> {
        self.control.barrier()
    }

    fn abort(&self, why: &str) {
        self.control.abort(why)
    }

    /// ncclAllReduce (sum) of the f32 buffer in place on `be`'s stream (queued: nothing
    /// waits), then a scale by 1 / world. `be` must be the group's GPU.
    fn all_reduce_mean_device(&self, be: &CudaBackend, buf: &mut DeviceBuffer) -> Result<()> {
        if be.ordinal() != self.be.ordinal() {
            return Err(Error::Device(format!(
                "NCCL group of GPU {} asked to reduce a buffer of GPU {}: make one group per \
                 rank on the rank's own GPU",
                self.be.ordinal(),
                be.ordinal()
            )));
        }
        if buf.dtype() != DType::F32 {
            return Err(Error::Device(format!(
                "NCCL gradient average of a {} buffer: it takes f32",
                buf.dtype()
            )));
        }
        let n = buf.len32();
        if n > 0 {
            let comm = self.comm.lock().map_err(|_| {
                Error::Device(
                    "a thread panicked inside an NCCL call: the communicator is unusable, \
                     restart the run"
                        .into(),
                )
            })?;
            be.bind()?;
            let stream = be.stream().cu_stream() as sys::cudaStream_t;
            let p = buf.ptr() as *mut std::ffi::c_void;
            // SAFETY: `buf` is a live device buffer of `n` f32 values on this communicator's
            // GPU (checked above), reduced in place (NCCL allows sendbuff == recvbuff); the
            // call is queued on the backend's stream, so it runs after the work that wrote
            // the buffer and before any that reads it; the lock keeps calls on the
            // communicator one at a time.
            unsafe {
                nccl::all_reduce(
                    p,
                    p,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm.0,
                    stream,
                )
            }
            .map_err(|e| nccl_err("ncclAllReduce", e))?;
        }
        let w = self.world_size();
        if w > 1 {
            be.scale_in_place(buf, 1.0 / w as f32)?;
        }
        Ok(())
    }
}

/// The collective of a data-parallel run on the CUDA backend: an [`NcclGroup`] over
/// `control` on `device`, or `control` itself for a world of one (nothing to reduce, no NCCL
/// needed).
pub fn nccl_group(control: Arc<dyn Collective>, device: &Device) -> Result<Arc<dyn Collective>> {
    if control.world_size() == 1 {
        return Ok(control);
    }
    Ok(Arc::new(NcclGroup::new(control, device)?))
}
