//! drove.gunicorn (python/drove/gunicorn.py) beyond the matrix rows in
//! servers.rs: gunicorn's hooks, workers as droved's children, new app code
//! after a reload, `max_requests` replacements that are not failures, and
//! bad input (issue 23).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::harness::*;
use crate::matrix::*;

/// A WSGI app saying who serves (`pid=`), who imported it (`loaded_by=`:
/// the template), its parent and the version read at import.
const APP: &str = r#"
import os
LOADED_BY = os.getpid()
VERSION = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "version")).read().strip()

def application(environ, start_response):
    import time
    if environ["PATH_INFO"] == "/sleep":
        time.sleep(0.01)
    if environ["PATH_INFO"] == "/hang":
        time.sleep(60)
    body = "pid={} loaded_by={} ppid={} version={}\n".format(
        os.getpid(), LOADED_BY, os.getppid(), VERSION).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"#;

fn field(body: &str, key: &str) -> String {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {body:?}"))
        .to_string()
}

fn pid_field(body: &str, key: &str) -> i32 {
    field(body, key).parse().unwrap()
}

/// A pool of `workers` running `python3 -m drove.gunicorn ARGS app:application`
/// in template mode, with `source` as app.py (version 1) in a scratch dir.
fn pool(tag: &str, workers: usize, args: &[&str], source: &str) -> (Droved, PathBuf) {
    pool_with(tag, workers, args, source, "")
}

/// `pool`, with `extra` lines in `[worker]`.
fn pool_with(
    tag: &str,
    workers: usize,
    args: &[&str],
    source: &str,
    extra: &str,
) -> (Droved, PathBuf) {
    let dir = temp_dir(tag);
    std::fs::write(dir.join("app.py"), source).unwrap();
    std::fs::write(dir.join("version"), "1").unwrap();
    let mut command = vec![
        crate::servers::venv_python(),
        "-m".into(),
        "drove.gunicorn".into(),
        "--no-control-socket".into(),
    ];
    command.extend(args.iter().map(|a| a.to_string()));
    command.extend(["--chdir".into(), dir.display().to_string()]);
    command.push("app:application".into());
    let command = toml_strings(&command);
    let d = Droved::builder(tag)
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
command = [{command}]
mode = "template"
environment = {{ PYTHONPATH = "{python}", HOOKS_LOG = "{hooks}" }}
ready = "notify"
ready_timeout = "20s"
stop_timeout = "10s"
{extra}
[pool]
min = {workers}
max = {workers}
"#,
            python = repo().join("python").display(),
            hooks = dir.join("hooks.log").display(),
        ))
        .start();
    (d, dir)
}

/// Requests until `n` distinct workers answered; their answers.
fn answers_from(d: &Droved, n: usize) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    eventually(&format!("{n} distinct workers answering"), 20 * SEC, || {
        let body = d.get("/").ok()?;
        if seen.insert(pid_field(&body, "pid")) {
            out.push(body);
        }
        (seen.len() >= n).then_some(())
    });
    out
}

/// The hooks called so far: (hook, pid) per line of HOOKS_LOG.
fn hooks(dir: &Path) -> Vec<(String, i32)> {
    std::fs::read_to_string(dir.join("hooks.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (hook, pid) = l.split_once(' ')?;
            Some((hook.to_string(), pid.parse().ok()?))
        })
        .collect()
}

fn hook_pids(dir: &Path, hook: &str) -> Vec<i32> {
    hooks(dir)
        .into_iter()
        .filter(|(h, _)| h == hook)
        .map(|(_, p)| p)
        .collect()
}

#[test]
fn workers_are_droved_children_call_gunicorns_worker_hooks_and_reload_new_code() {
    let conf = repo().join("tests/compat/apps/gunicorn_hooks.conf.py");
    let (mut d, dir) = pool("gt-hooks", 2, &["-c", &conf.display().to_string()], APP);
    d.wait_for("the pool ready", 30 * SEC, |u| u.ready);
    let template = templates(&d)[0];
    let workers = pool_workers(&d);
    assert_eq!(workers.len(), 2, "{}", d.log());
    for body in answers_from(&d, 2) {
        let pid = pid_field(&body, "pid");
        assert!(workers.contains(&pid), "{pid} is not droved's worker");
        assert_eq!(pid_field(&body, "ppid"), d.pid(), "droved's child: {body}");
        assert_eq!(pid_field(&body, "loaded_by"), template, "a fork: {body}");
        assert_eq!(field(&body, "version"), "1");
    }
    // The worker hooks ran in the workers; the arbiter's did not run.
    for hook in ["post_fork", "post_worker_init"] {
        let mut pids = hook_pids(&dir, hook);
        pids.sort();
        let mut want = workers.clone();
        want.sort();
        assert_eq!(pids, want, "{hook} once in each worker: {:?}", hooks(&dir));
    }
    assert!(hook_pids(&dir, "pre_request").len() >= 2);
    assert!(hook_pids(&dir, "post_request").len() >= 2);
    for hook in ["on_starting", "when_ready", "pre_fork", "on_exit"] {
        assert!(hook_pids(&dir, hook).is_empty(), "{hook} called");
    }

    // SIGQUIT: gunicorn's fast stop, worker_int; SIGABRT: worker_abort.
    // droved replaces both.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(workers[0]), Signal::SIGQUIT).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(workers[1]), Signal::SIGABRT).unwrap();
    eventually("worker_int and worker_abort", 10 * SEC, || {
        (hook_pids(&dir, "worker_int") == vec![workers[0]]
            && hook_pids(&dir, "worker_abort") == vec![workers[1]])
        .then_some(())
    });
    eventually("two new workers", 20 * SEC, || {
        let now = pool_workers(&d);
        (now.len() == 2 && now.iter().all(|p| !workers.contains(p))).then_some(())
    });

    // New app code: a reload starts a new template, which imports it.
    std::fs::write(dir.join("version"), "2").unwrap();
    d.ready_again_after("READY=1 after the reload", 30 * SEC, |d| {
        d.signal(Signal::SIGHUP)
    });
    let templates = templates(&d);
    assert_eq!(templates.len(), 2, "{}", d.log());
    eventually("only new workers answer", 20 * SEC, || {
        let body = d.get("/").ok()?;
        (field(&body, "version") == "2").then_some(())
    });
    for body in answers_from(&d, 2) {
        assert_eq!(field(&body, "version"), "2", "new app code: {body}");
        assert_eq!(pid_field(&body, "loaded_by"), templates[1], "{body}");
    }

    let last = pool_workers(&d);
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success(), "{}", d.log());
    for w in last {
        assert!(
            hook_pids(&dir, "worker_exit").contains(&w),
            "worker_exit in {w}: {:?}",
            hooks(&dir)
        );
    }
}

/// A worker that ends after `max_requests` (+ jitter) says STOPPING=1:
/// droved replaces it at once, as a planned stop, never a failure.
/// `at_least`: replacements expected in 100 requests.
fn max_requests_are_planned_replacements(tag: &str, args: &[&str], source: &str, at_least: usize) {
    let mut all = vec!["--max-requests", "5", "--max-requests-jitter", "3"];
    all.extend(args);
    let (mut d, _dir) = pool(tag, 2, &all, source);
    d.wait_for("the pool ready", 30 * SEC, |u| u.ready);
    // Load until 100 requests are served and `at_least` workers have
    // ended on their own: how many requests that takes depends on how
    // greedily the workers accept on a loaded machine.
    let load = Load::start(Target::Tcp(d.port), "/sleep", CLIENTS, 60 * SEC);
    eventually(
        &format!("100 requests and {at_least} planned stops"),
        60 * SEC,
        || (load.ok() >= 100 && d.log_count("is stopping on its own") >= at_least).then_some(()),
    );
    let (ok, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} of {ok} failed: {errors:?}\n{}",
        errors.len(),
        tail(&d.log(), 40)
    );
    let log = d.log();
    assert_eq!(d.log_count("restarting in"), 0, "backed off\n{log}");
    assert_eq!(d.log_count("; restarting"), 0, "an unplanned exit\n{log}");
    assert!(
        !d.upward().status.contains("FAILING"),
        "{}",
        d.upward().status
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success(), "{}", d.log());
    // Named as what they were: no max_lifetime is configured.
    let log = d.log();
    assert!(d.log_count("(stopping on its own)") >= at_least, "{log}");
    assert_eq!(d.log_count("max_lifetime"), 0, "{log}");
}

#[test]
fn max_requests_replacements_are_not_failures_sync() {
    // 100 requests / (at most 8 per worker) = at least 12 replacements.
    max_requests_are_planned_replacements("gt-maxreq-sync", &[], APP, 10);
}

#[test]
fn max_requests_replacements_are_not_failures_uvicorn() {
    let asgi = std::fs::read_to_string(repo().join("tests/compat/apps/hello_asgi.py")).unwrap();
    // hello_asgi.py's callable is `app`: the same module as app.py.
    let source = format!("{asgi}\napplication = app\n");
    max_requests_are_planned_replacements(
        "gt-maxreq-uvicorn",
        &["-k", "uvicorn_worker.UvicornWorker"],
        &source,
        // uvicorn checks its count every 0.1 s and accepts greedily in
        // between: fewer, longer lives.
        3,
    );
}

/// gunicorn's timeout is drove's watchdog: idle workers heartbeat
/// (WATCHDOG=1 from gunicorn's notify()) and live on; a worker stuck in a
/// request is killed by droved and replaced.
#[test]
fn the_watchdog_keeps_idle_workers_and_replaces_a_hung_one() {
    watchdog_keeps_idle_workers_and_replaces_a_hung_one("gt-watchdog", &[], "watchdog = \"1s\"");
}

/// Without drove's watchdog, gunicorn's own `timeout` is the watchdog:
/// each worker announces it (WATCHDOG_USEC=) and droved enforces it.
#[test]
fn gunicorns_timeout_alone_is_the_watchdog() {
    let (d, _dir) =
        watchdog_keeps_idle_workers_and_replaces_a_hung_one("gt-timeout", &["--timeout", "1"], "");
    assert!(
        d.log_count("set its watchdog to 1000 ms") >= 2,
        "{}",
        d.log()
    );
}

fn watchdog_keeps_idle_workers_and_replaces_a_hung_one(
    tag: &str,
    args: &[&str],
    extra: &str,
) -> (Droved, PathBuf) {
    let (mut d, dir) = pool_with(tag, 2, args, APP, extra);
    d.wait_for("the pool ready", 30 * SEC, |u| u.ready);
    let workers = pool_workers(&d);
    // Three watchdog periods idle: nobody is killed.
    std::thread::sleep(3 * SEC);
    assert_eq!(d.log_count("watchdog timeout"), 0, "{}", d.log());
    assert_eq!(pool_workers(&d), workers, "{}", d.log());
    // A request that hangs: its worker stops heartbeating.
    let port = d.port;
    let hung = std::thread::spawn(move || http_get(("127.0.0.1", port), "/hang"));
    eventually("the hung worker killed by the watchdog", 20 * SEC, || {
        (d.log_count("watchdog timeout; aborting it (SIGABRT)") >= 1).then_some(())
    });
    assert!(
        hung.join().unwrap().is_err(),
        "the hung request got no answer"
    );
    eventually("a replacement ready", 20 * SEC, || {
        let now = pool_workers(&d);
        (now.len() == 2 && d.upward().status.starts_with("2 workers ready")).then_some(())
    });
    assert_eq!(
        d.log_count("watchdog timeout; aborting it (SIGABRT)"),
        1,
        "only the hung one\n{}",
        d.log()
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success(), "{}", d.log());
    (d, dir)
}

/// An app that cannot be imported: its traceback is in droved's output,
/// the pool shows FAILING and templates are backed off, not restarted in
/// a loop.
#[test]
fn an_app_that_cannot_import_shows_its_traceback_and_the_pool_fails() {
    let (mut d, _dir) = pool("gt-noimport", 2, &[], "import no_such_module_here\n");
    let status = d.wait_status("FAILING", 30 * SEC);
    let log = workers_output(&d.log());
    assert!(log.contains("Traceback (most recent call last)"), "{log}");
    assert!(
        log.contains("No module named 'no_such_module_here'"),
        "{log}"
    );
    assert!(
        log.contains("cannot load the app 'app:application'"),
        "{log}"
    );
    let started = templates(&d).len();
    std::thread::sleep(Duration::from_secs(2));
    let later = templates(&d).len();
    assert!(
        later - started <= 3,
        "{} templates in 2 s: no back-off ({status})\n{log}",
        later - started
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success(), "{}", d.log());
}

/// gunicorn options that cannot work under drove: each named, with what
/// to do instead; the template exits 2 and the pool fails.
#[test]
fn gunicorn_options_that_cannot_work_under_drove_are_named() {
    let (mut d, _dir) = pool(
        "gt-badopts",
        2,
        &["-w", "4", "--daemon", "--bind", "127.0.0.1:1", "--reload"],
        APP,
    );
    d.wait_status("FAILING", 30 * SEC);
    let log = d.log();
    for option in ["workers = 4", "-D/--daemon", "-b/--bind", "--reload"] {
        assert!(
            log.lines()
                .any(|l| l.contains("cannot run under drove: ") && l.contains(option)),
            "{option} not named\n{log}"
        );
    }
    assert!(log.contains("[pool] min/max"), "{log}");
    assert!(log.contains("exited with status 2"), "{log}");
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success(), "{}", d.log());
}

/// Outside droved (no DROVE_TEMPLATE_FD, no LISTEN_FDS): a message that
/// says so, and exit 2.
#[test]
fn started_outside_droved_it_says_so_and_exits_2() {
    let dir = temp_dir("gt-outside");
    std::fs::write(dir.join("app.py"), APP).unwrap();
    std::fs::write(dir.join("version"), "1").unwrap();
    let out = Command::new(crate::servers::venv_python())
        .args(["-m", "drove.gunicorn", "--chdir"])
        .arg(&dir)
        .arg("app:application")
        .env("PYTHONPATH", repo().join("python"))
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("DROVE_TEMPLATE_FD")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("LISTEN_PID is not set") && stderr.contains("DROVE_TEMPLATE_FD"),
        "{stderr}"
    );
    assert!(!stderr.contains("Traceback"), "{stderr}");
}
