//! Real servers that break the worker contract, and what droved makes of
//! them (issue 18, "Bad input"): it says what is wrong and how to fix it,
//! backs off, and never fork-storms.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::harness::*;
use crate::matrix::*;

/// SIGTERM: droved exits 0 and no process of the pool is left.
fn stop_clean(d: &mut Droved) {
    let mut tree = d.workers();
    for w in tree.clone() {
        tree.extend(descendants(w));
    }
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(20 * SEC);
    assert!(status.success(), "droved: {status}\n{}", d.log());
    eventually("no process of the server left", 5 * SEC, || {
        tree.iter().all(|&p| !alive(p)).then_some(())
    });
}

/// A server that does not speak sd_notify (Node) configured with
/// `ready = "notify"`: it serves, but never sends READY=1. Each worker is
/// stopped at ready_timeout, and the error says what to change.
#[test]
fn notify_mode_without_ready_1_fails_with_a_hint_to_use_exec() {
    let node = program("node");
    let app = repo().join("tests/compat/apps/hello.js");
    let mut d = Droved::builder("no-ready")
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
command = ["{node}", "{app}"]
ready = "notify"
ready_timeout = "500ms"
stop_timeout = "5s"
[pool]
min = 2
max = 2
"#,
            app = app.display()
        ))
        .start();
    let status = d.wait_status("FAILING", 20 * SEC);
    assert!(!d.upward().ready, "never ready without READY=1");
    let hint = "ready = \"exec\"";
    assert!(
        status.contains("READY=1") && status.contains(hint),
        "STATUS should say no READY=1 came and suggest {hint}: {status:?}"
    );
    let log = d.log();
    let timeouts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("event=\"timeout\""))
        .collect();
    assert!(!timeouts.is_empty(), "{log}");
    assert!(
        timeouts
            .iter()
            .all(|l| l.contains("READY=1") && l.contains(hint)),
        "each ready timeout names the missing READY=1 and suggests {hint}: {timeouts:#?}"
    );
    // Backed off like any failed start, not restarted at once forever.
    let starts = d.log_count("event=\"started\"");
    assert!(d.log_count("restarting in") > 0 || starts <= 8, "{log}");
    stop_clean(&mut d);
}

/// A server that ignores LISTEN_FDS and binds its own port (Python's
/// http.server): the first worker gets the port, its siblings die on
/// EADDRINUSE. The pool must show FAILING with the exit status and back
/// off, for as long as that lasts, and not restart the siblings at once
/// forever because one worker stays up; the server's own error is in the
/// same output stream as droved's report.
#[test]
fn a_server_binding_its_own_port_is_failing_with_backoff_not_a_fork_storm() {
    let (_reserved, own_port) = own_port();
    let mut d = Droved::builder("own-port")
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
command = ["/usr/bin/python3", "-m", "http.server", "{own_port}", "--bind", "127.0.0.1"]
ready = "exec"
restart_delay = "100ms"
restart_delay_max = "10s"
min_uptime = "1s"
stop_timeout = "5s"
[pool]
min = 3
max = 3
"#
        ))
        .start();
    let status = d.wait_status("FAILING", 20 * SEC);
    assert!(
        status.contains("exited with status 1"),
        "FAILING names the exit status: {status:?}"
    );
    // Watch for 4 s, well past min_uptime of the worker holding the port:
    // still FAILING at every sample, and forks held back by the back-off.
    let started = d.log_count("event=\"started\"");
    let end = Instant::now() + 4 * SEC;
    while Instant::now() < end {
        let now = d.upward().status;
        assert!(
            now.contains("FAILING"),
            "the pool stopped reporting FAILING while its siblings still die: {now:?}\n{}",
            tail(&d.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let forks = d.log_count("event=\"started\"") - started;
    assert!(
        forks <= 8,
        "{forks} workers started in 4 s: the back-off does not hold\n{}",
        tail(&d.log(), 40)
    );
    let log = d.log();
    assert!(
        log.contains("Address already in use"),
        "the server's own error is in droved's output stream\n{log}"
    );
    assert!(
        log.contains("exited with status 1") && log.contains("restarting in"),
        "{log}"
    );
    stop_clean(&mut d);
}
