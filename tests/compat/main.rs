//! The compatibility suite: real servers nobody here wrote, unmodified,
//! each run under the real `droved` with its own socket-activation support
//! (issue 18). A server qualifies as a drove worker when it adopts the
//! sockets systemd's protocol hands it (LISTEN_FDS, fd 3..) and, in
//! `ready = "notify"` mode, sends READY=1 to NOTIFY_SOCKET.
//!
//! `tests/run` installs every server first (Debian packages; gunicorn from
//! PyPI into `<target dir>/compat-venv`, made with Debian's /usr/bin/python3)
//! and prints the table the cases append to `<target dir>/compat-summary.tsv`.
//! Nothing is skipped: a missing server fails its case with what to run.
//!
//! Where new tests go:
//! - `servers.rs`: one `#[test]` per server and listener, each a [`Server`]
//!   handed to [`matrix::run`] (distinct workers serve, readiness, a rolling
//!   reload under load with 0 failures, a graceful stop leaving nothing);
//! - `bad_input.rs`: servers that break the contract (no READY=1 in notify
//!   mode, a server binding its own port) and what droved makes of them;
//! - `gunicorn_template.rs`: drove.gunicorn (python/drove) in template
//!   mode beyond its matrix rows: hooks, new code on reload, max_requests,
//!   the watchdog, bad input;
//! - `matrix.rs`: the runner, the table row, process-tree helpers.
//!
//! The shared harness (start droved, wait for its READY=1/STATUS=, load
//! clients) is tests/suite/harness.rs, used as is.
//!
//! [`Server`]: matrix::Server

#[path = "../suite/harness.rs"]
mod harness;

mod bad_input;
mod gunicorn_template;
mod matrix;
mod puma_template;
mod servers;
