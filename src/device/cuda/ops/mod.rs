//! Typed launchers for every kernel in `kernels/*.cu`. Each checks the buffer sizes against the
//! shape it is given (an error names the op and the sizes), then queues the kernel on the
//! backend's stream. Outputs are overwritten unless the name says otherwise (`accumulate`).
//!
//! One file per kernel file: the launchers of `kernels/<name>.cu` are in `<name>.rs` here (the
//! view-finish kernels of `augment.cu` in `../augment.rs`); this file holds what they share.

use cudarc::driver::LaunchConfig;

use super::{launch, CudaBackend, DeviceBuffer};
use crate::device::{DType, Layout};
use crate::error::{Error, Result};

mod batchnorm;
mod bn_fused;
mod carp_loss;
mod elementwise;
mod ema;
mod lars;
mod pool;
mod weightnorm;

pub use carp_loss::{CarpLossGpu, CarpLossQueued, PbarHook};
pub use lars::LarsPlan;
pub use pool::Pool2dShape;

/// Threads per block for the elementwise (grid-stride) kernels.
const THREADS: u32 = 256;

/// An f32 (or int32) buffer of at least `n` elements: the kernels without a bf16 variant.
fn need(op: &str, name: &str, buf: &DeviceBuffer, n: usize) -> Result<()> {
    need_dt(op, name, buf, n, DType::F32)
}

/// A buffer of at least `n` elements of `dt` (an activation of a kernel with f32 and bf16
/// variants: every activation of one call has the first input's type).
fn need_dt(op: &str, name: &str, buf: &DeviceBuffer, n: usize, dt: DType) -> Result<()> {
    if buf.dtype() != dt {
        return Err(Error::Device(format!(
            "{op}: {name} is a {} buffer where {dt} is needed (this op has no {} kernel, or \
             its inputs mix element types)",
            buf.dtype(),
            buf.dtype()
        )));
    }
    if buf.len() < n {
        return Err(Error::Shape(format!(
            "{op}: {name} holds {} values, needs {n}",
            buf.len()
        )));
    }
    Ok(())
}

/// Every named buffer has `layout` (the activations of one call share the first input's).
fn need_layout(op: &str, bufs: &[(&str, &DeviceBuffer)], layout: Layout) -> Result<()> {
    for (name, b) in bufs {
        if b.layout() != layout {
            return Err(Error::Device(format!(
                "{op}: {name} is {} where {layout} is needed (convert it to the input's layout)",
                b.layout()
            )));
        }
    }
    Ok(())
}

/// The kernel `base` for element type `dt`: `bn_forward` -> `bn_forward_f32` / `_bf16`.
fn kname(base: &str, dt: DType) -> String {
    format!("{base}_{dt}")
}

fn i64_of(x: usize) -> i64 {
    // usize -> i64 cannot overflow for any buffer a GPU can hold (< 2^63 bytes).
    x as i64
}

fn i32_of(op: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::Shape(format!("{op}: size {x} exceeds i32")))
}

fn one_block(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads for a kernel whose block reduces `n` values: a multiple of 32 in [32, max].
fn reduce_threads(n: usize, max: u32) -> u32 {
    let t = (n.max(1).next_power_of_two() as u32).clamp(32, max);
    t.div_ceil(32) * 32
}

impl CudaBackend {
    fn elementwise_cfg(&self, n: usize) -> LaunchConfig {
        self.grid_1d(n, THREADS)
    }
}

/// Every launcher source, these and the view finish's, whose kernel names and launch arguments
/// the backend's tests check against the compiled PTX.
#[cfg(test)]
pub(super) const SOURCES: [&str; 10] = [
    include_str!("../augment.rs"),
    include_str!("mod.rs"),
    include_str!("elementwise.rs"),
    include_str!("batchnorm.rs"),
    include_str!("bn_fused.rs"),
    include_str!("pool.rs"),
    include_str!("weightnorm.rs"),
    include_str!("ema.rs"),
    include_str!("lars.rs"),
    include_str!("carp_loss.rs"),
];
