//! droved's one-shot command-line modes (`--check`, `--preflight`) as a
//! shell runs them: in pipelines whose reader may go away.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use nix::sys::signal::Signal;

use super::harness::*;

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
