//! Talking upward to systemd: READY=1, STATUS=, RELOADING=1, STOPPING=1 and
//! WATCHDOG=1 (sd_notify(3)). A no-op when droved was not started with
//! NOTIFY_SOCKET (standalone), so callers never need to check.
//!
//! Messages are sent without blocking (see `UpwardSocket`): a status update
//! that does not fit the receiver's queue is dropped with a warning, never
//! allowed to stall supervision. READY/RELOADING/STOPPING carry the current
//! STATUS= too, so a dropped status line is corrected by the next one.

use std::time::{Duration, Instant};

use crate::sys::notify_socket::{UpwardSocket, monotonic_usec};

pub struct Upward {
    socket: Option<UpwardSocket>,
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    last_status: String,
    dropped: u64,
    /// A READY/RELOADING/STOPPING systemd has not taken yet (its queue was
    /// full): sent again every tick until it is, since systemd acts on it
    /// (a lost READY=1 fails the unit's start after its timeout). A newer
    /// state message replaces it.
    unsent: Option<String>,
}

impl Upward {
    /// Reads NOTIFY_SOCKET and WATCHDOG_USEC/WATCHDOG_PID from droved's env.
    pub fn from_env() -> Upward {
        Upward::to(std::env::var("NOTIFY_SOCKET").ok())
    }

    /// Reports to the socket at `address` (none: a no-op).
    fn to(address: Option<String>) -> Upward {
        let socket = address.and_then(|addr| match UpwardSocket::new(&addr) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET={addr:?} is unusable: {e}; not reporting to systemd");
                None
            }
        });
        Upward {
            socket,
            watchdog: sd_notify::watchdog_enabled(),
            last_ping: None,
            last_status: String::new(),
            dropped: 0,
            unsent: None,
        }
    }

    /// Sends one datagram; false when systemd did not take it.
    fn send(&mut self, payload: &str) -> bool {
        let Some(socket) = &self.socket else {
            return true;
        };
        match socket.send(payload.as_bytes()) {
            Ok(()) => true,
            Err(e) => {
                self.dropped += 1;
                if self.dropped == 1 || self.dropped.is_power_of_two() {
                    tracing::warn!(
                        "cannot notify systemd ({e}); {} message(s) dropped so far",
                        self.dropped
                    );
                }
                false
            }
        }
    }

    /// A state change, with its STATUS=: kept until systemd takes it.
    fn send_state(&mut self, payload: String, status: &str) {
        self.unsent = (!self.send(&payload)).then_some(payload);
        self.last_status = status.to_string();
    }

    /// READY=1 (once at start-up, and again after a reload or upgrade).
    pub fn ready(&mut self, status: &str) {
        self.send_state(format!("READY=1\nSTATUS={status}"), status);
    }

    /// STATUS=, only when the text changed (or the last one was dropped).
    pub fn status(&mut self, status: &str) {
        if status != self.last_status && self.send(&format!("STATUS={status}")) {
            self.last_status = status.to_string();
        }
    }

    /// RELOADING=1 with MONOTONIC_USEC, as Type=notify-reload expects.
    pub fn reloading(&mut self, status: &str) {
        self.send_state(
            format!(
                "RELOADING=1\nSTATUS={status}\nMONOTONIC_USEC={}",
                monotonic_usec()
            ),
            status,
        );
    }

    pub fn stopping(&mut self, status: &str) {
        self.send_state(format!("STOPPING=1\nSTATUS={status}"), status);
    }

    /// Sends a dropped state change again; call every tick.
    pub fn retry(&mut self) {
        if let Some(payload) = self.unsent.take()
            && !self.send(&payload)
        {
            self.unsent = Some(payload);
        }
    }

    /// Pings the watchdog at half its interval; call every tick.
    pub fn watchdog_tick(&mut self, now: Instant) {
        let Some(interval) = self.watchdog else {
            return;
        };
        if self
            .last_ping
            .is_none_or(|t| now.duration_since(t) >= interval / 2)
        {
            self.send("WATCHDOG=1");
            self.last_ping = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn a_state_change_systemd_could_not_take_is_sent_again() {
        let dir = std::env::temp_dir().join(format!("drove-upward-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let systemd = UnixDatagram::bind(&path).unwrap();
        systemd.set_nonblocking(true).unwrap();
        let mut up = Upward::to(Some(path.to_str().unwrap().to_string()));
        // Fill systemd's queue (net.unix.max_dgram_qlen) with status lines.
        let mut n = 0;
        while up.send(&format!("STATUS=filler {n}")) {
            n += 1;
            assert!(n < 100_000, "the queue never filled");
        }
        up.ready("4 workers ready");
        up.retry();
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while let Ok(len) = systemd.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        assert!(!got.iter().any(|m| m.contains("READY=1")), "it did not fit");
        // Room again: the next tick delivers it, once.
        up.retry();
        up.retry();
        let len = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=4 workers ready");
        assert!(systemd.recv(&mut buf).is_err(), "sent once");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
