pub mod core;
pub mod faults;
pub mod fuzz;
pub mod harness;
pub mod scale;
pub mod upgrade;
