//! Binary upgrade by re-exec and reload by rolling restart, under real load:
//! nothing may fail, reset or be dropped, droved's pid never changes.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);

const POOL: &str = r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = ["{worker}"]
ready = "notify"
stop_timeout = "10s"
environment = { RELEASE = "0" }
[pool]
min = 4
max = 4
"#;

fn generation_of_workers(d: &Droved) -> Vec<String> {
    d.workers()
        .into_iter()
        .filter_map(|p| env_of(p, "DROVE_GENERATION"))
        .collect()
}

#[test]
fn twenty_upgrades_then_twenty_reloads_under_load_drop_nothing() {
    let dir = Scratch::new("upgrade-bin");
    let binary = dir.join("droved");
    droved_build(&binary, "build-0");
    let mut d = Droved::builder("upgrade")
        .binary(&binary)
        .config(POOL)
        .start();
    d.wait_ready();
    let pid = d.pid();
    assert!(d.log().contains("droved 0.1.0 (build-0)"), "{}", d.log());
    let fds_before = settled_fd_count(pid);
    let workers_before = d.workers();

    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=5", 64, 120 * SEC);
    eventually("load is flowing", 10 * SEC, || {
        (load.ok() > 50).then_some(())
    });

    for i in 1..=20 {
        droved_build(&binary, &format!("build-{i}"));
        d.ready_again_after(&format!("READY=1 after upgrade {i}"), 20 * SEC, |d| {
            d.signal(Signal::SIGUSR2)
        });
        assert_eq!(d.pid(), pid);
        eventually("the new build took over", 10 * SEC, || {
            d.log()
                .contains(&format!("droved 0.1.0 (build-{i}) took over 4 workers"))
                .then_some(())
        });
    }
    assert!(d.try_exit().is_none());
    assert_eq!(
        d.workers(),
        workers_before,
        "workers kept serving through 20 upgrades"
    );
    assert_eq!(
        settled_fd_count(pid),
        fds_before,
        "droved's fds stay flat across upgrades"
    );
    assert!(
        d.upward().reloading >= 20,
        "RELOADING=1 around each upgrade"
    );

    let config = std::fs::read_to_string(d.config_path()).unwrap();
    for i in 1..=20 {
        std::fs::write(
            d.config_path(),
            config.replace("RELEASE = \"0\"", &format!("RELEASE = \"{i}\"")),
        )
        .unwrap();
        d.ready_again_after(&format!("rollout {i} done"), 30 * SEC, |d| {
            d.signal(Signal::SIGHUP)
        });
        // Done means every old worker was told to stop; they finish their
        // requests and exit.
        let want = (i + 1).to_string();
        eventually(
            &format!("only generation {want} after reload {i}"),
            20 * SEC,
            || {
                let generations = generation_of_workers(&d);
                (generations.len() == 4 && generations.iter().all(|g| *g == want)).then_some(())
            },
        );
    }
    let served = load.ok();
    let ok = load.finish_clean();
    assert!(ok >= served && ok > 1000, "load ran: {ok} requests");
    assert_eq!(d.pid(), pid);
    assert!(d.try_exit().is_none());
    eprintln!("upgrade/reload under load: {ok} requests, 0 failed");
}

#[test]
fn refused_upgrades_leave_the_old_daemon_serving() {
    let dir = Scratch::new("upgrade-refused");
    let binary = dir.join("droved");
    droved_build(&binary, "old");
    let mut d = Droved::builder("refused")
        .binary(&binary)
        .config(POOL)
        .start();
    d.wait_ready();
    let workers = d.workers();
    let script = |body: &str| {
        install_executable(&binary, format!("#!/bin/sh\n{body}\n").as_bytes());
    };
    type Case<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let cases: Vec<Case> = vec![
        (
            "missing",
            Box::new(|| std::fs::remove_file(&binary).unwrap()),
        ),
        (
            "not executable",
            Box::new(|| {
                droved_build(&binary, "noexec");
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o644)).unwrap();
            }),
        ),
        (
            "check fails",
            Box::new(|| script("echo 'config is bad' >&2; exit 1")),
        ),
        (
            "incompatible",
            Box::new(|| script("echo 'drove-handover formats=99 version=9.9'")),
        ),
    ];
    for (i, (case, prepare)) in cases.iter().enumerate() {
        prepare();
        d.signal(Signal::SIGUSR2);
        eventually(&format!("upgrade refused ({case})"), 20 * SEC, || {
            (d.log_count("upgrade refused, still running 0.1.0 (old)") > i).then_some(())
        });
        assert_eq!(d.workers(), workers, "{case}: the pool is untouched");
        assert!(d.get("/").is_ok(), "{case}: still serving");
    }
    let log = d.log();
    assert!(
        log.contains("No such file or directory") || log.contains("cannot run"),
        "{log}"
    );
    assert!(
        log.contains("config is bad"),
        "the new binary's error is reported:\n{log}"
    );
    assert!(log.contains("reads handover formats [99]"), "{log}");
    // A good build after all that still upgrades.
    droved_build(&binary, "new");
    d.ready_again_after("READY=1 after the good upgrade", 20 * SEC, |d| {
        d.signal(Signal::SIGUSR2)
    });
    eventually("new build took over", 10 * SEC, || {
        d.log()
            .contains("droved 0.1.0 (new) took over")
            .then_some(())
    });
}

#[test]
fn invalid_config_on_reload_is_rejected_and_the_pool_untouched() {
    let mut d = Droved::builder("bad-reload").config(POOL).start();
    d.wait_ready();
    let workers = d.workers();
    let good = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(d.config_path(), good.replace("min = 4", "min = 40")).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("reload on SIGHUP rejected", 1, 10 * SEC);
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("reload on SIGHUP rejected"))
        .unwrap();
    assert!(
        line.contains("drove.toml:") && line.contains("pool.min (40) must not exceed pool.max (4)"),
        "{line}"
    );
    assert!(line.contains(":10:"), "line number of `min = 40`: {line}");
    assert_eq!(d.workers(), workers);
    assert!(d.get("/").is_ok());
    assert_eq!(d.upward().reloading, 0, "no reload was started");
}

#[test]
fn a_generation_that_never_gets_ready_is_rolled_back() {
    let mut d = Droved::builder("rollback")
        .config(&POOL.replace(
            "stop_timeout = \"10s\"",
            "stop_timeout = \"10s\"\nready_timeout = \"500ms\"",
        ))
        .start();
    d.wait_ready();
    let workers = d.workers();
    let good = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(
        d.config_path(),
        good.replace(
            "RELEASE = \"0\"",
            "RELEASE = \"1\", WORKER_NO_READY = \"1\"",
        ),
    )
    .unwrap();
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=5", 16, 30 * SEC);
    d.signal(Signal::SIGHUP);
    d.wait_log("rollout aborted", 1, 20 * SEC);
    let ok = load.finish_clean();
    assert!(ok > 0);
    assert!(d.log().contains("cannot get ready"), "{}", d.log());
    // The old generation kept serving the whole time, untouched.
    let now: Vec<i32> = d
        .workers()
        .into_iter()
        .filter(|p| workers.contains(p))
        .collect();
    assert_eq!(now, workers, "old workers still run");
    let deadline = Instant::now() + 10 * SEC;
    while d.workers() != workers {
        assert!(
            Instant::now() < deadline,
            "failed workers linger: {:?} vs {workers:?}\n{}",
            d.workers(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(generation_of_workers(&d).iter().all(|g| g == "1"));
    // And a fixed config rolls out normally afterwards.
    std::fs::write(
        d.config_path(),
        good.replace("RELEASE = \"0\"", "RELEASE = \"2\""),
    )
    .unwrap();
    d.ready_again_after("the next rollout completes", 30 * SEC, |d| {
        d.signal(Signal::SIGHUP)
    });
    eventually("old workers replaced", 20 * SEC, || {
        d.workers()
            .iter()
            .all(|p| !workers.contains(p))
            .then_some(())
    });
}

#[test]
fn reload_without_config_changes_still_rolls_the_workers() {
    // New application code with the same drove config: HUP must restart
    // the workers (gunicorn habit), one by one.
    let mut d = Droved::builder("plain-reload").config(POOL).start();
    d.wait_ready();
    let before = d.workers();
    let done = d.ready_again_after("rollout done", 30 * SEC, |d| d.signal(Signal::SIGHUP));
    assert_eq!(done.reloading, 1);
    eventually("all workers replaced by generation 2", 20 * SEC, || {
        let now = d.workers();
        (now.len() == 4
            && now.iter().all(|p| !before.contains(p))
            && generation_of_workers(&d).iter().all(|g| g == "2"))
        .then_some(())
    });
}
