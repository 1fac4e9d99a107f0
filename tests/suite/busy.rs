//! Busy and idle workers (issue 26, point 1): droved counts them from the
//! kernel alone (a worker is busy while it holds a connection accepted
//! from droved's listeners), for TCP and unix listeners, whatever the
//! workers' user, as under the packaged unit (root without
//! CAP_SYS_PTRACE); shows them in STATUS=, `drovectl status`/`list` and
//! the metrics; and spares busy workers on scale-down and at min 0.
//! Real droved, real example workers (which tell droved nothing about
//! their requests), real connections.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);
const DROVECTL: &str = env!("CARGO_BIN_EXE_drovectl");
const NO_BUS: &str = "unix:path=/nonexistent/drove-test-no-bus";

/// droved as the packaged unit runs it: root, with only the capabilities
/// of its CapabilityBoundingSet= (no CAP_SYS_PTRACE, no CAP_DAC_OVERRIDE).
const AS_THE_UNIT: [&str; 3] = [
    "setpriv",
    "--bounding-set=-all,+setuid,+setgid,+chown,+kill",
    "--",
];

/// Where a test's unix listener is.
fn unix_sock(tag: &str) -> PathBuf {
    temp_dir(tag).join("web.sock")
}

/// A pool of example workers on `listen`, as `user`.
fn config(listen: &str, user: Option<&str>, min: u32, max: u32, extra: &str) -> String {
    let user = user
        .map(|u| format!("user = \"{u}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
[listen]
addresses = ["{listen}"]
[worker]
command = ["{{worker}}"]
ready = "notify"
{user}[pool]
min = {min}
max = {max}
{extra}
"#
    )
}

/// `drovectl --instance INSTANCE ARGS` over droved's private socket.
fn ctl(instance: &str, args: &[&str]) -> Output {
    Command::new(DROVECTL)
        .args(["--bus", "private", "--instance", instance])
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", NO_BUS)
        .env("DBUS_SESSION_BUS_ADDRESS", NO_BUS)
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ctl_json(instance: &str, args: &[&str]) -> Value {
    let mut argv = vec!["--json"];
    argv.extend_from_slice(args);
    let out = ctl(instance, &argv);
    assert!(
        out.status.success(),
        "drovectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A request that keeps a worker busy for `ms`, in a thread; its answer.
fn slow(to: Target, ms: u64) -> std::thread::JoinHandle<std::io::Result<String>> {
    std::thread::spawn(move || {
        let path = format!("/sleep?ms={ms}");
        match to {
            Target::Tcp(port) => http_get(("127.0.0.1", port), &path),
            Target::Unix(sock) => http_get_unix(&sock, &path),
        }
    })
}

/// A request that answers at once; the pid of the worker that took it.
fn quick(to: &Target) -> i32 {
    let body = match to {
        Target::Tcp(port) => http_get(("127.0.0.1", *port), "/"),
        Target::Unix(sock) => http_get_unix(sock, "/"),
    };
    answered_pid(&body.expect("a quick request is answered"))
}

/// Whether an example worker holds a connection, as the test sees it: a
/// unix stream socket beside its listener (its notify socket is a
/// datagram socket), independent of what droved reports.
fn holds_a_connection(pid: i32) -> bool {
    let sockets: Vec<u64> = fds_of(pid)
        .iter()
        .filter_map(|(_, t)| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect();
    let streams = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let connected = streams
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Type 0001 (stream), state 03 (connected).
            f.get(4) == Some(&"0001") && f.get(5) == Some(&"03")
        })
        .filter_map(|l| l.split_whitespace().nth(6)?.parse::<u64>().ok())
        .filter(|i| sockets.contains(i))
        .count();
    connected > 0
}

/// Two workers of three held busy by slow requests: droved counts 2 busy
/// and 1 idle everywhere it reports, names the busy ones in `list`, and
/// back to 0 busy once they are answered.
fn counts_busy_and_idle(mut d: Droved, instance: &str, to: Target, metrics: Option<u16>) {
    d.wait_ready();
    d.wait_status(", 0 busy", 10 * SEC);
    // Long enough for a report that waits QUIET_TCP_DUMP_EVERY (5 s) on a
    // busy host to see them, with time left to look.
    let requests: Vec<_> = (0..2).map(|_| slow(to.clone(), 12000)).collect();
    let status = d.wait_status(", 2 busy", 10 * SEC);
    assert!(status.starts_with("3 workers ready"), "{status}");

    let st = ctl_json(instance, &["status"]);
    assert_eq!(
        (st["busy"].as_u64(), st["idle"].as_u64()),
        (Some(2), Some(1)),
        "{st}"
    );
    let text = String::from_utf8_lossy(&ctl(instance, &["status"]).stdout).into_owned();
    assert!(text.contains("3 ready (2 busy, 1 idle)"), "{text}");

    let list = ctl_json(instance, &["list"]);
    let busy: Vec<i64> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["busy"] == Value::Bool(true))
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    assert_eq!(busy.len(), 2, "{list}");
    for w in list.as_array().unwrap() {
        let secs = &w["busy_secs"];
        match w["busy"].as_bool() {
            Some(true) => assert!(secs.as_f64().is_some_and(|s| s >= 0.0), "{w}"),
            Some(false) => assert!(secs.is_null(), "{w}"),
            None => panic!("a ready worker of unknown activity: {w}"),
        }
    }
    let table = String::from_utf8_lossy(&ctl(instance, &["list"]).stdout).into_owned();
    assert!(table.lines().next().unwrap().contains("BUSY"), "{table}");
    assert_eq!(table.matches(" idle ").count(), 1, "{table}");

    if let Some(port) = metrics {
        let text = http_get(("127.0.0.1", port), "/metrics").expect("a scrape");
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{name}{{")))
                .and_then(|l| l.rsplit_once(' '))
                .map(|(_, v)| v.parse::<f64>().unwrap())
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        };
        assert_eq!(value("drove_workers_busy"), 2.0, "{text}");
        assert_eq!(value("drove_workers_idle"), 1.0, "{text}");
        let u = value("drove_workers_utilization_ratio");
        assert!((u - 2.0 / 3.0).abs() < 1e-9, "{text}");
        // The lifecycle states are untouched: they still sum to the pool.
        let states: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("drove_workers{"))
            .collect();
        assert_eq!(states.len(), 3, "{text}");
        assert!(
            states.iter().any(|l| l.ends_with("state=\"ready\"} 3")),
            "{text}"
        );
    }

    // The workers that answered are the ones listed busy.
    let mut answered: Vec<i64> = requests
        .into_iter()
        .map(|r| answered_pid(&r.join().unwrap().expect("slow request answered")) as i64)
        .collect();
    answered.sort();
    let mut busy = busy;
    busy.sort();
    assert_eq!(answered, busy);
    d.wait_status(", 0 busy", 10 * SEC);
}

#[test]
fn busy_and_idle_workers_over_tcp() {
    let (_reservation, mport) = reserve_port();
    let d = Droved::builder("busy-tcp")
        .config(&format!(
            "{}[metrics]\nlisten = \"127.0.0.1:{mport}\"\n",
            config("127.0.0.1:{port}", None, 3, 3, "")
        ))
        .args(&["--instance", "busy-tcp"])
        .droved_binds()
        .start();
    let port = d.port;
    counts_busy_and_idle(d, "busy-tcp", Target::Tcp(port), Some(mport));
}

#[test]
fn busy_and_idle_workers_of_another_user_on_a_unix_listener_without_cap_sys_ptrace() {
    let sock = unix_sock("busy-unix");
    let d = Droved::builder("busy-unix")
        .launcher(&AS_THE_UNIT)
        .config(&config(
            &format!("unix:{}", sock.display()),
            Some("nobody"),
            3,
            3,
            "",
        ))
        .args(&["--instance", "busy-unix"])
        .start();
    counts_busy_and_idle(d, "busy-unix", Target::Unix(sock), None);
}

#[test]
fn the_busy_last_worker_of_another_user_on_a_unix_listener_stays_at_min_0() {
    // Before: droved could read neither the worker's wchan nor (for a unix
    // listener) any connection table, and let the last worker go while it
    // served a request.
    let sock = unix_sock("busy-zero");
    let mut d = Droved::builder("busy-zero")
        .launcher(&AS_THE_UNIT)
        .config(&config(
            &format!("unix:{}", sock.display()),
            Some("nobody"),
            0,
            4,
            "[scale]\ncooldown = \"500ms\"",
        ))
        .start();
    d.wait_ready();
    let request = slow(Target::Unix(sock.clone()), 4000);
    d.wait_status("1 worker ready", 10 * SEC);
    // Six cooldowns of an empty queue while the worker is busy.
    std::thread::sleep(3 * SEC);
    assert_eq!(d.workers().len(), 1, "{}", d.log());
    assert!(
        !d.log().contains("scale down 1 -> 0"),
        "the busy worker was told to stop:\n{}",
        d.log()
    );
    let body = request
        .join()
        .unwrap()
        .expect("the slow request is answered");
    assert!(body.contains("slept_ms=4000"), "{body}");
    // Idle again: now it goes.
    d.wait_for("no workers", 15 * SEC, |u| {
        u.status.starts_with("0 workers ready")
    });
}

#[test]
fn scale_down_retires_an_idle_worker_of_another_user_not_the_busy_one() {
    // The busy worker is the youngest: with nothing known about either,
    // droved would retire the youngest.
    let sock = unix_sock("busy-down");
    let to = Target::Unix(sock.clone());
    let mut d = Droved::builder("busy-down")
        .launcher(&AS_THE_UNIT)
        .config(&config(
            &format!("unix:{}", sock.display()),
            Some("nobody"),
            1,
            2,
            // No autoscaling in the way: only SIGTTIN/SIGTTOU move it.
            "[scale]\ncooldown = \"1h\"",
        ))
        .start();
    d.wait_ready();
    let oldest = quick(&to);
    // The oldest is busy while the youngest starts, so the youngest takes
    // the long request.
    let first = slow(to.clone(), 3000);
    eventually("the oldest is busy", 10 * SEC, || {
        holds_a_connection(oldest).then_some(())
    });
    d.signal(Signal::SIGTTIN);
    d.wait_status("2 workers ready", 10 * SEC);
    let youngest = *d.workers().iter().find(|&&p| p != oldest).unwrap();
    let long = slow(to.clone(), 8000);
    let first = first
        .join()
        .unwrap()
        .expect("the first request is answered");
    assert_eq!(answered_pid(&first), oldest);
    // Only the youngest is busy now (the oldest answered).
    eventually("only the youngest is busy", 10 * SEC, || {
        // The oldest closes its side after the client has read the answer.
        (holds_a_connection(youngest) && !holds_a_connection(oldest)).then_some(())
    });
    d.signal(Signal::SIGTTOU);
    eventually("one worker left", 15 * SEC, || {
        (d.workers().len() == 1).then_some(())
    });
    assert_eq!(d.workers(), vec![youngest], "{}", d.log());
    let body = long.join().unwrap().expect("the long request is answered");
    assert_eq!(answered_pid(&body), youngest);
}

/// A Node server, which tells droved nothing either: it answers `/slow`
/// after 10 s (on a timer: its event loop is idle meanwhile, but the
/// connection is held).
const NODE_SERVER: &str = "require('http').createServer((q, s) => {
  const answer = () => s.end('pid=' + process.pid + '\\n');
  if (q.url.startsWith('/slow')) setTimeout(answer, 10000); else answer();
}).listen({ fd: 3 });";

#[test]
fn busy_node_workers_of_another_user_over_tcp() {
    let config = format!(
        r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
command = ["node", "-e", {script}]
ready = "exec"
user = "nobody"
[pool]
min = 3
max = 3
"#,
        script = serde_json::to_string(NODE_SERVER).unwrap()
    );
    let mut d = Droved::builder("busy-node")
        .launcher(&AS_THE_UNIT)
        .config(&config)
        .args(&["--instance", "busy-node"])
        .start();
    d.wait_ready();
    // Node listens once its script ran; until then a request would queue.
    let port = d.port;
    eventually("node answers", 20 * SEC, || {
        http_get(("127.0.0.1", port), "/").ok()
    });
    d.wait_status(", 0 busy", 10 * SEC);
    let requests: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || http_get(("127.0.0.1", port), "/slow")))
        .collect();
    // Node accepts every connection it can: both may be on one worker.
    let up = d.wait_for("1 or 2 busy", 10 * SEC, |u| {
        u.status.contains(", 1 busy") || u.status.contains(", 2 busy")
    });
    assert!(up.status.starts_with("3 workers ready"), "{}", up.status);
    // Every worker listed busy while the requests run, over several
    // samples (one worker may accept the second connection a sample later).
    let mut busy = std::collections::BTreeSet::new();
    while !requests.iter().all(|r| r.is_finished()) {
        let list = ctl_json("busy-node", &["list"]);
        busy.extend(
            list.as_array()
                .unwrap()
                .iter()
                .filter(|w| w["busy"] == Value::Bool(true))
                .map(|w| w["pid"].as_i64().unwrap()),
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut answered: Vec<i64> = requests
        .into_iter()
        .map(|r| {
            let body = r.join().unwrap().expect("the slow request is answered");
            answered_pid(&body) as i64
        })
        .collect();
    answered.sort();
    answered.dedup();
    assert_eq!(busy.into_iter().collect::<Vec<_>>(), answered);
    d.wait_status(", 0 busy", 10 * SEC);
}

/// `pool.spare`: idle workers are kept beside the busy ones. Two slow
/// requests take the two spares; droved sees them busy and grows to
/// busy + 2 before any connection queues, then shrinks back to 2 (never
/// below) once they are done.
#[test]
fn spares_are_kept_beside_the_busy_workers() {
    let mut d = Droved::start_ready(
        "spare",
        &example_config(1, 6, "", "spare = 2\n[scale]\ncooldown = \"500ms\""),
    );
    d.wait_log("0 busy, 2 spare wanted: scale up 1 -> 2", 1, 10 * SEC);
    d.wait_status("2 workers ready", 10 * SEC);
    let port = d.port;
    let slow: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || http_get(("127.0.0.1", port), "/sleep?ms=4000")))
        .collect();
    d.wait_log("2 busy, 2 spare wanted: scale up 2 -> 4", 1, 10 * SEC);
    d.wait_status("4 workers ready", 10 * SEC);
    assert!(
        !d.log().contains("reason=\"queue\"") && !d.log().contains(": queue "),
        "grew for spares, not for a queue:\n{}",
        d.log()
    );
    for s in slow {
        assert!(s.join().unwrap().unwrap().contains("slept_ms=4000"));
    }
    d.wait_log("scale down 3 -> 2", 1, 20 * SEC);
    // Never below busy + spare: a few cooldowns later, still 2.
    std::thread::sleep(2 * SEC);
    assert!(!d.log().contains("scale down 2 -> 1"), "{}", d.log());
}
