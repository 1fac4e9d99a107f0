//! Every libc call drove makes, behind safe, typed wrappers.
//!
//! This is the only module where `unsafe` is allowed (see `spawn` for the
//! fork/exec path, the one place that creates processes).

pub mod arrival;
pub mod cgroup;
pub mod conns;
pub mod control_socket;
pub mod exec;
pub mod fdstore;
pub mod journal;
pub mod listen;
pub mod memory;
pub mod notify_socket;
pub mod owner;
pub mod private_socket;
pub mod probe;
pub mod process;
pub mod spawn;
pub mod template_socket;
pub mod users;
