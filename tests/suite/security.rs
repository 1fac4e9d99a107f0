//! droved runs as root: what an unprivileged local user (`nobody`, via
//! setpriv) can and cannot make it do. Each test here reproduces an attack
//! or a misconfiguration a review found, against the real binaries.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
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

#[test]
fn a_racing_user_cannot_aim_socket_chmod_and_chown_at_root_files() {
    let scratch = Scratch::new("sock-race");
    std::fs::set_permissions(&scratch.0, PermissionsExt::from_mode(0o755)).unwrap();
    // The socket's directory belongs to the unprivileged user, as /run/app
    // may belong to the app's user.
    let sockdir = scratch.join("run");
    std::fs::create_dir(&sockdir).unwrap();
    std::os::unix::fs::chown(&sockdir, Some(NOBODY), Some(NOBODY)).unwrap();
    // A root-only file that user would like to own.
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
    struct Racer(Option<std::process::Child>);
    impl Drop for Racer {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut racer = Racer(Some(racer));

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
        let mut d = Droved::builder("sock-race").config(&config).start();
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
