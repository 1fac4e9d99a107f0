//! Template mode (docs/template.md): workers forked from a loaded
//! template, supervised like exec'd ones. Real processes throughout: the
//! Python reference worker with a small app that says who loaded it.

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);

/// A WSGI app that answers who serves (`pid=`), who imported it
/// (`loaded_by=`: the template for a forked worker, itself for an exec'd
/// one), its parent and the app version read at import.
const APP: &str = r#"
import os
LOADED_BY = os.getpid()
VERSION = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "version")).read().strip()

def application(environ, start_response):
    body = "pid={} loaded_by={} ppid={} version={} worker={} generation={}\n".format(
        os.getpid(), LOADED_BY, os.getppid(), VERSION,
        os.environ.get("DROVE_WORKER", "-"), os.environ.get("DROVE_GENERATION", "-"))
    data = body.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]
"#;

/// `key=value` of an answer.
fn field(body: &str, key: &str) -> i32 {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {body:?}"))
}

fn text_field(body: &str, key: &str) -> String {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {body:?}"))
        .to_string()
}

/// A template-mode pool of `n` Python workers (notify readiness, so a
/// READY=1 that beats the template's answer must not be lost).
/// Returns droved and the app's directory (its `version` file is read at
/// import).
fn template_pool(tag: &str, n: u32) -> (Droved, std::path::PathBuf) {
    template_pool_with(tag, n, None)
}

fn template_pool_with(
    tag: &str,
    n: u32,
    binary: Option<&std::path::Path>,
) -> (Droved, std::path::PathBuf) {
    let dir = temp_dir(tag);
    std::fs::write(dir.join("app.py"), APP).unwrap();
    std::fs::write(dir.join("version"), "1").unwrap();
    let config = format!(
        r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
mode = "template"
command = ["python3", "{worker}", "{app}:application"]
ready = "notify"
ready_timeout = "10s"
stop_timeout = "5s"
[pool]
min = {n}
max = {n}
"#,
        worker = python_worker().display(),
        app = dir.join("app.py").display(),
    );
    let mut b = Droved::builder(tag).config(&config);
    if let Some(path) = binary {
        b = b.binary(path);
    }
    (b.start(), dir)
}

/// The pids of templates droved logged as started, in order.
fn templates_started(d: &Droved) -> Vec<i32> {
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

/// Requests until `n` distinct workers answered; returns their answers.
fn answers_from(d: &Droved, n: usize) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    eventually(&format!("{n} distinct workers answering"), 20 * SEC, || {
        let body = d.get("/").ok()?;
        if seen.insert(field(&body, "pid")) {
            out.push(body);
        }
        (seen.len() >= n).then_some(())
    });
    out
}

#[test]
fn workers_are_forks_of_the_template_and_children_of_droved() {
    let (mut d, _app) = template_pool("tpl-fork", 3);
    d.wait_ready();
    let status = d.wait_status("3 workers ready", 10 * SEC);
    assert!(!status.contains("starting"), "{status}");
    let templates = templates_started(&d);
    assert_eq!(templates.len(), 1, "{}", d.log());
    let template = templates[0];
    for body in answers_from(&d, 3) {
        assert_eq!(field(&body, "loaded_by"), template, "forked: {body}");
        assert_eq!(
            field(&body, "ppid"),
            d.pid(),
            "reparented to droved: {body}"
        );
        assert_ne!(field(&body, "pid"), template, "the template never serves");
        assert_eq!(text_field(&body, "generation"), "1");
    }
    let workers: BTreeSet<String> = answers_from(&d, 3)
        .iter()
        .map(|b| text_field(b, "worker"))
        .collect();
    assert_eq!(workers.len(), 3, "distinct slots {workers:?}");
    // droved's children: the template and the 3 workers, no one else.
    let children = d.workers();
    assert_eq!(children.len(), 4, "{children:?}");
    assert!(children.contains(&template));
    assert_eq!(
        env_of(template, "DROVE_TEMPLATE_FD").as_deref(),
        Some("4"),
        "its socket follows the one listener"
    );
    // Every READY=1 counted, also those that beat the template's answer:
    // no worker timed out and none was replaced.
    assert_eq!(d.log_count("event=\"started\""), 3, "{}", d.log());
    // Still 3 counted, not 4.
    assert!(
        d.upward().status.starts_with("3 workers ready"),
        "{}",
        d.upward().status
    );
}

#[test]
fn killing_the_template_keeps_workers_serving_and_a_new_one_appears() {
    let (mut d, _app) = template_pool("tpl-kill", 2);
    d.wait_ready();
    let before: BTreeSet<i32> = answers_from(&d, 2)
        .iter()
        .map(|b| field(b, "pid"))
        .collect();
    let old = templates_started(&d)[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), Signal::SIGKILL).unwrap();
    let new = eventually("a new template", 10 * SEC, || {
        templates_started(&d).get(1).copied()
    });
    assert_ne!(new, old);
    d.wait_log("event=\"template-ready\"", 2, 10 * SEC);
    // The same workers serve, untouched.
    let after: BTreeSet<i32> = answers_from(&d, 2)
        .iter()
        .map(|b| field(b, "pid"))
        .collect();
    assert_eq!(before, after);
    for _ in 0..20 {
        let body = d.get("/").expect("workers keep serving");
        assert!(before.contains(&field(&body, "pid")), "{body}");
    }
    assert!(
        !d.upward().status.contains("FAILING"),
        "{}",
        d.upward().status
    );
}

#[test]
fn a_killed_worker_is_replaced_by_a_fork_of_the_template() {
    let (mut d, _app) = template_pool("tpl-replace", 2);
    d.wait_ready();
    let template = templates_started(&d)[0];
    let first: BTreeSet<i32> = answers_from(&d, 2)
        .iter()
        .map(|b| field(b, "pid"))
        .collect();
    let victim = *first.iter().next().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    d.wait_log("event=\"started\"", 3, 10 * SEC);
    let body = eventually("the replacement answering", 10 * SEC, || {
        let body = d.get("/").ok()?;
        (!first.contains(&field(&body, "pid"))).then_some(body)
    });
    assert_eq!(
        field(&body, "loaded_by"),
        template,
        "a fork, not an exec: {body}"
    );
    assert_eq!(field(&body, "ppid"), d.pid(), "{body}");
    assert_eq!(
        templates_started(&d).len(),
        1,
        "the template was not replaced"
    );
}

#[test]
fn reload_rolls_to_a_new_template_without_failed_requests() {
    let (mut d, app) = template_pool("tpl-reload", 2);
    d.wait_ready();
    let old = templates_started(&d)[0];
    let load = Load::start(Target::Tcp(d.port), "/", 4, 60 * SEC);
    eventually("load is flowing", 10 * SEC, || {
        (load.ok() > 20).then_some(())
    });
    std::fs::write(app.join("version"), "2").unwrap();
    d.ready_again_after("the rollout to generation 2", 30 * SEC, |d| {
        d.signal(Signal::SIGHUP)
    });
    let ok = load.finish_clean();
    assert!(ok > 20, "only {ok} requests");
    let new = templates_started(&d)[1];
    for body in answers_from(&d, 2) {
        assert_eq!(text_field(&body, "version"), "2", "new app code: {body}");
        assert_eq!(field(&body, "loaded_by"), new, "{body}");
        assert_eq!(text_field(&body, "generation"), "2");
    }
    eventually("the old template gone", 10 * SEC, || {
        (!alive(old)).then_some(())
    });
    eventually("only the new template and 2 workers left", 10 * SEC, || {
        (d.workers().into_iter().filter(|&p| alive(p)).count() == 3).then_some(())
    });
}

#[test]
fn sigkill_of_droved_leaves_no_template_or_worker_behind() {
    let (mut d, _app) = template_pool("tpl-sigkill", 3);
    d.wait_ready();
    let mut pids = d.workers();
    assert_eq!(pids.len(), 4, "{pids:?}");
    pids.extend(answers_from(&d, 3).iter().map(|b| field(b, "pid")));
    d.signal(Signal::SIGKILL);
    d.wait_exit(5 * SEC);
    eventually("template and workers gone", 10 * SEC, || {
        pids.iter().all(|&p| !alive(p)).then_some(())
    });
}

#[test]
fn a_template_that_dies_at_once_is_backed_off_and_reported_failing() {
    let mut d = Droved::builder("tpl-crash")
        .args(&[
            "-l",
            "127.0.0.1:{port}",
            "-w",
            "2",
            "--mode",
            "template",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .start();
    let status = d.wait_status("FAILING", 10 * SEC);
    assert!(status.contains("exited with status 3"), "{status}");
    let started_before = d.log_count("event=\"template-started\"");
    std::thread::sleep(3 * SEC);
    let starts = d.log_count("event=\"template-started\"") - started_before;
    assert!(starts <= 8, "{starts} templates in 3 s");
    assert!(d.try_exit().is_none(), "droved stays up");
    assert!(
        d.upward().status.starts_with("0 workers ready"),
        "{}",
        d.upward().status
    );
}

/// A template that says hello and then answers every `spawn` with `reply`
/// (nothing when empty).
fn bad_template(tag: &str, reply: &str) -> Droved {
    let dir = temp_dir(tag);
    let script = dir.join("bad.py");
    std::fs::write(
        &script,
        format!(
            r#"
import os, socket, sys
s = socket.socket(fileno=int(os.environ["DROVE_TEMPLATE_FD"]))
s.send(b"DROVE-TEMPLATE 1")
while True:
    msg = s.recv(512)
    if not msg:
        sys.exit(0)
    if {reply:?}:
        s.send({reply:?}.encode())
"#
        ),
    )
    .unwrap();
    Droved::builder(tag)
        .args(&[
            "-l",
            "127.0.0.1:{port}",
            "-w",
            "1",
            "--mode",
            "template",
            "--",
            "python3",
            &script.display().to_string(),
        ])
        .start()
}

#[test]
fn a_template_answering_garbage_is_killed_and_replaced() {
    for reply in ["banana", "pid 1", "pid 999999999", "DROVE-TEMPLATE 1"] {
        let mut d = bad_template("tpl-garbage", reply);
        d.wait_log("killing template", 1, 10 * SEC);
        eventually("a second template", 10 * SEC, || {
            (templates_started(&d).len() >= 2).then_some(())
        });
        assert!(d.try_exit().is_none(), "droved stays up ({reply})");
        assert!(d.log().contains("killing template"), "{reply}: {}", d.log());
        // Nothing was adopted: no worker started, no foreign pid signalled.
        assert_eq!(d.log_count("event=\"started\""), 0, "{reply}: {}", d.log());
    }
}

#[test]
fn a_silent_template_is_killed_and_replaced() {
    let mut d = bad_template("tpl-silent", "");
    d.wait_log("left a spawn unanswered", 1, 15 * SEC);
    eventually("a second template", 10 * SEC, || {
        (templates_started(&d).len() >= 2).then_some(())
    });
    assert!(d.try_exit().is_none(), "droved stays up");
}

#[test]
fn binary_upgrade_keeps_the_template_and_its_workers() {
    let scratch = Scratch::new("tpl-upgrade-bin");
    let binary = scratch.join("droved");
    droved_build(&binary, "build-0");
    let (mut d, _app) = template_pool_with("tpl-upgrade", 2, Some(&binary));
    d.wait_ready();
    let before = d.workers();
    assert_eq!(before.len(), 3, "template + 2 workers");
    let template = templates_started(&d)[0];
    let fds_before = settled_fd_count(d.pid());
    let load = Load::start(Target::Tcp(d.port), "/", 4, 60 * SEC);
    eventually("load is flowing", 10 * SEC, || {
        (load.ok() > 20).then_some(())
    });
    for i in 1..=3 {
        droved_build(&binary, &format!("build-{i}"));
        d.ready_again_after(&format!("READY=1 after upgrade {i}"), 20 * SEC, |d| {
            d.signal(Signal::SIGUSR2)
        });
        d.wait_log(&format!("took over template {template}"), i, 10 * SEC);
    }
    let ok = load.finish_clean();
    assert!(ok > 20, "only {ok} requests");
    assert_eq!(d.workers(), before, "same template, same workers");
    assert_eq!(settled_fd_count(d.pid()), fds_before, "no fd leaked");
    assert_eq!(templates_started(&d), vec![template], "no new template");
    // The handed-over socket still works: a killed worker is forked anew
    // by the same template.
    let first: BTreeSet<i32> = answers_from(&d, 2)
        .iter()
        .map(|b| field(b, "pid"))
        .collect();
    let victim = *first.iter().next().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let body = eventually("the replacement answering", 10 * SEC, || {
        let body = d.get("/").ok()?;
        (!first.contains(&field(&body, "pid"))).then_some(body)
    });
    assert_eq!(field(&body, "loaded_by"), template, "{body}");
}

#[test]
fn the_rust_example_worker_speaks_the_protocol_too() {
    let mut d = Droved::builder("tpl-rust")
        .config(
            r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
mode = "template"
command = ["{worker}"]
ready = "notify"
ready_timeout = "10s"
[pool]
min = 3
max = 3
"#,
        )
        .start();
    d.wait_ready();
    d.wait_status("3 workers ready", 10 * SEC);
    let template = templates_started(&d)[0];
    let children = d.workers();
    assert_eq!(children.len(), 4, "template + 3 workers: {children:?}");
    let mut slots = BTreeSet::new();
    eventually("3 distinct workers", 20 * SEC, || {
        let env = d.get("/env").ok()?;
        let pid = field(&env, "pid");
        assert_ne!(pid, template, "the template never serves");
        assert!(children.contains(&pid), "{pid} is droved's child");
        assert_eq!(text_field(&env, "LISTEN_PID"), pid.to_string(), "{env}");
        slots.insert(text_field(&env, "DROVE_WORKER"));
        (slots.len() == 3).then_some(())
    });
}

#[test]
fn a_worker_forked_by_a_template_lost_before_answering_is_killed() {
    // Forks the worker properly (double fork), then never answers.
    let dir = temp_dir("tpl-stray-app");
    let script = dir.join("mute.py");
    std::fs::write(
        &script,
        r#"
import os, socket, sys, time
s = socket.socket(fileno=int(os.environ["DROVE_TEMPLATE_FD"]))
s.send(b"DROVE-TEMPLATE 1")
while True:
    if not s.recv(512):
        sys.exit(0)
    if os.fork() == 0:
        if os.fork() == 0:
            s.close()
            time.sleep(600)
        os._exit(0)
    os.wait()
"#,
    )
    .unwrap();
    let mut d = Droved::builder("tpl-stray")
        .args(&[
            "-l",
            "127.0.0.1:{port}",
            "-w",
            "1",
            "--mode",
            "template",
            "--",
            "python3",
            &script.display().to_string(),
        ])
        .start();
    let template = eventually("a template", 10 * SEC, || {
        templates_started(&d).first().copied()
    });
    // Its unnamed fork: a child of droved's that is not the template.
    let stray = eventually("the unnamed fork", 10 * SEC, || {
        d.workers().into_iter().find(|&p| p != template)
    });
    d.wait_log("left a spawn unanswered", 1, 15 * SEC);
    eventually("the stray killed", 10 * SEC, || {
        (!alive(stray)).then_some(())
    });
    assert!(d.log().contains("event=\"stray-killed\""), "{}", d.log());
    assert!(d.try_exit().is_none(), "droved stays up");
}

#[test]
fn reload_to_app_code_that_cannot_load_keeps_the_old_workers() {
    let (mut d, app) = template_pool("tpl-badreload", 2);
    d.wait_ready();
    let before: BTreeSet<i32> = answers_from(&d, 2)
        .iter()
        .map(|b| field(b, "pid"))
        .collect();
    std::fs::write(
        app.join("app.py"),
        "raise SystemExit('broken on purpose')\n",
    )
    .unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("event=\"rollout-aborted\"", 1, 30 * SEC);
    let log = d.log();
    let aborted = log.lines().find(|l| l.contains("rollout-aborted")).unwrap();
    assert!(
        aborted.contains("new generation 2 cannot get ready: template")
            && aborted.contains("exited with status 1"),
        "{aborted}"
    );
    for _ in 0..20 {
        let body = d.get("/").expect("the old workers keep serving");
        assert!(before.contains(&field(&body, "pid")), "{body}");
    }
    assert!(d.try_exit().is_none());
}

/// A guarded rollout judges a template that cannot start by its own rule
/// (`[rollout] max_failures`, then a rollback), not by the unguarded one
/// (3 failures, then an abort) that it used to.
#[test]
fn a_guarded_rollout_to_a_template_that_cannot_start_is_rolled_back() {
    let (mut d, app) = template_pool("tpl-guarded-bad", 2);
    d.wait_ready();
    let before: BTreeSet<i32> = answers_from(&d, 2)
        .iter()
        .map(|b| field(b, "pid"))
        .collect();
    let guarded = std::fs::read_to_string(d.config_path()).unwrap()
        + "[rollout]\ncanary = 1\nobserve = \"1s\"\nmax_failures = 1\n";
    std::fs::write(d.config_path(), guarded).unwrap();
    std::fs::write(
        app.join("app.py"),
        "raise SystemExit('broken on purpose')\n",
    )
    .unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("rolling restart done (rollback)", 1, 30 * SEC);
    let log = d.log();
    assert!(!log.contains("rollout-aborted"), "{log}");
    let failed = log
        .lines()
        .filter(|l| l.contains("event=\"template-failed\""))
        .count();
    assert_eq!(failed, 1, "max_failures = 1 allows one failure:\n{log}");
    assert!(
        log.contains("(1 of 1 failures allowed in this rollout)"),
        "{log}"
    );
    for _ in 0..20 {
        let body = d.get("/").expect("the old workers keep serving");
        assert!(before.contains(&field(&body, "pid")), "{body}");
    }
    assert!(d.try_exit().is_none());
}

#[test]
fn a_template_that_never_says_hello_is_killed_and_backed_off() {
    let mut d = Droved::builder("tpl-nohello")
        .config(
            r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
mode = "template"
command = ["sleep", "600"]
ready_timeout = "300ms"
[pool]
min = 1
max = 1
"#,
        )
        .start();
    let status = d.wait_status("FAILING", 15 * SEC);
    assert!(
        status.contains("sent no hello within ready_timeout"),
        "{status}"
    );
    // Back-off: far fewer templates than one per ready_timeout.
    let before = d.log_count("event=\"template-started\"");
    std::thread::sleep(3 * SEC);
    let starts = d.log_count("event=\"template-started\"") - before;
    assert!(starts <= 4, "{starts} templates in 3 s");
    // Every template that was killed is gone (no leftovers).
    let living: Vec<i32> = d.workers().into_iter().filter(|&p| alive(p)).collect();
    assert!(living.len() <= 1, "{living:?}");
}

#[test]
fn a_forked_worker_that_exits_before_it_is_named_is_judged_like_any_exit() {
    // A correct template whose workers exit at once with status 3: their
    // exits often reach droved before the template's answer.
    let dir = temp_dir("tpl-early-exit-app");
    let script = dir.join("quitter.py");
    std::fs::write(
        &script,
        r#"
import os, socket, sys
s = socket.socket(fileno=int(os.environ["DROVE_TEMPLATE_FD"]))
s.send(b"DROVE-TEMPLATE 1")
while True:
    if not s.recv(512):
        sys.exit(0)
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        worker = os.fork()
        if worker == 0:
            os._exit(3)
        os.write(w, str(worker).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(middle, 0)
    pid = os.read(r, 32).decode()
    os.close(r)
    import time; time.sleep(0.05)  # let the exit arrive first
    s.send(("pid " + pid).encode())
"#,
    )
    .unwrap();
    let mut d = Droved::builder("tpl-early-exit")
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
mode = "template"
command = ["python3", "{}"]
ready = "notify"
ready_timeout = "60s"
[pool]
min = 1
max = 1
"#,
            script.display()
        ))
        .start();
    let status = d.wait_status("FAILING", 15 * SEC);
    assert!(status.contains("exited with status 3"), "{status}");
    assert_eq!(templates_started(&d).len(), 1, "the template is fine");
}

#[test]
fn a_ruby_template_speaks_the_protocol_too() {
    let ruby = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/template_worker.rb");
    let mut d = Droved::builder("tpl-ruby")
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
mode = "template"
command = ["ruby", "{}"]
ready = "notify"
ready_timeout = "10s"
[pool]
min = 3
max = 3
"#,
            ruby.display()
        ))
        .start();
    d.wait_ready();
    let template = templates_started(&d)[0];
    let answers = answers_from(&d, 3);
    for body in &answers {
        assert_eq!(field(body, "loaded_by"), template, "forked: {body}");
        assert_eq!(field(body, "ppid"), d.pid(), "reparented: {body}");
    }
    assert_eq!(d.log_count("event=\"started\""), 3, "{}", d.log());
    // A killed worker is forked anew by the same template.
    let first: BTreeSet<i32> = answers.iter().map(|b| field(b, "pid")).collect();
    let victim = *first.iter().next().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let body = eventually("the replacement answering", 10 * SEC, || {
        let body = d.get("/").ok()?;
        (!first.contains(&field(&body, "pid"))).then_some(body)
    });
    assert_eq!(field(&body, "loaded_by"), template, "{body}");
    // Stops cleanly: template and workers.
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success(), "{}", d.log());
}

#[test]
fn scaling_up_and_down_forks_and_stops_workers_of_the_template() {
    let dir = temp_dir("tpl-scale-app");
    std::fs::write(dir.join("app.py"), APP).unwrap();
    std::fs::write(dir.join("version"), "1").unwrap();
    let mut d = Droved::builder("tpl-scale")
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
mode = "template"
command = ["python3", "{}", "{}:application"]
ready = "notify"
[pool]
min = 1
max = 4
[scale]
cooldown = "1h"
"#,
            python_worker().display(),
            dir.join("app.py").display()
        ))
        .start();
    d.wait_ready();
    let template = templates_started(&d)[0];
    // One at a time: pending signals of a kind coalesce.
    for i in 1..=3 {
        d.signal(Signal::SIGTTIN);
        d.wait_log("event=\"scale\"", i, 10 * SEC);
    }
    d.wait_status("4 workers ready", 20 * SEC);
    for body in answers_from(&d, 4) {
        assert_eq!(field(&body, "loaded_by"), template, "{body}");
    }
    for i in 4..=5 {
        d.signal(Signal::SIGTTOU);
        d.wait_log("event=\"scale\"", i, 10 * SEC);
    }
    d.wait_status("2 workers ready", 20 * SEC);
    eventually("2 workers and the template left", 20 * SEC, || {
        (d.workers().into_iter().filter(|&p| alive(p)).count() == 3).then_some(())
    });
    assert_eq!(templates_started(&d), vec![template]);
}

#[test]
fn reload_from_template_to_exec_mode_and_back() {
    let (mut d, _app) = template_pool("tpl-switch", 2);
    d.wait_ready();
    let template = templates_started(&d)[0];
    let config = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(
        d.config_path(),
        config.replace(r#"mode = "template""#, r#"mode = "exec""#),
    )
    .unwrap();
    d.ready_again_after("the rollout to exec mode", 30 * SEC, |d| {
        d.signal(Signal::SIGHUP)
    });
    for body in answers_from(&d, 2) {
        assert_eq!(
            field(&body, "loaded_by"),
            field(&body, "pid"),
            "exec'd: {body}"
        );
    }
    eventually("the template gone, 2 workers left", 10 * SEC, || {
        let living: Vec<i32> = d.workers().into_iter().filter(|&p| alive(p)).collect();
        (!alive(template) && living.len() == 2).then_some(())
    });
    assert!(
        !d.upward().status.contains("template"),
        "{}",
        d.upward().status
    );
    std::fs::write(d.config_path(), &config).unwrap();
    d.ready_again_after("the rollout back to template mode", 30 * SEC, |d| {
        d.signal(Signal::SIGHUP)
    });
    let new = templates_started(&d)[1];
    for body in answers_from(&d, 2) {
        assert_eq!(field(&body, "loaded_by"), new, "forked again: {body}");
    }
}

/// An upgrade asked for while the template still owes a fork waits for
/// the answer before the exec: otherwise the new image would not know that
/// worker, and the template (not handed over with a fork owed) would be
/// replaced. Regression: SIGUSR2 used to exec at once, whatever was owed.
#[test]
fn an_upgrade_waits_for_a_fork_the_template_still_owes() {
    // Answers each spawn 1.5 s late; its workers only say READY=1.
    let dir = temp_dir("tpl-owed-app");
    let script = dir.join("slow.py");
    std::fs::write(
        &script,
        r#"
import os, socket, sys, time
s = socket.socket(fileno=int(os.environ["DROVE_TEMPLATE_FD"]))
droved = os.getppid()
s.send(b"DROVE-TEMPLATE 1")
while True:
    if not s.recv(512):
        sys.exit(0)
    time.sleep(1.5)
    r, w = os.pipe()
    if os.fork() == 0:
        pid = os.fork()
        if pid == 0:
            s.close()
            while os.getppid() != droved:
                time.sleep(0.001)
            n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            n.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
            time.sleep(600)
            os._exit(0)
        os.write(w, str(pid).encode())
        os._exit(0)
    os.wait()
    s.send(b"pid " + os.read(r, 32))
"#,
    )
    .unwrap();
    let scratch = Scratch::new("tpl-owed-bin");
    let binary = scratch.join("droved");
    droved_build(&binary, "build-0");
    let mut d = Droved::builder("tpl-owed")
        .binary(&binary)
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
mode = "template"
command = ["python3", "{}"]
ready = "notify"
[pool]
min = 1
max = 4
"#,
            script.display()
        ))
        .start();
    d.wait_ready();
    let template = templates_started(&d)[0];
    droved_build(&binary, "build-1");
    // One more worker: its fork is owed for 1.5 s; the upgrade comes now.
    d.signal(Signal::SIGTTIN);
    d.wait_log("asked template for a worker", 2, 10 * SEC);
    d.ready_again_after("READY=1 after the upgrade", 20 * SEC, |d| {
        d.signal(Signal::SIGUSR2)
    });
    d.wait_log(&format!("took over template {template}"), 1, 10 * SEC);
    assert_eq!(templates_started(&d), vec![template], "no new template");
    let up = d.wait_for("2 workers ready", 10 * SEC, |u| {
        u.status.starts_with("2 workers ready")
    });
    assert!(up.status.contains("2 workers ready"), "{}", up.status);
    assert!(!d.log().contains("stray"), "{}", d.log());
}

/// docs/template.md, "What trips a new template up": a template behind a
/// shell that does not exec it is not droved's child; its workers wait for
/// the wrong parent and give up. droved must say so and back off, not loop.
#[test]
fn a_template_behind_a_shell_is_refused_and_reported_failing() {
    // Like the reference templates, minus their LISTEN_PID check (which
    // would stop it at once behind a shell): the worker waits to be
    // reparented to its template's parent, then serves nothing.
    let dir = temp_dir("tpl-shell");
    let script = dir.join("tpl.py");
    std::fs::write(
        &script,
        r#"
import os, socket, sys, time
s = socket.socket(fileno=int(os.environ["DROVE_TEMPLATE_FD"]))
droved = os.getppid()
s.send(b"DROVE-TEMPLATE 1")
while True:
    msg = s.recv(512)
    if not msg:
        sys.exit(0)
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        worker = os.fork()
        if worker == 0:
            s.close()
            deadline = time.monotonic() + 2
            while os.getppid() != droved:
                if time.monotonic() > deadline:
                    os._exit(1)
                time.sleep(0.01)
            time.sleep(600)
            os._exit(0)
        os.write(w, str(worker).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(middle, 0)
    s.send(b"pid " + os.read(r, 32))
    os.close(r)
"#,
    )
    .unwrap();
    // `; true`: no shell can exec the last command in place.
    let line = format!("python3 {}; true", script.display());
    let mut d = Droved::builder("tpl-shell")
        .args(&[
            "-l",
            "127.0.0.1:{port}",
            "-w",
            "1",
            "--mode",
            "template",
            "--",
            "sh",
            "-c",
            &line,
        ])
        .start();
    let status = d.wait_status("FAILING", 30 * SEC);
    assert!(status.contains("droved's own child"), "{status}");
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("the template must be droved's own child"))
        .unwrap_or_else(|| panic!("no explanation in {log}"));
    assert!(line.contains("sh -c 'exec"), "{line}");
    // Both pids named: the shell droved started and the one that spoke.
    let shell = templates_started(&d)[0];
    assert!(line.contains(&format!("pid {shell}")), "{line}");
    assert!(d.try_exit().is_none(), "droved stays up");
}

/// The hello wait is not silent: droved says once what it waits for.
#[test]
fn a_slow_template_is_told_what_droved_waits_for() {
    let mut d = Droved::builder("tpl-slowhello")
        .config(
            r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
mode = "template"
command = ["sleep", "600"]
ready_timeout = "30s"
[pool]
min = 1
max = 1
"#,
        )
        .start();
    d.wait_log("to say hello", 1, 15 * SEC);
    let template = templates_started(&d)[0];
    let log = d.log();
    let line = log.lines().find(|l| l.contains("to say hello")).unwrap();
    assert!(
        line.contains(&format!(
            "waiting for template {template} to say hello (DROVE-TEMPLATE 1 on fd 4)"
        )),
        "{line}"
    );
    assert!(line.contains("ready_timeout = 30s"), "{line}");
    // Once, not at every tick.
    std::thread::sleep(SEC);
    assert_eq!(d.log_count("to say hello"), 1, "{}", d.log());
}

/// An answer out of turn is told as what came and what was expected, not
/// as droved's internals.
#[test]
fn an_unexpected_answer_is_logged_as_what_came_and_what_was_expected() {
    let mut d = bad_template("tpl-unexpected", "ok 30706");
    d.wait_log("killing template", 1, 10 * SEC);
    let template = templates_started(&d)[0];
    let log = d.log();
    assert!(
        log.contains(&format!(
            "template {template} sent \\\"ok 30706\\\", expected \\\"pid N\\\" or \\\"error TEXT\\\" answering spawn of slot 0"
        )) || log.contains(&format!(
            "template {template} sent \"ok 30706\", expected \"pid N\" or \"error TEXT\" answering spawn of slot 0"
        )),
        "{log}"
    );
    assert!(!log.contains("Garbage("), "{log}");
}

/// A template that dies closes its socket before droved can reap it; its
/// exit is still told as what it was, never as a kill for closing it.
#[test]
fn a_killed_template_is_logged_with_its_signal_not_as_closing_its_socket() {
    let (mut d, _app) = template_pool("tpl-kill15", 1);
    d.wait_ready();
    const KILLS: usize = 15;
    for i in 0..KILLS {
        d.wait_log("event=\"template-ready\"", i + 1, 20 * SEC);
        let template = *templates_started(&d).last().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(template), Signal::SIGKILL).unwrap();
        eventually("a new template", 20 * SEC, || {
            (templates_started(&d).len() >= i + 2).then_some(())
        });
    }
    let log = d.log();
    assert_eq!(d.log_count("closed its socket"), 0, "{log}");
    assert_eq!(d.log_count("event=\"template-killed\""), 0, "{log}");
    assert_eq!(d.log_count("exited with signal SIGKILL"), KILLS, "{log}");
}
