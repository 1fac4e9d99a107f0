//! Test harness: start the real `droved` with a NOTIFY_SOCKET of the test's
//! own, so tests wait for what droved tells systemd (READY=1, STATUS=)
//! instead of sleeping. Every wait has a deadline.
//!
//! Ports: tests run in parallel, so a port must never be "free a moment
//! ago". By default the harness binds the test's TCP socket itself
//! (127.0.0.1, port 0) and hands it to droved as systemd socket activation
//! does (fd 3, LISTEN_FDS=1, LISTEN_FDNAMES=drove, LISTEN_PID=droved's
//! pid); droved then ignores `-l`/`listen.addresses` (it logs so), and the
//! test keeps the socket open, so the port stays its own. Tests of droved's
//! own binding ([`Builder::droved_binds`]) get a reserved port instead: see
//! [`reserve_port`].

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub const DROVED: &str = env!("CARGO_BIN_EXE_droved");

/// The Rust example worker (`cargo build --examples` builds it; `cargo
/// test` does too).
pub fn example_worker() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/tests-xxxx -> target/debug/examples/worker
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("worker");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --examples` first",
        path.display()
    );
    path
}

pub fn python_worker() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/wsgi_worker.py")
}

/// The listen(2) backlog droved uses by default (`listen.backlog`), so a
/// socket the harness passes behaves like one droved binds.
const DROVED_BACKLOG: i32 = 1024;

/// A TCP socket bound to 127.0.0.1 on a port the kernel picked, with
/// SO_REUSEADDR, not yet listening, and its port.
///
/// While it is open the port is ours, whether it listens or not:
/// - [`Builder::start`] makes it listen and passes it to droved (socket
///   activation): nobody else can bind a port with a listener on it;
/// - for a test where droved (or systemd-socket-activate) must bind the
///   port itself, it stays bound but not listening, as a reservation.
///   Linux lets another socket with SO_REUSEADDR (droved's and
///   systemd-socket-activate's both set it) bind and listen on that port,
///   since ours does not listen; but the kernel never hands it out for
///   another bind to port 0 (a probe such as the old `free_port()`), and
///   `connect` never takes it as a local port, because a socket is bound
///   to it. So no parallel test can take it between our pick and droved's
///   bind; a probe that was closed again (the old way) guaranteed nothing.
pub fn reserve_port() -> (OwnedFd, u16) {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, getsockname, setsockopt, socket,
        sockopt,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("a TCP socket");
    setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::LOCALHOST,
            0,
        )),
    )
    .expect("bind 127.0.0.1:0");
    let port = getsockname::<SockaddrIn>(fd.as_raw_fd()).unwrap().port();
    (fd, port)
}

pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "drove-test-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A temporary directory for a test's own files (sockets, binaries),
/// removed when dropped; kept after a failure, for a look.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        Scratch(temp_dir(tag))
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// What droved has told "systemd" (us) so far.
#[derive(Debug, Default, Clone)]
pub struct Upward {
    pub ready: bool,
    pub stopping: bool,
    pub reloading: u32,
    pub ready_count: u32,
    pub status: String,
    pub statuses: Vec<String>,
    /// When each of `statuses` arrived (read by the drain thread, not
    /// when a test looked).
    pub status_times: Vec<Instant>,
    /// Every datagram as it came, to check what a line could smuggle in.
    pub datagrams: Vec<String>,
    /// Flush markers the harness sent itself (see `Droved::flush_upward`).
    flushed: u32,
}

/// What the harness sends its own notify socket to learn that everything
/// queued before it was read.
const FLUSH_MARKER: &str = "X_DROVE_HARNESS_FLUSH";

pub struct Droved {
    pub child: Child,
    pub dir: PathBuf,
    pub port: u16,
    /// The test's port, kept open for the test's whole life (see
    /// [`reserve_port`]).
    _port_socket: OwnedFd,
    notify_path: PathBuf,
    /// Filled by a thread that drains droved's notifications at once, as
    /// systemd would, so droved's queue to us never fills up.
    upward: Arc<Mutex<Upward>>,
    stop_drain: Arc<AtomicBool>,
    drain: Option<std::thread::JoinHandle<()>>,
    log_path: PathBuf,
    reaped: Option<ExitStatus>,
}

impl Upward {
    fn take(&mut self, datagram: &[u8]) {
        let text = String::from_utf8_lossy(datagram).into_owned();
        self.datagrams.push(text.clone());
        for line in text.lines() {
            match line.split_once('=') {
                Some(("READY", "1")) => {
                    self.ready = true;
                    self.ready_count += 1;
                }
                Some(("STOPPING", "1")) => self.stopping = true,
                Some(("RELOADING", "1")) => self.reloading += 1,
                Some(("STATUS", s)) => {
                    self.status = s.to_string();
                    self.statuses.push(s.to_string());
                    self.status_times.push(Instant::now());
                }
                Some((FLUSH_MARKER, _)) => self.flushed += 1,
                _ => {}
            }
        }
    }
}

fn drain_notifications(sock: UnixDatagram, upward: Arc<Mutex<Upward>>, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        if let Ok(n) = sock.recv(&mut buf) {
            upward.lock().unwrap().take(&buf[..n]);
        }
    }
}

pub struct Builder {
    args: Vec<String>,
    config: Option<String>,
    env: Vec<(String, String)>,
    port: u16,
    port_socket: OwnedFd,
    droved_binds: bool,
    launcher: Vec<String>,
    tag: String,
    binary: Option<PathBuf>,
    output: Option<PathBuf>,
}

impl Builder {
    /// Args before `--`; `{port}` is replaced by the test's port.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(
            args.iter()
                .map(|a| a.replace("{port}", &self.port.to_string())),
        );
        self
    }
    /// Writes a config file (`{port}`, `{worker}` and `{dir}` substituted) and passes `-c`.
    pub fn config(mut self, text: &str) -> Self {
        self.config = Some(text.to_string());
        self
    }
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    /// Runs droved under another program (e.g. systemd-socket-activate),
    /// which binds `{port}` itself: implies [`Builder::droved_binds`].
    pub fn launcher(mut self, argv: &[&str]) -> Self {
        self.launcher = argv
            .iter()
            .map(|a| a.replace("{port}", &self.port.to_string()))
            .collect();
        self.droved_binds()
    }

    /// droved binds its sockets itself, from `-l` or `listen.addresses`:
    /// for tests of that binding (several addresses, unix sockets, a
    /// backlog, bind errors). `{port}` is then a port reserved for the
    /// test's life ([`reserve_port`]) instead of a socket passed to droved.
    pub fn droved_binds(mut self) -> Self {
        self.droved_binds = true;
        self
    }

    /// Runs this droved binary instead of the built one (upgrade tests
    /// replace it on disk).
    pub fn binary(mut self, path: &Path) -> Self {
        self.binary = Some(path.to_path_buf());
        self
    }

    /// Sends droved's (and so its workers') stdout and stderr to `path`
    /// instead of the log file, e.g. /dev/full; `log()` is then empty.
    pub fn output(mut self, path: &str) -> Self {
        self.output = Some(path.into());
        self
    }

    /// A command that runs `program` as systemd would after socket
    /// activation: the test's socket listening at fd 3, LISTEN_FDS=1,
    /// LISTEN_FDNAMES=drove (droved's default name) and LISTEN_PID = the
    /// pid of `program`. std's Command fixes the environment before it
    /// forks, so `sh` sets LISTEN_PID to its own pid (`$$`) and `exec`s
    /// the program under that same pid. The one `unsafe` of the tests:
    /// placing an fd in the child takes `pre_exec`.
    #[allow(unsafe_code)]
    fn activate(&self, program: &str) -> Command {
        nix::sys::socket::listen(
            &self.port_socket,
            nix::sys::socket::Backlog::new(DROVED_BACKLOG).unwrap(),
        )
        .expect("listen on the test's socket");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"", "sh"])
            .arg(program)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "drove")
            .env_remove("LISTEN_PID");
        let fd = self.port_socket.as_raw_fd();
        // SAFETY: runs in the forked child before exec; dup2(2) and
        // fcntl(2) are async-signal-safe, and the closure allocates
        // nothing. dup2 onto fd 3 clears FD_CLOEXEC there; when the
        // socket already is fd 3, dup2 would do nothing, so clear the
        // flag by hand. Stdio is already in place when this runs, so fd 3
        // holds nothing the child still needs.
        unsafe {
            cmd.pre_exec(move || {
                let r = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    pub fn start(self) -> Droved {
        let dir = temp_dir(&self.tag);
        let notify_path = dir.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let log_path = dir.join("droved.log");
        let mut log = std::fs::File::create(&log_path).unwrap();
        if let Some(path) = &self.output {
            log = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        }
        let subst = |s: &str| {
            s.replace("{port}", &self.port.to_string())
                .replace("{worker}", &example_worker().display().to_string())
                .replace("{dir}", &dir.display().to_string())
        };
        let mut argv: Vec<String> = self.launcher.iter().map(|s| subst(s)).collect();
        argv.push(
            self.binary
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| DROVED.to_string()),
        );
        if let Some(text) = &self.config {
            let path = dir.join("drove.toml");
            std::fs::write(&path, subst(text)).unwrap();
            argv.push("-c".into());
            argv.push(path.display().to_string());
        }
        argv.extend(self.args.iter().map(|s| subst(s)));
        let mut cmd = if self.droved_binds {
            Command::new(&argv[0])
        } else {
            self.activate(&argv[0])
        };
        cmd.args(&argv[1..])
            .env("NOTIFY_SOCKET", &notify_path)
            .env("DROVE_LOG", "debug")
            // Else droved would pick the system bus when the tests run
            // under systemd (tests that want a bus pass --bus).
            .env_remove("INVOCATION_ID")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, subst(v));
        }
        let child = cmd.spawn().unwrap();
        let upward = Arc::new(Mutex::new(Upward::default()));
        let stop_drain = Arc::new(AtomicBool::new(false));
        let drain = {
            let (upward, stop) = (upward.clone(), stop_drain.clone());
            std::thread::spawn(move || drain_notifications(notify, upward, stop))
        };
        Droved {
            child,
            dir,
            port: self.port,
            _port_socket: self.port_socket,
            notify_path,
            upward,
            stop_drain,
            drain: Some(drain),
            log_path,
            reaped: None,
        }
    }
}

/// The config of a pool of `min` to `max` example workers on the test
/// port, ready by notify: `worker` lines are added to `[worker]`, `rest`
/// follows the pool's limits (more keys of `[pool]`, then other tables).
pub fn example_config(min: u32, max: u32, worker: &str, rest: &str) -> String {
    format!(
        r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
command = ["{{worker}}"]
ready = "notify"
{worker}
[pool]
min = {min}
max = {max}
{rest}
"#
    )
}

/// [`example_config`] with metrics (and the `/livez`, `/readyz` probes)
/// on `listen`; `extra` is appended to the file.
pub fn metrics_config(min: u32, max: u32, listen: &str, extra: &str) -> String {
    example_config(
        min,
        max,
        "",
        &format!("[metrics]\nlisten = \"{listen}\"\n{extra}"),
    )
}

impl Droved {
    pub fn builder(tag: &str) -> Builder {
        let (port_socket, port) = reserve_port();
        Builder {
            args: vec![],
            config: None,
            env: vec![],
            port,
            port_socket,
            droved_binds: false,
            launcher: vec![],
            tag: tag.into(),
            binary: None,
            output: None,
        }
    }

    /// droved started on `config` (see [`example_config`]), once it has
    /// sent READY=1.
    pub fn start_ready(tag: &str, config: &str) -> Droved {
        let mut d = Droved::builder(tag).config(config).start();
        d.wait_ready();
        d
    }

    /// A fixed pool of `n` example workers on the test port.
    pub fn example_pool(tag: &str, n: u32) -> Droved {
        Droved::builder(tag)
            .args(&[
                "-l",
                "127.0.0.1:{port}",
                "-w",
                &n.to_string(),
                "--",
                "{worker}",
            ])
            .start()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// What droved has reported so far.
    pub fn upward(&self) -> Upward {
        self.upward.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for what droved reported, or panics with
    /// the log after `timeout`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Upward) -> bool,
    ) -> Upward {
        let deadline = Instant::now() + timeout;
        loop {
            let upward = self.upward();
            if pred(&upward) {
                return upward;
            }
            if let Some(status) = self.try_exit() {
                panic!(
                    "droved exited ({status}) while waiting for {what}\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last status {:?}\n{}",
                    self.upward().status,
                    self.log()
                );
            }
        }
    }

    /// Runs `act` (a signal, a D-Bus call), then waits for the READY=1
    /// droved sends once the reload or upgrade it caused is done.
    pub fn ready_again_after(
        &mut self,
        what: &str,
        timeout: Duration,
        act: impl FnOnce(&Droved),
    ) -> Upward {
        let readies = self.upward().ready_count;
        act(self);
        self.wait_for(what, timeout, |u| u.ready_count > readies)
    }

    pub fn wait_ready(&mut self) -> Upward {
        self.wait_for("READY=1", Duration::from_secs(20), |u| u.ready)
    }

    /// Waits for a STATUS= line containing `needle`.
    pub fn wait_status(&mut self, needle: &str, timeout: Duration) -> String {
        let n = needle.to_string();
        self.wait_for(
            &format!("status containing {needle:?}"),
            timeout,
            move |u| u.status.contains(&n),
        )
        .status
    }

    /// Current worker processes (droved's children).
    pub fn workers(&self) -> Vec<i32> {
        children_of(self.pid())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log has at least `n` lines containing `needle`.
    pub fn wait_log(&mut self, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log_count(needle) < n {
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {n}x {needle:?} in the log\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Number of log lines containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Path of the config file written by [`Builder::config`].
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("drove.toml")
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            self.reaped = self.child.try_wait().unwrap();
        }
        self.reaped
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit() {
                // droved's last words are queued on our socket by now.
                self.flush_upward();
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "droved did not exit within {timeout:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn get(&self, path: &str) -> std::io::Result<String> {
        http_get(("127.0.0.1", self.port), path)
    }

    /// Waits until the drain thread has read every notification queued on
    /// our socket so far: sends a marker behind them (a datagram socket
    /// keeps order) and waits for the thread to read it.
    pub fn flush_upward(&mut self) {
        let n = self.upward.lock().unwrap().flushed + 1;
        UnixDatagram::unbound()
            .unwrap()
            .send_to(format!("{FLUSH_MARKER}={n}").as_bytes(), &self.notify_path)
            .expect("send the flush marker to our notify socket");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.upward.lock().unwrap().flushed < n {
            assert!(
                Instant::now() < deadline,
                "the notify drain thread did not read the flush marker in 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Times (droved's own clock, from its log) of the log lines
    /// containing `needle`: for observation windows measured by droved
    /// rather than by a test thread that a busy machine may deschedule.
    pub fn log_times(&self, needle: &str) -> Vec<SystemTime> {
        self.log()
            .lines()
            .filter(|l| l.contains(needle))
            .filter_map(log_time)
            .collect()
    }
}

/// What the workers and templates wrote to the stderr they share with
/// droved: droved's own lines taken out. droved writes each log line in
/// one write(2), but a worker's line (faulthandler writes a traceback in
/// pieces) can have one of droved's lines land inside it; removing them
/// gives the worker's text back whole.
pub fn workers_output(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut rest = log;
    while let Some(at) = find_droved_line(rest) {
        out.push_str(&rest[..at]);
        rest = match rest[at..].find('\n') {
            Some(end) => &rest[at + end + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

/// Where the next of droved's log lines starts: a timestamp such as
/// `2026-11-29T19:35:05.460739Z` and a space (then the level, padded).
fn find_droved_line(text: &str) -> Option<usize> {
    let b = text.as_bytes();
    let stamp = b"dddd-dd-ddTdd:dd:dd.ddddddZ ";
    (0..b.len().saturating_sub(stamp.len() - 1)).find(|&i| {
        stamp.iter().zip(&b[i..]).all(|(want, got)| match want {
            b'd' => got.is_ascii_digit(),
            w => w == got,
        })
    })
}

/// The timestamp droved's log puts first on a line
/// (`2026-11-29T19:35:05.460739Z`), as a SystemTime.
pub fn log_time(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<u64>().ok()?,
        t.next()?.parse::<u64>().ok()?,
    );
    let secs: f64 = t.next()?.parse().ok()?;
    // Days since 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(
        SystemTime::UNIX_EPOCH
            + Duration::from_secs(days * 86_400 + h * 3600 + min * 60)
            + Duration::from_secs_f64(secs),
    )
}

impl Drop for Droved {
    fn drop(&mut self) {
        if std::env::var_os("DROVE_TEST_DUMP").is_some() {
            eprintln!(
                "---- droved log ({}) ----\n{}",
                self.dir.display(),
                self.log()
            );
        }
        self.stop_drain.store(true, Ordering::Relaxed);
        if let Some(t) = self.drain.take() {
            let _ = t.join();
        }
        if self.try_exit().is_none() {
            // Workers live in their own sessions: kill them explicitly,
            // with droved frozen first so it cannot replace them meanwhile
            // (a replacement would outlive the test).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid()),
                nix::sys::signal::Signal::SIGSTOP,
            );
            for pid in self.workers() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Direct children of `pid`, from /proc (CONFIG_PROC_CHILDREN).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|s| s.parse::<i32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

pub fn alive(pid: i32) -> bool {
    // A zombie is not alive for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// The initial environment of a process (empty once it is gone).
pub fn environ(pid: i32) -> Vec<(String, String)> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter(|e| !e.is_empty())
        .filter_map(|e| {
            let s = String::from_utf8_lossy(e);
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

pub fn env_of(pid: i32, key: &str) -> Option<String> {
    environ(pid)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Open fds of a process: number -> link target.
pub fn fds_of(pid: i32) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?.display().to_string();
            Some((n, target))
        })
        .collect();
    out.sort();
    out
}

/// The fewest fds `pid` held over a few reads 20 ms apart: droved opens
/// files and sockets for a moment on its ticks (/proc reads, sock_diag),
/// more often under load; a leaked fd stays in every read.
pub fn settled_fd_count(pid: i32) -> usize {
    (0..10)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            fds_of(pid).len()
        })
        .min()
        .unwrap()
}

/// Polls `f` until it returns Some, or panics after `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn http_get(addr: impl std::net::ToSocketAddrs, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    http_exchange(&mut s, path)
}

pub fn http_get_unix(path_sock: &Path, path: &str) -> std::io::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(path_sock)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    http_exchange(&mut s, path)
}

fn http_exchange(s: &mut (impl Read + Write), path: &str) -> std::io::Result<String> {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad response {buf:?}"),
        )
    })?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(format!("non-200 response: {head}")));
    }
    Ok(body.to_string())
}

/// Sends `raw` to 127.0.0.1:`port` and reads the whole answer (the
/// metrics server closes after each response).
fn exchange_bytes(port: u16, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(raw)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// Sends `raw` to 127.0.0.1:`port`: the whole answer, head and body, as
/// text (bytes that are not UTF-8 replaced, as answers to garbage may be).
pub fn exchange(port: u16, raw: &[u8]) -> std::io::Result<String> {
    Ok(String::from_utf8_lossy(&exchange_bytes(port, raw)?).into_owned())
}

/// GET `path` on 127.0.0.1:`port` as a Kubernetes probe does: the status
/// code and the body. An answer that is not UTF-8 is an error.
pub fn probe(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: kube-probe/1.31\r\n\r\n"
    );
    let out = String::from_utf8(exchange_bytes(port, request.as_bytes())?)
        .map_err(std::io::Error::other)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("bad response {out:?}")))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {head:?}")))?;
    Ok((code, body.trim_end().to_owned()))
}

/// The `pid=N` a worker answered with.
pub fn answered_pid(body: &str) -> i32 {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {body:?}"))
}

/// `n` concurrent requests to `path`; returns the answers (errors as Err).
/// All `n` connections are established before any request is sent, so
/// they are in flight together even when a busy machine starts the
/// client threads late.
pub fn concurrent_gets(port: u16, path: &str, n: usize) -> Vec<std::io::Result<String>> {
    let streams: Vec<std::io::Result<TcpStream>> = (0..n)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            Ok(s)
        })
        .collect();
    let handles: Vec<_> = streams
        .into_iter()
        .map(|s| {
            let path = path.to_string();
            std::thread::spawn(move || http_exchange(&mut s?, &path))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Writes a copy of the built droved to `dest` whose build id reads `id`
/// (at most 20 bytes): a different build of the same version, made by
/// patching the marker `drove::build_id` reads, so upgrade tests need no
/// second compilation. Written beside `dest` and renamed over it, as a
/// package manager replaces a binary.
pub fn droved_build(dest: &Path, id: &str) {
    assert!(id.len() <= 20 && !id.is_empty());
    let mut bytes = std::fs::read(DROVED).unwrap();
    let marker = b"DROVE_BUILD_ID=dev\0";
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("build id marker in droved");
    let start = at + b"DROVE_BUILD_ID=".len();
    for b in &mut bytes[start..start + 21] {
        *b = 0;
    }
    bytes[start..start + id.len()].copy_from_slice(id.as_bytes());
    install_executable(dest, &bytes);
}

/// Puts an executable file at `path`: written beside it and renamed over
/// it, as a package manager replaces a binary.
///
/// Written by a child process (`cat`), never through an fd of this test
/// process: tests run in parallel threads, and a child another thread
/// forks inherits every open fd until it execs; if that were a write fd of
/// this file, executing it meanwhile fails with ETXTBSY ("Text file
/// busy"), which made droved "exit at start" now and then.
pub fn install_executable(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    let mut cat = Command::new("sh")
        .args(["-c", "cat > \"$0\" && chmod 755 \"$0\""])
        .arg(&tmp)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    cat.stdin.take().unwrap().write_all(bytes).unwrap();
    assert!(
        cat.wait().unwrap().success(),
        "cannot write {}",
        tmp.display()
    );
    std::fs::rename(&tmp, path).unwrap();
}

/// Where a load generator connects.
#[derive(Clone, Debug)]
pub enum Target {
    Tcp(u16),
    Unix(PathBuf),
}

/// A client's connection, TCP or unix.
type Conn = Box<dyn ReadWrite + Send>;

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn connect(target: &Target) -> std::io::Result<Conn> {
    let timeout = Some(Duration::from_secs(20));
    Ok(match target {
        Target::Tcp(port) => {
            let s = TcpStream::connect(("127.0.0.1", *port))?;
            s.set_read_timeout(timeout)?;
            Box::new(s)
        }
        Target::Unix(path) => {
            let s = std::os::unix::net::UnixStream::connect(path)?;
            s.set_read_timeout(timeout)?;
            Box::new(s)
        }
    })
}

/// Closed-loop clients, each request a fresh connection, bounded by
/// `limit` (127.0.0.1 or a unix socket only). Every failure is kept with
/// its error text.
pub struct Load {
    /// When the first connection was opened.
    started: Instant,
    stop: Arc<AtomicBool>,
    ok: Arc<std::sync::atomic::AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(target: Target, path: &str, clients: usize, limit: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        // The clients start together once all exist: the load begins as a
        // burst even when a busy machine is slow to create threads. (Not
        // by connecting in this thread first: a connect to a full accept
        // queue blocks for seconds.)
        let go = Arc::new(std::sync::Barrier::new(clients + 1));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
                let (target, path) = (target.clone(), path.to_string());
                let go = go.clone();
                std::thread::spawn(move || {
                    go.wait();
                    let deadline = Instant::now() + limit;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match connect(&target).and_then(|mut c| http_exchange(&mut c, &path)) {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => errors.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        let started = Instant::now();
        go.wait();
        Load {
            started,
            stop,
            ok,
            errors,
            threads,
        }
    }

    /// When the load began: when its clients were let go.
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients and asserts that no request failed; returns how
    /// many were answered.
    pub fn finish_clean(self) -> u64 {
        let (ok, errors) = self.finish();
        assert!(
            errors.is_empty(),
            "{} of {} requests failed, e.g. {:?}",
            errors.len(),
            ok + errors.len() as u64,
            &errors[..errors.len().min(3)]
        );
        ok
    }

    /// Stops the clients; returns (answered, failures).
    pub fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let errors = self.errors.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

#[test]
fn log_time_reads_droveds_timestamps() {
    let t = log_time("2026-11-29T19:35:05.460739Z  INFO droved starting").unwrap();
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    // date -u -d 2026-11-29T19:35:05Z +%s
    assert_eq!(since.as_secs(), 1_795_980_905);
    assert_eq!(since.subsec_micros(), 460_739);
    assert_eq!(log_time("worker[12]: serving fd 3"), None);
}

#[test]
fn workers_output_takes_droveds_lines_out_even_from_inside_a_worker_line() {
    let log = "2026-12-07T22:42:07.242586Z  WARN worker 1: watchdog timeout\n\
               Fatal Python error: 2026-12-07T22:42:07.242712Z DEBUG sent SIGABRT slot=0\n\
               Aborted\n\
               \n  File \"app.py\", line 3 in spin_forever\n\
               2026-12-07T22:42:08.000000Z  INFO worker 1 exited";
    assert_eq!(
        workers_output(log),
        "Fatal Python error: Aborted\n\n  File \"app.py\", line 3 in spin_forever\n"
    );
    assert_eq!(workers_output("drove.wsgi[5]: up\n"), "drove.wsgi[5]: up\n");
}

#[test]
fn a_reserved_port_is_free_for_droved_and_for_nobody_else() {
    let (_reservation, port) = reserve_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    // What a parallel test does to find a port: the kernel never picks ours.
    let probes: Vec<std::net::TcpListener> = (0..2000)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    assert!(
        probes
            .iter()
            .all(|p| p.local_addr().unwrap().port() != port),
        "bind to port 0 handed out the reserved port {port}"
    );
    drop(probes);
    // droved's own bind (SO_REUSEADDR) takes it, and serves on it...
    let droved = drove::sys::listen::bind_tcp(addr, 16, "drove").expect("droved binds it");
    TcpStream::connect(addr).expect("connect to droved's listener");
    // ...and then nobody else can listen there.
    assert!(drove::sys::listen::bind_tcp(addr, 16, "second").is_err());
    drop(droved);
}
