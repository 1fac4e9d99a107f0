//! Open TCP connections on droved's listening ports, from /proc/net/tcp
//! and /proc/net/tcp6: whether a worker is busy, when /proc/PID/wchan
//! cannot tell (workers of another uid: reading it needs CAP_SYS_PTRACE,
//! which the packaged unit does not grant).
//!
//! A connection a worker has accepted and not closed yet is an ESTABLISHED
//! (or CLOSE_WAIT) socket whose local address is the listener's. So is one
//! still waiting in the accept queue; the caller subtracts the queue.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether the process waits for a connection (blocked in accept(2) or
/// poll/epoll/select), from /proc/PID/wchan; `None` when that cannot be
/// read (another uid without CAP_SYS_PTRACE: the kernel then shows "0").
pub fn waiting_for_connection(pid: nix::unistd::Pid) -> Option<bool> {
    let w = std::fs::read_to_string(format!("/proc/{pid}/wchan")).ok()?;
    if w.trim().is_empty() || w.trim() == "0" {
        return None;
    }
    Some(super::process::waits_for_connection(&w))
}

/// TCP states (include/net/tcp_states.h) of a connection still open on
/// the server's side: ESTABLISHED, CLOSE_WAIT.
const OPEN_STATES: [&str; 2] = ["01", "08"];

/// Connections open on any of `listeners` (their local addresses; an
/// unspecified IP matches every local IP with that port).
pub fn open_on(listeners: &[SocketAddr]) -> io::Result<u32> {
    let mut n = 0;
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(path) {
            Ok(text) => n += count_open(&text, listeners),
            // No IPv6 in this kernel or namespace.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Counts the open connections in one /proc/net/tcp{,6} table.
fn count_open(table: &str, listeners: &[SocketAddr]) -> u32 {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            OPEN_STATES
                .contains(&state)
                .then(|| parse_addr(local))
                .flatten()
        })
        .filter(|addr| {
            listeners.iter().any(|l| {
                l.port() == addr.port()
                    && (l.ip().is_unspecified() && l.is_ipv4() == addr.is_ipv4()
                        || l.ip() == addr.ip())
            })
        })
        .count() as u32
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the kernel
/// prints each 32-bit word of the address as a host-order integer.
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(&ip[i * 8..i * 8 + 8])?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn counts_open_connections_on_the_listening_ports() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D0A2 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0 20 4 30 10 -1
   2: 0100007F:1F90 0100007F:D0A4 08 00000000:00000000 00:00000000 00000000  1000        0 3 1 0 20 4 30 10 -1
   3: 0100007F:1F90 0100007F:D0A6 06 00000000:00000000 00:00000000 00000000  1000        0 0 1 0 20 4 30 10 -1
   4: 0100007F:1F91 0100007F:D0A8 01 00000000:00000000 00:00000000 00000000  1000        0 4 1 0 20 4 30 10 -1
   5: 0200007F:1F90 0100007F:D0AA 01 00000000:00000000 00:00000000 00000000  1000        0 5 1 0 20 4 30 10 -1
";
        let at = |s: &str| -> SocketAddr { s.parse().unwrap() };
        // 127.0.0.1:8080: one ESTABLISHED, one CLOSE_WAIT; TIME_WAIT and the
        // listener itself do not count, nor other ports or addresses.
        assert_eq!(count_open(table, &[at("127.0.0.1:8080")]), 2);
        assert_eq!(count_open(table, &[at("0.0.0.0:8080")]), 3);
        assert_eq!(count_open(table, &[at("127.0.0.1:8081")]), 1);
        assert_eq!(count_open(table, &[at("[::]:8080")]), 0);
        let v6 =
            "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:C350 01 0
";
        assert_eq!(count_open(v6, &[at("[::1]:8080")]), 1);
        assert_eq!(count_open(v6, &[at("[::]:8080")]), 1);
        assert_eq!(count_open(v6, &[at("127.0.0.1:8080")]), 0);
    }

    #[test]
    fn reads_this_hosts_tables() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(open_on(&[addr]).unwrap(), 0);
        let _c = std::net::TcpStream::connect(addr).unwrap();
        // The client's side is on another port; the server's side (in the
        // queue) is open on the listener's.
        assert_eq!(open_on(&[addr]).unwrap(), 1);
        let (_s, _) = l.accept().unwrap();
        assert_eq!(open_on(&[addr]).unwrap(), 1);
    }
}
