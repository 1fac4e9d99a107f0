//! Accept-queue depth of listening sockets: the signal the scaler
//! ([`crate::scale`]) decides on. (Its CPU guard reads the workers' own
//! schedstat, in `supervisor::pool_cpu`, not machine-wide CPU: other load
//! on the host must not freeze an I/O-bound pool.)
//!
//! - TCP (v4 and v6): `getsockopt(IPPROTO_TCP, TCP_INFO)` on a socket in
//!   state LISTEN reports the accept-queue length in `tcpi_unacked` and the
//!   backlog limit in `tcpi_sacked` (see `tcp_get_info()` in the kernel; the
//!   same numbers `ss -ltn` shows as Recv-Q / Send-Q).
//! - Unix stream / seqpacket: `ioctl(FIONREAD)` fails with EINVAL on a
//!   listener, so we ask `NETLINK_SOCK_DIAG` for the socket's inode with
//!   `UDIAG_SHOW_RQLEN`: for a listener `udiag_rqueue` is the number of
//!   pending connections and `udiag_wqueue` the backlog (`ss -lx`).
//!
//! Linux admits `backlog + 1` connections before the queue counts as full
//! (`sk_acceptq_is_full()` is `>`, not `>=`), so `queued` may exceed
//! `backlog` by one.
//!
//! Every failure is an `io::Error` that names the call and keeps the errno's
//! kind; a probe never reports 0 for "could not read".

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::unix::{ShowFlags, StateFlags, UnixRequest, nlas::Nla};

/// Accept-queue depth of one listening socket, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    /// Connections fully established and waiting for `accept()`.
    pub queued: u32,
    /// The backlog limit the socket listens with (after the kernel's cap at
    /// `net.core.somaxconn`).
    pub backlog: u32,
}

/// Kernel `TCP_LISTEN` (include/net/tcp_states.h); unix sockets reuse it.
const TCP_LISTEN: u8 = 10;

/// Accept-queue depth of a listening stream socket of any supported family
/// (TCP over IPv4/IPv6, unix stream or seqpacket), chosen by `SO_DOMAIN`.
pub fn queue_depth(fd: BorrowedFd<'_>) -> io::Result<QueueDepth> {
    let domain = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, "SO_DOMAIN")?;
    match domain {
        libc::AF_INET | libc::AF_INET6 => tcp_queue_depth(fd),
        libc::AF_UNIX => unix_queue_depth(fd),
        other => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "fd {}: no accept-queue probe for socket family {other}",
                fd.as_raw_fd()
            ),
        )),
    }
}

/// The leading fields of the kernel's `struct tcp_info`, up to
/// `tcpi_sacked`. The kernel copies `min(optlen, sizeof(tcp_info))` bytes,
/// so asking for a prefix is allowed and keeps us independent of the libc
/// variant's (growing) definition.
#[repr(C)]
#[derive(Default)]
struct TcpInfoPrefix {
    tcpi_state: u8,
    tcpi_ca_state: u8,
    tcpi_retransmits: u8,
    tcpi_probes: u8,
    tcpi_backoff: u8,
    tcpi_options: u8,
    tcpi_wscale: u8,
    tcpi_flags: u8,
    tcpi_rto: u32,
    tcpi_ato: u32,
    tcpi_snd_mss: u32,
    tcpi_rcv_mss: u32,
    tcpi_unacked: u32,
    tcpi_sacked: u32,
}

/// Accept-queue depth of a TCP listener (IPv4 or IPv6) from `TCP_INFO`.
///
/// Fails if the socket is not TCP or not in state LISTEN: for any other
/// state the same fields mean unacknowledged and SACKed segments.
pub fn tcp_queue_depth(fd: BorrowedFd<'_>) -> io::Result<QueueDepth> {
    let raw = fd.as_raw_fd();
    let proto = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL, "SO_PROTOCOL")?;
    if proto != libc::IPPROTO_TCP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {raw}: not a TCP socket (protocol {proto})"),
        ));
    }
    let mut info = TcpInfoPrefix::default();
    let mut len = size_of::<TcpInfoPrefix>() as libc::socklen_t;
    // SAFETY: `info` is a live, writable repr(C) struct of `len` bytes and
    // `len` is a valid socklen_t the kernel may shrink; getsockopt(2) writes
    // at most `len` bytes and does not retain either pointer.
    let rc = unsafe {
        libc::getsockopt(
            raw,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    check(rc, || format!("getsockopt(TCP_INFO) on fd {raw}"))?;
    if (len as usize) < size_of::<TcpInfoPrefix>() {
        return Err(io::Error::other(format!(
            "getsockopt(TCP_INFO) on fd {raw}: short answer of {len} bytes"
        )));
    }
    if info.tcpi_state != TCP_LISTEN {
        return Err(not_listening(raw, info.tcpi_state));
    }
    Ok(QueueDepth {
        queued: info.tcpi_unacked,
        backlog: info.tcpi_sacked,
    })
}

/// Accept-queue depth of a unix stream or seqpacket listener, asked of
/// `NETLINK_SOCK_DIAG` by the socket's inode.
///
/// Opens one short-lived netlink socket per call (a few µs; the scaler asks
/// ten times a second). Fails if the socket is not a listener.
pub fn unix_queue_depth(fd: BorrowedFd<'_>) -> io::Result<QueueDepth> {
    let ino = socket_inode(fd)?;
    unix_depth_by_inode(ino).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("unix listener fd {}: {e}", fd.as_raw_fd()),
        )
    })
}

/// Ask sock_diag about the unix socket with inode `ino`.
fn unix_depth_by_inode(ino: u32) -> io::Result<QueueDepth> {
    let nl = netlink_socket()?;
    let seq = 1;
    send_request(
        &nl,
        SockDiagMessage::UnixRequest(UnixRequest {
            state_flags: StateFlags::all(),
            inode: ino,
            show_flags: ShowFlags::RQLEN,
            // INET_DIAG_NOCOOKIE: look the socket up by inode alone.
            cookie: [0xff; 8],
        }),
        NLM_F_REQUEST,
        seq,
    )?;

    // An exact (non-dump) request gets one message back: the answer or an
    // NLMSG_ERROR. 8 KiB is what the kernel's own diag tools use.
    let mut buf = vec![0u8; 8192];
    // SAFETY: `buf` is writable for `buf.len()` bytes for the whole call.
    let n = unsafe { libc::recv(nl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = check_len(n, || "recv(NETLINK_SOCK_DIAG)".to_string())?;
    parse_unix_diag(&buf[..n], seq, ino)
}

/// Parse the kernel's answer to one exact unix_diag request.
fn parse_unix_diag(buf: &[u8], seq: u32, ino: u32) -> io::Result<QueueDepth> {
    let bad =
        |what: String| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"));
    let answer =
        NetlinkMessage::<SockDiagMessage>::deserialize(buf).map_err(|e| bad(e.to_string()))?;
    if answer.header.sequence_number != seq {
        return Err(bad("no answer for our request".into()));
    }
    let response = match answer.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(r)) => r,
        NetlinkPayload::Error(e) => {
            let err = io::Error::from_raw_os_error(-e.raw_code());
            return Err(io::Error::new(
                err.kind(),
                format!("sock_diag lookup of inode {ino}: {err}"),
            ));
        }
        other => return Err(bad(format!("unexpected answer {other:?}"))),
    };
    let got_ino = response.header.inode;
    if got_ino != ino {
        return Err(bad(format!("answer for inode {got_ino}, asked for {ino}")));
    }
    if response.header.state != TCP_LISTEN {
        return Err(not_listening_unix(ino, response.header.state));
    }
    let (queued, backlog) = response
        .nlas
        .iter()
        .find_map(|nla| match nla {
            Nla::ReceiveQueueLength(queued, backlog) => Some((*queued, *backlog)),
            _ => None,
        })
        .ok_or_else(|| bad("answer without UNIX_DIAG_RQLEN".into()))?;
    Ok(QueueDepth { queued, backlog })
}

/// The inode of a socket, the key sock_diag knows it by.
fn socket_inode(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let raw = fd.as_raw_fd();
    // SAFETY: all-zero is a valid `struct stat`; fstat overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, writable `struct stat`; `raw` is borrowed and
    // so open for the call.
    let rc = unsafe { libc::fstat(raw, &mut st) };
    check(rc, || format!("fstat on fd {raw}"))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {raw}: not a socket"),
        ));
    }
    // Socket inodes come from get_next_ino(), an unsigned int.
    u32::try_from(st.st_ino).map_err(|_| {
        io::Error::other(format!(
            "fd {raw}: socket inode {} does not fit unix_diag's 32 bits",
            st.st_ino
        ))
    })
}

/// Sends one sock_diag request with header `flags` and sequence number
/// `seq` to the kernel on `nl`.
pub(super) fn send_request(
    nl: &OwnedFd,
    request: SockDiagMessage,
    flags: u16,
    seq: u32,
) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, request.into());
    message.finalize();
    let mut req = vec![0u8; message.buffer_len()];
    message.serialize(&mut req);
    // SAFETY: an all-zero sockaddr_nl is valid (family set below; pid 0 and
    // groups 0 address the kernel).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `req` and `kernel` are live for the call and their sizes are
    // passed with them; sendto(2) only reads them.
    let sent = unsafe {
        libc::sendto(
            nl.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    check_len(sent, || "sendto(NETLINK_SOCK_DIAG)".to_string()).map(drop)
}

pub(super) fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    check(fd, || "socket(AF_NETLINK, NETLINK_SOCK_DIAG)".to_string())?;
    // SAFETY: socket(2) succeeded, so `fd` is a new descriptor nobody else
    // owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn getsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    what: &str,
) -> io::Result<libc::c_int> {
    let raw = fd.as_raw_fd();
    let mut val: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` is a live c_int and `len` its size; getsockopt(2)
    // writes at most `len` bytes and does not keep the pointers.
    let rc = unsafe { libc::getsockopt(raw, level, name, (&raw mut val).cast(), &mut len) };
    check(rc, || format!("getsockopt({what}) on fd {raw}"))?;
    Ok(val)
}

fn not_listening(raw: RawFd, state: u8) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("fd {raw}: TCP socket is not listening (state {state})"),
    )
}

fn not_listening_unix(ino: u32, state: u8) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("unix socket inode {ino} is not listening (state {state})"),
    )
}

/// Turn a `-1` return into the errno, with `what` as context.
fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> io::Result<()> {
    if rc == -1 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{}: {e}", what())))
    } else {
        Ok(())
    }
}

pub(super) fn check_len(rc: isize, what: impl FnOnce() -> String) -> io::Result<usize> {
    usize::try_from(rc).map_err(|_| {
        let e = io::Error::last_os_error();
        io::Error::new(e.kind(), format!("{}: {e}", what()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    /// Poll `probe` until it reports `want` queued, or give up after 2 s
    /// and return the last reading (the kernel finishes a loopback
    /// handshake asynchronously, so the count may trail `connect()`).
    fn wait_for_queued(want: u32, mut probe: impl FnMut() -> io::Result<QueueDepth>) -> QueueDepth {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let d = probe().expect("probe");
            if d.queued == want || Instant::now() >= deadline {
                return d;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A listener with an exact backlog (std always listens with 128).
    fn tcp_listener(addr: SocketAddr, backlog: i32) -> TcpListener {
        let l = TcpListener::bind(addr).expect("bind");
        // SAFETY: listen(2) on a bound socket we own; no pointers.
        let rc = unsafe { libc::listen(l.as_raw_fd(), backlog) };
        assert_eq!(rc, 0, "listen: {}", io::Error::last_os_error());
        l
    }

    fn check_tcp(addr: SocketAddr) {
        const B: u32 = 8;
        const K: u32 = 5;
        let l = tcp_listener(addr, B as i32);
        let to = l.local_addr().unwrap();
        assert_eq!(
            queue_depth(l.as_fd()).unwrap(),
            QueueDepth {
                queued: 0,
                backlog: B
            }
        );
        let clients: Vec<TcpStream> = (0..K).map(|_| TcpStream::connect(to).unwrap()).collect();
        let d = wait_for_queued(K, || tcp_queue_depth(l.as_fd()));
        assert_eq!(
            d,
            QueueDepth {
                queued: K,
                backlog: B
            }
        );
        // The family dispatch gives the same answer.
        assert_eq!(queue_depth(l.as_fd()).unwrap(), d);
        drop(clients);
    }

    #[test]
    fn tcp_v4_listener_reports_queue_and_backlog() {
        check_tcp((Ipv4Addr::LOCALHOST, 0).into());
    }

    #[test]
    fn tcp_v6_listener_reports_queue_and_backlog() {
        // Debian has ::1 on lo unless IPv6 is disabled; then this fails
        // rather than passing untested.
        TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).expect(
            "no IPv6 loopback (::1): enable it with sysctl net.ipv6.conf.lo.disable_ipv6=0",
        );
        check_tcp((Ipv6Addr::LOCALHOST, 0).into());
    }

    #[test]
    fn tcp_queue_caps_at_backlog_plus_one() {
        const B: u32 = 2;
        let l = tcp_listener((Ipv4Addr::LOCALHOST, 0).into(), B as i32);
        let to = l.local_addr().unwrap();
        let mut clients: Vec<TcpStream> =
            (0..=B).map(|_| TcpStream::connect(to).unwrap()).collect();
        let d = wait_for_queued(B + 1, || tcp_queue_depth(l.as_fd()));
        assert_eq!(d.queued, B + 1, "Linux admits backlog + 1");
        // The queue is full: further SYNs are dropped, so these connects
        // time out (or, if one slipped in, its final ACK is dropped).
        for _ in 0..2 {
            if let Ok(s) = TcpStream::connect_timeout(&to, Duration::from_millis(100)) {
                clients.push(s);
            }
        }
        let d = tcp_queue_depth(l.as_fd()).unwrap();
        assert_eq!(
            d,
            QueueDepth {
                queued: B + 1,
                backlog: B
            }
        );
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "drove-probe-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir(&p).expect("create temp dir");
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A unix listener with an exact backlog (std listens with 128).
    fn unix_listener(dir: &TempDir, backlog: i32) -> (UnixListener, PathBuf) {
        let path = dir.0.join("sock");
        let l = UnixListener::bind(&path).expect("bind unix");
        // SAFETY: listen(2) on a bound socket we own; no pointers.
        let rc = unsafe { libc::listen(l.as_raw_fd(), backlog) };
        assert_eq!(rc, 0, "listen: {}", io::Error::last_os_error());
        (l, path)
    }

    #[test]
    fn unix_listener_reports_queue_and_backlog() {
        const B: u32 = 6;
        const K: u32 = 4;
        let dir = TempDir::new("unix");
        let (l, path) = unix_listener(&dir, B as i32);
        assert_eq!(
            unix_queue_depth(l.as_fd()).unwrap(),
            QueueDepth {
                queued: 0,
                backlog: B
            }
        );
        let clients: Vec<UnixStream> = (0..K)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let d = wait_for_queued(K, || unix_queue_depth(l.as_fd()));
        assert_eq!(
            d,
            QueueDepth {
                queued: K,
                backlog: B
            }
        );
        assert_eq!(queue_depth(l.as_fd()).unwrap(), d);
        // Accepting one shortens the queue.
        let (_accepted, _) = l.accept().unwrap();
        let d = wait_for_queued(K - 1, || queue_depth(l.as_fd()));
        assert_eq!(d.queued, K - 1);
        drop(clients);
    }

    #[test]
    fn non_listening_sockets_are_errors() {
        // TCP: bound but never listened, connected, and shut down.
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let err = queue_depth(c.as_fd()).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
        // SAFETY: shutdown(2) on a socket we own; no pointers.
        let rc = unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        assert_eq!(rc, 0);
        let err = queue_depth(l.as_fd()).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");

        // UDP.
        let u = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let err = queue_depth(u.as_fd()).unwrap_err();
        assert!(err.to_string().contains("not a TCP socket"), "{err}");

        // Unix: a connected pair and a datagram socket.
        let (a, _b) = UnixStream::pair().unwrap();
        let err = queue_depth(a.as_fd()).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
        let d = UnixDatagram::unbound().unwrap();
        assert!(queue_depth(d.as_fd()).is_err());

        // Not a socket at all.
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(queue_depth(f.as_fd()).is_err());
        assert!(unix_queue_depth(f.as_fd()).is_err());
    }

    #[test]
    fn closed_unix_listener_is_an_error() {
        let dir = TempDir::new("closed");
        let (l, _path) = unix_listener(&dir, 4);
        let ino = socket_inode(l.as_fd()).unwrap();
        assert_eq!(unix_depth_by_inode(ino).unwrap().backlog, 4);
        drop(l);
        let err = unix_depth_by_inode(ino).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    // uapi/linux/sock_diag.h and uapi/linux/unix_diag.h: the wire format
    // the test answers are built in.
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const UNIX_DIAG_RQLEN: u16 = 4;
    const NLMSG_HDRLEN: usize = 16;
    const UNIX_DIAG_MSG_LEN: usize = 16;
    const RTA_HDRLEN: usize = 4;

    #[test]
    fn diag_answer_parsing() {
        // NLMSG_ERROR carrying -ENOENT.
        let mut err = Vec::new();
        err.extend_from_slice(&20u32.to_ne_bytes());
        err.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        err.extend_from_slice(&0u16.to_ne_bytes());
        err.extend_from_slice(&1u32.to_ne_bytes());
        err.extend_from_slice(&0u32.to_ne_bytes());
        err.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        let e = parse_unix_diag(&err, 1, 42).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);

        // A listener's answer with UNIX_DIAG_RQLEN = (3, 7).
        let mut ok = Vec::new();
        let len = (NLMSG_HDRLEN + UNIX_DIAG_MSG_LEN + RTA_HDRLEN + 8) as u32;
        ok.extend_from_slice(&len.to_ne_bytes());
        ok.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        ok.extend_from_slice(&0u16.to_ne_bytes());
        ok.extend_from_slice(&1u32.to_ne_bytes());
        ok.extend_from_slice(&0u32.to_ne_bytes());
        ok.extend_from_slice(&[libc::AF_UNIX as u8, libc::SOCK_STREAM as u8, TCP_LISTEN, 0]);
        ok.extend_from_slice(&42u32.to_ne_bytes());
        ok.extend_from_slice(&[0u8; 8]);
        ok.extend_from_slice(&12u16.to_ne_bytes());
        ok.extend_from_slice(&UNIX_DIAG_RQLEN.to_ne_bytes());
        ok.extend_from_slice(&3u32.to_ne_bytes());
        ok.extend_from_slice(&7u32.to_ne_bytes());
        assert_eq!(
            parse_unix_diag(&ok, 1, 42).unwrap(),
            QueueDepth {
                queued: 3,
                backlog: 7
            }
        );
        // Same answer for another inode is refused, as is a truncated one.
        assert!(parse_unix_diag(&ok, 1, 43).is_err());
        assert!(parse_unix_diag(&ok[..ok.len() - 4], 1, 42).is_err());
    }
}
