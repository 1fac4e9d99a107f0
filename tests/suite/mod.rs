pub mod core;
pub mod harness;
