//! One file per op: the CPU reference kernel, the tape method (forward + recorded backward),
//! and its tests (forward against a naive implementation, backward against finite differences).

pub mod activation;
pub mod batchnorm;
pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod pool;
