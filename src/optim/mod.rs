//! LARS and the cosine schedules (learning rate, teacher momentum).

pub mod lars;
pub mod schedule;
