//! droved as PID 1 of a container: every test makes its own PID and mount
//! namespace (`unshare --pid --fork --mount-proc`, as a container runtime
//! would; `--kill-child` so a failed test leaves nothing behind) and runs
//! droved as that namespace's init. Orphans of the whole namespace come to
//! it; it must reap them all, adopt none as a worker, and stop on the
//! signals a runtime sends (SIGTERM graceful, SIGINT fast), exiting 0.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);

const UNSHARE: &[&str] = &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"];

/// Writes an executable shell script.
fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// droved's pid on the host: the one child of `unshare`, once it runs
/// droved (not unshare's forked copy before its exec).
fn init_pid(d: &Droved) -> i32 {
    let droved = std::fs::canonicalize(DROVED).unwrap();
    eventually("droved running as PID 1 of its namespace", 10 * SEC, || {
        let pid = *children_of(d.pid()).first()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        (exe == droved && ns_pids(pid).last() == Some(&1)).then_some(pid)
    })
}

/// The pids of `pid` in its namespaces, outermost first (NSpid).
fn ns_pids(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The process state letter (R, S, Z, ...) of `pid`.
fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn zombies_of(pid: i32) -> Vec<i32> {
    children_of(pid)
        .into_iter()
        .filter(|c| state(*c) == Some('Z'))
        .collect()
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The PID namespace `pid` is in (`pid:[inode]`).
fn pid_namespace(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .unwrap()
        .display()
        .to_string()
}

/// Host pids of every process in namespace `ns`.
fn members(ns: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                .is_ok_and(|l| l.display().to_string() == ns)
        })
        .collect()
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn orphans_of_200_workers_are_all_reaped_and_fds_stay_flat() {
    let scratch = Scratch::new("pid1-orphans");
    let dir = scratch.0.display().to_string();
    // Each worker leaves an orphan (double fork) that exits 50 ms later, and
    // ends after 0.3 s; droved restarts it. Once "enough" exists, workers
    // only sleep.
    script(
        &scratch.join("worker.sh"),
        &format!(
            "if [ -e {dir}/enough ]; then exec sleep 600; fi\n\
             ( ( sleep 0.05; echo x >> {dir}/orphans ) & )\n\
             sleep 0.3\n"
        ),
    );
    let mut d = Droved::builder("pid1-orphans")
        .launcher(UNSHARE)
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[pool]
min = 20
max = 20
[worker]
command = ["{dir}/worker.sh"]
ready = "exec"
min_uptime = "100ms"
"#
        ))
        .start();
    d.wait_ready();
    let init = init_pid(&d);
    let fds = fd_count(init);
    let orphans = scratch.join("orphans");
    eventually("200 orphans to have run", 60 * SEC, || {
        (lines(&orphans) >= 200).then_some(())
    });
    std::fs::write(scratch.join("enough"), "").unwrap();
    // The workers still in their 0.3 s and their orphans finish; then only
    // the 20 sleeping workers are left, and nothing unreaped.
    let settled = eventually(
        "droved's children to be its 20 sleeping workers, no zombie among them",
        30 * SEC,
        || {
            let children = children_of(init);
            let zombies = zombies_of(init);
            let sleeping = children
                .iter()
                .filter(|c| cmdline(**c).starts_with("sleep 600"))
                .count();
            (zombies.is_empty() && children.len() == 20 && sleeping == 20).then_some(children)
        },
    );
    assert_eq!(settled.len(), 20);
    let reaped = d.log_count("not a worker");
    assert!(
        reaped >= lines(&orphans),
        "{reaped} orphans reaped, {} ran\n{}",
        lines(&orphans),
        d.log()
    );
    // No fd per child: droved's fd count is back where it was.
    eventually(
        &format!("droved's fd count back at {fds} (now {})", fd_count(init)),
        10 * SEC,
        || (fd_count(init) == fds).then_some(()),
    );
    // Nothing of this was a worker of droved's.
    assert!(
        !d.log().contains("FAILING"),
        "the pool must not fail\n{}",
        d.log()
    );
}

#[test]
fn sigterm_to_pid1_stops_gracefully_exits_0_and_empties_the_namespace() {
    let scratch = Scratch::new("pid1-term");
    // Each worker leaves a daemon behind (double fork), then becomes the
    // example worker (same pid, so LISTEN_PID holds).
    script(&scratch.join("worker.sh"), "( sleep 600 & )\nexec \"$1\"\n");
    let worker_sh = scratch.join("worker.sh").display().to_string();
    // Ready on READY=1: the worker's SIGTERM handler is in place by then.
    let mut d = Droved::builder("pid1-term")
        .launcher(UNSHARE)
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[pool]
min = 2
max = 2
[worker]
command = ["{worker_sh}", "{{worker}}"]
ready = "notify"
"#
        ))
        .start();
    d.wait_ready();
    let init = init_pid(&d);
    let ns = pid_namespace(init);
    // droved, 2 workers and their 2 daemons (adopted by droved).
    eventually("the daemons adopted by droved", 10 * SEC, || {
        let daemons = children_of(init)
            .into_iter()
            .filter(|c| cmdline(*c).starts_with("sleep 600"))
            .count();
        (daemons == 2).then_some(())
    });
    assert!(d.get("/").unwrap().contains("pid="));
    nix::sys::signal::kill(Pid::from_raw(init), Signal::SIGTERM).unwrap();
    let status = d.wait_exit(20 * SEC);
    let log = d.log();
    assert!(status.success(), "droved exited with {status}\n{log}");
    assert!(log.contains("SIGTERM: graceful stop of 2 workers"), "{log}");
    // The example worker exits 0 after SIGTERM: stopped gracefully.
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("exited with status 0") && l.contains("(shutdown)"))
            .count(),
        2,
        "{log}"
    );
    assert!(d.upward().stopping);
    // PID 1 gone: the kernel killed what was left (the daemons).
    eventually("the namespace to be empty", 10 * SEC, || {
        members(&ns).is_empty().then_some(())
    });
}

#[test]
fn sigint_to_pid1_stops_fast() {
    let mut d = Droved::builder("pid1-int")
        .launcher(UNSHARE)
        .config(
            r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[pool]
min = 2
max = 2
[worker]
command = ["{worker}"]
# A graceful stop would wait the full 60 s for these.
environment = { WORKER_IGNORE_TERM = "1" }
stop_timeout = "60s"
"#,
        )
        .start();
    d.wait_ready();
    let init = init_pid(&d);
    let ns = pid_namespace(init);
    nix::sys::signal::kill(Pid::from_raw(init), Signal::SIGINT).unwrap();
    let status = d.wait_exit(10 * SEC);
    let log = d.log();
    assert!(status.success(), "droved exited with {status}\n{log}");
    assert!(log.contains("SIGINT: fast stop of 2 workers"), "{log}");
    eventually("the namespace to be empty", 10 * SEC, || {
        members(&ns).is_empty().then_some(())
    });
}

#[test]
fn a_workers_double_forked_daemon_is_reaped_when_it_exits_and_never_a_worker() {
    let scratch = Scratch::new("pid1-daemon");
    let dir = scratch.0.display().to_string();
    // The first worker starts a daemon (double fork) that writes its pid.
    script(
        &scratch.join("worker.sh"),
        &format!(
            "if [ \"$DROVE_WORKER\" = 0 ] && [ ! -e {dir}/daemon.pid ]; then\n\
             ( sh -c 'echo $$ > {dir}/daemon.pid.new; mv {dir}/daemon.pid.new {dir}/daemon.pid; \
               exec sleep 600' & )\n\
             fi\n\
             exec \"$1\"\n"
        ),
    );
    let worker_sh = scratch.join("worker.sh").display().to_string();
    let mut d = Droved::builder("pid1-daemon")
        .launcher(UNSHARE)
        .args(&[
            "-l",
            "127.0.0.1:{port}",
            "-w",
            "2",
            "--",
            &worker_sh,
            "{worker}",
        ])
        .start();
    d.wait_ready();
    let init = init_pid(&d);
    let pid_file = scratch.join("daemon.pid");
    let ns_pid: i32 = eventually("the daemon's pid", 10 * SEC, || {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    });
    // Its host pid: the child of droved's whose innermost pid is that.
    let daemon = eventually("the daemon adopted by droved", 10 * SEC, || {
        children_of(init)
            .into_iter()
            .find(|c| ns_pids(*c).last() == Some(&ns_pid) && cmdline(*c).starts_with("sleep"))
    });
    assert_eq!(state(daemon).map(|s| s != 'Z'), Some(true));
    nix::sys::signal::kill(Pid::from_raw(daemon), Signal::SIGTERM).unwrap();
    // Reaped, not left a zombie; logged as what it is.
    eventually("the daemon to be reaped", 10 * SEC, || {
        (state(daemon).is_none() || !children_of(init).contains(&daemon)).then_some(())
    });
    d.wait_log(
        &format!("reaped {ns_pid}, not a worker (signal SIGTERM)"),
        1,
        10 * SEC,
    );
    assert!(zombies_of(init).is_empty());
    let log = d.log();
    assert!(
        !log.contains(&format!("worker {ns_pid} ")),
        "the daemon was taken for a worker\n{log}"
    );
    // The pool is its two workers, untouched.
    assert_eq!(log.matches(") started").count(), 2, "{log}");
    assert!(d.upward().status.starts_with("2 workers ready"));
}

#[test]
fn upgrades_succeed_while_orphans_keep_exiting() {
    // The upgrade's preflight is a child that tokio waits for by pid; the
    // sweep that reaps orphans must not take its exit status (the preflight
    // would fail with ECHILD and the upgrade be refused).
    let scratch = Scratch::new("pid1-upgrade");
    script(
        &scratch.join("worker.sh"),
        "while :; do ( sleep 0.01 & ); sleep 0.02; done\n",
    );
    let worker_sh = scratch.join("worker.sh").display().to_string();
    let mut d = Droved::builder("pid1-upgrade")
        .launcher(UNSHARE)
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[pool]
min = 4
max = 4
[worker]
command = ["{worker_sh}"]
ready = "exec"
"#
        ))
        .start();
    d.wait_ready();
    let init = init_pid(&d);
    d.wait_log("not a worker", 20, 10 * SEC);
    for i in 1..=20 {
        let readies = d.upward().ready_count;
        nix::sys::signal::kill(Pid::from_raw(init), Signal::SIGUSR2).unwrap();
        d.wait_for(&format!("READY=1 after upgrade {i}"), 20 * SEC, |u| {
            u.ready_count > readies
        });
        assert_eq!(
            d.log_count("took over 4 workers"),
            i,
            "upgrade {i} did not take over\n{}",
            d.log()
        );
    }
    assert_eq!(d.log_count("upgrade refused"), 0, "{}", d.log());
}

#[test]
fn sigterm_while_pid1_starts_up_is_not_lost() {
    // PID 1 gets no signal it has no handler for. droved is held in its
    // start-up (before the supervisor's handlers exist) by a "system bus"
    // that accepts the connection and says nothing; SIGTERM arrives then.
    let scratch = Scratch::new("pid1-early");
    let bus_path = scratch.join("bus");
    let bus = std::os::unix::net::UnixListener::bind(&bus_path).unwrap();
    bus.set_nonblocking(true).unwrap();
    let mut d = Droved::builder("pid1-early")
        .launcher(UNSHARE)
        .config(
            r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = ["{worker}"]
allow_root = true
"#,
        )
        // As under systemd: the system bus, not fatal when it fails.
        .env("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
        .env(
            "DBUS_SYSTEM_BUS_ADDRESS",
            &format!("unix:path={}", bus_path.display()),
        )
        .start();
    let (conn, _) = eventually("droved to connect to the bus", 10 * SEC, || {
        bus.accept().ok()
    });
    let init = init_pid(&d);
    assert!(!d.upward().ready);
    nix::sys::signal::kill(Pid::from_raw(init), Signal::SIGTERM).unwrap();
    // The bus goes away; droved starts without it, and must then stop.
    drop(conn);
    drop(bus);
    let status = d.wait_exit(20 * SEC);
    let log = d.log();
    assert!(status.success(), "droved exited with {status}\n{log}");
    assert!(log.contains("SIGTERM: graceful stop"), "{log}");
}

#[test]
fn the_container_recipe_runs_as_pid1() {
    // packaging/container: app.toml with the paths the Containerfile puts
    // the app at (/srv/app, on a tmpfs of this test's mount namespace), run
    // as the image's entrypoint does (the image has the drove Python package
    // from the .deb; here a copy next to the app, where wsgi_worker.py finds
    // it); only the addresses are the test's
    // (-l, and a unix socket for metrics), not the image's 0.0.0.0 ports.
    let root = env!("CARGO_MANIFEST_DIR");
    let containerfile =
        std::fs::read_to_string(format!("{root}/packaging/container/Containerfile")).unwrap();
    for line in [
        "COPY examples/wsgi_worker.py examples/wsgi_app.py /srv/app/",
        "COPY packaging/container/app.toml /etc/drove/app.toml",
        r#"ENTRYPOINT ["/usr/bin/droved", "-c", "/etc/drove/app.toml"]"#,
    ] {
        assert!(containerfile.contains(line), "Containerfile lacks {line}");
    }
    let setup = format!(
        "mount -t tmpfs -o mode=755 tmpfs /srv && mkdir /srv/app && \
         cp {root}/examples/wsgi_worker.py {root}/examples/wsgi_app.py /srv/app/ && \
         cp -r {root}/python/drove /srv/app/ && \
         exec \"$@\""
    );
    // The image's metrics port would be the host's here: a unix socket of
    // the test's instead.
    let scratch = Scratch::new("pid1-container");
    let image_toml =
        std::fs::read_to_string(format!("{root}/packaging/container/app.toml")).unwrap();
    let metrics_line = r#"listen = "0.0.0.0:9464""#;
    assert!(
        image_toml.contains(metrics_line),
        "app.toml lacks {metrics_line}"
    );
    let metrics_sock = scratch.join("metrics.sock");
    let app_toml = scratch.join("app.toml").display().to_string();
    std::fs::write(
        &app_toml,
        image_toml.replace(
            metrics_line,
            &format!(r#"listen = "unix:{}""#, metrics_sock.display()),
        ),
    )
    .unwrap();
    let mut launcher = UNSHARE.to_vec();
    launcher.extend(["sh", "-c", &setup, "sh"]);
    let mut d = Droved::builder("pid1-container")
        .launcher(&launcher)
        .args(&["-c", &app_toml, "-l", "127.0.0.1:{port}"])
        // The image's PATH (Debian's default), whatever this machine's is.
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .start();
    d.wait_ready();
    let init = init_pid(&d);
    let ns = pid_namespace(init);
    let body = d.get("/").unwrap();
    assert!(body.contains("pid="), "{body}");
    let metrics = http_get_unix(&metrics_sock, "/metrics").unwrap();
    assert!(metrics.contains("drove_workers"), "{metrics}");
    // The workers run as the package's user.
    let workers: Vec<i32> = children_of(init);
    assert_eq!(workers.len(), 2, "{}", d.log());
    for w in &workers {
        let status = std::fs::read_to_string(format!("/proc/{w}/status")).unwrap();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .unwrap()
            .to_string();
        let user = nix::unistd::User::from_name("drove-worker")
            .unwrap()
            .expect("the drove-worker user (tests/run creates it)");
        assert_eq!(uid, user.uid.to_string());
    }
    // The kubelet's readiness probe, then the drain of app.toml's
    // stop.delay: not ready at once, the app still answering.
    let ready = http_get_unix(&metrics_sock, "/readyz").unwrap();
    assert_eq!(ready.trim(), "ready: 2 workers");
    nix::sys::signal::kill(Pid::from_raw(init), Signal::SIGTERM).unwrap();
    eventually("/readyz to answer 503", 5 * SEC, || {
        let e = http_get_unix(&metrics_sock, "/readyz").err()?;
        e.to_string().contains("503").then_some(())
    });
    let body = d
        .get("/")
        .unwrap_or_else(|e| panic!("the app answers during the drain: {e}\n{}", d.log()));
    assert!(body.contains("pid="), "{body}");
    let status = d.wait_exit(30 * SEC);
    let log = d.log();
    assert!(status.success(), "droved exited with {status}\n{log}");
    assert!(log.contains("draining for 5s (stop.delay)"), "{log}");
    assert_eq!(log.matches("exited with status 0").count(), 2, "{log}");
    eventually("the namespace to be empty", 10 * SEC, || {
        members(&ns).is_empty().then_some(())
    });
}

#[test]
fn a_lost_templates_fork_that_exec_d_is_killed_and_an_unrelated_orphan_is_not() {
    // The template forks a worker that execs `sleep` and never names it;
    // an orphan from elsewhere in the namespace runs python3, the
    // template's own program. Ancestry, not the program, tells them apart.
    let scratch = Scratch::new("pid1-strays");
    let template = scratch.join("mute.py");
    std::fs::write(
        &template,
        r#"
import os, socket, sys
s = socket.socket(fileno=int(os.environ["DROVE_TEMPLATE_FD"]))
s.send(b"DROVE-TEMPLATE 1")
while True:
    if not s.recv(512):
        sys.exit(0)
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:
            s.close()
            os.execvp("sleep", ["sleep", "600"])
        os._exit(0)
    os.waitpid(middle, 0)
"#,
    )
    .unwrap();
    let mut d = Droved::builder("pid1-strays")
        .launcher(UNSHARE)
        .args(&[
            "-l",
            "127.0.0.1:{port}",
            "-w",
            "1",
            "--mode",
            "template",
            "--",
            "python3",
            &template.display().to_string(),
        ])
        .start();
    let init = init_pid(&d);
    let sleeps = || -> Vec<i32> {
        children_of(init)
            .into_iter()
            .filter(|c| cmdline(*c).starts_with("sleep 600"))
            .collect()
    };
    let stray = eventually("the unnamed fork, exec'd", 10 * SEC, || {
        sleeps().first().copied()
    });
    // An orphan of the namespace running python3: its parent shell exits.
    let marker = "unrelated-orphan-of-pid1-strays";
    let out = Command::new("nsenter")
        .args(["-t", &init.to_string(), "-p", "--", "sh", "-c"])
        .arg(format!(
            "python3 -c 'import time; time.sleep(600)' {marker} </dev/null >/dev/null 2>&1 &"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let orphan = eventually("the orphan adopted by droved", 10 * SEC, || {
        children_of(init)
            .into_iter()
            .find(|c| cmdline(*c).contains(marker))
    });
    d.wait_log("left a spawn unanswered", 1, 15 * SEC);
    eventually("the stray killed", 10 * SEC, || {
        (!alive(stray)).then_some(())
    });
    // Both looks are over once the next template is asked for a worker:
    // its own fork appears.
    eventually("the next template's fork", 20 * SEC, || {
        sleeps().into_iter().find(|p| *p != stray)
    });
    assert!(
        alive(orphan) && children_of(init).contains(&orphan),
        "the unrelated orphan was killed\n{}",
        d.log()
    );
    assert!(d.log().contains("event=\"stray-killed\""), "{}", d.log());
    nix::sys::signal::kill(Pid::from_raw(init), Signal::SIGTERM).unwrap();
    let status = d.wait_exit(30 * SEC);
    assert!(status.success(), "droved exited with {status}\n{}", d.log());
}

#[test]
fn droved_never_signals_a_reaped_templates_pid_once_another_process_has_it() {
    // The first template answers with its own pid (and forks nothing: a
    // pid stays taken while a process of its session lives). Later ones
    // fork real workers that ignore SIGTERM, so a stop lasts stop_timeout.
    // Once the first template is reaped, a bystander takes its pid (this
    // namespace's ns_last_pid): droved must never signal it.
    let scratch = Scratch::new("pid1-recycled");
    let template = scratch.join("own.py");
    std::fs::write(
        &template,
        r#"
import os, signal, socket, sys, time
s = socket.socket(fileno=int(os.environ["DROVE_TEMPLATE_FD"]))
droved = os.getppid()
try:
    os.close(os.open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "first"), os.O_CREAT | os.O_EXCL))
    first = True
except FileExistsError:
    first = False
s.send(b"DROVE-TEMPLATE 1")
while True:
    if not s.recv(512):
        sys.exit(0)
    if first:
        s.send(("pid %d" % os.getpid()).encode())
        continue
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        worker = os.fork()
        if worker == 0:
            s.close()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while os.getppid() != droved:
                time.sleep(0.01)
            while os.getppid() == droved:
                time.sleep(0.2)
            os._exit(0)
        os.write(w, str(worker).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(middle, 0)
    s.send(("pid " + os.read(r, 32).decode()).encode())
"#,
    )
    .unwrap();
    let mut d = Droved::builder("pid1-recycled")
        .launcher(UNSHARE)
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
mode = "template"
command = ["python3", "{}"]
ready_timeout = "10s"
stop_timeout = "8s"
[pool]
min = 1
max = 1
"#,
            template.display()
        ))
        .start();
    let init = init_pid(&d);
    d.wait_log("event=\"started\"", 1, 20 * SEC);
    // Its pid inside the namespace, as droved logs it.
    let first: i32 = d
        .log()
        .lines()
        .find(|l| l.contains("event=\"template-started\""))
        .and_then(|l| {
            l.split("template_pid=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("the first template's pid");
    nix::sys::signal::kill(Pid::from_raw(init), Signal::SIGTERM).unwrap();
    // Once pid `first` is free, the next fork in the namespace gets it:
    // the bystander, a child of nsenter's (outside the namespace), so
    // droved cannot reap it, only signal it.
    let out = Command::new("nsenter")
        .args(["-t", &init.to_string(), "-p", "-m", "--", "sh", "-c"])
        .arg(format!(
            "for i in $(seq 400); do [ -e /proc/{first} ] || break; sleep 0.05; done; \
             [ -e /proc/{first} ] && exit 1; \
             echo {} > /proc/sys/kernel/ns_last_pid",
            first - 1
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pid {first} never freed: {out:?}\n{}",
        d.log()
    );
    let mut nsenter = Command::new("nsenter")
        .args(["-t", &init.to_string(), "-p", "--", "sleep", "600"])
        .spawn()
        .unwrap();
    let bystander = eventually("the bystander", 10 * SEC, || {
        children_of(nsenter.id() as i32).first().copied()
    });
    assert_eq!(
        ns_pids(bystander).last(),
        Some(&first),
        "the bystander did not get pid {first}"
    );
    // It lives as long as droved does: it dies only with the namespace.
    let deadline = std::time::Instant::now() + 30 * SEC;
    while d.try_exit().is_none() {
        if !alive(bystander) {
            eventually(
                &format!("droved to exit (else it killed pid {first} after reaping it)"),
                5 * SEC,
                || d.try_exit(),
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "droved did not stop\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = d.wait_exit(5 * SEC);
    let _ = nsenter.kill();
    let _ = nsenter.wait();
    assert!(status.success(), "droved exited with {status}\n{}", d.log());
}
