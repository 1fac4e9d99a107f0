//! Guarded rollouts (`[rollout]`): canaries first, observed under real
//! traffic, and undone when the new generation fails. Real processes: the
//! Python reference worker serving an app whose version is read at import.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);

/// A release of the app: `app-<version>.py` answers `version=<version>`;
/// "crashes-5" exits on its fifth request, mid-request, as a release with a
/// bug under traffic would. Releases sit side by side, and the config's
/// command names the one to run, as with a releases/ directory.
const APP: &str = r#"
import os
VERSION = os.path.basename(__file__)[len("app-"):-len(".py")]
served = 0

def application(environ, start_response):
    global served
    served += 1
    if VERSION == "crashes-5" and served >= 5:
        os._exit(3)
    data = "pid={} version={}\n".format(os.getpid(), VERSION).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]
"#;

fn version_of(body: &str) -> String {
    body.split("version=")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string()
}

fn config(dir: &std::path::Path, version: &str, observe: &str) -> String {
    let app = dir.join(format!("app-{version}.py"));
    std::fs::write(&app, APP).unwrap();
    format!(
        r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
command = ["python3", "{worker}", "{app}:application"]
ready = "notify"
[pool]
min = 3
max = 3
[rollout]
canary = 1
observe = "{observe}"
max_failures = 1
"#,
        worker = python_worker().display(),
        app = app.display(),
    )
}

fn guarded_pool(tag: &str, observe: &str) -> (Droved, std::path::PathBuf) {
    let dir = temp_dir(tag);
    let d = Droved::builder(tag)
        .config(&config(&dir, "good", observe))
        .start();
    (d, dir)
}

/// Points the config at another release and reloads.
fn release(d: &Droved, dir: &std::path::Path, version: &str, observe: &str) {
    let text = config(dir, version, observe).replace("{port}", &d.port.to_string());
    std::fs::write(d.config_path(), text).unwrap();
    d.signal(Signal::SIGHUP);
}

/// Every answer over `n` requests has `version`.
fn all_answer(d: &Droved, version: &str, n: usize) {
    for _ in 0..n {
        let body = d.get("/").expect("request");
        assert_eq!(version_of(&body), version, "{body}");
    }
}

#[test]
fn a_release_that_crashes_under_traffic_is_rolled_back() {
    let (mut d, dir) = guarded_pool("canary-crash", "30s");
    d.wait_ready();
    all_answer(&d, "good", 6);
    let load = Load::start(Target::Tcp(d.port), "/", 4, 60 * SEC);
    eventually("load is flowing", 10 * SEC, || {
        (load.ok() > 20).then_some(())
    });
    release(&d, &dir, "crashes-5", "30s");
    d.wait_log("event=\"rollback\"", 1, 30 * SEC);
    d.wait_log("rolling restart done (rollback)", 1, 30 * SEC);
    let (ok, errors) = load.finish();
    assert!(ok > 20, "only {ok} requests");
    // Only the canary's in-flight request when it crashed may fail.
    assert!(
        errors.len() <= 1,
        "{} failed requests: {errors:?}\n{}",
        errors.len(),
        d.log()
    );
    all_answer(&d, "good", 12);
    assert_eq!(d.workers().len(), 3, "the pool keeps its size");
    assert!(
        d.log().contains("1 failure(s) of the new generation"),
        "the journal says why:\n{}",
        d.log()
    );
    // The rollback is one rollout: only the canary ever ran the release.
    let crashes = d
        .log()
        .lines()
        .filter(|l| l.contains("event=\"exited\"") && l.contains("exited with status 3"))
        .count();
    assert_eq!(crashes, 1, "{}", d.log());
}

#[test]
fn a_good_release_rolls_on_after_its_canary_was_observed() {
    let (mut d, dir) = guarded_pool("canary-good", "2s");
    d.wait_ready();
    let load = Load::start(Target::Tcp(d.port), "/", 4, 60 * SEC);
    eventually("load is flowing", 10 * SEC, || {
        (load.ok() > 20).then_some(())
    });
    release(&d, &dir, "good-2", "2s");
    d.wait_log(
        "canary worker(s) of generation 2 ready; observing them for 2s",
        1,
        20 * SEC,
    );
    let observing = Instant::now();
    // While observed, the canary serves beside the old workers.
    eventually("the canary answering", 10 * SEC, || {
        d.get("/").ok().filter(|b| version_of(b) == "good-2")
    });
    d.wait_log("rolling restart done", 1, 30 * SEC);
    assert!(
        observing.elapsed() >= Duration::from_millis(1900),
        "the rest rolled before the observation ended ({:?})",
        observing.elapsed()
    );
    assert!(load.finish_clean() > 20);
    all_answer(&d, "good-2", 12);
    assert!(!d.log().contains("rollback"), "{}", d.log());
}

#[test]
fn the_observation_holds_the_rest_of_the_pool() {
    let (mut d, dir) = guarded_pool("canary-abort", "60s");
    d.wait_ready();
    release(&d, &dir, "good-3", "60s");
    d.wait_log("observing them for 1m", 1, 20 * SEC);
    // The 60 s observation holds the rest: exactly one new worker.
    let newer = d
        .workers()
        .into_iter()
        .filter(|&p| env_of(p, "DROVE_GENERATION").as_deref() == Some("2"))
        .count();
    assert_eq!(newer, 1, "only the canary runs the new generation");
}
