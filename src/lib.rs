//! carp: a framework-free engine that trains ResNet50 with the CARP self-supervised method.
//!
//! The modules follow the data flow: `data` (shards, views) → `nn` (ResNet50, head,
//! prototypes) on `tensor`/`autograd`/`ops` (the partitioned loss among them) → `carp` (EMA
//! teacher) → `optim`
//! (LARS, schedules) → `train` (loop, checkpoints, metrics); `eval` (k-NN, linear) reads
//! checkpoints.
//!
//! They form one acyclic order, each using only those below it (`tests/module_order.rs`
//! enforces it): `error` ← `options`, `data` ← `device` (Device, DType, Layout; the CUDA
//! driver, cuDNN, cuBLAS, launchers on raw buffers) ← `tensor` ← `autograd` ← `ops` ← `nn` ←
//! `carp`, `optim` ← `eval`, `resident` (the training state's GPU copy) ← `train`.

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
pub mod resident;
pub mod tensor;
#[doc(hidden)]
pub mod testutil;
pub mod train;

pub use autograd::{Gradients, Tape};
pub use error::{Error, Result};
pub use tensor::{Device, Storage, Tensor};
