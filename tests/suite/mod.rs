pub mod core;
pub mod dbus;
pub mod harness;
