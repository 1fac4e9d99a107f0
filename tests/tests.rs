//! drove's integration tests: one test binary (fast to link), one module
//! per area. They start the real `droved` with real workers and sockets.
//!
//! Where new tests go:
//! - `suite/core.rs`: workers, socket-activation contract, readiness,
//!   supervision, stopping, config errors;
//! - `suite/scale.rs`: autoscaling under real load;
//! - `suite/dbus.rs`: the D-Bus interface and drovectl, on a private
//!   dbus-daemon, also as an unprivileged caller;
//! - `suite/harness.rs`: shared helpers (start droved, wait for its
//!   READY=1/STATUS=, HTTP requests, /proc inspection). Every wait there
//!   has a deadline and waits on a signal, not a sleep.

mod suite;
