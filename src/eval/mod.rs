//! Evaluation: k-NN, the paper's linear evaluation (`probe`) and a fast cached linear probe
//! (`linear`) on frozen features.

pub mod knn;
pub mod linear;
pub mod probe;
