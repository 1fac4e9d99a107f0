//! Listening sockets: taken from systemd, or bound by droved itself.
//!
//! Both paths end in the same `Vec<Listener>`: owned, CLOEXEC, listening
//! stream sockets with a name (systemd's FileDescriptorName=), handed to
//! every worker at fds 3.. (sd_listen_fds(3)). droved never accepts on them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrLike,
    SockaddrStorage, UnixAddr, sockopt,
};
use nix::sys::stat::Mode;

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
    let fds = systemd_fds()?;
    if fds.is_empty() {
        return Ok(None);
    }
    fds.into_iter()
        .map(|(name, fd)| Listener::from_fd(fd, name))
        .collect::<io::Result<Vec<_>>>()
        .map(Some)
}

/// The fds systemd passed (LISTEN_FDS), with their LISTEN_FDNAMES, not yet
/// checked to be listeners: socket activation, or listeners droved kept
/// in systemd's fd store (`sys::fdstore`). Call it early, as
/// [`from_systemd`].
pub fn systemd_fds() -> io::Result<Vec<(String, OwnedFd)>> {
    let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()?.collect();
    Ok(fds
        .into_iter()
        .map(|(raw, name)| {
            // SAFETY: sd_listen_fds(3) hands these fds to this process; no
            // other code in droved owns fds 3..3+LISTEN_FDS at this point.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            (name, fd)
        })
        .collect())
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
///
/// droved is root and the socket's directory may belong to someone less
/// privileged (`/run/app` owned by the app's user), who could swap the
/// fresh socket for a symlink between bind and chmod and so aim root's
/// chmod/chown at any file. So nothing here acts on a path another user
/// can change: the socket is bound in a private directory (mode 0700,
/// droved's own) made beside its final place, its owner and mode are set
/// through an `O_PATH|O_NOFOLLOW` fd checked to be a socket, and it is
/// `rename()`d into place, which replaces a directory entry and never
/// follows one. The socket's own address (getsockname(2), what `ss -x`
/// shows) is therefore the `/proc/self/fd/N/NAME` it was bound at; droved
/// reports `path`. A directory anyone may write to
/// without the sticky bit (where anyone could replace the socket later)
/// is refused.
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
    let (parent, file_name) = split_socket_path(path)?;
    let dir = nix::fcntl::open(
        parent,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot open socket directory {}: {e}", parent.display()),
        )
    })?;
    check_socket_dir(&dir, parent)?;
    check_existing_socket(path)?;
    let private = PrivateDir::create(dir, parent, file_name)?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // Through the directory's fd, not its name: whoever may write to the
    // parent could rename the private directory and put a link to another
    // directory in its place.
    let via_fd = Path::new("/proc/self/fd")
        .join(private.fd.as_raw_fd().to_string())
        .join(file_name);
    let addr = UnixAddr::new(&via_fd).map_err(|e| ctx(e, "use socket path"))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(|e| ctx(e, "bind"))?;
    // Only droved can add entries to the private directory (its fd, not its
    // name, is what we look in): what is there is the socket just bound.
    let file = nix::fcntl::openat(
        &private.fd,
        file_name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ctx(e, "open the new socket file for"))?;
    let st = nix::sys::stat::fstat(&file).map_err(|e| ctx(e, "stat the new socket file for"))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "cannot bind {}: the file bound in droved's private directory is not a socket",
                path.display()
            ),
        ));
    }
    if let Some((uid, gid)) = owner {
        nix::unistd::fchownat(&file, "", uid, gid, AtFlags::AT_EMPTY_PATH)
            .map_err(|e| ctx(e, "chown"))?;
    }
    if let Some(mode) = mode {
        // chmod has no AT_EMPTY_PATH form; the fd's /proc link reaches the
        // very inode checked above, whatever happens to names meanwhile.
        let link = format!("/proc/self/fd/{}", file.as_raw_fd());
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            link.as_str(),
            Mode::from_bits_truncate(mode),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| ctx(e, "chmod"))?;
    }
    socket::listen(&fd, backlog_of(backlog)?).map_err(|e| ctx(e, "listen on"))?;
    nix::fcntl::renameat(&private.fd, file_name, &private.parent, file_name)
        .map_err(|e| ctx(e, "move the new socket into place at"))?;
    Ok(Listener {
        fd,
        name: name.to_string(),
        family: Family::Unix,
        address: format!("unix:{}", path.display()),
        owned_path: Some(path.to_path_buf()),
    })
}

fn split_socket_path(path: &Path) -> io::Result<(&Path, &std::ffi::OsStr)> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} names no file", path.display()),
        )
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((parent, file_name))
}

/// Refuses a directory where anyone may replace droved's socket later.
fn check_socket_dir(dir: &OwnedFd, parent: &Path) -> io::Result<()> {
    let st = nix::sys::stat::fstat(dir)?;
    let mode = st.st_mode & 0o7777;
    if let Some(why) = unsafe_dir_mode(mode) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "socket directory {} has mode {mode:04o}: {why}; run chmod o-w or chmod +t on it, or put the socket elsewhere",
                parent.display()
            ),
        ));
    }
    Ok(())
}

/// Why a directory of this mode cannot hold droved's socket, if it cannot.
fn unsafe_dir_mode(mode: u32) -> Option<&'static str> {
    let others_write = mode & 0o002 != 0;
    let sticky = mode & 0o1000 != 0;
    (others_write && !sticky)
        .then_some("every user may write to it and it lacks the sticky bit, so anyone could replace the socket")
}

/// A directory of droved's own (0700) beside the socket's final place, on
/// the same file system so `rename()` can move the socket out of it.
/// Removed when dropped.
struct PrivateDir {
    parent: OwnedFd,
    fd: OwnedFd,
    name: PathBuf,
    /// The socket's file name in it.
    socket: PathBuf,
    /// Its path, for messages.
    path: PathBuf,
}

impl PrivateDir {
    fn create(
        parent: OwnedFd,
        parent_path: &Path,
        file_name: &std::ffi::OsStr,
    ) -> io::Result<PrivateDir> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut tries = 0;
        let name = loop {
            let name = PathBuf::from(format!(
                ".{}.drove-{}-{}-{nanos:x}",
                file_name.to_string_lossy(),
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            match nix::sys::stat::mkdirat(&parent, &name, Mode::S_IRWXU) {
                Ok(()) => break name,
                Err(nix::errno::Errno::EEXIST) if tries < 16 => tries += 1,
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!(
                            "cannot create a private directory in {} to bind the socket in: {e}",
                            parent_path.display()
                        ),
                    ));
                }
            }
        };
        let path = parent_path.join(&name);
        let opened = nix::fcntl::openat(
            &parent,
            &name,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        );
        let fd = match opened {
            Ok(fd) => fd,
            Err(e) => {
                let _ =
                    nix::unistd::unlinkat(&parent, &name, nix::unistd::UnlinkatFlags::RemoveDir);
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("cannot open {}: {e}", path.display()),
                ));
            }
        };
        let dir = PrivateDir {
            parent,
            fd,
            name,
            socket: PathBuf::from(file_name),
            path,
        };
        // Someone who may write to the parent could have put their own
        // directory there between mkdirat and openat.
        let st = nix::sys::stat::fstat(&dir.fd)?;
        if st.st_uid != nix::unistd::geteuid().as_raw() || st.st_mode & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} was replaced by another user's directory while droved created it",
                    dir.path.display()
                ),
            ));
        }
        Ok(dir)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // Empty after the rename; after a failure, holds at most the socket.
        let _ = nix::unistd::unlinkat(
            &self.fd,
            self.socket.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        let _ = nix::unistd::unlinkat(
            &self.parent,
            &self.name,
            nix::unistd::UnlinkatFlags::RemoveDir,
        );
    }
}

fn backlog_of(n: u32) -> io::Result<Backlog> {
    let n = i32::try_from(n)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "backlog too large"))?;
    Backlog::new(n).map_err(io::Error::from)
}

/// A live socket or a non-socket file at `path` is an error; a stale
/// socket stays until the new one replaces it (so clients never find none).
fn check_existing_socket(path: &Path) -> io::Result<()> {
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
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot check {}: {e}", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
    fn directory_modes_that_cannot_hold_a_socket() {
        assert_eq!(unsafe_dir_mode(0o755), None);
        assert_eq!(unsafe_dir_mode(0o775), None);
        assert_eq!(unsafe_dir_mode(0o1777), None);
        assert!(unsafe_dir_mode(0o777).is_some());
        assert!(unsafe_dir_mode(0o733).is_some());
    }

    #[test]
    fn refuses_a_world_writable_directory_and_leaves_nothing_behind() {
        let dir = std::env::temp_dir().join(format!("drove-listen-ww-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = bind_unix(&dir.join("a.sock"), 8, "a", None, None).unwrap_err();
        assert!(err.to_string().contains("mode 0777"), "{err}");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let l = bind_unix(&dir.join("a.sock"), 8, "a", Some(0o600), None).unwrap();
        assert_eq!(l.address, format!("unix:{}", dir.join("a.sock").display()));
        let mode = std::fs::symlink_metadata(dir.join("a.sock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The private directory is gone; only the socket is left.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("a.sock")]);
        // Clients reach it at its path.
        std::os::unix::net::UnixStream::connect(dir.join("a.sock")).unwrap();
        drop(l);
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
