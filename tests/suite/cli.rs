//! droved's one-shot command-line modes (`--check`, `--preflight`) as a
//! shell runs them: in pipelines whose reader may go away.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use nix::sys::signal::Signal;

use super::harness::*;

const SEC: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs droved with `args` and its stdout a pipe whose read end is already
/// closed, as in `droved --check -c ok.toml | true`.
fn run_into_closed_pipe(args: &[&str], config: &std::path::Path) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(DROVED)
        .args(args)
        .arg("-c")
        .arg(config)
        .stdout(writer)
        .output()
        .unwrap()
}

#[test]
fn check_and_preflight_end_quietly_when_the_reader_is_gone() {
    let dir = Scratch::new("cli-epipe");
    let config = dir.join("ok.toml");
    std::fs::write(
        &config,
        "[listen]\naddresses = [\"127.0.0.1:8080\"]\n[worker]\ncommand = \"true\"\n",
    )
    .unwrap();
    for mode in ["--check", "--preflight"] {
        let out = run_into_closed_pipe(&[mode], &config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Like cat or drovectl: SIGPIPE ends it, with nothing on stderr
        // (a panic would exit 101 with "failed printing to stdout").
        assert_eq!(
            out.status.signal(),
            Some(Signal::SIGPIPE as i32),
            "{mode}: {:?}: {stderr}",
            out.status
        );
        assert_eq!(stderr, "", "{mode}");
    }
    // With a reader, both still print and succeed.
    for mode in ["--check", "--preflight"] {
        let out = Command::new(DROVED)
            .args([mode, "-c"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{mode}: {out:?}");
        assert!(!out.stdout.is_empty(), "{mode} printed nothing");
    }
}

/// `--ready notify` overrides `worker.ready`: a worker that never sends
/// READY=1 is then killed for not being ready in time, where the config's
/// `ready = "exec"` alone would count it ready at once.
#[test]
fn ready_flag_overrides_worker_ready() {
    let config = "[listen]\naddresses = [\"127.0.0.1:{port}\"]\n\
                  [pool]\nmin = 1\nmax = 1\n\
                  [worker]\ncommand = [\"sleep\", \"30\"]\nready = \"exec\"\nready_timeout = \"1s\"\n";
    let mut exec = Droved::builder("ready-flag-exec").config(config).start();
    exec.wait_status("1 worker ready", 10 * SEC);
    let mut notify = Droved::builder("ready-flag-notify")
        .config(config)
        .args(&["--ready", "notify"])
        .start();
    notify.wait_log("not ready in time", 1, 15 * SEC);
    assert_eq!(exec.log_count("not ready in time"), 0, "{}", exec.log());
}
