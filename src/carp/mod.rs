//! The CARP method's EMA teacher. The partitioned loss is an op (`ops::loss`): its CPU kernel
//! and the fused GPU kernel sit behind one call on the logits' device.

pub mod teacher;
