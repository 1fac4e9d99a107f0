//! The runner every server case goes through, and its row in the table
//! `tests/run` prints.
//!
//! One run: a fixed pool of [`WORKERS`] under droved; the time from
//! droved's start to its READY=1 (the pool ready); requests until distinct
//! workers answered; a rolling reload (SIGHUP, then droved's READY=1 again)
//! under [`CLIENTS`] closed-loop clients that must see 0 failures; SIGTERM,
//! a clean exit, and no process of the server left alive.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::harness::*;

pub const SEC: Duration = Duration::from_secs(1);
/// Workers in every pool: several, so distinct pids must answer.
pub const WORKERS: usize = 3;
/// Load during a reload: bounded, the machine is shared.
pub const CLIENTS: usize = 4;
/// Each request holds its worker this long, so stops meet requests in flight.
pub const LOAD_PATH: &str = "/sleep?ms=10";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// `ready = "notify"`: the server sends READY=1 itself.
    Notify,
    /// `ready = "exec"`: the server does not speak sd_notify.
    Exec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Tcp,
    Unix,
}

/// Where a server's version comes from.
pub enum Version {
    /// A Debian package's version.
    Deb(&'static str),
    /// A command's output (first line).
    Cmd(Vec<String>),
}

impl Version {
    fn read(&self) -> String {
        let out = match self {
            Version::Deb(pkg) => Command::new("dpkg-query")
                .args(["-W", "-f", "${Version}", pkg])
                .output(),
            Version::Cmd(argv) => Command::new(&argv[0]).args(&argv[1..]).output(),
        };
        match out {
            Ok(o) if o.status.success() => {
                let text = String::from_utf8_lossy(&o.stdout);
                let text = if text.trim().is_empty() {
                    String::from_utf8_lossy(&o.stderr).into_owned()
                } else {
                    text.into_owned()
                };
                // "gunicorn (version 27.0.1)", "v20.1.0", "5.6.5-3": the number.
                text.split(|c: char| c.is_whitespace() || c == '(' || c == ')')
                    .map(|w| w.trim_start_matches('v'))
                    .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
                    .unwrap_or("?")
                    .to_string()
            }
            _ => "not installed".to_string(),
        }
    }
}

pub struct Server {
    /// Name in the table, e.g. "gunicorn (sync)".
    pub name: &'static str,
    pub version: Version,
    pub ready: Ready,
    pub listener: Listener,
    /// The worker command, exactly as a user would configure it.
    pub command: Vec<String>,
    /// Extra `worker.environment`.
    pub env: Vec<(&'static str, String)>,
    /// Extra lines for the `[worker]` table, e.g. `stop_signal = "SIGHUP"`.
    pub extra: &'static str,
    /// A server that cannot stop without dropping requests in flight: why.
    /// Its reload may then fail at most the requests in flight on the
    /// workers it stops (one per client each), and only as connections
    /// closed without an answer: never refused, which would mean the
    /// listening socket went away.
    pub drops_in_flight: Option<&'static str>,
}

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The target dir: target/debug/deps/compat-… -> target (also under
/// CARGO_TARGET_DIR), where tests/run puts the venv and the summary.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

/// gunicorn from PyPI, in the venv tests/run makes with Debian's python3.
pub fn gunicorn() -> String {
    let path = target_dir().join("compat-venv/bin/gunicorn");
    assert!(
        path.exists(),
        "{} is missing: tests/run installs it (/usr/bin/python3 -m venv {}; \
         pip install -r tests/compat/requirements.txt)",
        path.display(),
        target_dir().join("compat-venv").display()
    );
    path.display().to_string()
}

/// A program the test needs on PATH (tests/run installs it).
pub fn program(name: &str) -> String {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run tests/run, which installs the compatibility suite's packages"
    );
    name.to_string()
}

/// One row of the table; written when dropped, so a failed case shows in
/// the table too, with the step it failed at.
struct Row {
    server: String,
    version: String,
    mode: &'static str,
    listener: &'static str,
    ready_in: String,
    pids: String,
    ready: String,
    reload: String,
    stop: String,
    step: &'static str,
    done: bool,
    /// Passed with the losses `Server::drops_in_flight` allows.
    caveat: bool,
}

impl Drop for Row {
    fn drop(&mut self) {
        let result = if self.done && self.caveat {
            "ok, the server loses requests in flight".to_string()
        } else if self.done {
            "ok".to_string()
        } else {
            format!("FAILED at {}", self.step)
        };
        let path = target_dir().join("compat-summary.tsv");
        let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        else {
            return;
        };
        let _ = writeln!(
            f,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.server,
            self.version,
            self.mode,
            self.listener,
            self.ready_in,
            self.pids,
            self.ready,
            self.reload,
            self.stop,
            result
        );
    }
}

/// A port on 127.0.0.1 for a server to bind by itself, reserved while the
/// returned socket is open: bound with SO_REUSEADDR but not listening, so
/// no parallel bind to port 0 gets it, while a server setting
/// SO_REUSEADDR (Python's http.server does) can bind and listen on it.
pub fn own_port() -> (std::os::fd::OwnedFd, u16) {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, getsockname, setsockopt, socket,
        sockopt,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
    let any = std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0);
    bind(fd.as_raw_fd(), &SockaddrIn::from(any)).unwrap();
    let port = getsockname::<SockaddrIn>(fd.as_raw_fd()).unwrap().port();
    (fd, port)
}

/// Every process below `pid` (children, grandchildren…).
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children_of(p) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// Templates droved logged as started (template mode), oldest first.
pub fn templates(d: &Droved) -> Vec<i32> {
    d.log()
        .lines()
        .filter(|l| l.contains("event=\"template-started\""))
        .filter_map(|l| {
            l.split("template_pid=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// droved's workers: its children but the template (template mode).
pub fn pool_workers(d: &Droved) -> Vec<i32> {
    let templates = templates(d);
    d.workers()
        .into_iter()
        .filter(|p| !templates.contains(p))
        .collect()
}

/// The `loaded_by=N` an app answered with: the process that loaded it
/// (the template, for a forked worker).
pub fn loaded_by(body: &str) -> Option<i32> {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("loaded_by="))
        .and_then(|p| p.parse().ok())
}

/// Template mode: the workers answering are droved's children, not the
/// template's, and, where the app says who loaded it (`loaded_by=`, as
/// apps/hello.ru does), forks of `template`.
fn assert_forked_from(d: &Droved, target: &Target, template: i32) {
    let workers = pool_workers(d);
    for _ in 0..(2 * WORKERS) {
        let body = get(target, "/").expect("a request to the template's workers");
        let pid = answered_pid(&body);
        assert!(
            workers.contains(&pid),
            "pid {pid} is no droved worker's ({workers:?})"
        );
        if let Some(loader) = loaded_by(&body) {
            assert_eq!(
                loader, template,
                "a worker not forked from template {template}: {body}"
            );
        }
    }
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The droved worker a serving pid belongs to: itself, or the worker it
/// descends from (gunicorn's arbiter is the droved worker; its child
/// answers).
fn owning_worker(pid: i32, workers: &[i32]) -> Option<i32> {
    let mut p = pid;
    for _ in 0..4 {
        if workers.contains(&p) {
            return Some(p);
        }
        p = parent_of(p)?;
    }
    None
}

pub fn get(target: &Target, path: &str) -> std::io::Result<String> {
    match target {
        Target::Tcp(port) => http_get(("127.0.0.1", *port), path),
        Target::Unix(sock) => http_get_unix(sock, path),
    }
}

/// Rounds of [`CLIENTS`] concurrent slow requests until every worker has
/// answered (or 5 s passed); returns the distinct droved workers seen.
fn distinct_workers(d: &Droved, target: &Target) -> BTreeSet<i32> {
    let workers = pool_workers(d);
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + 5 * SEC;
    while seen.len() < workers.len() && Instant::now() < deadline {
        let answers: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let target = target.clone();
                std::thread::spawn(move || get(&target, "/sleep?ms=100"))
            })
            .collect();
        for a in answers {
            let body = a.join().unwrap().expect("a request before the reload");
            let pid = answered_pid(&body);
            let owner = owning_worker(pid, &workers)
                .unwrap_or_else(|| panic!("pid {pid} is no droved worker's ({workers:?})"));
            seen.insert(owner);
        }
    }
    seen
}

/// The droved config for `server`: a fixed pool of [`WORKERS`].
/// `args` as the inside of a TOML array of strings: `"a", "b"` (Rust's
/// string escapes are TOML's for what commands hold).
pub fn toml_strings<S: AsRef<str>>(args: &[S]) -> String {
    args.iter()
        .map(|a| format!("{:?}", a.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn config(server: &Server) -> String {
    let address = match server.listener {
        Listener::Tcp => "127.0.0.1:{port}",
        Listener::Unix => "unix:{dir}/app.sock",
    };
    let command = toml_strings(&server.command);
    let env = server
        .env
        .iter()
        .map(|(k, v)| format!("{k} = {v:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
[listen]
addresses = ["{address}"]
[worker]
command = [{command}]
environment = {{ {env} }}
ready = "{ready}"
ready_timeout = "20s"
stop_timeout = "10s"
{extra}
[pool]
min = {WORKERS}
max = {WORKERS}
"#,
        ready = match server.ready {
            Ready::Notify => "notify",
            Ready::Exec => "exec",
        },
        extra = server.extra,
    )
}

/// The last lines of droved's log (its workers' output is in it too).
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `server` through the whole matrix; panics at the first failure,
/// with the table row saying where.
pub fn run(server: Server) {
    let template = server.extra.contains("mode = \"template\"");
    let mut row = Row {
        server: server.name.to_string(),
        version: server.version.read(),
        mode: match (server.ready, template) {
            (Ready::Notify, true) => "template, notify",
            (Ready::Exec, true) => "template, exec",
            (Ready::Notify, false) => "notify",
            (Ready::Exec, false) => "exec",
        },
        listener: match server.listener {
            Listener::Tcp => "tcp",
            Listener::Unix => "unix",
        },
        ready_in: "-".into(),
        pids: "-".into(),
        ready: "-".into(),
        reload: "-".into(),
        stop: "-".into(),
        step: "start",
        done: false,
        caveat: false,
    };
    let tag: String = server
        .name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let mut builder = Droved::builder(&tag).config(&config(&server));
    if server.listener == Listener::Unix {
        // droved binds the unix socket itself (where the harness passes
        // droved a TCP socket by activation, an empty launcher is how a
        // test asks for droved's own binding).
        builder = builder.launcher(&[]);
    }
    let t0 = Instant::now();
    let mut d = builder.start();
    let target = match server.listener {
        Listener::Tcp => Target::Tcp(d.port),
        Listener::Unix => Target::Unix(d.dir.join("app.sock")),
    };

    // 1. The pool gets ready: droved's READY=1 once every worker is.
    let up = d.wait_for("the pool ready (or FAILING)", 30 * SEC, |u| {
        u.ready || u.status.contains("FAILING")
    });
    assert!(
        up.ready,
        "{} never got ready under droved: {}\n{}",
        server.name,
        up.status,
        tail(&d.log(), 60)
    );
    let ready_in = t0.elapsed();
    row.ready_in = format!("{} ms", ready_in.as_millis());
    row.step = "readiness";
    let workers = pool_workers(&d);
    assert_eq!(workers.len(), WORKERS, "{}", d.log());
    row.ready = match server.ready {
        // In notify mode a worker is ready only on its own READY=1.
        Ready::Notify => {
            let readies = d.log_count(") ready after");
            assert!(
                readies >= WORKERS,
                "{readies} of {WORKERS} workers sent READY=1\n{}",
                d.log()
            );
            format!("READY=1 x{readies}")
        }
        Ready::Exec => "at exec".to_string(),
    };
    assert!(!d.log().contains("not ready in time"), "{}", d.log());

    // 2. Distinct workers serve.
    row.step = "serving";
    if template {
        let started = templates(&d);
        assert_eq!(started.len(), 1, "one template: {started:?}\n{}", d.log());
        assert_forked_from(&d, &target, started[0]);
    }
    let seen = distinct_workers(&d, &target);
    row.pids = format!("{}/{WORKERS}", seen.len());
    assert!(
        seen.len() >= 2,
        "only worker(s) {seen:?} of {workers:?} answered"
    );

    // 3. A rolling reload under load: 0 failed requests.
    row.step = "reload";
    let load = Load::start(target.clone(), LOAD_PATH, CLIENTS, 30 * SEC);
    eventually("load flows", 10 * SEC, || (load.ok() >= 20).then_some(()));
    let before = load.ok();
    let reload_t0 = Instant::now();
    d.ready_again_after("READY=1 after the reload", 30 * SEC, |d| {
        d.signal(Signal::SIGHUP)
    });
    let reload_took = reload_t0.elapsed();
    // The old workers finish what they accepted and go.
    eventually("the old workers gone", 20 * SEC, || {
        workers.iter().all(|&p| !alive(p)).then_some(())
    });
    let mark = load.ok();
    eventually("the new generation serves the load", 10 * SEC, || {
        (load.ok() >= mark + 20).then_some(())
    });
    let (ok, errors) = load.finish();
    let during = mark - before;
    row.reload = format!(
        "{} of {} failed ({during} in the {} ms rollout)",
        errors.len(),
        ok + errors.len() as u64,
        reload_took.as_millis()
    );
    match server.drops_in_flight {
        None => assert!(
            errors.is_empty(),
            "{} of {} requests failed across the reload, e.g. {:?}\n{}",
            errors.len(),
            ok + errors.len() as u64,
            &errors[..errors.len().min(3)],
            tail(&d.log(), 60)
        ),
        Some(why) => {
            row.reload.push_str(&format!("; {why}"));
            row.caveat = !errors.is_empty();
            assert!(
                errors.len() <= CLIENTS * WORKERS,
                "{} failures: more than the {} requests in flight on the stopped workers: {:?}",
                errors.len(),
                CLIENTS * WORKERS,
                &errors[..errors.len().min(3)],
            );
            // A connection the stopping worker accepted and closed: no
            // answer, or the request's write hit the closed socket. Never
            // refused (the listening socket went away).
            assert!(
                errors.iter().all(|e| e.starts_with("bad response")
                    || e.contains("Broken pipe")
                    || e.contains("Connection reset")),
                "only connections the stopped workers had accepted may fail, not connects: {errors:?}"
            );
        }
    }
    let new = pool_workers(&d);
    assert_eq!(new.len(), WORKERS, "{}", d.log());
    assert!(new.iter().all(|p| !workers.contains(p)));
    if template {
        // A new template loaded the app anew, and the new workers are its.
        let started = templates(&d);
        assert!(
            started.len() >= 2,
            "no new template: {started:?}\n{}",
            d.log()
        );
        let newest = *started.last().unwrap();
        assert!(!started[..started.len() - 1].contains(&newest));
        assert_forked_from(&d, &target, newest);
    }

    // 4. SIGTERM: a graceful stop, nothing left behind.
    row.step = "stop";
    // The workers and the template (droved's children), and theirs.
    let mut tree: Vec<i32> = d.workers();
    for w in tree.clone() {
        tree.extend(descendants(w));
    }
    let stop_t0 = Instant::now();
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(20 * SEC);
    let stop_took = stop_t0.elapsed();
    assert!(status.success(), "droved: {status}\n{}", d.log());
    eventually("no process of the server left", 5 * SEC, || {
        tree.iter().all(|&p| !alive(p)).then_some(())
    });
    assert_eq!(
        d.log_count("sending SIGKILL"),
        0,
        "a worker needed SIGKILL\n{}",
        d.log()
    );
    row.stop = format!(
        "exit 0 in {} ms, no SIGKILL, {} processes, 0 left",
        stop_took.as_millis(),
        tree.len()
    );
    row.done = true;
}
