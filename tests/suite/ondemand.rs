//! A pool on demand (`pool.min = 0`), droved's exit when idle
//! (`pool.idle_exit`) and systemd's fd store (issue 15, parts 1-3): real
//! droved, real workers, real connections on 127.0.0.1.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);

/// "7 workers ready (min 0, ...)" -> 7.
fn ready_in(status: &str) -> u32 {
    status
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn on_demand_config(min: u32, extra: &str) -> String {
    format!(
        r#"
[worker]
command = ["{{worker}}"]
ready = "notify"
[pool]
min = {min}
max = 8
{extra}
[scale]
cooldown = "500ms"
"#
    )
}

/// Waits until droved has no worker left and says so.
fn wait_zero(d: &mut Droved, timeout: Duration) {
    d.wait_for("no workers", timeout, |u| {
        u.status.starts_with("0 workers ready") && !u.status.contains("stopping")
    });
    eventually("the last worker exits", timeout, || {
        d.workers().is_empty().then_some(())
    });
}

#[test]
fn min_zero_has_no_worker_at_idle_and_the_first_request_succeeds() {
    let mut d = Droved::builder("ondemand-first")
        .config(&on_demand_config(0, ""))
        .start();
    let up = d.wait_ready();
    assert!(up.status.starts_with("0 workers ready"), "{}", up.status);
    // Idle: a while with no connection starts nothing.
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.workers().is_empty(), "{:?}\n{}", d.workers(), d.log());

    let t = Instant::now();
    let body = d.get("/").expect("the first request is answered");
    let took = t.elapsed();
    let pid = answered_pid(&body);
    assert!(d.workers().contains(&pid), "{body}");
    assert!(
        d.log().contains("waiting at zero workers: scale up 0 -> 1"),
        "{}",
        d.log()
    );
    eprintln!("first request from zero: {took:?}");

    // Back to zero after a cooldown (500 ms) with no queue and no busy
    // worker; then the next request wakes it again.
    wait_zero(&mut d, 10 * SEC);
    assert!(d.log().contains("no workers; waiting for a connection"));
    let again = answered_pid(&d.get("/").expect("answered after going back to zero"));
    assert_ne!(again, pid, "a new worker");
}

/// One request that takes 3 s: six cooldowns of an empty queue pass while
/// its worker is busy; the worker must not get a stop meanwhile.
fn busy_last_worker_stays(mut d: Droved) -> Droved {
    d.wait_ready();
    let port = d.port;
    let slow = std::thread::spawn(move || http_get(("127.0.0.1", port), "/sleep?ms=3000"));
    d.wait_status("1 worker ready", 10 * SEC);
    std::thread::sleep(2 * SEC);
    assert_eq!(d.workers().len(), 1, "{}", d.log());
    assert!(
        !d.log().contains("scale down 1 -> 0"),
        "the busy worker was told to stop:\n{}",
        d.log()
    );
    let body = slow.join().unwrap().expect("the slow request is answered");
    assert!(body.contains("slept_ms=3000"), "{body}");
    wait_zero(&mut d, 10 * SEC);
    d
}

/// The step to zero that waits for a busy worker is not a decision yet:
/// it is counted once, when taken, and the wake from zero is counted too.
#[test]
fn a_busy_last_worker_is_not_scaled_away() {
    let (_reservation, mport) = reserve_port();
    let metrics = format!("[metrics]\nlisten = \"127.0.0.1:{mport}\"\n");
    let d = Droved::builder("ondemand-busy")
        .config(&(on_demand_config(0, "") + &metrics))
        .start();
    let _d = busy_last_worker_stays(d);
    let text = super::metrics::scrape(mport);
    let count = |series: &str| super::metrics::sample(&text, series);
    assert_eq!(
        count(r#"drove_scale_decisions_total{direction="down",reason="quiet"}"#),
        Some(1.0),
        "one step to zero, taken once the worker was idle\n{text}"
    );
    assert_eq!(
        count(r#"drove_scale_decisions_total{direction="up",reason="wake"}"#),
        Some(1.0),
        "the wake from zero\n{text}"
    );
}

#[test]
fn a_busy_worker_of_another_user_is_not_scaled_away_without_cap_sys_ptrace() {
    // As under the packaged unit: droved lacks CAP_SYS_PTRACE, so the
    // wchan of a worker of another uid reads "0"; the open connections
    // on the listener tell instead.
    let config = on_demand_config(0, "").replace(
        "ready = \"notify\"",
        "ready = \"notify\"\nuser = \"nobody\"",
    );
    busy_last_worker_stays(
        Droved::builder("ondemand-busy-nobody")
            .launcher(&["setpriv", "--bounding-set", "-sys_ptrace", "--"])
            .config(&format!(
                "[listen]\naddresses = [\"127.0.0.1:{{port}}\"]\n{config}"
            ))
            .start(),
    );
}

/// The most workers ready at once while a burst of 32 clients runs.
fn peak_under_burst(min: u32) -> u32 {
    let mut d = Droved::builder(&format!("ondemand-burst-{min}"))
        .config(&on_demand_config(min, ""))
        .start();
    d.wait_ready();
    assert_eq!(d.workers().len() as u32, min);
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=50", 32, 15 * SEC);
    let up = d.wait_for("8 ready workers", 10 * SEC, |u| ready_in(&u.status) >= 8);
    let at = up.statuses.iter().position(|s| ready_in(s) >= 8).unwrap();
    let took = up.status_times[at].duration_since(load.started_at());
    assert!(took <= 2 * SEC, "min {min}: 8 ready after {took:?}");
    eprintln!("min {min}: 8 workers ready {took:?} after the burst began");
    let ok = load.finish_clean();
    assert!(ok > 0);
    let peak = d
        .upward()
        .statuses
        .iter()
        .map(|s| ready_in(s))
        .max()
        .unwrap();
    if min == 0 {
        wait_zero(&mut d, 15 * SEC);
    }
    peak
}

#[test]
fn a_burst_from_zero_reaches_the_same_pool_as_from_two() {
    let from_two = peak_under_burst(2);
    let from_zero = peak_under_burst(0);
    assert_eq!(from_zero, from_two);
    assert_eq!(from_zero, 8);
}

#[test]
fn reload_and_upgrade_at_zero_keep_waiting_for_a_connection() {
    let dir = Scratch::new("ondemand-upgrade-bin");
    let binary = dir.join("droved");
    droved_build(&binary, "zero-0");
    let mut d = Droved::builder("ondemand-events")
        .binary(&binary)
        .config(&on_demand_config(0, ""))
        .start();
    d.wait_ready();
    let pid = d.pid();
    // Reload with no worker: nothing to roll, READY=1 at once.
    d.ready_again_after("READY=1 after a reload at zero", 10 * SEC, |d| {
        d.signal(Signal::SIGHUP)
    });
    assert!(d.workers().is_empty(), "{}", d.log());
    // Upgrade with no worker: the new image waits for a connection too.
    droved_build(&binary, "zero-1");
    d.ready_again_after("READY=1 after an upgrade at zero", 20 * SEC, |d| {
        d.signal(Signal::SIGUSR2)
    });
    eventually("the new build took over", 10 * SEC, || {
        d.log()
            .contains("droved 0.1.0 (zero-1) took over 0 workers")
            .then_some(())
    });
    assert_eq!(d.pid(), pid);
    assert!(d.workers().is_empty(), "{}", d.log());
    let wakes = d.log_count("waiting at zero workers");
    let body = d.get("/").expect("answered after the upgrade");
    assert!(d.workers().contains(&answered_pid(&body)));
    assert_eq!(
        d.log_count("waiting at zero workers"),
        wakes + 1,
        "the new image's watch woke the pool:\n{}",
        d.log()
    );
    // Stop at zero (after going back to it): exits at once, 0.
    wait_zero(&mut d, 10 * SEC);
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(10 * SEC).success());
    assert!(d.upward().stopping);
}

#[test]
fn idle_exit_under_socket_activation_exits_0() {
    let mut d = Droved::builder("ondemand-idle-exit")
        .launcher(&[
            "systemd-socket-activate",
            "-l",
            "127.0.0.1:{port}",
            "-E",
            "NOTIFY_SOCKET",
            "-E",
            "DROVE_LOG",
        ])
        .config(&on_demand_config(0, "idle_exit = \"1s\""))
        .start();
    // systemd-socket-activate starts droved on the first connection.
    let first = eventually("the first connection is served", 20 * SEC, || {
        d.get("/").ok()
    });
    assert!(first.contains("pid="), "{first}");
    // Back to zero after a cooldown, then 1 s at zero: STOPPING=1, exit 0.
    let t = Instant::now();
    let status = d.wait_exit(20 * SEC);
    assert!(status.success(), "{status:?}\n{}", d.log());
    assert!(t.elapsed() >= SEC, "{:?}", t.elapsed());
    assert!(d.upward().stopping, "STOPPING=1 before the exit");
    assert!(d.log().contains("(pool.idle_exit): exiting"), "{}", d.log());
}

#[test]
fn idle_exit_is_refused_without_socket_activation() {
    let mut d = Droved::builder("ondemand-idle-refused")
        .droved_binds()
        .config(&format!(
            "[listen]\naddresses = [\"127.0.0.1:{{port}}\"]\n{}",
            on_demand_config(0, "idle_exit = \"10m\"")
        ))
        .start();
    let status = d.wait_exit(10 * SEC);
    assert!(!status.success());
    assert!(
        d.log().contains(
            "pool.idle_exit needs socket activation: droved's sockets were not passed by systemd"
        ),
        "{}",
        d.log()
    );
    // Nor can a reload bring it in.
    let mut d = Droved::builder("ondemand-idle-reload")
        .droved_binds()
        .config(&format!(
            "[listen]\naddresses = [\"127.0.0.1:{{port}}\"]\n{}",
            on_demand_config(0, "")
        ))
        .start();
    d.wait_ready();
    let path = d.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("max = 8", "max = 8\nidle_exit = \"10m\""),
    )
    .unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log(
        "reload on SIGHUP rejected: pool.idle_exit needs socket activation",
        1,
        10 * SEC,
    );
    assert!(d.try_exit().is_none());
}

/// Starts `droved ARGS...` as systemd would after restarting a unit with
/// a filled fd store: sockets at fds 3.. with LISTEN_FDS, LISTEN_PID and
/// LISTEN_FDNAMES. Each of `KIND=NAME` (the launcher's arguments up to
/// `--`) is one fd: `udp`, `tcp` (listening on 127.0.0.1:PORT or port 0),
/// `unix` (listening on a path of its own).
const STORE_LAUNCHER: &str = r#"
import os, socket, sys
split = sys.argv.index("--")
specs, argv = sys.argv[1:split], sys.argv[split + 1:]
socks, names = [], []
for spec in specs:
    kind, name = spec.split("=", 1)
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
    elif kind.startswith("tcp"):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(kind[3:] or 0)))
        s.listen(16)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind("\0drove-test-%d-%d" % (os.getpid(), len(socks)))
        s.listen(16)
    socks.append(s)
    names.append(name)
high = [os.dup(s.fileno()) for s in socks]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
os.environ["LISTEN_FDS"] = str(len(socks))
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDNAMES"] = ":".join(names)
os.execvp(argv[0], argv)
"#;

#[test]
fn stored_fds_are_taken_back_and_bad_ones_closed_and_bound_anew() {
    let scratch = Scratch::new("ondemand-fdstore");
    let script = scratch.join("store.py");
    std::fs::write(&script, STORE_LAUNCHER).unwrap();
    let sock = scratch.join("app.sock");
    let unix_name = format!("drove-fdstore.unix.{}", sock.display());
    let script_arg = script.display().to_string();
    let unix_spec = format!("udp={unix_name}");
    let mut d = Droved::builder("ondemand-fdstore")
        .launcher(&[
            "python3",
            &script_arg,
            // Not a listener: for the unix address.
            &unix_spec,
            // The right kind: taken back.
            "tcp{port}=drove-fdstore.tcp.127.0.0.1%3A{port}",
            // The wrong family: a unix listener for a TCP address.
            "unix=drove-fdstore.tcp.127.0.0.1%3A0",
            // A listener the configuration no longer has.
            "tcp=drove-fdstore.tcp.127.0.0.1%3A1",
            "--",
        ])
        .config(&format!(
            r#"
[listen]
addresses = [{{ address = "unix:{}", name = "web" }}, "127.0.0.1:{{port}}", "127.0.0.1:0"]
[worker]
command = ["{{worker}}"]
ready = "notify"
[pool]
min = 1
max = 1
"#,
            sock.display()
        ))
        .start();
    d.wait_ready();
    let log = d.log();
    for needle in [
        &format!(
            "the fd systemd kept for unix:{} ({unix_name}) is not a listening stream socket; closed it and binding anew",
            sock.display()
        ) as &str,
        "the fd systemd kept for 127.0.0.1:0 (drove-fdstore.tcp.127.0.0.1%3A0) is a unix socket, not a TCP one; closed it and binding anew",
        &format!(
            "took drove=127.0.0.1:{} back from systemd's fd store",
            d.port
        ),
        "systemd kept a listener (drove-fdstore.tcp.127.0.0.1%3A1) that the configuration no longer has; closing it",
        &format!(
            "handed web=unix:{} to systemd's fd store as {unix_name}",
            sock.display()
        ),
    ] {
        assert!(log.contains(needle), "{needle:?} not in\n{log}");
    }
    assert_eq!(d.log_count("to systemd's fd store as"), 2, "{log}");
    // Both the taken-back and the new listeners serve.
    let pid = answered_pid(&d.get("/").expect("the taken-back listener serves"));
    assert_eq!(
        answered_pid(&http_get_unix(&sock, "/").expect("the rebound one serves")),
        pid
    );
    // droved holds exactly its three listeners (plus its own fds): the
    // closed ones are gone, so are their sockets.
    let sockets = fds_of(d.pid())
        .iter()
        .filter(|(fd, link)| (3..=6).contains(fd) && link.starts_with("socket:"))
        .count();
    assert!(sockets <= 3, "{:?}", fds_of(d.pid()));
    // With the fd store in use the socket file stays at exit: a restarted
    // droved takes the same socket back.
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(10 * SEC).success());
    assert!(sock.exists(), "the socket file stays for the fd store");
}
