//! Listening sockets: taken from systemd, or bound by droved itself.
//!
//! Both paths end in the same `Vec<Listener>`: owned, CLOEXEC, listening
//! stream sockets with a name (systemd's FileDescriptorName=), handed to
//! every worker at fds 3.. (sd_listen_fds(3)). droved never accepts on them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrLike,
    SockaddrStorage, UnixAddr, sockopt,
};

/// What kind of socket a listener is; decides how its queue is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Tcp,
    Unix,
    Other,
}

/// One listening socket owned by droved.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    /// FileDescriptorName= (no ':' allowed, sd_listen_fds_with_names(3)).
    pub name: String,
    pub family: Family,
    /// Human-readable address: `127.0.0.1:8080`, `[::1]:80`, `unix:/run/x.sock`.
    pub address: String,
    /// A unix socket file droved created and removes when it stops for good.
    pub owned_path: Option<PathBuf>,
}

impl Listener {
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Describes an already-listening fd (from systemd or a handover).
    pub fn from_fd(fd: OwnedFd, name: String) -> io::Result<Listener> {
        let raw = fd.as_raw_fd();
        if !socket::getsockopt(&fd, sockopt::AcceptConn).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("fd {raw} ({name}) is not a socket: {e}"),
            )
        })? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "fd {raw} ({name}) is not a listening socket; drove needs Accept=no stream sockets"
                ),
            ));
        }
        if socket::getsockopt(&fd, sockopt::SockType)? != SockType::Stream {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {raw} ({name}) is not a stream socket"),
            ));
        }
        let local: SockaddrStorage = socket::getsockname(raw)?;
        let (family, address) = describe(&local);
        Ok(Listener {
            fd,
            name,
            family,
            address,
            owned_path: None,
        })
    }
}

fn describe(addr: &SockaddrStorage) -> (Family, String) {
    match addr.family() {
        Some(AddressFamily::Inet) => {
            let a: &SockaddrIn = addr.as_sockaddr_in().expect("inet");
            (
                Family::Tcp,
                SocketAddr::from(std::net::SocketAddrV4::from(*a)).to_string(),
            )
        }
        Some(AddressFamily::Inet6) => {
            let a: &SockaddrIn6 = addr.as_sockaddr_in6().expect("inet6");
            (
                Family::Tcp,
                SocketAddr::from(std::net::SocketAddrV6::from(*a)).to_string(),
            )
        }
        Some(AddressFamily::Unix) => {
            let u = addr.as_unix_addr().expect("unix");
            let text = match (u.path(), u.as_abstract()) {
                (Some(p), _) => format!("unix:{}", p.display()),
                (None, Some(a)) => format!("unix:@{}", String::from_utf8_lossy(a)),
                _ => "unix:(unnamed)".to_string(),
            };
            (Family::Unix, text)
        }
        _ => (Family::Other, "(unknown family)".to_string()),
    }
}

/// Listeners passed by systemd socket activation, in LISTEN_FDS order with
/// their LISTEN_FDNAMES. `Ok(None)` when none were passed to this process.
///
/// sd-notify checks LISTEN_PID and sets CLOEXEC on fds 3.. before we wrap
/// them. Call this early in `main`, before anything else opens fds.
pub fn from_systemd() -> io::Result<Option<Vec<Listener>>> {
    let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()?.collect();
    if fds.is_empty() {
        return Ok(None);
    }
    fds.into_iter()
        .map(|(raw, name)| {
            // SAFETY: sd_listen_fds(3) hands these fds to this process; no
            // other code in droved owns fds 3..3+LISTEN_FDS at this point.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            Listener::from_fd(fd, name)
        })
        .collect::<io::Result<Vec<_>>>()
        .map(Some)
}

/// Binds a TCP listener with SO_REUSEADDR (so a restart does not wait for
/// TIME_WAIT) and the given backlog.
pub fn bind_tcp(addr: SocketAddr, backlog: u32, name: &str) -> io::Result<Listener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        // [::]:80 means IPv6 only, so it can sit beside 0.0.0.0:80 (what
        // systemd's BindIPv6Only=ipv6-only does); predictable on any sysctl.
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    let bound = match addr {
        SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    };
    bound.map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot bind {addr}: {e}"),
        )
    })?;
    socket::listen(&fd, backlog_of(backlog)?)?;
    let local: SockaddrStorage = socket::getsockname(fd.as_raw_fd())?;
    let (family, address) = describe(&local);
    Ok(Listener {
        fd,
        name: name.to_string(),
        family,
        address,
        owned_path: None,
    })
}

/// Binds a unix stream listener at `path`. A stale socket file (nobody
/// accepting on it) is replaced; a live one or a non-socket file is an error.
pub fn bind_unix(
    path: &Path,
    backlog: u32,
    name: &str,
    mode: Option<u32>,
    owner: Option<(Option<nix::unistd::Uid>, Option<nix::unistd::Gid>)>,
) -> io::Result<Listener> {
    let ctx = |e: nix::Error, what: &str| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot {what} {}: {e}", path.display()),
        )
    };
    remove_stale_socket(path)?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path).map_err(|e| ctx(e, "use socket path"))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(|e| ctx(e, "bind"))?;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    if let Some((uid, gid)) = owner {
        nix::unistd::chown(path, uid, gid).map_err(|e| ctx(e, "chown"))?;
    }
    socket::listen(&fd, backlog_of(backlog)?).map_err(|e| ctx(e, "listen on"))?;
    Ok(Listener {
        fd,
        name: name.to_string(),
        family: Family::Unix,
        address: format!("unix:{}", path.display()),
        owned_path: Some(path.to_path_buf()),
    })
}

fn backlog_of(n: u32) -> io::Result<Backlog> {
    let n = i32::try_from(n)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "backlog too large"))?;
    Backlog::new(n).map_err(io::Error::from)
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; remove it or choose another path",
                path.display()
            ),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running process", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot check {}: {e}", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_tcp_v4_and_v6_with_names() {
        let l = bind_tcp("127.0.0.1:0".parse().unwrap(), 16, "web").unwrap();
        assert_eq!(l.family, Family::Tcp);
        assert!(l.address.starts_with("127.0.0.1:"), "{}", l.address);
        let again = Listener::from_fd(l.fd.try_clone().unwrap(), "x".into()).unwrap();
        assert_eq!(again.address, l.address);
        let l6 = bind_tcp("[::1]:0".parse().unwrap(), 16, "web6").unwrap();
        assert!(l6.address.starts_with("[::1]:"), "{}", l6.address);
    }

    #[test]
    fn unix_socket_stale_live_and_foreign_files() {
        let dir = std::env::temp_dir().join(format!("drove-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.sock");
        let first = bind_unix(&path, 8, "app", Some(0o660), None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // Live: someone listens on it.
        let err = bind_unix(&path, 8, "app", None, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        // Stale: the listener is gone but the file stays.
        drop(first);
        let second = bind_unix(&path, 8, "app", None, None).unwrap();
        assert_eq!(second.family, Family::Unix);
        drop(second);
        // A regular file is never removed.
        let plain = dir.join("plain");
        std::fs::write(&plain, b"keep").unwrap();
        assert!(bind_unix(&plain, 8, "p", None, None).is_err());
        assert_eq!(std::fs::read(&plain).unwrap(), b"keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_non_listening_fds() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd: OwnedFd = udp.into();
        assert!(Listener::from_fd(fd, "u".into()).is_err());
        let tcp = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        assert!(Listener::from_fd(tcp, "t".into()).is_err());
    }
}
