//! droved's own NOTIFY_SOCKET, where workers send sd_notify(3) datagrams.
//!
//! A datagram socket in the abstract namespace (no file to clean up, works
//! under ProtectSystem=, reachable by workers that dropped privileges) with
//! SO_PASSCRED, so the kernel tells us the sender's pid: a datagram from a
//! pid that is not one of our workers is ignored by the supervisor. Any fds
//! a sender attaches (SCM_RIGHTS) are closed at once, never kept.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, sockopt,
};
use tokio::io::unix::AsyncFd;

/// Largest datagram we accept (systemd uses a 4 KiB page too); longer ones
/// are truncated by the kernel and then dropped by us.
pub const MAX_DATAGRAM: usize = 4096;

/// One received datagram.
#[derive(Debug)]
pub struct Datagram {
    /// Sender pid from SCM_CREDENTIALS; `None` if the kernel sent none.
    pub pid: Option<i32>,
    pub bytes: Vec<u8>,
    /// The datagram was longer than [`MAX_DATAGRAM`] (it is cut off).
    pub truncated: bool,
    /// How many fds the sender attached (all already closed).
    pub fds_dropped: usize,
}

pub struct NotifySocket {
    fd: AsyncFd<OwnedFd>,
    /// Value for NOTIFY_SOCKET, e.g. `@drove/1234/notify-9f3a`.
    pub address: String,
}

impl NotifySocket {
    /// Binds a fresh abstract socket named after droved's pid and `tag`.
    pub fn bind(tag: &str) -> io::Result<NotifySocket> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("drove/{}/{tag}-{nonce:08x}", std::process::id());
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let addr = UnixAddr::new_abstract(name.as_bytes())?;
        socket::bind(fd.as_raw_fd(), &addr)?;
        socket::setsockopt(&fd, sockopt::PassCred, &true)?;
        Ok(NotifySocket {
            fd: register(fd)?,
            address: format!("@{name}"),
        })
    }

    /// Re-wraps the socket inherited across a binary upgrade.
    pub fn from_fd(fd: OwnedFd, address: String) -> io::Result<NotifySocket> {
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        socket::setsockopt(&fd, sockopt::PassCred, &true)?;
        Ok(NotifySocket {
            fd: register(fd)?,
            address,
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }

    pub fn borrowed_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self.fd.get_ref())
    }

    /// Waits for the next datagram.
    pub async fn recv(&self) -> io::Result<Datagram> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv_one(fd.get_ref().as_raw_fd())) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and returns the same fd number until the
    // AsyncFd (its only owner) drops it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn recv_one(fd: RawFd) -> io::Result<Datagram> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut cmsg = nix::cmsg_space!(libc::ucred, [RawFd; 16]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut pid = None;
    let mut fds_dropped = 0;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        match c {
            ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
            ControlMessageOwned::ScmRights(fds) => {
                for raw in fds {
                    // SAFETY: the kernel just installed this fd in our table
                    // for this message; nobody else knows it. Dropping closes it.
                    drop(unsafe { OwnedFd::from_raw_fd(raw) });
                    fds_dropped += 1;
                }
            }
            _ => {}
        }
    }
    let len = msg.bytes;
    let truncated = len > MAX_DATAGRAM || msg.flags.contains(MsgFlags::MSG_TRUNC);
    buf.truncate(len.min(MAX_DATAGRAM));
    Ok(Datagram {
        pid,
        bytes: buf,
        truncated,
        fds_dropped,
    })
}

/// A socket for droved's own messages to systemd's NOTIFY_SOCKET.
///
/// Sends never block: if the receiver's queue is full (a busy or wedged
/// service manager), the message is dropped and the caller told, rather
/// than stalling the supervisor and with it every worker's supervision.
pub struct UpwardSocket {
    fd: OwnedFd,
    addr: UnixAddr,
}

impl UpwardSocket {
    pub fn new(address: &str) -> io::Result<UpwardSocket> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = match address.strip_prefix('@') {
            Some(name) => UnixAddr::new_abstract(name.as_bytes())?,
            None => UnixAddr::new(address)?,
        };
        Ok(UpwardSocket { fd, addr })
    }

    pub fn send(&self, payload: &[u8]) -> io::Result<()> {
        socket::sendto(
            self.fd.as_raw_fd(),
            payload,
            &self.addr,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )?;
        Ok(())
    }
}

/// CLOCK_MONOTONIC in microseconds (for RELOADING=1's MONOTONIC_USEC).
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn receives_with_sender_pid_and_drops_fds() {
        let sock = NotifySocket::bind("test").unwrap();
        let tx = UpwardSocket::new(&sock.address).unwrap();
        tx.send(b"READY=1\nSTATUS=hi").unwrap();
        let d = sock.recv().await.unwrap();
        assert_eq!(d.pid, Some(std::process::id() as i32));
        assert_eq!(d.bytes, b"READY=1\nSTATUS=hi");
        assert!(!d.truncated);

        // Oversized datagrams are flagged, not silently accepted.
        tx.send(&vec![b'x'; MAX_DATAGRAM + 100]).unwrap();
        let d = sock.recv().await.unwrap();
        assert!(d.truncated);

        // Attached fds are closed, not leaked.
        let marker = std::env::temp_dir().join(format!("drove-fd-marker-{}", std::process::id()));
        let file = std::fs::File::create(&marker).unwrap();
        let tx = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let addr = UnixAddr::new_abstract(&sock.address.as_bytes()[1..]).unwrap();
        let fds = [file.as_raw_fd()];
        let cmsg = [socket::ControlMessage::ScmRights(&fds)];
        let iov = [std::io::IoSlice::new(b"FDSTORE=1")];
        socket::sendmsg(tx.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&addr)).unwrap();
        drop(file);
        let d = sock.recv().await.unwrap();
        assert_eq!(d.fds_dropped, 1);
        let still_open = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .any(|target| target == marker);
        assert!(!still_open, "the passed fd was closed");
        std::fs::remove_file(&marker).unwrap();
    }
}
