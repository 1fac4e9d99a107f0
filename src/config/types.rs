// SPDX-License-Identifier: MIT OR Apache-2.0
//! The typed configuration sections ([`ListenConfig`], [`WorkerConfig`],
//! [`PoolConfig`], [`ScaleConfig`], [`ControlConfig`]) with their defaults,
//! and the small value types they hold ([`ListenAddr`], [`ReadyMode`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::{DEFAULT_LISTEN_NAME, MAX_UNIX_PATH};

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
    /// May be empty in the file; see [`super::Config::validate_runnable`].
    pub command: Vec<String>,
    pub working_directory: Option<PathBuf>,
    pub environment: BTreeMap<String, String>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// How workers are created; default [`WorkerMode::Exec`].
    pub mode: WorkerMode,
    /// Where workers find the listener; default [`WorkerSocket::Systemd`].
    pub socket: WorkerSocket,
    /// Default [`ReadyMode::Exec`].
    pub ready: ReadyMode,
    /// How long a starting worker may take to become ready; default 30s.
    pub ready_timeout: Duration,
    /// Signal for a graceful stop; default SIGTERM.
    pub stop_signal: Signal,
    /// Grace period after `stop_signal` before SIGKILL; default 30s.
    pub stop_timeout: Duration,
    /// Sent first to a worker that timed out (the watchdog), for a
    /// traceback or a core, as systemd's `WatchdogSignal=`; SIGKILL
    /// follows after [`ABORT_GRACE`](super::ABORT_GRACE). Default SIGABRT.
    pub timeout_signal: Signal,
    /// `WATCHDOG_USEC` given to workers; default none.
    pub watchdog: Option<Duration>,
    /// A worker on one request (over TCP) longer than this is aborted
    /// with `timeout_signal`, as uWSGI's `harakiri`; default none.
    pub request_timeout: Option<Duration>,
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
    /// Let workers run as root (uid 0) when droved does; default false:
    /// a root droved refuses to start root workers under systemd, and
    /// warns when run by hand (see `Config::check_worker_uid`).
    pub allow_root: bool,
    /// Names of droved's own environment variables passed on to workers
    /// (besides PATH, LANG, LC_*, TZ, which always are); default none.
    pub inherit_environment: Vec<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            command: Vec::new(),
            working_directory: None,
            environment: BTreeMap::new(),
            user: None,
            group: None,
            mode: WorkerMode::Exec,
            socket: WorkerSocket::Systemd,
            ready: ReadyMode::Exec,
            ready_timeout: Duration::from_secs(30),
            stop_signal: Signal::SIGTERM,
            timeout_signal: Signal::SIGABRT,
            stop_timeout: Duration::from_secs(30),
            watchdog: None,
            request_timeout: None,
            restart_delay: Duration::from_millis(100),
            restart_delay_max: Duration::from_secs(10),
            min_uptime: Duration::from_secs(1),
            max_lifetime: None,
            max_lifetime_jitter: Duration::ZERO,
            max_rss: None,
            allow_root: false,
            inherit_environment: Vec::new(),
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

/// Why a string is not a [`ReadyMode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown ready mode `{0}`; expected \"notify\" or \"exec\"")]
pub struct ReadyModeError(pub String);

impl FromStr for ReadyMode {
    type Err = ReadyModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "notify" => Ok(ReadyMode::Notify),
            "exec" => Ok(ReadyMode::Exec),
            _ => Err(ReadyModeError(s.to_owned())),
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
    /// Never fewer workers than this (default 2). 0 means on demand: no
    /// worker while no connection waits (docs: "Scale to zero").
    pub min: u32,
    /// Never more workers than this; at most [`super::MAX_WORKERS`] (default 8).
    pub max: u32,
    /// Workers started at boot; default `min`.
    pub initial: Option<u32>,
    /// Forks per second at most; default 50.
    pub spawn_rate: u32,
    /// With `min = 0` under socket activation: exit 0 after this long at
    /// zero workers (systemd's socket unit starts droved again). Off: None.
    pub idle_exit: Option<Duration>,
    /// Idle workers kept ready beside the busy ones, within `max`
    /// (PHP-FPM's `pm.min_spare_servers`, uWSGI's spares); default 0.
    pub spare: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min: 2,
            max: 8,
            initial: None,
            spawn_rate: 50,
            idle_exit: None,
            spare: 0,
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

/// `[rollout]`: how a reload's new generation is tried before it takes
/// over, and when it is undone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutConfig {
    /// New-generation workers started first (0: no canary phase).
    pub canary: u32,
    /// How long the canaries serve real traffic before the rest rolls.
    pub observe: Duration,
    /// Failures of new-generation workers (exits, watchdog kills) from the
    /// rollout's start to its end that undo it; 1: the first one does.
    pub max_failures: u32,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            canary: 1,
            observe: Duration::from_secs(30),
            max_failures: 1,
        }
    }
}

/// `[control]`: who may change the pool over D-Bus.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControlConfig {
    /// Group allowed to call mutating D-Bus methods besides root.
    pub group: Option<String>,
}

/// `[metrics]`: where droved serves Prometheus metrics (`crate::metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetricsConfig {
    /// `/metrics` is served here; `None` (the default): no metrics.
    pub listen: Option<ListenAddr>,
}

/// `[stop]`: how a graceful stop (SIGTERM) begins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopConfig {
    /// Drain first: for this long after SIGTERM the workers keep accepting
    /// while `/readyz` answers 503, so a load balancer takes the instance
    /// out before they stop. Zero (the default): stop at once.
    pub delay: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

/// How workers are created (docs/template.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerMode {
    /// fork+exec of the command for every worker.
    #[default]
    Exec,
    /// One template per generation runs the command, loads the app once and
    /// forks workers on droved's request.
    Template,
}

/// Why a string is not a [`WorkerMode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown worker mode `{0}`; expected \"exec\" or \"template\"")]
pub struct WorkerModeError(pub String);

impl FromStr for WorkerMode {
    type Err = WorkerModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "exec" => Ok(WorkerMode::Exec),
            "template" => Ok(WorkerMode::Template),
            _ => Err(WorkerModeError(s.to_owned())),
        }
    }
}

impl fmt::Display for WorkerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkerMode::Exec => "exec",
            WorkerMode::Template => "template",
        })
    }
}

/// Where a worker finds its listening socket (`worker.socket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerSocket {
    /// sd_listen_fds(3): the listeners at fds 3, 4, … with `LISTEN_FDS`,
    /// `LISTEN_PID` and `LISTEN_FDNAMES` set.
    #[default]
    Systemd,
    /// The FastCGI convention (`FCGI_LISTENSOCK_FILENO`), as spawn-fcgi and
    /// mod_fcgid start servers such as `php-cgi`: the one listener is fd 0,
    /// no `LISTEN_*` variable is set, stdout and stderr are unchanged.
    Stdin,
}

/// Why a string is not a [`WorkerSocket`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown socket convention `{0}`; expected \"systemd\" or \"stdin\"")]
pub struct WorkerSocketError(pub String);

impl FromStr for WorkerSocket {
    type Err = WorkerSocketError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "systemd" => Ok(WorkerSocket::Systemd),
            "stdin" => Ok(WorkerSocket::Stdin),
            _ => Err(WorkerSocketError(s.to_owned())),
        }
    }
}

impl fmt::Display for WorkerSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkerSocket::Systemd => "systemd",
            WorkerSocket::Stdin => "stdin",
        })
    }
}
