pub mod core;
pub mod dbus;
pub mod harness;
pub mod scale;
pub mod upgrade;
