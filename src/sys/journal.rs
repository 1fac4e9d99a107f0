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
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use std::path::Path;
use std::sync::OnceLock;

use nix::sys::socket::{MsgFlags, UnixAddr, sendto, setsockopt, sockopt};
use nix::sys::time::TimeVal;

/// journald's native protocol socket (systemd-journald.service(8)).
pub const SOCKET_PATH: &str = "/run/systemd/journal/socket";

/// Sends the empty datagram journald discards, waiting at most `timeout`:
/// Ok when the journal takes messages right now. For the start, before
/// droved has a journal socket of its own.
pub fn probe(timeout: Duration) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    socket.set_write_timeout(Some(timeout))?;
    socket.send_to(&[], SOCKET_PATH)?;
    Ok(())
}

/// Sends the empty datagram journald discards from `socket`, the one droved
/// logs through, without waiting: Ok when droved's next message would go
/// out. A fresh socket cannot tell that: while journald is stopped, what
/// blocks droved is usually its own send buffer, full of messages journald
/// has not read, long before journald's queue of 512 is full; a new
/// socket's empty datagram still gets in.
pub fn probe_from(socket: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let addr = UnixAddr::new(path)?;
    sendto(socket.as_raw_fd(), &[], &addr, MsgFlags::MSG_DONTWAIT)?;
    Ok(())
}

/// The socket droved's journal layer sends through, once known.
static LAYER_SOCKET: OnceLock<RawFd> = OnceLock::new();

/// Remembers the socket the journal layer opened (from
/// [`with_send_timeout`]) for [`probe_again`]. The layer must live for the
/// rest of the process (it is in the global subscriber). tracing-journald
/// opens exactly one; with none or several, retries use a fresh socket.
pub fn judge_by(opened: &[RawFd]) {
    if let [socket] = opened {
        let _ = LAYER_SOCKET.set(*socket);
    }
}

/// Whether the journal takes droved's messages again: probes from the
/// layer's own socket when [`judge_by`] named it, else from a fresh one.
pub fn probe_again(timeout: Duration) -> io::Result<()> {
    match LAYER_SOCKET.get() {
        // SAFETY: `judge_by`'s contract: the socket belongs to the journal
        // layer of the global subscriber, which is never dropped, so the fd
        // stays open (and the same socket) for the life of the process.
        Some(&raw) => probe_from(
            unsafe { BorrowedFd::borrow_raw(raw) },
            Path::new(SOCKET_PATH),
        ),
        None => probe(timeout),
    }
}

/// Runs `open`, then gives every socket it opened a send timeout; returns
/// what `open` returned and those sockets. Call it before any other thread
/// exists, so that "opened meanwhile" means "opened by `open`".
pub fn with_send_timeout<T>(
    timeout: Duration,
    open: impl FnOnce() -> io::Result<T>,
) -> io::Result<(T, Vec<RawFd>)> {
    let before = open_sockets()?;
    let value = open()?;
    let timeout = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    let mut opened = Vec::new();
    for (raw, inode) in open_sockets()? {
        if before.contains(&(raw, inode)) {
            continue;
        }
        opened.push(raw);
        // SAFETY: `raw` was opened by `open` just now and is owned by the
        // value it returned, which outlives this borrow; no other thread
        // exists to close it meanwhile (see the function's contract).
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
    }
    Ok((value, opened))
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
        let (new, opened) =
            with_send_timeout(Duration::from_millis(10), UnixDatagram::unbound).unwrap();
        assert!(opened.contains(&new.as_raw_fd()), "{opened:?}");
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
        let (sender, _) =
            with_send_timeout(Duration::from_millis(10), UnixDatagram::unbound).unwrap();
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

    /// A fresh socket's probe passing is no evidence that droved's socket
    /// can send: its own buffer, full of unread messages, can block it
    /// while journald's queue still has room.
    #[test]
    fn a_probe_judges_droveds_own_socket_not_a_fresh_one() {
        let dir = std::env::temp_dir().join(format!("drove-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal");
        let _ = std::fs::remove_file(&path);
        let journal = UnixDatagram::bind(&path).unwrap(); // does not read yet
        let sender = UnixDatagram::unbound().unwrap();
        sender.set_nonblocking(true).unwrap();
        // A small send buffer and large messages: the sender's own buffer
        // fills after a few datagrams, below any receiver queue limit
        // (net.unix.max_dgram_qlen is 10 by kernel default).
        setsockopt(&sender, sockopt::SndBuf, &16_384).unwrap();
        let mut sent = 0;
        let err = loop {
            match sender.send_to(&[b'x'; 8 * 1024], &path) {
                Ok(_) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 10_000, "the send buffer never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(
            sent < 10,
            "{sent} datagrams: the queue limit, not the buffer, was hit"
        );
        let fresh = UnixDatagram::unbound().unwrap();
        fresh.set_nonblocking(true).unwrap();
        fresh.send_to(&[], &path).unwrap();
        let blocked = probe_from(sender.as_fd(), &path).unwrap_err();
        assert_eq!(blocked.kind(), io::ErrorKind::WouldBlock, "{blocked}");
        // Once the journal reads, the same probe passes.
        journal.set_nonblocking(true).unwrap();
        let mut buf = vec![0; 32 * 1024];
        while journal.recv(&mut buf).is_ok() {}
        probe_from(sender.as_fd(), &path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
