//! droved's end of a template's socket: a private
//! `socketpair(AF_UNIX, SOCK_SEQPACKET)`, non-blocking, so talking to a
//! template never stalls the supervisor (docs/template.md).
//!
//! `SO_PASSCRED` is set on droved's end, so every message carries the pid
//! of the process that sent it (`SCM_CREDENTIALS`, filled in by the kernel
//! and translated into droved's pid namespace): a template's forks inherit
//! its end, and only the template itself may speak on it.

use std::io;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{
    self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, sockopt,
};
use nix::unistd::Pid;
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
    // Before the template runs: its first message carries its pid too.
    socket::setsockopt(&ours, sockopt::PassCred, &true)?;
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
        // Set by the previous image already; harmless to repeat.
        socket::setsockopt(&fd, sockopt::PassCred, &true)?;
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

    /// The next message (an empty one means the template closed its
    /// end) and the pid of the process that sent it (`None` if the kernel
    /// attached none: never on Linux with `SO_PASSCRED`).
    pub async fn recv(&self) -> io::Result<Received> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| receive(fd.get_ref().as_raw_fd())) {
                Ok(Ok(r)) => return Ok(r),
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

/// One message and who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub bytes: Vec<u8>,
    pub sender: Option<Pid>,
}

fn receive(fd: std::os::fd::RawFd) -> io::Result<Received> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!(socket::UnixCredentials);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)
        .map_err(io::Error::from)?;
    let n = msg.bytes;
    let sender = msg.cmsgs().ok().and_then(|mut c| {
        c.find_map(|m| match m {
            ControlMessageOwned::ScmCredentials(cred) => Some(Pid::from_raw(cred.pid())),
            _ => None,
        })
    });
    buf.truncate(n);
    Ok(Received { bytes: buf, sender })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SCM_CREDENTIALS on a socketpair: each message names its sender,
    /// also one forked after the pair was made.
    #[tokio::test]
    async fn each_message_names_its_sender() {
        let (ours, theirs) = pair().unwrap();
        socket::send(theirs.as_raw_fd(), b"from me", MsgFlags::empty()).unwrap();
        let r = ours.recv().await.unwrap();
        assert_eq!(r.bytes, b"from me");
        assert_eq!(r.sender, Some(nix::unistd::getpid()));
        let child = std::process::Command::new("python3")
            .args([
                "-c",
                "import os, socket; socket.socket(fileno=3).send(b'pid %d' % os.getpid())",
            ])
            .stdin(std::process::Stdio::null())
            .spawn_with_fd3(&theirs);
        let r = ours.recv().await.unwrap();
        assert_eq!(
            r.bytes,
            format!("pid {}", child).into_bytes(),
            "the child said its own pid"
        );
        assert_eq!(r.sender, Some(Pid::from_raw(child as i32)));
        drop(theirs);
    }

    trait SpawnWithFd3 {
        fn spawn_with_fd3(&mut self, fd: &OwnedFd) -> u32;
    }

    impl SpawnWithFd3 for std::process::Command {
        fn spawn_with_fd3(&mut self, fd: &OwnedFd) -> u32 {
            use std::os::unix::process::CommandExt;
            let raw = fd.as_raw_fd();
            // SAFETY: only dup2, async-signal-safe, between fork and exec.
            unsafe {
                self.pre_exec(move || {
                    if libc::dup2(raw, 3) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut c = self.spawn().unwrap();
            let pid = c.id();
            assert!(c.wait().unwrap().success());
            pid
        }
    }
}
