//! carp: a framework-free engine that trains ResNet50 with the CARP self-supervised method.
//!
//! The modules follow the data flow: `data` (shards, views) → `nn` (ResNet50, head,
//! prototypes) on `tensor`/`autograd`/`ops` → `carp` (partitioned loss, EMA teacher) → `optim`
//! (LARS, schedules) → `train` (loop, checkpoints, metrics); `eval` (k-NN, linear) reads
//! checkpoints.

pub mod autograd;
pub mod carp;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod options;
pub mod tensor;
#[doc(hidden)]
pub mod testutil;
pub mod train;

pub use autograd::{Gradients, Tape};
pub use error::{Error, Result};
pub use tensor::{Device, Storage, Tensor};
