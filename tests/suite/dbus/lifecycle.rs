//! droved's lifecycle as D-Bus shows it: the sequence of the State
//! property in PropertiesChanged signals (read with dbus-monitor, as any
//! observer would) for each transition, and the stops that must win over a
//! rollout or an upgrade in progress.

use super::*;

/// The State values droved signals, in order, read by dbus-monitor.
struct StateWatch {
    _monitor: Reaped,
    states: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl StateWatch {
    /// Starts watching before droved exists, so no change is missed.
    fn start(bus: &Bus) -> StateWatch {
        let rule = "type='signal',interface='org.freedesktop.DBus.Properties',\
                    member='PropertiesChanged',path='/org/drove/Drove1'";
        let mut child = Command::new("dbus-monitor")
            .args(["--address", &bus.address, rule])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-monitor (Debian package dbus) must be installed");
        let (tx, states) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut next_is_state = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // A monitor gets NameAcquired then NameLost once it is one.
                if line.contains("member=NameLost") {
                    let _ = ready_tx.send(());
                }
                let line = line.trim();
                if next_is_state {
                    // variant             string "running"
                    if let Some(v) = line.strip_prefix("variant") {
                        let v = v
                            .trim()
                            .trim_start_matches("string")
                            .trim()
                            .trim_matches('"');
                        if tx.send(v.to_string()).is_err() {
                            break;
                        }
                    }
                }
                next_is_state = line == "string \"State\"";
            }
        });
        ready
            .recv_timeout(10 * SEC)
            .expect("dbus-monitor did not become a monitor");
        StateWatch {
            _monitor: Reaped(child),
            states,
            seen: Vec::new(),
        }
    }

    /// The next State change (repeats of the same value are skipped).
    fn next(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let state = self.states.recv_timeout(left).ok()?;
            if self.seen.last() != Some(&state) {
                self.seen.push(state.clone());
                return Some(state);
            }
        }
    }

    /// Skips whatever droved showed while starting, up to "running".
    fn until_running(&mut self) {
        while self.next(20 * SEC).as_deref() != Some("running") {
            assert!(self.seen.len() < 10, "never running: {:?}", self.seen);
        }
    }

    /// The next states must be exactly `want`.
    fn expect(&mut self, want: &[&str]) {
        let from = self.seen.len();
        for _ in want {
            if self.next(20 * SEC).is_none() {
                break;
            }
        }
        assert_eq!(
            &self.seen[from..],
            want,
            "State sequence on D-Bus (all seen: {:?})",
            self.seen
        );
    }
}

/// A droved run from a copy of the binary in `dir`, so a test can replace
/// it on disk before an upgrade.
fn droved_from_copy(bus: &Bus, dir: &Scratch, instance: &str, extra: &str) -> Droved {
    let binary = dir.join("droved");
    droved_build(&binary, "old");
    let mut d = bus
        .droved_builder(instance, &config(2, 2, extra))
        .binary(&binary)
        .start();
    d.wait_ready();
    d
}

/// Puts a shell script where droved's binary was: what the next upgrade's
/// preflight runs.
fn replace_binary_with_script(dir: &Scratch, body: &str) {
    install_executable(
        &dir.join("droved"),
        format!("#!/bin/sh\n{body}\n").as_bytes(),
    );
}

fn assert_stops_cleanly(d: &mut Droved, workers: &[i32]) {
    let status = d.wait_exit(20 * SEC);
    assert!(status.success(), "droved exit: {status}\n{}", d.log());
    for &w in workers {
        eventually("workers gone", 10 * SEC, || (!alive(w)).then_some(()));
    }
}

#[test]
fn reload_shows_reloading_then_running() {
    let bus = Bus::start();
    let mut states = StateWatch::start(&bus);
    let mut d = bus.droved("st-reload", 2, 2);
    states.until_running();
    d.ready_again_after("READY=1 after the reload", 20 * SEC, |d| {
        d.signal(Signal::SIGHUP)
    });
    states.expect(&["reloading", "running"]);
}

#[test]
fn upgrade_shows_upgrading_then_running_from_the_new_image() {
    let bus = Bus::start();
    let mut states = StateWatch::start(&bus);
    let mut d = bus.droved("st-upgrade", 2, 2);
    states.until_running();
    d.ready_again_after("READY=1 after the upgrade", 20 * SEC, |_| {
        assert_eq!(
            bus.json(&["--instance", "st-upgrade", "upgrade"])["ok"],
            true
        )
    });
    // "running" comes from the new image, which signals its properties
    // once it serves: without that, observers would keep "upgrading".
    states.expect(&["upgrading", "running"]);
}

#[test]
fn refused_upgrade_shows_upgrading_then_running_again() {
    let bus = Bus::start();
    let dir = Scratch::new("st-refused");
    let mut states = StateWatch::start(&bus);
    let mut d = droved_from_copy(&bus, &dir, "st-refused", "");
    states.until_running();
    replace_binary_with_script(&dir, "echo 'config is bad' >&2; exit 1");
    let out = bus.ctl(&["--instance", "st-refused", "upgrade"]);
    assert_exit(&out, 1, &["config is bad"]);
    states.expect(&["upgrading", "running"]);
    assert!(d.try_exit().is_none(), "still serving");
    assert!(d.get("/").is_ok());
}

/// Runs `drovectl ARGS` in the background, waits until droved shows
/// `state`, stops it with SIGTERM, and checks that the stop wins: State
/// goes to "stopping", the waiting caller fails and is told why, and droved
/// exits cleanly with its workers.
fn stop_while_a_caller_waits(
    bus: &Bus,
    states: &mut StateWatch,
    d: &mut Droved,
    args: &[&str],
    state: &str,
) {
    let workers = d.workers();
    let caller = bus
        .command(&[], args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    states.expect(&[state]);
    d.signal(Signal::SIGTERM);
    states.expect(&["stopping"]);
    let out = caller.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "{args:?} must fail: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("stopping"),
        "the caller is told why: {}",
        text(&out.stderr)
    );
    assert_stops_cleanly(d, &workers);
}

#[test]
fn stop_during_a_rollout_wins_and_the_caller_hears_it() {
    let bus = Bus::start();
    let mut states = StateWatch::start(&bus);
    let mut d = bus.droved("st-stop-roll", 2, 2);
    states.until_running();
    // The new generation takes 30 s to get ready: the rollout is still
    // waiting for it when the stop comes.
    let current = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(
        d.config_path(),
        format!("{current}\n[worker.environment]\nWORKER_READY_DELAY_MS = \"30000\"\n"),
    )
    .unwrap();
    let args = ["--instance", "st-stop-roll", "reload"];
    stop_while_a_caller_waits(&bus, &mut states, &mut d, &args, "reloading");
}

#[test]
fn stop_during_an_upgrade_preflight_wins_and_the_caller_hears_it() {
    let bus = Bus::start();
    let dir = Scratch::new("st-stop-pre");
    let mut states = StateWatch::start(&bus);
    let mut d = droved_from_copy(&bus, &dir, "st-stop-pre", "");
    states.until_running();
    // A preflight that takes 30 s: the stop comes while it runs.
    replace_binary_with_script(&dir, "sleep 30");
    let args = ["--instance", "st-stop-pre", "upgrade"];
    stop_while_a_caller_waits(&bus, &mut states, &mut d, &args, "upgrading");
    assert!(!d.log().contains("took over"), "no exec after the stop");
}

/// Regression (review): a SIGTERM in the 200 ms between the Upgrade
/// caller's answer and the exec was lost; droved re-executed and ran on,
/// 2 times in 5 by hand, whenever the workers took longer than that to
/// stop. Now the exec happens at once and hands the stop
/// over: the caller's "upgraded" stays true and the new image stops.
#[test]
fn stop_while_the_upgrade_exec_is_due_is_not_lost() {
    let bus = Bus::start();
    // Workers that take a while to stop (here: until SIGKILL after 1 s),
    // as real apps finishing their requests do: the old image was still
    // waiting for them when the exec came.
    let slow_to_stop = r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = ["{worker}"]
ready = "notify"
stop_timeout = "1s"
[worker.environment]
WORKER_IGNORE_TERM = "1"
[pool]
min = 2
max = 2
"#;
    for round in 0..3 {
        let instance = format!("st-stop-exec{round}");
        let mut d = bus.droved_with(&instance, slow_to_stop);
        let workers = d.workers();
        assert_eq!(bus.json(&["--instance", &instance, "upgrade"])["ok"], true);
        d.signal(Signal::SIGTERM);
        assert_stops_cleanly(&mut d, &workers);
        let up = d.upward();
        assert!(up.stopping, "systemd is told: {up:?}");
    }
}
