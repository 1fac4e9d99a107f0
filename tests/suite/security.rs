//! droved runs as root: what an unprivileged local user (`nobody`, via
//! setpriv) can and cannot make it do. Each test here reproduces an attack
//! or a misconfiguration a review found, against the real binaries.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::harness::*;

const SEC: Duration = Duration::from_secs(1);
const NOBODY: u32 = 65534;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `droved --check -c FILE` with `config` written to FILE.
fn check(dir: &Scratch, config: &str) -> Output {
    let path = dir.join("check.toml");
    std::fs::write(&path, config).unwrap();
    Command::new(DROVED)
        .arg("--check")
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Swaps `dir/app.sock` for a symlink to `target` whenever it is a socket,
/// as `nobody`, as fast as it can, until `dir/stop` appears; prints how
/// many swaps it made.
const RACER: &str = r#"
import os, stat, sys
d, target = sys.argv[1], sys.argv[2]
sock, tmp, stop = os.path.join(d, "app.sock"), os.path.join(d, "link"), os.path.join(d, "stop")
n = i = 0
while True:
    i += 1
    if i % 4096 == 0 and os.path.exists(stop):
        break
    try:
        if not stat.S_ISSOCK(os.lstat(sock).st_mode):
            continue
    except OSError:
        continue
    try:
        os.symlink(target, tmp)
    except FileExistsError:
        pass
    try:
        os.rename(tmp, sock)
        n += 1
    except OSError:
        pass
print(n, flush=True)
"#;

/// The RACER's stage: a directory owned by `nobody` (as /run/app may belong
/// to the app's user) where droved is to bind `app.sock`, a root-only file
/// that user would like to own, and the RACER running as `nobody` on them.
fn race(tag: &str) -> (Scratch, PathBuf, PathBuf, PathBuf, Racer) {
    let scratch = Scratch::new(tag);
    std::fs::set_permissions(&scratch.0, PermissionsExt::from_mode(0o755)).unwrap();
    let sockdir = scratch.join("run");
    std::fs::create_dir(&sockdir).unwrap();
    std::os::unix::fs::chown(&sockdir, Some(NOBODY), Some(NOBODY)).unwrap();
    let target = scratch.join("secret");
    std::fs::write(&target, b"root only").unwrap();
    std::fs::set_permissions(&target, PermissionsExt::from_mode(0o600)).unwrap();
    let sock = sockdir.join("app.sock");
    let racer = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            // Debian's python3: a user's own (pyenv) may be out of nobody's reach.
            "/usr/bin/python3",
            "-c",
            RACER,
        ])
        .arg(&sockdir)
        .arg(&target)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("setpriv and /usr/bin/python3 (tests/run installs them) must be installed");
    (scratch, sockdir, target, sock, Racer(Some(racer)))
}

/// The racing process, killed if the test ends early.
struct Racer(Option<std::process::Child>);

impl Drop for Racer {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_racing_user_cannot_aim_socket_chmod_and_chown_at_root_files() {
    let (_scratch, sockdir, target, sock, mut racer) = race("sock-race");

    let config = format!(
        r#"
[listen]
addresses = ["unix:{}"]
socket_mode = "0666"
socket_user = "nobody"
[worker]
command = ["{{worker}}"]
[pool]
min = 1
max = 1
"#,
        sock.display()
    );
    let unchanged = |what: &str| {
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (0, 0, 0o600),
            "{what}: the root-only file's owner or mode changed"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"root only");
    };
    let starts = 200;
    let began = Instant::now();
    for i in 0..starts {
        let _ = std::fs::remove_file(&sock);
        let mut d = Droved::builder("sock-race")
            .config(&config)
            .droved_binds()
            .start();
        d.wait_ready();
        unchanged(&format!("after start {i}"));
    }
    std::fs::write(sockdir.join("stop"), b"").unwrap();
    let child = racer.0.take().unwrap();
    let out = child.wait_with_output().unwrap();
    let swaps: u64 = text(&out.stdout).trim().parse().unwrap_or(0);
    eprintln!(
        "{starts} starts in {:?}; the racer swapped the socket {swaps} times",
        began.elapsed()
    );
    assert!(
        swaps >= starts / 2,
        "the racer must really have raced ({swaps} swaps in {starts} starts)"
    );
    unchanged("at the end");
}

#[test]
fn a_world_writable_socket_directory_without_sticky_bit_is_refused() {
    let scratch = Scratch::new("sock-dir");
    let open = scratch.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, PermissionsExt::from_mode(0o777)).unwrap();
    let mut d = Droved::builder("sock-dir")
        .droved_binds()
        .args(&[
            "-l",
            &format!("unix:{}/app.sock", open.display()),
            "-w",
            "1",
        ])
        .args(&["--", "{worker}"])
        .start();
    let status = d.wait_exit(10 * SEC);
    assert!(!status.success());
    let log = d.log();
    assert!(
        log.contains(&format!(
            "socket directory {} has mode 0777",
            open.display()
        )),
        "{log}"
    );
    assert!(!open.join("app.sock").exists());
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0, "nothing left");
}

#[test]
fn socket_user_and_group_take_numeric_ids_and_check_refuses_unknown_ones() {
    let scratch = Scratch::new("sock-owner");
    let sock = scratch.join("app.sock");
    let config = |user: &str, group: &str| {
        format!(
            r#"
[listen]
addresses = ["unix:{}"]
socket_user = "{user}"
socket_group = "{group}"
[worker]
command = ["{}"]
"#,
            sock.display(),
            example_worker().display()
        )
    };
    // What --check accepts, start-up accepts: numeric ids like names.
    let ok = config("65534", "65534");
    let out = check(&scratch, &ok);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut d = Droved::builder("sock-owner")
        .droved_binds()
        .config(&ok.replace(&example_worker().display().to_string(), "{worker}"))
        .start();
    d.wait_ready();
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));
    drop(d);

    // What start-up would refuse, --check refuses, naming the key.
    for (user, group, key) in [
        ("no-such-user-drove", "0", "listen.socket_user"),
        ("0", "no-such-group-drove", "listen.socket_group"),
        ("4000000000", "0", "listen.socket_user"),
    ] {
        let out = check(&scratch, &config(user, group));
        let err = text(&out.stderr);
        assert!(!out.status.success(), "--check accepted {user}:{group}");
        assert!(err.contains(key), "{err}");
    }
    let bad_worker = format!(
        "[worker]\ncommand = [\"{}\"]\nuser = \"no-such-user-drove\"\n",
        example_worker().display()
    );
    let out = check(&scratch, &bad_worker);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no such user: no-such-user-drove"),
        "{}",
        text(&out.stderr)
    );
}

/// A private session-style bus anyone may use (so `nobody` can call);
/// drove's own check is what denies. (A copy of dbus.rs's, trimmed.)
struct PrivateBus {
    child: std::process::Child,
    dir: Scratch,
    address: String,
}

impl PrivateBus {
    fn start() -> PrivateBus {
        use std::io::BufRead;
        let dir = Scratch::new("sec-bus");
        std::fs::set_permissions(&dir.0, PermissionsExt::from_mode(0o755)).unwrap();
        let config = dir.join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                dir.0.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address=1", "--nosyslog"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("bus.log")).unwrap())
            .spawn()
            .expect("dbus-daemon (Debian package dbus) must be installed");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("unix:"), "dbus-daemon: {line:?}");
        PrivateBus {
            child,
            dir,
            address: line.trim().to_string(),
        }
    }

    fn droved(&self, instance: &str, config: &str) -> Droved {
        self.droved_from(Droved::builder(instance), instance, config)
    }

    /// Like `droved`, from a builder the caller set up (e.g. droved_binds).
    fn droved_from(&self, builder: Builder, instance: &str, config: &str) -> Droved {
        let mut d = builder
            .config(config)
            .args(&["--bus", "session", "--instance", instance])
            .env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .start();
        d.wait_ready();
        d
    }

    /// drovectl as root, or as nobody:nogroup without other groups.
    fn ctl(&self, as_nobody: bool, args: &[&str]) -> Output {
        let mut argv: Vec<&str> = if as_nobody {
            vec![
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
            ]
        } else {
            vec![]
        };
        argv.push(env!("CARGO_BIN_EXE_drovectl"));
        Command::new(argv[0])
            .args(&argv[1..])
            .args(["--bus", "session"])
            .args(args)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn socket_path(&self) -> std::path::PathBuf {
        self.dir.join("bus.sock")
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal D-Bus client (stdlib Python, so it runs as nobody): connects,
/// says Hello, then makes COUNT calls of Scale(3) to DEST, pipelined in
/// batches, and prints "<replies> <errors> <seconds>".
const FLOOD: &str = r#"
import os, socket, struct, sys, time
path, dest, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
def pad(b, n): return b + b"\0" * ((-len(b)) % n)
def field(buf, code, sig, val):
    buf = pad(buf, 8) + bytes([code, 1]) + sig.encode() + b"\0"
    v = val.encode()
    if sig in "os":
        return pad(buf, 4) + struct.pack("<I", len(v)) + v + b"\0"
    return buf + bytes([len(v)]) + v + b"\0"
def call(serial, path, iface, member, dest, sig="", body=b""):
    f = field(b"", 1, "o", path)
    f = field(f, 2, "s", iface)
    f = field(f, 3, "s", member)
    f = field(f, 6, "s", dest)
    if sig:
        f = field(f, 8, "g", sig)
    head = struct.pack("<cBBBIII", b"l", 1, 0, 1, len(body), serial, len(f)) + f
    return pad(head, 8) + body
s = socket.socket(socket.AF_UNIX)
s.connect(path)
s.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
assert s.recv(4096).startswith(b"OK"), "auth"
s.sendall(b"BEGIN\r\n")
buf = b""
def read_replies(n):
    global buf
    errors = got = 0
    while got < n:
        while len(buf) < 16 or len(buf) < 16 + (-(-struct.unpack_from("<I", buf, 12)[0] // 8) * 8) + struct.unpack_from("<I", buf, 4)[0]:
            chunk = s.recv(65536)
            assert chunk, "bus closed"
            buf += chunk
        total = 16 + (-(-struct.unpack_from("<I", buf, 12)[0] // 8) * 8) + struct.unpack_from("<I", buf, 4)[0]
        kind = buf[1]
        buf = buf[total:]
        if kind in (2, 3):
            got += 1
            errors += kind == 3
    return errors
s.sendall(call(1, "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello", "org.freedesktop.DBus"))
read_replies(1)
start = time.monotonic()
serial, done, errors, batch = 2, 0, 0, 100
while done < count:
    n = min(batch, count - done)
    s.sendall(b"".join(call(serial + i, "/org/drove/Drove1", "org.drove.Drove1", "Scale", dest, "u", struct.pack("<I", 3)) for i in range(n)))
    serial += n
    errors += read_replies(n)
    done += n
print(done, errors, round(time.monotonic() - start, 3), flush=True)
"#;

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn ten_thousand_denied_calls_log_a_few_lines_and_droved_stays_responsive() {
    let bus = PrivateBus::start();
    // A control.group nobody is not in: each denial needs the membership
    // answer, which must come from the cache, not NSS every time.
    let d = bus.droved(
        "flood",
        r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = ["{worker}"]
ready = "notify"
[pool]
min = 1
max = 4
[control]
group = "root"
"#,
    );
    let denied_lines = |d: &Droved| d.log_count("denied");
    let before = denied_lines(&d);
    let cpu_before = cpu_ticks(d.pid());

    let mut flood = Command::new("setpriv");
    flood
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            FLOOD,
        ])
        .arg(bus.socket_path())
        .args(["org.drove.Drove1.flood", "10000"])
        .stdin(Stdio::null());
    let flood = std::thread::spawn(move || flood.output().unwrap());
    // Meanwhile root's status calls keep being answered promptly.
    let deadline = Instant::now() + 60 * SEC;
    let mut worst = Duration::ZERO;
    let mut asked = 0;
    while asked < 3 || !flood.is_finished() {
        assert!(Instant::now() < deadline, "the flood took over a minute");
        let t = Instant::now();
        let out = bus.ctl(false, &["--instance", "flood", "--json", "status"]);
        worst = worst.max(t.elapsed());
        asked += 1;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let flood = flood.join().unwrap();
    let cpu = cpu_ticks(d.pid()) - cpu_before;
    let report = text(&flood.stdout);
    assert!(
        flood.status.success(),
        "flood client: {}",
        text(&flood.stderr)
    );
    let fields: Vec<&str> = report.split_whitespace().collect();
    assert_eq!(
        fields[..2],
        ["10000", "10000"],
        "every call denied: {report}"
    );
    let lines = denied_lines(&d) - before;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as f64;
    eprintln!(
        "10000 denied calls in {}s; {lines} log lines; droved used {:.2}s of CPU; \
         {asked} status calls meanwhile, the slowest {worst:?}",
        fields[2],
        cpu as f64 / ticks
    );
    assert!(
        lines <= 3,
        "denials are logged once per uid per window, with a count: {lines} lines\n{}",
        d.log()
    );
    assert!(worst < 2 * SEC, "status took {worst:?} during the flood");
    // The one line says who, and that the rest are counted.
    let log = d.log();
    let line = log.lines().find(|l| l.contains("denied")).unwrap();
    assert!(line.contains("by uid 65534"), "{line}");
    assert!(line.contains("counted"), "{line}");
    // Still in charge: root's calls work, nobody's still fail.
    assert!(
        bus.ctl(false, &["--instance", "flood", "scale", "2"])
            .status
            .success()
    );
    assert!(
        !bus.ctl(true, &["--instance", "flood", "scale", "3"])
            .status
            .success()
    );
}

/// Opens the FIFO `path` for writing once a reader has it open (polling,
/// so the wait has a deadline), runs `before`, then writes `text` and
/// closes: one reader gets one whole config file.
fn serve_fifo(path: &std::path::Path, text: &str, before: impl FnOnce(), timeout: Duration) {
    use std::os::unix::fs::OpenOptionsExt;
    let deadline = Instant::now() + timeout;
    let mut file = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                assert!(Instant::now() < deadline, "nobody read {}", path.display());
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{}: {e}", path.display()),
        }
    };
    before();
    std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
}

#[test]
fn an_upgrade_execs_the_very_binary_its_preflight_checked() {
    let dir = Scratch::new("upgrade-swap");
    let binary = dir.join("droved");
    droved_build(&binary, "old");
    // The config is a FIFO: each reader (droved, its preflight, the new
    // image) blocks until the test serves it, so the test can act exactly
    // while the preflight runs.
    let fifo = dir.join("drove.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let config = format!(
        "[worker]\ncommand = [\"{}\"]\nready = \"notify\"\n[pool]\nmin = 2\nmax = 2\n",
        example_worker().display()
    );
    let fifo_arg = fifo.display().to_string();
    let mut d = Droved::builder("upgrade-swap")
        .binary(&binary)
        .args(&["-c", &fifo_arg, "-l", "127.0.0.1:{port}"])
        .start();
    serve_fifo(&fifo, &config, || {}, 20 * SEC);
    d.wait_ready();
    let workers = d.workers();

    droved_build(&binary, "checked");
    d.signal(nix::sys::signal::Signal::SIGUSR2);
    // The preflight of "checked" is reading its config: a package manager
    // replaces the binary now, before droved execs.
    serve_fifo(
        &fifo,
        &config,
        || droved_build(&binary, "swapped"),
        20 * SEC,
    );
    // The new image reads the config as it starts (once the preflight's
    // reader is gone: the exec comes after it).
    d.wait_log("event=\"upgrade-exec\"", 1, 20 * SEC);
    serve_fifo(&fifo, &config, || {}, 20 * SEC);
    eventually("the upgraded image took over", 20 * SEC, || {
        d.log().contains(" took over 2 workers").then_some(())
    });
    let log = d.log();
    assert!(
        log.contains("droved 0.1.0 (checked) took over 2 workers"),
        "the checked image runs:\n{log}"
    );
    assert!(!log.contains("(swapped) took over"), "{log}");
    assert_eq!(d.workers(), workers);

    // The next upgrade looks at the path again, and finds "swapped".
    d.signal(nix::sys::signal::Signal::SIGUSR2);
    serve_fifo(&fifo, &config, || {}, 20 * SEC);
    d.wait_log("event=\"upgrade-exec\"", 2, 20 * SEC);
    serve_fifo(&fifo, &config, || {}, 20 * SEC);
    eventually("the next upgrade took over", 20 * SEC, || {
        d.log()
            .contains("droved 0.1.0 (swapped) took over 2 workers")
            .then_some(())
    });
}

/// Real uid of a process, from /proc.
fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

const ROOT_POOL: &str = r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = ["{worker}"]
[pool]
min = 1
max = 1
"#;

#[test]
fn as_a_service_droved_refuses_root_workers_unless_the_config_allows_them() {
    // systemd sets INVOCATION_ID for the units it starts.
    let service = |tag: &str, config: &str| {
        Droved::builder(tag)
            .config(config)
            .args(&["--bus", "none"])
            .env("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
            .start()
    };
    let mut d = service("root-refused", ROOT_POOL);
    assert!(!d.wait_exit(10 * SEC).success());
    let log = d.log();
    assert!(
        log.contains("workers would run as root: set worker.user"),
        "{log}"
    );
    assert!(d.workers().is_empty());

    let mut d = service(
        "root-allowed",
        &ROOT_POOL.replace("[pool]", "allow_root = true\n[pool]"),
    );
    d.wait_ready();
    assert_eq!(uid_of(d.workers()[0]), 0);
    assert!(
        d.log()
            .contains("workers run as root (worker.allow_root = true)"),
        "{}",
        d.log()
    );
    drop(d);

    let mut d = service(
        "root-nobody",
        &ROOT_POOL.replace("[pool]", "user = \"nobody\"\n[pool]"),
    );
    d.wait_ready();
    assert_eq!(uid_of(d.workers()[0]), NOBODY);
    assert!(!d.log().contains("run as root"), "{}", d.log());
    drop(d);

    // Run by hand (no INVOCATION_ID), root workers start with a warning.
    let mut d = Droved::builder("root-by-hand").config(ROOT_POOL).start();
    d.wait_ready();
    assert!(
        d.log()
            .contains("workers run as root because worker.user is not set"),
        "{}",
        d.log()
    );

    // --check says what start-up would refuse, and warns like start-up.
    let scratch = Scratch::new("root-check");
    let config = format!("[worker]\ncommand = [\"{}\"]\n", example_worker().display());
    let path = scratch.join("c.toml");
    std::fs::write(&path, &config).unwrap();
    let run_check = |invocation: Option<&str>| {
        let mut cmd = Command::new(DROVED);
        cmd.arg("--check")
            .arg("-c")
            .arg(&path)
            .env_remove("INVOCATION_ID");
        if let Some(id) = invocation {
            cmd.env("INVOCATION_ID", id);
        }
        cmd.output().unwrap()
    };
    let out = run_check(Some("x"));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("workers would run as root"));
    let out = run_check(None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("warning: workers run as root"));
    // group without user.
    let out = check(&scratch, &format!("{config}group = \"nogroup\"\n"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("worker.group needs worker.user"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_config_file_others_may_write_is_refused_naming_file_and_mode() {
    let scratch = Scratch::new("config-mode");
    let path = scratch.join("drove.toml");
    std::fs::write(
        &path,
        format!(
            "[worker]\ncommand = [\"{}\"]\nuser = \"nobody\"\n",
            example_worker().display()
        ),
    )
    .unwrap();
    let run = || {
        Command::new(DROVED)
            .arg("--check")
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap()
    };
    assert!(run().status.success(), "{}", text(&run().stderr));
    for (mode, owner, why) in [
        (0o666, 0, "every user may write to it"),
        (0o664, NOBODY, "it belongs to another user"),
    ] {
        std::fs::set_permissions(&path, PermissionsExt::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&path, Some(owner), Some(0)).unwrap();
        let out = run();
        let err = text(&out.stderr);
        assert!(
            !out.status.success(),
            "mode {mode:o} owner {owner} accepted"
        );
        assert!(
            err.contains(&format!(
                "the file {} has owner uid {owner}",
                path.display()
            )) && err.contains(&format!("mode {mode:04o}"))
                && err.contains(why),
            "{err}"
        );
    }
    // Root's file in a directory anyone may write to: refused too.
    std::fs::set_permissions(&path, PermissionsExt::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&path, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&scratch.0, PermissionsExt::from_mode(0o777)).unwrap();
    let err = text(&run().stderr);
    assert!(
        err.contains(&format!("its directory {} has", scratch.0.display()))
            && err.contains("mode 0777"),
        "{err}"
    );
    std::fs::set_permissions(&scratch.0, PermissionsExt::from_mode(0o755)).unwrap();
    assert!(run().status.success());
}

#[test]
fn a_reload_error_sent_over_the_bus_names_key_and_line_but_not_the_value() {
    let bus = PrivateBus::start();
    let mut d = bus.droved(
        "redact",
        "[listen]\naddresses = [\"127.0.0.1:{port}\"]\n[worker]\ncommand = [\"{worker}\"]\n",
    );
    let good = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(
        d.config_path(),
        good.replace("[worker]\n", "[worker]\nready = \"hunter2-secret\"\n"),
    )
    .unwrap();
    let out = bus.ctl(false, &["--instance", "redact", "reload"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("{}:4:9:", d.config_path().display()))
            && err.contains("invalid worker.ready"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    // droved's own journal has the whole message.
    d.wait_log("hunter2-secret", 1, 10 * SEC);
}

#[test]
fn workers_get_a_built_environment_not_droveds() {
    let mut d = Droved::builder("env")
        .config(
            r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = ["{worker}"]
user = "nobody"
environment = { RELEASE = "7" }
inherit_environment = ["HTTP_PROXY"]
[pool]
min = 1
max = 1
"#,
        )
        .env("DB_PASSWORD", "hunter2")
        .env(
            "CREDENTIALS_DIRECTORY",
            "/run/credentials/drove@app.service",
        )
        .env("HTTP_PROXY", "http://proxy.invalid:3128")
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("TZ", "UTC")
        .start();
    d.wait_ready();
    let worker = d.workers()[0];
    let env = environ(worker);
    let get = |k: &str| {
        env.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    for secret in ["DB_PASSWORD", "CREDENTIALS_DIRECTORY", "DROVE_LOG"] {
        assert_eq!(get(secret), None, "{secret} reached the worker: {env:?}");
    }
    let raw = std::fs::read(format!("/proc/{worker}/environ")).unwrap();
    assert!(
        !raw.windows(7).any(|w| w == b"hunter2"),
        "the secret is in the worker's /proc/PID/environ"
    );
    assert_eq!(get("HOME"), Some("/nonexistent"), "nobody's home: {env:?}");
    assert_eq!(get("USER"), Some("nobody"));
    assert_eq!(get("LOGNAME"), Some("nobody"));
    assert_eq!(get("SHELL"), Some("/usr/sbin/nologin"));
    assert_eq!(get("HTTP_PROXY"), Some("http://proxy.invalid:3128"));
    assert_eq!(get("LANG"), Some("C.UTF-8"));
    assert_eq!(get("TZ"), Some("UTC"));
    assert_eq!(get("RELEASE"), Some("7"));
    assert!(get("PATH").is_some());
    assert_eq!(get("LISTEN_FDS"), Some("1"));
    assert!(get("NOTIFY_SOCKET").is_some());
    assert!(d.get("/").is_ok(), "the worker serves");
}

#[test]
fn a_control_group_member_cannot_set_limits_beyond_the_config() {
    let bus = PrivateBus::start();
    let _d = bus.droved(
        "limits",
        r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = ["{worker}"]
ready = "notify"
[pool]
min = 2
max = 4
[control]
group = "nogroup"
"#,
    );
    let at = |as_nobody: bool, args: &[&str]| {
        let mut all = vec!["--instance", "limits"];
        all.extend_from_slice(args);
        bus.ctl(as_nobody, &all)
    };
    // nobody is in nogroup: may act, within the file's 2..4.
    let out = at(true, &["limits", "2", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (min, max) in [("1", "4096"), ("2", "5"), ("1", "4")] {
        let out = at(true, &["limits", min, max]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{min}..{max}: {err}");
        assert!(
            err.contains(&format!(
                "limits {min}..{max} go beyond the configuration's 2..4"
            )) && err.contains("only root may set those"),
            "{err}"
        );
    }
    let status: serde_json::Value =
        serde_json::from_slice(&at(false, &["--json", "status"]).stdout).unwrap();
    assert_eq!(
        (status["min"].as_u64(), status["max"].as_u64()),
        (Some(2), Some(3))
    );
    // Root may.
    let out = at(false, &["limits", "1", "8"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn a_unix_socket_keeps_its_reported_address_across_an_upgrade() {
    let bus = PrivateBus::start();
    let scratch = Scratch::new("sock-upgrade");
    let sock = scratch.join("app.sock");
    let mut d = bus.droved_from(
        Droved::builder("sockup").droved_binds(),
        "sockup",
        &format!(
            "[listen]\naddresses = [\"unix:{}\"]\n[worker]\ncommand = [\"{{worker}}\"]\n",
            sock.display()
        ),
    );
    let address = |bus: &PrivateBus| {
        let out = bus.ctl(false, &["--instance", "sockup", "--json", "status"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        s["listeners"][0]["address"].as_str().unwrap().to_string()
    };
    let want = format!("unix:{}", sock.display());
    assert_eq!(address(&bus), want);
    d.ready_again_after("READY=1 after the upgrade", 20 * SEC, |d| {
        d.signal(nix::sys::signal::Signal::SIGUSR2)
    });
    eventually("the upgraded droved answers", 10 * SEC, || {
        let out = bus.ctl(false, &["--instance", "sockup", "--json", "status"]);
        out.status.success().then_some(())
    });
    // bind_unix binds through /proc/self/fd/N (getsockname says so); the
    // handed-over address is the configured path.
    assert_eq!(address(&bus), want);
    assert!(http_get_unix(&sock, "/").is_ok());
}

/// A template that says hello, then answers every spawn with an `error`
/// whose text carries more sd_notify assignments and a terminal escape.
const HOSTILE_TEMPLATE: &str = r#"
import os, socket, sys
s = socket.socket(fileno=int(os.environ["DROVE_TEMPLATE_FD"]))
s.send(b"DROVE-TEMPLATE 1")
while True:
    if not s.recv(512):
        sys.exit(0)
    s.send(b"error boom\nMAINPID=1\nWATCHDOG_USEC=1\r\nSTATUS=owned\x1b[2J\xe2\x80\xa8READY=1")
"#;

#[test]
fn a_templates_error_text_cannot_add_lines_to_droveds_status_for_systemd() {
    let bus = PrivateBus::start();
    let scratch = Scratch::new("hostile-text");
    let script = scratch.join("template.py");
    std::fs::write(&script, HOSTILE_TEMPLATE).unwrap();
    let config = format!(
        r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
mode = "template"
command = ["/usr/bin/python3", "{}"]
[pool]
min = 1
max = 1
"#,
        script.display()
    );
    let mut d = Droved::builder("hostile-text")
        .config(&config)
        .args(&["--bus", "session", "--instance", "hostile-text"])
        .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
        .start();
    // Three failed forks make the pool "failing": the text is in STATUS=.
    d.wait_for(
        "STATUS= says FAILING with the template's text",
        60 * SEC,
        |u| {
            u.statuses
                .iter()
                .any(|s| s.contains("FAILING") && s.contains("boom"))
        },
    );
    let up = d.upward();
    for datagram in &up.datagrams {
        for line in datagram.split(['\n', '\r']) {
            let key = line.split_once('=').map_or(line, |(k, _)| k);
            assert!(
                [
                    "STATUS",
                    "READY",
                    "RELOADING",
                    "STOPPING",
                    "WATCHDOG",
                    "MONOTONIC_USEC"
                ]
                .contains(&key),
                "droved sent systemd a line {line:?} in {datagram:?}"
            );
        }
        assert!(
            !datagram.contains(['\x1b', '\u{2028}']),
            "control text in {datagram:?}"
        );
    }
    assert!(
        up.datagrams
            .iter()
            .all(|d| d.matches("READY=1").count() <= 1),
        "{:?}",
        up.datagrams
    );
    // The same text over D-Bus (the Failure property) and in drovectl.
    let out = bus.ctl(true, &["--instance", "hostile-text", "--json", "status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failure = s["failure"].as_str().unwrap_or_default().to_string();
    assert!(failure.contains("boom"), "{s}");
    assert!(
        !failure.chars().any(|c| c.is_control() || c == '\u{2028}'),
        "Failure property {failure:?}"
    );
    assert!(failure.chars().count() <= 300, "{failure:?}");
    let out = bus.ctl(true, &["--instance", "hostile-text", "status"]);
    let shown = text(&out.stdout);
    assert!(shown.contains("boom"), "{shown}");
    assert!(
        !shown.lines().any(|l| l.starts_with("MAINPID=")
            || l.starts_with("WATCHDOG_USEC=")
            || l.starts_with("STATUS="))
            && !shown.contains('\x1b'),
        "drovectl status shows {shown:?}"
    );
}

#[test]
fn a_racing_user_cannot_aim_the_metrics_sockets_chmod_at_root_files() {
    let (_scratch, sockdir, target, sock, mut racer) = race("metrics-race");
    let config = format!(
        r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
command = ["{{worker}}"]
[pool]
min = 1
max = 1
[metrics]
listen = "unix:{}"
"#,
        sock.display()
    );
    let unchanged = |what: &str| {
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (0, 0, 0o600),
            "{what}: the root-only file's owner or mode changed"
        );
    };
    let starts = 150;
    let began = Instant::now();
    let mut served = 0;
    for i in 0..starts {
        let _ = std::fs::remove_file(&sock);
        let mut d = Droved::builder("metrics-race").config(&config).start();
        d.wait_ready();
        unchanged(&format!("after start {i}"));
        // The socket is where it was asked for, as a socket, unless the
        // racer has swapped it already.
        if http_get_unix(&sock, "/metrics").is_ok() {
            served += 1;
        }
    }
    std::fs::write(sockdir.join("stop"), b"").unwrap();
    let out = racer.0.take().unwrap().wait_with_output().unwrap();
    let swaps: u64 = text(&out.stdout).trim().parse().unwrap_or(0);
    eprintln!(
        "{starts} starts in {:?}; the racer swapped the metrics socket {swaps} times; {served} scrapes through it",
        began.elapsed()
    );
    assert!(
        swaps >= starts / 2,
        "the racer must really have raced ({swaps} swaps in {starts} starts)"
    );
    unchanged("at the end");
}

/// A template-mode pool whose template, run as `nobody`, is `script`
/// (Python, in a directory `nobody` may write to); `min = max = 1`.
fn hostile_template(tag: &str, script: &str) -> (Droved, Scratch) {
    let dir = Scratch::new(tag);
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let path = dir.join("template.py");
    std::fs::write(&path, script).unwrap();
    let d = Droved::builder(tag)
        .config(&format!(
            r#"
[listen]
addresses = ["127.0.0.1:{{port}}"]
[worker]
mode = "template"
command = ["/usr/bin/python3", "{}"]
user = "nobody"
ready = "exec"
ready_timeout = "10s"
stop_timeout = "3s"
[pool]
min = 1
max = 1
"#,
            path.display()
        ))
        .start();
    (d, dir)
}

/// The pids droved logged as `key=` on lines with `event="event"`.
fn logged_pids(d: &Droved, event: &str, key: &str) -> Vec<i32> {
    d.log()
        .lines()
        .filter(|l| l.contains(&format!("event=\"{event}\"")))
        .filter_map(|l| {
            l.split(&format!("{key}="))
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn a_template_answering_its_own_pid_is_killed_and_never_becomes_a_worker() {
    // It is droved's child, so "is it droved's child?" let it through: its
    // exit was booked as a worker's, droved signalled its pid after reaping
    // it, and never finished stopping (it waited for the ghost template).
    let (mut d, _dir) = hostile_template(
        "tpl-own-pid",
        r#"
import os, socket, sys
s = socket.socket(fileno=int(os.environ["DROVE_TEMPLATE_FD"]))
s.send(b"DROVE-TEMPLATE 1")
while True:
    if not s.recv(512):
        sys.exit(0)
    s.send(("pid %d" % os.getpid()).encode())
"#,
    );
    d.wait_log("killing template", 1, 20 * SEC);
    let log = d.log();
    assert!(log.contains("it answered the pid of a template"), "{log}");
    assert_eq!(d.log_count("event=\"started\""), 0, "{log}");
    // A second template is started and refused the same way.
    d.wait_log("killing template", 2, 30 * SEC);
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let status = d.wait_exit(20 * SEC);
    assert!(status.success(), "{status:?}\n{}", d.log());
    for t in logged_pids(&d, "template-started", "template_pid") {
        assert!(!alive(t), "template {t} outlived droved");
    }
    assert_eq!(d.log_count("event=\"started\""), 0, "{}", d.log());
}

#[test]
fn a_template_answering_another_generations_template_is_killed() {
    // Generation 1 forks a real worker, then lingers after droved is done
    // with it (ignores SIGTERM and end of file); generation 2 names it.
    let (mut d, dir) = hostile_template(
        "tpl-other-gen",
        r#"
import os, signal, socket, sys, time
here = os.path.dirname(os.path.abspath(__file__))
gen = os.environ["DROVE_GENERATION"]
s = socket.socket(fileno=int(os.environ["DROVE_TEMPLATE_FD"]))
signal.signal(signal.SIGTERM, signal.SIG_IGN)
droved = os.getppid()
with open(os.path.join(here, "template-" + gen + ".new"), "w") as f:
    f.write(str(os.getpid()))
os.rename(os.path.join(here, "template-" + gen + ".new"), os.path.join(here, "template-" + gen))
s.send(b"DROVE-TEMPLATE 1")
while True:
    if not s.recv(512):
        while os.getppid() == droved:
            time.sleep(0.1)
        sys.exit(0)
    if gen != "1":
        s.send(("pid " + open(os.path.join(here, "template-1")).read()).encode())
        continue
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        worker = os.fork()
        if worker == 0:
            s.close()
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
    );
    d.wait_ready();
    let first: i32 = std::fs::read_to_string(dir.join("template-1"))
        .unwrap()
        .parse()
        .unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_log("killing template", 1, 20 * SEC);
    let log = d.log();
    assert!(log.contains("it answered the pid of a template"), "{log}");
    let started = logged_pids(&d, "started", "worker_pid");
    assert!(!started.contains(&first), "template {first} adopted\n{log}");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let status = d.wait_exit(30 * SEC);
    assert!(status.success(), "{status:?}\n{}", d.log());
}
