//! drovectl with no D-Bus daemon at all: droved serves org.drove.Drove1
//! peer-to-peer on its private socket (<runtime dir>/private), and
//! drovectl, finding no bus, falls back to it. The bus addresses point at
//! nothing, so no test here can pass through a bus by accident.
//!
//! Tests run in parallel and as root, so every droved's socket is in
//! /run/drove: each test gives its droved an instance name of its own and
//! always passes --instance.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use super::harness::*;

const DROVECTL: &str = env!("CARGO_BIN_EXE_drovectl");
const SEC: Duration = Duration::from_secs(1);
const NO_BUS: &str = "unix:path=/nonexistent/drove-test-no-bus";

/// A droved with a fixed pool of `n` (min..max), no bus, and an instance
/// name no other test uses.
fn droved(tag: &str, min: u32, max: u32, extra: &str) -> (Droved, String) {
    let instance = format!("private-{tag}-{}", std::process::id());
    let mut d = Droved::builder("private")
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
command = ["{{worker}}"]
ready = "notify"
[pool]
min = {min}
max = {max}
{extra}
"#
        ))
        .args(&["--instance", &instance])
        .env("DBUS_SYSTEM_BUS_ADDRESS", NO_BUS)
        .env("DBUS_SESSION_BUS_ADDRESS", NO_BUS)
        .start();
    d.wait_ready();
    (d, instance)
}

fn socket_of(instance: &str) -> PathBuf {
    PathBuf::from("/run/drove").join(instance).join("private")
}

/// drovectl with no bus reachable, as `prefix` (e.g. setpriv) says.
fn command(prefix: &[&str], instance: &str, args: &[&str]) -> Command {
    let mut argv: Vec<&str> = prefix.to_vec();
    argv.push(DROVECTL);
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .args(["--instance", instance])
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", NO_BUS)
        .env("DBUS_SESSION_BUS_ADDRESS", NO_BUS)
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null());
    cmd
}

fn ctl(instance: &str, args: &[&str]) -> Output {
    command(&[], instance, args).output().unwrap()
}

const NOBODY: [&str; 4] = [
    "setpriv",
    "--reuid=nobody",
    "--regid=nogroup",
    "--clear-groups",
];

fn ctl_as_nobody(instance: &str, args: &[&str]) -> Output {
    command(&NOBODY, instance, args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "drovectl {what}: {}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn json(instance: &str, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ctl(instance, &all);
    assert_ok(&out, &all.join(" "));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

fn assert_denied(out: &Output) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("[org.drove.Error.AccessDenied]"), "{err}");
    assert!(err.contains("uid 65534"), "{err}");
}

/// A child killed and reaped when the test ends, also on panic.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_verb_works_over_the_private_socket_without_a_bus() {
    let (mut d, instance) = droved("verbs", 2, 4, "");
    let path = socket_of(&instance);
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o666
    );

    // status, text and JSON: it says how it got there.
    let out = ctl(&instance, &["status"]);
    assert_ok(&out, "status");
    let shown = text(&out.stdout);
    assert!(
        shown.contains(&format!("private socket {}", path.display())),
        "{shown}"
    );
    let s = json(&instance, &["status"]);
    assert_eq!(s["pid"].as_i64(), Some(d.pid() as i64));
    assert_eq!(s["ready"], 2);
    // --bus private: the socket only.
    assert_ok(
        &ctl(&instance, &["--bus", "private", "status"]),
        "--bus private status",
    );
    // An explicit bus means that bus: no fallback.
    let out = ctl(&instance, &["--bus", "system", "status"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cannot connect to the system bus"));

    // list-instances finds it (other tests' droveds may be there too).
    let list = json(&instance, &["list-instances"]);
    let mine: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["instance"] == instance.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "{list}");
    assert_eq!(mine[0]["socket"], path.display().to_string());

    // list: the real workers.
    let pids: BTreeSet<i64> = json(&instance, &["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    let real: BTreeSet<i64> = d.workers().into_iter().map(i64::from).collect();
    assert_eq!(pids, real);

    // watch: header, then the events of a killed worker, over the socket.
    let mut watch = Reaped(
        command(&[], &instance, &["watch"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let stdout = watch.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_line = |what: &str, pred: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + 10 * SEC;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {what}; watch printed {seen:#?}"),
            }
        }
    };
    wait_line("the header", &|l| l.contains("watching"));
    let victim = d.workers()[0];
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let exited = format!("worker-exited pid={victim} ");
    wait_line("the kill", &|l| l.contains(&exited));
    wait_line("the replacement", &|l| l.contains("worker-started pid="));

    // scale and limits change the real pool.
    assert_eq!(json(&instance, &["scale", "3"])["target"], 3);
    eventually("3 workers", 10 * SEC, || {
        (d.workers().len() == 3).then_some(())
    });
    let l = json(&instance, &["limits", "1", "3"]);
    assert_eq!((l["min"].as_u64(), l["max"].as_u64()), (Some(1), Some(3)));
    let out = ctl(&instance, &["scale", "9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("OutOfRange"),
        "{}",
        text(&out.stderr)
    );

    // reload and restart-workers answer when the rollout is done.
    let before: BTreeSet<i32> = d.workers().into_iter().collect();
    assert_ok(&ctl(&instance, &["reload"]), "reload");
    assert_eq!(json(&instance, &["status"])["reloads"], 1);
    assert_ok(&ctl(&instance, &["restart-workers"]), "restart-workers");
    let after: BTreeSet<i32> = d.workers().into_iter().collect();
    assert!(before.is_disjoint(&after), "{before:?} then {after:?}");

    // upgrade: same pid, the socket is bound again by the new image, and
    // watch follows across it.
    let pid = d.pid();
    d.ready_again_after("READY=1 after the upgrade", 20 * SEC, |_| {
        assert_ok(&ctl(&instance, &["upgrade"]), "upgrade");
    });
    wait_line("watch losing droved", &|l| l.contains("stopped; waiting"));
    wait_line("watch finding it again", &|l| {
        l.contains(&format!("started (pid {pid})"))
    });
    let s = eventually("status after the upgrade", 10 * SEC, || {
        let out = ctl(&instance, &["--json", "status"]);
        out.status
            .success()
            .then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
    });
    assert_eq!(s["pid"].as_i64(), Some(pid as i64));
    assert_eq!(s["upgrades"], 1);
    kill(Pid::from_raw(watch.0.id() as i32), Signal::SIGINT).unwrap();
    assert!(watch.0.wait().unwrap().success());

    // The socket goes with droved.
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success(), "{}", d.log());
    assert!(!path.exists(), "{} removed at exit", path.display());
    let out = ctl(&instance, &["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no private socket answers"));
}

#[test]
fn unprivileged_users_read_but_cannot_change_over_the_private_socket() {
    let (d, instance) = droved("nobody", 2, 4, "");
    let out = ctl_as_nobody(&instance, &["--json", "status"]);
    assert_ok(&out, "status as nobody");
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["ready"], 2);
    assert_ok(&ctl_as_nobody(&instance, &["list"]), "list as nobody");
    for verb in [
        &["scale", "3"][..],
        &["limits", "1", "4"],
        &["reload"],
        &["restart-workers"],
        &["upgrade"],
    ] {
        assert_denied(&ctl_as_nobody(&instance, verb));
    }
    assert!(
        text(&ctl_as_nobody(&instance, &["scale", "3"]).stderr).contains("Scale(3) needs root"),
    );
    assert_eq!(json(&instance, &["status"])["target"], 2);
    assert_eq!(d.workers().len(), 2);
    // Denials are logged with the caller's uid and pid, as on the bus.
    assert!(
        d.log().contains("by uid 65534 denied") && d.log().contains("private socket, pid"),
        "{}",
        d.log()
    );

    // A member of control.group may change it.
    let (_g, grouped) = droved("group", 2, 4, "[control]\ngroup = \"nogroup\"");
    assert_ok(
        &ctl_as_nobody(&grouped, &["scale", "3"]),
        "scale as nogroup",
    );
    assert_eq!(json(&grouped, &["status"])["target"], 3);
}

/// Reads until EOF or `limit`; whether the peer closed in time.
fn closed_within(s: &mut UnixStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

#[test]
fn garbage_and_silence_on_the_private_socket_cost_nothing() {
    let (mut d, instance) = droved("garbage", 2, 2, "");
    let path = socket_of(&instance);
    let workers: BTreeSet<i32> = d.workers().into_iter().collect();
    let connect = || UnixStream::connect(&path).unwrap();

    // Not D-Bus at all: closed at once.
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"\n\n\n",
        &[0xffu8; 4096],
    ] {
        let mut s = connect();
        let _ = s.write_all(junk);
        assert!(closed_within(&mut s, 2 * SEC), "{junk:?} not refused");
    }
    // D-Bus's NUL, then an endless line: refused after 512 bytes.
    let mut s = connect();
    let _ = s.write_all(b"\0AUTH ");
    let _ = s.write_all(&[b'A'; 2000]);
    assert!(closed_within(&mut s, 2 * SEC), "an endless line");
    // Authenticated, then a message header announcing 100 MB: refused from
    // the header, before anything is allocated for it.
    let mut s = connect();
    let uid_hex: String = "0".bytes().map(|b| format!("{b:02x}")).collect();
    s.write_all(format!("\0AUTH EXTERNAL {uid_hex}\r\nBEGIN\r\n").as_bytes())
        .unwrap();
    let mut header = [0u8; 16];
    header[0] = b'l';
    header[1] = 1;
    header[3] = 1;
    header[4..8].copy_from_slice(&100_000_000u32.to_le_bytes());
    header[8..12].copy_from_slice(&1u32.to_le_bytes());
    header[12..16].copy_from_slice(&8u32.to_le_bytes());
    let _ = s.write_all(&header);
    assert!(closed_within(&mut s, 2 * SEC), "a 100 MB message");

    // Silence: closed after the handshake timeout (3 s).
    let started = Instant::now();
    let mut silent = connect();
    assert!(closed_within(&mut silent, 6 * SEC), "a silent client kept");
    assert!(started.elapsed() >= 2 * SEC, "{:?}", started.elapsed());

    // At most 16 connections per uid: the 17th is closed at once; when the
    // silent ones have timed out, drovectl gets in again.
    let mut hogs: Vec<UnixStream> = (0..16).map(|_| connect()).collect();
    let mut extra = connect();
    let t = Instant::now();
    assert!(closed_within(&mut extra, 2 * SEC), "the 17th connection");
    assert!(t.elapsed() < SEC, "refused at once: {:?}", t.elapsed());
    for h in &mut hogs {
        assert!(closed_within(h, 6 * SEC));
    }
    let s = eventually("drovectl gets in again", 5 * SEC, || {
        let out = ctl(&instance, &["--json", "status"]);
        out.status
            .success()
            .then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
    });
    // The pool never noticed.
    assert_eq!(s["ready"], 2);
    assert_eq!(s["exited"], 0);
    assert_eq!(d.workers().into_iter().collect::<BTreeSet<_>>(), workers);
    assert!(d.try_exit().is_none(), "{}", d.log());
    assert!(
        d.log().contains("refused 1 connection(s) over the limits"),
        "{}",
        d.log()
    );
}
