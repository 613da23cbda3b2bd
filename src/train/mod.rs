//! Training: configuration, the loop, checkpoints, metrics.
pub mod plot;
