//! Waiting for a connection on listeners droved holds but never accepts
//! on: how a pool at zero workers (`pool.min = 0`) learns, at once, that a
//! client is waiting.
//!
//! Each listener is duplicated (same open file description, so the same
//! accept queue) and the copy registered with the runtime's epoll for
//! readability. A listening socket is readable while a connection waits in
//! its queue; droved does not accept it, it only starts workers, which do.
//! Registration reports a queue that is already non-empty, so a watch made
//! after a connection arrived still fires. Dropping the watch deregisters
//! and closes the copies; the listeners themselves are untouched (no
//! O_NONBLOCK is set: the file description is shared with the workers).

use std::future::poll_fn;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::task::Poll;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Readability watches on copies of the listeners.
pub struct ListenWatch {
    fds: Vec<AsyncFd<OwnedFd>>,
}

impl ListenWatch {
    /// Watches these listeners. Needs a Tokio runtime with I/O enabled.
    pub fn new<'a>(listeners: impl IntoIterator<Item = BorrowedFd<'a>>) -> io::Result<ListenWatch> {
        let fds = listeners
            .into_iter()
            .map(|fd| register(fd.try_clone_to_owned()?))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(ListenWatch { fds })
    }

    /// Resolves once a connection waits on any of the listeners (or the
    /// runtime reports an error for one, which the caller treats alike:
    /// starting a worker is the safe answer).
    pub async fn readable(&self) -> io::Result<()> {
        poll_fn(|cx| {
            for fd in &self.fds {
                if let Poll::Ready(r) = fd.poll_read_ready(cx) {
                    // The guard is dropped without clearing: a watch is
                    // used for one wake-up and then dropped.
                    return Poll::Ready(r.map(drop));
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// Registers an fd of our own with the runtime for readability.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd: it stays open, and is the same
    // fd and file description, until the AsyncFd is dropped (which
    // deregisters it before closing it); nothing else closes it.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
}

/// Waits on `watch`, or forever when there is none (for `select!`).
pub async fn wait(watch: &Option<ListenWatch>) -> io::Result<()> {
    match watch {
        Some(w) => w.readable().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn fires_when_a_connection_waits_and_not_before() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let idle = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let watch = ListenWatch::new([idle.as_fd(), l.as_fd()]).unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(100), watch.readable()).await;
        assert!(quiet.is_err(), "no connection yet");
        let _client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), watch.readable())
            .await
            .expect("a waiting connection wakes the watch")
            .unwrap();
        // A watch made while the connection still waits fires at once.
        drop(watch);
        let again = ListenWatch::new([l.as_fd()]).unwrap();
        tokio::time::timeout(Duration::from_secs(5), again.readable())
            .await
            .expect("registration reports the waiting connection")
            .unwrap();
        // droved never accepts: the connection is still there for a worker.
        drop(again);
        l.set_nonblocking(true).unwrap();
        assert!(l.accept().is_ok());
    }
}
