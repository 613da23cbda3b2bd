//! LARS, the cosine schedules (learning rate, teacher momentum), and the device-resident
//! training state (parameters, gradient, momentum, teacher, BN statistics on the GPU).

pub mod device;
pub mod lars;
pub mod schedule;
