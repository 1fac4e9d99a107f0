//! Talking upward to systemd: READY=1, STATUS=, RELOADING=1, STOPPING=1 and
//! WATCHDOG=1 (sd_notify(3)). A no-op when droved was not started with
//! NOTIFY_SOCKET (standalone), so callers never need to check.
//!
//! Messages are sent without blocking (see `UpwardSocket`): a status update
//! that does not fit the receiver's queue is dropped with a warning, never
//! allowed to stall supervision. READY/RELOADING/STOPPING carry the current
//! STATUS= too, so a dropped status line is corrected by the next one.
//!
//! systemd reads a datagram as `VAR=value` lines and trusts a root sender's
//! `MAINPID=`, so a value must never hold a line break: the status comes
//! in as a [`OneLine`], and [`payload`] refuses any value with a line
//! break or NUL all the same.

use std::time::{Duration, Instant};

use crate::oneline::OneLine;
use crate::sys::notify_socket::{UpwardSocket, monotonic_usec};

/// One datagram for systemd from `VAR=value` pairs; `None` (and nothing
/// sent) if a name is not `[A-Z_]+` or a value holds `\n`, `\r` or NUL,
/// which would let text add assignments of its own.
pub fn payload(fields: &[(&str, &str)]) -> Option<String> {
    let mut out = String::new();
    for (name, value) in fields {
        if name.is_empty()
            || !name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
            || value.contains(['\n', '\r', '\0'])
        {
            return None;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(value);
    }
    Some(out)
}

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

    /// Sends one datagram built from `fields` (see [`payload`]); false
    /// when systemd did not take it.
    fn send_fields(&mut self, fields: &[(&str, &str)]) -> bool {
        if self.socket.is_none() {
            return true;
        }
        match payload(fields) {
            Some(p) => self.send(&p),
            None => {
                tracing::error!(
                    "not notifying systemd: a value would span lines ({fields:?}); this is a bug in droved"
                );
                false
            }
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
    fn send_state(&mut self, fields: &[(&str, &str)], status: &OneLine) {
        let sent = self.send_fields(fields);
        self.unsent = match (sent, payload(fields)) {
            (false, Some(p)) => Some(p),
            _ => None,
        };
        self.last_status = status.to_string();
    }

    /// READY=1 (once at start-up, and again after a reload or upgrade).
    pub fn ready(&mut self, status: &OneLine) {
        self.send_state(&[("READY", "1"), ("STATUS", status)], status);
    }

    /// STATUS=, only when the text changed (or the last one was dropped).
    pub fn status(&mut self, status: &OneLine) {
        if status.as_str() != self.last_status && self.send_fields(&[("STATUS", status)]) {
            self.last_status = status.to_string();
        }
    }

    /// RELOADING=1 with MONOTONIC_USEC, as Type=notify-reload expects.
    pub fn reloading(&mut self, status: &OneLine) {
        let usec = monotonic_usec().to_string();
        self.send_state(
            &[
                ("RELOADING", "1"),
                ("STATUS", status),
                ("MONOTONIC_USEC", &usec),
            ],
            status,
        );
    }

    pub fn stopping(&mut self, status: &OneLine) {
        self.send_state(&[("STOPPING", "1"), ("STATUS", status)], status);
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
            self.send_fields(&[("WATCHDOG", "1")]);
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
        up.ready(&OneLine::new("4 workers ready"));
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

    #[test]
    fn a_value_with_a_line_break_is_never_sent() {
        assert_eq!(
            payload(&[("READY", "1"), ("STATUS", "4 workers ready")]).as_deref(),
            Some("READY=1\nSTATUS=4 workers ready")
        );
        assert_eq!(payload(&[("STATUS", "")]).as_deref(), Some("STATUS="));
        for bad in ["boom\nMAINPID=1", "a\rb", "a\0b", "\n"] {
            assert_eq!(payload(&[("STATUS", bad)]), None, "{bad:?}");
        }
        assert_eq!(payload(&[("MAINPID=1\nSTATUS", "x")]), None);
        assert_eq!(payload(&[("", "x")]), None);
        assert_eq!(payload(&[("status", "x")]), None);

        // Through the writer: what reaches the socket is one assignment
        // per field, whatever text the status was made from.
        let dir = std::env::temp_dir().join(format!("drove-upward-nl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let systemd = UnixDatagram::bind(&path).unwrap();
        let mut up = Upward::to(Some(path.to_str().unwrap().to_string()));
        up.ready(&OneLine::new("FAILING: boom\nMAINPID=1\r\nWATCHDOG_USEC=1"));
        let mut buf = [0u8; 4096];
        let len = systemd.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..len],
            b"READY=1\nSTATUS=FAILING: boom MAINPID=1 WATCHDOG_USEC=1"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
