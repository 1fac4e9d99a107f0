//! Every libc call drove makes, behind safe, typed wrappers.
//!
//! This is the only module where `unsafe` is allowed.

pub mod probe;
