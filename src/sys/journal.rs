//! The journald socket, bounded: a stopped or stuck journald must not stop
//! the supervisor.
//!
//! journald's native socket is a datagram socket; when journald does not
//! read it, its queue fills (net.unix.max_dgram_qlen, 512 by default) and a
//! blocking send waits forever. tracing-journald sends blocking and keeps
//! its socket private, so we bound it from outside: SO_SNDTIMEO on the
//! socket it opens, as systemd bounds its own log socket (log.c,
//! `create_log_socket`: 10 ms for PID 1).

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

/// journald's native protocol socket (systemd-journald.service(8)).
pub const SOCKET_PATH: &str = "/run/systemd/journal/socket";

/// Sends the empty datagram journald discards, waiting at most `timeout`:
/// Ok when the journal takes messages right now.
pub fn probe(timeout: Duration) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    socket.set_write_timeout(Some(timeout))?;
    socket.send_to(&[], SOCKET_PATH)?;
    Ok(())
}

/// Runs `open`, then gives every socket it opened a send timeout. Call it
/// before any other thread exists, so that "opened meanwhile" means "opened
/// by `open`".
pub fn with_send_timeout<T>(
    timeout: Duration,
    open: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    let before = open_sockets()?;
    let value = open()?;
    let timeout = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    for (raw, inode) in open_sockets()? {
        if before.contains(&(raw, inode)) {
            continue;
        }
        // SAFETY: `raw` was opened by `open` just now and is owned by the
        // value it returned, which outlives this borrow; no other thread
        // exists to close it meanwhile (see the function's contract).
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
    }
    Ok(value)
}

/// Our open sockets as (fd, inode): the inode tells a new socket from an
/// old one whose fd number was reused.
fn open_sockets() -> io::Result<Vec<(RawFd, u64)>> {
    let mut sockets = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // Closed meanwhile (e.g. the read_dir fd itself): not ours to set.
        if let Ok(meta) = std::fs::metadata(entry.path())
            && meta.file_type().is_socket()
        {
            sockets.push((fd, meta.ino()));
        }
    }
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn new_sockets_get_the_timeout_and_old_ones_keep_theirs() {
        let old = UnixDatagram::unbound().unwrap();
        let new = with_send_timeout(Duration::from_millis(10), UnixDatagram::unbound).unwrap();
        let timeout = |s: &UnixDatagram| {
            nix::sys::socket::getsockopt(&s.as_fd(), sockopt::SendTimeout).unwrap()
        };
        // The kernel rounds up to its clock tick (12 ms at HZ=250).
        let set = timeout(&new);
        assert!(
            set >= TimeVal::new(0, 10_000) && set < TimeVal::new(0, 20_000),
            "{set:?}"
        );
        // Tests run in threads: another test's socket may get a timeout,
        // but one opened before the call never does.
        assert_eq!(timeout(&old), TimeVal::new(0, 0));
    }

    #[test]
    fn a_full_queue_times_out_instead_of_blocking() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("drove-test-journal-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
        let _receiver = UnixDatagram::bind_addr(&addr).unwrap();
        let sender = with_send_timeout(Duration::from_millis(10), UnixDatagram::unbound).unwrap();
        // Nobody reads the receiver: the queue fills, then a send times out.
        let mut sent = 0;
        let err = loop {
            match sender.send_to_addr(&[0; 64], &addr) {
                Ok(_) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 100_000, "the queue never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(sent > 0, "not even one datagram was queued");
    }
}
