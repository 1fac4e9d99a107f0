//! Talking upward to systemd: READY=1, STATUS=, RELOADING=1, STOPPING=1 and
//! WATCHDOG=1 (sd_notify(3)). A no-op when droved was not started with
//! NOTIFY_SOCKET (standalone), so callers never need to check.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

pub struct Upward {
    enabled: bool,
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    last_status: String,
}

impl Upward {
    /// Reads NOTIFY_SOCKET and WATCHDOG_USEC/WATCHDOG_PID from droved's env.
    pub fn from_env() -> Upward {
        Upward {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
            last_ping: None,
            last_status: String::new(),
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!("cannot notify systemd: {e}");
        }
    }

    /// READY=1 (once at start-up, and again after a reload or upgrade).
    pub fn ready(&mut self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
        self.last_status = status.to_string();
    }

    /// STATUS=, only when the text changed.
    pub fn status(&mut self, status: &str) {
        if status != self.last_status {
            self.send(&[NotifyState::Status(status)]);
            self.last_status = status.to_string();
        }
    }

    /// RELOADING=1 with MONOTONIC_USEC, as Type=notify-reload expects.
    pub fn reloading(&mut self, status: &str) {
        let mut states = vec![NotifyState::Reloading, NotifyState::Status(status)];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        self.send(&states);
        self.last_status = status.to_string();
    }

    pub fn stopping(&mut self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
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
            self.send(&[NotifyState::Watchdog]);
            self.last_ping = Some(now);
        }
    }
}
