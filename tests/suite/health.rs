//! `/livez` and `/readyz` on the metrics listener, and the drain of
//! `stop.delay`: real HTTP probes of a real droved in each state
//! (starting, running, at zero with `pool.min = 0`, draining, stopping),
//! requests under load through a drain, and a second stop signal that
//! cuts the drain short.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);

/// Probes until `path` answers `code`; returns the body.
fn wait_probe(port: u16, path: &str, code: u16, timeout: Duration) -> String {
    let mut last = None;
    let what = format!("{path} to answer {code}");
    eventually(&what, timeout, || match probe(port, path) {
        Ok((c, body)) if c == code => Some(body),
        other => {
            last = Some(other);
            None
        }
    })
}

#[test]
fn probes_answer_in_each_state_of_a_pool() {
    let (_reservation, mport) = reserve_port();
    // Workers take 2 s to get ready: long enough to probe "starting".
    let extra = "[worker.environment]\nWORKER_READY_DELAY_MS = \"2000\"";
    let mut d = Droved::builder("health-states")
        .config(&metrics_config(2, 4, &format!("127.0.0.1:{mport}"), extra))
        .start();
    let body = wait_probe(mport, "/readyz", 503, 10 * SEC);
    assert!(body.starts_with("starting"), "{body}");
    assert!(!d.upward().ready, "READY=1 before the probe saw starting");
    // droved's loop turns from the start.
    let (code, body) = probe(mport, "/livez").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("alive"), "{body}");

    d.wait_ready();
    let body = wait_probe(mport, "/readyz", 200, 10 * SEC);
    assert_eq!(body, "ready: 2 workers");
    // HEAD, as some load balancers probe: the status without a body.
    let mut s = TcpStream::connect(("127.0.0.1", mport)).unwrap();
    s.write_all(b"HEAD /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut head = String::new();
    s.read_to_string(&mut head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "a body after a HEAD: {head}");

    // A plain graceful stop (no stop.delay) stops at once.
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(30 * SEC);
    assert!(status.success(), "{status:?}");
    assert!(
        d.log().contains("SIGTERM: graceful stop of 2 workers"),
        "without stop.delay a SIGTERM stops at once:\n{}",
        d.log()
    );
}

/// `pool.min = 0` behind a readiness probe: the pool at zero is ready (a
/// connection starts a worker), and probing it starts none.
#[test]
fn a_pool_at_zero_is_ready_and_probes_wake_no_worker() {
    let (_reservation, mport) = reserve_port();
    let d = Droved::start_ready(
        "health-zero",
        &metrics_config(0, 2, &format!("127.0.0.1:{mport}"), ""),
    );
    for _ in 0..20 {
        let (code, body) = probe(mport, "/readyz").unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.starts_with("at zero workers"), "{body}");
        let (code, body) = probe(mport, "/livez").unwrap();
        assert_eq!(code, 200, "{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        d.workers().is_empty(),
        "probes woke a worker: {:?}",
        d.workers()
    );
    // A request to the app does wake one, and it serves.
    d.get("/").expect("a request wakes the pool");
    let body = wait_probe(mport, "/readyz", 200, 10 * SEC);
    assert!(
        body.starts_with("ready: 1 workers")
            || body.starts_with("at zero")
            || body.starts_with("waking"),
        "{body}"
    );
}

/// When a log line of droved's was written (the first with `needle`).
fn logged_at(d: &Droved, needle: &str) -> SystemTime {
    d.log_times(needle)
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no log line with {needle:?}:\n{}", d.log()))
}

#[test]
fn sigterm_drains_for_stop_delay_while_requests_keep_succeeding() {
    let (_reservation, mport) = reserve_port();
    let mut d = Droved::start_ready(
        "health-drain",
        &metrics_config(
            2,
            2,
            &format!("127.0.0.1:{mport}"),
            "[stop]\ndelay = \"2s\"",
        ),
    );
    wait_probe(mport, "/readyz", 200, 10 * SEC);
    let workers = d.workers();
    assert_eq!(workers.len(), 2);

    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=10", 4, 60 * SEC);
    eventually("the load to get answers", 10 * SEC, || {
        (load.ok() > 20).then_some(())
    });
    let term = Instant::now();
    d.signal(Signal::SIGTERM);
    // Not ready any more at once (well inside the 2 s drain, with room for
    // a loaded machine), while droved still runs.
    let body = wait_probe(mport, "/readyz", 503, 2 * SEC);
    assert!(body.starts_with("draining (stop.delay)"), "{body}");
    let (code, body) = probe(mport, "/livez").unwrap();
    assert_eq!(code, 200, "alive while draining: {body}");
    let during = load.ok();
    // The workers keep accepting: load through most of the delay.
    while term.elapsed() < Duration::from_millis(1700) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.workers(), workers, "the pool changed during the drain");
    let ok = load.finish_clean();
    assert!(
        ok > during + 20,
        "few requests answered during the drain: {during} before, {ok} after"
    );
    let status = d.wait_exit(30 * SEC);
    let statuses = d.upward().statuses;
    assert!(
        statuses.iter().any(|s| s.ends_with("; draining")),
        "STATUS= never said draining: {statuses:?}"
    );
    assert!(d.upward().stopping, "no STOPPING=1");
    assert!(status.success(), "{status:?}\n{}", d.log());
    let exit_after = term.elapsed();
    // The graceful stop began once the delay was over, not before.
    let drain = logged_at(&d, "draining for 2s (stop.delay)");
    let over = logged_at(&d, "stop.delay over: graceful stop of 2 workers");
    let drained = over.duration_since(drain).unwrap();
    assert!(
        drained >= Duration::from_millis(1950),
        "the stop began {drained:?} after the drain"
    );
    // delay + stop_timeout would be 32 s: idle example workers stop at once.
    assert!(exit_after < 12 * SEC, "droved took {exit_after:?} to exit");
}

#[test]
fn a_second_stop_signal_ends_the_drain_at_once() {
    for second in [Signal::SIGTERM, Signal::SIGINT] {
        let (_reservation, mport) = reserve_port();
        let mut d = Droved::start_ready(
            "health-second",
            &metrics_config(
                1,
                1,
                &format!("127.0.0.1:{mport}"),
                "[stop]\ndelay = \"60s\"",
            ),
        );
        d.signal(Signal::SIGTERM);
        wait_probe(mport, "/readyz", 503, 5 * SEC);
        // Still serving.
        d.get("/").expect("a worker answers during the drain");
        let t = Instant::now();
        d.signal(second);
        let status = d.wait_exit(20 * SEC);
        assert!(status.success(), "{second}: {status:?}\n{}", d.log());
        assert!(
            t.elapsed() < 10 * SEC,
            "{second}: exit took {:?}",
            t.elapsed()
        );
        assert!(
            d.log().contains(&format!("{second} during the drain")),
            "{}",
            d.log()
        );
    }
}

/// A drain with min 0 at zero: a connection during the drain still wakes a
/// worker (the load balancer may not have taken the instance out yet).
#[test]
fn a_connection_during_the_drain_wakes_a_pool_at_zero() {
    let (_reservation, mport) = reserve_port();
    let mut d = Droved::start_ready(
        "health-drain-zero",
        &metrics_config(
            0,
            2,
            &format!("127.0.0.1:{mport}"),
            "[stop]\ndelay = \"30s\"",
        ),
    );
    d.signal(Signal::SIGTERM);
    let body = wait_probe(mport, "/readyz", 503, 5 * SEC);
    assert!(body.starts_with("draining"), "{body}");
    let answer = d.get("/").expect("a connection during the drain is served");
    assert!(answer.contains("pid="), "{answer}");
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success());
}

/// SIGTTIN and SIGTTOU during the drain change nothing, as `drovectl
/// scale` is refused then: before, TTIN started a worker that the stop
/// after the drain ended at once.
#[test]
fn ttin_and_ttou_during_the_drain_leave_the_pool_as_it_is() {
    let (_reservation, mport) = reserve_port();
    let mut d = Droved::start_ready(
        "health-drain-ttin",
        &metrics_config(
            1,
            4,
            &format!("127.0.0.1:{mport}"),
            "[stop]\ndelay = \"30s\"",
        ),
    );
    let workers = d.workers();
    d.signal(Signal::SIGTERM);
    wait_probe(mport, "/readyz", 503, 5 * SEC);
    d.signal(Signal::SIGTTIN);
    d.wait_log("SIGTTIN ignored: droved is draining", 1, 5 * SEC);
    d.signal(Signal::SIGTTOU);
    d.wait_log("SIGTTOU ignored: droved is draining", 1, 5 * SEC);
    assert_eq!(d.workers(), workers, "{}", d.log());
    assert_eq!(d.log_count("SIGTTIN: scale"), 0, "{}", d.log());
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success());
}

/// A SIGTERM during a rolling restart drains too: the rollout ends where
/// it stands (old and new workers alike keep serving), and the stop
/// follows the delay.
#[test]
fn a_stop_during_a_rollout_drains_the_pool_as_it_stands() {
    let (_reservation, mport) = reserve_port();
    let base = metrics_config(
        2,
        2,
        &format!("127.0.0.1:{mport}"),
        "[stop]\ndelay = \"2s\"",
    );
    let base = base.replace(
        "ready = \"notify\"",
        "ready = \"notify\"\nstop_timeout = \"5s\"",
    );
    let mut d = Droved::start_ready("health-rollout", &base);
    let old = d.workers();
    // New workers that take long to get ready keep the rollout going.
    let slow = format!("{base}\n[worker.environment]\nWORKER_READY_DELAY_MS = \"20000\"\n");
    let slow = slow
        .replace("{port}", &d.port.to_string())
        .replace("{worker}", &example_worker().display().to_string());
    std::fs::write(d.config_path(), slow).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("state running -> reloading", 1, 10 * SEC);
    d.signal(Signal::SIGTERM);
    let body = wait_probe(mport, "/readyz", 503, 5 * SEC);
    assert!(body.starts_with("draining"), "{body}");
    d.wait_log("state reloading -> draining", 1, 5 * SEC);
    // The old generation serves through the drain.
    for _ in 0..10 {
        let answer = d.get("/").expect("served during the drain");
        assert!(
            old.contains(&answered_pid(&answer)),
            "{answer} not from {old:?}"
        );
    }
    let status = d.wait_exit(30 * SEC);
    assert!(status.success(), "{status:?}\n{}", d.log());
    assert!(
        d.log().contains("stop.delay over: graceful stop"),
        "{}",
        d.log()
    );
}
