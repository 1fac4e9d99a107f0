//! `org.drove.Drove1` peer-to-peer on droved's private socket
//! (`sys::control_socket`): the same object, properties, signals and
//! access rules as on the bus, for drovectl where no D-Bus daemon runs.
//!
//! Each accepted client gets its own zbus connection and object; the
//! caller's uid is the one SO_PEERCRED reported at accept, checked by the
//! same [`Access`] as bus callers. Nobody who can reach the socket can make
//! droved spend more than a bounded amount on them:
//! - connections: at most [`MAX_PER_UID`] per uid and [`MAX_UNPRIVILEGED`]
//!   from all unprivileged uids together; root and droved's own uid have
//!   their own [`MAX_PER_UID`], so others filling the socket never lock
//!   them out. Refused connections are closed at once and counted in one
//!   log line per [`REPORT_EVERY`];
//! - authentication: droved's own ([`super::sasl`]), a few hundred bytes,
//!   within [`HANDSHAKE_TIMEOUT`];
//! - messages: [`MAX_MESSAGE`] bytes each, checked from the header before
//!   zbus allocates the body ([`BoundedRead`]); any fds attached are
//!   closed unread; at most [`MAX_QUEUED`] messages waiting.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::access::Access;
use super::server::{Drove1, forward};
use super::{OBJECT_PATH, sasl};
use crate::supervisor::Handle;
use crate::sys::control_socket::{self, ControlSocket, Peer};

/// Connections one uid may hold at once.
pub const MAX_PER_UID: usize = 16;
/// Connections all unprivileged uids may hold together.
pub const MAX_UNPRIVILEGED: usize = 64;
/// Time a client has to authenticate.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest D-Bus message accepted from a client (calls are tiny).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Messages a connection may have waiting.
pub const MAX_QUEUED: usize = 16;
/// At most one line about refused connections per this interval.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Who holds how many connections (pure).
#[derive(Debug, Default)]
pub struct Slots {
    per_uid: HashMap<u32, usize>,
    unprivileged: usize,
}

impl Slots {
    /// Takes a slot for `uid` if the limits allow it.
    pub fn take(&mut self, uid: u32, privileged: bool) -> bool {
        let held = self.per_uid.get(&uid).copied().unwrap_or(0);
        if held >= MAX_PER_UID || (!privileged && self.unprivileged >= MAX_UNPRIVILEGED) {
            return false;
        }
        *self.per_uid.entry(uid).or_default() += 1;
        if !privileged {
            self.unprivileged += 1;
        }
        true
    }

    pub fn give_back(&mut self, uid: u32, privileged: bool) {
        if let Some(n) = self.per_uid.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.per_uid.remove(&uid);
            }
            if !privileged {
                self.unprivileged -= 1;
            }
        }
    }

    #[cfg(test)]
    fn total(&self) -> usize {
        self.per_uid.values().sum()
    }
}

/// A slot, given back when the connection ends.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    uid: u32,
    privileged: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .give_back(self.uid, self.privileged);
    }
}

/// Serves the private socket in `dir` until the runtime ends; the socket
/// file is removed then. `remove_dir`: remove the directory too, if empty.
pub fn serve_private(
    dir: &Path,
    remove_dir: bool,
    handle: Handle,
    access: Access,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let socket = ControlSocket::bind_in(dir, remove_dir)?;
    info!(
        "serving org.drove.Drove1 on the private socket {}",
        socket.path.display()
    );
    Ok(tokio::spawn(accept_loop(socket, handle, access)))
}

async fn accept_loop(socket: ControlSocket, handle: Handle, access: Access) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let mut refused: u64 = 0;
    let mut reported: Option<Instant> = None;
    loop {
        let stream = match socket.listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: wait a little instead of spinning.
                warn!("private socket: cannot accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(peer) = control_socket::peer(&stream) else {
            continue;
        };
        let privileged = peer.uid == 0 || peer.uid == access.own_uid;
        let taken = slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(peer.uid, privileged);
        if !taken {
            refused += 1;
            if reported.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
                warn!(
                    "private socket: refused {refused} connection(s) over the limits ({MAX_PER_UID} per uid, {MAX_UNPRIVILEGED} for unprivileged users together); latest from uid {}, pid {}",
                    peer.uid, peer.pid
                );
                refused = 0;
                reported = Some(Instant::now());
            }
            continue;
        }
        let slot = Slot {
            slots: slots.clone(),
            uid: peer.uid,
            privileged,
        };
        tokio::spawn(connection(
            stream,
            peer,
            slot,
            handle.clone(),
            access.clone(),
        ));
    }
}

/// One client, from authentication until it closes.
async fn connection(
    mut stream: UnixStream,
    peer: Peer,
    slot: Slot,
    handle: Handle,
    access: Access,
) {
    let guid = zbus::Guid::generate();
    match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        sasl::accept(&mut stream, peer.uid, guid.as_str()),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!(
                "private socket: uid {} pid {}: authentication failed: {e}",
                peer.uid, peer.pid
            );
            return;
        }
        Err(_) => {
            debug!(
                "private socket: uid {} pid {}: no authentication within {HANDSHAKE_TIMEOUT:?}",
                peer.uid, peer.pid
            );
            return;
        }
    }
    let (closed_tx, closed_rx) = watch::channel(false);
    let socket = Bounded {
        stream,
        closed: closed_tx,
    };
    let object = Drove1::for_peer(&handle, access, peer);
    let conn = match zbus::connection::Builder::authenticated_socket(socket, guid)
        .map(|b| b.p2p().max_queued(MAX_QUEUED))
        .and_then(|b| b.serve_at(OBJECT_PATH, object))
    {
        Ok(b) => b.build().await,
        Err(e) => Err(e),
    };
    let conn = match conn {
        Ok(conn) => conn,
        Err(e) => {
            debug!("private socket: uid {} pid {}: {e}", peer.uid, peer.pid);
            return;
        }
    };
    let mut closed = closed_rx;
    forward(
        conn,
        handle.snapshot.clone(),
        handle.events.subscribe(),
        async move {
            let _ = closed.wait_for(|c| *c).await;
        },
    )
    .await;
    drop(slot);
}

/// A client's stream for zbus: reads bounded per message (see
/// [`BoundedRead`]), and tells the connection's owner when it closed.
#[derive(Debug)]
struct Bounded {
    stream: UnixStream,
    closed: watch::Sender<bool>,
}

impl zbus::connection::Socket for Bounded {
    type ReadHalf = BoundedRead;
    type WriteHalf = tokio::net::unix::OwnedWriteHalf;

    fn split(self) -> zbus::connection::socket::Split<Self::ReadHalf, Self::WriteHalf> {
        let (read, write) = self.stream.into_split();
        zbus::connection::socket::Split::new(
            BoundedRead {
                inner: read,
                frame: Frame::default(),
                closed: self.closed,
            },
            write,
        )
    }
}

/// Where the reader is in the stream of messages: D-Bus frames are a
/// 16-byte fixed header that gives the length of the rest.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Frame {
    header: [u8; 16],
    have: usize,
    /// Bytes of the current message after its fixed header still to come.
    rest: usize,
}

impl Frame {
    /// How many bytes the next read may take (never past the current
    /// message's header, so it can be checked before the rest is read).
    pub fn want(&self, len: usize) -> usize {
        if self.rest > 0 {
            len.min(self.rest)
        } else {
            len.min(16 - self.have)
        }
    }

    /// Accounts for `bytes` just read; an error when a header announces a
    /// message over `max` bytes (or is not D-Bus).
    pub fn advance(&mut self, bytes: &[u8], max: usize) -> Result<(), String> {
        if self.rest > 0 {
            self.rest -= bytes.len();
            return Ok(());
        }
        self.header[self.have..self.have + bytes.len()].copy_from_slice(bytes);
        self.have += bytes.len();
        if self.have < 16 {
            return Ok(());
        }
        self.have = 0;
        let h = &self.header;
        let u32_at = |i: usize| {
            let b = [h[i], h[i + 1], h[i + 2], h[i + 3]];
            match h[0] {
                b'l' => Ok(u32::from_le_bytes(b)),
                b'B' => Ok(u32::from_be_bytes(b)),
                e => Err(format!("not a D-Bus message (endianness byte {e:#04x})")),
            }
        };
        let body = u32_at(4)? as usize;
        let fields = u32_at(12)? as usize;
        let header_len = 16 + fields;
        let total = header_len.next_multiple_of(8).saturating_add(body);
        if total > max {
            return Err(format!(
                "a message of {total} bytes (at most {max} are accepted here)"
            ));
        }
        self.rest = total - 16;
        Ok(())
    }
}

#[derive(Debug)]
struct BoundedRead {
    inner: OwnedReadHalf,
    frame: Frame,
    closed: watch::Sender<bool>,
}

#[async_trait::async_trait]
impl zbus::connection::socket::ReadHalf for BoundedRead {
    async fn recvmsg(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
        let want = self.frame.want(buf.len());
        let result = zbus::connection::socket::ReadHalf::recvmsg(&mut self.inner, &mut buf[..want])
            .await
            .and_then(|(n, fds)| {
                // fd passing was refused in the handshake: close any sent.
                drop(fds);
                self.frame
                    .advance(&buf[..n], MAX_MESSAGE)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                Ok((n, Vec::new()))
            });
        if !matches!(result, Ok((n, _)) if n > 0) {
            self.closed.send_replace(true);
        }
        result
    }
}

impl Drop for BoundedRead {
    fn drop(&mut self) {
        self.closed.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_per_uid_and_for_the_unprivileged() {
        let mut s = Slots::default();
        for _ in 0..MAX_PER_UID {
            assert!(s.take(1000, false));
        }
        assert!(!s.take(1000, false), "one uid cannot take more");
        // Unprivileged uids together fill the rest...
        let mut uid = 2000;
        while s.take(uid, false) {
            uid += 1;
        }
        assert_eq!(s.total(), MAX_UNPRIVILEGED);
        // ...and root still gets in.
        assert!(s.take(0, true));
        s.give_back(1000, false);
        assert!(s.take(3000, false));
        s.give_back(0, true);
        assert_eq!(s.total(), MAX_UNPRIVILEGED);
    }

    fn header(endian: u8, body: u32, fields: u32) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0] = endian;
        h[1] = 1;
        h[3] = 1;
        let (b, f) = if endian == b'l' {
            (body.to_le_bytes(), fields.to_le_bytes())
        } else {
            (body.to_be_bytes(), fields.to_be_bytes())
        };
        h[4..8].copy_from_slice(&b);
        h[12..16].copy_from_slice(&f);
        h
    }

    #[test]
    fn frames_are_followed_and_big_ones_refused_from_the_header() {
        let mut f = Frame::default();
        assert_eq!(f.want(4096), 16);
        let h = header(b'l', 10, 20);
        f.advance(&h[..5], 1000).unwrap();
        assert_eq!(f.want(4096), 11);
        f.advance(&h[5..], 1000).unwrap();
        // 16 + 20 = 36, padded to 40, + 10 = 50: 34 after the fixed header.
        assert_eq!(f.want(4096), 34);
        f.advance(&[0; 30], 1000).unwrap();
        assert_eq!(f.want(4096), 4);
        f.advance(&[0; 4], 1000).unwrap();
        assert_eq!(f.want(4096), 16, "the next message");

        let big = header(b'B', 128 * 1024 * 1024, 8);
        assert!(
            f.advance(&big, MAX_MESSAGE)
                .unwrap_err()
                .contains("at most")
        );
        let mut g = Frame::default();
        assert!(g.advance(b"GET / HTTP/1.1\r\n", MAX_MESSAGE).is_err());
    }
}
