pub mod cli;
pub mod core;
pub mod dbus;
pub mod faults;
pub mod fuzz;
pub mod harness;
pub mod scale;
pub mod upgrade;
