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
//! - `1 <= pool.min <= pool.max <= 4096`, `pool.initial` (if set) is within
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

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;
use toml::{Spanned, Value};

/// `FileDescriptorName` used for a listen address that does not name itself.
pub const DEFAULT_LISTEN_NAME: &str = "drove";
/// Largest pool droved accepts (`pool.max`).
pub const MAX_WORKERS: u32 = 4096;
/// Longest unix socket path: `sun_path` is 108 bytes including the NUL.
pub const MAX_UNIX_PATH: usize = 107;
/// Environment variables droved sets for each worker; the config may not.
pub const RESERVED_ENVIRONMENT: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "DROVE_WORKER",
    "DROVE_GENERATION",
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
}

/// `[listen]`: sockets droved binds when systemd does not pass any.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenConfig {
    pub addresses: Vec<ListenSpec>,
    /// listen(2) backlog; default 1024.
    pub backlog: u32,
    /// Permission bits of unix sockets droved creates (`"0660"` in TOML).
    pub socket_mode: Option<u32>,
    /// Owner of unix sockets droved creates.
    pub socket_user: Option<String>,
    /// Group of unix sockets droved creates.
    pub socket_group: Option<String>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            addresses: Vec::new(),
            backlog: 1024,
            socket_mode: None,
            socket_user: None,
            socket_group: None,
        }
    }
}

/// One listening socket and the name workers see in `LISTEN_FDNAMES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub address: ListenAddr,
    /// `FileDescriptorName=`; default [`DEFAULT_LISTEN_NAME`].
    pub name: String,
}

impl From<ListenAddr> for ListenSpec {
    fn from(address: ListenAddr) -> Self {
        ListenSpec {
            address,
            name: DEFAULT_LISTEN_NAME.to_owned(),
        }
    }
}

/// A listen address: a literal IP and port, or a unix socket path.
///
/// Parses from and displays as `127.0.0.1:8080`, `[::1]:8080` or
/// `unix:/run/app.sock`. Host names and bare ports are rejected with a
/// suggestion rather than guessed. Port 0 is allowed (the kernel picks one).
/// A relative unix path is relative to droved's working directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Why a string is not a [`ListenAddr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenAddrError {
    #[error(
        "`{0}` is a bare port; write 127.0.0.1:{0} (loopback) or 0.0.0.0:{0} / [::]:{0} (all addresses)"
    )]
    BarePort(u16),
    #[error(
        "`{host}:{port}` names a host; droved binds literal IP addresses only, e.g. 127.0.0.1:{port} or [::1]:{port}"
    )]
    HostName { host: String, port: u16 },
    #[error("`{input}` has no host; write 0.0.0.0:{port} or [::]:{port} for all addresses")]
    NoHost { input: String, port: u16 },
    #[error("`{input}` is an IPv6 address without brackets; write [{ip}]:{port}")]
    Ipv6Brackets {
        input: String,
        ip: Ipv6Addr,
        port: u16,
    },
    #[error("the unix socket path is empty; write e.g. unix:/run/app.sock")]
    EmptyUnixPath,
    #[error("abstract unix sockets (`unix:@…`) are not supported; use a filesystem path")]
    AbstractUnix,
    #[error("the unix socket path contains a NUL byte")]
    NulInUnixPath,
    #[error("the unix socket path is {len} bytes long; the limit is {max} bytes")]
    UnixPathTooLong { len: usize, max: usize },
    #[error(
        "`{0}` is not a listen address; expected IP:PORT (127.0.0.1:8080, [::1]:8080) or unix:/path"
    )]
    Invalid(String),
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ListenAddrError::EmptyUnixPath);
            }
            if path.starts_with('@') {
                return Err(ListenAddrError::AbstractUnix);
            }
            if path.contains('\0') {
                return Err(ListenAddrError::NulInUnixPath);
            }
            if path.len() > MAX_UNIX_PATH {
                return Err(ListenAddrError::UnixPathTooLong {
                    len: path.len(),
                    max: MAX_UNIX_PATH,
                });
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(addr));
        }
        if let Ok(port) = s.parse::<u16>() {
            return Err(ListenAddrError::BarePort(port));
        }
        if let Some((host, port)) = s.rsplit_once(':')
            && let Ok(port) = port.parse::<u16>()
        {
            if host.is_empty() || host == "*" {
                return Err(ListenAddrError::NoHost {
                    input: s.to_owned(),
                    port,
                });
            }
            if let Ok(ip) = host.parse::<Ipv6Addr>() {
                return Err(ListenAddrError::Ipv6Brackets {
                    input: s.to_owned(),
                    ip,
                    port,
                });
            }
            if host.parse::<IpAddr>().is_err()
                && !host.contains(['[', ']', ':', '/'])
                && !host.chars().any(char::is_whitespace)
            {
                return Err(ListenAddrError::HostName {
                    host: host.to_owned(),
                    port,
                });
            }
        }
        Err(ListenAddrError::Invalid(s.to_owned()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// `[worker]`: what to run and how to treat it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    /// argv; TOML array of strings, or one string split on whitespace.
    /// May be empty in the file; see [`Config::validate_runnable`].
    pub command: Vec<String>,
    pub working_directory: Option<PathBuf>,
    pub environment: BTreeMap<String, String>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// Default [`ReadyMode::Exec`].
    pub ready: ReadyMode,
    /// How long a starting worker may take to become ready; default 30s.
    pub ready_timeout: Duration,
    /// Signal for a graceful stop; default SIGTERM.
    pub stop_signal: Signal,
    /// Grace period after `stop_signal` before SIGKILL; default 30s.
    pub stop_timeout: Duration,
    /// `WATCHDOG_USEC` given to workers; default none.
    pub watchdog: Option<Duration>,
    /// Initial backoff after a failed start; default 100ms.
    pub restart_delay: Duration,
    /// Backoff cap; default 10s.
    pub restart_delay_max: Duration,
    /// A worker exiting sooner than this after start counts as a failed
    /// start; default 1s.
    pub min_uptime: Duration,
    /// Replace a worker after this long; default never.
    pub max_lifetime: Option<Duration>,
    /// Each worker's lifetime is `max_lifetime` plus a random amount up to
    /// this, so workers are not all replaced at once; default 0.
    pub max_lifetime_jitter: Duration,
    /// Replace a worker whose resident set exceeds this many bytes.
    pub max_rss: Option<u64>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            command: Vec::new(),
            working_directory: None,
            environment: BTreeMap::new(),
            user: None,
            group: None,
            ready: ReadyMode::Exec,
            ready_timeout: Duration::from_secs(30),
            stop_signal: Signal::SIGTERM,
            stop_timeout: Duration::from_secs(30),
            watchdog: None,
            restart_delay: Duration::from_millis(100),
            restart_delay_max: Duration::from_secs(10),
            min_uptime: Duration::from_secs(1),
            max_lifetime: None,
            max_lifetime_jitter: Duration::ZERO,
            max_rss: None,
        }
    }
}

/// When a worker counts as ready, like systemd's `Type=notify` / `Type=exec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadyMode {
    /// Ready when the worker sends `READY=1` (sd_notify(3)).
    Notify,
    /// Ready as soon as execve(2) succeeded.
    #[default]
    Exec,
}

impl FromStr for ReadyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "notify" => Ok(ReadyMode::Notify),
            "exec" => Ok(ReadyMode::Exec),
            _ => Err(format!(
                "unknown ready mode `{s}`; expected \"notify\" or \"exec\""
            )),
        }
    }
}

impl fmt::Display for ReadyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReadyMode::Notify => "notify",
            ReadyMode::Exec => "exec",
        })
    }
}

/// `[pool]`: how many workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Never fewer workers than this; at least 1 (default 2).
    pub min: u32,
    /// Never more workers than this; at most [`MAX_WORKERS`] (default 8).
    pub max: u32,
    /// Workers started at boot; default `min`.
    pub initial: Option<u32>,
    /// Forks per second at most; default 50.
    pub spawn_rate: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min: 2,
            max: 8,
            initial: None,
            spawn_rate: 50,
        }
    }
}

/// `[scale]`: the autoscaler's timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleConfig {
    /// Accept-queue sampling period; default 100ms.
    pub interval: Duration,
    /// Minimum time between two scale-downs; default 10s.
    pub cooldown: Duration,
    /// Span of samples a decision looks at; default 1s.
    pub window: Duration,
    /// Hold scale-up back while the CPU is the bottleneck; default true.
    pub cpu_guard: bool,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            interval: Duration::from_millis(100),
            cooldown: Duration::from_secs(10),
            window: Duration::from_secs(1),
            cpu_guard: true,
        }
    }
}

/// `[control]`: who may change the pool over D-Bus.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControlConfig {
    /// Group allowed to call mutating D-Bus methods besides root.
    pub group: Option<String>,
}

/// A 1-based line and column (in characters) in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Why a configuration was rejected. `Display` is one line an operator can
/// act on: `path:line:column: what is wrong and what is expected`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the config file", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a wrong value.
    #[error("{}", render(path.as_deref(), *position, message))]
    Invalid {
        /// The file; `None` when the values came from elsewhere (the CLI).
        path: Option<PathBuf>,
        /// Where in the file; `None` if the value was not in the file.
        position: Option<Position>,
        /// The dotted key (`pool.min`) when the error concerns one.
        key: Option<String>,
        /// What is wrong and what is expected, including the key.
        message: String,
    },
}

fn render(path: Option<&Path>, position: Option<Position>, message: &str) -> String {
    match (path, position) {
        (Some(p), Some(pos)) => format!("{}:{}:{}: {message}", p.display(), pos.line, pos.column),
        (Some(p), None) => format!("{}: {message}", p.display()),
        (None, _) => message.to_owned(),
    }
}

impl ConfigError {
    /// The config file concerned, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ConfigError::Read { path, .. } => Some(path),
            ConfigError::Invalid { path, .. } => path.as_deref(),
        }
    }

    /// Line and column of the offending text, if known.
    pub fn position(&self) -> Option<Position> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { position, .. } => *position,
        }
    }

    /// The dotted key concerned (`worker.stop_signal`), if known.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { key, .. } => key.as_deref(),
        }
    }

    /// One line including the cause (for a read error, the OS error), for
    /// callers that show a single string, such as a D-Bus `Reload` reply.
    pub fn full_message(&self) -> String {
        match self {
            ConfigError::Read { source, .. } => format!("{self}: {source}"),
            ConfigError::Invalid { .. } => self.to_string(),
        }
    }

    fn unplaced(key: &str, message: String) -> Self {
        ConfigError::Invalid {
            path: None,
            position: None,
            key: Some(key.to_owned()),
            message,
        }
    }
}

impl Config {
    /// Parse and validate `text`; `origin` is only used in error messages.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let cx = Cx { text, origin };
        let raw: RawConfig = toml::from_str(text).map_err(|e| cx.toml_error(&e))?;
        cx.build(raw)
    }

    /// Read, parse and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml_str(&text, path)
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
        let pool = &self.pool;
        if pool.min == 0 {
            return Err(ConfigError::unplaced(
                "pool.min",
                "pool.min must be at least 1".into(),
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
        if pool.spawn_rate == 0 {
            return Err(ConfigError::unplaced(
                "pool.spawn_rate",
                "pool.spawn_rate must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Value syntax, public so the CLI can parse the same forms.

const NANOS: [(&str, u128); 6] = [
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("min", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("d", 86_400_000_000_000),
];

/// Parse a duration: `"100ms"`, `"30s"`, `"1.5s"`, `"2m"`, `"2min"`, `"1h"`,
/// `"1d"`, or `"0"`. Whitespace around the number and unit is allowed.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim_start());
    if number.is_empty() {
        return Err(format!(
            "`{text}` is not a duration; expected a number and a unit, e.g. \"100ms\", \"30s\", \"2m\""
        ));
    }
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() || (number.contains('.') && frac.is_empty()) || frac.contains('.') {
        return Err(format!(
            "`{text}` is not a duration: malformed number `{number}`"
        ));
    }
    if frac.len() > 9 {
        return Err(format!(
            "`{text}` has more than 9 decimal places; durations are precise to the nanosecond"
        ));
    }
    let whole: u128 = whole
        .parse()
        .map_err(|_| format!("`{text}` is too large for a duration"))?;
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().unwrap_or(0)
    };
    if unit.is_empty() {
        if whole == 0 && frac_value == 0 {
            return Ok(Duration::ZERO);
        }
        return Err(format!(
            "`{text}` has no unit; write e.g. \"{number}s\" or \"{number}ms\""
        ));
    }
    let Some(&(_, per_unit)) = NANOS.iter().find(|(u, _)| *u == unit) else {
        return Err(format!(
            "`{text}` has an unknown unit `{unit}`; expected one of ms, s, m, min, h, d"
        ));
    };
    let frac_nanos = frac_value * per_unit / 10u128.pow(frac.len() as u32);
    let total = whole
        .checked_mul(per_unit)
        .and_then(|n| n.checked_add(frac_nanos))
        .filter(|n| *n <= u128::from(u64::MAX))
        .ok_or_else(|| format!("`{text}` is too large for a duration (at most about 584 years)"))?;
    Ok(Duration::from_nanos(total as u64))
}

/// Format a duration so that [`parse_duration`] reads it back exactly:
/// the largest unit that divides it (`"2m"`, `"100ms"`), else fractional
/// seconds (`"1.5s"`).
pub fn format_duration(d: Duration) -> String {
    let n = d.as_nanos();
    if n == 0 {
        return "0".to_owned();
    }
    for (unit, per) in [
        ("d", 86_400_000_000_000u128),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
    ] {
        if n.is_multiple_of(per) {
            return format!("{}{unit}", n / per);
        }
    }
    let frac = format!("{:09}", n % 1_000_000_000);
    format!("{}.{}s", n / 1_000_000_000, frac.trim_end_matches('0'))
}

/// Parse a size in bytes: `"1048576"`, `"512K"`, `"512KiB"`, `"100M"`,
/// `"1GiB"`, `"2T"`; units are 1024-based and case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim_start());
    if number.is_empty() {
        return Err(format!(
            "`{text}` is not a size; expected bytes or a number with a unit, e.g. \"512MiB\", \"1G\""
        ));
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "kb" | "mb" | "gb" | "tb" => {
            let bin = format!("{}iB", &unit[..1].to_ascii_uppercase());
            return Err(format!(
                "`{text}`: `{unit}` is ambiguous; write `{bin}` (1024-based, like systemd's `{}`)",
                &unit[..1].to_ascii_uppercase()
            ));
        }
        _ => {
            return Err(format!(
                "`{text}` has an unknown unit `{unit}`; expected one of K, M, G, T, KiB, MiB, GiB, TiB"
            ));
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("`{text}` is too large (at most 16 EiB)"))
}

/// Parse a signal name: `"SIGTERM"`, `"TERM"`, `"sigquit"`, `"hup"`.
pub fn parse_signal(text: &str) -> Result<Signal, String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| {
        if text.trim().parse::<i32>().is_ok() {
            format!("`{text}`: give the signal by name, e.g. \"SIGTERM\" or \"SIGQUIT\"")
        } else {
            format!(
                "`{text}` is not a signal name; expected e.g. \"SIGTERM\", \"SIGINT\", \"SIGQUIT\""
            )
        }
    })
}

// ---------------------------------------------------------------------------
// Phase one: the raw document.

type Field = Option<Spanned<Value>>;

const TOP_KEYS: &[&str] = &["listen", "worker", "pool", "scale", "control"];
const LISTEN_KEYS: &[&str] = &[
    "addresses",
    "backlog",
    "socket_mode",
    "socket_user",
    "socket_group",
];
const ADDRESS_KEYS: &[&str] = &["address", "name"];
const WORKER_KEYS: &[&str] = &[
    "command",
    "working_directory",
    "environment",
    "user",
    "group",
    "ready",
    "ready_timeout",
    "stop_signal",
    "stop_timeout",
    "watchdog",
    "restart_delay",
    "restart_delay_max",
    "min_uptime",
    "max_lifetime",
    "max_lifetime_jitter",
    "max_rss",
];
const POOL_KEYS: &[&str] = &["min", "max", "initial", "spawn_rate"];
const SCALE_KEYS: &[&str] = &["interval", "cooldown", "window", "cpu_guard"];
const CONTROL_KEYS: &[&str] = &["group"];

const SECTIONS: &[(&str, &[&str])] = &[
    ("the top level", TOP_KEYS),
    ("[listen]", LISTEN_KEYS),
    ("[worker]", WORKER_KEYS),
    ("[pool]", POOL_KEYS),
    ("[scale]", SCALE_KEYS),
    ("[control]", CONTROL_KEYS),
];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    listen: RawListen,
    worker: RawWorker,
    pool: RawPool,
    scale: RawScale,
    control: RawControl,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawListen {
    addresses: Option<Spanned<OneOrMany>>,
    backlog: Field,
    socket_mode: Field,
    socket_user: Field,
    socket_group: Field,
}

/// `addresses = "…"` or `addresses = ["…", { address = "…", name = "…" }]`.
enum OneOrMany {
    One(String),
    Many(Vec<Spanned<Value>>),
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("listen.addresses as an address string or an array of addresses")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(OneOrMany::Many(items))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawWorker {
    command: Field,
    working_directory: Field,
    environment: Option<EnvTable>,
    user: Field,
    group: Field,
    ready: Field,
    ready_timeout: Field,
    stop_signal: Field,
    stop_timeout: Field,
    watchdog: Field,
    restart_delay: Field,
    restart_delay_max: Field,
    min_uptime: Field,
    max_lifetime: Field,
    max_lifetime_jitter: Field,
    max_rss: Field,
}

/// `worker.environment`, with a span per value.
struct EnvTable(BTreeMap<String, Spanned<Value>>);

impl<'de> Deserialize<'de> for EnvTable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = EnvTable;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("worker.environment as a table, e.g. { NAME = \"value\" }")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<EnvTable, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry()? {
                    out.insert(k, v);
                }
                Ok(EnvTable(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawPool {
    min: Field,
    max: Field,
    initial: Field,
    spawn_rate: Field,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawScale {
    interval: Field,
    cooldown: Field,
    window: Field,
    cpu_guard: Field,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawControl {
    group: Field,
}

// ---------------------------------------------------------------------------
// Phase two: typing and validation, with positions.

struct Cx<'a> {
    text: &'a str,
    origin: &'a Path,
}

type Res<T> = Result<T, ConfigError>;

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("string {s:?}"),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(x) => format!("float {x}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(d) => format!("datetime {d}"),
        Value::Array(_) => "an array".to_owned(),
        Value::Table(_) => "a table".to_owned(),
    }
}

/// Levenshtein distance, for "did you mean" hints on unknown keys.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn unknown_key_message(key: &str, section: &str, expected: &[&str]) -> String {
    let mut msg = format!(
        "unknown key `{key}` in {section}; expected one of {}",
        expected.join(", ")
    );
    if let Some(best) = expected
        .iter()
        .filter(|k| distance(key, k) <= 2.max(key.len() / 4))
        .min_by_key(|k| distance(key, k))
    {
        msg.push_str(&format!(" (did you mean `{best}`?)"));
    }
    msg
}

impl Cx<'_> {
    fn position(&self, offset: usize) -> Position {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Position {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    fn error(&self, span: Option<Range<usize>>, key: Option<&str>, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: Some(self.origin.to_owned()),
            position: span.map(|s| self.position(s.start)),
            key: key.map(str::to_owned),
            message,
        }
    }

    fn at<T>(&self, v: &Spanned<T>, key: &str, message: String) -> ConfigError {
        self.error(Some(v.span()), Some(key), message)
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let raw = e.message().trim_end();
        let message = if raw == "duplicate key" {
            let key = e.span().and_then(|s| self.text.get(s)).unwrap_or("");
            format!(
                "duplicate key `{}`; a key may appear only once in a table",
                key.trim()
            )
        } else {
            self.rewrite_unknown_field(raw).unwrap_or_else(|| {
                // Do not leak the private struct names into messages.
                let mut m = raw.to_owned();
                for (name, table) in [
                    ("struct RawListen", "a table [listen]"),
                    ("struct RawWorker", "a table [worker]"),
                    ("struct RawPool", "a table [pool]"),
                    ("struct RawScale", "a table [scale]"),
                    ("struct RawControl", "a table [control]"),
                ] {
                    m = m.replace(name, table);
                }
                m
            })
        };
        self.error(e.span(), None, message)
    }

    /// serde says "unknown field `x`, expected one of `a`, `b`"; name the
    /// section and drop the quotes, as the rest of our messages do.
    fn rewrite_unknown_field(&self, raw: &str) -> Option<String> {
        let rest = raw.strip_prefix("unknown field `")?;
        let (key, rest) = rest.split_once('`')?;
        let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
        let (section, keys) = SECTIONS.iter().find(|(_, keys)| {
            keys.len() == expected.len() && keys.iter().all(|k| expected.contains(k))
        })?;
        Some(unknown_key_message(key, section, keys))
    }

    fn type_error(&self, v: &Spanned<Value>, key: &str, expected: &str) -> ConfigError {
        self.at(
            v,
            key,
            format!("{key} must be {expected}, found {}", describe(v.get_ref())),
        )
    }

    fn string<'v>(&self, v: &'v Spanned<Value>, key: &str, expected: &str) -> Res<&'v str> {
        match v.get_ref() {
            Value::String(s) => Ok(s),
            _ => Err(self.type_error(v, key, expected)),
        }
    }

    /// A name or path: a non-empty string without NUL.
    fn name(&self, v: &Field, key: &str) -> Res<Option<String>> {
        let Some(v) = v else { return Ok(None) };
        let s = self.string(v, key, "a string")?;
        if s.is_empty() {
            return Err(self.at(
                v,
                key,
                format!("{key} must not be empty; remove the key instead"),
            ));
        }
        if s.contains('\0') {
            return Err(self.at(v, key, format!("{key} must not contain a NUL byte")));
        }
        Ok(Some(s.to_owned()))
    }

    fn int(&self, v: &Field, key: &str, min: u32, max: u32) -> Res<Option<u32>> {
        let Some(v) = v else { return Ok(None) };
        let expected = format!("a whole number from {min} to {max}");
        match v.get_ref() {
            Value::Integer(i) => match u32::try_from(*i) {
                Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(self.at(v, key, format!("{key} ({i}) must be {expected}"))),
            },
            _ => Err(self.type_error(v, key, &expected)),
        }
    }

    fn boolean(&self, v: &Field, key: &str) -> Res<Option<bool>> {
        let Some(v) = v else { return Ok(None) };
        match v.get_ref() {
            Value::Boolean(b) => Ok(Some(*b)),
            _ => Err(self.type_error(v, key, "true or false")),
        }
    }

    fn duration(&self, v: &Field, key: &str) -> Res<Option<Duration>> {
        let Some(v) = v else { return Ok(None) };
        match v.get_ref() {
            Value::String(s) => parse_duration(s)
                .map(Some)
                .map_err(|e| self.at(v, key, format!("{key}: {e}"))),
            Value::Integer(0) => Ok(Some(Duration::ZERO)),
            Value::Integer(i) => Err(self.at(
                v,
                key,
                format!("{key} must be a duration string with a unit, e.g. \"{i}s\" or \"{i}ms\", found integer {i}"),
            )),
            _ => Err(self.type_error(v, key, "a duration string such as \"30s\" or \"100ms\"")),
        }
    }

    /// A duration that must be at least `floor` (nonzero when `floor` is 1ns).
    fn duration_min(&self, v: &Field, key: &str, floor: Duration) -> Res<Option<Duration>> {
        let d = self.duration(v, key)?;
        if let (Some(d), Some(v)) = (d, v)
            && d < floor
        {
            let msg = if floor == Duration::from_nanos(1) {
                format!("{key} must be greater than zero")
            } else {
                format!(
                    "{key} ({}) must be at least {}",
                    format_duration(d),
                    format_duration(floor)
                )
            };
            return Err(self.at(v, key, msg));
        }
        Ok(d)
    }

    fn build(&self, raw: RawConfig) -> Res<Config> {
        let mut config = Config::default();
        self.build_listen(&raw.listen, &mut config.listen)?;
        self.build_worker(&raw.worker, &mut config.worker)?;
        self.build_pool(&raw.pool, &mut config.pool)?;
        self.build_scale(&raw.scale, &mut config.scale)?;
        config.control.group = self.name(&raw.control.group, "control.group")?;
        Ok(config)
    }

    fn build_listen(&self, raw: &RawListen, out: &mut ListenConfig) -> Res<()> {
        if let Some(addresses) = &raw.addresses {
            let entries: Vec<Spanned<Value>> = match addresses.get_ref() {
                OneOrMany::One(s) => vec![Spanned::new(addresses.span(), Value::String(s.clone()))],
                OneOrMany::Many(items) => items.clone(),
            };
            for entry in &entries {
                let spec = self.listen_spec(entry)?;
                if out.addresses.iter().any(|s| s.address == spec.address) {
                    return Err(self.at(
                        entry,
                        "listen.addresses",
                        format!("listen.addresses lists {} twice", spec.address),
                    ));
                }
                out.addresses.push(spec);
            }
        }
        if let Some(b) = self.int(&raw.backlog, "listen.backlog", 1, 65535)? {
            out.backlog = b;
        }
        if let Some(v) = &raw.socket_mode {
            let key = "listen.socket_mode";
            let s = self.string(v, key, "an octal string such as \"0660\"")?;
            let digits = s.strip_prefix("0o").unwrap_or(s);
            let mode = u32::from_str_radix(digits, 8)
                .ok()
                .filter(|_| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    self.at(
                        v,
                        key,
                        format!("{key} {s:?} is not an octal mode; expected e.g. \"0660\""),
                    )
                })?;
            if mode > 0o777 {
                return Err(self.at(
                    v,
                    key,
                    format!("{key} {s:?} is more than 0777; only permission bits are allowed"),
                ));
            }
            out.socket_mode = Some(mode);
        }
        out.socket_user = self.name(&raw.socket_user, "listen.socket_user")?;
        out.socket_group = self.name(&raw.socket_group, "listen.socket_group")?;
        Ok(())
    }

    fn listen_spec(&self, entry: &Spanned<Value>) -> Res<ListenSpec> {
        let key = "listen.addresses";
        let expected = "an address string or a table { address = \"…\", name = \"…\" }";
        let (address, name) = match entry.get_ref() {
            Value::String(s) => (s.as_str(), None),
            Value::Table(t) => {
                if let Some(unknown) = t.keys().find(|k| !ADDRESS_KEYS.contains(&k.as_str())) {
                    return Err(self.at(
                        entry,
                        key,
                        unknown_key_message(unknown, "a listen.addresses entry", ADDRESS_KEYS),
                    ));
                }
                let address = match t.get("address") {
                    Some(Value::String(s)) => s.as_str(),
                    Some(other) => {
                        return Err(self.at(
                            entry,
                            key,
                            format!(
                                "{key} entry: address must be a string, found {}",
                                describe(other)
                            ),
                        ));
                    }
                    None => {
                        return Err(self.at(
                            entry,
                            key,
                            format!("{key} entry has no address; add address = \"127.0.0.1:8080\" or similar"),
                        ));
                    }
                };
                let name = match t.get("name") {
                    Some(Value::String(s)) => Some(s.as_str()),
                    Some(other) => {
                        return Err(self.at(
                            entry,
                            key,
                            format!(
                                "{key} entry: name must be a string, found {}",
                                describe(other)
                            ),
                        ));
                    }
                    None => None,
                };
                (address, name)
            }
            _ => return Err(self.type_error(entry, key, expected)),
        };
        let address: ListenAddr = address
            .parse()
            .map_err(|e: ListenAddrError| self.at(entry, key, format!("{key}: {e}")))?;
        let name = name.unwrap_or(DEFAULT_LISTEN_NAME);
        if name.is_empty() || name.len() > 255 {
            return Err(self.at(
                entry,
                key,
                format!("{key}: name must be 1 to 255 characters long (sd_listen_fds(3))"),
            ));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| *c == ':' || !c.is_ascii() || c.is_ascii_control())
        {
            return Err(self.at(
                entry,
                key,
                format!(
                    "{key}: name {name:?} contains {bad:?}; names are printable ASCII without `:` (sd_listen_fds(3))"
                ),
            ));
        }
        Ok(ListenSpec {
            address,
            name: name.to_owned(),
        })
    }

    fn build_worker(&self, raw: &RawWorker, out: &mut WorkerConfig) -> Res<()> {
        if let Some(v) = &raw.command {
            out.command = self.command(v)?;
        }
        if let Some(dir) = self.name(&raw.working_directory, "worker.working_directory")? {
            out.working_directory = Some(PathBuf::from(dir));
        }
        if let Some(env) = &raw.environment {
            for (name, value) in &env.0 {
                out.environment
                    .insert(name.clone(), self.env_entry(name, value)?);
            }
        }
        out.user = self.name(&raw.user, "worker.user")?;
        out.group = self.name(&raw.group, "worker.group")?;
        if let Some(v) = &raw.ready {
            let s = self.string(v, "worker.ready", "\"notify\" or \"exec\"")?;
            out.ready = s
                .parse()
                .map_err(|e: String| self.at(v, "worker.ready", format!("worker.ready: {e}")))?;
        }
        let nonzero = Duration::from_nanos(1);
        if let Some(d) = self.duration_min(&raw.ready_timeout, "worker.ready_timeout", nonzero)? {
            out.ready_timeout = d;
        }
        if let Some(v) = &raw.stop_signal {
            let key = "worker.stop_signal";
            let s = self.string(v, key, "a signal name such as \"SIGTERM\"")?;
            out.stop_signal =
                parse_signal(s).map_err(|e| self.at(v, key, format!("{key}: {e}")))?;
        }
        if let Some(d) = self.duration_min(&raw.stop_timeout, "worker.stop_timeout", nonzero)? {
            out.stop_timeout = d;
        }
        out.watchdog =
            self.duration_min(&raw.watchdog, "worker.watchdog", Duration::from_millis(10))?;
        if let Some(d) = self.duration_min(&raw.restart_delay, "worker.restart_delay", nonzero)? {
            out.restart_delay = d;
        }
        if let Some(d) =
            self.duration_min(&raw.restart_delay_max, "worker.restart_delay_max", nonzero)?
        {
            out.restart_delay_max = d;
        }
        if out.restart_delay > out.restart_delay_max {
            let v = raw
                .restart_delay
                .as_ref()
                .or(raw.restart_delay_max.as_ref());
            return Err(self.error(
                v.map(Spanned::span),
                Some("worker.restart_delay"),
                format!(
                    "worker.restart_delay ({}) must not exceed worker.restart_delay_max ({})",
                    format_duration(out.restart_delay),
                    format_duration(out.restart_delay_max)
                ),
            ));
        }
        if let Some(d) = self.duration_min(&raw.min_uptime, "worker.min_uptime", nonzero)? {
            out.min_uptime = d;
        }
        out.max_lifetime = self.duration_min(&raw.max_lifetime, "worker.max_lifetime", nonzero)?;
        if let Some(d) = self.duration(&raw.max_lifetime_jitter, "worker.max_lifetime_jitter")? {
            out.max_lifetime_jitter = d;
            if out.max_lifetime.is_none() && !d.is_zero() {
                return Err(self.error(
                    raw.max_lifetime_jitter.as_ref().map(Spanned::span),
                    Some("worker.max_lifetime_jitter"),
                    "worker.max_lifetime_jitter has no effect without worker.max_lifetime; set both or remove it".into(),
                ));
            }
        }
        if let Some(v) = &raw.max_rss {
            let key = "worker.max_rss";
            let bytes = match v.get_ref() {
                Value::Integer(i) => u64::try_from(*i)
                    .map_err(|_| self.at(v, key, format!("{key} ({i}) must not be negative")))?,
                Value::String(s) => {
                    parse_size(s).map_err(|e| self.at(v, key, format!("{key}: {e}")))?
                }
                _ => {
                    return Err(self.type_error(
                        v,
                        key,
                        "a size such as \"512MiB\" or a byte count",
                    ));
                }
            };
            if bytes == 0 {
                return Err(self.at(
                    v,
                    key,
                    format!("{key} must be greater than zero; remove the key for no limit"),
                ));
            }
            out.max_rss = Some(bytes);
        }
        Ok(())
    }

    fn command(&self, v: &Spanned<Value>) -> Res<Vec<String>> {
        let key = "worker.command";
        let expected = "an array of strings or a string";
        let argv: Vec<String> = match v.get_ref() {
            Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.at(
                        v,
                        key,
                        format!("{key}[{i}] must be a string, found {}", describe(other)),
                    )),
                })
                .collect::<Res<_>>()?,
            _ => return Err(self.type_error(v, key, expected)),
        };
        if argv.first().is_some_and(String::is_empty) {
            return Err(self.at(v, key, format!("{key} starts with an empty program name")));
        }
        if let Some(arg) = argv.iter().find(|a| a.contains('\0')) {
            return Err(self.at(
                v,
                key,
                format!("{key} argument {arg:?} contains a NUL byte"),
            ));
        }
        Ok(argv)
    }

    fn env_entry(&self, name: &str, v: &Spanned<Value>) -> Res<String> {
        let key = format!("worker.environment.{name}");
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(self.at(
                v,
                &key,
                format!(
                    "environment variable name {name:?} must be non-empty and contain no `=` or NUL"
                ),
            ));
        }
        if RESERVED_ENVIRONMENT.contains(&name) {
            return Err(self.at(
                v,
                &key,
                format!("environment variable {name} is set by droved for each worker; remove it"),
            ));
        }
        let value = match v.get_ref() {
            Value::String(s) => s.clone(),
            Value::Integer(i) => i.to_string(),
            Value::Boolean(b) => b.to_string(),
            _ => return Err(self.type_error(v, &key, "a string, integer or boolean")),
        };
        if value.contains('\0') {
            return Err(self.at(v, &key, format!("{key} must not contain a NUL byte")));
        }
        Ok(value)
    }

    fn build_pool(&self, raw: &RawPool, out: &mut PoolConfig) -> Res<()> {
        if let Some(n) = self.int(&raw.min, "pool.min", 1, MAX_WORKERS)? {
            out.min = n;
        }
        if let Some(n) = self.int(&raw.max, "pool.max", 1, MAX_WORKERS)? {
            out.max = n;
        }
        if out.min > out.max {
            let v = raw.min.as_ref().or(raw.max.as_ref());
            return Err(self.error(
                v.map(Spanned::span),
                Some("pool.min"),
                format!(
                    "pool.min ({}) must not exceed pool.max ({})",
                    out.min, out.max
                ),
            ));
        }
        out.initial = self.int(&raw.initial, "pool.initial", 0, MAX_WORKERS)?;
        if let (Some(n), Some(v)) = (out.initial, &raw.initial)
            && !(out.min..=out.max).contains(&n)
        {
            return Err(self.at(
                v,
                "pool.initial",
                format!(
                    "pool.initial ({n}) must be between pool.min ({}) and pool.max ({})",
                    out.min, out.max
                ),
            ));
        }
        if let Some(n) = self.int(&raw.spawn_rate, "pool.spawn_rate", 1, 10_000)? {
            out.spawn_rate = n;
        }
        Ok(())
    }

    fn build_scale(&self, raw: &RawScale, out: &mut ScaleConfig) -> Res<()> {
        let tick = Duration::from_millis(10);
        if let Some(d) = self.duration_min(&raw.interval, "scale.interval", tick)? {
            out.interval = d;
        }
        if let Some(d) = self.duration(&raw.cooldown, "scale.cooldown")? {
            out.cooldown = d;
        }
        if let Some(d) = self.duration(&raw.window, "scale.window")? {
            out.window = d;
        }
        if out.window < out.interval {
            let v = raw.window.as_ref().or(raw.interval.as_ref());
            return Err(self.error(
                v.map(Spanned::span),
                Some("scale.window"),
                format!(
                    "scale.window ({}) must be at least scale.interval ({})",
                    format_duration(out.window),
                    format_duration(out.interval)
                ),
            ));
        }
        if let Some(b) = self.boolean(&raw.cpu_guard, "scale.cpu_guard")? {
            out.cpu_guard = b;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "/etc/drove/app.toml";

    fn parse(text: &str) -> Config {
        Config::from_toml_str(text, Path::new(ORIGIN)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> String {
        match Config::from_toml_str(text, Path::new(ORIGIN)) {
            Ok(c) => panic!("expected an error, parsed {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[track_caller]
    fn assert_err(text: &str, expected: &str) {
        assert_eq!(err(text), format!("{ORIGIN}:{expected}"));
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let c = parse("");
        assert_eq!(c, Config::default());
        assert_eq!(c.listen.backlog, 1024);
        assert!(c.listen.addresses.is_empty());
        assert!(c.worker.command.is_empty());
        assert_eq!(c.worker.ready, ReadyMode::Exec);
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
                spawn_rate: 50
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
                ready: ReadyMode::Notify,
                ready_timeout: Duration::from_secs(5),
                stop_signal: Signal::SIGQUIT,
                stop_timeout: Duration::from_millis(1500),
                watchdog: Some(Duration::from_millis(10)),
                restart_delay: Duration::from_millis(50),
                restart_delay_max: Duration::from_secs(60),
                min_uptime: Duration::from_secs(2),
                max_lifetime: Some(Duration::from_secs(3600)),
                max_lifetime_jitter: Duration::from_secs(300),
                max_rss: Some(512 << 20),
            }
        );
        assert_eq!(
            c.pool,
            PoolConfig {
                min: 3,
                max: 16,
                initial: Some(4),
                spawn_rate: 100
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
    fn syntax_and_unknown_keys() {
        assert_err(
            "\n\nworkerz = 1",
            "3:1: unknown key `workerz` in the top level; expected one of listen, worker, pool, scale, control (did you mean `worker`?)",
        );
        assert_err(
            "[pool]\nminimum = 1",
            "2:1: unknown key `minimum` in [pool]; expected one of min, max, initial, spawn_rate",
        );
        assert_err(
            "[worker]\n  comand = []",
            "2:3: unknown key `comand` in [worker]; expected one of command, working_directory, environment, user, group, ready, ready_timeout, stop_signal, stop_timeout, watchdog, restart_delay, restart_delay_max, min_uptime, max_lifetime, max_lifetime_jitter, max_rss (did you mean `command`?)",
        );
        assert_err(
            "[listen]\nport = 80",
            "2:1: unknown key `port` in [listen]; expected one of addresses, backlog, socket_mode, socket_user, socket_group",
        );
        assert_err(
            "[scale]\ninterval = \"1s\"\ncpuguard = true",
            "3:1: unknown key `cpuguard` in [scale]; expected one of interval, cooldown, window, cpu_guard (did you mean `cpu_guard`?)",
        );
        assert_err(
            "[control]\nuser = \"x\"",
            "2:1: unknown key `user` in [control]; expected one of group",
        );
        assert_err(
            "[listen]\naddresses = [{ address = \"127.0.0.1:1\", nam = \"x\" }]",
            "2:14: unknown key `nam` in a listen.addresses entry; expected one of address, name (did you mean `name`?)",
        );
        assert_err("[pool\n", "1:6: unclosed table, expected `]`");
        assert_err(
            "[pool]\nmin = 1\nmin = 2",
            "3:1: duplicate key `min`; a key may appear only once in a table",
        );
        // Columns count characters, not bytes.
        assert_err(
            "# é\n[worker]\nready_timeout = \"é\"",
            "3:17: worker.ready_timeout: `é` is not a duration; expected a number and a unit, e.g. \"100ms\", \"30s\", \"2m\"",
        );
        assert_err(
            "pool = 3",
            "1:8: invalid type: integer `3`, expected a table [pool]",
        );
    }

    #[test]
    fn listen_errors() {
        let p = |v: &str| format!("[listen]\naddresses = [{v}]");
        assert_err(
            &p("\"localhost:8080\""),
            "2:14: listen.addresses: `localhost:8080` names a host; droved binds literal IP addresses only, e.g. 127.0.0.1:8080 or [::1]:8080",
        );
        assert_err(
            &p("\"8080\""),
            "2:14: listen.addresses: `8080` is a bare port; write 127.0.0.1:8080 (loopback) or 0.0.0.0:8080 / [::]:8080 (all addresses)",
        );
        assert_err(
            &p("\":8080\""),
            "2:14: listen.addresses: `:8080` has no host; write 0.0.0.0:8080 or [::]:8080 for all addresses",
        );
        assert_err(
            &p("\"::1:8080\""),
            "2:14: listen.addresses: `::1:8080` is an IPv6 address without brackets; write [::1]:8080",
        );
        assert_err(
            &p("\"127.0.0.1:80\", \"127.0.0.1:80\""),
            "2:30: listen.addresses lists 127.0.0.1:80 twice",
        );
        assert_err(
            &p("\"unix:\""),
            "2:14: listen.addresses: the unix socket path is empty; write e.g. unix:/run/app.sock",
        );
        let long = format!("\"unix:/{}\"", "a".repeat(107));
        assert_err(
            &p(&long),
            "2:14: listen.addresses: the unix socket path is 108 bytes long; the limit is 107 bytes",
        );
        let ok = format!("\"unix:/{}\"", "a".repeat(106));
        assert_eq!(parse(&p(&ok)).listen.addresses.len(), 1);
        assert_err(
            &p("\"unix:@abstract\""),
            "2:14: listen.addresses: abstract unix sockets (`unix:@…`) are not supported; use a filesystem path",
        );
        assert_err(
            &p("\"unix:/a\\u0000b\""),
            "2:14: listen.addresses: the unix socket path contains a NUL byte",
        );
        assert_err(
            &p("\"http://x/\""),
            "2:14: listen.addresses: `http://x/` is not a listen address; expected IP:PORT (127.0.0.1:8080, [::1]:8080) or unix:/path",
        );
        assert_err(
            &p("80"),
            "2:14: listen.addresses must be an address string or a table { address = \"…\", name = \"…\" }, found integer 80",
        );
        assert_err(
            &p("{ name = \"x\" }"),
            "2:14: listen.addresses entry has no address; add address = \"127.0.0.1:8080\" or similar",
        );
        assert_err(
            &p("{ address = 1 }"),
            "2:14: listen.addresses entry: address must be a string, found integer 1",
        );
        assert_err(
            &p("{ address = \"127.0.0.1:1\", name = 1 }"),
            "2:14: listen.addresses entry: name must be a string, found integer 1",
        );
        assert_err(
            &p("{ address = \"127.0.0.1:1\", name = \"a:b\" }"),
            "2:14: listen.addresses: name \"a:b\" contains ':'; names are printable ASCII without `:` (sd_listen_fds(3))",
        );
        assert_err(
            &p("{ address = \"127.0.0.1:1\", name = \"tab\\there\" }"),
            "2:14: listen.addresses: name \"tab\\there\" contains '\\t'; names are printable ASCII without `:` (sd_listen_fds(3))",
        );
        assert_err(
            &p("{ address = \"127.0.0.1:1\", name = \"\" }"),
            "2:14: listen.addresses: name must be 1 to 255 characters long (sd_listen_fds(3))",
        );
        let name = format!(
            "{{ address = \"127.0.0.1:1\", name = \"{}\" }}",
            "n".repeat(256)
        );
        assert_err(
            &p(&name),
            "2:14: listen.addresses: name must be 1 to 255 characters long (sd_listen_fds(3))",
        );
        assert_err(
            "[listen]\nbacklog = 0",
            "2:11: listen.backlog (0) must be a whole number from 1 to 65535",
        );
        assert_err(
            "[listen]\nbacklog = 65536",
            "2:11: listen.backlog (65536) must be a whole number from 1 to 65535",
        );
        assert_err(
            "[listen]\nsocket_mode = 0o660",
            "2:15: listen.socket_mode must be an octal string such as \"0660\", found integer 432",
        );
        assert_err(
            "[listen]\nsocket_mode = \"0999\"",
            "2:15: listen.socket_mode \"0999\" is not an octal mode; expected e.g. \"0660\"",
        );
        assert_err(
            "[listen]\nsocket_mode = \"+660\"",
            "2:15: listen.socket_mode \"+660\" is not an octal mode; expected e.g. \"0660\"",
        );
        assert_err(
            "[listen]\nsocket_mode = \"1777\"",
            "2:15: listen.socket_mode \"1777\" is more than 0777; only permission bits are allowed",
        );
        assert_err(
            "[listen]\nsocket_user = \"\"",
            "2:15: listen.socket_user must not be empty; remove the key instead",
        );
        assert_err(
            "[listen]\nsocket_group = 5",
            "2:16: listen.socket_group must be a string, found integer 5",
        );
    }

    #[test]
    fn worker_errors() {
        let w = |line: &str| format!("[worker]\n{line}");
        assert_err(
            &w("command = 5"),
            "2:11: worker.command must be an array of strings or a string, found integer 5",
        );
        assert_err(
            &w("command = [\"a\", 1]"),
            "2:11: worker.command[1] must be a string, found integer 1",
        );
        assert_err(
            &w("command = [\"\", \"x\"]"),
            "2:11: worker.command starts with an empty program name",
        );
        assert_err(
            &w("command = [\"a\\u0000b\"]"),
            "2:11: worker.command argument \"a\\0b\" contains a NUL byte",
        );
        assert_err(
            &w("working_directory = \"\""),
            "2:21: worker.working_directory must not be empty; remove the key instead",
        );
        assert_err(
            &w("user = \"a\\u0000\""),
            "2:8: worker.user must not contain a NUL byte",
        );
        assert_err(
            &w("environment = { \"A=B\" = \"x\" }"),
            "2:25: environment variable name \"A=B\" must be non-empty and contain no `=` or NUL",
        );
        assert_err(
            &w("environment = { \"\" = \"x\" }"),
            "2:22: environment variable name \"\" must be non-empty and contain no `=` or NUL",
        );
        assert_err(
            &w("[worker.environment]\nLISTEN_FDS = \"3\""),
            "3:14: environment variable LISTEN_FDS is set by droved for each worker; remove it",
        );
        assert_err(
            &w("environment = { A = 1.5 }"),
            "2:21: worker.environment.A must be a string, integer or boolean, found float 1.5",
        );
        assert_err(
            &w("environment = { A = \"\\u0000\" }"),
            "2:21: worker.environment.A must not contain a NUL byte",
        );
        assert_err(
            &w("environment = 3"),
            "2:15: invalid type: integer `3`, expected worker.environment as a table, e.g. { NAME = \"value\" }",
        );
        assert_err(
            &w("ready = \"simple\""),
            "2:9: worker.ready: unknown ready mode `simple`; expected \"notify\" or \"exec\"",
        );
        assert_err(
            &w("ready = true"),
            "2:9: worker.ready must be \"notify\" or \"exec\", found boolean true",
        );
        assert_err(
            &w("stop_signal = \"SIGFOO\""),
            "2:15: worker.stop_signal: `SIGFOO` is not a signal name; expected e.g. \"SIGTERM\", \"SIGINT\", \"SIGQUIT\"",
        );
        assert_err(
            &w("stop_signal = \"15\""),
            "2:15: worker.stop_signal: `15`: give the signal by name, e.g. \"SIGTERM\" or \"SIGQUIT\"",
        );
        assert_err(
            &w("stop_signal = 15"),
            "2:15: worker.stop_signal must be a signal name such as \"SIGTERM\", found integer 15",
        );
        assert_err(
            &w("ready_timeout = \"0s\""),
            "2:17: worker.ready_timeout must be greater than zero",
        );
        assert_err(
            &w("stop_timeout = 0"),
            "2:16: worker.stop_timeout must be greater than zero",
        );
        assert_err(
            &w("stop_timeout = 30"),
            "2:16: worker.stop_timeout must be a duration string with a unit, e.g. \"30s\" or \"30ms\", found integer 30",
        );
        assert_err(
            &w("stop_timeout = 1.5"),
            "2:16: worker.stop_timeout must be a duration string such as \"30s\" or \"100ms\", found float 1.5",
        );
        assert_err(
            &w("watchdog = \"9ms\""),
            "2:12: worker.watchdog (9ms) must be at least 10ms",
        );
        assert_err(
            &w("restart_delay = \"0\""),
            "2:17: worker.restart_delay must be greater than zero",
        );
        assert_err(
            &w("restart_delay = \"20s\""),
            "2:17: worker.restart_delay (20s) must not exceed worker.restart_delay_max (10s)",
        );
        assert_err(
            &w("restart_delay_max = \"50ms\""),
            "2:21: worker.restart_delay (100ms) must not exceed worker.restart_delay_max (50ms)",
        );
        assert_err(
            &w("min_uptime = \"0ms\""),
            "2:14: worker.min_uptime must be greater than zero",
        );
        assert_err(
            &w("max_lifetime = \"0\""),
            "2:16: worker.max_lifetime must be greater than zero",
        );
        assert_err(
            &w("max_lifetime_jitter = \"1m\""),
            "2:23: worker.max_lifetime_jitter has no effect without worker.max_lifetime; set both or remove it",
        );
        assert_err(
            &w("max_rss = \"0\""),
            "2:11: worker.max_rss must be greater than zero; remove the key for no limit",
        );
        assert_err(
            &w("max_rss = -1"),
            "2:11: worker.max_rss (-1) must not be negative",
        );
        assert_err(
            &w("max_rss = \"512MB\""),
            "2:11: worker.max_rss: `512MB`: `MB` is ambiguous; write `MiB` (1024-based, like systemd's `M`)",
        );
        assert_err(
            &w("max_rss = true"),
            "2:11: worker.max_rss must be a size such as \"512MiB\" or a byte count, found boolean true",
        );
    }

    #[test]
    fn pool_and_scale_errors() {
        assert_err(
            "[pool]\nmin = 10\nmax = 4",
            "2:7: pool.min (10) must not exceed pool.max (4)",
        );
        assert_err(
            "[pool]\nmin = 10",
            "2:7: pool.min (10) must not exceed pool.max (8)",
        );
        assert_err(
            "[pool]\nmax = 1",
            "2:7: pool.min (2) must not exceed pool.max (1)",
        );
        assert_err(
            "[pool]\nmin = 0",
            "2:7: pool.min (0) must be a whole number from 1 to 4096",
        );
        assert_err(
            "[pool]\nmax = 0",
            "2:7: pool.max (0) must be a whole number from 1 to 4096",
        );
        assert_err(
            "[pool]\nmax = 4097",
            "2:7: pool.max (4097) must be a whole number from 1 to 4096",
        );
        assert_err(
            "[pool]\nmin = -1",
            "2:7: pool.min (-1) must be a whole number from 1 to 4096",
        );
        assert_err(
            "[pool]\nmin = 1.0",
            "2:7: pool.min must be a whole number from 1 to 4096, found float 1",
        );
        assert_err(
            "[pool]\nmin = 2\nmax = 4\ninitial = 5",
            "4:11: pool.initial (5) must be between pool.min (2) and pool.max (4)",
        );
        assert_err(
            "[pool]\ninitial = 1",
            "2:11: pool.initial (1) must be between pool.min (2) and pool.max (8)",
        );
        assert_err(
            "[pool]\nspawn_rate = 0",
            "2:14: pool.spawn_rate (0) must be a whole number from 1 to 10000",
        );
        assert_err(
            "[scale]\ninterval = \"5ms\"",
            "2:12: scale.interval (5ms) must be at least 10ms",
        );
        assert_err(
            "[scale]\ninterval = \"2s\"",
            "2:12: scale.window (1s) must be at least scale.interval (2s)",
        );
        assert_err(
            "[scale]\nwindow = \"10ms\"",
            "2:10: scale.window (10ms) must be at least scale.interval (100ms)",
        );
        assert_err(
            "[scale]\ncooldown = \"10\"",
            "2:12: scale.cooldown: `10` has no unit; write e.g. \"10s\" or \"10ms\"",
        );
        assert_err(
            "[scale]\ncpu_guard = \"yes\"",
            "2:13: scale.cpu_guard must be true or false, found string \"yes\"",
        );
        assert_err(
            "[control]\ngroup = \"\"",
            "2:9: control.group must not be empty; remove the key instead",
        );
    }

    #[test]
    fn error_accessors() {
        let e = Config::from_toml_str("[pool]\nmin = 10\nmax = 4", Path::new(ORIGIN)).unwrap_err();
        assert_eq!(e.path(), Some(Path::new(ORIGIN)));
        assert_eq!(e.position(), Some(Position { line: 2, column: 7 }));
        assert_eq!(e.key(), Some("pool.min"));
        assert_eq!(e.full_message(), e.to_string());

        let missing = Path::new("/nonexistent/drove.toml");
        let e = Config::load(missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert_eq!(
            e.to_string(),
            "/nonexistent/drove.toml: cannot read the config file"
        );
        assert_eq!(
            e.full_message(),
            "/nonexistent/drove.toml: cannot read the config file: No such file or directory (os error 2)"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(e.position(), None);
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
        c.pool.min = 0;
        assert_eq!(
            c.validate_runnable().unwrap_err().to_string(),
            "pool.min must be at least 1"
        );
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
    fn listen_addr_round_trip() {
        for s in [
            "127.0.0.1:8080",
            "[::1]:8080",
            "0.0.0.0:0",
            "[::]:443",
            "unix:/run/x.sock",
            "unix:rel.sock",
        ] {
            let a: ListenAddr = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        assert_eq!(
            "[::1]:80".parse::<ListenAddr>(),
            Ok(ListenAddr::Tcp(SocketAddr::from((Ipv6Addr::LOCALHOST, 80))))
        );
        assert_eq!(
            "example.com:80".parse::<ListenAddr>(),
            Err(ListenAddrError::HostName {
                host: "example.com".into(),
                port: 80
            })
        );
        assert!(matches!(
            "*:80".parse::<ListenAddr>(),
            Err(ListenAddrError::NoHost { .. })
        ));
        assert!(matches!(
            "127.0.0.1:65536".parse::<ListenAddr>(),
            Err(ListenAddrError::Invalid(_))
        ));
        assert!(matches!(
            "".parse::<ListenAddr>(),
            Err(ListenAddrError::Invalid(_))
        ));
        assert!(matches!(
            "127.0.0.1".parse::<ListenAddr>(),
            Err(ListenAddrError::Invalid(_))
        ));
    }

    #[test]
    fn durations() {
        let ok = |s: &str| parse_duration(s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok("100ms"), Duration::from_millis(100));
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("2min"), Duration::from_secs(120));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("1d"), Duration::from_secs(86400));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("0.25h"), Duration::from_secs(900));
        assert_eq!(ok("0.000000001s"), Duration::from_nanos(1));
        assert_eq!(ok("1.5ms"), Duration::from_micros(1500));
        assert_eq!(ok(" 10 s "), Duration::from_secs(10));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("0.0"), Duration::ZERO);
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("18446744073.709551615s"), Duration::from_nanos(u64::MAX));
        for bad in [
            "",
            "s",
            "10",
            "1.5",
            "-1s",
            "1.s",
            ".5s",
            "1..5s",
            "1.2.3s",
            "10 sec",
            "10S",
            "1e3s",
            "5us",
            "1.0000000001s",
            "18446744073.709551616s",
            "213503982336d",
            "99999999999999999999999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            parse_duration("213503982336d").unwrap_err(),
            "`213503982336d` is too large for a duration (at most about 584 years)"
        );
        assert_eq!(
            parse_duration("10 sec").unwrap_err(),
            "`10 sec` has an unknown unit `sec`; expected one of ms, s, m, min, h, d"
        );
        assert_eq!(
            parse_duration("1.0000000001s").unwrap_err(),
            "`1.0000000001s` has more than 9 decimal places; durations are precise to the nanosecond"
        );
    }

    #[test]
    fn format_duration_round_trips() {
        for (d, s) in [
            (Duration::ZERO, "0"),
            (Duration::from_millis(100), "100ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_secs(86400), "1d"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_micros(1500), "0.0015s"),
            (Duration::from_nanos(1), "0.000000001s"),
        ] {
            assert_eq!(format_duration(d), s);
            assert_eq!(parse_duration(s), Ok(d));
        }
        let max = Duration::from_nanos(u64::MAX);
        assert_eq!(parse_duration(&format_duration(max)), Ok(max));
    }

    #[test]
    fn sizes() {
        let ok = |s: &str| parse_size(s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok("1048576"), 1 << 20);
        assert_eq!(ok("0"), 0);
        assert_eq!(ok("100B"), 100);
        assert_eq!(ok("1K"), 1024);
        assert_eq!(ok("1kib"), 1024);
        assert_eq!(ok("512MiB"), 512 << 20);
        assert_eq!(ok("100M"), 100 << 20);
        assert_eq!(ok("1GiB"), 1 << 30);
        assert_eq!(ok("1 G"), 1 << 30);
        assert_eq!(ok("2T"), 2 << 40);
        assert_eq!(ok("16777215TiB"), 16777215 << 40);
        assert_eq!(ok("18446744073709551615"), u64::MAX);
        for bad in [
            "",
            "M",
            "1.5G",
            "-1",
            "1PiB",
            "1MB",
            "1kb",
            "16777216TiB",
            "18446744073709551616",
            "1 2M",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            parse_size("16777216TiB").unwrap_err(),
            "`16777216TiB` is too large (at most 16 EiB)"
        );
        assert_eq!(
            parse_size("1gb").unwrap_err(),
            "`1gb`: `gb` is ambiguous; write `GiB` (1024-based, like systemd's `G`)"
        );
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("SIGTERM"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("TERM"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("sigquit"), Ok(Signal::SIGQUIT));
        assert_eq!(parse_signal("int"), Ok(Signal::SIGINT));
        assert_eq!(parse_signal("SIGKILL"), Ok(Signal::SIGKILL));
        assert!(parse_signal("").is_err());
        assert!(parse_signal("SIG").is_err());
        assert!(parse_signal("15").is_err());
        assert!(parse_signal("SIGTERMX").is_err());
    }

    #[test]
    fn unknown_key_table_matches_structs() {
        // Every key listed for error messages is accepted by the parser, so
        // the lists cannot drift from the Raw* structs unnoticed.
        for (section, keys) in SECTIONS {
            for key in *keys {
                let doc = match *section {
                    "the top level" => format!("[{key}]"),
                    s => format!("{s}\n{key} = \"\\u0001\""),
                };
                if let Err(e) = Config::from_toml_str(&doc, Path::new(ORIGIN)) {
                    assert!(!e.to_string().contains("unknown key"), "{doc}: {e}");
                }
            }
        }
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
}
