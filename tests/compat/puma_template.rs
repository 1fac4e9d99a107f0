//! Puma in template mode (issue 23): `drove-puma` (ruby/), shipped in the
//! packages, with Debian's puma and the same Rack app as the exec rows.
//! The matrix row (forked workers serve, are droved's children, a reload
//! under load starts a new template with 0 failures, the stop leaves
//! nothing), then what drove-puma makes of bad input: options that cannot
//! work under drove, an app that cannot load, a start outside droved.

use std::process::Command;
use std::time::Instant;

use nix::sys::signal::Signal;

use crate::harness::*;
use crate::matrix::*;

fn drove_puma() -> String {
    repo().join("ruby/bin/drove-puma").display().to_string()
}

fn hello_ru() -> String {
    repo()
        .join("tests/compat/apps/hello.ru")
        .display()
        .to_string()
}

fn puma_template(listener: Listener) -> Server {
    Server {
        name: "Puma (drove-puma, 2 threads)",
        version: Version::Deb("puma"),
        ready: Ready::Notify,
        listener,
        command: vec![
            program("ruby"),
            drove_puma(),
            "-t".into(),
            "2:2".into(),
            hello_ru(),
        ],
        env: vec![],
        extra: "mode = \"template\"",
        drops_in_flight: None,
    }
}

#[test]
fn puma_template_mode() {
    run(puma_template(Listener::Tcp));
}

#[test]
fn puma_template_mode_unix_socket() {
    run(puma_template(Listener::Unix));
}

/// droved in template mode running `drove-puma ARGS` on `app`, a pool of
/// 2, restarts backed off quickly so a few failures show within seconds.
fn drove_puma_pool(tag: &str, args: &[&str], app: &str, ready_timeout: &str) -> Droved {
    let mut command = vec![program("ruby"), drove_puma()];
    command.extend(args.iter().map(|a| a.to_string()));
    command.push(app.to_string());
    let command = toml_strings(&command);
    Droved::builder(tag)
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
mode = "template"
command = [{command}]
ready = "notify"
ready_timeout = "{ready_timeout}"
restart_delay = "100ms"
restart_delay_max = "10s"
stop_timeout = "5s"
[pool]
min = 2
max = 2
"#
        ))
        .start()
}

/// [`drove_puma_pool`] for what drove-puma refuses or cannot load: its
/// templates exit, so a short `ready_timeout` only bounds a hang.
fn failing_template(tag: &str, args: &[&str], app: &str) -> Droved {
    drove_puma_pool(tag, args, app, "10s")
}

/// FAILING within 30 s, the template's own words in droved's log, and
/// templates backed off, not restarted in a storm; then a clean stop.
fn assert_failing_with(mut d: Droved, needles: &[&str]) {
    let status = d.wait_status("FAILING", 30 * SEC);
    assert!(!d.upward().ready, "never ready: {status}");
    let log = d.log();
    for needle in needles {
        assert!(
            log.contains(needle),
            "droved's log lacks {needle:?}\n{}",
            tail(&log, 40)
        );
    }
    let before = templates(&d).len();
    let t0 = Instant::now();
    std::thread::sleep(3 * SEC);
    let started = templates(&d).len() - before;
    assert!(
        started <= 6,
        "{started} templates in {:?}: no back-off\n{}",
        t0.elapsed(),
        tail(&d.log(), 40)
    );
    assert!(pool_workers(&d).is_empty(), "no worker without a template");
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success(), "{}", d.log());
}

#[test]
fn drove_puma_refuses_cluster_mode_naming_the_option() {
    let d = failing_template("puma-w", &["-w", "2"], &hello_ru());
    assert_failing_with(
        d,
        &[
            "workers 2 (cluster mode, from the command line) cannot work under drove",
            "exited with status 2",
        ],
    );
}

#[test]
fn drove_puma_refuses_a_bind_of_its_own_naming_the_option() {
    let d = failing_template("puma-b", &["-b", "tcp://127.0.0.1:1"], &hello_ru());
    assert_failing_with(
        d,
        &["bind tcp://127.0.0.1:1 (from the command line (-b/-p)) cannot work under drove"],
    );
}

#[test]
fn drove_puma_refuses_fork_worker_and_the_control_app_from_a_config_file() {
    let dir = temp_dir("puma-conf");
    let conf = dir.join("puma.rb");
    std::fs::write(
        &conf,
        "fork_worker\nactivate_control_app 'tcp://127.0.0.1:9293'\n",
    )
    .unwrap();
    let conf = conf.display().to_string();
    let d = failing_template("puma-conf", &["-C", &conf], &hello_ru());
    assert_failing_with(
        d,
        &[
            &format!("fork_worker (-f/--fork-worker, from {conf}) cannot work under drove"),
            "the control app (--control-url / activate_control_app tcp://127.0.0.1:9293",
        ],
    );
}

#[test]
fn drove_puma_refuses_daemonize_naming_the_config_line() {
    let dir = temp_dir("puma-daemon");
    let conf = dir.join("puma.rb");
    std::fs::write(&conf, "threads 1, 2\ndaemonize\n").unwrap();
    let conf = conf.display().to_string();
    let d = failing_template("puma-daemon", &["-C", &conf], &hello_ru());
    assert_failing_with(
        d,
        &[&format!(
            "daemonize ({conf}:2:in `_load_from') cannot work under drove"
        )],
    );
}

/// An app that raises while loading: its error (class, message, where) on
/// stderr, which is droved's log; FAILING with back-off, no fork storm.
#[test]
fn an_app_that_cannot_load_is_failing_with_its_error_and_backoff() {
    let dir = temp_dir("puma-broken");
    let app = dir.join("broken.ru");
    std::fs::write(
        &app,
        "raise ArgumentError, \"the database URL is missing\"\nrun ->(env) { [200, {}, []] }\n",
    )
    .unwrap();
    let d = failing_template("puma-broken", &[], &app.display().to_string());
    assert_failing_with(
        d,
        &[
            "ArgumentError",
            "the database URL is missing",
            "broken.ru:1",
            "cannot load the Rack app",
            "exited with status 1",
        ],
    );
}

/// Outside droved (no DROVE_TEMPLATE_FD, no LISTEN_FDS): exit 2 and what
/// to do instead.
#[test]
fn drove_puma_outside_droved_exits_2_with_a_clear_message() {
    let out = Command::new(program("ruby"))
        .arg(drove_puma())
        .arg(hello_ru())
        .env_remove("DROVE_TEMPLATE_FD")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("DROVE_TEMPLATE_FD is not set") && stderr.contains("mode = \"template\""),
        "{stderr}"
    );
}

/// Puma's hooks, as its cluster mode with preload_app! runs them: the
/// template runs before_fork once and on_worker_fork/after_worker_fork per
/// fork, each worker on_worker_boot (with its slot) and, on SIGTERM,
/// on_worker_shutdown. With a 1 s watchdog, the workers' WATCHDOG=1 keep
/// them alive.
#[test]
fn puma_hooks_run_where_cluster_mode_runs_them_and_the_watchdog_is_fed() {
    let dir = temp_dir("puma-hooks");
    let conf = dir.join("puma.rb");
    std::fs::write(
        &conf,
        r#"
before_fork { $stderr.puts "hook before_fork pid=#{Process.pid}" }
on_worker_fork { |i| $stderr.puts "hook on_worker_fork slot=#{i} pid=#{Process.pid}" }
after_worker_fork { |i| $stderr.puts "hook after_worker_fork slot=#{i} pid=#{Process.pid}" }
on_worker_boot { |i| $stderr.puts "hook on_worker_boot slot=#{i} pid=#{Process.pid} ppid=#{Process.ppid}" }
on_worker_shutdown { |i| $stderr.puts "hook on_worker_shutdown slot=#{i} pid=#{Process.pid}" }
"#,
    )
    .unwrap();
    let command = toml_strings(&[
        program("ruby"),
        drove_puma(),
        "-C".into(),
        conf.display().to_string(),
        hello_ru(),
    ]);
    let mut d = Droved::builder("puma-hooks")
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
mode = "template"
command = [{command}]
ready = "notify"
ready_timeout = "20s"
watchdog = "1s"
stop_timeout = "10s"
[pool]
min = 2
max = 2
"#
        ))
        .start();
    d.wait_for("the pool ready", 30 * SEC, |u| u.ready);
    let template = templates(&d)[0];
    let workers = pool_workers(&d);
    assert_eq!(workers.len(), 2, "{}", d.log());
    let hooks = |log: &str, name: &str| -> Vec<String> {
        log.lines()
            .filter_map(|l| l.split_once(&format!("hook {name} ")))
            .map(|(_, rest)| rest.to_string())
            .collect()
    };
    assert_eq!(
        hooks(&d.log(), "before_fork"),
        vec![format!("pid={template}")]
    );
    for name in ["on_worker_fork", "after_worker_fork"] {
        let seen = hooks(&d.log(), name);
        assert_eq!(seen.len(), 2, "{name}: {seen:?}");
        assert!(
            seen.iter().all(|h| h.ends_with(&format!("pid={template}"))),
            "{name} in the template: {seen:?}"
        );
    }
    let boots = hooks(&d.log(), "on_worker_boot");
    assert_eq!(boots.len(), 2, "{boots:?}");
    for &w in &workers {
        assert!(
            boots
                .iter()
                .any(|h| h.contains(&format!("pid={w} ppid={}", d.pid()))),
            "on_worker_boot in worker {w}, droved's child: {boots:?}"
        );
    }
    let mut slots: Vec<String> = boots
        .iter()
        .map(|h| h.split_whitespace().next().unwrap().to_string())
        .collect();
    slots.sort();
    assert_eq!(slots, ["slot=0", "slot=1"]);

    // Three watchdog periods: fed, nobody killed or replaced.
    std::thread::sleep(3 * SEC);
    assert_eq!(d.log_count("watchdog timeout"), 0, "{}", d.log());
    assert_eq!(pool_workers(&d), workers);

    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success(), "{}", d.log());
    let shutdowns = hooks(&d.log(), "on_worker_shutdown");
    for &w in &workers {
        assert!(
            shutdowns.iter().any(|h| h.ends_with(&format!("pid={w}"))),
            "{shutdowns:?}"
        );
    }
}

/// A reload to app code that no longer loads: each new template exits 1
/// with the app's error, the rollout is aborted, and the old workers (forks
/// of the old template) keep serving.
#[test]
fn a_reload_to_an_app_that_cannot_load_keeps_the_old_puma_workers() {
    let dir = temp_dir("puma-badreload");
    let app = dir.join("app.ru");
    std::fs::copy(hello_ru(), &app).unwrap();
    let mut d = drove_puma_pool("puma-badreload", &[], &app.display().to_string(), "20s");
    d.wait_for("the pool ready", 30 * SEC, |u| u.ready);
    let template = templates(&d)[0];
    let workers = pool_workers(&d);
    std::fs::write(&app, "raise NameError, \"broken on purpose\"\n").unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("event=\"rollout-aborted\"", 1, 60 * SEC);
    let log = d.log();
    assert!(
        log.contains("broken on purpose") && log.contains("exited with status 1"),
        "{}",
        tail(&log, 40)
    );
    for _ in 0..10 {
        let body = d.get("/").expect("the old workers keep serving");
        assert!(workers.contains(&answered_pid(&body)), "{body}");
        assert_eq!(loaded_by(&body), Some(template), "{body}");
    }
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(20 * SEC).success(), "{}", d.log());
}

/// A connection a worker accepted before its request arrived is answered,
/// not dropped, when that worker stops gracefully. Puma 5 closed it
/// (`Client#can_close?` holds for a client that never sent a byte), which
/// the reload row saw as one "Broken pipe" in about six runs.
#[test]
fn a_connection_accepted_before_its_request_is_answered_across_a_stop() {
    use std::io::{Read, Write};
    let command = toml_strings(&[
        program("ruby"),
        drove_puma(),
        "-t".into(),
        "2:2".into(),
        hello_ru(),
    ]);
    let mut d = Droved::builder("puma-early")
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
mode = "template"
command = [{command}]
ready = "notify"
stop_timeout = "10s"
[pool]
min = 1
max = 1
"#
        ))
        .start();
    d.wait_ready();
    let worker: i32 = d
        .log()
        .lines()
        .find_map(|l| {
            l.split("INFO worker ")
                .nth(1)?
                .split(" (slot 0")
                .next()?
                .parse()
                .ok()
        })
        .expect("the worker's start in the log");
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    conn.set_read_timeout(Some(20 * SEC)).unwrap();
    // Accepted (droved counts the worker busy once it holds the
    // connection), and no byte of the request sent yet.
    d.wait_status("1 busy", 10 * SEC);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker), Signal::SIGTERM).unwrap();
    d.wait_log("stopping on its own", 1, 10 * SEC);
    let answer = conn
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .and_then(|()| {
            let mut s = String::new();
            conn.read_to_string(&mut s).map(|_| s)
        });
    let answer =
        answer.unwrap_or_else(|e| panic!("the accepted connection was dropped: {e}\n{}", d.log()));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(&format!("pid={worker} ")),
        "the stopping worker answered: {answer}"
    );
}
