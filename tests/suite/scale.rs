//! Autoscaling under real load: real droved, real example workers, real
//! connections on 127.0.0.1 or a unix socket, bounded in count and time.

use std::time::{Duration, Instant, SystemTime};

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);

/// "7 workers ready (min 1, ...)" -> 7.
fn ready_in(status: &str) -> u32 {
    status
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn scaling_pool(builder: Builder, listen: &str) -> Droved {
    builder
        .config(&format!(
            r#"
[listen]
addresses = ["{listen}"]
[worker]
command = ["{{worker}}"]
ready = "notify"
[pool]
min = 1
max = 8
[scale]
cooldown = "500ms"
"#
        ))
        .start()
}

fn burst_scales_up_fast_and_decays_to_min(mut d: Droved, target: Target) {
    d.wait_ready();
    assert_eq!(ready_in(&d.upward().status), 1, "{}", d.upward().status);
    let load = Load::start(target, "/sleep?ms=50", 32, 15 * SEC);
    let up = d.wait_for("at least 7 ready workers", 10 * SEC, |u| {
        ready_in(&u.status) >= 7
    });
    // From the burst's first request to droved's report of the pool:
    // when those happened, not when a busy test thread got to look.
    let at = up.statuses.iter().position(|s| ready_in(s) >= 7).unwrap();
    let took = up.status_times[at].duration_since(load.started_at());
    assert!(
        took <= SEC,
        "pool reached {:?} after {took:?} (limit 1 s)",
        up.statuses[at]
    );
    let ok = load.finish_clean();
    assert!(ok > 0);
    assert!(
        d.log().contains("scale up 1 -> 8"),
        "decision logged with its reason:\n{}",
        d.log()
    );
    // After the load: one worker per cooldown (500 ms) back to min = 1;
    // 7 steps = 3.5 s, plus margin for a noisy 2-core machine.
    let t1 = Instant::now();
    d.wait_for("back to min", 12 * SEC, |u| {
        u.status.starts_with("1 worker ready")
    });
    assert!(
        t1.elapsed() >= Duration::from_millis(1500),
        "decay is gradual, not a drop: {:?}",
        t1.elapsed()
    );
    eventually("scaled-down workers exit", 10 * SEC, || {
        (d.workers().len() == 1).then_some(())
    });
    assert!(
        d.log().contains("queue empty for"),
        "scale-down reason logged"
    );
}

#[test]
fn tcp_burst_scales_up_within_a_second_and_decays() {
    let d = scaling_pool(Droved::builder("scale-tcp"), "127.0.0.1:{port}");
    let port = d.port;
    burst_scales_up_fast_and_decays_to_min(d, Target::Tcp(port));
}

#[test]
fn unix_burst_scales_up_within_a_second_and_decays() {
    let scratch = Scratch::new("scale-unix-sock");
    let sock = scratch.join("app.sock");
    let d = scaling_pool(
        Droved::builder("scale-unix").droved_binds(),
        &format!("unix:{}", sock.display()),
    );
    burst_scales_up_fast_and_decays_to_min(d, Target::Unix(sock));
}

#[test]
fn steady_load_does_not_oscillate() {
    let mut d = Droved::start_ready("steady", &example_config(1, 8, "", ""));
    // Four clients in a closed loop: four workers serve them fully. With
    // the default cooldown (10 s) a pool that exactly fits may probe one
    // worker down once and come back, no more.
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=50", 4, 20 * SEC);
    d.wait_for("the pool grew for the load", 10 * SEC, |u| {
        ready_in(&u.status) >= 4
    });
    // Let it settle, then count decisions over 10 s: an observation
    // window (it asserts an absence), counted by droved's own log times so
    // a test thread that oversleeps on a busy machine does not widen it.
    std::thread::sleep(2 * SEC);
    let from = SystemTime::now();
    std::thread::sleep(10 * SEC);
    let events = d
        .log_times("event=\"scale\"")
        .into_iter()
        .filter(|&t| t >= from && t < from + 10 * SEC)
        .count();
    let ok = load.finish_clean();
    assert!(ok > 200, "the load ran: {ok} requests");
    assert!(
        events <= 2,
        "{events} scale events in 10 s of steady load:\n{}",
        d.log()
    );
}

#[test]
fn fixed_pool_reports_its_queue_and_never_scales() {
    // A fixed pool still probes and shows the queue; with min == max the
    // scaler never changes the target, whatever the queue says.
    // droved binds `-l` itself here: the queue probe on a socket of its own.
    let mut d = Droved::builder("fixed")
        .droved_binds()
        .args(&["-l", "127.0.0.1:{port}", "-w", "2", "--", "{worker}"])
        .start();
    d.wait_ready();
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=100", 16, 3 * SEC);
    let queued = d.wait_for("a non-empty queue", 5 * SEC, |u| {
        u.status
            .split(", queue ")
            .nth(1)
            .and_then(|q| q.parse::<u32>().ok())
            .unwrap_or(0)
            > 0
    });
    assert!(
        queued.status.starts_with("2 workers ready"),
        "{}",
        queued.status
    );
    load.finish();
    assert_eq!(d.workers().len(), 2, "min == max disables scaling");
    assert!(!d.log().contains("event=\"scale\""), "{}", d.log());
}

#[test]
fn cpu_bound_load_is_not_met_with_more_workers() {
    cpu_bound_pool_is_held(0);
}

/// The same with other processes keeping the CPUs busy: the workers then
/// get a fraction of a CPU each and wait for it, which must not make them
/// look like workers that sleep.
#[test]
fn cpu_bound_pool_is_held_on_a_host_loaded_by_others() {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    cpu_bound_pool_is_held(2 * cores);
}

/// A CPU-bound app gains nothing from more processes than cores (2 here,
/// any count works), so the guard must hold the pool well below max and
/// say why, with `hogs` busy loops running beside it.
fn cpu_bound_pool_is_held(hogs: usize) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u32;
    let max = 4 * cores + 4;
    let mut d = Droved::start_ready("cpu-bound", &example_config(1, max, "", ""));
    let _hog = (hogs > 0).then(|| CpuHog::start(hogs, 60 * SEC));
    // Watch the scaler for 40 of its ticks under load (4 s at its 100 ms
    // tick; droved logs a "queue sample" per tick that sees a queue): an
    // observation window (it asserts an absence of growth) counted in
    // droved's own decisions, so a busy machine cannot shorten it.
    let samples = d.log_count("queue sample");
    let load = Load::start(
        Target::Tcp(d.port),
        "/cpu?ms=40",
        2 * max as usize,
        30 * SEC,
    );
    d.wait_log("queue sample", samples + 40, 25 * SEC);
    let most = d
        .upward()
        .statuses
        .iter()
        .map(|s| ready_in(s))
        .max()
        .unwrap_or(0);
    let (ok, _) = load.finish();
    assert!(ok > 0);
    assert!(
        d.log().contains("of the CPUs"),
        "the CPU reason is logged:\n{}",
        d.log()
    );
    let decisions: Vec<String> = d
        .log()
        .lines()
        .filter(|l| l.contains("scale") || l.contains("queue sample") || l.contains("early probe"))
        .map(String::from)
        .collect();
    assert!(
        most <= 2 * cores + 1,
        "pool grew to {most} workers on {cores} cores for a CPU-bound app \
         ({hogs} busy loops beside it; {}):\n{}",
        host_pressure(),
        decisions.join("\n")
    );
}

/// A burst is seen when its first connection arrives, not at the next
/// scale tick: with ticks 3 s apart, the pool grows well within one tick.
/// Without the arrival watch the first scale-up would wait for the next
/// regular tick, ~3 s after the burst (the load starts right after a tick).
#[test]
fn a_burst_is_seen_on_arrival_not_at_the_next_tick() {
    let scale = r#"
[scale]
interval = "3s"
window = "6s"
cooldown = "60s"
"#;
    let mut d = Droved::start_ready("scale-arrival", &example_config(1, 8, "", scale));
    // Armed at the end of a regular tick: the next one is 3 s away.
    d.wait_log(
        "watching the listeners for the next connection",
        1,
        10 * SEC,
    );
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=300", 16, 4 * SEC);
    let up = d.wait_for("at least 4 ready workers", 10 * SEC, |u| {
        ready_in(&u.status) >= 4
    });
    let at = up.statuses.iter().position(|s| ready_in(s) >= 4).unwrap();
    let took = up.status_times[at].duration_since(load.started_at());
    assert!(
        took < Duration::from_millis(1500),
        "pool reached {:?} {took:?} after the burst began; the next tick was 3 s away",
        up.statuses[at]
    );
    assert!(load.finish_clean() > 0);
    assert!(
        d.log().contains("early probe after an arrival"),
        "{}",
        d.log()
    );
}

/// Busy loops that load the host from outside droved: each in its own
/// session (as droved's workers are, so the kernel's per-session autogroup
/// gives each hog a worker's weight), each ended by `timeout` after
/// `limit` even if the test dies, and stopped when dropped.
struct CpuHog {
    hogs: Vec<std::process::Child>,
}

impl CpuHog {
    fn start(n: usize, limit: Duration) -> CpuHog {
        let secs = limit.as_secs().max(1).to_string();
        let hogs = (0..n)
            .map(|_| {
                std::process::Command::new("setsid")
                    .args(["timeout", &secs, "sh", "-c", "while :; do :; done"])
                    .stdin(std::process::Stdio::null())
                    .spawn()
                    .expect("start a busy loop (setsid, timeout, sh)")
            })
            .collect();
        CpuHog { hogs }
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        // SIGTERM to `timeout` (setsid exec'd it): it passes the signal on
        // to its busy loop and exits; SIGKILL would leave the loop running.
        for hog in &mut self.hogs {
            let pid = nix::unistd::Pid::from_raw(hog.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = hog.wait();
        }
    }
}

/// How busy the machine is outside droved: the host's CPU pressure
/// (PSI "some" avg10), for the failure text.
fn host_pressure() -> String {
    std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|t| t.lines().next().map(String::from))
        .unwrap_or_else(|| "unknown".into())
}

/// An I/O-bound pool (each request sleeps 20 ms) on a host whose CPUs are
/// kept busy by other processes: its workers wait for a CPU whenever they
/// wake, yet they mostly sleep, so more of them still serve more. The CPU
/// guard must not take the wait for CPU-bound work and hold the pool.
#[test]
fn io_bound_pool_grows_on_a_host_loaded_by_others() {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let d = Droved::start_ready("io-loaded-host", &example_config(2, 16, "", ""));
    let _hog = CpuHog::start(2 * cores, 40 * SEC);
    // Let the hogs take the CPUs before the burst.
    eventually("the host is loaded", 10 * SEC, || {
        let load: f64 = std::fs::read_to_string("/proc/loadavg")
            .ok()?
            .split_whitespace()
            .nth(3)?
            .split('/')
            .next()?
            .parse()
            .ok()?;
        (load >= cores as f64).then_some(())
    });
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=20", 32, 15 * SEC);
    // Not wait_for: a pool that never grows must still show the decisions.
    let deadline = Instant::now() + 8 * SEC;
    let took = loop {
        let up = d.upward();
        if let Some(at) = up.statuses.iter().position(|s| ready_in(s) >= 10) {
            break Some(up.status_times[at].duration_since(load.started_at()));
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let pressure = host_pressure();
    let ok = load.finish_clean();
    assert!(ok > 0);
    let decisions: Vec<String> = d
        .log()
        .lines()
        .filter(|l| l.contains("scale") || l.contains("cpu-bound"))
        .map(String::from)
        .collect();
    let took = took.unwrap_or_else(|| {
        panic!(
            "the I/O-bound pool did not reach 10 ready in 8 s on a loaded host ({pressure}):\n{}",
            decisions.join("\n")
        )
    });
    assert!(
        took <= 5 * SEC,
        "the I/O-bound pool reached 10 ready after {took:?} (limit 5 s; {pressure}):\n{}",
        decisions.join("\n")
    );
    // One sample may misread on a host this loaded (a full test run seen
    // holding for one tick, 94 ms, then 2 -> 16); the old rule held it for
    // seconds (7.1 s), which the deadline above fails.
    let holds = d.log_count("cpu-bound");
    assert!(
        holds <= 1,
        "an I/O-bound pool was held as cpu-bound {holds} times:\n{}",
        decisions.join("\n")
    );
}
