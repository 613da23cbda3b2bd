//! The CARP method: the partitioned consistency/uniformity loss and the EMA teacher.

pub mod loss;
pub mod teacher;
