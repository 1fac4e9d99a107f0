//! Test harness: start the real `droved` with a NOTIFY_SOCKET of the test's
//! own, so tests wait for what droved tells systemd (READY=1, STATUS=)
//! instead of sleeping. Every wait has a deadline.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
}

pub struct Droved {
    pub child: Child,
    pub dir: PathBuf,
    pub port: u16,
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
                }
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
    /// Runs droved under another program (e.g. systemd-socket-activate).
    pub fn launcher(mut self, argv: &[&str]) -> Self {
        self.launcher = argv
            .iter()
            .map(|a| a.replace("{port}", &self.port.to_string()))
            .collect();
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
        let mut cmd = Command::new(&argv[0]);
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
            upward,
            stop_drain,
            drain: Some(drain),
            log_path,
            reaped: None,
        }
    }
}

impl Droved {
    pub fn builder(tag: &str) -> Builder {
        Builder {
            args: vec![],
            config: None,
            env: vec![],
            port: free_port(),
            launcher: vec![],
            tag: tag.into(),
            binary: None,
            output: None,
        }
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
                // Give the drain thread droved's last words.
                std::thread::sleep(Duration::from_millis(100));
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

/// The `pid=N` a worker answered with.
pub fn answered_pid(body: &str) -> i32 {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {body:?}"))
}

/// `n` concurrent requests to `path`; returns the answers (errors as Err).
pub fn concurrent_gets(port: u16, path: &str, n: usize) -> Vec<std::io::Result<String>> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let path = path.to_string();
            std::thread::spawn(move || http_get(("127.0.0.1", port), &path))
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
    let tmp = dest.with_extension("new");
    std::fs::write(&tmp, &bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, dest).unwrap();
}

/// Where a load generator connects.
#[derive(Clone, Debug)]
pub enum Target {
    Tcp(u16),
    Unix(PathBuf),
}

/// Closed-loop clients, each request a fresh connection, bounded by
/// `limit` (127.0.0.1 or a unix socket only). Every failure is kept with
/// its error text.
pub struct Load {
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
        let deadline = Instant::now() + limit;
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
                let (target, path) = (target.clone(), path.to_string());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let result = match &target {
                            Target::Tcp(port) => http_get(("127.0.0.1", *port), &path),
                            Target::Unix(p) => http_get_unix(p, &path),
                        };
                        match result {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => errors.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            errors,
            threads,
        }
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
