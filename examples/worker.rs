// Run: systemd-socket-activate -l 127.0.0.1:8080 --fdname=web target/debug/examples/worker
// SPDX-License-Identifier: MIT OR Apache-2.0
//! A deliberately simple, synchronous HTTP/1.1 worker for drove's tests and
//! benchmarks.
//!
//! It speaks the standard worker contract (DESIGN.md, "Worker contract";
//! sd_listen_fds(3), sd_notify(3)): listening sockets at fd 3.. described by `LISTEN_FDS`,
//! `LISTEN_PID` and `LISTEN_FDNAMES`, readiness and liveness over
//! `NOTIFY_SOCKET` (`READY=1`, `STATUS=`, `STOPPING=1`, `WATCHDOG=1`), so it
//! runs the same under droved, systemd or `systemd-socket-activate`.
//!
//! One request at a time on purpose: it models a GIL-bound application, where
//! only more processes add throughput. Every response carries
//! `Connection: close`.
//!
//! Routes (GET or HEAD):
//! - `/`                 `pid=<pid> worker=<DROVE_WORKER> generation=<DROVE_GENERATION>`
//! - `/sleep?ms=N`       sleep N ms (an I/O-bound request)
//! - `/cpu?ms=N`         busy-loop for N ms of wall time (a CPU-bound request)
//! - `/env`              the contract's environment variables (unset ones are
//!   omitted), `pid=<pid>` and one `fd <n> -> <target>` line per open fd
//! - `/status?text=abc`  send `STATUS=abc` to NOTIFY_SOCKET
//! - `/exit?code=N`      respond, then exit with code N
//! - `/eat?mb=N`         allocate and touch N MiB, then answer (OOM tests)
//! - `/stop-watchdog`    stop sending `WATCHDOG=1`
//! - `/hang`             stop the watchdog and block forever without answering
//!
//! Knobs (environment):
//! - `WORKER_EXIT_AT_START=N`  exit with code N before doing anything
//! - `WORKER_READY_DELAY_MS=N` wait N ms before READY=1 (and before accepting)
//! - `WORKER_NO_READY=1`       never send READY=1, but serve anyway
//! - `WORKER_IGNORE_TERM=1`    ignore SIGTERM
//! - `WORKER_MEM_MB=N`         allocate and touch N MiB at start (RSS tests)
//!
//! Template mode (`worker.mode = "template"`, docs/template.md): when
//! `DROVE_TEMPLATE_FD` is set this process is the template. It says hello
//! on that socket and forks a worker (double fork, so droved adopts it)
//! for each `spawn`; the worker then carries on below as usual.
//!
//! Signals: SIGTERM finishes the request in progress, sends `STOPPING=1` and
//! exits 0; SIGINT and SIGQUIT exit at once with 128+signo.
//!
//! Besides the listeners and the connection being served, the worker holds
//! two fds of its own: an unbound datagram socket for NOTIFY_SOCKET and
//! /dev/null (see `on_term`).
//!
//! Exit codes: 0 after SIGTERM, 2 for a broken contract (no or foreign
//! `LISTEN_PID`, bad fds, bad knob values), N for `/exit?code=N` and
//! `WORKER_EXIT_AT_START=N`.

// The crate denies unsafe code, and [lints] apply to examples too. This
// worker needs it only to take ownership of the inherited fds and for its
// signal handlers.
#![allow(unsafe_code)]

use std::fmt::Write as _;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixStream};
use std::process::exit;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// `eprintln!` that cannot panic: a worker whose stderr is a full disk or a
/// gone journal keeps serving; its log lines are lost.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), $($arg)*);
    }};
}
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrLike, SockaddrStorage, accept4, getsockname,
    getsockopt, sockopt,
};

/// Whole-request deadline for reading the request head, and write timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Cap on request line plus headers.
const MAX_HEAD: usize = 8 * 1024;
/// Cap on `ms=` for /sleep and /cpu (10 minutes).
const MAX_MS: u64 = 600_000;

/// Set by the SIGTERM handler; checked between requests.
static TERM: AtomicBool = AtomicBool::new(false);
/// An fd open on /dev/null and the number of listeners (at fd 3..), for the
/// SIGTERM handler; -1 and 0 until the listeners are taken.
static DEVNULL: AtomicI32 = AtomicI32::new(-1);
static LISTEN_N: AtomicI32 = AtomicI32::new(0);
/// Set by /stop-watchdog and /hang; the watchdog thread stops pinging.
static WATCHDOG_STOPPED: AtomicBool = AtomicBool::new(false);

/// Sets TERM, and points our listener fds at /dev/null. Checking a flag
/// before a blocking poll/accept always leaves a window where the signal
/// lands just before the call and is missed; with the fds swapped, any later
/// poll returns at once and accept fails (ENOTSOCK), so the loop sees TERM.
/// Only our fd table changes: droved and the other workers keep the sockets.
extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
    let devnull = DEVNULL.load(Ordering::SeqCst);
    if devnull >= 0 {
        for fd in 3..3 + LISTEN_N.load(Ordering::SeqCst) {
            // SAFETY: dup2 is async-signal-safe and touches no memory. It
            // replaces what the listeners' OwnedFds refer to, but the numbers
            // stay open and are only used for poll/accept, which then fail
            // harmlessly.
            unsafe { libc::dup2(devnull, fd) };
        }
    }
}

extern "C" fn on_quit(sig: libc::c_int) {
    // SAFETY: _exit is async-signal-safe and takes no pointers.
    unsafe { libc::_exit(128 + sig) }
}

fn die(msg: impl std::fmt::Display) -> ! {
    say!("worker[{}]: {msg}", std::process::id());
    exit(2)
}

fn env_num(name: &str) -> Option<u64> {
    // Empty counts as unset (`systemd-socket-activate -E NAME` passes "").
    let v = std::env::var(name).ok().filter(|v| !v.trim().is_empty())?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => die(format_args!("{name}={v:?} is not a non-negative integer")),
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn install_signal_handlers(ignore_term: bool) {
    let no_restart = SaFlags::empty(); // no SA_RESTART: poll/accept return EINTR
    let term = if ignore_term {
        SigHandler::SigIgn
    } else {
        SigHandler::Handler(on_term)
    };
    let actions = [
        (Signal::SIGTERM, term),
        (Signal::SIGINT, SigHandler::Handler(on_quit)),
        (Signal::SIGQUIT, SigHandler::Handler(on_quit)),
    ];
    for (sig, handler) in actions {
        let action = SigAction::new(handler, no_restart, SigSet::empty());
        // SAFETY: the handlers only store to an atomic or call _exit, both
        // async-signal-safe; nothing else relies on the previous disposition.
        if let Err(e) = unsafe { sigaction(sig, &action) } {
            die(format_args!("sigaction({sig}): {e}"));
        }
    }
}

// ---------------------------------------------------------------- sd_notify

struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    display: String,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`: a filesystem path or an abstract `@name`.
    fn from_env() -> Option<Arc<Notifier>> {
        let raw = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty())?;
        let addr = if let Some(name) = raw.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes())
        } else if raw.starts_with('/') {
            SocketAddr::from_pathname(&raw)
        } else {
            say!("worker: unsupported NOTIFY_SOCKET={raw:?}, not notifying");
            return None;
        };
        let addr = match addr {
            Ok(a) => a,
            Err(e) => {
                say!("worker: bad NOTIFY_SOCKET={raw:?}: {e}, not notifying");
                return None;
            }
        };
        match UnixDatagram::unbound() {
            Ok(sock) => Some(Arc::new(Notifier {
                sock,
                addr,
                display: raw,
            })),
            Err(e) => {
                say!("worker: cannot create notify socket: {e}");
                None
            }
        }
    }

    fn send(&self, msg: &str) -> io::Result<()> {
        let r = self.sock.send_to_addr(msg.as_bytes(), &self.addr).map(drop);
        if let Err(e) = &r {
            say!(
                "worker[{}]: sending {msg:?} to {}: {e}",
                std::process::id(),
                self.display
            );
        }
        r
    }
}

fn notify(n: Option<&Notifier>, msg: &str) {
    if let Some(n) = n {
        let _ = n.send(msg);
    }
}

/// Pings `WATCHDOG=1` every WATCHDOG_USEC/2 until /stop-watchdog or /hang.
fn start_watchdog(notifier: Option<&Arc<Notifier>>) {
    let Some(usec) = env_num("WATCHDOG_USEC").filter(|&u| u > 0) else {
        return;
    };
    // sd_watchdog_enabled(3): WATCHDOG_PID, when set, names the process meant.
    if let Ok(p) = std::env::var("WATCHDOG_PID")
        && p.trim() != std::process::id().to_string()
    {
        return;
    }
    let Some(n) = notifier.cloned() else {
        say!("worker: WATCHDOG_USEC set but no NOTIFY_SOCKET");
        return;
    };
    let interval = Duration::from_micros(usec / 2);
    // Keep SIGTERM/SIGINT/SIGQUIT away from this thread so they always
    // interrupt the main thread's poll/accept: block them around the spawn
    // (the thread inherits the mask), then unblock them here again.
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT] {
        sigs.add(s);
    }
    let _ = sigs.thread_block();
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            while !WATCHDOG_STOPPED.load(Ordering::SeqCst) {
                let _ = n.send("WATCHDOG=1");
                std::thread::sleep(interval);
            }
        });
    let _ = sigs.thread_unblock();
    if let Err(e) = spawned {
        die(format_args!("spawning watchdog thread: {e}"));
    }
}

// ---------------------------------------------------------------- listeners

struct Listener {
    fd: OwnedFd,
    unix: bool,
    desc: String,
}

/// sd_listen_fds(3), strictly: LISTEN_PID must be us.
fn take_listeners() -> Vec<Listener> {
    let pid = std::env::var("LISTEN_PID")
        .unwrap_or_else(|_| die("LISTEN_PID is not set: not socket-activated"));
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        die(format_args!(
            "LISTEN_PID={pid} but my pid is {}: these fds are not for me",
            std::process::id()
        ));
    }
    let n = std::env::var("LISTEN_FDS").unwrap_or_else(|_| die("LISTEN_FDS is not set"));
    let n: RawFd = match n.trim().parse() {
        Ok(n) if n > 0 && n < 1024 => n,
        _ => die(format_args!("LISTEN_FDS={n:?}: expected 1..1023")),
    };
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');

    (3..3 + n)
        .map(|raw| {
            let name = names.next().filter(|s| !s.is_empty()).unwrap_or("unknown");
            // SAFETY: F_GETFD on an integer fd touches no memory; it only
            // checks that the fd is open before we claim it.
            if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
                die(format_args!("LISTEN_FDS={n} but fd {raw} is not open"));
            }
            // SAFETY: the fd is open and, per LISTEN_PID, handed to this
            // process to own; nothing else in this program refers to it.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            if let Err(e) = fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
                die(format_args!("fd {raw}: setting CLOEXEC: {e}"));
            }
            let stream = getsockopt(&fd, sockopt::SockType) == Ok(SockType::Stream);
            let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
            if !stream || !listening {
                die(format_args!(
                    "fd {raw} ({name}) is not a listening stream socket"
                ));
            }
            let addr = getsockname::<SockaddrStorage>(raw);
            let unix = matches!(&addr, Ok(a) if a.family() == Some(AddressFamily::Unix));
            let desc = match addr {
                Ok(a) => format!("fd {raw} ({name}) {a}"),
                Err(_) => format!("fd {raw} ({name})"),
            };
            Listener { fd, unix, desc }
        })
        .collect()
}

// ---------------------------------------------------------------- connections

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(Some(t)),
            Conn::Unix(s) => s.set_read_timeout(Some(t)),
        }
    }
    fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_write_timeout(Some(t)),
            Conn::Unix(s) => s.set_write_timeout(Some(t)),
        }
    }
    fn shutdown_write(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum HeadError {
    /// Client went away before sending a full head: nothing to answer.
    Closed,
    Timeout,
    TooLarge,
}

/// Reads up to the blank line ending the head. Returns the buffer and the
/// offset just past the head (bytes after it are body or pipelined data).
fn read_head(conn: &mut Conn) -> Result<(Vec<u8>, usize), HeadError> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = head_end(&buf) {
            return Ok((buf, end));
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(left).is_err() {
            return Err(HeadError::Timeout);
        }
        match conn.read(&mut chunk) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            // SIGTERM mid-request: finish this request first.
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(HeadError::Timeout);
            }
            Err(_) => return Err(HeadError::Closed),
        }
    }
}

fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

struct Request {
    method: String,
    path: String,
    query: String,
    /// Declared request body length, or 1 for chunked: worth draining.
    body: u64,
}

fn parse_head(head: &[u8]) -> Result<Request, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8")?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line");
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("malformed method");
    }
    if !version.starts_with("HTTP/1.") {
        return Err("unsupported HTTP version");
    }
    // Absolute-form (proxies): keep only the path.
    let target = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    if !target.starts_with('/') {
        return Err("malformed request target");
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut body = 0;
    for h in lines.take_while(|l| !l.is_empty()) {
        let (k, v) = h.split_once(':').ok_or("malformed header line")?;
        if k.eq_ignore_ascii_case("content-length") {
            body = v.trim().parse().map_err(|_| "bad Content-Length")?;
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            body = body.max(1);
        }
    }
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        body,
    })
}

fn percent_decode(s: &str) -> String {
    let hex = |c: Option<&u8>| c.and_then(|&c| (c as char).to_digit(16));
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], hex(b.get(i + 1)), hex(b.get(i + 2))) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 2;
            }
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

// ---------------------------------------------------------------- routes

enum After {
    Continue,
    Exit(i32),
    Hang,
}

struct Response {
    status: u16,
    body: String,
    after: After,
}

fn resp(status: u16, body: impl Into<String>) -> Response {
    Response {
        status,
        body: body.into(),
        after: After::Continue,
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn ms_param(req: &Request) -> Result<u64, Response> {
    match query_param(&req.query, "ms").map(|v| v.parse::<u64>()) {
        Some(Ok(ms)) if ms <= MAX_MS => Ok(ms),
        Some(Ok(_)) => Err(resp(400, format!("ms must be <= {MAX_MS}\n"))),
        _ => Err(resp(400, "expected ?ms=<non-negative integer>\n")),
    }
}

fn env_or_dash(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| "-".into())
}

fn route(req: &Request, notifier: Option<&Notifier>) -> Response {
    let pid = std::process::id();
    match req.path.as_str() {
        "/" => resp(
            200,
            format!(
                "pid={pid} worker={} generation={}\n",
                env_or_dash("DROVE_WORKER"),
                env_or_dash("DROVE_GENERATION")
            ),
        ),
        "/sleep" => match ms_param(req) {
            Ok(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                resp(200, format!("pid={pid} slept_ms={ms}\n"))
            }
            Err(r) => r,
        },
        "/cpu" => match ms_param(req) {
            Ok(ms) => {
                burn_cpu(Duration::from_millis(ms));
                resp(200, format!("pid={pid} cpu_ms={ms}\n"))
            }
            Err(r) => r,
        },
        "/env" => resp(200, env_report()),
        "/status" => {
            let text = query_param(&req.query, "text").unwrap_or_default();
            // One line only: a newline would smuggle in another assignment.
            let text = text.replace(['\n', '\r'], " ");
            match notifier.map(|n| n.send(&format!("STATUS={text}"))) {
                Some(Ok(())) => resp(200, format!("sent STATUS={text}\n")),
                Some(Err(e)) => resp(503, format!("sending STATUS failed: {e}\n")),
                None => resp(503, "NOTIFY_SOCKET is not set\n"),
            }
        }
        "/exit" => {
            let code = query_param(&req.query, "code").unwrap_or_else(|| "0".into());
            match code.parse::<u8>() {
                Ok(c) => Response {
                    after: After::Exit(c.into()),
                    ..resp(200, format!("pid={pid} exiting with code {c}\n"))
                },
                Err(_) => resp(400, "expected ?code=<0..255>\n"),
            }
        }
        "/eat" => match query_param(&req.query, "mb").and_then(|m| m.parse::<usize>().ok()) {
            Some(mb) if mb <= 64 << 10 => {
                let len = mb << 20;
                let mut v = vec![0u8; len]; // calloc'd zero pages are not resident yet
                for i in (0..len).step_by(4096) {
                    v[i] = 1;
                }
                let touched = std::hint::black_box(v).len() >> 20;
                resp(200, format!("pid={pid} touched {touched} MiB\n"))
            }
            _ => resp(400, "expected ?mb=<0..65536>\n"),
        },
        "/stop-watchdog" => {
            WATCHDOG_STOPPED.store(true, Ordering::SeqCst);
            resp(200, format!("pid={pid} watchdog pings stopped\n"))
        }
        "/hang" => Response {
            after: After::Hang,
            ..resp(200, "")
        },
        _ => resp(404, "not found\n"),
    }
}

/// Busy-loop on this thread for `d` of wall-clock time.
fn burn_cpu(d: Duration) {
    let end = Instant::now() + d;
    let mut x = 1u64;
    while Instant::now() < end {
        for _ in 0..1000 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
    }
}

fn env_report() -> String {
    let mut out = String::new();
    for k in [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "DROVE_WORKER",
        "DROVE_GENERATION",
    ] {
        if let Ok(v) = std::env::var(k) {
            let _ = writeln!(out, "{k}={v}");
        }
    }
    let _ = writeln!(out, "pid={}", std::process::id());
    // Collect names while the directory is open, resolve them after it is
    // closed: the listing's own fd is gone by then and drops out (ENOENT).
    let fds: Vec<u32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(e) => {
            let _ = writeln!(out, "# /proc/self/fd: {e}");
            Vec::new()
        }
    };
    let mut fds = fds;
    fds.sort_unstable();
    for fd in fds {
        if let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
            let _ = writeln!(out, "fd {fd} -> {}", target.display());
        }
    }
    out
}

fn write_response(conn: &mut Conn, r: &Response, head_only: bool) {
    let mut msg = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.body.len()
    )
    .into_bytes();
    if !head_only {
        msg.extend_from_slice(r.body.as_bytes());
    }
    let _ = conn.set_write_timeout(IO_TIMEOUT);
    // write_all retries on EINTR, so SIGTERM does not cut a response short.
    let _ = conn.write_all(&msg);
}

/// Closing with unread input makes the kernel send RST, which can destroy
/// the response before the client reads it. Drain what the client declared
/// (bounded) after telling it we are done.
fn drain(conn: &mut Conn, pending: u64) {
    let _ = conn.set_read_timeout(Duration::from_millis(500));
    let mut left = pending.min(1 << 20);
    let mut buf = [0u8; 4096];
    while left > 0 {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => left = left.saturating_sub(k as u64),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

fn handle(mut conn: Conn, notifier: Option<&Notifier>) {
    let (resp, head_only, pending) = match read_head(&mut conn) {
        Err(HeadError::Closed) => return,
        Err(HeadError::Timeout) => (resp(408, "request timeout\n"), false, 0),
        Err(HeadError::TooLarge) => (resp(431, "request head too large\n"), false, 1 << 16),
        Ok((buf, end)) => {
            let extra = (buf.len() - end) as u64;
            match parse_head(&buf[..end]) {
                Err(why) => (resp(400, format!("{why}\n")), false, extra),
                Ok(req) => {
                    // Unread body or pipelined bytes: drain before closing.
                    let pending = if req.body > 0 || extra > 0 {
                        req.body.saturating_sub(extra).max(1)
                    } else {
                        0
                    };
                    match req.method.as_str() {
                        "GET" | "HEAD" => (route(&req, notifier), req.method == "HEAD", pending),
                        _ => (resp(405, "only GET and HEAD\n"), false, pending),
                    }
                }
            }
        }
    };
    if let After::Hang = resp.after {
        // A wedged worker: no answer, no pings, deaf to SIGTERM (the flag is
        // set but never looked at again). Only SIGKILL/SIGINT/SIGQUIT end it.
        WATCHDOG_STOPPED.store(true, Ordering::SeqCst);
        say!("worker[{}]: /hang: blocking forever", std::process::id());
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    write_response(&mut conn, &resp, head_only);
    conn.shutdown_write();
    if pending > 0 {
        drain(&mut conn, pending);
    }
    drop(conn);
    if let After::Exit(code) = resp.after {
        exit(code);
    }
}

// ---------------------------------------------------------------- main

fn stop(notifier: Option<&Notifier>) -> ! {
    notify(notifier, "STOPPING=1");
    exit(0)
}

fn main() {
    if let Some(code) = env_num("WORKER_EXIT_AT_START") {
        exit(i32::try_from(code).unwrap_or(255));
    }
    install_signal_handlers(env_flag("WORKER_IGNORE_TERM"));
    let listeners = take_listeners();
    match std::fs::File::open("/dev/null") {
        Ok(f) => {
            // Leaked on purpose: the SIGTERM handler may use it until exit.
            DEVNULL.store(std::os::fd::IntoRawFd::into_raw_fd(f), Ordering::SeqCst);
            LISTEN_N.store(listeners.len() as i32, Ordering::SeqCst);
        }
        Err(e) => die(format_args!("/dev/null: {e}")),
    }
    let notifier = Notifier::from_env();
    let n = notifier.as_deref();

    let _ballast = env_num("WORKER_MEM_MB").map(|mb| {
        let len = usize::try_from(mb << 20).unwrap_or_else(|_| die("WORKER_MEM_MB too large"));
        let mut v = vec![0u8; len]; // calloc'd zero pages are not resident yet
        for i in (0..len).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(v)
    });

    if let Some(fd) = env_num("DROVE_TEMPLATE_FD") {
        template::serve(fd as RawFd);
    }

    start_watchdog(notifier.as_ref());

    if let Some(ms) = env_num("WORKER_READY_DELAY_MS") {
        let until = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < until {
            if TERM.load(Ordering::SeqCst) {
                stop(n);
            }
            let left = until.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    for l in &listeners {
        say!("worker[{}]: serving {}", std::process::id(), l.desc);
    }
    // Stopped while starting up: say STOPPING=1, never READY=1.
    if TERM.load(Ordering::SeqCst) {
        stop(n);
    }
    if !env_flag("WORKER_NO_READY") {
        notify(n, "READY=1");
    }

    let mut fds: Vec<PollFd> = listeners
        .iter()
        .map(|l| PollFd::new(l.fd.as_fd(), PollFlags::POLLIN))
        .collect();
    loop {
        if TERM.load(Ordering::SeqCst) {
            stop(n);
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => die(format_args!("poll: {e}")),
        }
        let ready: Vec<usize> = fds
            .iter()
            .enumerate()
            .filter(|(_, p)| p.any().unwrap_or(false))
            .map(|(i, _)| i)
            .collect();
        // One connection per ready listener per round, so none starves.
        for i in ready {
            if TERM.load(Ordering::SeqCst) {
                stop(n);
            }
            let l = &listeners[i];
            // Blocking accept: another worker may have taken the connection
            // since poll() woke us all. SIGTERM still interrupts it (EINTR),
            // and EAGAIN (some other process set O_NONBLOCK) just re-polls.
            // The socket is shared with droved and the other workers, so we
            // never set O_NONBLOCK on it ourselves: it would change it for all.
            match accept4(&l.fd, SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => {
                    let conn = if l.unix {
                        Conn::Unix(UnixStream::from(fd))
                    } else {
                        Conn::Tcp(TcpStream::from(fd))
                    };
                    handle(conn, n);
                }
                Err(_) if TERM.load(Ordering::SeqCst) => stop(n),
                Err(Errno::EINTR | Errno::EAGAIN | Errno::ECONNABORTED | Errno::EPROTO) => {}
                Err(e @ (Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)) => {
                    say!("worker: accept on {}: {e}; backing off", l.desc);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => die(format_args!("accept on {}: {e}", l.desc)),
            }
        }
    }
}

/// docs/template.md, protocol 1, for a single-threaded process.
mod template {
    use super::*;
    use nix::sys::socket::{MsgFlags, recv, send};
    use nix::sys::wait::waitpid;
    use nix::unistd::{ForkResult, Pid, close, fork, getppid, pipe, read, write};

    /// Serves `spawn` requests; returns only in a forked worker.
    pub fn serve(fd: RawFd) {
        let droved = getppid();
        let sock = fd;
        let say_hello = send(sock, b"DROVE-TEMPLATE 1", MsgFlags::empty());
        if let Err(e) = say_hello {
            die(format_args!("template socket: {e}"));
        }
        let mut buf = [0u8; 512];
        loop {
            let n = match recv(sock, &mut buf, MsgFlags::empty()) {
                Ok(0) => exit(0), // droved is done with us
                Ok(n) => n,
                Err(Errno::EINTR) if TERM.load(Ordering::SeqCst) => exit(0),
                Err(Errno::EINTR) => continue,
                Err(e) => die(format_args!("template socket: {e}")),
            };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let mut words = msg.split_whitespace();
            let (Some("spawn"), Some(slot), Some(generation)) =
                (words.next(), words.next(), words.next())
            else {
                continue;
            };
            let answer = match fork_worker(droved, sock) {
                Ok(Some(pid)) => format!("pid {pid}"),
                Ok(None) => {
                    become_worker(droved, slot, generation);
                    return;
                }
                Err(e) => format!("error {e}"),
            };
            let _ = send(sock, answer.as_bytes(), MsgFlags::empty());
        }
    }

    /// Double fork: `Ok(Some(pid))` in the template once the worker is
    /// droved's child, `Ok(None)` in the worker.
    fn fork_worker(_droved: Pid, sock: RawFd) -> nix::Result<Option<Pid>> {
        let (r, w) = pipe()?;
        // SAFETY: the template runs no threads, so the child may do anything.
        match unsafe { fork() }? {
            ForkResult::Child => {
                // SAFETY: as above.
                match unsafe { fork() } {
                    Ok(ForkResult::Child) => {
                        drop((r, w));
                        let _ = close(sock);
                        Ok(None)
                    }
                    Ok(ForkResult::Parent { child }) => {
                        let _ = write(&w, child.to_string().as_bytes());
                        // SAFETY: _exit takes no pointers.
                        unsafe { libc::_exit(0) }
                    }
                    // SAFETY: as above.
                    Err(_) => unsafe { libc::_exit(1) },
                }
            }
            ForkResult::Parent { child } => {
                drop(w);
                let _ = waitpid(child, None);
                let mut buf = [0u8; 32];
                let n = read(&r, &mut buf).unwrap_or(0);
                std::str::from_utf8(&buf[..n])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .map(|p| Some(Pid::from_raw(p)))
                    .ok_or(Errno::ECHILD)
            }
        }
    }

    fn become_worker(droved: Pid, slot: &str, generation: &str) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while getppid() != droved {
            if Instant::now() > deadline {
                exit(1);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes no pointers.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
        if getppid() != droved {
            exit(1);
        }
        // SAFETY: the worker is single-threaded here (the watchdog thread
        // starts later), so nothing reads the environment concurrently.
        unsafe {
            std::env::set_var("LISTEN_PID", std::process::id().to_string());
            std::env::set_var("DROVE_WORKER", slot);
            std::env::set_var("DROVE_GENERATION", generation);
            std::env::remove_var("DROVE_TEMPLATE_FD");
        }
    }
}
