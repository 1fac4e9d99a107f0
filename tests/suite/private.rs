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
        .config(&example_config(min, max, "", extra))
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

/// sd-bus clients work on the private socket: `busctl --address=` sends
/// the bus's `Hello` first and hangs up on anything before its reply
/// (droved answered neither, and sent PropertiesChanged at once).
#[test]
fn busctl_speaks_to_the_private_socket_as_root_and_as_nobody() {
    let (d, instance) = droved("busctl", 2, 4, "");
    let address = format!("unix:path={}", socket_of(&instance).display());
    let busctl = |prefix: &[&str], args: &[&str]| {
        let mut argv: Vec<&str> = prefix.to_vec();
        argv.extend(["busctl", "--address", &address]);
        argv.extend(args);
        Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .expect("busctl (Debian package systemd) must be installed")
    };
    let target = [
        "get-property",
        "org.drove.Drove1",
        "/org/drove/Drove1",
        "org.drove.Drove1",
        "Target",
    ];
    for prefix in [&[][..], &NOBODY[..]] {
        let out = busctl(prefix, &target);
        assert_ok(&out, &format!("busctl get-property as {prefix:?}"));
        assert_eq!(text(&out.stdout).trim(), "u 2", "as {prefix:?}");
    }
    let scale = [
        "call",
        "org.drove.Drove1",
        "/org/drove/Drove1",
        "org.drove.Drove1",
        "Scale",
        "u",
        "3",
    ];
    let denied = busctl(&NOBODY, &scale);
    assert!(!denied.status.success(), "nobody scaled over busctl");
    assert!(
        text(&denied.stderr).contains("needs root"),
        "{}",
        text(&denied.stderr)
    );
    assert_ok(&busctl(&[], &scale), "busctl Scale as root");
    assert_eq!(json(&instance, &["status"])["target"], 3);
    drop(d);
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

// ---- hostile clients as nobody: malformed headers, floods ---------------

/// A raw D-Bus client (python3, run as nobody): `malformed PATH N` sends N
/// method calls whose header names are invalid (member, path, interface in
/// turn), each on its own connection, and prints how many were closed by
/// droved; first it checks that a well-formed call (Peer.Ping) built the
/// same way is answered, so the encoding is known good. `list PATH CONNS
/// SECS` floods ListWorkers from CONNS connections for SECS seconds and
/// prints the bytes of replies it got. `connect PATH SECS` opens
/// connections as fast as it can for SECS seconds.
const RAW_CLIENT: &str = r#"
import os, selectors, signal, socket, struct, sys, time

# Stopped by SIGTERM: the finally clauses below print the counts.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

def pad(b, n):
    while len(b) % n:
        b.append(0)

def message(serial, fields):
    f = bytearray()
    for code, sig, val in fields:
        pad(f, 8)
        f.append(code)
        f += bytes([1]) + sig.encode() + b"\0"
        v = val.encode()
        if sig in "so":
            pad(f, 4)
            f += struct.pack("<I", len(v)) + v + b"\0"
        else:
            f += bytes([len(v)]) + v + b"\0"
    h = bytearray(b"l\x01\x00\x01") + struct.pack("<III", 0, serial, len(f)) + f
    pad(h, 8)
    return bytes(h)

def call(serial, path, iface, member):
    return message(serial, [(1, "o", path), (2, "s", iface), (3, "s", member),
                            (6, "s", "org.drove.Drove1")])

def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    uid = str(os.getuid()).encode().hex()
    s.sendall(b"\0AUTH EXTERNAL " + uid.encode() + b"\r\n")
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = s.recv(1)
        if not chunk:
            sys.exit("closed during authentication")
        reply += chunk
    if not reply.startswith(b"OK "):
        sys.exit("not authenticated: %r" % reply)
    s.sendall(b"BEGIN\r\n")
    return s

def recv_exact(s, n):
    b = b""
    while len(b) < n:
        chunk = s.recv(n - len(b))
        if not chunk:
            sys.exit("closed while reading a message")
        b += chunk
    return b

def recv_message(s):
    head = recv_exact(s, 16)
    body, fields = struct.unpack("<I", head[4:8])[0], struct.unpack("<I", head[12:16])[0]
    recv_exact(s, (16 + fields + 7) // 8 * 8 - 16 + body)
    return head

def closed(s):
    try:
        while s.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False

mode, path = sys.argv[1], sys.argv[2]
obj = "/org/drove/Drove1"
if mode == "malformed":
    s = connect(path)
    s.sendall(call(1, obj, "org.freedesktop.DBus.Peer", "Ping"))
    head = recv_message(s)
    while head[1] == 4:  # the PropertiesChanged every connection starts with
        head = recv_message(s)
    if head[1] != 2:
        sys.exit("a good Ping got no reply: %r" % head)
    s.close()
    bad = [(obj, "org.drove.Drove1", "List-Workers!"),
           ("/org//drove", "org.drove.Drove1", "ListWorkers"),
           (obj, "org..drove", "ListWorkers")]
    n, shut = int(sys.argv[3]), 0
    for i in range(n):
        s = connect(path)
        s.sendall(call(2, *bad[i % len(bad)]))
        shut += closed(s)
        s.close()
    print(shut)
elif mode == "list":
    conns, secs = int(sys.argv[3]), float(sys.argv[4])
    sel = selectors.DefaultSelector()
    out = {}
    for _ in range(conns):
        s = connect(path)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        out[s] = b""
    serial, got, end = 1, 0, time.time() + secs
    print("flooding", flush=True)
    try:
      while time.time() < end:
        for key, ev in sel.select(0.5):
            s = key.fileobj
            if ev & selectors.EVENT_READ:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    data = None
                if data == b"":
                    sys.exit("droved closed a flooding connection")
                got += len(data or b"")
            if ev & selectors.EVENT_WRITE:
                if not out[s]:
                    out[s] = b"".join(call(serial + i, obj, "org.drove.Drove1", "ListWorkers")
                                      for i in range(16))
                    serial += 16
                try:
                    out[s] = out[s][s.send(out[s]):]
                except BlockingIOError:
                    pass
    finally:
        print(got, flush=True)
elif mode == "connect":
    end, held, made = time.time() + float(sys.argv[3]), [], 0
    print("flooding", flush=True)
    try:
      while time.time() < end:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
            made += 1
            held.append(s)
        except (BlockingIOError, InterruptedError):
            s.close()
        if len(held) > 400:
            for h in held[:200]:
                h.close()
            del held[:200]
    finally:
        print(made, flush=True)
"#;

/// The raw client as nobody, at the lowest CPU priority: a flood must
/// reach droved without starving the rest of the machine (other tests).
fn raw_client(args: &[&str]) -> Command {
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "10"])
        .args(NOBODY)
        .args(["/usr/bin/python3", "-c", RAW_CLIENT])
        .args(args)
        .stdin(Stdio::null());
    cmd
}

#[test]
fn malformed_header_names_close_the_connection_without_a_panic() {
    let (d, instance) = droved("malformed", 1, 1, "");
    let path = socket_of(&instance).display().to_string();
    let out = raw_client(&["malformed", &path, "90"]).output().unwrap();
    assert!(out.status.success(), "client: {}", text(&out.stderr));
    let closed: u32 = text(&out.stdout).trim().parse().unwrap();
    let log = d.log();
    // The default hook says "panicked", droved's own "panic in thread".
    let panics = log
        .lines()
        .filter(|l| l.contains("panicked") || l.contains("panic in thread"))
        .count();
    for l in log.lines().filter(|l| l.contains("panic")).take(8) {
        eprintln!("{l}");
    }
    eprintln!(
        "90 malformed messages: {closed} connections closed, {panics} panics, {} log lines",
        log.lines().count()
    );
    assert_eq!(closed, 90, "every such connection is closed");
    assert_eq!(panics, 0, "zbus never sees them:\n{log}");
    // droved still answers root.
    assert_eq!(json(&instance, &["status"])["ready"], 1);
}

/// The p99 (of at most 100 samples: the largest but one past 50).
fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99).div_ceil(100) - 1]
}

/// Runs `client` until it printed "flooding", then `during`, then stops
/// the client (SIGTERM); returns what `during` returned and the client's
/// last line (its count).
fn while_flooding<T>(mut client: Command, during: impl FnOnce() -> T) -> (T, String) {
    let mut child = Reaped(client.stdout(Stdio::piped()).spawn().unwrap());
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let first = lines.next().map(|l| l.unwrap()).unwrap_or_default();
    assert_eq!(first, "flooding", "the flood client did not start");
    let result = during();
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the flood client ended early"
    );
    kill(Pid::from_raw(child.0.id() as i32), Signal::SIGTERM).unwrap();
    let last = lines.last().map(|l| l.unwrap()).unwrap_or_default();
    assert!(child.0.wait().unwrap().success(), "the flood client failed");
    (result, last)
}

/// The flood tests take turns: each measures root's calls, which the
/// other's flood would slow down.
static FLOODS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn nobodys_list_workers_flood_does_not_slow_roots_calls() {
    let _turn = FLOODS.lock().unwrap_or_else(|p| p.into_inner());
    let (_d, instance) = droved("listflood", 2, 4, "");
    let path = socket_of(&instance).display().to_string();
    let time = |args: &[&str]| {
        let t = Instant::now();
        let out = ctl(&instance, args);
        assert_ok(&out, &args.join(" "));
        t.elapsed()
    };
    let quiet: Vec<Duration> = (0..10).map(|_| time(&["status"])).collect();
    let ((status, scale), flooded) =
        while_flooding(raw_client(&["list", &path, "4", "300"]), || {
            let mut status = Vec::new();
            let mut scale = Vec::new();
            for i in 0..25 {
                status.push(time(&["status"]));
                scale.push(time(&["scale", if i % 2 == 0 { "3" } else { "2" }]));
            }
            (status, scale)
        });
    let (status, scale) = (p99(status), p99(scale));
    eprintln!(
        "root during nobody's ListWorkers flood ({flooded} bytes of replies): \
         status p99 {status:?}, scale p99 {scale:?} (quiet status p99 {:?})",
        p99(quiet.clone())
    );
    assert!(flooded.parse::<u64>().unwrap() > 0, "the flood got answers");
    // Far below the seconds before throttling, with room for a loaded
    // machine (the quiet calls show how loaded).
    let bound = Duration::from_millis(300) + p99(quiet.clone());
    assert!(
        status <= bound && scale <= bound,
        "status {status:?}, scale {scale:?}"
    );
}

#[test]
fn nobodys_connect_flood_does_not_lock_root_out() {
    let _turn = FLOODS.lock().unwrap_or_else(|p| p.into_inner());
    let (_d, instance) = droved("connflood", 1, 2, "");
    let path = socket_of(&instance).display().to_string();
    let flood = || raw_client(&["connect", &path, "300"]);
    let mut others: Vec<Reaped> = (0..2)
        .map(|_| Reaped(flood().stdout(Stdio::null()).spawn().unwrap()))
        .collect();
    let ((failed, slowest), made) = while_flooding(flood(), || {
        let mut failed = 0;
        let mut slowest = Duration::ZERO;
        for _ in 0..20 {
            let t = Instant::now();
            let out = ctl(&instance, &["status"]);
            slowest = slowest.max(t.elapsed());
            if !out.status.success() {
                eprintln!("root's status failed: {}", text(&out.stderr));
                failed += 1;
            }
        }
        (failed, slowest)
    });
    for o in &mut others {
        let _ = o.0.kill();
    }
    eprintln!(
        "connect flood ({made} connections from one of three clients): \
         {failed} of 20 root calls failed, the slowest took {slowest:?}"
    );
    assert_eq!(failed, 0);
}
