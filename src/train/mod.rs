//! Training: configuration, the loop, checkpoints, metrics.
