//! Evaluation: k-NN and linear probes on frozen features.

pub mod knn;
pub mod linear;
