// SPDX-License-Identifier: MIT OR Apache-2.0
//! Parsing of sd_notify(3) datagrams that workers send to droved's
//! `NOTIFY_SOCKET`. Pure: the socket, SO_PASSCRED and sender lookup live in
//! `sys` and `supervisor`; this module only turns bytes into a
//! [`Notification`].
//!
//! Semantics follow sd_notify(3) and systemd's service manager:
//!
//! - A datagram is a list of `VAR=VALUE` assignments separated by newlines
//!   (`\n`; `\r` also separates, as systemd splits on both). Empty lines are
//!   skipped.
//! - Flags count only with their documented value: `READY=1`, `RELOADING=1`,
//!   `STOPPING=1`, `WATCHDOG=1`, `WATCHDOG=trigger`. `READY=0` and other values
//!   are ignored; a flag, once seen in a datagram, stays set.
//! - `STATUS=`, `ERRNO=`, `EXTEND_TIMEOUT_USEC=`, `WATCHDOG_USEC=`: when a
//!   variable appears more than once, the last assignment wins. An empty
//!   `STATUS=` yields `Some("")`, which means "clear the status", as in
//!   systemd.
//! - Like systemd, the manager ignores what it cannot use rather than
//!   rejecting the whole datagram: unknown variables (`MAINPID=`, `FDSTORE=`,
//!   …), lines without `=`, a negative or non-numeric `ERRNO=`, a
//!   non-numeric `*_USEC=` are all ignored. Values are not trimmed.
//! - The datagram as a whole is rejected ([`NotifyError`]) when it is empty,
//!   longer than [`MAX_DATAGRAM`] bytes, contains a NUL byte (systemd drops
//!   those too) or is not valid UTF-8.
//! - `STATUS` text is untrusted and ends up in logs and on D-Bus: it is made
//!   one printable line ([`crate::oneline::one_line`]: line breaks become a
//!   space, other control characters and bidirectional overrides are
//!   removed) and cut to [`MAX_STATUS_CHARS`] characters.

use std::time::Duration;

/// Longest datagram accepted, in bytes (systemd uses the same limit).
pub const MAX_DATAGRAM: usize = 4096;
/// `STATUS=` text is cut to this many characters.
pub const MAX_STATUS_CHARS: usize = 256;

/// What one datagram said. Fields not mentioned in it are false / `None`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Notification {
    /// `READY=1`: startup (or a reload) finished.
    pub ready: bool,
    /// `RELOADING=1`: the worker is reloading its configuration.
    pub reloading: bool,
    /// `STOPPING=1`: the worker is shutting down.
    pub stopping: bool,
    /// `WATCHDOG=1`: watchdog keep-alive.
    pub watchdog: bool,
    /// `WATCHDOG=trigger`: the worker asks to be treated as hung.
    pub watchdog_trigger: bool,
    /// `STATUS=…`, sanitized; `Some("")` clears the status.
    pub status: Option<String>,
    /// `ERRNO=n` (n >= 0): the worker's failure reason.
    pub errno: Option<i32>,
    /// `EXTEND_TIMEOUT_USEC=n`: extend the current start/stop timeout.
    pub extend_timeout: Option<Duration>,
    /// `WATCHDOG_USEC=n`: the worker asks for a different watchdog timeout.
    pub watchdog_usec: Option<Duration>,
}

/// Why a datagram was rejected as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifyError {
    #[error("empty notification datagram")]
    Empty,
    #[error("notification datagram of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("notification datagram contains a NUL byte at offset {offset}")]
    Nul { offset: usize },
    #[error("notification datagram is not valid UTF-8 (from byte {valid_up_to})")]
    InvalidUtf8 { valid_up_to: usize },
}

/// Parse one datagram; see the module documentation for the rules.
pub fn parse(datagram: &[u8]) -> Result<Notification, NotifyError> {
    if datagram.is_empty() {
        return Err(NotifyError::Empty);
    }
    if datagram.len() > MAX_DATAGRAM {
        return Err(NotifyError::TooLong {
            len: datagram.len(),
            max: MAX_DATAGRAM,
        });
    }
    if let Some(offset) = datagram.iter().position(|b| *b == 0) {
        return Err(NotifyError::Nul { offset });
    }
    let text = std::str::from_utf8(datagram).map_err(|e| NotifyError::InvalidUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;

    let mut n = Notification::default();
    for line in text.split(['\n', '\r']) {
        let Some((var, value)) = line.split_once('=') else {
            continue;
        };
        match (var, value) {
            ("READY", "1") => n.ready = true,
            ("RELOADING", "1") => n.reloading = true,
            ("STOPPING", "1") => n.stopping = true,
            ("WATCHDOG", "1") => n.watchdog = true,
            ("WATCHDOG", "trigger") => n.watchdog_trigger = true,
            ("STATUS", text) => n.status = Some(sanitize_status(text)),
            ("ERRNO", v) => {
                if let Some(errno) = v.parse::<i32>().ok().filter(|e| *e >= 0) {
                    n.errno = Some(errno);
                }
            }
            ("EXTEND_TIMEOUT_USEC", v) => {
                if let Ok(us) = v.parse::<u64>() {
                    n.extend_timeout = Some(Duration::from_micros(us));
                }
            }
            ("WATCHDOG_USEC", v) => {
                if let Ok(us) = v.parse::<u64>() {
                    n.watchdog_usec = Some(Duration::from_micros(us));
                }
            }
            _ => {}
        }
    }
    Ok(n)
}

/// Make untrusted status text safe for a log line or a D-Bus property:
/// one printable line of at most [`MAX_STATUS_CHARS`] characters (see
/// [`crate::oneline`]).
pub fn sanitize_status(text: &str) -> String {
    crate::oneline::one_line(text, MAX_STATUS_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(bytes: &[u8]) -> Notification {
        parse(bytes).unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(bytes)))
    }

    #[test]
    fn ready() {
        assert_eq!(
            ok(b"READY=1"),
            Notification {
                ready: true,
                ..Default::default()
            }
        );
        assert!(ok(b"READY=1\n").ready);
        assert!(!ok(b"READY=0").ready);
        assert!(!ok(b"READY=true").ready);
        assert!(!ok(b"READY=1 ").ready);
        assert!(!ok(b" READY=1").ready);
        assert!(!ok(b"ready=1").ready);
        assert!(!ok(b"READY").ready);
        // Once set in a datagram, a later READY=0 does not unset it.
        assert!(ok(b"READY=1\nREADY=0").ready);
    }

    #[test]
    fn flags() {
        let n = ok(b"RELOADING=1\nSTOPPING=1\nWATCHDOG=1\nWATCHDOG=trigger");
        assert!(n.reloading && n.stopping && n.watchdog && n.watchdog_trigger);
        assert!(!n.ready);
        let n = ok(b"WATCHDOG=trigger");
        assert!(n.watchdog_trigger && !n.watchdog);
        let n = ok(b"WATCHDOG=2\nSTOPPING=yes\nRELOADING=0");
        assert_eq!(n, Notification::default());
    }

    #[test]
    fn multiple_assignments_typical_sd_notify() {
        let n = ok(b"READY=1\nSTATUS=Processing requests\nMAINPID=4242\nERRNO=0\n");
        assert_eq!(
            n,
            Notification {
                ready: true,
                status: Some("Processing requests".into()),
                errno: Some(0),
                ..Default::default()
            }
        );
    }

    #[test]
    fn later_assignment_wins() {
        let n = ok(b"STATUS=first\nSTATUS=second\nERRNO=1\nERRNO=2\n\
                     EXTEND_TIMEOUT_USEC=1\nEXTEND_TIMEOUT_USEC=2000000\n\
                     WATCHDOG_USEC=5\nWATCHDOG_USEC=3000000");
        assert_eq!(n.status.as_deref(), Some("second"));
        assert_eq!(n.errno, Some(2));
        assert_eq!(n.extend_timeout, Some(Duration::from_secs(2)));
        assert_eq!(n.watchdog_usec, Some(Duration::from_secs(3)));
        // An invalid later value does not erase a valid earlier one.
        let n = ok(b"ERRNO=5\nERRNO=x\nWATCHDOG_USEC=7\nWATCHDOG_USEC=-1");
        assert_eq!(n.errno, Some(5));
        assert_eq!(n.watchdog_usec, Some(Duration::from_micros(7)));
    }

    #[test]
    fn invalid_values_are_ignored() {
        let n = ok(b"ERRNO=-5\nEXTEND_TIMEOUT_USEC=soon\nWATCHDOG_USEC=\nERRNO=99999999999");
        assert_eq!(n, Notification::default());
        assert_eq!(
            ok(b"WATCHDOG_USEC=18446744073709551615").watchdog_usec,
            Some(Duration::from_micros(u64::MAX))
        );
        assert_eq!(
            ok(b"WATCHDOG_USEC=18446744073709551616").watchdog_usec,
            None
        );
        assert_eq!(ok(b"ERRNO=2147483647").errno, Some(i32::MAX));
        assert_eq!(
            ok(b"EXTEND_TIMEOUT_USEC=0").extend_timeout,
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn unknown_and_malformed_lines_are_ignored() {
        let n =
            ok(b"MAINPID=1\nFDSTORE=1\nBUSERROR=x\nno equals sign\n=1\n\n\nX_CUSTOM=1\nREADY=1");
        assert_eq!(
            n,
            Notification {
                ready: true,
                ..Default::default()
            }
        );
        // Lines with only separators or garbage still parse to nothing.
        assert_eq!(ok(b"\n"), Notification::default());
        assert_eq!(ok(b"garbage"), Notification::default());
        assert_eq!(ok("ÄÖÜ=1\n☃".as_bytes()), Notification::default());
    }

    #[test]
    fn carriage_returns_separate_too() {
        let n = ok(b"READY=1\r\nSTATUS=ok\r\n");
        assert!(n.ready);
        assert_eq!(n.status.as_deref(), Some("ok"));
    }

    #[test]
    fn status() {
        assert_eq!(ok(b"STATUS=").status.as_deref(), Some(""));
        assert_eq!(ok(b"STATUS=a=b=c").status.as_deref(), Some("a=b=c"));
        assert_eq!(
            ok(b"STATUS=  spaced  ").status.as_deref(),
            Some("  spaced  ")
        );
        // Control characters cannot inject escapes into logs or terminals.
        assert_eq!(
            ok(b"STATUS=\x1b[31mred\x1b[0m\tand\x07bell\x7f")
                .status
                .as_deref(),
            Some("[31mred[0m andbell")
        );
        assert_eq!(
            ok("STATUS=a\u{2028}b\u{202E}c\u{0085}d".as_bytes())
                .status
                .as_deref(),
            Some("a bc d")
        );
        assert_eq!(
            ok("STATUS=héllo wörld ✓".as_bytes()).status.as_deref(),
            Some("héllo wörld ✓")
        );
    }

    #[test]
    fn status_is_truncated_on_a_char_boundary() {
        let long = format!("STATUS={}", "é".repeat(1000));
        let s = ok(long.as_bytes()).status.unwrap();
        assert_eq!(s.chars().count(), MAX_STATUS_CHARS);
        assert!(s.chars().all(|c| c == 'é'));
        let exact = format!("STATUS={}", "x".repeat(MAX_STATUS_CHARS));
        assert_eq!(ok(exact.as_bytes()).status.unwrap().len(), MAX_STATUS_CHARS);
        // Stripping happens before truncation: control characters do not
        // use up the budget.
        let padded = format!("STATUS={}{}", "\x01".repeat(500), "y".repeat(300));
        assert_eq!(
            ok(padded.as_bytes()).status.unwrap(),
            "y".repeat(MAX_STATUS_CHARS)
        );
    }

    #[test]
    fn rejected_datagrams() {
        assert_eq!(parse(b""), Err(NotifyError::Empty));
        assert_eq!(parse(b"READY=1\0"), Err(NotifyError::Nul { offset: 7 }));
        assert_eq!(parse(b"\0READY=1"), Err(NotifyError::Nul { offset: 0 }));
        assert_eq!(
            parse(b"READY=1\n\xff\xfe"),
            Err(NotifyError::InvalidUtf8 { valid_up_to: 8 })
        );
        assert_eq!(
            parse(b"STATUS=\xc3"),
            Err(NotifyError::InvalidUtf8 { valid_up_to: 7 })
        );
        let huge = vec![b'a'; MAX_DATAGRAM + 1];
        assert_eq!(
            parse(&huge),
            Err(NotifyError::TooLong {
                len: MAX_DATAGRAM + 1,
                max: MAX_DATAGRAM
            })
        );
        let mut max = b"READY=1\n".to_vec();
        max.resize(MAX_DATAGRAM, b'x');
        assert!(ok(&max).ready);
        assert_eq!(
            parse(&vec![b'x'; 1 << 20]).unwrap_err().to_string(),
            "notification datagram of 1048576 bytes exceeds the limit of 4096 bytes"
        );
        assert_eq!(
            NotifyError::Nul { offset: 3 }.to_string(),
            "notification datagram contains a NUL byte at offset 3"
        );
    }

    #[test]
    fn garbage_never_panics() {
        // A small deterministic fuzz: random bytes biased towards the
        // interesting ones must parse or fail cleanly, and any status must
        // come out sanitized.
        let alphabet: &[u8] = b"READYSTATUSWATCHDOG_USECERRNO=1\n\r\0\xff\xc3\x1b trigger";
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (seed >> 33) as usize % 64;
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    let r = seed.rotate_left(i as u32 * 7) ^ (i as u64).wrapping_mul(0xff51_afd7);
                    if r.is_multiple_of(3) {
                        (r >> 8) as u8
                    } else {
                        alphabet[(r >> 16) as usize % alphabet.len()]
                    }
                })
                .collect();
            if let Ok(n) = parse(&bytes)
                && let Some(s) = n.status
            {
                assert!(!s.chars().any(char::is_control));
                assert!(s.chars().count() <= MAX_STATUS_CHARS);
            }
        }
    }
}
