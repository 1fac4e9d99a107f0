// SPDX-License-Identifier: MIT OR Apache-2.0
//! drove: a systemd-native supervisor for pre-forked worker pools.
//!
//! The crate is split by concern. Pure modules hold no I/O and carry the
//! unit tests; `sys` is the only module allowed to use `unsafe`.
//!
//! - [`config`]: the TOML configuration, parsed and validated (pure).
//! - [`notify`]: sd_notify(3) datagram parsing (pure).
//! - [`scale`]: the autoscaling policy (pure).
//! - [`sys`]: fork/exec of workers, listening sockets, the notify socket,
//!   accept-queue probes: every libc call behind a safe wrapper.
//! - [`supervisor`]: the single owner of the pool state and its event loop.
//! - [`logging`]: tracing setup (journald under systemd, stderr otherwise).
//! - [`bus`]: the D-Bus interface `org.drove.Drove1`, served by droved and
//!   called through its generated proxy by drovectl.
//! - [`ctl`]: drovectl's verbs, one file each.

pub mod bus;
pub mod config;
pub mod ctl;
pub mod logging;
pub mod notify;
pub mod scale;
pub mod supervisor;
#[allow(unsafe_code)]
pub mod sys;
