//! The droved core: workers, the socket-activation contract, readiness,
//! supervision and stopping, against the real binary and real processes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);

#[test]
fn serves_from_n_distinct_workers() {
    let mut d = Droved::example_pool("distinct", 4);
    let up = d.wait_ready();
    assert!(
        up.status.starts_with("4 workers ready (min 4, max 4)"),
        "{}",
        up.status
    );
    // Four requests that each hold a worker for 300 ms, at once: each must
    // be answered by a different process.
    let answers = concurrent_gets(d.port, "/sleep?ms=300", 4);
    let pids: BTreeSet<i32> = answers
        .iter()
        .map(|a| answered_pid(a.as_ref().unwrap()))
        .collect();
    assert_eq!(pids.len(), 4, "answers: {answers:?}");
    let workers: BTreeSet<i32> = d.workers().into_iter().collect();
    assert_eq!(pids, workers, "the answering pids are droved's children");
}

#[test]
fn workers_get_the_socket_activation_contract_and_nothing_else() {
    // `sleep` as the worker: it opens nothing itself, so /proc/PID/fd shows
    // exactly what droved handed over. droved binds both sockets itself
    // (the contract for sockets droved opens, named from the config).
    let scratch = Scratch::new("contract-sock");
    let sock = scratch.join("api.sock");
    let mut d = Droved::builder("contract")
        .droved_binds()
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}", {{ address = "unix:{}", name = "api" }}]
[worker]
command = ["sleep", "600"]
ready = "exec"
environment = {{ APP_MODE = "test" }}
[pool]
min = 2
max = 2
"#,
            sock.display()
        ))
        .start();
    d.wait_ready();
    let workers = d.workers();
    assert_eq!(workers.len(), 2);
    let mut slots = BTreeSet::new();
    for pid in workers {
        // "exec" readiness means execve happened, not that `sleep` is done
        // starting: its loader and setlocale open and close files (ld.so.cache,
        // libc, locale files) for a moment after. Read /proc once it sleeps.
        eventually("the worker to reach its sleep", 10 * SEC, || {
            let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).ok()?;
            wchan.contains("nanosleep").then_some(())
        });
        assert_eq!(
            env_of(pid, "LISTEN_PID"),
            Some(pid.to_string()),
            "LISTEN_PID is the worker's own pid"
        );
        assert_eq!(env_of(pid, "LISTEN_FDS").as_deref(), Some("2"));
        assert_eq!(env_of(pid, "LISTEN_FDNAMES").as_deref(), Some("drove:api"));
        assert_eq!(env_of(pid, "APP_MODE").as_deref(), Some("test"));
        assert_eq!(env_of(pid, "DROVE_GENERATION").as_deref(), Some("1"));
        assert!(env_of(pid, "NOTIFY_SOCKET").unwrap().ends_with("/notify"));
        slots.insert(env_of(pid, "DROVE_WORKER").unwrap());
        let fds = fds_of(pid);
        let numbers: Vec<i32> = fds.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            numbers,
            vec![0, 1, 2, 3, 4],
            "only stdio and the two listeners: {fds:?}"
        );
        assert!(
            fds[3].1.starts_with("socket:") && fds[4].1.starts_with("socket:"),
            "{fds:?}"
        );
    }
    assert_eq!(slots, BTreeSet::from(["0".to_string(), "1".to_string()]));
}

#[test]
fn killed_worker_is_replaced_and_serves() {
    let mut d = Droved::example_pool("replace", 2);
    d.wait_ready();
    let before = d.workers();
    let victim = before[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let after = eventually("a replacement worker", 10 * SEC, || {
        let now = d.workers();
        (now.len() == 2 && !now.contains(&victim)).then_some(now)
    });
    let replacement = *after.iter().find(|p| !before.contains(p)).unwrap();
    // The replacement accepts: hold the survivor busy, so the next request
    // must be served by the replacement.
    let survivor = *before.iter().find(|&&p| p != victim).unwrap();
    let port = d.port;
    let busy = std::thread::spawn(move || concurrent_gets(port, "/sleep?ms=1500", 1));
    let answer = eventually("the replacement answers", 10 * SEC, || {
        let pid = answered_pid(&d.get("/").ok()?);
        (pid != survivor).then_some(pid)
    });
    assert_eq!(answer, replacement);
    busy.join().unwrap();
    assert!(
        d.log().contains(&format!("worker {victim} (slot")),
        "exit logged with pid and slot"
    );
    assert!(
        d.log().contains("exited with signal SIGKILL"),
        "{}",
        d.log()
    );
}

#[test]
fn crashing_command_is_backed_off_and_reported_failing() {
    let mut d = Droved::builder("crash")
        .args(&[
            "-l",
            "127.0.0.1:{port}",
            "-w",
            "2",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .start();
    let status = d.wait_status("FAILING", 10 * SEC);
    assert!(status.contains("exited with status 3"), "{status}");
    // Watch for 3 s: the backoff keeps forks far below a fork storm. An
    // observation window (it asserts an absence), counted by droved's own
    // log times, so a test thread that oversleeps on a busy machine does
    // not widen it.
    let from = SystemTime::now();
    std::thread::sleep(3 * SEC);
    let forks = d
        .log_times("started")
        .into_iter()
        .filter(|&t| t >= from && t < from + 3 * SEC)
        .count();
    assert!(forks <= 8, "{forks} forks in 3 s");
    assert!(d.try_exit().is_none(), "droved stays up");
    assert!(
        d.upward().status.starts_with("0 workers ready"),
        "{}",
        d.upward().status
    );
}

#[test]
fn sigterm_stops_gracefully_and_kills_stubborn_workers() {
    let worker = r#"
stop_timeout = "1s"
environment = { WORKER_IGNORE_TERM = "1" }
"#;
    let mut d = Droved::start_ready("term", &example_config(2, 2, worker, ""));
    let workers = d.workers();
    let t0 = Instant::now();
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(15 * SEC);
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(
        took >= Duration::from_millis(900),
        "stop_timeout honoured: {took:?}"
    );
    assert!(d.upward().stopping, "STOPPING=1 sent");
    for pid in workers {
        assert!(!alive(pid), "worker {pid} is gone");
    }
    assert!(d.log().contains("sending SIGKILL"), "{}", d.log());
}

#[test]
fn sigterm_with_cooperative_workers_exits_promptly() {
    let mut d = Droved::example_pool("term-ok", 3);
    d.wait_ready();
    let workers = d.workers();
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(10 * SEC).code(), Some(0));
    assert!(workers.iter().all(|&p| !alive(p)));
    assert!(!d.log().contains("sending SIGKILL"));
}

#[test]
fn sigint_is_a_fast_stop() {
    let mut d = Droved::builder("int")
        .config(
            r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = ["{worker}"]
stop_timeout = "30s"
environment = { WORKER_IGNORE_TERM = "1" }
[pool]
min = 2
max = 2
"#,
        )
        .start();
    d.wait_ready();
    let t0 = Instant::now();
    d.signal(Signal::SIGINT);
    assert_eq!(d.wait_exit(10 * SEC).code(), Some(0));
    assert!(t0.elapsed() < 5 * SEC, "no 30 s grace on a fast stop");
}

#[test]
fn notify_mode_waits_for_ready_and_replaces_workers_that_never_get_ready() {
    let mut d = Droved::builder("notify")
        .config(&example_config(
            2,
            2,
            r#"environment = { WORKER_READY_DELAY_MS = "1200" }"#,
            "",
        ))
        .start();
    let t0 = Instant::now();
    // The first status that mentions starting workers, even if a slow
    // test thread only looks after a later one arrived.
    let early = d
        .wait_for("a status with workers starting", 5 * SEC, |u| {
            u.statuses.iter().any(|s| s.contains("starting"))
        })
        .statuses
        .into_iter()
        .find(|s| s.contains("starting"))
        .unwrap();
    assert!(
        early.starts_with("0 workers ready"),
        "not ready before READY=1: {early}"
    );
    d.wait_ready();
    assert!(
        t0.elapsed() >= Duration::from_millis(1100),
        "READY=1 only after the workers' READY=1"
    );
    assert!(
        d.upward().status.starts_with("2 workers ready"),
        "{}",
        d.upward().status
    );
    drop(d);

    let worker = r#"
ready_timeout = "500ms"
environment = { WORKER_NO_READY = "1" }
"#;
    let d = Droved::builder("notify-never")
        .config(&example_config(1, 1, worker, ""))
        .start();
    let first = eventually("a worker", 5 * SEC, || d.workers().first().copied());
    eventually("the unready worker is replaced", 10 * SEC, || {
        let now = d.workers();
        (!now.is_empty() && !now.contains(&first)).then_some(())
    });
    assert!(d.log().contains("not ready in time"), "{}", d.log());
    assert!(!d.upward().ready);
}

#[test]
fn watchdog_kills_and_replaces_a_silent_worker() {
    let d = Droved::start_ready(
        "watchdog",
        &example_config(1, 1, r#"watchdog = "600ms""#, ""),
    );
    let first = d.workers()[0];
    assert_eq!(env_of(first, "WATCHDOG_USEC").as_deref(), Some("600000"));
    // Pinging workers are left alone for several intervals... (an
    // observation window: it asserts an absence, and only gets longer on
    // a busy machine; the worker pings every 300 ms.)
    std::thread::sleep(2 * SEC);
    assert_eq!(d.workers(), vec![first], "a pinging worker is not killed");
    // ...and a silent one is replaced.
    d.get("/stop-watchdog").unwrap();
    eventually("the silent worker is replaced", 10 * SEC, || {
        let now = d.workers();
        (now.len() == 1 && now[0] != first).then_some(())
    });
    assert!(d.log().contains("watchdog timeout"), "{}", d.log());
}

#[test]
fn ttin_and_ttou_move_the_target_within_limits() {
    let mut d = Droved::builder("ttin")
        .args(&[
            "-l",
            "127.0.0.1:{port}",
            "--min",
            "1",
            "--max",
            "3",
            "--",
            "{worker}",
        ])
        .start();
    d.wait_ready();
    assert_eq!(d.workers().len(), 1);
    // Signals of one kind coalesce while pending, so send one at a time
    // and wait for its effect, as an operator would.
    d.signal(Signal::SIGTTIN);
    d.wait_status("2 workers ready (min 1, max 3)", 10 * SEC);
    d.signal(Signal::SIGTTIN);
    d.wait_status("3 workers ready (min 1, max 3)", 10 * SEC);
    d.signal(Signal::SIGTTIN);
    eventually("clamped at max", 10 * SEC, || {
        d.log().contains("target stays 3").then_some(())
    });
    assert_eq!(d.workers().len(), 3);
    d.signal(Signal::SIGTTOU);
    d.wait_status("2 workers ready", 10 * SEC);
}

/// A reload that lowers `max` below the target brings the target down
/// as a reported decision (journal line with event=scale), not silently.
#[test]
fn a_reload_that_lowers_max_scales_down_and_says_so() {
    let mut d = Droved::builder("reload-max")
        .config(
            r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = ["{worker}"]
[pool]
min = 1
max = 4
"#,
        )
        .start();
    d.wait_ready();
    for n in 2..=3 {
        d.signal(Signal::SIGTTIN);
        d.wait_status(&format!("{n} workers ready (min 1, max 4)"), 10 * SEC);
    }
    let config = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(d.config_path(), config.replace("max = 4", "max = 2")).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_status("2 workers ready (min 1, max 2)", 20 * SEC);
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("scale down 3 -> 2"))
        .unwrap_or_else(|| panic!("no scale line for the new max:\n{log}"));
    assert!(
        line.contains("above max 2") && line.contains("event=\"scale\""),
        "{line}"
    );
}

#[test]
fn garbage_on_the_worker_notify_socket_changes_nothing() {
    // Ignored datagrams are logged one by one only at trace level.
    let mut d = Droved::builder("garbage")
        .args(&["-l", "127.0.0.1:{port}", "-w", "2", "--", "{worker}"])
        .env("DROVE_LOG", "debug,drove::sys::notify_socket=trace")
        .start();
    d.wait_ready();
    let workers = d.workers();
    let address = env_of(workers[0], "NOTIFY_SOCKET").unwrap();
    // The status once droved has counted busy workers (its first sample
    // comes a moment after READY=1), so the comparison below is of like
    // with like.
    let status = d.wait_status(", 0 busy,", 10 * SEC);
    let payloads: Vec<Vec<u8>> = vec![
        b"READY=1".to_vec(),
        b"STOPPING=1\nWATCHDOG=trigger".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x01],
        vec![b'A'; 10_000],
        b"=\n==\nREADY\n\n".to_vec(),
        Vec::new(),
    ];
    let sock = std::os::unix::net::UnixDatagram::unbound().unwrap();
    let sent = payloads
        .iter()
        .filter(|p| sock.send_to(p, &address).is_ok())
        .count();
    // Everything above came from a pid that is not a worker: droved must
    // ignore it all. It logs each datagram it ignores: wait until it read
    // them all, then compare.
    d.wait_log("not a worker ignored", sent, 10 * SEC);
    for _ in 0..5 {
        d.get("/").unwrap();
    }
    assert!(d.try_exit().is_none());
    assert_eq!(d.workers(), workers, "no worker stopped or replaced");
    d.wait_status("2 workers ready", 5 * SEC);
    assert_eq!(d.upward().status, status);
    assert!(
        d.log().contains("from processes that are not workers"),
        "the summary line\n{}",
        d.log()
    );
}

#[test]
fn bad_config_errors_name_file_line_and_column() {
    let dir = temp_dir("badconfig");
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[pool]\nmin = 4\nmax = 2\n").unwrap();
    let out = std::process::Command::new(DROVED)
        .args(["--check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:2:7", path.display())), "{err}");
    assert!(err.contains("must not exceed pool.max"), "{err}");

    std::fs::write(
        &path,
        "[worker]\ncommand = [\"x\"]\nready = \"sometimes\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(DROVED)
        .args(["--check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains(":3:9") && err.contains("notify"), "{err}");

    std::fs::write(
        &path,
        "[listen]\naddresses = [\"127.0.0.1:8080\"]\n[worker]\ncommand = \"true\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(DROVED)
        .args(["--check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/drove.toml");
    let out = std::process::Command::new(DROVED)
        .args(["--check", "-c", example])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn usage_errors_exit_2() {
    let out = std::process::Command::new(DROVED)
        .args(["--workers", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = std::process::Command::new(DROVED)
        .args(["-l", "localhost:80", "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("127.0.0.1"),
        "suggests a literal address"
    );
}

#[test]
fn missing_worker_command_is_a_clear_startup_error() {
    let mut d = Droved::builder("nocmd")
        .args(&["-l", "127.0.0.1:{port}", "--", "/nonexistent/app-server"])
        .start();
    let status = d.wait_exit(10 * SEC);
    assert_eq!(status.code(), Some(1));
    assert!(
        d.log()
            .contains("/nonexistent/app-server is not an executable file"),
        "{}",
        d.log()
    );
}

#[test]
fn socket_activation_with_tcp_and_unix_and_names() {
    let scratch = Scratch::new("activate-sock");
    let sock = scratch.join("app.sock");
    let sock_arg = sock.display().to_string();
    let mut d = Droved::builder("activate")
        .launcher(&[
            "systemd-socket-activate",
            "-l",
            "127.0.0.1:{port}",
            "-l",
            &sock_arg,
            "--fdname=web:admin",
            "-E",
            "NOTIFY_SOCKET",
            "-E",
            "DROVE_LOG",
        ])
        .args(&["-w", "2", "--", "{worker}"])
        .start();
    // systemd-socket-activate starts droved on the first connection, like
    // a .socket unit: that request must be answered by a worker.
    let first = eventually("the first connection is served", 20 * SEC, || {
        d.get("/").ok()
    });
    d.wait_ready();
    assert!(d.workers().contains(&answered_pid(&first)));
    let workers = d.workers();
    assert_eq!(workers.len(), 2, "{}", d.log());
    for &pid in &workers {
        assert_eq!(env_of(pid, "LISTEN_FDNAMES").as_deref(), Some("web:admin"));
        assert_eq!(env_of(pid, "LISTEN_FDS").as_deref(), Some("2"));
        assert_eq!(env_of(pid, "LISTEN_PID"), Some(pid.to_string()));
    }
    let via_tcp = answered_pid(&d.get("/").unwrap());
    let via_unix = answered_pid(&http_get_unix(&sock, "/").unwrap());
    assert!(workers.contains(&via_tcp) && workers.contains(&via_unix));
    assert!(d.log().contains("web=127.0.0.1:"), "{}", d.log());
}

#[test]
fn status_line_reports_the_queue() {
    let mut d = Droved::example_pool("queue", 1);
    d.wait_ready();
    assert!(
        d.upward().status.contains("queue 0"),
        "{}",
        d.upward().status
    );
}

#[test]
fn workers_do_not_outlive_a_killed_droved() {
    let mut d = Droved::example_pool("orphans", 3);
    d.wait_ready();
    let workers = d.workers();
    assert_eq!(workers.len(), 3);
    d.signal(Signal::SIGKILL);
    d.wait_exit(10 * SEC);
    // PR_SET_PDEATHSIG delivers the stop signal: they finish and exit
    // instead of serving on as orphans.
    eventually("orphaned workers exit", 10 * SEC, || {
        workers.iter().all(|&p| !alive(p)).then_some(())
    });
}
