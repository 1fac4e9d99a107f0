//! droved's end of a template's socket: a private
//! `socketpair(AF_UNIX, SOCK_SEQPACKET)`, non-blocking, so talking to a
//! template never stalls the supervisor (docs/template.md).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Longest message either side sends; longer ones are cut off (and then
/// do not parse).
pub const MAX_MESSAGE: usize = 512;

/// droved's end, registered with tokio.
pub struct TemplateSocket {
    fd: AsyncFd<OwnedFd>,
}

/// A fresh pair: droved's end (CLOEXEC, non-blocking) and the template's
/// (CLOEXEC too: spawn places it without CLOEXEC at its fd in the child).
pub fn pair() -> io::Result<(TemplateSocket, OwnedFd)> {
    let (ours, theirs) = socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    nix::fcntl::fcntl(
        &ours,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    Ok((
        TemplateSocket {
            // SAFETY: an OwnedFd stays open and keeps its fd number until
            // the AsyncFd (its only owner) drops it.
            fd: unsafe { AsyncFd::register_with_interest(ours, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?,
        },
        theirs,
    ))
}

impl TemplateSocket {
    /// Re-wraps droved's end inherited across a binary upgrade.
    pub fn from_fd(fd: OwnedFd) -> io::Result<TemplateSocket> {
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        Ok(TemplateSocket {
            // SAFETY: an OwnedFd stays open and keeps its fd number until
            // the AsyncFd (its only owner) drops it.
            fd: unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?,
        })
    }

    /// Sends one message without waiting: a template that does not read
    /// its socket (the buffer is full) gets `WouldBlock`.
    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        let n = socket::send(
            self.fd.get_ref().as_raw_fd(),
            msg,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )?;
        if n != msg.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short send"));
        }
        Ok(())
    }

    /// The next message; an empty one means the template closed its end.
    pub async fn recv(&self) -> io::Result<Vec<u8>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = vec![0u8; MAX_MESSAGE];
            match guard.try_io(|fd| {
                socket::recv(fd.get_ref().as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT)
                    .map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}
