//! droved's control socket: its D-Bus interface served peer-to-peer on a
//! unix stream socket named `private` beside the workers' NOTIFY_SOCKET
//! (`/run/drove/<instance>/private`, like systemd's /run/systemd/private),
//! so drovectl works where no D-Bus daemon runs.
//!
//! The socket is mode 0666: anyone who can reach the directory may connect,
//! and droved decides per caller from the uid the kernel reports
//! (SO_PEERCRED), never from anything the caller says. It is created by
//! [`bind_private_with`] (race-free, a stale one replaced, a live one left
//! alone), is not handed over across a binary upgrade (the new image binds
//! it again; the old one's is closed by the exec) and is removed when droved
//! exits.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, Backlog, SockType, sockopt};
use tracing::warn;

use super::private_socket::{Bound, SocketFile, bind_private_with, remove_socket};

/// The socket's name in droved's runtime directory.
pub const SOCKET_NAME: &str = "private";

/// Anyone may connect; droved checks each caller's uid.
pub const SOCKET_MODE: u32 = 0o666;

/// Who is at the other end of a connection, as the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub pid: i32,
}

/// The listening control socket; removes its file when dropped.
#[derive(Debug)]
pub struct ControlSocket {
    pub listener: tokio::net::UnixListener,
    pub path: PathBuf,
    file: Option<SocketFile>,
}

impl ControlSocket {
    /// Binds `dir/private` (the directory must be droved's, as the notify
    /// socket's is). `remove_dir`: remove the directory too when done, if
    /// empty (not one systemd manages). Must run inside the tokio runtime.
    pub fn bind_in(dir: &Path, remove_dir: bool) -> io::Result<ControlSocket> {
        let path = dir.join(SOCKET_NAME);
        let (fd, file) = match bind_private_with(
            dir,
            SOCKET_NAME,
            SockType::Stream,
            None,
            SOCKET_MODE,
            remove_dir,
        )? {
            Bound::Ours(fd, file) => (fd, file),
            Bound::Busy => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by another process", path.display()),
                ));
            }
        };
        let listening = || -> io::Result<tokio::net::UnixListener> {
            // As many as the kernel allows (net.core.somaxconn): a connect
            // flood must not fill the queue before droved's per-uid limits,
            // which apply at accept, can turn it away.
            socket::listen(&fd, Backlog::MAXCONN)?;
            let std = std::os::unix::net::UnixListener::from(fd);
            std.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(std)
        };
        match listening() {
            Ok(listener) => Ok(ControlSocket {
                listener,
                path,
                file: Some(file),
            }),
            Err(e) => {
                let _ = remove_socket(&file);
                Err(io::Error::new(
                    e.kind(),
                    format!("cannot listen on {}: {e}", path.display()),
                ))
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if let Some(file) = self.file.take()
            && let Err(e) = remove_socket(&file)
        {
            warn!("cannot remove {}: {e}", file.path.display());
        }
    }
}

/// The uid and pid of the process that connected `stream` (SO_PEERCRED:
/// as they were at connect time, not anything the peer claims).
pub fn peer(stream: &impl AsFd) -> io::Result<Peer> {
    let cred = socket::getsockopt(stream, sockopt::PeerCredentials)?;
    Ok(Peer {
        uid: cred.uid(),
        pid: cred.pid(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    #[tokio::test]
    async fn bound_with_mode_0666_peer_known_and_removed_when_dropped() {
        let base = std::env::temp_dir().join(format!("drove-ctlsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let dir = base.join("rt");
        let sock = ControlSocket::bind_in(&dir, true).unwrap();
        let meta = std::fs::symlink_metadata(&sock.path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o7777, 0o666);
        // A second one at the same path is refused while the first lives.
        let busy = ControlSocket::bind_in(&dir, true).unwrap_err();
        assert_eq!(busy.kind(), io::ErrorKind::AddrInUse, "{busy}");

        let client = std::os::unix::net::UnixStream::connect(&sock.path).unwrap();
        let (server, _) = sock.listener.accept().await.unwrap();
        let me = peer(&server).unwrap();
        assert_eq!(me.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(me.pid, std::process::id() as i32);
        drop((client, server));

        let path = sock.path.clone();
        drop(sock);
        assert!(!path.exists());
        assert!(!dir.exists(), "the empty directory is removed too");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[tokio::test]
    async fn a_killed_second_droveds_directory_is_swept_with_both_sockets() {
        let base = std::env::temp_dir().join(format!("drove-ctlsweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let rt = base.join("rt");
        // What a killed droved of pid 1 left: both sockets, nobody bound.
        let left = base.join("rt.1");
        std::fs::create_dir(&left).unwrap();
        drop(std::os::unix::net::UnixDatagram::bind(left.join("notify")).unwrap());
        drop(std::os::unix::net::UnixListener::bind(left.join(SOCKET_NAME)).unwrap());
        let notify = super::super::notify_socket::NotifySocket::bind_in(&rt, None).unwrap();
        assert!(!left.exists(), "{} left behind", left.display());
        drop(notify);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
