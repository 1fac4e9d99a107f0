//! How drovectl reaches droved: a bus (system or session), droved's
//! private socket (D-Bus peer-to-peer, no bus daemon needed), or the system
//! bus of another host through ssh and `systemd-stdio-bridge` (`-H`), the
//! way `systemctl -H` does.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

use zbus::Connection;
use zbus::names::InterfaceName;
use zbus::proxy::CacheProperties;

use super::CtlError;
use crate::bus::{self, BusKind};
use crate::sys::control_socket::SOCKET_NAME;
use crate::sys::notify_socket::path_component;

/// How long ssh may take to reach the host (`-o ConnectTimeout=`).
pub const SSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a verb's messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    Bus(BusKind),
    /// droved's private socket at this path.
    Private(PathBuf),
    /// The system bus of a host, through ssh.
    Remote(Host),
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Via::Bus(kind) => write!(f, "the {kind} bus"),
            Via::Private(path) => write!(f, "droved's private socket {}", path.display()),
            Via::Remote(host) => write!(f, "the system bus of {}", host.spec),
        }
    }
}

// ---- the private socket ---------------------------------------------------

/// The directories droveds keep their runtime directories in, the caller's
/// own first: `$XDG_RUNTIME_DIR/drove` (droveds run by this user), then
/// `/run/drove` (root's, and services').
pub fn private_bases() -> Vec<PathBuf> {
    let mut bases = Vec::new();
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| Path::new(x).is_absolute()) {
        bases.push(Path::new(&x).join("drove"));
    }
    let run = PathBuf::from("/run/drove");
    if !bases.contains(&run) {
        bases.push(run);
    }
    bases
}

/// The private sockets that may belong to `instance`, in the order tried.
pub fn private_paths(instance: &str) -> Vec<PathBuf> {
    private_bases()
        .into_iter()
        .map(|base| base.join(path_component(instance)).join(SOCKET_NAME))
        .collect()
}

/// Every private socket in the bases (`<base>/<dir>/private`), sorted.
pub fn private_sockets() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for base in private_bases() {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        let mut here: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path().join(SOCKET_NAME))
            .filter(|p| is_socket(p))
            .collect();
        here.sort();
        found.extend(here);
    }
    found
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// How long drovectl keeps trying while the private socket's listen queue
/// is full (EAGAIN): others flooding it with connections droved turns
/// away at accept must not make root's call fail.
const FULL_QUEUE_PATIENCE: Duration = Duration::from_secs(5);

/// Connects to the unix socket at `path`, again and again (backing off
/// from 1 ms to 50 ms) while its listen queue is full, for up to
/// `patience`.
async fn connect_stream(path: &Path, patience: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_millis(1);
    loop {
        match UnixStream::connect(path).await {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && Instant::now() < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Connects to the private socket at `path`.
pub async fn connect_private(path: &Path, timeout: Duration) -> Result<Connection, String> {
    let stream = connect_stream(path, FULL_QUEUE_PATIENCE.min(timeout))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    let build = zbus::connection::Builder::unix_stream(stream)
        .p2p()
        .method_timeout(timeout)
        .build();
    // A live socket answers at once; one that does not is not droved.
    match tokio::time::timeout(Duration::from_secs(5), build).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(format!("{}: {e}", path.display())),
        Err(_) => Err(format!("{}: no answer within 5 s", path.display())),
    }
}

/// The Instance property of the droved at the other end of a p2p `conn`.
pub async fn instance_of(conn: &Connection) -> zbus::Result<String> {
    // A destination is required, and ignored peer-to-peer.
    let props = zbus::fdo::PropertiesProxy::builder(conn)
        .destination(bus::INTERFACE)?
        .path(bus::OBJECT_PATH)?
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    let value = props
        .get(
            InterfaceName::from_static_str_unchecked(bus::INTERFACE),
            "Instance",
        )
        .await?;
    Ok(String::try_from(value)?)
}

/// The droved serving `instance` on a private socket, if one does: at
/// its usual paths, else at any other (a second droved of the same name
/// uses `<dir>.<pid>`; systemd's `%i` may escape a name differently).
pub async fn find_private(
    instance: &str,
    timeout: Duration,
) -> Result<Option<(PathBuf, Connection)>, CtlError> {
    let usual = private_paths(instance);
    let others = private_sockets().into_iter().filter(|p| !usual.contains(p));
    for path in usual.clone().into_iter().chain(others) {
        if !is_socket(&path) {
            continue;
        }
        // A stale file (droved killed) refuses: look on.
        let Ok(conn) = connect_private(&path, timeout).await else {
            continue;
        };
        // Names that map to the same directory are told apart here.
        if instance_of(&conn).await.is_ok_and(|i| i == instance) {
            return Ok(Some((path, conn)));
        }
    }
    Ok(None)
}

/// Every droved reachable on a private socket: (instance, path).
pub async fn private_instances(timeout: Duration) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for path in private_sockets() {
        let Ok(conn) = connect_private(&path, timeout).await else {
            continue;
        };
        if let Ok(instance) = instance_of(&conn).await {
            found.push((instance, path));
        }
    }
    found
}

// ---- -H: another host's system bus through ssh --------------------------

/// `[user@]host[:port]`, as `systemctl -H` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// As given, for messages.
    pub spec: String,
    /// `[user@]host` for ssh (an IPv6 address without its brackets).
    pub destination: String,
    pub port: Option<u16>,
}

impl std::str::FromStr for Host {
    type Err = String;

    fn from_str(spec: &str) -> Result<Host, String> {
        let bad = |why: &str| {
            Err(format!(
                "bad host {spec:?}: {why} (expected [USER@]HOST[:PORT])"
            ))
        };
        if spec.is_empty() || spec.starts_with('-') || spec.chars().any(char::is_whitespace) {
            return bad("empty, starting with '-' or containing spaces");
        }
        let (user, rest) = match spec.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (Some(u), r),
            Some(_) => return bad("empty user"),
            None => (None, spec),
        };
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let Some((addr, after)) = inner.split_once(']') else {
                return bad("unclosed '['");
            };
            match after {
                "" => (addr, None),
                p => match p.strip_prefix(':') {
                    Some(p) => (addr, Some(p)),
                    None => return bad("junk after ']'"),
                },
            }
        } else if rest.matches(':').count() == 1 {
            let (h, p) = rest.split_once(':').expect("one colon");
            (h, Some(p))
        } else {
            // No colon, or a bare IPv6 address: no port.
            (rest, None)
        };
        if host.is_empty() {
            return bad("empty host");
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return bad("the port must be a number from 1 to 65535"),
            },
        };
        let destination = match user {
            Some(u) => format!("{u}@{host}"),
            None => host.to_string(),
        };
        Ok(Host {
            spec: spec.to_string(),
            destination,
            port,
        })
    }
}

impl Host {
    /// The command sd-bus runs for `systemctl -H` (`ssh -xT [-p PORT] --
    /// [USER@]HOST systemd-stdio-bridge`), with a bounded ConnectTimeout.
    /// `$SYSTEMD_SSH` names another ssh, as for systemctl.
    pub fn command(&self) -> (OsString, Vec<OsString>) {
        let ssh = std::env::var_os("SYSTEMD_SSH")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "ssh".into());
        let mut args: Vec<OsString> = vec!["-xT".into()];
        if let Some(p) = self.port {
            args.push("-p".into());
            args.push(p.to_string().into());
        }
        args.push("-o".into());
        args.push(format!("ConnectTimeout={}", SSH_CONNECT_TIMEOUT.as_secs()).into());
        args.push("--".into());
        args.push(self.destination.clone().into());
        args.push("systemd-stdio-bridge".into());
        (ssh, args)
    }
}

/// A connection to the system bus of `host`; the ssh process ends when
/// the connection closes (drovectl exits).
pub async fn connect_remote(host: &Host, timeout: Duration) -> Result<Connection, CtlError> {
    let (ssh, args) = host.command();
    let shown = std::iter::once(&ssh)
        .chain(&args)
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let argv: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let mut peer = crate::sys::spawn::spawn_stdio_peer(&ssh, &argv).map_err(|e| {
        CtlError::Failed(format!(
            "{}: cannot run {}: {e}",
            host.spec,
            ssh.to_string_lossy()
        ))
    })?;
    // Collected while we wait; shown only if the connection fails.
    let stderr = peer.child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            use std::io::Read;
            let mut text = Vec::new();
            let _ = (&mut err).take(16 * 1024).read_to_end(&mut text);
            String::from_utf8_lossy(&text).trim().to_string()
        })
    });
    let built = async {
        peer.socket.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(peer.socket)?;
        zbus::connection::Builder::unix_stream(stream)
            .method_timeout(timeout)
            .build()
            .await
    };
    // ssh gives up after ConnectTimeout; the rest (login, the bridge) gets
    // as long again.
    let limit = SSH_CONNECT_TIMEOUT * 2 + Duration::from_secs(5);
    let result = tokio::time::timeout(limit, built).await;
    let error = match result {
        Ok(Ok(conn)) => {
            // ssh lives as long as the connection (dropping the handle
            // neither kills nor waits): drovectl exits, the socket closes,
            // ssh ends.
            drop(peer.child);
            return Ok(conn);
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no D-Bus answer within {}s", limit.as_secs()),
    };
    let _ = peer.child.kill();
    let status = peer.child.wait().ok();
    let said = stderr.and_then(|t| t.join().ok()).filter(|s| !s.is_empty());
    Err(CtlError::Failed(remote_failure(
        host,
        &shown,
        status.and_then(|s| s.code()),
        said.as_deref(),
        &error,
    )))
}

/// What went wrong reaching `host`, from ssh's exit status and stderr.
pub fn remote_failure(
    host: &Host,
    command: &str,
    code: Option<i32>,
    stderr: Option<&str>,
    error: &str,
) -> String {
    let said = stderr
        .map(|s| format!(": {}", s.lines().last().unwrap_or(s)))
        .unwrap_or_default();
    let missing = stderr.is_some_and(|s| {
        s.contains("systemd-stdio-bridge")
            && (s.contains("not found") || s.contains("No such file"))
    });
    match code {
        _ if missing => format!(
            "{}: systemd-stdio-bridge is missing on that host (it comes with systemd){said}",
            host.spec
        ),
        Some(127) => format!(
            "{}: systemd-stdio-bridge is missing on that host (exit status 127){said}",
            host.spec
        ),
        Some(255) => format!("{}: ssh failed ({command}){said}", host.spec),
        Some(c) => format!(
            "{}: systemd-stdio-bridge exited with status {c}; is the system bus running there?{said}",
            host.spec
        ),
        None => format!(
            "{}: cannot reach its system bus over ssh ({command}): {error}{said}",
            host.spec
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn hosts_as_systemctl_takes_them() {
        assert_eq!(
            host("root@web1:2222"),
            Host {
                spec: "root@web1:2222".into(),
                destination: "root@web1".into(),
                port: Some(2222)
            }
        );
        assert_eq!(host("web1").destination, "web1");
        assert_eq!(host("web1").port, None);
        assert_eq!(host("[::1]:22").destination, "::1");
        assert_eq!(host("[::1]:22").port, Some(22));
        assert_eq!(host("admin@[fe80::1]").destination, "admin@fe80::1");
        assert_eq!(host("::1").port, None);
        for bad in [
            "",
            "-oProxyCommand=x",
            "a b",
            "h:",
            "h:0",
            "h:99999",
            "@h",
            "[::1",
            "[::1]x",
        ] {
            assert!(bad.parse::<Host>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_ssh_command_is_systemctls_with_a_timeout() {
        let (_, args) = host("root@127.0.0.1:2222").command();
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
        assert_eq!(
            args,
            [
                "-xT",
                "-p",
                "2222",
                "-o",
                "ConnectTimeout=10",
                "--",
                "root@127.0.0.1",
                "systemd-stdio-bridge"
            ]
        );
    }

    #[test]
    fn failures_say_what_failed() {
        let h = host("root@db2");
        let ssh = remote_failure(
            &h,
            "ssh ...",
            Some(255),
            Some("ssh: connect to host db2 port 22: Connection refused"),
            "EOF",
        );
        assert!(ssh.starts_with("root@db2: ssh failed"), "{ssh}");
        assert!(ssh.ends_with("Connection refused"), "{ssh}");
        let missing = remote_failure(
            &h,
            "ssh ...",
            Some(127),
            Some("bash: line 1: systemd-stdio-bridge: command not found"),
            "EOF",
        );
        assert!(
            missing.contains("systemd-stdio-bridge is missing on that host"),
            "{missing}"
        );
        let bus = remote_failure(&h, "ssh ...", Some(1), None, "EOF");
        assert!(bus.contains("is the system bus running there?"), "{bus}");
    }

    #[test]
    fn private_paths_prefer_the_users_own() {
        let paths = private_paths("web/1");
        assert!(paths.last().unwrap().starts_with("/run/drove"));
        assert!(
            paths.iter().all(|p| p.ends_with("web_1/private")),
            "{paths:?}"
        );
    }
}
