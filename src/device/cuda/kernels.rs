//! The PTX of every `kernels/*.cu`, compiled by build.rs and embedded in the binary.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
