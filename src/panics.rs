//! droved's panic hook: a panic is one log line through `tracing` (with
//! its location), and at most [`MAX_PER_WINDOW`] of them per [`WINDOW`],
//! the rest counted in the next line. Tokio catches a panic in a spawned
//! task (a client's connection, say) and ends just that task, so a bug
//! some client can trigger must not also flood the journal past its rate
//! limit, taking droved's own messages with it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Panics logged per window; the rest are counted.
pub const MAX_PER_WINDOW: u32 = 5;
pub const WINDOW: Duration = Duration::from_secs(60);

/// Which panics are logged (pure).
#[derive(Debug, Default)]
pub struct Limiter {
    started: Option<Instant>,
    logged: u32,
    /// Panics not logged since the last line.
    unlogged: u64,
}

impl Limiter {
    /// One panic at `now`: `Some(n)` to log it, with `n` earlier panics
    /// that were not; `None` to count it only.
    pub fn record(&mut self, now: Instant) -> Option<u64> {
        if self
            .started
            .is_none_or(|t| now.saturating_duration_since(t) >= WINDOW)
        {
            self.started = Some(now);
            self.logged = 0;
        }
        if self.logged >= MAX_PER_WINDOW {
            self.unlogged += 1;
            return None;
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Replaces the default hook (which writes several lines to stderr per
/// panic, and a backtrace with RUST_BACKTRACE) with the limited one.
pub fn install() {
    let limiter = Mutex::new(Limiter::default());
    std::panic::set_hook(Box::new(move |info| {
        let unlogged = limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(Instant::now());
        let Some(unlogged) = unlogged else { return };
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let place = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let more = match unlogged {
            0 => String::new(),
            n => format!(
                " ({n} earlier panic(s) not logged: at most {MAX_PER_WINDOW} per {}s)",
                WINDOW.as_secs()
            ),
        };
        tracing::error!(
            event = "panic",
            "panic in thread {thread} at {place}: {what}{more}"
        );
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_per_window_then_a_count() {
        let t0 = Instant::now();
        let mut l = Limiter::default();
        for _ in 0..MAX_PER_WINDOW {
            assert_eq!(l.record(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.record(t0 + Duration::from_secs(1)), None);
        }
        // The next window's first line says how many were not logged.
        assert_eq!(l.record(t0 + WINDOW), Some(1000));
        assert_eq!(l.record(t0 + WINDOW), Some(0));
    }
}
