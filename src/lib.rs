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
//!
//! # One training step from Rust
//!
//! [`train::step::CarpState`] holds a run's whole training state (student, EMA teacher,
//! prototypes, BN statistics, LARS momentum); [`train::step::CarpState::train_step`] takes two
//! views of a batch, each (N, 3, S, S), and runs one step on their device: both forwards, the
//! partitioned loss and its gradient, backward, the NaN guard, LARS and the EMA. Here the `tiny`
//! model on the CPU, with random views where a run would use the loader's
//! ([`data::TwoViewLoader`]); `carp train` adds the schedules, logging, evaluation and
//! checkpoints around this call.
//!
//! ```
//! use carp::nn::ModelConfig;
//! use carp::train::step::CarpState;
//! use carp::Tensor;
//! use rand::{Rng, SeedableRng};
//!
//! # fn main() -> carp::Result<()> {
//! // The tiny model: K = 1024 prototypes, in random blocks of NB = 64; weight decay; seed.
//! let mut state = CarpState::new(&ModelConfig::tiny(), 64, 1e-6, 0)?;
//!
//! // Two views of 8 images of 3 x 32 x 32 (random values here).
//! let mut rng = rand::rngs::StdRng::seed_from_u64(0);
//! let shape = [8, 3, 32, 32];
//! let mut view = || {
//!     let values = (0..8 * 3 * 32 * 32).map(|_| rng.gen_range(-1.0..1.0)).collect();
//!     Tensor::from_vec(values, &shape)
//! };
//! let (view1, view2) = (view()?, view()?);
//!
//! // One step at learning rate 0.48 and teacher momentum 0.9.
//! let stats = state.train_step(&view1, &view2, 0.48, 0.9)?;
//! assert_eq!(state.step, 1);
//! // At initialization student and teacher agree no better than chance within a block of 64:
//! // the consistency term is near log 64 = 4.16.
//! assert!((stats.consistency - 64f32.ln()).abs() < 0.5, "{stats:?}");
//! assert!(stats.loss.is_finite() && stats.entropy >= 0.0);
//! # Ok(())
//! # }
//! ```

#![deny(rustdoc::broken_intra_doc_links)]

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
