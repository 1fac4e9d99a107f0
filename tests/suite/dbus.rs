//! The D-Bus interface and drovectl, end to end: a private dbus-daemon
//! (session-style config, its own socket), the real droved serving on it
//! with `--bus session`, and the real drovectl binary driving it, also as
//! the unprivileged user `nobody` (setpriv).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use super::harness::*;

mod lifecycle;
mod rollout;

const DROVECTL: &str = env!("CARGO_BIN_EXE_drovectl");
const SEC: Duration = Duration::from_secs(1);

/// A private bus: anyone may connect, own names and call (so a test can
/// run drovectl as `nobody`); drove's own check is what denies mutations.
struct Bus {
    child: Child,
    dir: PathBuf,
    address: String,
    /// "session" or "system": the --bus both binaries get.
    kind: &'static str,
}

const SESSION_POLICY: &str = r#"
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>"#;

/// The default policy of Debian's system.conf (the parts that matter
/// here): nothing may be owned or called unless a policy file allows it.
const SYSTEM_POLICY: &str = r#"
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>"#;

/// Runs dbus-daemon on `config`, its errors to `log`; returns it and the
/// address it printed once it listens.
fn run_daemon(config: &Path, log: &Path) -> (Child, String) {
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", config.display()))
        .args(["--nofork", "--print-address=1", "--nosyslog"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("dbus-daemon (Debian package dbus) must be installed");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("unix:"),
        "dbus-daemon did not start: {line:?}"
    );
    (child, line)
}

impl Bus {
    /// A session-style bus where anyone may do anything.
    fn start() -> Bus {
        Bus::start_with("session", SESSION_POLICY)
    }

    /// A system-style bus whose only holes are drove's policy file.
    fn start_system() -> Bus {
        let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("packaging/dbus/org.drove.Drove1.conf");
        Bus::start_with(
            "system",
            &format!("{SYSTEM_POLICY}\n  <include>{}</include>", policy.display()),
        )
    }

    fn start_with(kind: &'static str, policy: &str) -> Bus {
        let dir = temp_dir("bus");
        // nobody must reach the socket.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let config = dir.join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>{kind}</type>
  <listen>unix:path={}/bus.sock</listen>
  <auth>EXTERNAL</auth>{policy}
</busconfig>
"#,
                dir.display()
            ),
        )
        .unwrap();
        let (child, line) = run_daemon(&config, &dir.join("bus.log"));
        Bus {
            child,
            dir,
            // Without the daemon's guid, as the system bus's address is: a
            // restarted daemon has another.
            address: line
                .trim()
                .split(',')
                .filter(|part| !part.starts_with("guid="))
                .collect::<Vec<_>>()
                .join(","),
            kind,
        }
    }

    /// Stops dbus-daemon and starts a new one on the same socket, as
    /// `systemctl restart dbus` does.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.dir.join("bus.sock"));
        let (child, _) = run_daemon(&self.dir.join("bus.conf"), &self.dir.join("bus2.log"));
        self.child = child;
    }

    fn address_var(&self) -> &'static str {
        match self.kind {
            "system" => "DBUS_SYSTEM_BUS_ADDRESS",
            _ => "DBUS_SESSION_BUS_ADDRESS",
        }
    }

    /// droved serving `instance` on this bus, from a config file; waits
    /// for READY=1 (droved takes its bus name before it reports ready).
    fn droved(&self, instance: &str, min: u32, max: u32) -> Droved {
        self.droved_with(instance, &config(min, max, ""))
    }

    fn droved_with(&self, instance: &str, config: &str) -> Droved {
        let mut d = self.droved_builder(instance, config).start();
        d.wait_ready();
        d
    }

    fn droved_builder(&self, instance: &str, config: &str) -> Builder {
        Droved::builder("dbus")
            .config(config)
            .args(&["--bus", self.kind, "--instance", instance])
            .env(self.address_var(), &self.address)
    }

    fn command(&self, prefix: &[&str], args: &[&str]) -> Command {
        let mut argv: Vec<&str> = prefix.to_vec();
        argv.push(DROVECTL);
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .arg("--bus")
            .arg(self.kind)
            .args(args)
            .env(self.address_var(), &self.address)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs drovectl as root.
    fn ctl(&self, args: &[&str]) -> Output {
        self.command(&[], args).output().unwrap()
    }

    /// Runs drovectl as nobody:nogroup with no supplementary groups.
    fn ctl_as_nobody(&self, args: &[&str]) -> Output {
        self.command(
            &[
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
            ],
            args,
        )
        .output()
        .unwrap()
    }

    /// `drovectl --json ARGS`, which must succeed.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all);
        assert_ok(&out, &all);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    fn status(&self, instance: &str) -> Value {
        self.json(&["--instance", instance, "status"])
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn config(min: u32, max: u32, extra: &str) -> String {
    example_config(min, max, "", extra)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_ok(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "drovectl {args:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn assert_exit(out: &Output, code: i32, stderr_has: &[&str]) {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {err}",
        text(&out.stdout)
    );
    assert!(err.starts_with("drovectl: "), "{err}");
    for needle in stderr_has {
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
    }
}

/// A child process killed and reaped when the test ends, also on panic.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pids_of(list: &Value) -> BTreeSet<i32> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect()
}

#[test]
fn status_and_list_reflect_real_workers() {
    let bus = Bus::start();
    let d = bus.droved("web", 3, 3);
    let s = bus.status("web");
    assert_eq!(s["instance"], "web");
    assert_eq!(s["bus_name"], "org.drove.Drove1.web");
    assert_eq!(s["pid"].as_i64(), Some(d.pid() as i64));
    assert_eq!(s["phase"], "running");
    assert_eq!((s["ready"].as_u64(), s["min"].as_u64()), (Some(3), Some(3)));
    assert_eq!(
        s["listeners"][0]["address"],
        format!("127.0.0.1:{}", d.port)
    );

    let list = bus.json(&["--instance", "web", "list"]);
    let real: BTreeSet<i32> = d.workers().into_iter().collect();
    assert_eq!(pids_of(&list), real, "{list}");
    for w in list.as_array().unwrap() {
        assert_eq!(w["state"], "ready", "{w}");
        assert_eq!(w["generation"], 1);
        assert!(w["rss_bytes"].as_u64().unwrap() > 0, "{w}");
    }

    // The human forms: a systemctl-like summary and a table; the only
    // instance is the default.
    let out = bus.ctl(&["status"]);
    assert_ok(&out, &["status"]);
    let human = text(&out.stdout);
    assert!(
        human.starts_with("● drove instance \"web\": running"),
        "{human}"
    );
    // "3 ready (0 busy, 3 idle), 0 starting" once the busy count is known.
    assert!(
        human.contains("Workers: 3 ready") && human.contains(", 0 starting"),
        "{human}"
    );
    let out = bus.ctl(&["list"]);
    assert_ok(&out, &["list"]);
    let table = text(&out.stdout);
    assert_eq!(table.lines().count(), 4, "{table}");
    for pid in real {
        assert!(table.contains(&pid.to_string()), "{table}");
    }
}

#[test]
fn list_shows_the_template_apart_from_the_workers() {
    let bus = Bus::start();
    let mut d = bus
        .droved_builder("tpl", &config(2, 2, ""))
        .args(&["--mode", "template"])
        .start();
    d.wait_ready();
    let s = bus.status("tpl");
    assert_eq!(s["ready"].as_u64(), Some(2), "the template is not counted");
    let list = bus.json(&["--instance", "tpl", "list"]);
    let real: BTreeSet<i32> = d.workers().into_iter().collect();
    assert_eq!(real.len(), 3, "2 workers and the template");
    assert_eq!(pids_of(&list), real, "{list}");
    let rows = list.as_array().unwrap();
    let templates: Vec<&Value> = rows.iter().filter(|w| w["state"] == "template").collect();
    assert_eq!(templates.len(), 1, "{list}");
    assert!(templates[0]["slot"].is_null(), "no slot: {list}");
    assert_eq!(
        rows.iter().filter(|w| w["state"] == "ready").count(),
        2,
        "{list}"
    );
    let template = templates[0]["pid"].as_u64().unwrap();
    assert_eq!(
        s["template"],
        format!("ready (pid {template})"),
        "status names the template"
    );
    let out = bus.ctl(&["--instance", "tpl", "status"]);
    assert_ok(&out, &["status"]);
    let human = text(&out.stdout);
    assert!(
        human.contains(&format!("Template: ready (pid {template})")),
        "{human}"
    );
    let out = bus.ctl(&["list"]);
    assert_ok(&out, &["list"]);
    let table = text(&out.stdout);
    let line = table
        .lines()
        .find(|l| l.contains(" template "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.split_whitespace().nth(1) == Some("-"), "{line}");
}

#[test]
fn scale_changes_the_real_number_of_workers() {
    let bus = Bus::start();
    let d = bus.droved("scale", 2, 6);
    assert_eq!(d.workers().len(), 2);
    let out = bus.json(&["scale", "5"]);
    assert_eq!(out["target"], 5);
    eventually("5 workers", 10 * SEC, || {
        (d.workers().len() == 5 && bus.status("scale")["ready"] == 5).then_some(())
    });
    let out = bus.ctl(&["scale", "2"]);
    assert_ok(&out, &["scale", "2"]);
    assert_eq!(text(&out.stdout), "scale: target 2 workers\n");
    eventually("2 workers", 10 * SEC, || {
        (d.workers().len() == 2 && bus.status("scale")["ready"] == 2).then_some(())
    });
}

#[test]
fn limits_are_validated() {
    let bus = Bus::start();
    let d = bus.droved("limits", 2, 4);
    let bad = bus.ctl(&["limits", "3", "1"]);
    assert_exit(&bad, 1, &["min 3, max 1", "[org.drove.Error.OutOfRange]"]);
    let bad = bus.ctl(&["limits", "0", "0"]);
    assert_exit(&bad, 1, &["OutOfRange"]);
    let outside = bus.ctl(&["scale", "9"]);
    assert_exit(&outside, 1, &["9 is outside the limits 2..4", "OutOfRange"]);
    // Not a number: usage.
    assert_exit(&bus.ctl(&["scale", "many"]), 2, &[]);
    let s = bus.status("limits");
    assert_eq!((s["min"].as_u64(), s["max"].as_u64()), (Some(2), Some(4)));

    let ok = bus.json(&["limits", "3", "5"]);
    assert_eq!((ok["min"].as_u64(), ok["max"].as_u64()), (Some(3), Some(5)));
    eventually("min 3 applied", 10 * SEC, || {
        let s = bus.status("limits");
        (s["min"] == 3 && s["max"] == 5 && s["ready"] == 3 && d.workers().len() == 3).then_some(())
    });
}

/// After a rollout to `generation` answered: the ready workers are all new
/// and of that generation; the old ones (told to stop, maybe still
/// exiting) go. Returns the new pids.
fn rolled(
    bus: &Bus,
    d: &Droved,
    instance: &str,
    before: &BTreeSet<i32>,
    generation: u64,
) -> BTreeSet<i32> {
    let list = bus.json(&["--instance", instance, "list"]);
    let ready: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .collect();
    assert_eq!(ready.len(), 2, "{list}");
    let after: BTreeSet<i32> = ready
        .iter()
        .map(|w| {
            assert_eq!(w["generation"], generation, "{w}");
            w["pid"].as_i64().unwrap() as i32
        })
        .collect();
    assert!(after.is_disjoint(before), "{before:?} -> {after:?}");
    assert_eq!(bus.status(instance)["generation"], generation);
    eventually("only the new workers remain", 10 * SEC, || {
        (d.workers().into_iter().collect::<BTreeSet<_>>() == after).then_some(())
    });
    after
}

#[test]
fn reload_and_restart_workers() {
    let bus = Bus::start();
    let d = bus.droved("roll", 2, 2);
    let first: BTreeSet<i32> = d.workers().into_iter().collect();
    let s = bus.status("roll");
    assert_eq!(
        (s["generation"].as_u64(), s["reloads"].as_u64()),
        (Some(1), Some(0))
    );

    // Reload answers once the rolling restart it starts has finished.
    assert_eq!(bus.json(&["reload"])["ok"], true);
    assert_eq!(bus.status("roll")["reloads"], 1);
    let second = rolled(&bus, &d, "roll", &first, 2);

    // A broken config is rejected with the config error; nothing changes.
    let path = d.dir.join("drove.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("min = 2", "min = 7")).unwrap();
    assert_exit(
        &bus.ctl(&["reload"]),
        1,
        &[
            "reload rejected",
            "pool.min",
            "[org.drove.Error.ReloadRejected]",
        ],
    );
    std::fs::write(&path, good).unwrap();
    assert_eq!(d.workers().into_iter().collect::<BTreeSet<_>>(), second);
    assert_eq!(bus.status("roll")["generation"], 2);

    // restart-workers, likewise.
    assert_ok(&bus.ctl(&["restart-workers"]), &["restart-workers"]);
    rolled(&bus, &d, "roll", &second, 3);
}

#[test]
fn watch_prints_events_when_a_worker_is_killed() {
    let bus = Bus::start();
    let d = bus.droved("watched", 2, 2);
    let mut watch = Reaped(
        bus.command(&[], &["watch"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let stdout = watch.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_line = |what: &str, pred: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + 10 * SEC;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {what}; watch printed {seen:#?}"),
            }
        }
    };
    // The header comes after the subscriptions are in place.
    wait_line("the header", &|l| l.contains("watching \"watched\""));
    let victim = d.workers()[0];
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    // The exit, its replacement and the Status change (PropertiesChanged),
    // in whatever order the bus delivers them.
    let exited = format!("worker-exited pid={victim} ");
    let (mut got_exit, mut got_start, mut got_status) = (false, false, false);
    while !(got_exit && got_start && got_status) {
        let line = wait_line("the kill's events", &|_| true);
        if line.contains(&exited) {
            assert!(line.contains("SIGKILL"), "{line}");
            got_exit = true;
        }
        got_start |= got_exit && line.contains("worker-started pid=");
        got_status |= line.contains(" status: ");
    }
    // Ctrl-C ends it with status 0.
    kill(Pid::from_raw(watch.0.id() as i32), Signal::SIGINT).unwrap();
    let status = watch.0.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn unprivileged_callers_read_but_cannot_mutate() {
    let bus = Bus::start();
    let d = bus.droved("guarded", 2, 4);
    let out = bus.ctl_as_nobody(&["--json", "status"]);
    assert_ok(&out, &["status as nobody"]);
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["ready"], 2);
    assert_ok(&bus.ctl_as_nobody(&["list"]), &["list as nobody"]);

    let denied = bus.ctl_as_nobody(&["scale", "3"]);
    assert_exit(
        &denied,
        1,
        &[
            "access denied",
            "Scale(3) needs root",
            "uid 65534",
            "[org.drove.Error.AccessDenied]",
        ],
    );
    for verb in [&["limits", "1", "4"][..], &["reload"], &["restart-workers"]] {
        assert_exit(&bus.ctl_as_nobody(verb), 1, &["AccessDenied"]);
    }
    assert_eq!(bus.status("guarded")["target"], 2);
    assert_eq!(d.workers().len(), 2);
}

#[test]
fn control_group_members_may_mutate() {
    // nobody's primary group is nogroup: membership by the account
    // database, without touching /etc/group.
    let bus = Bus::start();
    let _d = bus.droved_with("grouped", &config(2, 4, "[control]\ngroup = \"nogroup\""));
    assert_eq!(bus.status("grouped")["control_group"], "nogroup");
    let out = bus.ctl_as_nobody(&["scale", "3"]);
    assert_ok(&out, &["scale 3 as nobody in nogroup"]);
    assert_eq!(bus.status("grouped")["target"], 3);
}

#[test]
fn instances_are_addressed_separately() {
    let bus = Bus::start();
    let a = bus.droved("alpha", 2, 3);
    // Any string is an instance name; it is escaped on the bus.
    let b = bus.droved("beta 2/ü", 3, 3);
    let sa = bus.status("alpha");
    let sb = bus.status("beta 2/ü");
    assert_eq!(sa["pid"].as_i64(), Some(a.pid() as i64));
    assert_eq!(sb["pid"].as_i64(), Some(b.pid() as i64));
    assert_eq!(sb["bus_name"], "org.drove.Drove1.beta_202_2f_c3_bc");
    assert_eq!(
        (sa["ready"].as_u64(), sb["ready"].as_u64()),
        (Some(2), Some(3))
    );

    let list = bus.json(&["list-instances"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta 2/ü"]);

    // Without --instance, two running instances are a usage error that
    // names both.
    assert_exit(
        &bus.ctl(&["status"]),
        2,
        &[
            "2 drove instances",
            "\"alpha\"",
            "\"beta 2/ü\"",
            "--instance",
        ],
    );
    // A mutation reaches only its instance.
    let b_pids: BTreeSet<i32> = b.workers().into_iter().collect();
    assert_eq!(
        bus.json(&["--instance", "alpha", "scale", "3"])["target"],
        3
    );
    eventually("alpha at 3", 10 * SEC, || {
        (a.workers().len() == 3).then_some(())
    });
    assert_eq!(bus.status("beta 2/ü")["target"], 3);
    assert_eq!(
        pids_of(&bus.json(&["--instance", "beta 2/ü", "list"])),
        b_pids
    );

    // The same instance name twice: the second droved refuses to start.
    let mut dup = bus.droved_builder("alpha", &config(1, 1, "")).start();
    let status = dup.wait_exit(10 * SEC);
    assert!(!status.success());
    assert!(dup.log().contains("already taken"), "{}", dup.log());
}

/// dbus-daemon restarts (an upgrade of the dbus package): droved takes
/// its name again, as systemd does, and drovectl reaches it over the bus;
/// the pool never noticed.
#[test]
fn droved_takes_its_name_again_when_the_bus_comes_back() {
    let mut bus = Bus::start();
    let mut d = bus.droved("rebus", 2, 2);
    let before = d.workers();
    assert_eq!(bus.status("rebus")["ready"], 2);
    bus.restart();
    d.wait_log("lost the session bus connection", 1, 10 * SEC);
    let status = eventually("drovectl reaches droved over the new bus", 15 * SEC, || {
        let out = bus.ctl(&["--json", "--instance", "rebus", "status"]);
        out.status
            .success()
            .then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
    });
    assert_eq!(status["pid"], d.pid());
    assert_eq!(status["ready"], 2);
    assert!(d.log().contains("on the session bus again"), "{}", d.log());
    assert_eq!(d.workers(), before, "the pool never noticed");
    assert!(d.try_exit().is_none());
    // And the control it offers is whole: a change over the new bus.
    assert_ok(
        &bus.ctl(&["--instance", "rebus", "restart-workers"]),
        &["restart-workers"],
    );
}

#[test]
fn instance_not_running_exits_3() {
    let bus = Bus::start();
    assert_exit(
        &bus.ctl(&["status"]),
        3,
        &["no drove instance is running on the session bus"],
    );
    let _d = bus.droved("present", 1, 1);
    assert_exit(
        &bus.ctl(&["--instance", "absent", "status"]),
        3,
        &["\"absent\" is not running", "org.drove.Drove1.absent"],
    );
    assert_exit(&bus.ctl(&["--instance", "absent", "scale", "1"]), 3, &[]);
    // No bus at all: the operation failed (1), not "not running".
    let out = Command::new(DROVECTL)
        .args(["--bus", "session", "status"])
        .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .output()
        .unwrap();
    assert_exit(&out, 1, &["cannot connect to the session bus"]);
}

#[test]
fn system_bus_policy_file_lets_root_own_and_anyone_call() {
    // Only packaging/dbus/org.drove.Drove1.conf opens this bus.
    let bus = Bus::start_system();
    let _d = bus.droved("sys", 2, 3);
    let out = bus.ctl_as_nobody(&["--json", "status"]);
    assert_ok(&out, &["status as nobody on the system bus"]);
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["bus_name"], "org.drove.Drove1.sys");
    assert_ok(&bus.ctl_as_nobody(&["list"]), &["list as nobody"]);
    // The bus lets the call through; droved denies it.
    assert_exit(
        &bus.ctl_as_nobody(&["scale", "3"]),
        1,
        &["[org.drove.Error.AccessDenied]"],
    );
    assert_eq!(bus.json(&["scale", "3"])["target"], 3);
    // A droved that is not root may not own a drove name there.
    let mut other = bus
        .droved_builder("intruder", &config(1, 1, ""))
        .launcher(&[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
        ])
        .start();
    let status = other.wait_exit(10 * SEC);
    assert!(!status.success());
    assert!(
        other
            .log()
            .contains("cannot take the name org.drove.Drove1.intruder"),
        "{}",
        other.log()
    );
}

/// Not asserted: prints drovectl status round-trip latency (a whole
/// process per call, as a script sees it) over 200 calls, with and
/// without --instance (the latter adds a ListNames call).
#[test]
fn status_latency_report() {
    let bus = Bus::start();
    let _d = bus.droved("latency", 2, 2);
    for args in [
        &["--instance", "latency", "status", "--json"][..],
        &["status", "--json"],
    ] {
        let mut times: Vec<Duration> = (0..200)
            .map(|_| {
                let t = Instant::now();
                let out = bus.ctl(args);
                let dt = t.elapsed();
                assert_ok(&out, args);
                dt
            })
            .collect();
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        eprintln!(
            "drovectl {} round trip over 200 calls: median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            args.join(" "),
            ms(times[100]),
            ms(times[197]),
            ms(times[199])
        );
    }
    // The bus round trip alone: one connection, GetAll as `status` does.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut times = rt.block_on(async {
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        let props = zbus::fdo::PropertiesProxy::builder(&conn)
            .destination(drove::bus::bus_name("latency").unwrap())
            .unwrap()
            .path(drove::bus::OBJECT_PATH)
            .unwrap()
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .unwrap();
        let iface = zbus::names::InterfaceName::from_static_str(drove::bus::INTERFACE).unwrap();
        let mut times = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            let all = props.get_all(iface.clone()).await.unwrap();
            times.push(t.elapsed());
            assert!(all.contains_key("Ready"));
        }
        times
    });
    times.sort();
    eprintln!(
        "GetAll round trip (one connection) over 200 calls: median {:.3} ms, p99 {:.3} ms",
        times[100].as_secs_f64() * 1000.0,
        times[197].as_secs_f64() * 1000.0
    );
}

#[test]
fn completions_and_usage_need_no_bus() {
    let run = |args: &[&str]| {
        Command::new(DROVECTL)
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
            .output()
            .unwrap()
    };
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert_ok(&out, &["completions", shell]);
        let script = text(&out.stdout);
        assert!(
            script.contains("restart-workers") && script.contains("list-instances"),
            "{shell}: {script}"
        );
    }
    assert_ok(&run(&["--help"]), &["--help"]);
    // A reader that goes away (`| head -1`) ends drovectl quietly.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(DROVECTL)
        .args(["completions", "bash"])
        .stdout(writer)
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(Signal::SIGPIPE as i32),
        "{:?}: {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(text(&out.stderr), "");
    assert_exit(&run(&["frobnicate"]), 2, &["frobnicate"]);
    assert_exit(&run(&["limits", "1"]), 2, &["MAX"]);
    assert_exit(&run(&["--bus", "sideways", "status"]), 2, &["sideways"]);
}

#[test]
fn default_bus_under_systemd_degrades_but_explicit_bus_is_fatal() {
    // INVOCATION_ID says "started by systemd": the system bus by default.
    // None reachable: droved logs it and serves anyway.
    // (As a service, root workers must be asked for: worker.allow_root.)
    let mut d = Droved::builder("dbus-default")
        .config(&config(1, 1, "").replace("[worker]", "[worker]\nallow_root = true"))
        .env("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
        .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .start();
    d.wait_ready();
    assert!(
        d.log().contains("running without D-Bus control"),
        "{}",
        d.log()
    );
    // Asked for explicitly: no start.
    let mut d = Droved::builder("dbus-explicit")
        .config(&config(1, 1, ""))
        .args(&["--bus", "system"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .start();
    assert!(!d.wait_exit(10 * SEC).success());
    assert!(
        d.log().contains("cannot connect to the system bus"),
        "{}",
        d.log()
    );
}

#[test]
fn upgrade_over_the_bus_keeps_pid_name_and_workers() {
    let bus = Bus::start();
    let mut d = bus.droved("up", 2, 2);
    let pid = d.pid();
    let workers = d.workers();
    let mut uptime = 0.0;
    for i in 1..=3u64 {
        // The answer comes before the exec.
        d.ready_again_after(&format!("READY=1 after upgrade {i}"), 20 * SEC, |_| {
            assert_eq!(bus.json(&["--instance", "up", "upgrade"])["ok"], true)
        });
        // The re-executed droved took its name again (it may still be
        // credited to the pre-exec connection for a moment).
        let s = eventually("the name is back", 10 * SEC, || {
            let out = bus.ctl(&["--json", "--instance", "up", "status"]);
            out.status
                .success()
                .then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
        });
        assert_eq!(s["pid"].as_i64(), Some(pid as i64));
        assert_eq!(s["upgrades"].as_u64(), Some(i), "{s}");
        let now = s["uptime_secs"]
            .as_f64()
            .or_else(|| s["uptime"].as_f64())
            .expect("uptime in status");
        assert!(
            now >= uptime,
            "uptime carries over an upgrade: {now} after {uptime}"
        );
        uptime = now;
    }
    assert_eq!(d.workers(), workers, "workers kept serving");
    assert!(!d.log().contains("running without D-Bus control"));
}

/// The new droved announces the upgrade once its bus is up (the event is
/// sent from run(), after front-ends subscribed).
#[test]
fn watch_sees_upgraded() {
    let bus = Bus::start();
    let mut d = bus.droved("upwatch", 1, 1);
    let mut watch = Reaped(
        bus.command(&[], &["--instance", "upwatch", "watch"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(watch.0.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().contains("watching"));
    d.ready_again_after("READY=1 after the upgrade", 20 * SEC, |_| {
        assert_eq!(bus.json(&["--instance", "upwatch", "upgrade"])["ok"], true)
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in lines {
            let _ = tx.send(line.unwrap());
        }
    });
    let deadline = Instant::now() + 10 * SEC;
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("upgraded version="))
    {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("no upgraded line: {seen:#?}"),
        }
    }
}

/// Issue 6's third series: 20 `drovectl restart-workers` in a row under a
/// 64-client load (the first two series, upgrades and reloads, are in
/// upgrade.rs): every call answers once its rollout finished, every
/// worker is replaced each time, no request fails, droved's pid stays.
#[test]
fn twenty_restart_workers_under_load_drop_nothing() {
    let bus = Bus::start();
    let d = bus.droved("restarts", 4, 4);
    let pid = d.pid();
    let load = Load::start(Target::Tcp(d.port), "/sleep?ms=5", 64, 120 * SEC);
    eventually("load flows", 10 * SEC, || (load.ok() > 50).then_some(()));
    let mut before: BTreeSet<i32> = d.workers().into_iter().collect();
    for i in 0..20u64 {
        assert_ok(
            &bus.ctl(&["--instance", "restarts", "restart-workers"]),
            &["restart-workers"],
        );
        let s = bus.status("restarts");
        assert_eq!(s["generation"].as_u64(), Some(i + 2), "{s}");
        let after = eventually("only the new generation remains", 20 * SEC, || {
            let now: BTreeSet<i32> = d.workers().into_iter().collect();
            (now.len() == 4 && now.is_disjoint(&before)).then_some(now)
        });
        before = after;
    }
    let ok = load.finish_clean();
    assert!(ok > 500, "the load ran: {ok}");
    assert_eq!(d.pid(), pid);
    eprintln!("20 restart-workers under load: {ok} requests, 0 failed");
}
