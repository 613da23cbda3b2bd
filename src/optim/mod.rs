//! LARS and the cosine schedules (learning rate, teacher momentum). LARS on the GPU's
//! device-resident state is `resident`'s.

pub mod lars;
pub mod schedule;
