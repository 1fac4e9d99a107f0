pub mod core;
pub mod faults;
pub mod harness;
pub mod scale;
pub mod upgrade;
