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
//!   anything is allocated for the body, read whole and their header
//!   fields validated before zbus sees them ([`BoundedRead`], [`wire`]):
//!   a malformed one closes the connection; any fds attached are closed
//!   unread; at most [`MAX_QUEUED`] messages waiting;
//! - rate: an unprivileged uid's messages are read at most
//!   [`super::throttle::UID_RATE`] a second (all unprivileged uids
//!   together [`super::throttle::ALL_RATE`]), after a burst; the excess
//!   waits in the client's own socket, not in droved.

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
use super::server::{Drove1, WorkerLists, forward};
use super::throttle::Throttle;
use super::{OBJECT_PATH, sasl, wire};
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
    let throttle = Arc::new(Mutex::new(Throttle::new(Instant::now())));
    let lists = WorkerLists::default();
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
            throttle.clone(),
            lists.clone(),
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
    throttle: Arc<Mutex<Throttle>>,
    lists: WorkerLists,
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
        uid: peer.uid,
        throttle: (!slot.privileged).then_some(throttle),
        closed: closed_tx,
    };
    let object = Drove1::for_peer(&handle, access, peer, lists);
    let conn = match zbus::connection::Builder::authenticated_socket(socket, guid)
        .map(|b| b.p2p().max_queued(MAX_QUEUED))
        .and_then(|b| b.serve_at(OBJECT_PATH, object))
        .and_then(|b| b.serve_at(BUS_PATH, PeerBus::next()))
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

/// Where bus clients send `Hello`.
const BUS_PATH: &str = "/org/freedesktop/DBus";

/// The one method of a bus daemon that clients written for a bus call
/// before anything else: sd-bus (`busctl --address=unix:path=…/private`)
/// sends `Hello` and gives up on a peer that does not answer it. The
/// answer is a unique name, as a daemon's would be; nothing else of a bus
/// is offered.
struct PeerBus {
    unique_name: String,
}

impl PeerBus {
    fn next() -> PeerBus {
        use std::sync::atomic::{AtomicU64, Ordering};
        static CONNECTIONS: AtomicU64 = AtomicU64::new(1);
        PeerBus {
            unique_name: format!(":1.{}", CONNECTIONS.fetch_add(1, Ordering::Relaxed)),
        }
    }
}

#[zbus::interface(name = "org.freedesktop.DBus")]
impl PeerBus {
    #[zbus(name = "Hello")]
    fn hello(&self) -> String {
        self.unique_name.clone()
    }
}

/// A client's stream for zbus: read a checked message at a time (see
/// [`BoundedRead`]), and tells the connection's owner when it closed.
#[derive(Debug)]
struct Bounded {
    stream: UnixStream,
    uid: u32,
    /// For unprivileged clients.
    throttle: Option<Arc<Mutex<Throttle>>>,
    closed: watch::Sender<bool>,
}

impl zbus::connection::Socket for Bounded {
    type ReadHalf = BoundedRead;
    type WriteHalf = AnswerFirst;

    fn split(self) -> zbus::connection::socket::Split<Self::ReadHalf, Self::WriteHalf> {
        let (read, write) = self.stream.into_split();
        zbus::connection::socket::Split::new(
            BoundedRead {
                inner: read,
                message: Vec::new(),
                handed: 0,
                uid: self.uid,
                throttle: self.throttle,
                closed: self.closed,
            },
            AnswerFirst {
                inner: write,
                answered: false,
                held: Vec::new(),
            },
        )
    }
}

/// Signals held back before a client's first call is answered.
const MAX_HELD: usize = 64;

/// Writes droved's messages to a client, holding its signals back until
/// it has answered the client's first call: a client written for a bus
/// (sd-bus: `busctl --address=unix:path=…/private`) sends `Hello` and
/// takes any message before that reply for a broken bus. drovectl's first
/// call (a property read) is answered before any signal too, which it
/// does not mind.
#[derive(Debug)]
struct AnswerFirst {
    inner: tokio::net::unix::OwnedWriteHalf,
    answered: bool,
    held: Vec<zbus::Message>,
}

#[async_trait::async_trait]
impl zbus::connection::socket::WriteHalf for AnswerFirst {
    async fn send_message(&mut self, msg: &zbus::Message) -> zbus::Result<()> {
        use zbus::message::Type;
        if !self.answered {
            match msg.message_type() {
                Type::Signal => {
                    if self.held.len() < MAX_HELD {
                        self.held.push(msg.clone());
                    }
                    return Ok(());
                }
                Type::MethodReturn | Type::Error => {
                    self.inner.send_message(msg).await?;
                    self.answered = true;
                    for held in std::mem::take(&mut self.held) {
                        self.inner.send_message(&held).await?;
                    }
                    return Ok(());
                }
                Type::MethodCall => {}
            }
        }
        self.inner.send_message(msg).await
    }

    async fn close(&mut self) -> std::io::Result<()> {
        zbus::connection::socket::WriteHalf::close(&mut self.inner).await
    }

    async fn peer_credentials(&mut self) -> std::io::Result<zbus::fdo::ConnectionCredentials> {
        self.inner.peer_credentials().await
    }
}

/// Reads a client's stream a whole message at a time: the length from
/// the fixed header (refused over [`MAX_MESSAGE`]), then the rest, then
/// the header fields checked ([`wire::check_header`]); only then is the
/// message handed to zbus. Any error ends the connection. An unprivileged
/// client's next message is read no sooner than the [`Throttle`] allows.
#[derive(Debug)]
struct BoundedRead {
    inner: OwnedReadHalf,
    /// The checked message being handed out, and how much of it is out.
    message: Vec<u8>,
    handed: usize,
    uid: u32,
    throttle: Option<Arc<Mutex<Throttle>>>,
    closed: watch::Sender<bool>,
}

impl BoundedRead {
    /// Fills `buf` from the socket; `Ok(false)` on a clean end of stream
    /// before the first byte.
    async fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        let mut have = 0;
        while have < buf.len() {
            let (n, fds) =
                zbus::connection::socket::ReadHalf::recvmsg(&mut self.inner, &mut buf[have..])
                    .await?;
            // fd passing was refused in the handshake: close any sent.
            drop(fds);
            if n == 0 {
                if have == 0 {
                    return Ok(false);
                }
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the client closed in the middle of a message",
                ));
            }
            have += n;
        }
        Ok(true)
    }

    /// Reads and checks the next message; `Ok(false)` at end of stream.
    /// Not cancel-safe (a partly read message would be lost), and need not
    /// be: zbus's reader task awaits every read to its end.
    async fn next_message(&mut self) -> std::io::Result<bool> {
        if let Some(throttle) = &self.throttle {
            let wait = throttle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(self.uid, Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let mut header = [0u8; wire::FIXED_HEADER];
        if !self.fill(&mut header).await? {
            return Ok(false);
        }
        let len = wire::message_len(&header, MAX_MESSAGE).map_err(invalid)?;
        let mut message = std::mem::take(&mut self.message);
        message.clear();
        // Calls are small: an idle client keeps no 64 KiB buffer.
        if message.capacity() > 4096 {
            message = Vec::new();
        }
        message.extend_from_slice(&header);
        message.resize(len, 0);
        if !self.fill(&mut message[wire::FIXED_HEADER..]).await? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the client closed after a message's fixed header",
            ));
        }
        wire::check_header(&message).map_err(invalid)?;
        self.message = message;
        self.handed = 0;
        Ok(true)
    }
}

#[async_trait::async_trait]
impl zbus::connection::socket::ReadHalf for BoundedRead {
    async fn recvmsg(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
        if self.handed == self.message.len() {
            match self.next_message().await {
                Ok(true) => {}
                Ok(false) => {
                    self.closed.send_replace(true);
                    return Ok((0, Vec::new()));
                }
                Err(e) => {
                    self.closed.send_replace(true);
                    return Err(e);
                }
            }
        }
        let n = buf.len().min(self.message.len() - self.handed);
        buf[..n].copy_from_slice(&self.message[self.handed..self.handed + n]);
        self.handed += n;
        Ok((n, Vec::new()))
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
}
