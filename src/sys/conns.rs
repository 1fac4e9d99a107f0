//! Which connections accepted from droved's listeners are open, and which
//! of them a process holds: how droved tells a busy worker from an idle
//! one without the worker's help (docs: droved(8), "BUSY AND IDLE
//! WORKERS").
//!
//! - The open connections, from `NETLINK_SOCK_DIAG` dumps: a TCP socket
//!   whose local address is a listener's (an unspecified listener address
//!   matches every local address with its port), or a unix socket bound to
//!   a listener's name (an accepted unix socket carries its listener's
//!   name). Only sockets with an inode count: a connection still waiting
//!   in the accept queue has none (no process holds it yet), nor has one
//!   its process closed (orphaned, or TIME_WAIT).
//! - Which process holds which: the `socket:[INODE]` links in
//!   /proc/PID/fd, read as the process's owner (`sys::owner`).
//!
//! A TCP dump walks the kernel's whole established-connections table
//! (262,144 buckets on a 24 GB machine: about 1.5 ms per family, however
//! few connections there are), so [`passive_opens`] lets the caller skip
//! it while no connection has come since a dump that found none held.

use std::collections::HashMap;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, nlas::Nla as InetNla};
use netlink_packet_sock_diag::unix::{ShowFlags, UnixRequest, nlas::Nla, nlas::UnixDiagName};
use nix::sys::socket::{SockaddrStorage, getsockname};
use nix::unistd::Pid;

use super::probe::{check_len, netlink_socket, send_request};

/// What identifies the connections accepted from one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerKey {
    /// Its local address; connections have it too (with the listener's
    /// port and, for an unspecified address, any local one).
    Tcp(SocketAddr),
    /// Its name as sock_diag reports it: a path's bytes, or an abstract
    /// name's with a leading NUL.
    Unix(Vec<u8>),
}

/// The key of a listening socket, from getsockname(2); `None` for an
/// unnamed or unsupported one.
pub fn key_of(fd: BorrowedFd<'_>) -> io::Result<Option<ListenerKey>> {
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("getsockname on listener fd {}: {e}", fd.as_raw_fd()),
        )
    })?;
    if let Some(a) = addr.as_sockaddr_in() {
        return Ok(Some(ListenerKey::Tcp(SocketAddr::from(
            std::net::SocketAddrV4::from(*a),
        ))));
    }
    if let Some(a) = addr.as_sockaddr_in6() {
        return Ok(Some(ListenerKey::Tcp(SocketAddr::from(
            std::net::SocketAddrV6::from(*a),
        ))));
    }
    Ok(addr
        .as_unix_addr()
        .and_then(|u| match (u.path(), u.as_abstract()) {
            (Some(p), _) => Some(ListenerKey::Unix(p.as_os_str().as_bytes().to_vec())),
            (None, Some(a)) => Some(ListenerKey::Unix([&[0u8][..], a].concat())),
            _ => None,
        }))
}

/// Whether the socket `fd` lives in another network namespace than droved
/// (systemd may pass a socket made in the host's namespace to a service
/// with PrivateNetwork=): sock_diag answers for droved's namespace only.
/// `false` when the kernel cannot tell (SO_NETNS_COOKIE is Linux 5.14+).
pub fn in_other_netns(fd: BorrowedFd<'_>) -> bool {
    let Ok(own) = netlink_socket() else {
        return false;
    };
    match (netns_cookie(fd), netns_cookie(own.as_fd())) {
        (Some(theirs), Some(ours)) => theirs != ours,
        _ => false,
    }
}

fn netns_cookie(fd: BorrowedFd<'_>) -> Option<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a live u64 and `len` its size; getsockopt(2)
    // writes at most `len` bytes and keeps no pointer.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cookie)
}

/// TCP connections passively opened in droved's network namespace so far
/// (`Tcp: PassiveOpens` of /proc/net/snmp): counted when a handshake
/// completes, before any accept. Unchanged since a dump found no
/// connection held, it proves none is held still.
pub fn passive_opens() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp")?;
    parse_passive_opens(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "/proc/net/snmp has no Tcp: PassiveOpens",
        )
    })
}

/// Pure: PassiveOpens from /proc/net/snmp's two `Tcp:` lines (names,
/// then values).
fn parse_passive_opens(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let names = tcp.next()?;
    let values = tcp.next()?;
    let at = names.split_whitespace().position(|n| n == "PassiveOpens")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// What a TCP connection's last exchange says of the request on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// Whether a request waits for its answer: data came, after the last
    /// data went out, or in the same tick of the kernel's clock (jiffies:
    /// 1 to 10 ms), which cannot tell the order.
    pub waiting: Waiting,
    /// Data segments sent on the connection so far: a change between two
    /// readings means something went out in between.
    pub segments_out: u32,
}

/// See [`Exchange::waiting`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// Nothing came yet, or something went out after the last that came.
    No,
    /// The last data came this long ago, after the last that went out.
    Since(Duration),
    /// The last data came this long ago, in the same tick as the last that
    /// went out: a request answered at once, or the next one on a
    /// kept-alive connection that came at once. The worker can tell
    /// ([`waits_for_input`]).
    Tied(Duration),
}

/// The connections open on droved's listeners: socket inode -> its
/// exchange, when the kernel keeps one and it was asked for.
pub type Held = HashMap<u64, Option<Exchange>>;

/// The TCP connections open on the listeners with local addresses `keys`
/// (one dump per address family among them), with their exchanges if
/// `exchanges` (which makes the dump larger).
pub fn held_tcp(keys: &[SocketAddr], exchanges: bool) -> io::Result<Held> {
    let mut held = Held::new();
    for v6 in [false, true] {
        if keys.iter().any(|a| a.is_ipv6() == v6) {
            dump_tcp(v6, exchanges, |local, inode, info| {
                if inode != 0 && tcp_matches(keys, local) {
                    held.insert(u64::from(inode), info.and_then(exchange_of));
                }
            })?;
        }
    }
    Ok(held)
}

/// The unix connections open on the listeners named `names` (see
/// [`ListenerKey::Unix`]); the kernel keeps no exchange times for them.
pub fn held_unix(names: &[Vec<u8>]) -> io::Result<Held> {
    let mut held = Held::new();
    if !names.is_empty() {
        dump_unix(|name, inode| {
            if inode != 0 && names.iter().any(|n| n == name) {
                held.insert(u64::from(inode), None);
            }
        })?;
    }
    Ok(held)
}

/// Offsets in the kernel's `struct tcp_info` (linux/tcp.h; stable ABI,
/// fields are only ever appended).
const TCPI_LAST_DATA_SENT: usize = 44;
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_BYTES_RECEIVED: usize = 128;
const TCPI_DATA_SEGS_OUT: usize = 156;

/// A connection's exchange from its tcp_info bytes; `None` from a kernel
/// too old to report them all (before Linux 4.6). Pure.
///
/// `tcpi_last_data_recv` and `tcpi_last_data_sent` are the milliseconds
/// since data last came in and last went out (both start at the
/// handshake), in ticks of the kernel's clock.
pub fn exchange_of(info: &[u8]) -> Option<Exchange> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(info.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_ne_bytes(info.get(at..at + 8)?.try_into().ok()?))
    };
    let since_sent = u32_at(TCPI_LAST_DATA_SENT)?;
    let since_received = u32_at(TCPI_LAST_DATA_RECV)?;
    let received = u64_at(TCPI_BYTES_RECEIVED)?;
    let segments_out = u32_at(TCPI_DATA_SEGS_OUT)?;
    let ago = Duration::from_millis(u64::from(since_received));
    let waiting = if received == 0 || since_received > since_sent {
        Waiting::No
    } else if since_received < since_sent {
        Waiting::Since(ago)
    } else {
        Waiting::Tied(ago)
    };
    Some(Exchange {
        waiting,
        segments_out,
    })
}

/// Whether a thread of `pid` is blocked waiting for input: reading one of
/// the sockets `conns` (inodes), or, if `polling` counts, in poll, select
/// or epoll (on anything: which fds cannot be told). Read as its owner
/// from /proc/PID/task/*/syscall. A worker reading its connection waits
/// for its client (the rest of a request), not on a request; after a
/// [`Waiting::Tied`], one polling most likely answered at once and waits
/// for the next. One that sleeps, computes or reads anything else is on
/// a request.
pub fn waits_for_input(pid: Pid, conns: &[u64], polling: bool) -> io::Result<bool> {
    super::owner::as_owner_of(pid, || {
        let tasks = format!("/proc/{pid}/task");
        for task in std::fs::read_dir(&tasks).map_err(|e| with_path(e, &tasks))? {
            let path = task
                .map_err(|e| with_path(e, &tasks))?
                .path()
                .join("syscall");
            // A thread that ended meanwhile says nothing.
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            match blocked_in(&text) {
                Some(Blocked::Polling) if polling => return Ok(true),
                Some(Blocked::Polling) => {}
                Some(Blocked::Reading(fd)) => {
                    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"));
                    if let Ok(target) = link
                        && socket_inode(target.as_os_str().as_bytes())
                            .is_some_and(|inode| conns.contains(&inode))
                    {
                        return Ok(true);
                    }
                }
                None => {}
            }
        }
        Ok(false)
    })
}

/// What a thread blocked in, from its /proc/TID/syscall line.
#[derive(Debug, PartialEq, Eq)]
enum Blocked {
    /// poll, select or epoll.
    Polling,
    /// A read of this fd.
    Reading(i64),
}

/// Pure: `"7 0x3 ..."` (syscall number, then its arguments in hex);
/// `running`, or `-1 ...` (not in a syscall) are neither.
fn blocked_in(line: &str) -> Option<Blocked> {
    let mut fields = line.split_whitespace();
    let nr: libc::c_long = fields.next()?.parse().ok()?;
    let first = fields
        .next()
        .and_then(|a| i64::from_str_radix(a.strip_prefix("0x")?, 16).ok());
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    let legacy = [libc::SYS_poll, libc::SYS_select, libc::SYS_epoll_wait];
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
    let legacy: [libc::c_long; 0] = [];
    let polling = [
        libc::SYS_ppoll,
        libc::SYS_pselect6,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
    ];
    let reading = [
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_recvmmsg,
    ];
    if polling.contains(&nr) || legacy.contains(&nr) {
        Some(Blocked::Polling)
    } else if reading.contains(&nr) {
        Some(Blocked::Reading(first?))
    } else {
        None
    }
}

/// Whether a connection with local address `local` was accepted from one
/// of the TCP listeners `keys`. Pure.
fn tcp_matches(keys: &[SocketAddr], local: SocketAddr) -> bool {
    let local_ip = match local.ip() {
        // A dual-stack listener's IPv4 clients: ::ffff:a.b.c.d.
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(local.ip(), IpAddr::V4),
        v4 => v4,
    };
    keys.iter().any(|k| {
        k.port() == local.port()
            && (k.ip().is_unspecified() && k.is_ipv6() == local.is_ipv6()
                || k.ip() == local.ip()
                || k.ip() == local_ip)
    })
}

/// Every TCP socket of one family that has a process side (all states
/// but LISTEN, TIME_WAIT and the half-open ones): its local address,
/// inode and, if `info`, its tcp_info bytes.
fn dump_tcp(
    v6: bool,
    info: bool,
    mut each: impl FnMut(SocketAddr, u32, Option<&[u8]>),
) -> io::Result<()> {
    use netlink_packet_sock_diag::inet::StateFlags as S;
    let states = S::ESTABLISHED
        | S::FIN_WAIT1
        | S::FIN_WAIT2
        | S::CLOSE
        | S::CLOSE_WAIT
        | S::LAST_ACK
        | S::CLOSING;
    let request = SockDiagMessage::InetRequest(InetRequest {
        family: if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8,
        protocol: libc::IPPROTO_TCP as u8,
        extensions: if info {
            ExtensionFlags::INFO
        } else {
            ExtensionFlags::empty()
        },
        states,
        socket_id: if v6 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        },
    });
    dump(request, |answer| {
        if let SockDiagMessage::InetResponse(r) = answer {
            let id = &r.header.socket_id;
            let info = r.nlas.iter().find_map(|nla| match nla {
                InetNla::TcpInfo(bytes) => Some(bytes.as_slice()),
                _ => None,
            });
            each(
                SocketAddr::new(id.source_address, id.source_port),
                r.header.inode,
                info,
            );
        }
    })
}

/// Every connected unix socket: its name (none unless bound, or accepted
/// from a bound listener) and inode.
fn dump_unix(mut each: impl FnMut(&[u8], u32)) -> io::Result<()> {
    use netlink_packet_sock_diag::unix::StateFlags as S;
    let request = SockDiagMessage::UnixRequest(UnixRequest {
        state_flags: S::ESTABLISHED,
        inode: 0,
        show_flags: ShowFlags::NAME,
        cookie: [0xff; 8],
    });
    dump(request, |answer| {
        if let SockDiagMessage::UnixResponse(r) = answer {
            for nla in &r.nlas {
                if let Nla::Name(name) = nla {
                    let bytes = match name {
                        UnixDiagName::Pathname(p) => p.as_bytes().to_vec(),
                        UnixDiagName::Abstract(a) => [&[0u8][..], a].concat(),
                    };
                    each(&bytes, r.header.inode);
                }
            }
        }
    })
}

/// Sends one sock_diag dump request and hands every answer to `each`.
fn dump(request: SockDiagMessage, mut each: impl FnMut(SockDiagMessage)) -> io::Result<()> {
    let nl = netlink_socket()?;
    let seq = 1;
    send_request(&nl, request, NLM_F_REQUEST | NLM_F_DUMP, seq)?;
    let bad =
        |what: String| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"));
    // The kernel fills each datagram up to 32 KiB at most.
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: `buf` is writable for `buf.len()` bytes for the whole call.
        let n = unsafe { libc::recv(nl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = check_len(n, || "recv(NETLINK_SOCK_DIAG dump)".to_string())?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            if len < 16 || at + len > n {
                return Err(bad(format!("message of {len} bytes in a datagram of {n}")));
            }
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[at..at + len])
                .map_err(|e| bad(e.to_string()))?;
            at += (len + 3) & !3;
            if message.header.sequence_number != seq {
                continue;
            }
            match message.payload {
                NetlinkPayload::InnerMessage(m) => each(m),
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    let err = io::Error::from_raw_os_error(-e.raw_code());
                    return Err(io::Error::new(err.kind(), format!("sock_diag dump: {err}")));
                }
                _ => {}
            }
        }
    }
}

/// The inodes of the sockets `pid` holds (its `socket:[N]` fd links), read
/// as its owner. Fails if /proc/PID/fd cannot be read (the process is gone,
/// or droved may not look).
pub fn sockets_of(pid: Pid) -> io::Result<Vec<u64>> {
    super::owner::as_owner_of(pid, || {
        let dir = format!("/proc/{pid}/fd");
        let mut inodes = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| with_path(e, &dir))? {
            let path = entry.map_err(|e| with_path(e, &dir))?.path();
            // A link that went away meanwhile (the fd was closed) or one we
            // may not read says nothing; the directory was readable.
            if let Ok(target) = std::fs::read_link(&path)
                && let Some(inode) = socket_inode(target.as_os_str().as_bytes())
            {
                inodes.push(inode);
            }
        }
        Ok(inodes)
    })
}

fn with_path(e: io::Error, path: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{path}: {e}"))
}

/// `socket:[12345]` -> 12345. Pure.
fn socket_inode(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::{UnixListener, UnixStream};

    fn inode(fd: BorrowedFd<'_>) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino()
    }

    #[test]
    fn parses_passive_opens_and_socket_links() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm RtoMin ActiveOpens PassiveOpens CurrEstab\n\
                    Tcp: 1 200 17 42 3\nUdp: InDatagrams\nUdp: 5\n";
        assert_eq!(parse_passive_opens(snmp), Some(42));
        assert_eq!(parse_passive_opens("Tcp: A B\n"), None);
        assert!(passive_opens().is_ok());
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        for other in [&b"pipe:[12]"[..], b"/dev/null", b"socket:[x]", b"socket:[1"] {
            assert_eq!(socket_inode(other), None, "{other:?}");
        }
    }

    #[test]
    fn tcp_connections_match_their_listener_by_port_and_address() {
        let at = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let keys = [at("127.0.0.1:8080"), at("[::]:9090"), at("0.0.0.0:7070")];
        assert!(tcp_matches(&keys, at("127.0.0.1:8080")));
        assert!(!tcp_matches(&keys, at("127.0.0.2:8080")));
        assert!(!tcp_matches(&keys, at("127.0.0.1:8081")));
        // Unspecified: any local address of the family, and a dual-stack
        // listener's IPv4 clients arrive as mapped addresses.
        assert!(tcp_matches(&keys, at("[::1]:9090")));
        assert!(tcp_matches(&keys, at("[::ffff:10.0.0.1]:9090")));
        assert!(tcp_matches(&keys, at("10.1.2.3:7070")));
        assert!(!tcp_matches(&keys, at("[::1]:7070")));
        // A mapped address against an IPv4 listener's address.
        assert!(tcp_matches(&keys, at("[::ffff:127.0.0.1]:8080")));
    }

    #[test]
    fn accepted_tcp_connections_are_held_and_queued_ones_are_not() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let key = key_of(l.as_fd()).unwrap().unwrap();
        assert_eq!(key, ListenerKey::Tcp(l.local_addr().unwrap()));
        let keys = [l.local_addr().unwrap()];
        assert!(held_tcp(&keys, false).unwrap().is_empty());
        let _c1 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _c2 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        // Both queued: no process holds them.
        assert!(held_tcp(&keys, false).unwrap().is_empty());
        let (s, _) = l.accept().unwrap();
        let got = held_tcp(&keys, false).unwrap();
        assert_eq!(got, Held::from([(inode(s.as_fd()), None)]));
        // This process holds it, and its socket is found among our fds.
        assert!(sockets_of(Pid::this()).unwrap().contains(&inode(s.as_fd())));
        // Closed by its holder: no longer held (the client's end, on
        // another local port, never was a connection of the listener's).
        drop(s);
        assert!(held_tcp(&keys, false).unwrap().is_empty());
    }

    #[test]
    fn tcp_info_bytes_read_as_an_exchange() {
        let info = |sent: u32, recv: u32, received: u64, out: u32| {
            let mut b = vec![0u8; 232];
            b[TCPI_LAST_DATA_SENT..][..4].copy_from_slice(&sent.to_ne_bytes());
            b[TCPI_LAST_DATA_RECV..][..4].copy_from_slice(&recv.to_ne_bytes());
            b[TCPI_BYTES_RECEIVED..][..8].copy_from_slice(&received.to_ne_bytes());
            b[TCPI_DATA_SEGS_OUT..][..4].copy_from_slice(&out.to_ne_bytes());
            b
        };
        let ms = Duration::from_millis;
        let waits = |b: Vec<u8>| exchange_of(&b).unwrap().waiting;
        // Received 300 ms ago, last sent 5 s ago: waiting for 300 ms.
        assert_eq!(
            exchange_of(&info(5000, 300, 80, 3)),
            Some(Exchange {
                waiting: Waiting::Since(ms(300)),
                segments_out: 3
            })
        );
        // Answered after it came.
        assert_eq!(waits(info(100, 300, 80, 4)), Waiting::No);
        // The same tick: the order is unknown.
        assert_eq!(waits(info(300, 300, 80, 4)), Waiting::Tied(ms(300)));
        // Nothing ever came (both count from the handshake).
        assert_eq!(waits(info(700, 700, 0, 0)), Waiting::No);
        // A kernel older than 4.6 reports less.
        assert_eq!(exchange_of(&info(5000, 300, 80, 3)[..104]), None);
    }

    #[test]
    fn syscall_lines_say_what_a_thread_blocks_in() {
        let line = |nr: libc::c_long, fd: &str| {
            format!("{nr} {fd} 0x7ffd0 0x10 0x0 0x0 0x0 0x7ffc 0x7f00")
        };
        assert_eq!(
            blocked_in(&line(libc::SYS_recvfrom, "0x5")),
            Some(Blocked::Reading(5))
        );
        assert_eq!(
            blocked_in(&line(libc::SYS_read, "0x1a")),
            Some(Blocked::Reading(26))
        );
        assert_eq!(
            blocked_in(&line(libc::SYS_epoll_pwait, "0x3")),
            Some(Blocked::Polling)
        );
        assert_eq!(
            blocked_in(&line(libc::SYS_ppoll, "0x7ffd")),
            Some(Blocked::Polling)
        );
        for other in [
            libc::SYS_clock_nanosleep,
            libc::SYS_futex,
            libc::SYS_write,
            libc::SYS_connect,
        ] {
            assert_eq!(blocked_in(&line(other, "0x3")), None, "{other}");
        }
        assert_eq!(blocked_in("running"), None);
        assert_eq!(blocked_in("-1 0x7ffd 0x7f00"), None);
        assert_eq!(blocked_in(""), None);
    }

    #[test]
    fn a_process_reading_its_connection_waits_for_input_and_a_sleeper_does_not() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // A child that reads its accepted connection (a kept-alive
        // connection's server), and one that sleeps holding it.
        let run = |script: &str| {
            std::process::Command::new("python3")
                .args(["-c", script, &addr.port().to_string()])
                .spawn()
                .unwrap()
        };
        let reader = run(
            "import socket,sys; s=socket.create_connection(('127.0.0.1',int(sys.argv[1]))); s.recv(1)",
        );
        let (held_by_reader, _) = l.accept().unwrap();
        let sleeper = run(
            "import socket,sys,time; s=socket.create_connection(('127.0.0.1',int(sys.argv[1]))); time.sleep(60)",
        );
        let (_held_by_sleeper, _) = l.accept().unwrap();
        let inodes_of = |pid: u32| sockets_of(Pid::from_raw(pid as i32)).unwrap();
        let blocked = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/syscall")).is_ok_and(|t| {
                blocked_in(&t).is_some() || t.starts_with(&libc::SYS_clock_nanosleep.to_string())
            })
        };
        let t0 = std::time::Instant::now();
        while !(blocked(reader.id()) && blocked(sleeper.id())) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "children never blocked"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let (reader_pid, sleeper_pid) = (
            Pid::from_raw(reader.id() as i32),
            Pid::from_raw(sleeper.id() as i32),
        );
        assert!(waits_for_input(reader_pid, &inodes_of(reader.id()), false).unwrap());
        // Reading a socket that is not one of `conns`: not waiting for them.
        assert!(!waits_for_input(reader_pid, &[], true).unwrap());
        assert!(!waits_for_input(sleeper_pid, &inodes_of(sleeper.id()), true).unwrap());
        drop(held_by_reader);
        for mut c in [reader, sleeper] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    #[test]
    fn a_request_waits_from_its_last_byte_until_something_goes_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let keys = [l.local_addr().unwrap()];
        let mut c = TcpStream::connect(keys[0]).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let ino = inode(s.as_fd());
        let exchange = || held_tcp(&keys, true).unwrap()[&ino].unwrap();
        let waiting = |e: Exchange| !matches!(e.waiting, Waiting::No);
        assert_eq!(held_tcp(&keys, false).unwrap()[&ino], None, "not asked");
        assert_eq!(exchange().waiting, Waiting::No, "nothing came yet");
        let mut buf = [0u8; 64];
        let mut ask = |c: &mut TcpStream, s: &mut TcpStream| {
            // Apart from the last send by more than the kernel's tick
            // (jiffies: up to 10 ms), or both fall in one millisecond.
            std::thread::sleep(Duration::from_millis(30));
            c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
        };
        ask(&mut c, &mut s);
        std::thread::sleep(Duration::from_millis(50));
        let asked = exchange();
        assert!(
            matches!(asked.waiting, Waiting::Since(d) if d >= Duration::from_millis(40)),
            "{asked:?}"
        );
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .unwrap();
        let answered = exchange();
        assert_eq!(answered.waiting, Waiting::No, "{answered:?}");
        assert!(answered.segments_out > asked.segments_out);
        // An idle keep-alive connection: still answered a while later.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(exchange().waiting, Waiting::No);
        // The next request on it waits again.
        ask(&mut c, &mut s);
        assert!(waiting(exchange()));
    }

    #[test]
    fn accepted_unix_connections_carry_their_listeners_name() {
        let dir = std::env::temp_dir().join(format!("drove-conns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let name = path.as_os_str().as_bytes().to_vec();
        assert_eq!(
            key_of(l.as_fd()).unwrap(),
            Some(ListenerKey::Unix(name.clone()))
        );
        let names = [name];
        let _queued = UnixStream::connect(&path).unwrap();
        let _c = UnixStream::connect(&path).unwrap();
        assert!(held_unix(&names).unwrap().is_empty());
        let (s, _) = l.accept().unwrap();
        assert_eq!(
            held_unix(&names).unwrap(),
            Held::from([(inode(s.as_fd()), None)])
        );
        // Another listener's connections are not these.
        assert!(
            held_unix(&[b"/nonexistent/x.sock".to_vec()])
                .unwrap()
                .is_empty()
        );
        // Abstract names: keyed with a leading NUL.
        let name = format!("drove-conns-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let la = UnixListener::bind_addr(&addr).unwrap();
        let Some(ListenerKey::Unix(ka)) = key_of(la.as_fd()).unwrap() else {
            panic!("not a unix key")
        };
        assert_eq!(ka[0], 0);
        let _ca = UnixStream::connect_addr(&addr).unwrap();
        let (sa, _) = la.accept().unwrap();
        assert_eq!(
            held_unix(&[ka]).unwrap(),
            Held::from([(inode(sa.as_fd()), None)])
        );
        assert!(!in_other_netns(l.as_fd()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
