// SPDX-License-Identifier: MIT OR Apache-2.0
//! The droved configuration file (TOML): its types, defaults, parsing and
//! validation. Pure: the only I/O is reading the file in [`Config::load`].
//!
//! Parsing happens in two phases. Phase one lets serde and the `toml` crate
//! check the syntax and reject unknown keys (every table is
//! `deny_unknown_fields`); every scalar is kept as a [`toml::Spanned`] value so
//! that phase two can type-check and validate it with its key name, file, line
//! and column in the message. Invariants of a [`Config`] returned by
//! [`Config::from_toml_str`]:
//!
//! - `0 <= pool.min <= pool.max <= 4096`, `pool.max >= 1`, `pool.initial` (if set) is within
//!   `[min, max]`, `1 <= pool.spawn_rate <= 10000`;
//! - `1 <= listen.backlog <= 65535`, `listen.socket_mode <= 0o777`;
//! - every listen address is unique, every name is a valid systemd
//!   `FileDescriptorName=` (1..=255 printable ASCII characters, no `:`), every
//!   unix socket path fits in `sockaddr_un` (at most 107 bytes);
//! - no string that ends up in argv, envp or a path contains a NUL byte;
//!   environment names contain no `=` and are not ones droved sets itself;
//! - durations that would make no sense as zero are nonzero (see each field),
//!   `worker.watchdog >= 10ms`, `restart_delay <= restart_delay_max`,
//!   `scale.interval >= 10ms`, `scale.window >= scale.interval`.
//!
//! `worker.command` may be empty in the file (the CLI can supply it); call
//! [`Config::validate_runnable`] after applying command-line overrides.
//!
//! Value syntax (also documented in `examples/drove.toml`):
//! - durations are strings: a decimal number (fraction allowed, up to 9
//!   digits) and a unit `ms`, `s`, `m`/`min`, `h` or `d`: `"100ms"`, `"1.5s"`,
//!   `"2m"`. `"0"` (or integer `0`) means zero; other bare numbers are rejected
//!   because the unit would be a guess. At most `u64::MAX` nanoseconds.
//! - sizes are integer bytes or strings with a 1024-based unit, as in systemd:
//!   `"512MiB"`, `"512M"`, `"1GiB"`, `"1048576"`. `KB`/`MB`/`GB`/`TB` are
//!   rejected as ambiguous.
//! - signals are names, with or without `SIG`, any case: `"SIGTERM"`,
//!   `"TERM"`, `"quit"`.
//!
//! Files by concern: `types.rs` holds the typed sections and their defaults,
//! `values.rs` the duration/size/signal syntax, `raw.rs` the phase-one
//! document, `validate.rs` phase two, and `error.rs` the error type.

use std::path::Path;

mod error;
mod raw;
mod types;
mod validate;
mod values;

pub use error::{ConfigError, Position};
pub use raw::KEYS;
pub use types::{
    ControlConfig, ListenAddr, ListenAddrError, ListenConfig, ListenSpec, MetricsConfig,
    PoolConfig, ReadyMode, ReadyModeError, RolloutConfig, ScaleConfig, StopConfig, WorkerConfig,
    WorkerMode, WorkerModeError, WorkerSocket, WorkerSocketError,
};
pub use values::{
    DurationError, SignalError, SizeError, format_duration, parse_duration, parse_signal,
    parse_size,
};

/// `FileDescriptorName` used for a listen address that does not name itself.
pub const DEFAULT_LISTEN_NAME: &str = "drove";
/// Largest pool droved accepts (`pool.max`).
pub const MAX_WORKERS: u32 = 4096;
/// Longest unix socket path: `sun_path` is 108 bytes including the NUL.
pub const MAX_UNIX_PATH: usize = 107;
/// Environment variables droved sets for each worker; the config may not.
/// How long a worker that timed out has, after `worker.timeout_signal`,
/// to write its traceback and go before SIGKILL (at most `stop_timeout`).
pub const ABORT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

pub const RESERVED_ENVIRONMENT: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "DROVE_WORKER",
    "DROVE_GENERATION",
    "DROVE_TEMPLATE_FD",
    "DROVE_INSTANCE",
];

/// The whole configuration. `Default` is every default with no listen
/// address and an empty worker command.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    pub listen: ListenConfig,
    pub worker: WorkerConfig,
    pub pool: PoolConfig,
    pub scale: ScaleConfig,
    pub control: ControlConfig,
    /// `[rollout]`: canary rollouts that undo themselves; `None` (no such
    /// table) keeps plain rolling restarts.
    pub rollout: Option<RolloutConfig>,
    pub metrics: MetricsConfig,
    pub stop: StopConfig,
}

impl Config {
    /// Parse and validate `text`; `origin` is only used in error messages.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        validate::parse(text, origin)
    }

    /// Read, parse and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml_str(&text, path)
    }

    /// Like [`Config::load`], for a droved running as root: the file (and
    /// each directory above it) must be writable by nobody but root and
    /// `trusted_uid` (droved's own user), since whoever can write it picks
    /// the command droved runs. The file checked is the file read.
    pub fn load_trusted(path: &Path, trusted_uid: u32) -> Result<Config, ConfigError> {
        use std::io::Read;
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        let unsafe_mode = |what: &str, p: &Path, m: &std::fs::Metadata, dir: bool| {
            use std::os::unix::fs::MetadataExt;
            untrusted_owner_or_mode(m.uid(), m.gid(), m.mode(), dir, trusted_uid).map(|why| {
                ConfigError::Invalid {
                    path: Some(path.to_owned()),
                    position: None,
                    key: None,
                    message: format!(
                        "refusing the config: {what} {} has owner uid {} gid {} and mode {:04o}: {why}; droved runs as root and runs what the config says",
                        p.display(),
                        m.uid(),
                        m.gid(),
                        m.mode() & 0o7777
                    ),
                }
            })
        };
        if let Some(e) = unsafe_mode("the file", path, &meta, false) {
            return Err(e);
        }
        let absolute = std::fs::canonicalize(path).map_err(read_err)?;
        for dir in absolute.ancestors().skip(1) {
            let m = std::fs::metadata(dir).map_err(read_err)?;
            if let Some(e) = unsafe_mode("its directory", dir, &m, true) {
                return Err(e);
            }
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(read_err)?;
        Config::from_toml_str(&text, path)
    }

    /// Whether workers may run as `worker_uid`: uid 0 needs
    /// `worker.allow_root = true`. `Ok(Some(warning))` when they run as root
    /// anyway; `strict` (droved is a systemd service) refuses instead of
    /// warning when allow_root is not set.
    pub fn check_worker_uid(
        &self,
        worker_uid: u32,
        strict: bool,
    ) -> Result<Option<String>, ConfigError> {
        if worker_uid != 0 {
            return Ok(None);
        }
        if self.worker.allow_root {
            return Ok(Some(
                "workers run as root (worker.allow_root = true): a compromised worker owns the host; prefer a dedicated worker.user".into(),
            ));
        }
        let advice = "set worker.user to an unprivileged user (e.g. a dedicated one), or worker.allow_root = true to run them as root on purpose";
        if strict {
            Err(ConfigError::unplaced(
                "worker.user",
                format!("workers would run as root: {advice}"),
            ))
        } else {
            Ok(Some(format!(
                "workers run as root because worker.user is not set; {advice} (droved started by systemd refuses this)"
            )))
        }
    }

    /// Workers to start with: `pool.initial`, else `pool.min`, clamped to
    /// `[min, max]` (which command-line overrides may have moved).
    pub fn initial_workers(&self) -> u32 {
        let n = self.pool.initial.unwrap_or(self.pool.min);
        n.max(self.pool.min).min(self.pool.max)
    }

    /// Check what the file may leave open and what command-line overrides
    /// may have broken: a non-empty command, and the pool bounds. Call it
    /// once the final configuration is assembled, before starting workers.
    /// Errors carry no file position: the values may not come from the file.
    pub fn validate_runnable(&self) -> Result<(), ConfigError> {
        match self.worker.command.first() {
            None => {
                return Err(ConfigError::unplaced(
                    "worker.command",
                    "no worker command: set worker.command in the config file or give the command on the command line".into(),
                ));
            }
            Some(program) if program.is_empty() => {
                return Err(ConfigError::unplaced(
                    "worker.command",
                    "worker.command starts with an empty program name".into(),
                ));
            }
            Some(_) => {}
        }
        if let Some(arg) = self.worker.command.iter().find(|a| a.contains('\0')) {
            return Err(ConfigError::unplaced(
                "worker.command",
                format!("worker.command argument {arg:?} contains a NUL byte"),
            ));
        }
        if self.worker.socket == WorkerSocket::Stdin && self.worker.mode == WorkerMode::Template {
            return Err(ConfigError::unplaced(
                "worker.mode",
                "worker.socket = \"stdin\" needs worker.mode = \"exec\" (--mode template was given): in template mode the template forks the workers and hands them the listeners at fds 3, 4, …".into(),
            ));
        }
        let pool = &self.pool;
        if pool.max == 0 {
            return Err(ConfigError::unplaced(
                "pool.max",
                "pool.max must be at least 1".into(),
            ));
        }
        if pool.idle_exit.is_some() && pool.min > 0 {
            return Err(ConfigError::unplaced(
                "pool.idle_exit",
                format!("pool.idle_exit needs pool.min = 0 (it is {})", pool.min),
            ));
        }
        if pool.max > MAX_WORKERS {
            return Err(ConfigError::unplaced(
                "pool.max",
                format!("pool.max ({}) must not exceed {MAX_WORKERS}", pool.max),
            ));
        }
        if pool.min > pool.max {
            return Err(ConfigError::unplaced(
                "pool.min",
                format!(
                    "pool.min ({}) must not exceed pool.max ({})",
                    pool.min, pool.max
                ),
            ));
        }
        if pool.spare > pool.max {
            return Err(ConfigError::unplaced(
                "pool.spare",
                format!(
                    "pool.spare ({}) must not exceed pool.max ({}): spares are workers of the pool",
                    pool.spare, pool.max
                ),
            ));
        }
        if pool.spare > 0 && pool.min == 0 {
            return Err(ConfigError::unplaced(
                "pool.spare",
                format!(
                    "pool.spare ({}) keeps idle workers, so a pool with pool.min = 0 would never reach zero; set one of them",
                    pool.spare
                ),
            ));
        }
        if pool.spawn_rate == 0 {
            return Err(ConfigError::unplaced(
                "pool.spawn_rate",
                "pool.spawn_rate must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Helpers shared by the unit tests of the config modules.
/// Why a config file (or a directory above it) with this owner and mode
/// could be changed by someone other than root and `trusted_uid`, if it
/// could: owned by another user, writable by a group other than root's, or
/// writable by everyone (a directory with the sticky bit excepted: there,
/// others cannot replace what they do not own).
pub fn untrusted_owner_or_mode(
    uid: u32,
    gid: u32,
    mode: u32,
    is_dir: bool,
    trusted_uid: u32,
) -> Option<&'static str> {
    let sticky = is_dir && mode & 0o1000 != 0;
    if uid != 0 && uid != trusted_uid {
        Some("it belongs to another user")
    } else if mode & 0o002 != 0 && !sticky {
        Some("every user may write to it")
    } else if mode & 0o020 != 0 && gid != 0 && !sticky {
        Some("a group other than root may write to it")
    } else {
        None
    }
}

#[cfg(test)]
mod testing {
    use std::path::Path;

    use super::Config;

    pub(super) const ORIGIN: &str = "/etc/drove/app.toml";

    pub(super) fn parse(text: &str) -> Config {
        Config::from_toml_str(text, Path::new(ORIGIN)).unwrap_or_else(|e| panic!("{e}"))
    }

    pub(super) fn err(text: &str) -> String {
        match Config::from_toml_str(text, Path::new(ORIGIN)) {
            Ok(c) => panic!("expected an error, parsed {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[track_caller]
    pub(super) fn assert_err(text: &str, expected: &str) {
        assert_eq!(err(text), format!("{ORIGIN}:{expected}"));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::Duration;

    use nix::sys::signal::Signal;

    #[test]
    fn who_may_write_the_config() {
        use super::untrusted_owner_or_mode as check;
        // Root's or droved's own, not writable by others: fine.
        assert_eq!(check(0, 0, 0o100644, false, 0), None);
        assert_eq!(check(0, 0, 0o100664, false, 0), None);
        assert_eq!(check(0, 0, 0o040755, true, 0), None);
        assert_eq!(check(998, 998, 0o100600, false, 998), None);
        // /tmp-like directories: sticky.
        assert_eq!(check(0, 0, 0o041777, true, 0), None);
        assert!(check(1000, 1000, 0o100644, false, 0).is_some());
        assert!(check(0, 0, 0o100666, false, 0).is_some());
        assert!(check(0, 1000, 0o100664, false, 0).is_some());
        assert!(check(0, 0, 0o040777, true, 0).is_some());
        // The sticky bit means nothing on a file.
        assert!(check(0, 0, 0o101666, false, 0).is_some());
    }

    #[test]
    fn root_workers_need_allow_root() {
        let mut c = Config::default();
        assert_eq!(c.check_worker_uid(1000, true).unwrap(), None);
        let e = c.check_worker_uid(0, true).unwrap_err();
        assert_eq!(e.key(), Some("worker.user"));
        assert!(
            e.to_string()
                .starts_with("workers would run as root: set worker.user"),
            "{e}"
        );
        let warning = c.check_worker_uid(0, false).unwrap().unwrap();
        assert!(warning.contains("systemd refuses"), "{warning}");
        c.worker.allow_root = true;
        let warning = c.check_worker_uid(0, true).unwrap().unwrap();
        assert!(warning.contains("allow_root = true"), "{warning}");
    }

    #[test]
    fn allow_root_inherit_environment_and_group_without_user() {
        let c = testing::parse(
            "[worker]\nallow_root = true\ninherit_environment = [\"HTTP_PROXY\", \"SSL_CERT_FILE\"]",
        );
        assert!(c.worker.allow_root);
        assert_eq!(
            c.worker.inherit_environment,
            ["HTTP_PROXY", "SSL_CERT_FILE"]
        );
        testing::assert_err(
            "[worker]\ngroup = \"www\"",
            "2:9: worker.group needs worker.user: without it workers would keep droved's own user (root, as a service) with only the group changed; set worker.user too",
        );
        testing::assert_err(
            "[worker]\ninherit_environment = [\"LISTEN_FDS\"]",
            "2:23: worker.inherit_environment: LISTEN_FDS is set by droved for each worker; remove it",
        );
        testing::assert_err(
            "[worker]\ninherit_environment = \"PATH\"",
            "2:23: worker.inherit_environment must be an array of variable names, found string \"PATH\"",
        );
        testing::assert_err(
            "[worker]\nallow_root = \"yes\"",
            "2:14: worker.allow_root must be true or false, found string \"yes\"",
        );
    }

    use super::testing::parse;
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let c = parse("");
        assert_eq!(c, Config::default());
        assert_eq!(c.listen.backlog, 1024);
        assert!(c.listen.addresses.is_empty());
        assert!(c.worker.command.is_empty());
        assert_eq!(c.worker.ready, ReadyMode::Exec);
        assert_eq!(c.worker.mode, WorkerMode::Exec);
        assert_eq!(c.worker.ready_timeout, Duration::from_secs(30));
        assert_eq!(c.worker.stop_signal, Signal::SIGTERM);
        assert_eq!(c.worker.stop_timeout, Duration::from_secs(30));
        assert_eq!(c.worker.watchdog, None);
        assert_eq!(c.worker.restart_delay, Duration::from_millis(100));
        assert_eq!(c.worker.restart_delay_max, Duration::from_secs(10));
        assert_eq!(c.worker.min_uptime, Duration::from_secs(1));
        assert_eq!(c.worker.max_lifetime, None);
        assert_eq!(c.worker.max_lifetime_jitter, Duration::ZERO);
        assert_eq!(c.worker.max_rss, None);
        assert_eq!(
            c.pool,
            PoolConfig {
                min: 2,
                max: 8,
                initial: None,
                spawn_rate: 50,
                idle_exit: None,
                spare: 0,
            }
        );
        assert_eq!(c.scale.interval, Duration::from_millis(100));
        assert_eq!(c.scale.cooldown, Duration::from_secs(10));
        assert_eq!(c.scale.window, Duration::from_secs(1));
        assert!(c.scale.cpu_guard);
        assert_eq!(c.control.group, None);
        assert_eq!(c.initial_workers(), 2);
        // Empty sections are fine too.
        assert_eq!(
            parse("[listen]\n[worker]\n[pool]\n[scale]\n[control]\n"),
            Config::default()
        );
    }

    #[test]
    fn every_key() {
        let c = parse(
            r#"
[listen]
addresses = ["127.0.0.1:8080", { address = "[::1]:9090", name = "admin" }, "unix:/run/app.sock"]
backlog = 4096
socket_mode = "0660"
socket_user = "www-data"
socket_group = "www"

[worker]
command = ["python3", "app.py", "--flag with space"]
working_directory = "/srv/app"
environment = { PORT = 8080, DEBUG = false, NAME = "x=y" }
user = "app"
group = "appgrp"
mode = "template"
ready = "notify"
ready_timeout = "5s"
stop_signal = "quit"
stop_timeout = "1.5s"
watchdog = "10ms"
restart_delay = "50ms"
restart_delay_max = "1m"
min_uptime = "2s"
max_lifetime = "1h"
max_lifetime_jitter = "5min"
max_rss = "512MiB"

[pool]
min = 3
max = 16
initial = 4
spawn_rate = 100
spare = 1

[scale]
interval = "50ms"
cooldown = "0"
window = "2s"
cpu_guard = false

[control]
group = "drove"
"#,
        );
        assert_eq!(
            c.listen,
            ListenConfig {
                addresses: vec![
                    ListenSpec {
                        address: ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap()),
                        name: "drove".into()
                    },
                    ListenSpec {
                        address: ListenAddr::Tcp("[::1]:9090".parse().unwrap()),
                        name: "admin".into()
                    },
                    ListenSpec {
                        address: ListenAddr::Unix("/run/app.sock".into()),
                        name: "drove".into()
                    },
                ],
                backlog: 4096,
                socket_mode: Some(0o660),
                socket_user: Some("www-data".into()),
                socket_group: Some("www".into()),
            }
        );
        let env: BTreeMap<String, String> = [("DEBUG", "false"), ("NAME", "x=y"), ("PORT", "8080")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(
            c.worker,
            WorkerConfig {
                command: vec![
                    "python3".into(),
                    "app.py".into(),
                    "--flag with space".into()
                ],
                working_directory: Some("/srv/app".into()),
                environment: env,
                user: Some("app".into()),
                group: Some("appgrp".into()),
                mode: WorkerMode::Template,
                socket: crate::config::WorkerSocket::Systemd,
                ready: ReadyMode::Notify,
                ready_timeout: Duration::from_secs(5),
                stop_signal: Signal::SIGQUIT,
                stop_timeout: Duration::from_millis(1500),
                timeout_signal: Signal::SIGABRT,
                watchdog: Some(Duration::from_millis(10)),
                request_timeout: None,
                restart_delay: Duration::from_millis(50),
                restart_delay_max: Duration::from_secs(60),
                min_uptime: Duration::from_secs(2),
                max_lifetime: Some(Duration::from_secs(3600)),
                max_lifetime_jitter: Duration::from_secs(300),
                max_rss: Some(512 << 20),
                allow_root: false,
                inherit_environment: vec![],
            }
        );
        assert_eq!(
            c.pool,
            PoolConfig {
                min: 3,
                max: 16,
                initial: Some(4),
                spawn_rate: 100,
                idle_exit: None,
                spare: 1,
            }
        );
        assert_eq!(
            c.scale,
            ScaleConfig {
                interval: Duration::from_millis(50),
                cooldown: Duration::ZERO,
                window: Duration::from_secs(2),
                cpu_guard: false
            }
        );
        assert_eq!(c.control.group.as_deref(), Some("drove"));
        assert_eq!(c.initial_workers(), 4);
        c.validate_runnable().unwrap();
    }

    #[test]
    fn alternative_forms() {
        let c = parse(
            "[listen]\naddresses = \"unix:relative.sock\"\n[worker]\ncommand = \"  gunicorn  -w 1\tapp:app \"\n",
        );
        assert_eq!(
            c.listen.addresses,
            vec![ListenSpec::from(ListenAddr::Unix("relative.sock".into()))]
        );
        assert_eq!(c.worker.command, ["gunicorn", "-w", "1", "app:app"]);
        // Array-of-tables form and socket_mode without the leading 0.
        let c = parse(
            "[[listen.addresses]]\naddress = \"0.0.0.0:80\"\nname = \"http\"\n[listen]\nsocket_mode = \"600\"\n",
        );
        assert_eq!(c.listen.addresses[0].name, "http");
        assert_eq!(c.listen.socket_mode, Some(0o600));
        assert_eq!(
            parse("[listen]\nsocket_mode = \"0o755\"")
                .listen
                .socket_mode,
            Some(0o755)
        );
        // Integers for max_rss and a zero duration.
        let c =
            parse("[worker]\nmax_rss = 1048576\nmax_lifetime = \"1d\"\nmax_lifetime_jitter = 0");
        assert_eq!(c.worker.max_rss, Some(1 << 20));
        assert_eq!(c.worker.max_lifetime_jitter, Duration::ZERO);
        // An empty command array is allowed in the file.
        assert!(parse("[worker]\ncommand = []").worker.command.is_empty());
        // Later arguments may be empty strings.
        assert_eq!(
            parse("[worker]\ncommand = [\"a\", \"\"]").worker.command,
            ["a", ""]
        );
        // The largest pool.
        assert_eq!(parse("[pool]\nmin = 4096\nmax = 4096").pool.min, 4096);
        // min alone below the default max, max alone above the default min.
        assert_eq!(parse("[pool]\nmin = 1").pool.max, 8);
        assert_eq!(parse("[pool]\nmax = 2").pool.min, 2);
    }
    #[test]
    fn validate_runnable_refuses_stdin_socket_in_template_mode() {
        // The file said exec; a --mode template override must not slip by.
        let mut c = parse("[worker]\ncommand = [\"php-cgi\"]\nsocket = \"stdin\"");
        c.validate_runnable().unwrap();
        c.worker.mode = WorkerMode::Template;
        let e = c.validate_runnable().unwrap_err().to_string();
        assert!(
            e.contains("worker.socket = \"stdin\" needs worker.mode = \"exec\""),
            "{e}"
        );
    }

    #[test]
    fn validate_runnable_after_overrides() {
        let mut c = Config::default();
        assert_eq!(
            c.validate_runnable().unwrap_err().to_string(),
            "no worker command: set worker.command in the config file or give the command on the command line"
        );
        c.worker.command = vec![String::new()];
        assert_eq!(
            c.validate_runnable().unwrap_err().to_string(),
            "worker.command starts with an empty program name"
        );
        c.worker.command = vec!["app".into()];
        c.validate_runnable().unwrap();
        c.pool.min = 9;
        let e = c.validate_runnable().unwrap_err();
        assert_eq!(e.to_string(), "pool.min (9) must not exceed pool.max (8)");
        assert_eq!(e.key(), Some("pool.min"));
        assert_eq!(e.position(), None);
        // min = 0 is a pool on demand (ondemand.rs tests).
        c.pool.min = 0;
        c.validate_runnable().unwrap();
        c.pool.min = 1;
        c.pool.max = 5000;
        assert_eq!(
            c.validate_runnable().unwrap_err().to_string(),
            "pool.max (5000) must not exceed 4096"
        );
        c.pool.max = 8;
        c.pool.spawn_rate = 0;
        assert_eq!(
            c.validate_runnable().unwrap_err().to_string(),
            "pool.spawn_rate must be at least 1"
        );
        c.pool.spawn_rate = 50;
        c.pool.spare = 9;
        assert_eq!(
            c.validate_runnable().unwrap_err().to_string(),
            "pool.spare (9) must not exceed pool.max (8): spares are workers of the pool"
        );
        c.pool.spare = 2;
        c.pool.min = 0;
        assert!(
            c.validate_runnable()
                .unwrap_err()
                .to_string()
                .starts_with("pool.spare (2) keeps idle workers, so a pool with pool.min = 0")
        );
        c.pool.min = 1;
        assert!(c.validate_runnable().is_ok());
    }

    #[test]
    fn initial_workers_is_clamped() {
        let mut c = Config::default();
        assert_eq!(c.initial_workers(), 2);
        c.pool.initial = Some(5);
        assert_eq!(c.initial_workers(), 5);
        c.pool.max = 3; // e.g. --max 3 on the command line
        assert_eq!(c.initial_workers(), 3);
        c.pool.initial = Some(0);
        assert_eq!(c.initial_workers(), 2);
    }
    #[test]
    fn examples_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let example = Config::load(&root.join("examples/drove.toml")).unwrap();
        example.validate_runnable().unwrap();
        assert_eq!(example.worker.command[0], "python3");
        assert_eq!(example.listen.addresses.len(), 2);
        // The annotated example states the defaults: only the keys it sets
        // to non-defaults differ from Config::default().
        let mut expected = Config::default();
        expected.listen.addresses = example.listen.addresses.clone();
        expected.listen.socket_mode = Some(0o660);
        expected.worker.command = example.worker.command.clone();
        expected.worker.environment = example.worker.environment.clone();
        // The safe setup is the example's: a dedicated, unprivileged user.
        expected.worker.user = Some("drove-worker".into());
        assert_eq!(example, expected);

        let demo = Config::load(&root.join("examples/demo.toml")).unwrap();
        demo.validate_runnable().unwrap();
        assert_eq!(demo.worker.command, ["target/release/examples/worker"]);
        assert_eq!(demo.worker.ready, ReadyMode::Notify);
        assert_eq!(
            demo.listen.addresses,
            vec![ListenSpec::from(ListenAddr::Tcp(
                "127.0.0.1:8080".parse().unwrap()
            ))]
        );
        assert_eq!((demo.pool.min, demo.pool.max), (2, 8));
    }

    // ondemand (issue 15): a pool that may be empty, and droved's idle exit.
    #[test]
    fn on_demand_pool() {
        let c = parse("[pool]\nmin = 0\nmax = 4\nidle_exit = \"10m\"\n");
        assert_eq!((c.pool.min, c.pool.max), (0, 4));
        assert_eq!(c.pool.idle_exit, Some(Duration::from_secs(600)));
        assert_eq!(c.initial_workers(), 0);
        let mut c = c;
        c.worker.command = vec!["app".into()];
        c.validate_runnable().unwrap();
        // Command-line overrides: --min 1 with idle_exit from the file.
        c.pool.min = 1;
        let e = c.validate_runnable().unwrap_err().to_string();
        assert!(e.contains("pool.idle_exit needs pool.min = 0"), "{e}");
        c.pool = PoolConfig {
            min: 0,
            max: 0,
            ..PoolConfig::default()
        };
        let e = c.validate_runnable().unwrap_err().to_string();
        assert!(e.contains("pool.max must be at least 1"), "{e}");
    }
}
