pub mod core;
pub mod harness;
pub mod scale;
pub mod upgrade;
