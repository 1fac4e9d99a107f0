// SPDX-License-Identifier: MIT OR Apache-2.0
//! drove: a systemd-native supervisor for pre-forked worker pools.
//!
//! The crate is split by concern. Pure modules hold no I/O and carry the
//! unit tests; `sys` is the only module allowed to use `unsafe`.
//!
//! - [`config`]: the TOML configuration, parsed and validated (pure).
//! - [`notify`]: sd_notify(3) datagram parsing (pure).
//! - [`oneline`]: worker and template text made one printable line (pure).
//! - [`scale`]: the autoscaling policy (pure).
//! - [`sys`]: fork/exec of workers, listening sockets, the notify socket,
//!   accept-queue probes: every libc call behind a safe wrapper.
//! - [`handover`]: supervisor state across a binary upgrade (pure).
//! - [`supervisor`]: the single owner of the pool state and its event loop.
//! - [`logging`]: tracing setup (journald under systemd, stderr otherwise).
//! - [`bus`]: the D-Bus interface `org.drove.Drove1`, served by droved and
//!   called through its generated proxy by drovectl.
//! - [`ctl`]: drovectl's verbs, one file each.
//! - [`metrics`]: Prometheus metrics on `[metrics] listen`.
//! - [`panics`]: droved's panic hook, rate-limited, through `tracing`.

pub mod bus;
pub mod config;
pub mod ctl;
pub mod handover;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod oneline;
pub mod panics;
pub mod scale;
pub mod supervisor;
#[allow(unsafe_code)]
pub mod sys;

/// Room for the build id in the binary (see [`build_id`]).
const BUILD_ID_LEN: usize = 48;
const BUILD_ID_PREFIX: &[u8] = b"DROVE_BUILD_ID=";

const fn build_id_bytes() -> [u8; BUILD_ID_LEN] {
    let mut out = [0u8; BUILD_ID_LEN];
    let id: &[u8] = match option_env!("DROVE_BUILD_ID") {
        Some(s) => s.as_bytes(),
        None => b"dev",
    };
    let mut i = 0;
    while i < BUILD_ID_PREFIX.len() {
        out[i] = BUILD_ID_PREFIX[i];
        i += 1;
    }
    let mut j = 0;
    while j < id.len() && BUILD_ID_PREFIX.len() + j < BUILD_ID_LEN - 1 {
        out[BUILD_ID_PREFIX.len() + j] = id[j];
        j += 1;
    }
    out
}

/// A marker in the binary naming this build (`DROVE_BUILD_ID` at compile
/// time, "dev" otherwise). It is read from the binary's own data at run
/// time, so two builds of one version tell themselves apart in `version()`
/// (the upgrade tests patch it to make a "different build" cheaply).
#[used]
static BUILD_ID: [u8; BUILD_ID_LEN] = build_id_bytes();

pub fn build_id() -> String {
    let bytes: &[u8; BUILD_ID_LEN] = std::hint::black_box(&BUILD_ID);
    let id = &bytes[BUILD_ID_PREFIX.len()..];
    let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    String::from_utf8_lossy(&id[..end]).into_owned()
}

/// `0.1.0 (dev)`: the package version and the build id.
pub fn version() -> String {
    format!("{} ({})", env!("CARGO_PKG_VERSION"), build_id())
}
