//! The view finish on the GPU (kernels/augment.cu): u8 crops + per-view colour parameters ->
//! normalized f32 views, matching the CPU `finish` (src/data/augment.rs).
//!
//! Upload: the crops and parameters are copied into a pinned (page-locked) staging buffer and
//! sent with one asynchronous copy on the backend's stream, so the call returns without waiting
//! for the GPU. There are two staging slots (the two views of a batch go out back to back), each
//! with an event: a slot is overwritten only after its previous copy has completed. The copy is
//! on the compute stream, not a separate copy stream: the trainer issues the finish right before
//! the step, with no GPU work queued, so a second stream would have nothing to overlap with yet
//! (and the pool's stream-ordered reuse would need an event per block); it pays once the loader
//! hands crops over a batch ahead.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::{result, CudaEvent, LaunchConfig, PinnedHostSlice};

use super::{driver_err, CudaBackend, DeviceBuffer};
use crate::data::augment::{AugNorm, ColorParams};
use crate::error::{Error, Result};

// SAFETY: AugNorm is #[repr(C)], 7 f32 and no padding, the layout of `struct AugNorm` in
// kernels/augment.cu, passed to the kernels by value.
unsafe impl cudarc::driver::DeviceRepr for AugNorm {}

/// Largest blur radius the kernels hold weights for (`AUG_MAX_RADIUS` in kernels/augment.cu).
const MAX_RADIUS: f32 = 300.0;
/// Offset of the parameters after the crops in a staging buffer (kernel-argument alignment).
const ALIGN: usize = 256;

struct Slot {
    host: PinnedHostSlice<u8>,
    /// Recorded after the last copy out of `host`.
    done: Option<CudaEvent>,
}

#[derive(Default)]
struct Staging {
    slots: [Option<Slot>; 2],
    next: usize,
}

fn staging(ordinal: usize) -> &'static Mutex<Staging> {
    static ALL: OnceLock<Mutex<HashMap<usize, &'static Mutex<Staging>>>> = OnceLock::new();
    let map = ALL.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    // One per GPU for the life of the process (like the backend itself): leaked on purpose.
    // Keyed by ordinal, shared by every CudaBackend of that GPU: they all run on its primary
    // context (cudarc's CudaContext::new), which the slots' events keep retained, so the pinned
    // memory stays valid whichever backend dropped.
    map.entry(ordinal)
        .or_insert_with(|| Box::leak(Box::new(Mutex::new(Staging::default()))))
}

impl CudaBackend {
    /// Finishes `b` views of side `s` on the GPU: `crops` (B, S, S, 3) u8, `params` one per view
    /// -> a (B, 3, S, S) f32 buffer, stream-ordered (the call does not wait for the GPU). See
    /// kernels/augment.cu for the passes.
    pub fn finish_views(
        &self,
        crops: &[u8],
        params: &[ColorParams],
        b: usize,
        s: usize,
        norm: &AugNorm,
    ) -> Result<DeviceBuffer> {
        if crops.len() != b * s * s * 3 || params.len() != b {
            return Err(Error::Shape(format!(
                "finish_views: {} crop bytes and {} parameter sets for {b} crops of {s}x{s}x3",
                crops.len(),
                params.len()
            )));
        }
        if b == 0 || s == 0 {
            return self.alloc_f32(0);
        }
        if b * 3 > 65535 || s > 65535 {
            return Err(Error::Config(format!(
                "finish_views: {b} views of {s}x{s} exceed the kernels' grid (3 B and S must \
                 be at most 65535); finish fewer views per call"
            )));
        }
        if let Some(p) = params
            .iter()
            .find(|p| (3.0 * p.blur_sigma).ceil() > MAX_RADIUS)
        {
            return Err(Error::Config(format!(
                "finish_views: blur sigma {} is above 100 (the kernels' limit, as \
                 ViewConfig::validate's)",
                p.blur_sigma
            )));
        }
        let pbytes: &[u8] = bytemuck::cast_slice(params);
        let poff = crops.len().div_ceil(ALIGN) * ALIGN;
        let total = poff + pbytes.len();
        let input = self.alloc_bytes(total)?;
        self.upload_staged(crops, pbytes, poff, &input)?;

        let n_out = b * 3 * s * s;
        let out = self.alloc_f32(n_out)?; // (B, 3, S, S)
        let p_in = input.ptr();
        let p_params = input.ptr() + poff as u64;
        let p_out = out.ptr();
        let si = s as i32;
        let nm = *norm;
        // Block per image for the colour pass (its contrast mean is a block reduction).
        let color_cfg = LaunchConfig {
            grid_dim: (b as u32, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        super::launch!(
            self,
            "aug_color_f32",
            color_cfg,
            p_in,
            p_params,
            p_out,
            si,
            nm
        );
        if params.iter().any(|p| p.blur_sigma > 0.0) {
            let tmp = self.alloc_f32(n_out)?; // (B, 3, S, S), row-blurred
            let p_tmp = tmp.ptr();
            let threads = s.div_ceil(32).clamp(1, 8) as u32 * 32;
            let blur_cfg = LaunchConfig {
                grid_dim: (s as u32, (3 * b) as u32, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            super::launch!(self, "aug_blur_h_f32", blur_cfg, p_out, p_params, p_tmp, si);
            super::launch!(
                self,
                "aug_blur_v_f32",
                blur_cfg,
                p_tmp,
                p_params,
                p_out,
                si,
                nm
            );
            // `tmp` returns to the pool here: stream order keeps the pass above ahead of
            // any later user of the block.
        }
        Ok(out)
    }

    /// Copies `crops` and, at byte offset `poff`, `pbytes` into `dst` through a pinned staging
    /// slot, asynchronously on the stream.
    fn upload_staged(
        &self,
        crops: &[u8],
        pbytes: &[u8],
        poff: usize,
        dst: &DeviceBuffer,
    ) -> Result<()> {
        let total = poff + pbytes.len();
        self.bind()?;
        let mut st = staging(self.ordinal)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let k = st.next;
        st.next = (k + 1) % 2;
        let slot = &mut st.slots[k];
        if let Some(sl) = slot.as_ref() {
            if let Some(ev) = &sl.done {
                // The previous copy out of this slot must be finished before it is rewritten.
                ev.synchronize()
                    .map_err(|e| driver_err("waiting for a staging copy", e))?;
            }
        }
        if slot.as_ref().is_none_or(|sl| sl.host.len() < total) {
            // Grown to the largest request seen (a fixed size in training), with 1/8 slack.
            let cap = total + total / 8;
            // SAFETY: the memory is uninitialized until written below; every byte copied to
            // the device (0..total: crops, zeroed padding, parameters) is written first.
            let host = unsafe { self.context().alloc_pinned::<u8>(cap) }
                .map_err(|e| driver_err("allocating pinned host memory for the crops", e))?;
            *slot = Some(Slot { host, done: None });
        }
        let sl = slot
            .as_mut()
            .ok_or_else(|| Error::Device("staging slot missing".into()))?;
        let h = sl
            .host
            .as_mut_slice()
            .map_err(|e| driver_err("pinned staging buffer", e))?;
        h[..crops.len()].copy_from_slice(crops);
        // The alignment gap is copied too: zero it rather than send never-written bytes.
        h[crops.len()..poff].fill(0);
        h[poff..total].copy_from_slice(pbytes);
        // SAFETY: dst holds `total` bytes (allocated so by the caller); the pinned slot outlives
        // the copy: it is rewritten, or replaced by a larger one (dropping it), only after `done`
        // (recorded right after) has completed, and the staging is never dropped otherwise
        // (leaked). (cudarc's own drop-time sync would not cover this raw copy: its event is
        // never recorded.)
        unsafe { result::memcpy_htod_async(dst.ptr(), &h[..total], self.stream().cu_stream()) }
            .map_err(|e| driver_err("host-to-device copy of the crops", e))?;
        let ev = self
            .stream()
            .record_event(None)
            .map_err(|e| driver_err("recording the staging event", e))?;
        sl.done = Some(ev);
        Ok(())
    }
}
