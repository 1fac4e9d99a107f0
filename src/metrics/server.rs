// SPDX-License-Identifier: MIT OR Apache-2.0
//! The metrics listener and its accept loop, one tokio task beside the
//! supervisor's. What a connection may cost is bounded: at most
//! [`MAX_CONNECTIONS`] at once, [`http::MAX_HEAD`] bytes and
//! [`HEAD_TIMEOUT`] to send the request head, [`WRITE_TIMEOUT`] to take
//! the response; anything else is answered 400 and closed. When every slot
//! is taken, a new connection closes the one that has waited longest for
//! its head (`slots`), so slow clients cannot keep scrapes out. A scrape
//! renders on the blocking pool, so even a slow one never holds the runtime
//! thread the supervisor runs on, and at most once per second while nothing
//! changed (`cache`), so scraping in a loop costs droved little.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use super::cache::{self, Cache};
use super::http::{self, Route};
use super::slots::{self, Admission, Held};
use super::{Metrics, health, procfs, render};
use crate::config::ListenAddr;
use crate::supervisor::status::Snapshot;

/// Connections open at once (see `slots` for who makes room).
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its whole request head (a scraper sends it
/// at once).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Listen backlog of a unix metrics socket (std's for TCP).
const BACKLOG: u32 = 128;
/// Time a client has to take the whole response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why metrics cannot be served on an address.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {address} (metrics.listen): {error}")]
pub struct BindError {
    pub address: ListenAddr,
    /// Said in the message, so not a `source` as well.
    pub error: io::Error,
}

/// A bound listener, not yet on the runtime.
pub(super) enum Bound {
    Tcp(std::net::TcpListener),
    /// The path is removed when the listener is dropped (not at an
    /// upgrade's exec, where nothing is dropped and the new image binds
    /// it again).
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// Binds `address`. A unix socket file left by a droved that is gone is
/// replaced; one that a live process still serves is not, nor a file that
/// is not a socket.
pub(super) fn bind(address: &ListenAddr) -> Result<Bound, BindError> {
    let fail = |error| BindError {
        address: address.clone(),
        error,
    };
    match address {
        ListenAddr::Tcp(addr) => {
            let l = std::net::TcpListener::bind(addr).map_err(fail)?;
            l.set_nonblocking(true).map_err(fail)?;
            Ok(Bound::Tcp(l))
        }
        ListenAddr::Unix(path) => {
            // The listeners' binder: bound in a private directory, made
            // 0666 through its fd and renamed into place, so whoever owns
            // the directory cannot aim root's chmod at another file by
            // swapping the socket for a symlink. Readable like a TCP port
            // on 127.0.0.1: by every local user who can reach the
            // directory (no request changes anything).
            let l = crate::sys::listen::bind_unix(path, BACKLOG, "metrics", Some(0o666), None)
                .map_err(fail)?;
            let l = std::os::unix::net::UnixListener::from(l.fd);
            l.set_nonblocking(true).map_err(fail)?;
            Ok(Bound::Unix(l, path.clone()))
        }
    }
}

/// A listener on the runtime.
enum Listening {
    Tcp(TcpListener),
    /// The path goes with the listener.
    Unix(UnixListener, #[allow(dead_code)] UnlinkOnDrop),
}

struct UnlinkOnDrop(PathBuf);

impl Drop for UnlinkOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Listening {
    fn new(bound: Bound) -> io::Result<Listening> {
        Ok(match bound {
            Bound::Tcp(l) => Listening::Tcp(TcpListener::from_std(l)?),
            Bound::Unix(l, path) => Listening::Unix(UnixListener::from_std(l)?, UnlinkOnDrop(path)),
        })
    }
}

/// What a scrape reads.
#[derive(Clone)]
pub(super) struct Source {
    pub(super) metrics: Metrics,
    pub(super) snapshot: watch::Receiver<Snapshot>,
    /// Also makes scrapes render one at a time.
    pub(super) cache: Arc<Mutex<Cache>>,
}

impl Source {
    /// A scrape's text: the last one rendered, if still good (see `cache`),
    /// else rendered afresh on the blocking pool (it reads /proc).
    async fn scrape(&self, format: render::Format) -> Option<Arc<String>> {
        let mut cache = self.cache.lock().await;
        let snapshot = self.snapshot.borrow().clone();
        let key = cache::Key::new(&snapshot, self.metrics.events().changes());
        if let Some(text) = cache.get(format, &key, Instant::now()) {
            return Some(text);
        }
        let metrics = self.metrics.clone();
        let job = move || {
            let live = metrics.live();
            let readings = procfs::read(&live.worker_pids, &metrics.inner.cpu_floor);
            render::render(&snapshot, metrics.events(), &live, &readings, format)
        };
        match tokio::task::spawn_blocking(job).await {
            Ok(text) => {
                let text = Arc::new(text);
                cache.put(format, key, Instant::now(), text.clone());
                Some(text)
            }
            Err(e) => {
                warn!(event = "metrics", "rendering metrics failed: {e}");
                None
            }
        }
    }
}

/// A connection holding a slot.
struct Slot {
    opened: Instant,
    head_in: Arc<AtomicBool>,
    task: AbortHandle,
}

/// The accept loop. `swap` brings a new listener (or none: metrics off)
/// after a reload; the loop ends when the sender is gone.
pub(super) async fn run(
    first: Option<Bound>,
    mut swap: mpsc::UnboundedReceiver<Option<Bound>>,
    source: Source,
) {
    let adopt = |b: Option<Bound>| {
        b.and_then(|b| match Listening::new(b) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(event = "metrics", "cannot serve metrics: {e}");
                None
            }
        })
    };
    let mut current = adopt(first);
    let mut open: Vec<Slot> = Vec::with_capacity(MAX_CONNECTIONS);
    let mut refused = 0u64;
    // Newcomers refused before their head was in come back here once it
    // is (or HEAD_WAIT passed).
    let (again_tx, mut again_rx) = mpsc::channel::<(Conn, Vec<u8>)>(MAX_WAITING);
    let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let (conn, early, may_wait) = tokio::select! {
            next = swap.recv() => match next {
                Some(b) => {
                    current = adopt(b);
                    continue;
                }
                None => return,
            },
            Some((conn, early)) = again_rx.recv() => (conn, early, false),
            accepted = accept(&current) => {
                let conn = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and the like: do not spin on them.
                        debug!(event = "metrics", "accept on the metrics socket: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // A scraper sends its head right after connecting: what is
                // in already tells a scrape from a client holding slots.
                let early = early_bytes(&conn);
                (conn, early, true)
            }
        };
        let has_head = http::head_len(&early).is_some();
        open.retain(|s| !s.task.is_finished());
        let now = Instant::now();
        let held: Vec<Held> = open
            .iter()
            .map(|s| Held {
                opened: s.opened,
                head_in: s.head_in.load(Ordering::Acquire),
            })
            .collect();
        match slots::admit(&held, MAX_CONNECTIONS, has_head, now) {
            Admission::Take => {}
            Admission::Evict(i) => {
                // Dropping its future closes the connection.
                open.swap_remove(i).task.abort();
            }
            Admission::Refuse
                if may_wait
                    && early.is_empty()
                    && waiting.load(Ordering::Acquire) < MAX_WAITING =>
            {
                // Nothing came yet: its head may land just after the accept
                // (a scraper writes its whole head right after connect), so
                // wait for it a little, off the accept loop, then decide
                // again with what came. One that sent part of a head is a
                // slow client, not that race: it gets no room here (a
                // client reconnecting half-heads in a loop filled the room
                // and starved scrapes, 3 of 20 in a CI run).
                waiting.fetch_add(1, Ordering::AcqRel);
                let (again, waiting) = (again_tx.clone(), waiting.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(HEAD_WAIT, conn.readable()).await;
                    let mut early = early;
                    early.extend(early_bytes(&conn));
                    waiting.fetch_sub(1, Ordering::AcqRel);
                    let _ = again.send((conn, early)).await;
                });
                continue;
            }
            Admission::Refuse => {
                refused += 1;
                if refused.is_power_of_two() {
                    debug!(
                        event = "metrics",
                        "no metrics connection slot to take; closed {refused} new connection(s) so far"
                    );
                }
                continue;
            }
        }
        let head_in = Arc::new(AtomicBool::new(has_head));
        let source = source.clone();
        let flag = head_in.clone();
        let task = tokio::spawn(async move {
            match conn {
                Conn::Tcp(s) => serve(s, early, &source, &flag).await,
                Conn::Unix(s) => serve(s, early, &source, &flag).await,
            }
        });
        open.push(Slot {
            opened: now,
            head_in,
            task: task.abort_handle(),
        });
    }
}

/// Newcomers waiting at once for their head after finding no slot.
const MAX_WAITING: usize = 32;
/// How long such a newcomer's head may take to come.
const HEAD_WAIT: Duration = Duration::from_millis(50);

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Conn {
    /// Until something can be read (or the peer closed).
    async fn readable(&self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.readable().await,
            Conn::Unix(s) => s.readable().await,
        }
    }
}

/// What the client sent before it was accepted (up to 1 KiB), read without
/// waiting; empty if nothing yet.
fn early_bytes(conn: &Conn) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let fd = match conn {
        Conn::Tcp(s) => s.as_raw_fd(),
        Conn::Unix(s) => s.as_raw_fd(),
    };
    let mut buf = vec![0u8; 1024];
    // Straight from the socket: tokio keeps no buffer of its own, and its
    // readiness for a just-accepted socket is not known yet.
    let n =
        nix::sys::socket::recv(fd, &mut buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT).unwrap_or(0);
    buf.truncate(n);
    buf
}

async fn accept(l: &Option<Listening>) -> io::Result<Conn> {
    match l {
        Some(Listening::Tcp(l)) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
        Some(Listening::Unix(l, _)) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        None => std::future::pending().await,
    }
}

/// One request, one response, then close. `early`: what was read at
/// accept. `head_in` is set once the request head is read: from then on
/// the connection keeps its slot.
async fn serve<S>(mut stream: S, early: Vec<u8>, source: &Source, head_in: &AtomicBool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream, early)).await {
        Ok(Ok(head)) => head,
        Ok(Err(HeadError::TooLarge)) => Err(http::Refusal::HeadTooLarge),
        Ok(Err(HeadError::Closed)) | Err(_) => return,
    };
    head_in.store(true, Ordering::Release);
    let response = match head {
        Err(r) => http::refusal(r),
        Ok(Route::Index { head_only }) => http::response(
            "200 OK",
            "text/html; charset=utf-8",
            b"<html><body><a href=\"/metrics\">/metrics</a> <a href=\"/livez\">/livez</a> <a href=\"/readyz\">/readyz</a></body></html>\n",
            head_only,
        ),
        Ok(Route::Livez { head_only }) => probe_response(
            &health::liveness(&source.metrics.inner.heartbeat, Instant::now()),
            head_only,
        ),
        Ok(Route::Readyz { head_only }) => {
            probe_response(&health::readiness(&source.snapshot.borrow()), head_only)
        }
        Ok(Route::Metrics { format, head_only }) => match source.scrape(format).await {
            Some(text) => {
                http::response("200 OK", format.content_type(), text.as_bytes(), head_only)
            }
            None => http::response(
                "500 Internal Server Error",
                "text/plain",
                b"rendering metrics failed\n",
                false,
            ),
        },
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await;
}

/// A probe's answer as its response: the status and the reason as text.
fn probe_response(answer: &health::Answer, head_only: bool) -> Vec<u8> {
    let body = format!("{}\n", answer.reason);
    http::response(
        answer.status(),
        "text/plain; charset=utf-8",
        body.as_bytes(),
        head_only,
    )
}

enum HeadError {
    TooLarge,
    Closed,
}

/// Reads up to the end of the request head, parsed, after the `early`
/// bytes read already; never more than [`http::MAX_HEAD`] bytes.
async fn read_head<S>(
    stream: &mut S,
    early: Vec<u8>,
) -> Result<Result<Route, http::Refusal>, HeadError>
where
    S: tokio::io::AsyncRead + Unpin,
{
    if let Some(len) = http::head_len(&early) {
        return Ok(http::parse(&early[..len]));
    }
    if !early.is_empty() && !plausible_start(&early) {
        return Ok(Err(http::Refusal::BadRequest));
    }
    let mut buf = early;
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(len) = http::head_len(&buf[scan_from..]) {
            return Ok(http::parse(&buf[..scan_from + len]));
        }
        if buf.len() >= http::MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        // Garbage that is not even a request line: say so without
        // waiting for a blank line that will not come.
        if !plausible_start(&buf) {
            return Ok(Err(http::Refusal::BadRequest));
        }
    }
}

/// Whether `buf` can still begin a request line: upper-case method
/// letters, then a space.
fn plausible_start(buf: &[u8]) -> bool {
    let method = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match buf.get(method) {
        None => method <= 16,
        Some(b' ') => method > 0,
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spots_garbage_early() {
        assert!(plausible_start(b"GE"));
        assert!(plausible_start(b"GET /metr"));
        assert!(!plausible_start(b"\x16\x03\x01"));
        assert!(!plausible_start(b"get /"));
        assert!(!plausible_start(b" /"));
        assert!(!plausible_start(b"AAAAAAAAAAAAAAAAAAAAAAAA"));
    }
}
