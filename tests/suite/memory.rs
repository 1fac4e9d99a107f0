//! Memory accounting in template mode (issue 23): every worker forked from
//! a template maps the template's pages, so its RSS counts the whole app.
//! `max_rss` must compare what the worker owns (USS + swap share), or a
//! pool whose app is bigger than the limit recycles every worker at birth.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);
const MIB: u64 = 1 << 20;
const DROVECTL: &str = env!("CARGO_BIN_EXE_drovectl");
const NO_BUS: &str = "unix:path=/nonexistent/drove-test-no-bus";

/// 64 MiB loaded (and written) at import, in the template; `/grow` makes
/// the worker that serves it allocate and write 48 MiB of its own.
const APP: &str = r#"
import os
BIG = bytearray(64 << 20)
for i in range(0, len(BIG), 4096):
    BIG[i] = 1
OWN = []

def application(environ, start_response):
    if environ.get("PATH_INFO") == "/grow":
        own = bytearray(48 << 20)
        for i in range(0, len(own), 4096):
            own[i] = 1
        OWN.append(own)
    data = "pid={}\n".format(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]
"#;

/// A template pool of 2 with `max_rss = "32MiB"`, on the private socket
/// only (no bus), `user` and `launcher` as given, metrics on `metrics`.
fn pool(
    tag: &str,
    python: &str,
    user: &str,
    launcher: &[&str],
    metrics: Option<u16>,
) -> (Droved, String) {
    let dir = temp_dir(tag);
    std::fs::write(dir.join("app.py"), APP).unwrap();
    let instance = format!("memory-{tag}-{}", std::process::id());
    let config = format!(
        r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
mode = "template"
command = ["{python}", "{worker}", "{app}:application"]
ready = "notify"
ready_timeout = "20s"
stop_timeout = "5s"
max_rss = "32MiB"
{user}
[pool]
min = 2
max = 2
{metrics}
"#,
        worker = python_worker().display(),
        app = dir.join("app.py").display(),
        metrics = metrics
            .map(|p| format!("[metrics]\nlisten = \"127.0.0.1:{p}\""))
            .unwrap_or_default(),
    );
    let mut b = Droved::builder(tag)
        .config(&config)
        .args(&["--instance", &instance])
        .env("DBUS_SYSTEM_BUS_ADDRESS", NO_BUS)
        .env("DBUS_SESSION_BUS_ADDRESS", NO_BUS);
    if !launcher.is_empty() {
        b = b.launcher(launcher);
    }
    let mut d = b.start();
    d.wait_ready();
    (d, instance)
}

/// `drovectl --json list` over the private socket.
fn list(instance: &str) -> Vec<Value> {
    let out = Command::new(DROVECTL)
        .args(["--instance", instance, "--json", "list"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", NO_BUS)
        .env("DBUS_SESSION_BUS_ADDRESS", NO_BUS)
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drovectl list: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    v.as_array().unwrap().clone()
}

fn bytes(w: &Value, key: &str) -> u64 {
    w[key].as_u64().unwrap_or_else(|| panic!("no {key} in {w}"))
}

fn pids_of_ready(list: &[Value]) -> Vec<u64> {
    let mut pids: Vec<u64> = list
        .iter()
        .filter(|w| w["state"] == "ready")
        .map(|w| bytes(w, "pid"))
        .collect();
    pids.sort();
    pids
}

/// The value of the sample line `series` in a scrape of `port`.
fn sample(port: u16, series: &str) -> u64 {
    let text = http_get(("127.0.0.1", port), "/metrics").unwrap();
    text.lines()
        .map(super::metrics::unpooled)
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// The whole scenario: workers that own little are kept although their
/// RSS is over the limit; the one that allocates 48 MiB is recycled.
fn owned_memory_is_compared(d: &mut Droved, instance: &str, metrics: Option<u16>) {
    let workers = eventually("2 ready workers listed", 20 * SEC, || {
        let l = list(instance);
        (pids_of_ready(&l).len() == 2).then_some(l)
    });
    for w in &workers {
        let (rss, pss, uss) = (
            bytes(w, "rss_bytes"),
            bytes(w, "pss_bytes"),
            bytes(w, "uss_bytes"),
        );
        eprintln!(
            "{} {}: RSS {} MiB, PSS {} MiB, USS {} MiB, swap {} MiB",
            w["state"],
            w["pid"],
            rss / MIB,
            pss / MIB,
            uss / MIB,
            bytes(w, "swap_bytes") / MIB
        );
        if w["state"] == "ready" {
            assert!(rss > 64 * MIB, "maps the template's 64 MiB: {w}");
            assert!(uss < 32 * MIB, "owns little of it: {w}");
            assert!(uss < pss && pss < rss, "{w}");
        } else {
            assert_eq!(w["state"], "template", "{w}");
            assert!(pss > 0, "{w}");
        }
    }
    if let Some(port) = metrics {
        // The template's 64 MiB counted once in the PSS sum, three times
        // in the RSS sum.
        let rss: u64 = workers.iter().map(|w| bytes(w, "rss_bytes")).sum();
        // The scrape's list of pids follows the pool a tick later.
        let pss = eventually("the template's 64 MiB in the PSS sum", 10 * SEC, || {
            let pss = sample(port, r#"drove_pool_memory_bytes{kind="pss"}"#);
            (pss > 64 * MIB).then_some(pss)
        });
        let uss = sample(port, r#"drove_pool_memory_bytes{kind="uss"}"#);
        eprintln!(
            "pool: RSS {} MiB, PSS {} MiB, USS {} MiB",
            rss / MIB,
            pss / MIB,
            uss / MIB
        );
        assert!(pss < rss / 2, "PSS {pss}, RSS {rss}");
        assert!(uss < pss, "USS {uss}, PSS {pss}");
    }
    let lean = pids_of_ready(&workers);
    let body = d.get("/grow").unwrap();
    let grown: u64 = answered_pid(&body) as u64;
    assert!(lean.contains(&grown), "{body}");
    d.wait_log("max_rss exceeded", 1, 20 * SEC);
    let log = d.log();
    let recycled: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("max_rss exceeded"))
        .collect();
    assert!(
        recycled[0].contains(&format!("worker_pid={grown}")),
        "the worker that grew is recycled first: {recycled:?}"
    );
    // Its replacement (a fresh fork) takes over; the other worker stays.
    let kept = *lean.iter().find(|&&p| p != grown).unwrap();
    let after = eventually("the grown worker replaced", 20 * SEC, || {
        let l = list(instance);
        let ready = pids_of_ready(&l);
        (ready.len() == 2 && !ready.contains(&grown) && !l.iter().any(|w| bytes(w, "pid") == grown))
            .then_some(ready)
    });
    assert!(after.contains(&kept), "{after:?}\n{}", d.log());
    // Memory is checked once a second: both lived through several checks.
    eventually("both workers 3 s old", 20 * SEC, || {
        let l = list(instance);
        let ready: Vec<&Value> = l.iter().filter(|w| w["state"] == "ready").collect();
        (ready.len() == 2 && ready.iter().all(|w| w["age_secs"].as_f64().unwrap() >= 3.0))
            .then_some(())
    });
    assert_eq!(
        d.log_count("event=\"recycle\""),
        1,
        "only the grown worker was recycled:\n{}",
        d.log()
    );
    assert!(!d.log().contains("cannot read"), "{}", d.log());
}

#[test]
fn template_workers_are_recycled_on_what_they_own_not_on_rss() {
    let (_reservation, mport) = reserve_port();
    let (mut d, instance) = pool("tpl", "python3", "", &[], Some(mport));
    owned_memory_is_compared(&mut d, &instance, Some(mport));
}

/// As under the packaged unit (systemd/drove@.service): droved is root
/// with only CAP_SETUID, CAP_SETGID, CAP_CHOWN and CAP_KILL, the workers
/// run as `nobody`. Without CAP_SYS_PTRACE it may open their smaps_rollup
/// only with their uid and gid as its file-system ids.
#[test]
fn smaps_rollup_is_read_under_the_packaged_capabilities() {
    // Debian's python: nobody cannot reach root's pyenv.
    let (mut d, instance) = pool(
        "caps",
        "/usr/bin/python3",
        "user = \"nobody\"",
        &[
            "setpriv",
            "--bounding-set",
            "-all,+setuid,+setgid,+chown,+kill",
            "--",
        ],
        None,
    );
    owned_memory_is_compared(&mut d, &instance, None);
}

/// A memory cgroup of its own under the test's (cgroup v1's memory
/// controller or v2), limited to `limit` bytes; removed on drop, once the
/// processes in it are gone.
struct MemoryCgroup {
    dir: std::path::PathBuf,
}

impl MemoryCgroup {
    fn new(tag: &str, limit: u64) -> MemoryCgroup {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let name = format!("drove-test-{tag}-{}", std::process::id());
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next());
            let path = path.unwrap_or("").trim_start_matches('/');
            let (dir, limit_files): (_, &[&str]) = if controllers.split(',').any(|c| c == "memory")
            {
                (
                    std::path::Path::new("/sys/fs/cgroup/memory").join(path),
                    &["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"],
                )
            } else if controllers.is_empty()
                && std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
            {
                (
                    std::path::Path::new("/sys/fs/cgroup").join(path),
                    &["memory.max", "memory.swap.max"],
                )
            } else {
                continue;
            };
            let dir = dir.join(&name);
            std::fs::create_dir(&dir)
                .unwrap_or_else(|e| panic!("cannot create the memory cgroup {dir:?}: {e}"));
            let cgroup = MemoryCgroup { dir };
            for (i, file) in limit_files.iter().enumerate() {
                let value = if i == 1 && file.ends_with("swap.max") {
                    "0".to_string()
                } else {
                    limit.to_string()
                };
                // The swap limit exists only with swap accounting.
                if let Err(e) = std::fs::write(cgroup.dir.join(file), value)
                    && i == 0
                {
                    panic!("cannot limit {:?}: {e}", cgroup.dir.join(file));
                }
            }
            return cgroup;
        }
        panic!("no memory cgroup (v1 memory controller or v2) in /proc/self/cgroup:\n{own}");
    }

    /// A launcher that moves droved (and so its workers) into the cgroup.
    fn launcher(&self) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            format!(
                "echo $$ > {} && exec \"$@\"",
                self.dir.join("cgroup.procs").display()
            ),
            "sh".into(),
        ]
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A worker killed by the kernel's OOM killer is told apart from any other
/// kill: the journal line and `drovectl watch` say so, and the exits
/// metric counts it as `oom-killed`, while a `kill -9` from outside stays
/// a crash. droved reads the OOM killer's count of its own cgroup.
#[test]
fn a_worker_the_oom_killer_took_is_told_apart_from_a_kill() {
    let cgroup = MemoryCgroup::new("oom", 256 * MIB);
    let launcher = cgroup.launcher();
    let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
    let (_reservation, mport) = reserve_port();
    let mut d = Droved::builder("oom")
        .launcher(&launcher)
        .config(&example_config(
            2,
            2,
            "",
            &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""),
        ))
        .start();
    d.wait_ready();
    let before = d.workers();
    assert_eq!(before.len(), 2);
    // More than the cgroup may hold: the OOM killer takes the worker.
    let answer = d.get("/eat?mb=1024");
    assert!(answer.is_err(), "the worker answered: {answer:?}");
    d.wait_log("from the OOM killer", 1, 20 * SEC);
    // A kill -9 from outside is not counted as the OOM killer's.
    let survivor = eventually("a replacement and a survivor", 10 * SEC, || {
        let now = d.workers();
        (now.len() == 2).then(|| now.into_iter().find(|p| before.contains(p)))?
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(survivor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exited = |l: &str| l.contains(&format!("worker {survivor} (slot")) && l.contains("exited");
    eventually("the killed worker's exit logged", 10 * SEC, || {
        d.log().lines().any(exited).then_some(())
    });
    let log = d.log();
    let oom_line = log
        .lines()
        .find(|l| l.contains("from the OOM killer"))
        .unwrap();
    assert!(
        oom_line.contains("exited with signal SIGKILL from the OOM killer")
            && oom_line.contains("cause=\"oom-killed\""),
        "{oom_line}"
    );
    let kill_line = log.lines().find(|l| exited(l)).unwrap();
    assert!(
        !kill_line.contains("OOM") && kill_line.contains("cause=\"crashed\""),
        "{kill_line}"
    );
    let text = eventually("both exits counted", 10 * SEC, || {
        let t = super::metrics::scrape(mport);
        (super::metrics::sample(&t, r#"drove_worker_exits_total{reason="crashed"}"#) == Some(1.0))
            .then_some(t)
    });
    assert_eq!(
        super::metrics::sample(&text, r#"drove_worker_exits_total{reason="oom-killed"}"#),
        Some(1.0),
        "{text}"
    );
    drop(d);
    drop(cgroup);
}
