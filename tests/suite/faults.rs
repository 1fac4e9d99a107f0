//! Fault injection: worker kill storms, hung workers, restart churn (leak
//! checks), recycling, fork failure, signal bursts in every phase.
//!
//! Bounded by default; `DROVE_SOAK=1` runs the long forms (50 kills/s for
//! 20 s, 10,000 restarts). Each test appends a row to
//! `<target dir>/fault-summary.tsv`, which `tests/run` prints as a table:
//! fault, injected, requests, failed, allowed failures, daemon restarts, leaks.

use std::io::Write;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);

fn soak() -> bool {
    std::env::var("DROVE_SOAK").is_ok_and(|v| v == "1")
}

/// Appends one row to the summary table `tests/run` prints.
fn summary(
    fault: &str,
    injected: u64,
    requests: u64,
    failed: u64,
    allowed: u64,
    restarts: u64,
    leaks: &str,
) {
    // target/debug/deps/tests-… -> target/ (also under CARGO_TARGET_DIR).
    let exe = std::env::current_exe().unwrap();
    let path = exe.ancestors().nth(3).unwrap().join("fault-summary.tsv");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    writeln!(
        f,
        "{fault}\t{injected}\t{requests}\t{failed}\t{allowed}\t{restarts}\t{leaks}"
    )
    .unwrap();
}

fn pool(workers: u32, extra_worker: &str) -> String {
    example_config(
        workers,
        workers,
        &format!("stop_timeout = \"2s\"\n{extra_worker}"),
        "spawn_rate = 200",
    )
}

/// droved's own resources: open fds, zombie children, resident memory (KiB).
/// droved's fds (not counting its pidfds, one per live child, which
/// follow the number of workers alive at the moment), zombie children and
/// RSS in KiB; and its pidfds.
fn resources(pid: i32) -> (usize, usize, u64, usize) {
    let (pidfds, fds): (Vec<_>, Vec<_>) = fds_of(pid)
        .into_iter()
        .partition(|(_, target)| target == "anon_inode:[pidfd]");
    let fds = fds.len();
    let zombies = children_of(pid)
        .into_iter()
        .filter(|&c| {
            std::fs::read_to_string(format!("/proc/{c}/stat"))
                .map(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(false)
        })
        .count();
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        })
        .unwrap_or(0);
    (fds, zombies, rss, pidfds.len())
}

#[test]
fn kill_storm_loses_only_requests_in_flight_on_killed_workers() {
    let (rate, secs) = if soak() { (50, 20) } else { (20, 5) };
    let mut d = Droved::builder("kill-storm").config(&pool(8, "")).start();
    d.wait_ready();
    let load = Load::start(
        Target::Tcp(d.port),
        "/sleep?ms=10",
        32,
        Duration::from_secs(secs + 30),
    );
    eventually("load flows", 10 * SEC, || (load.ok() > 20).then_some(()));
    let mut kills = 0u64;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let workers = d.workers();
        if !workers.is_empty() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let victim = workers[(rng % workers.len() as u64) as usize];
            if kill(Pid::from_raw(victim), Signal::SIGKILL).is_ok() {
                kills += 1;
            }
        }
        // The injection rate, part of the scenario.
        std::thread::sleep(SEC / rate);
    }
    // The pool returns to its target and serves.
    d.wait_for("8 ready workers again", 30 * SEC, |u| {
        u.status.starts_with("8 workers ready")
    });
    let (ok, errors) = load.finish();
    assert!(d.try_exit().is_none(), "droved survived {kills} kills");
    // A synchronous worker has at most one request in flight: each kill
    // may fail that one request, nothing else.
    assert!(
        errors.len() as u64 <= kills,
        "{} failures for {kills} kills: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    assert!(
        !d.upward().status.contains("FAILING"),
        "killed healthy workers are not a failing command"
    );
    summary(
        "worker SIGKILL storm",
        kills,
        ok + errors.len() as u64,
        errors.len() as u64,
        kills,
        0,
        "-",
    );
}

#[test]
fn a_stopped_worker_is_caught_by_the_watchdog() {
    let mut d = Droved::builder("sigstop")
        .config(&pool(2, "watchdog = \"500ms\""))
        .start();
    d.wait_ready();
    let victim = d.workers()[0];
    kill(Pid::from_raw(victim), Signal::SIGSTOP).unwrap();
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=5", 4, 20 * SEC);
    eventually("the stopped worker is replaced", 10 * SEC, || {
        let now = d.workers();
        (!now.contains(&victim) && now.len() == 2).then_some(())
    });
    let (ok, errors) = load.finish();
    assert!(
        d.log()
            .contains(&format!("worker {victim}: watchdog timeout")),
        "{}",
        d.log()
    );
    // Connections the stopped worker had accepted die with it (at most one).
    assert!(errors.len() <= 1, "{errors:?}");
    summary(
        "worker SIGSTOP (watchdog)",
        1,
        ok + errors.len() as u64,
        errors.len() as u64,
        1,
        0,
        "-",
    );
}

#[test]
fn a_stopped_worker_cannot_hold_up_shutdown() {
    let mut d = Droved::builder("sigstop-term").config(&pool(2, "")).start();
    d.wait_ready();
    let victim = d.workers()[0];
    kill(Pid::from_raw(victim), Signal::SIGSTOP).unwrap();
    let t0 = Instant::now();
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(15 * SEC).code(), Some(0));
    assert!(
        t0.elapsed() >= Duration::from_millis(1900),
        "stop_timeout (2 s) was waited for"
    );
    assert!(!alive(victim), "the stopped worker was killed");
    summary("worker SIGSTOP during stop", 1, 0, 0, 0, 0, "-");
}

#[test]
fn restart_churn_leaks_no_fds_zombies_or_memory() {
    let restarts: usize = if soak() { 10_000 } else { 1_000 };
    // Workers that serve briefly and exit on their own (status 0 after
    // 20 ms), so droved restarts them as fast as its spawn budget allows;
    // once the file `quiet` exists, new workers stay up, and the churn
    // stops.
    let mut d = Droved::builder("churn")
        .config(
            r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = ["sh", "-c", "test -e {dir}/quiet && exec sleep 600; sleep 0.02"]
ready = "exec"
min_uptime = "1ms"
[pool]
min = 8
max = 8
spawn_rate = 1000
"#,
        )
        .env("DROVE_LOG", "info")
        .start();
    d.wait_ready();
    d.wait_log("started", 200, 30 * SEC);
    let before = resources(d.pid());
    let t0 = Instant::now();
    d.wait_log(
        "started",
        restarts + 200,
        Duration::from_secs(if soak() { 900 } else { 120 }),
    );
    let took = t0.elapsed();
    // Compare at a quiet point: stop the churn and wait until every slot
    // holds a worker that stays. droved starts a slot's new worker only
    // after it reaped the old one, so any zombie left then is a leak, not
    // an exit droved has yet to see (sampling during the churn counted
    // those on a busy machine).
    std::fs::write(d.dir.join("quiet"), "").unwrap();
    eventually("8 workers that stay", 30 * SEC, || {
        let staying = d
            .workers()
            .into_iter()
            .filter(|&p| {
                std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c == b"sleep\x00600\x00")
            })
            .count();
        (staying == 8).then_some(())
    });
    let after = resources(d.pid());
    assert!(d.try_exit().is_none());
    assert!(
        after.0 <= before.0,
        "fds grew from {} to {}",
        before.0,
        after.0
    );
    assert!(after.1 <= 1, "{} zombies", after.1);
    // One pidfd per child: the 8 workers (a pidfd kept past its reap is a
    // leak that the count above no longer sees).
    let children = children_of(d.pid()).len();
    assert!(
        after.3 <= children,
        "{} pidfds for {children} children",
        after.3
    );
    assert!(
        after.2 <= before.2 + 2048,
        "RSS grew from {} KiB to {} KiB",
        before.2,
        after.2
    );
    summary(
        "worker restart churn",
        restarts as u64,
        0,
        0,
        0,
        0,
        &format!(
            "fds {}->{}, zombies {}, rss {}->{} KiB, {:.0} restarts/s",
            before.0,
            after.0,
            after.1,
            before.2,
            after.2,
            restarts as f64 / took.as_secs_f64()
        ),
    );
}

#[test]
fn max_lifetime_recycles_workers_without_failing_a_request() {
    let mut d = Droved::builder("lifetime")
        .config(&pool(
            3,
            "max_lifetime = \"1s\"\nmax_lifetime_jitter = \"500ms\"",
        ))
        .start();
    d.wait_ready();
    let first = d.workers();
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=20", 16, 30 * SEC);
    eventually("every original worker recycled", 20 * SEC, || {
        d.workers().iter().all(|p| !first.contains(p)).then_some(())
    });
    let recycled = d.log_count("max_lifetime reached; starting its replacement") as u64;
    let ok = load.finish_clean();
    assert!(recycled >= 3);
    summary("max_lifetime recycling", recycled, ok, 0, 0, 0, "-");
}

#[test]
fn max_rss_recycles_a_bloated_worker() {
    let mut d = Droved::builder("max-rss")
        .config(&pool(
            2,
            "max_rss = \"48MiB\"\nenvironment = { WORKER_MEM_MB = \"64\" }",
        ))
        .start();
    d.wait_ready();
    let first = d.workers();
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=20", 8, 20 * SEC);
    d.wait_log("max_rss exceeded", 2, 15 * SEC);
    eventually("a bloated worker was replaced", 15 * SEC, || {
        d.workers().iter().any(|p| !first.contains(p)).then_some(())
    });
    let ok = load.finish_clean();
    let line = d
        .log()
        .lines()
        .find(|l| l.contains("max_rss exceeded"))
        .unwrap()
        .to_string();
    assert!(line.contains("MiB > 48 MiB"), "{line}");
    summary(
        "max_rss recycling",
        d.log_count("max_rss exceeded") as u64,
        ok,
        0,
        0,
        0,
        "-",
    );
}

/// A pids cgroup (v1 or v2) with `pids.max`, holding droved and its workers.
struct PidsCgroup(std::path::PathBuf);

impl PidsCgroup {
    fn new(tag: &str) -> PidsCgroup {
        let base = ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| {
                p.join("cgroup.procs").exists()
                    && (p.join("pids.max").exists()
                        || p.ends_with("pids")
                        || p.join("cgroup.controllers").exists())
            })
            .expect("a pids cgroup hierarchy (cgroup v1 pids or v2)");
        let dir = base.join(format!("drove-test-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            dir.join("pids.max").exists(),
            "pids controller missing in {}",
            dir.display()
        );
        PidsCgroup(dir)
    }
    fn limit(&self, n: &str) {
        std::fs::write(self.0.join("pids.max"), n).unwrap();
    }
    fn add(&self, pid: i32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn fork_failure_degrades_reports_and_recovers() {
    let cg = PidsCgroup::new("fork");
    let mut d = Droved::builder("fork-fail")
        .config(
            r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = ["{worker}"]
ready = "notify"
restart_delay = "100ms"
restart_delay_max = "500ms"
[pool]
min = 1
max = 6
initial = 1
"#,
        )
        .start();
    d.wait_ready();
    // droved (1 process + its threads) and one worker: allow two more.
    cg.add(d.pid());
    let tasks = std::fs::read_dir(format!("/proc/{}/task", d.pid()))
        .unwrap()
        .count();
    cg.limit(&(tasks + 3).to_string());
    // Ask for 6: forks beyond the limit fail with EAGAIN. Signals of one
    // kind coalesce while pending: send the next once droved took this one.
    for i in 1..=5 {
        d.signal(Signal::SIGTTIN);
        d.wait_log("SIGTTIN: scale", i, 10 * SEC);
    }
    d.wait_log("cannot start worker", 1, 10 * SEC);
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=5", 8, 20 * SEC);
    // Serve under load while droved retries (and fails) two more forks.
    let failed = d.log_count("cannot start worker");
    d.wait_log("cannot start worker", failed + 2, 10 * SEC);
    eventually("load flows", 10 * SEC, || (load.ok() > 20).then_some(()));
    assert!(d.try_exit().is_none(), "droved survives fork failures");
    assert!(d.get("/").is_ok(), "the workers it has keep serving");
    let log = d.log();
    assert!(
        log.contains("Resource temporarily unavailable") || log.contains("EAGAIN"),
        "{log}"
    );
    // Lift the limit: the pool reaches its target.
    cg.limit("max");
    d.wait_for("6 workers ready", 20 * SEC, |u| {
        u.status.starts_with("6 workers ready")
    });
    let ok = load.finish_clean();
    let failed_forks = d.log_count("cannot start worker") as u64;
    summary("fork EAGAIN (pids cgroup)", failed_forks, ok, 0, 0, 0, "-");
    d.signal(Signal::SIGTERM);
    d.wait_exit(10 * SEC);
}

/// A full disk under droved's logs: its stderr (and the workers') is
/// /dev/full, so every log line fails with ENOSPC. Supervision must not
/// notice: restarts, a rolling reload under load, a clean stop.
#[test]
fn a_full_disk_under_the_logs_loses_only_log_lines() {
    let mut d = Droved::builder("disk-full")
        .config(&pool(4, ""))
        .output("/dev/full")
        .start();
    d.wait_ready();
    let victims = d.workers();
    for &w in &victims[..2] {
        kill(Pid::from_raw(w), Signal::SIGKILL).unwrap();
    }
    eventually("the killed workers replaced", 10 * SEC, || {
        let now = d.workers();
        (now.len() == 4 && !now.contains(&victims[0]) && !now.contains(&victims[1])).then_some(())
    });
    d.wait_for("4 workers ready", 10 * SEC, |u| {
        u.status.starts_with("4 workers ready")
    });
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=5", 8, 30 * SEC);
    eventually("load flows", 10 * SEC, || (load.ok() > 20).then_some(()));
    let before = d.workers();
    let done = d.ready_again_after("the rolling restart done", 30 * SEC, |d| {
        d.signal(Signal::SIGHUP)
    });
    assert_eq!(done.reloading, 1);
    eventually("every worker replaced", 20 * SEC, || {
        let now = d.workers();
        (now.len() == 4 && now.iter().all(|p| !before.contains(p))).then_some(())
    });
    let ok = load.finish_clean();
    // An error exit cannot print its message, but still exits 1. This
    // one binds the first one's port itself.
    let mut second = Droved::builder("disk-full-2")
        .droved_binds()
        .args(&["-l", &format!("127.0.0.1:{}", d.port), "--", "{worker}"])
        .output("/dev/full")
        .start();
    let status = second.wait_exit(10 * SEC);
    assert_eq!(
        status.code(),
        Some(1),
        "port in use: {status} (101 = panic)"
    );
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(10 * SEC);
    assert!(status.success(), "droved ended with {status} (101 = panic)");
    summary("disk full (stderr on /dev/full)", 2 + 4, ok, 0, 0, 0, "-");
}

#[test]
fn accept_backlog_overflow_is_survived_and_reported() {
    // droved binds the socket itself, with the configured backlog.
    let mut d = Droved::builder("backlog")
        .droved_binds()
        .config(
            r#"
[listen]
addresses = ["127.0.0.1:{port}"]
backlog = 8
[worker]
command = ["{worker}"]
ready = "notify"
[pool]
min = 1
max = 1
"#,
        )
        .start();
    d.wait_ready();
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=200", 40, 4 * SEC);
    let full = d.wait_for("a full queue", 10 * SEC, |u| {
        u.status.contains("queue 9") || u.status.contains("queue 8")
    });
    let (ok, errors) = load.finish();
    assert!(d.try_exit().is_none());
    assert!(ok > 0);
    assert!(d.get("/").is_ok(), "serving after the overflow");
    summary(
        "listen backlog overflow",
        40,
        ok + errors.len() as u64,
        errors.len() as u64,
        errors.len() as u64,
        0,
        &full.status,
    );
}

#[test]
fn signal_bursts_in_every_phase_lose_nothing() {
    let burst = [
        Signal::SIGHUP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGUSR2,
        Signal::SIGCHLD,
        Signal::SIGHUP,
    ];
    // Workers take a second to get ready, so "starting" lasts a while.
    let mut d = Droved::builder("bursts")
        .config(&pool(
            3,
            "environment = { WORKER_READY_DELAY_MS = \"1000\" }",
        ))
        .start();
    d.wait_status("starting", 10 * SEC);
    for s in burst {
        d.signal(s);
    }
    d.wait_ready();
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=5", 16, 60 * SEC);
    // Running, rolling and upgrading: 20 rounds of mixed bursts, 100 ms
    // apart (the pace is part of the scenario, it waits for nothing).
    for _ in 0..20 {
        for s in burst {
            d.signal(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Settle: the pool is back at its size, on a single generation.
    d.wait_for("3 ready, nothing in progress", 60 * SEC, |u| {
        u.status.starts_with("3 workers ready") && !u.status.contains(';')
    });
    eventually("only current workers", 30 * SEC, || {
        (d.workers().len() == 3).then_some(())
    });
    let ok = load.finish_clean();
    // The old generation kept serving through the storm of rollouts (3
    // workers, 5 ms requests, 2+ s): not a trickle.
    assert!(ok > 300, "only {ok} requests served during the bursts");
    assert!(d.try_exit().is_none());
    // Stopping: bursts after SIGTERM change nothing; exit 0, no leftovers.
    let workers = d.workers();
    d.signal(Signal::SIGTERM);
    for s in burst {
        let _ = kill(Pid::from_raw(d.pid()), s);
    }
    assert_eq!(d.wait_exit(20 * SEC).code(), Some(0), "{}", d.log());
    assert!(workers.iter().all(|&p| !alive(p)));
    summary(
        "signal bursts (HUP/TTIN/TTOU/USR2/CHLD)",
        22 * burst.len() as u64,
        ok,
        0,
        0,
        0,
        "-",
    );
}
