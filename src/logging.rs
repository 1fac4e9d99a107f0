//! Log setup: the journal (with structured fields) under systemd, stderr otherwise.
//!
//! Under systemd, stderr is connected to the journal and `JOURNAL_STREAM`
//! names that stream's device:inode (systemd.exec(5)); when it matches our
//! stderr we log to journald natively, so fields such as `worker_pid` land
//! as `WORKER_PID=` and `journalctl -u drove@x WORKER_PID=123` works.
//! Filter with `DROVE_LOG` (tracing-subscriber's EnvFilter syntax).

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// Where logs went, for the startup message and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journal,
    Stderr,
}

/// True when our stderr is the journal stream systemd set up for us.
pub fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}

/// Installs the global subscriber. Falls back to stderr if the journal
/// socket cannot be reached (a missing journal must not stop the pool).
pub fn init() -> Sink {
    let filter = EnvFilter::try_from_env("DROVE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if stderr_is_journal()
        && let Ok(journal) = tracing_journald::layer()
    {
        // No field prefix: `journalctl WORKER_PID=123` as documented.
        let journal = journal
            .with_syslog_identifier("droved".to_string())
            .with_field_prefix(None);
        tracing_subscriber::registry()
            .with(filter)
            .with(journal)
            .init();
        return Sink::Journal;
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .compact(),
        )
        .init();
    Sink::Stderr
}
