//! The workers' NOTIFY_SOCKET: a filesystem path (clients like Ruby's
//! sd_notify cannot reach an abstract one) in a directory only droved and
//! the workers' user and group can reach, cheap to flood, kept across a
//! binary upgrade, removed on exit, a stale one replaced.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);

/// Workers run as `daemon` (uid 1, group 1); the outsider is `nobody`
/// (65534, group nogroup 65534, no supplementary groups).
const WORKER_UID: u32 = 1;
const WORKER_GID: u32 = 1;
const OUTSIDER: u32 = 65534;

fn pool(workers: u32, extra_worker: &str) -> String {
    example_config(
        workers,
        workers,
        &format!("stop_timeout = \"5s\"\n{extra_worker}"),
        "",
    )
}

/// An instance name no other test (or test run) uses.
fn instance(tag: &str) -> String {
    format!("nt-{}-{tag}", std::process::id())
}

/// NOTIFY_SOCKET as the workers see it (/proc/PID/environ), the same for all.
fn notify_socket_of_workers(d: &Droved) -> String {
    let workers = d.workers();
    assert!(!workers.is_empty(), "no workers\n{}", d.log());
    let values: Vec<String> = workers
        .iter()
        .map(|&p| env_of(p, "NOTIFY_SOCKET").unwrap_or_default())
        .collect();
    assert!(
        values.iter().all(|v| v == &values[0]),
        "workers disagree on NOTIFY_SOCKET: {values:?}"
    );
    values[0].clone()
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap()
}

/// Sends `msg` to a NOTIFY_SOCKET value (a path, or `@abstract`) as another
/// user via setpriv(1) and Python's socket module, which reaches both:
/// Ok(()) if the datagram went out, else the error the sender saw.
fn send_as(setpriv: &[&str], address: &str, msg: &str) -> Result<(), String> {
    let script = r#"
import socket, sys
addr = sys.argv[1]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.settimeout(5)
try:
    s.sendto(sys.argv[2].encode(), addr)
except OSError as e:
    print(type(e).__name__, e)
    sys.exit(1)
print("sent")
"#;
    let out = Command::new("setpriv")
        .args(setpriv)
        .args(["/usr/bin/python3", "-c", script, address, msg])
        .output()
        .expect("setpriv and /usr/bin/python3 (tests/run installs util-linux and python3)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && text.contains("sent") {
        Ok(())
    } else {
        Err(text.trim().to_string())
    }
}

fn file_id(path: &Path) -> (u64, u64) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.dev(), m.ino())
}

/// Sends datagrams to `address` as fast as possible from `threads` threads
/// (non-blocking; a full queue is retried at once) until `stop`.
struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn start(address: &str, threads: usize) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|i| {
                let (stop, sent, address) = (stop.clone(), sent.clone(), address.to_string());
                std::thread::spawn(move || {
                    use std::os::linux::net::SocketAddrExt;
                    let addr = match address.strip_prefix('@') {
                        Some(name) => {
                            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                        }
                        None => std::os::unix::net::SocketAddr::from_pathname(&address),
                    }
                    .unwrap();
                    let sock = UnixDatagram::unbound().unwrap();
                    // One blocking sender (queues behind the workers, as
                    // sd_notify clients do) and the others spinning.
                    sock.set_nonblocking(i > 0).unwrap();
                    sock.set_write_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    let payloads: [&[u8]; 3] = [b"READY=1", b"WATCHDOG=1", b"STATUS=flood"];
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if sock.send_to_addr(payloads[n as usize % 3], &addr).is_ok() {
                            n += 1;
                        }
                    }
                    sent.fetch_add(n, Ordering::Relaxed);
                })
            })
            .collect();
        Flood {
            stop,
            sent,
            threads,
        }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.sent.load(Ordering::Relaxed)
    }
}

#[test]
fn workers_of_another_user_reach_a_private_notify_path_others_cannot() {
    let inst = instance("user");
    let mut d = Droved::builder("notify-user")
        .config(&pool(2, "user = \"daemon\""))
        .args(&["--instance", &inst])
        .start();
    d.wait_ready();
    d.wait_status("2 workers ready", 20 * SEC);

    let address = notify_socket_of_workers(&d);
    let path = PathBuf::from(&address);
    assert_eq!(path, Path::new("/run/drove").join(&inst).join("notify"));
    for w in d.workers() {
        assert_eq!(uid_of(w), WORKER_UID, "worker {w} runs as daemon");
    }
    let sock = std::fs::symlink_metadata(&path).unwrap();
    assert!(sock.file_type().is_socket(), "{address} is a socket");
    assert_eq!(
        (sock.uid(), sock.gid(), sock.mode() & 0o7777),
        (0, WORKER_GID, 0o660),
        "socket owned by root and the workers' group, nothing for others"
    );
    let dir = std::fs::symlink_metadata(path.parent().unwrap()).unwrap();
    assert!(dir.is_dir());
    assert_eq!(
        (dir.uid(), dir.gid(), dir.mode() & 0o7777),
        (0, WORKER_GID, 0o755),
        "directory owned by root and the workers' group, others may only look up names"
    );

    // The workers' user gets through (and is ignored: not a worker pid)...
    let worker_user = ["--reuid=1", "--regid=1", "--init-groups", "--inh-caps=-all"];
    send_as(&worker_user, &address, "STATUS=from daemon")
        .unwrap_or_else(|e| panic!("the workers' user cannot send to {address}: {e}"));
    // A member of the workers' group with another uid reaches the socket,
    // but droved drops its datagrams by uid: counted and summarised.
    let other_uid = [
        "--reuid=2",
        "--regid=1",
        "--clear-groups",
        "--inh-caps=-all",
    ];
    send_as(&other_uid, &address, "READY=1")
        .unwrap_or_else(|e| panic!("uid 2 in group 1 cannot send to {address}: {e}"));
    d.wait_log(
        "notify datagram(s) from other users (latest uid 2,",
        1,
        10 * SEC,
    );
    // ...a user outside the workers' group does not get through at all.
    let outsider = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ];
    assert_eq!(OUTSIDER, 65534);
    let err = send_as(&outsider, &address, "READY=1")
        .expect_err("nobody (outside the workers' group) could send to NOTIFY_SOCKET");
    assert!(err.contains("PermissionError"), "{err}");

    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success(), "{}", d.log());
    assert!(
        !path.exists(),
        "{address} removed when droved exits\n{}",
        d.log()
    );
    assert!(
        !path.parent().unwrap().exists(),
        "its directory too, being empty"
    );
}

#[test]
fn a_stale_socket_is_replaced_and_the_path_and_inode_survive_an_upgrade() {
    let scratch = Scratch::new("notify-upgrade");
    let binary = scratch.join("droved");
    droved_build(&binary, "notify-0");
    // What systemd's RuntimeDirectory= gives droved, with a socket left
    // behind by a droved that crashed.
    let rt = scratch.join("rt");
    std::fs::create_dir(&rt).unwrap();
    let stale_path = rt.join("notify");
    drop(UnixDatagram::bind(&stale_path).unwrap());
    let stale = file_id(&stale_path);

    let mut d = Droved::builder("notify-upgrade")
        .binary(&binary)
        .config(&pool(2, ""))
        .env("RUNTIME_DIRECTORY", &rt.display().to_string())
        .start();
    d.wait_ready();
    let address = notify_socket_of_workers(&d);
    assert_eq!(Path::new(&address), stale_path);
    let live = file_id(&stale_path);
    assert_ne!(live, stale, "the stale socket was replaced by a new one");

    droved_build(&binary, "notify-1");
    d.ready_again_after("READY=1 after the upgrade", 20 * SEC, |d| {
        d.signal(Signal::SIGUSR2)
    });
    eventually("the new build took over", 10 * SEC, || {
        d.log()
            .contains("droved 0.1.0 (notify-1) took over 2 workers")
            .then_some(())
    });
    assert_eq!(file_id(&stale_path), live, "same path, same inode");

    // The handed-over socket still hears new workers: a rolling restart
    // completes only when every new worker sent READY=1.
    let before = d.workers();
    d.ready_again_after("READY=1 after the rollout", 30 * SEC, |d| {
        d.signal(Signal::SIGHUP)
    });
    d.wait_status("2 workers ready", 20 * SEC);
    eventually("the old workers are gone", 20 * SEC, || {
        let now = d.workers();
        (now.len() == 2 && now.iter().all(|p| !before.contains(p))).then_some(())
    });
    assert_eq!(notify_socket_of_workers(&d), address);
    assert_eq!(file_id(&stale_path), live);

    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success(), "{}", d.log());
    assert!(!stale_path.exists(), "socket removed on exit\n{}", d.log());
}

#[test]
fn a_flood_from_droveds_own_uid_delays_no_worker() {
    let inst = instance("flood");
    let mut d = Droved::builder("notify-flood")
        .config(&pool(4, "watchdog = \"2s\"\nready_timeout = \"20s\""))
        .args(&["--instance", &inst])
        .start();
    d.wait_ready();
    d.wait_status("4 workers ready", 20 * SEC);
    let address = notify_socket_of_workers(&d);
    let first = d.workers();

    // At least 1 s of flood, and longer than the watchdog, so every worker
    // must get WATCHDOG=1 through it; a rolling restart during the flood
    // needs every new worker's READY=1 through it too.
    let cpu_before = cpu_ticks(d.pid());
    let flood = Flood::start(&address, 3);
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    let readies = d.upward().ready_count;
    d.signal(Signal::SIGHUP);
    let rolled = loop {
        if d.upward().ready_count > readies {
            break Some(started.elapsed());
        }
        if started.elapsed() > 15 * SEC {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Keep flooding past two watchdog periods of the new workers.
    while started.elapsed() < 3 * SEC {
        std::thread::sleep(Duration::from_millis(50));
    }
    let flooded_for = started.elapsed();
    let sent = flood.finish();
    let cpu = (cpu_ticks(d.pid()) - cpu_before) as f64 / 100.0;
    eprintln!(
        "flood: {sent} datagrams in {flooded_for:?} ({:.0}/s); droved used {cpu:.2} s CPU ({:.1} us per datagram); rollout done after {rolled:?}",
        sent as f64 / flooded_for.as_secs_f64(),
        cpu * 1e6 / sent.max(1) as f64
    );
    let rolled = rolled.unwrap_or_else(|| {
        panic!(
            "the rolling restart did not finish during the flood (new workers' READY=1 lost)\n{}",
            tail(&d.log())
        )
    });
    assert!(rolled < flooded_for);
    assert!(sent > 1000, "the flood was a flood: {sent} datagrams");

    d.wait_status("4 workers ready", 10 * SEC);
    let log = d.log();
    assert!(
        !log.contains("watchdog timeout"),
        "a worker was killed for a watchdog timeout during the flood\n{}",
        tail(&log)
    );
    let now = d.workers();
    assert_eq!(now.len(), 4);
    assert!(now.iter().all(|p| !first.contains(p)), "rolled once");
    // Dropped, counted, summarised: never logged one by one.
    let lines = log
        .lines()
        .filter(|l| l.contains("notify datagram"))
        .count();
    assert!(
        lines <= 3,
        "{lines} log lines about ignored datagrams\n{}",
        tail(&log)
    );
    assert!(
        log.contains("ignored 1 notify datagram(s)"),
        "a summary line\n{}",
        tail(&log)
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success(), "{}", tail(&d.log()));
    assert!(!Path::new(&address).exists());
}

/// utime + stime of a process, in clock ticks (USER_HZ, 100 on Linux).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Sends `count` datagrams, each with `per` fds (of /dev/null) attached,
/// to `address` as the user `setpriv` says; prints "sent N".
const FD_SENDER: &str = r#"
import array, os, socket, sys
addr, count, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(per)]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.settimeout(10)
n = 0
for i in range(count):
    s.sendmsg([b"STATUS=fds"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))], 0, addr)
    n += 1
print("sent", n, flush=True)
"#;

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn fds_attached_to_notify_datagrams_are_all_closed_however_many() {
    let inst = instance("fds");
    let mut d = Droved::builder("notify-fds")
        .config(&pool(1, "user = \"daemon\""))
        .args(&["--instance", &inst])
        .start();
    d.wait_ready();
    d.wait_status("1 worker ready", 20 * SEC);
    let address = notify_socket_of_workers(&d);
    let before = fd_count(d.pid());
    let lines_before = d.log().lines().count();

    // As the workers' user (not a worker pid): 80 datagrams of 64 fds
    // each, more than droved's control buffer's 16 once held.
    let out = Command::new("setpriv")
        .args(["--reuid=1", "--regid=1", "--init-groups", "--inh-caps=-all"])
        .args(["/usr/bin/python3", "-c", FD_SENDER, &address, "80", "64"])
        .output()
        .expect("setpriv and /usr/bin/python3");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sent 80"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A rolling restart completes on the new worker's READY=1, which
    // queues behind whatever of the 80 droved has not read yet.
    d.signal(Signal::SIGHUP);
    d.wait_log("rolling restart done", 1, 30 * SEC);
    d.wait_status("1 worker ready", 20 * SEC);
    let after = fd_count(d.pid());
    let lines = d.log().lines().count() - lines_before;
    eprintln!(
        "droved's fds: {before} before, {after} after 80 datagrams of 64 fds; {lines} log lines"
    );
    assert!(
        after <= before + 2,
        "droved kept fds: {before} before, {after} after\n{}",
        tail(&d.log())
    );
    let about = d
        .log()
        .lines()
        .skip(lines_before)
        .filter(|l| l.contains("notify"))
        .count();
    assert!(
        about <= 3,
        "{about} log lines about notify datagrams\n{}",
        tail(&d.log())
    );
}

/// A worker that sends `WATCHDOG_USEC=` sets its own watchdog, as systemd
/// takes it from a service (how gunicorn's `timeout` becomes drove's
/// watchdog under drove.gunicorn): with no `worker.watchdog` in the config,
/// the worker that stops pinging is killed as hung, and the one that keeps
/// pinging is not.
#[test]
fn a_workers_own_watchdog_usec_is_enforced() {
    let dir = Scratch::new("own-watchdog");
    let script = dir.join("worker.py");
    std::fs::write(
        &script,
        r#"
import os, socket, sys, time
addr = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
def send(m): s.sendto(m.encode(), addr)
send("READY=1\nWATCHDOG_USEC=600000")
# Slot 0 pings for 1 s then hangs; the others ping every 100 ms.
hang_at = time.monotonic() + 1.0 if os.environ["DROVE_WORKER"] == "0" else None
while True:
    if hang_at is None or time.monotonic() < hang_at:
        send("WATCHDOG=1")
    time.sleep(0.1)
"#,
    )
    .unwrap();
    let mut d = Droved::builder("own-watchdog")
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
command = ["python3", "{}"]
ready = "notify"
stop_timeout = "2s"
[pool]
min = 2
max = 2
"#,
            script.display()
        ))
        .start();
    d.wait_ready();
    d.wait_log("set its watchdog to 600 ms", 2, 10 * SEC);
    d.wait_log("watchdog timeout", 1, 10 * SEC);
    let log = d.log();
    // Only hung workers (slot 0's): slot 1's, which pings, lives on.
    let pinging = log
        .lines()
        .find(|l| l.contains("(slot 1) set its watchdog"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or_else(|| panic!("no slot 1 worker\n{log}"))
        .to_string();
    let killed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("event=\"timeout\""))
        .collect();
    assert!(!killed.is_empty(), "{log}");
    assert!(
        killed
            .iter()
            .all(|l| l.contains("slot 0") || !l.contains(&format!("worker_pid={pinging} "))),
        "the pinging worker {pinging} was killed\n{log}"
    );
    assert!(alive(pinging.parse().unwrap()), "{log}");
}

/// A hung worker is aborted, not shot: `worker.timeout_signal` (SIGABRT)
/// first, so Python's faulthandler writes the stuck request's traceback
/// to the journal (the workers' stderr), then SIGKILL for one that does
/// not go. Before, the watchdog sent SIGKILL at once: no traceback.
#[test]
fn a_hung_worker_gets_the_timeout_signal_and_leaves_its_traceback() {
    let dir = Scratch::new("abort-traceback");
    let app = dir.join("spin_app.py");
    std::fs::write(
        &app,
        r#"
import os, sys

def spin_forever():
    # Never let the watchdog thread run again: the GIL stays here.
    sys.setswitchinterval(1000)
    while True:
        pass

def application(environ, start_response):
    if environ.get("PATH_INFO") == "/spin":
        spin_forever()
    data = "pid={}\n".format(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]
"#,
    )
    .unwrap();
    let mut d = Droved::builder("abort-traceback")
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
command = ["python3", "-X", "faulthandler", "{worker}", "{app}:application"]
ready = "notify"
watchdog = "1s"
stop_timeout = "20s"
[pool]
min = 1
max = 1
"#,
            worker = python_worker().display(),
            app = app.display(),
        ))
        .start();
    d.wait_ready();
    let victim = d.workers()[0];
    let port = d.port;
    let stuck = std::thread::spawn(move || http_get(("127.0.0.1", port), "/spin"));
    let t0 = Instant::now();
    d.wait_log(
        &format!("worker {victim}: watchdog timeout; aborting it (SIGABRT)"),
        1,
        15 * SEC,
    );
    let exit = format!("worker {victim} (slot 0) exited with signal SIGABRT");
    d.wait_log(&exit, 1, 15 * SEC);
    // Well before stop_timeout (20 s): the abort ended it, not a SIGKILL.
    assert!(t0.elapsed() < 10 * SEC, "{:?}", t0.elapsed());
    // The worker's traceback, whole: droved's lines can land inside it.
    let log = workers_output(&d.log());
    assert!(log.contains("Fatal Python error: Aborted"), "{log}");
    assert!(
        log.contains("in spin_forever") && log.contains("in application"),
        "the stuck request's frames are in the traceback:\n{log}"
    );
    assert!(
        stuck.join().unwrap().is_err(),
        "the stuck request got no answer"
    );
    eventually("a replacement serves", 10 * SEC, || d.get("/").ok());
}
