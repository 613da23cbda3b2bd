//! Training: configuration, the loop, checkpoints, metrics.

pub mod checkpoint;
pub mod config;
pub mod launch;
pub mod memory;
pub mod plot;
pub mod step;
pub mod trainer;
pub mod views;
