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
}

impl Upward {
    /// Reads NOTIFY_SOCKET and WATCHDOG_USEC/WATCHDOG_PID from droved's env.
    pub fn from_env() -> Upward {
        let socket =
            std::env::var("NOTIFY_SOCKET")
                .ok()
                .and_then(|addr| match UpwardSocket::new(&addr) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(
                            "NOTIFY_SOCKET={addr:?} is unusable: {e}; not reporting to systemd"
                        );
                        None
                    }
                });
        Upward {
            socket,
            watchdog: sd_notify::watchdog_enabled(),
            last_ping: None,
            last_status: String::new(),
            dropped: 0,
        }
    }

    fn send(&mut self, lines: &[&str]) {
        let Some(socket) = &self.socket else { return };
        let payload = lines.join("\n");
        if let Err(e) = socket.send(payload.as_bytes()) {
            self.dropped += 1;
            if self.dropped == 1 || self.dropped.is_power_of_two() {
                tracing::warn!(
                    "cannot notify systemd ({e}); {} message(s) dropped so far",
                    self.dropped
                );
            }
        }
    }

    /// READY=1 (once at start-up, and again after a reload or upgrade).
    pub fn ready(&mut self, status: &str) {
        self.send(&["READY=1", &format!("STATUS={status}")]);
        self.last_status = status.to_string();
    }

    /// STATUS=, only when the text changed.
    pub fn status(&mut self, status: &str) {
        if status != self.last_status {
            self.send(&[&format!("STATUS={status}")]);
            self.last_status = status.to_string();
        }
    }

    /// RELOADING=1 with MONOTONIC_USEC, as Type=notify-reload expects.
    pub fn reloading(&mut self, status: &str) {
        self.send(&[
            "RELOADING=1",
            &format!("STATUS={status}"),
            &format!("MONOTONIC_USEC={}", monotonic_usec()),
        ]);
        self.last_status = status.to_string();
    }

    pub fn stopping(&mut self, status: &str) {
        self.send(&["STOPPING=1", &format!("STATUS={status}")]);
        self.last_status = status.to_string();
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
            self.send(&["WATCHDOG=1"]);
            self.last_ping = Some(now);
        }
    }
}
