//! systemd's file descriptor store (`FileDescriptorStoreMax=`): listeners
//! droved binds itself outlive droved.
//!
//! Under systemd (NOTIFY_SOCKET), droved pushes each listener it bound with
//! `FDSTORE=1` and an `FDNAME=` made from its address ([`store_name`]);
//! systemd keeps a copy and passes it back in LISTEN_FDS/LISTEN_FDNAMES
//! when it starts droved again (after `kill -9`, a crash, `systemctl
//! restart`). droved then takes the listener back instead of binding
//! again ([`Stored::take`]), so the kernel's accept queue, with every
//! connection waiting in it, survives the restart. A stored fd that is not
//! a listening stream socket of the configured family (or address) is
//! closed, removed from the store (`FDSTOREREMOVE=1`) and bound anew, with
//! a warning; stored listeners the configuration no longer has are removed
//! the same way.
//!
//! systemd 254 and later tell the service the store's size in `$FDSTORE`;
//! older ones say nothing, and silently drop a push when the unit has no
//! store, so droved pushes whenever it runs under systemd and `$FDSTORE`
//! is not `0`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{self, ControlMessage, MsgFlags, UnixAddr};

use super::listen::{Family, Listener};
use crate::config::{ListenAddr, ListenSpec};

/// What every FDNAME droved stores begins with: tells its own stored
/// listeners from a socket unit's (FileDescriptorName=).
pub const PREFIX: &str = "drove-fdstore.";

/// Whether to push listeners to systemd's fd store, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// `$FDSTORE` says the unit keeps this many fds.
    Size(u32),
    /// Under systemd that does not say (before 254): pushed; kept if the
    /// unit sets FileDescriptorStoreMax=.
    Unknown,
    /// Not under systemd, or `$FDSTORE=0`.
    Off,
}

/// Reads NOTIFY_SOCKET and `$FDSTORE`.
pub fn availability() -> Availability {
    decide(
        std::env::var_os("NOTIFY_SOCKET").is_some(),
        std::env::var("FDSTORE").ok().as_deref(),
    )
}

fn decide(notify: bool, fdstore: Option<&str>) -> Availability {
    if !notify {
        return Availability::Off;
    }
    match fdstore.map(|s| s.trim().parse::<u32>()) {
        None | Some(Err(_)) => Availability::Unknown,
        Some(Ok(0)) => Availability::Off,
        Some(Ok(n)) => Availability::Size(n),
    }
}

/// The FDNAME of the listener bound at `address`: [`PREFIX`] and the
/// address with every character systemd does not allow in a name (`:`,
/// anything but printable ASCII) and `%` written as `%XX`.
pub fn store_name(address: &ListenAddr) -> String {
    let text = match address {
        ListenAddr::Tcp(a) => format!("tcp.{a}"),
        ListenAddr::Unix(p) => format!("unix.{}", p.display()),
    };
    let mut name = String::from(PREFIX);
    for b in text.bytes() {
        if b.is_ascii_graphic() && b != b':' && b != b'%' {
            name.push(b as char);
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    // FDNAME is at most 255 characters; unix paths are at most 107 bytes.
    name.truncate(255);
    name
}

/// Sends one notification with `fds` attached to NOTIFY_SOCKET.
fn notify_with_fds(payload: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let Some(address) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let address = address.to_string_lossy().into_owned();
    let addr = match address.strip_prefix('@') {
        Some(name) => UnixAddr::new_abstract(name.as_bytes())?,
        None => UnixAddr::new(address.as_str())?,
    };
    let sock = socket::socket(
        socket::AddressFamily::Unix,
        socket::SockType::Datagram,
        socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let iov = [io::IoSlice::new(payload.as_bytes())];
    socket::sendmsg(
        sock.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        Some(&addr),
    )?;
    Ok(())
}

/// Hands a copy of `listener` to systemd's fd store under `name`.
pub fn push(listener: &Listener, name: &str) -> io::Result<()> {
    notify_with_fds(&format!("FDSTORE=1\nFDNAME={name}"), &[listener.as_fd()])
}

/// Removes the fds stored under `name` from systemd's store.
pub fn remove(name: &str) -> io::Result<()> {
    notify_with_fds(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
}

/// Listeners systemd passed back from the store, by FDNAME.
#[derive(Debug, Default)]
pub struct Stored {
    fds: Vec<(String, OwnedFd)>,
    /// Names to remove from the store: unusable or unwanted fds.
    stale: Vec<String>,
}

impl Stored {
    pub fn new(fds: Vec<(String, OwnedFd)>) -> Stored {
        Stored {
            fds,
            stale: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The stored listener for `spec`, if there is one that is a listening
    /// stream socket of the configured family and address. One that is
    /// not is closed (and its name noted for removal) with a warning.
    pub fn take(&mut self, spec: &ListenSpec) -> Option<Listener> {
        let name = store_name(&spec.address);
        let i = self.fds.iter().position(|(n, _)| *n == name)?;
        let (name, fd) = self.fds.swap_remove(i);
        // Further fds of the same name (a store filled twice) are extras.
        while let Some(j) = self.fds.iter().position(|(n, _)| *n == name) {
            self.fds.swap_remove(j);
        }
        match adopt(fd, spec) {
            Ok(l) => Some(l),
            Err(why) => {
                tracing::warn!(
                    event = "fdstore",
                    "the fd systemd kept for {} ({name}) {why}; closed it and binding anew",
                    spec.address
                );
                self.stale.push(name);
                None
            }
        }
    }

    /// Names to remove from the store: unusable fds and stored listeners
    /// the configuration no longer has (those are closed here).
    pub fn into_stale(mut self) -> Vec<String> {
        for (name, _fd) in self.fds.drain(..) {
            tracing::info!(
                event = "fdstore",
                "systemd kept a listener ({name}) that the configuration no longer has; closing it"
            );
            if !self.stale.contains(&name) {
                self.stale.push(name);
            }
        }
        self.stale
    }
}

/// Checks a stored fd against its configured address.
fn adopt(fd: OwnedFd, spec: &ListenSpec) -> Result<Listener, String> {
    let mut l = Listener::from_fd(fd, spec.name.clone()).map_err(|e| {
        // from_fd's message names the fd; say what it is not.
        let e = e.to_string();
        if e.contains("not a socket") {
            "is not a socket".to_string()
        } else {
            "is not a listening stream socket".to_string()
        }
    })?;
    match (&spec.address, l.family) {
        (ListenAddr::Tcp(want), Family::Tcp) => {
            let got: std::net::SocketAddr = l
                .address
                .parse()
                .map_err(|_| format!("has an unreadable address {}", l.address))?;
            let same_ip = got.ip() == want.ip() && got.is_ipv4() == want.is_ipv4();
            if !same_ip || (want.port() != 0 && got.port() != want.port()) {
                return Err(format!("listens on {got}, not {want}"));
            }
        }
        (ListenAddr::Unix(path), Family::Unix) => {
            // bind_unix binds through /proc/self/fd/N (see there), which is
            // what getsockname says; the path is what we report.
            l.address = format!("unix:{}", path.display());
        }
        (want, _) => {
            let family = match want {
                ListenAddr::Tcp(_) => "TCP",
                ListenAddr::Unix(_) => "unix",
            };
            return Err(format!(
                "is a {} socket, not a {family} one",
                match l.family {
                    Family::Tcp => "TCP",
                    Family::Unix => "unix",
                    Family::Other => "non-TCP, non-unix",
                }
            ));
        }
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_to_push() {
        assert_eq!(decide(false, Some("8")), Availability::Off);
        assert_eq!(decide(true, None), Availability::Unknown);
        assert_eq!(decide(true, Some("0")), Availability::Off);
        assert_eq!(decide(true, Some("8")), Availability::Size(8));
        assert_eq!(decide(true, Some("x")), Availability::Unknown);
    }

    #[test]
    fn names_are_valid_fdnames() {
        let tcp = ListenAddr::Tcp("[::1]:8080".parse().unwrap());
        assert_eq!(store_name(&tcp), "drove-fdstore.tcp.[%3A%3A1]%3A8080");
        let v4 = ListenAddr::Tcp("127.0.0.1:80".parse().unwrap());
        assert_eq!(store_name(&v4), "drove-fdstore.tcp.127.0.0.1%3A80");
        let unix = ListenAddr::Unix("/run/my app/ä.sock".into());
        let n = store_name(&unix);
        assert_eq!(n, "drove-fdstore.unix./run/my%20app/%C3%A4.sock");
        let long = ListenAddr::Unix(format!("/{}", "é".repeat(53)).into());
        let n = store_name(&long);
        assert!(n.len() <= 255);
        assert!(n.bytes().all(|b| b.is_ascii_graphic() && b != b':'));
    }

    #[test]
    fn a_stored_fd_of_the_wrong_kind_is_not_taken() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let spec = |a: ListenAddr| ListenSpec {
            address: a,
            name: "web".into(),
        };
        let right = spec(ListenAddr::Tcp(addr));
        let unix = spec(ListenAddr::Unix("/tmp/x.sock".into()));
        let other_port = spec(ListenAddr::Tcp("127.0.0.1:1".parse().unwrap()));
        let mut s = Stored::new(vec![
            (store_name(&right.address), tcp.try_clone().unwrap().into()),
            (store_name(&unix.address), tcp.try_clone().unwrap().into()),
            (store_name(&other_port.address), tcp.into()),
            ("drove-fdstore.tcp.gone".into(), udp.into()),
        ]);
        let l = s.take(&right).expect("the right one is taken");
        assert_eq!(
            (l.address.as_str(), l.name.as_str()),
            (&*addr.to_string(), "web")
        );
        assert!(s.take(&unix).is_none(), "a TCP socket for a unix address");
        assert!(s.take(&other_port).is_none(), "another port");
        let stale = s.into_stale();
        assert_eq!(
            stale,
            [
                store_name(&unix.address),
                store_name(&other_port.address),
                "drove-fdstore.tcp.gone".into()
            ]
        );
    }
}
