//! A one-shot wake on the first connection that reaches any listener.
//!
//! The scaler samples the accept queues every `scale.interval` (100 ms): a
//! burst that starts just after a tick waits up to a whole interval before
//! droved even looks, and that wait lands on every request of the burst.
//! Watching the listeners all the time would wake droved once per
//! connection under steady load instead. So the watch is armed only while
//! the queues read empty, and fires once: the first connection after a
//! quiet tick wakes the supervisor, which probes at once; the next quiet
//! regular tick arms the watch again. Steady load thus costs at most one
//! extra wake per tick, an idle pool nothing.
//!
//! The watch registers duplicates of the listener fds, so it never clashes
//! with another registration of the same fd and never closes a listener.

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::task::Poll;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Armed: the listeners to watch; disarmed: nothing (waiting never ends).
#[derive(Default)]
pub struct ArrivalWatch {
    armed: Vec<AsyncFd<OwnedFd>>,
}

impl ArrivalWatch {
    pub fn is_armed(&self) -> bool {
        !self.armed.is_empty()
    }

    /// Starts watching `listeners` for a readable accept queue. A queue
    /// that already holds a connection fires at once.
    pub fn arm<'a>(&mut self, listeners: impl Iterator<Item = BorrowedFd<'a>>) -> io::Result<()> {
        self.disarm();
        let mut armed = Vec::new();
        for fd in listeners {
            let dup = fd.try_clone_to_owned()?;
            // SAFETY: `dup` is an open fd owned by the AsyncFd from here on;
            // an OwnedFd's raw fd never changes, and it is closed only when
            // the AsyncFd drops it, after deregistering.
            let fd = unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
            armed.push(fd);
        }
        self.armed = armed;
        Ok(())
    }

    /// Stops watching (deregisters and closes the duplicates).
    pub fn disarm(&mut self) {
        self.armed.clear();
    }

    /// Resolves when a watched listener is readable; pending for ever
    /// while disarmed. Cancel-safe: nothing is consumed.
    pub async fn arrived(&self) {
        poll_fn(|cx| {
            for fd in &self.armed {
                if let Poll::Ready(Ok(mut ready)) = fd.poll_read_ready(cx) {
                    // Edge-triggered underneath: the caller disarms, but
                    // keep the readiness cleared for a watch left armed.
                    ready.clear_ready();
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        })
        .await
    }
}

impl std::fmt::Debug for ArrivalWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fds: Vec<_> = self.armed.iter().map(|a| a.get_ref().as_fd()).collect();
        f.debug_struct("ArrivalWatch").field("armed", &fds).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn fires_on_the_first_connection_and_not_before() {
        runtime().block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut watch = ArrivalWatch::default();
            watch.arm(std::iter::once(l.as_fd())).unwrap();
            assert!(watch.is_armed());
            let quiet = tokio::time::timeout(Duration::from_millis(50), watch.arrived()).await;
            assert!(quiet.is_err(), "fired with nothing queued");
            let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            tokio::time::timeout(Duration::from_secs(5), watch.arrived())
                .await
                .expect("no wake on a queued connection");
            // The listener itself is untouched: the connection is still there.
            l.set_nonblocking(true).unwrap();
            assert!(l.accept().is_ok());
        });
    }

    #[test]
    fn a_disarmed_watch_never_fires() {
        runtime().block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut watch = ArrivalWatch::default();
            watch.arm(std::iter::once(l.as_fd())).unwrap();
            watch.disarm();
            let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let r = tokio::time::timeout(Duration::from_millis(50), watch.arrived()).await;
            assert!(r.is_err(), "a disarmed watch fired");
        });
    }

    #[test]
    fn arming_with_a_queue_already_waiting_fires_at_once() {
        runtime().block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let mut watch = ArrivalWatch::default();
            watch.arm(std::iter::once(l.as_fd())).unwrap();
            tokio::time::timeout(Duration::from_secs(5), watch.arrived())
                .await
                .expect("no wake for a connection queued before arming");
        });
    }
}
