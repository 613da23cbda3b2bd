//! Training: configuration, the loop, checkpoints, metrics.

pub mod checkpoint;
pub mod config;
pub mod step;
pub mod trainer;
