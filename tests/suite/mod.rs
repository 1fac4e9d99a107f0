pub mod core;
pub mod dbus;
pub mod faults;
pub mod fuzz;
pub mod harness;
pub mod notify;
pub mod scale;
pub mod upgrade;
