//! PHP under drove: Debian's `php-cgi` workers with their listener on fd 0
//! (`worker.socket = "stdin"`, the FastCGI convention), behind a real nginx
//! that each test starts itself: not as a daemon, with its own temporary
//! prefix and config, on 127.0.0.1. The droved config is
//! `examples/php.toml` and the nginx server block is docs/guide/php.md's, with
//! only paths and the port changed, so both are tested as published.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The path examples/php.toml and docs/guide/php.md's snippet use.
const EXAMPLE_SOCKET: &str = "/run/php-app/php.sock";

/// "7 workers ready (min 1, ...)" -> 7.
fn ready_in(status: &str) -> u32 {
    status
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// examples/php.toml for a test: its socket in the test's directory, the
/// lines that only make sense in a deployment (user, socket owner, working
/// directory) removed, and `extra` appended (its own sections).
fn example_config(extra: &str) -> String {
    let text = std::fs::read_to_string(Path::new(REPO).join("examples/php.toml")).unwrap();
    assert!(text.contains(EXAMPLE_SOCKET), "examples/php.toml changed");
    let mut out: String = text
        .lines()
        .filter(|l| !l.contains("# deployment"))
        .map(|l| l.replace(EXAMPLE_SOCKET, "{dir}/php.sock") + "\n")
        .collect();
    out.push_str(extra);
    out
}

/// The PHP guide's nginx server block (the ```nginx fence of docs/guide/php.md).
fn guide_server_block() -> String {
    let guide = std::fs::read_to_string(Path::new(REPO).join("docs/guide/php.md")).unwrap();
    let start = guide
        .find("```nginx\n")
        .expect("docs/guide/php.md has an ```nginx block")
        + "```nginx\n".len();
    let len = guide[start..].find("```").unwrap();
    guide[start..start + len].to_string()
}

/// nginx in front of a droved pool, on a reserved 127.0.0.1 port.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
    /// The port stays ours while nginx binds it (see `reserve_port`).
    _reservation: OwnedFd,
}

impl Nginx {
    /// Starts nginx with the PHP guide's server block, serving `docroot`
    /// and passing `.php` to the FastCGI socket `php_socket`, and waits
    /// until it answers.
    fn start(scratch: &Scratch, docroot: &Path, php_socket: &Path) -> Nginx {
        let (reservation, port) = reserve_port();
        let dir = scratch.join("nginx");
        std::fs::create_dir_all(&dir).unwrap();
        // `include fastcgi_params` is relative to the config's directory.
        std::fs::copy("/etc/nginx/fastcgi_params", dir.join("fastcgi_params"))
            .expect("nginx's fastcgi_params (tests/run installs nginx)");
        let server = guide_server_block()
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
            .replace("/var/www/php-app", &docroot.display().to_string())
            .replace(EXAMPLE_SOCKET, &php_socket.display().to_string());
        let d = dir.display();
        // One process (master_process off): the test owns exactly one pid,
        // running as the test's user whoever that is.
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  default_type text/plain;\n\
             client_body_temp_path {d}/body;\n  fastcgi_temp_path {d}/fastcgi;\n\
             proxy_temp_path {d}/proxy;\n  scgi_temp_path {d}/scgi;\n  uwsgi_temp_path {d}/uwsgi;\n\
             {server}}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run nginx (tests/run installs it)");
        let mut nginx = Nginx {
            child,
            port,
            dir,
            _reservation: reservation,
        };
        std::fs::write(docroot.join("alive.txt"), "ok\n").unwrap();
        let deadline = Instant::now() + 10 * SEC;
        while nginx.get("/alive.txt").is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}):\n{}", nginx.log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not answer within 10 s:\n{}",
                nginx.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    fn get(&self, path: &str) -> std::io::Result<String> {
        http_get(("127.0.0.1", self.port), path)
    }

    fn log(&self) -> String {
        ["stderr.log", "error.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default())
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: graceful; a single nginx process exits at once when idle.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGQUIT);
        let deadline = Instant::now() + 5 * SEC;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// droved running examples/php.toml (plus `extra`) behind nginx.
struct PhpPool {
    droved: Droved,
    nginx: Nginx,
    _scratch: Scratch,
}

fn php_pool(tag: &str, extra: &str) -> PhpPool {
    let scratch = Scratch::new(tag);
    let docroot = scratch.join("www");
    std::fs::create_dir_all(&docroot).unwrap();
    std::fs::copy(
        Path::new(REPO).join("examples/php/index.php"),
        docroot.join("index.php"),
    )
    .unwrap();
    let mut droved = Droved::builder(tag)
        .droved_binds()
        .config(&example_config(extra))
        .start();
    droved.wait_ready();
    let socket = droved.dir.join("php.sock");
    let nginx = Nginx::start(&scratch, &docroot, &socket);
    PhpPool {
        droved,
        nginx,
        _scratch: scratch,
    }
}

/// The inode of the socket at `pid`'s fd 0 (`socket:[N]`), if it is one.
fn stdin_socket(pid: i32) -> Option<String> {
    fds_of(pid)
        .into_iter()
        .find(|(fd, _)| *fd == 0)
        .map(|(_, target)| target)
        .filter(|t| t.starts_with("socket:["))
}

/// Processes that hold `socket` (a `socket:[N]` link) open, on any fd.
fn holders_of(socket: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == socket))
        {
            out.push(pid);
        }
    }
    out
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn php_cgi_workers_answer_through_nginx_from_fd_0() {
    let p = php_pool("php-answer", "");
    let status = p.droved.upward().status;
    assert!(status.starts_with("2 workers ready"), "{status}");
    let workers = p.droved.workers();
    assert_eq!(workers.len(), 2, "{}", p.droved.log());
    let listener = stdin_socket(workers[0]).expect("a socket on fd 0");
    for &pid in &workers {
        assert_eq!(comm(pid), "php-cgi");
        // The FastCGI convention: the one listener on fd 0, nothing at 3,
        // and no systemd variables that would point elsewhere.
        assert_eq!(stdin_socket(pid).as_deref(), Some(listener.as_str()));
        assert!(
            fds_of(pid).iter().all(|(fd, t)| t != &listener || *fd == 0),
            "the listener on another fd too: {:?}",
            fds_of(pid)
        );
        for key in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            assert_eq!(env_of(pid, key), None, "{key} set for worker {pid}");
        }
        assert_eq!(env_of(pid, "PHP_FCGI_CHILDREN").as_deref(), Some("0"));
    }
    // Requests in flight together are answered by different php-cgi
    // processes, each a worker of this droved (the queue they make may
    // have grown the pool meanwhile).
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + 20 * SEC;
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "only {seen:?} answered\n{}",
            p.nginx.log()
        );
        let gets = concurrent_gets(p.nginx.port, "/index.php?ms=300", 4);
        for body in gets {
            let body = body.unwrap_or_else(|e| panic!("{e}\n{}", p.nginx.log()));
            seen.insert(answered_pid(&body));
        }
    }
    let workers = p.droved.workers();
    assert!(
        seen.iter().all(|pid| workers.contains(pid)),
        "{seen:?} vs workers {workers:?}"
    );
}

#[test]
fn a_php_cgi_worker_on_a_request_counts_busy() {
    // php-cgi tells droved nothing about its requests; droved sees the
    // FastCGI connection nginx opened, on the php-cgi that accepted it.
    let mut p = php_pool("php-busy", "");
    p.droved
        .wait_status("2 workers ready (min 2, max 16), 0 busy", 10 * SEC);
    let port = p.nginx.port;
    let slow = std::thread::spawn(move || http_get(("127.0.0.1", port), "/index.php?ms=4000"));
    let status = p.droved.wait_status(", 1 busy", 10 * SEC);
    assert!(status.starts_with("2 workers ready"), "{status}");
    let body = slow
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", p.nginx.log()));
    assert!(p.droved.workers().contains(&answered_pid(&body)));
    // nginx closes its FastCGI connection after each request.
    p.droved.wait_status(", 0 busy", 10 * SEC);
}

#[test]
fn php_rolling_reload_under_load_fails_no_request() {
    let mut p = php_pool("php-reload", "");
    let load = Load::start(Target::Tcp(p.nginx.port), "/index.php?ms=20", 6, 30 * SEC);
    eventually("the load is served", 10 * SEC, || {
        (load.ok() >= 20).then_some(())
    });
    // The load may have grown the pool meanwhile: every worker of the
    // moment is old, and the reload replaces them all.
    let before = p.droved.workers();
    p.droved
        .ready_again_after("READY=1 after the reload", 20 * SEC, |d| {
            d.signal(Signal::SIGHUP)
        });
    eventually("every old php-cgi is gone", 20 * SEC, || {
        let now = p.droved.workers();
        (now.len() >= 2 && now.iter().all(|pid| !before.contains(pid))).then_some(())
    });
    // The new workers serve too, still under the same load.
    let served = load.ok();
    eventually("the new workers serve", 10 * SEC, || {
        (load.ok() >= served + 20).then_some(())
    });
    let ok = load.finish_clean();
    assert!(ok > 50, "the load ran: {ok} requests");
    for pid in &before {
        assert!(!alive(*pid), "old worker {pid} still alive");
    }
    assert!(
        !p.nginx.log().contains("[error]"),
        "nginx saw errors:\n{}",
        p.nginx.log()
    );
}

#[test]
fn php_burst_scales_the_pool_up_and_it_decays() {
    let mut p = php_pool("php-burst", "\n[scale]\ncooldown = \"500ms\"\n");
    assert_eq!(ready_in(&p.droved.upward().status), 2);
    // 32 clients on 100 ms requests: 2 workers serve 20 requests a second
    // of the 320 asked for, so the queue grows and the pool must follow.
    let load = Load::start(Target::Tcp(p.nginx.port), "/index.php?ms=100", 32, 15 * SEC);
    let up = p
        .droved
        .wait_for("at least 12 ready workers", 10 * SEC, |u| {
            ready_in(&u.status) >= 12
        });
    let at = up.statuses.iter().position(|s| ready_in(s) >= 12).unwrap();
    let took = up.status_times[at].duration_since(load.started_at());
    let ok = load.finish_clean();
    assert!(ok > 0);
    eprintln!("php burst: 12+ workers {took:?} after the burst began, {ok} requests");
    assert!(
        took <= 3 * SEC,
        "pool reached {:?} only after {took:?}",
        up.statuses[at]
    );
    let pids: Vec<i32> = p.droved.workers();
    assert!(pids.iter().all(|&pid| comm(pid) == "php-cgi"), "{pids:?}");
    // After the load: one worker per cooldown (500 ms) back to min = 2.
    p.droved.wait_for("back to min", 30 * SEC, |u| {
        u.status.starts_with("2 workers ready")
    });
    eventually("scaled-down php-cgi workers exit", 10 * SEC, || {
        (p.droved.workers().len() == 2).then_some(())
    });
}

#[test]
fn php_sigterm_leaves_no_php_cgi_behind() {
    let mut p = php_pool("php-sigterm", "");
    let workers = p.droved.workers();
    let listener = stdin_socket(workers[0]).expect("a socket on fd 0");
    // A request in flight while droved stops: php-cgi finishes it first.
    let port = p.nginx.port;
    let slow = std::thread::spawn(move || http_get(("127.0.0.1", port), "/index.php?ms=500"));
    // Busy: it holds the accepted connection besides the listener.
    eventually("a php-cgi has accepted the request", 10 * SEC, || {
        workers
            .iter()
            .any(|&pid| {
                fds_of(pid)
                    .iter()
                    .filter(|(_, t)| t.starts_with("socket:[") && t != &listener)
                    .count()
                    > 0
            })
            .then_some(())
    });
    p.droved.signal(Signal::SIGTERM);
    assert!(p.droved.wait_exit(30 * SEC).success(), "{}", p.droved.log());
    let answer = slow.join().unwrap();
    let body = answer.unwrap_or_else(|e| panic!("the request in flight failed: {e}"));
    assert!(workers.contains(&answered_pid(&body)), "{body}");
    for pid in &workers {
        assert!(!alive(*pid), "php-cgi {pid} outlived droved");
    }
    let left = holders_of(&listener);
    assert!(
        left.is_empty(),
        "processes still hold the pool's socket: {:?}",
        left.iter().map(|&p| (p, comm(p))).collect::<Vec<_>>()
    );
}

#[test]
fn stdin_socket_with_two_listeners_is_refused_at_start() {
    // The file names no address, so only the start sees the count: two
    // `--listen` here (a socket unit with two sockets is the same case).
    let mut d = Droved::builder("php-two-listeners")
        .droved_binds()
        .config("[worker]\ncommand = [\"php-cgi\"]\nsocket = \"stdin\"\n")
        .args(&["-l", "unix:{dir}/a.sock", "-l", "unix:{dir}/b.sock"])
        .start();
    let status = d.wait_exit(20 * SEC);
    assert!(!status.success(), "{}", d.log());
    assert!(
        d.log().contains(
            "worker.socket = \"stdin\" gives each worker exactly one listener (fd 0), but droved has 2"
        ),
        "{}",
        d.log()
    );
    assert!(d.workers().is_empty());
}

#[test]
fn the_php_example_passes_droved_check_as_published() {
    // With its deployment lines (www-data, the socket's group): the file
    // operators copy, not only the test's variant of it.
    let out = Command::new(DROVED)
        .args(["--check", "-c"])
        .arg(Path::new(REPO).join("examples/php.toml"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("OK (1 listen address, workers 2..16"),
        "{text}"
    );
}
