//! Log setup: the journal (with structured fields) under systemd, stderr otherwise.
//!
//! Under systemd, stderr is connected to the journal and `JOURNAL_STREAM`
//! names that stream's device:inode (systemd.exec(5)); when it matches our
//! stderr we log to journald natively, so fields such as `worker_pid` land
//! as `WORKER_PID=` and `journalctl -u drove@x WORKER_PID=123` works.
//! Filter with `DROVE_LOG` (tracing-subscriber's EnvFilter syntax).
//!
//! A journal that stops reading (journald stopped, stuck on a slow disk)
//! must not stop the supervisor: each message may wait at most
//! [`JOURNAL_SEND_TIMEOUT`], and once one times out the rest are dropped
//! at once, with one retry per [`JOURNAL_RETRY`], until the journal takes
//! messages again. The supervisor reads [`journal_health`] to report it.

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::span;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

use crate::sys::journal;

/// How long one log message may hold up droved when journald does not read.
pub const JOURNAL_SEND_TIMEOUT: Duration = Duration::from_millis(10);
/// While the journal is stalled, one message per this interval tries it.
pub const JOURNAL_RETRY: Duration = Duration::from_secs(1);

/// Where logs went, for the startup message and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journal,
    Stderr,
}

/// True when our stderr is the journal stream systemd set up for us.
pub fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}

/// Installs the global subscriber. Call it before any thread starts (the
/// journal socket is found by what it opened). Falls back to stderr if the
/// journal socket cannot be reached or does not take messages now (a
/// missing journal must not stop the pool).
pub fn init() -> Sink {
    let filter = EnvFilter::try_from_env("DROVE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // The probe first: tracing-journald's own first send has no timeout.
    if stderr_is_journal()
        && journal::probe(JOURNAL_SEND_TIMEOUT).is_ok()
        && let Ok((layer, sockets)) =
            journal::with_send_timeout(JOURNAL_SEND_TIMEOUT, tracing_journald::layer)
    {
        journal::judge_by(&sockets);
        // No field prefix: `journalctl WORKER_PID=123` as documented.
        let layer = layer
            .with_syslog_identifier("droved".to_string())
            .with_field_prefix(None);
        tracing_subscriber::registry()
            .with(filter)
            .with(Bounded(layer))
            .init();
        return Sink::Journal;
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .compact(),
        )
        .init();
    Sink::Stderr
}

/// What the journal layer saw of the journal, for STATUS= and the log line
/// droved writes when the journal comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JournalHealth {
    /// When a message first failed to go out in time, while that lasts.
    pub stalled_since: Option<Instant>,
    /// Messages lost since droved started (timed out or skipped).
    pub dropped: u64,
}

/// The journal's health as the log layer last saw it.
pub fn journal_health() -> JournalHealth {
    GATE.lock().map(|g| g.health).unwrap_or_default()
}

/// While the journal is stalled and a retry is due, tries it with an empty
/// message: a quiet droved would otherwise never learn that it is back.
/// Call it from the supervisor's tick.
pub fn retry_journal() {
    let now = Instant::now();
    let due = GATE
        .lock()
        .is_ok_and(|g| g.health.stalled_since.is_some() && g.retry_at.is_none_or(|at| now >= at));
    if due {
        let delivered = journal::probe_again(JOURNAL_SEND_TIMEOUT).is_ok();
        if let Ok(mut g) = GATE.lock() {
            // The probe carried no message: nothing more was lost.
            match delivered {
                true => g.sent(now, now.elapsed(), true),
                false => g.stall(now, now.elapsed()),
            }
        }
    }
}

static GATE: Mutex<JournalGate> = Mutex::new(JournalGate {
    health: JournalHealth {
        stalled_since: None,
        dropped: 0,
    },
    retry_at: None,
});

/// Decides which messages try the journal. Pure: the caller measures.
#[derive(Debug)]
struct JournalGate {
    health: JournalHealth,
    retry_at: Option<Instant>,
}

impl JournalGate {
    /// Whether a message logged at `now` should try the journal; counts it
    /// as dropped when not.
    fn admit(&mut self, now: Instant) -> bool {
        match self.retry_at {
            Some(at) if now < at => {
                self.health.dropped += 1;
                false
            }
            _ => true,
        }
    }

    /// Records how the send of a message that `started` went; a lost one
    /// stalls the gate until `JOURNAL_RETRY` after the send gave up.
    fn sent(&mut self, started: Instant, took: Duration, delivered: bool) {
        if !delivered {
            self.health.dropped += 1;
            self.stall(started, took);
        } else {
            self.health.stalled_since = None;
            self.retry_at = None;
        }
    }

    fn stall(&mut self, started: Instant, took: Duration) {
        self.health.stalled_since.get_or_insert(started);
        self.retry_at = Some(started + took + JOURNAL_RETRY);
    }
}

/// Whether a message whose send took `took` reached the journal.
/// tracing-journald drops send errors, so only the time tells: a send that
/// took the whole timeout timed out. A quick one is not proof while the
/// journal is `stalled`: with a send timeout set, a signal (a worker's
/// SIGCHLD) ends the blocked send at once with EINTR, SA_RESTART or not
/// (signal(7)), and that ended stalls while journald was still stopped.
/// Then `confirm` asks droved's own journal socket.
fn delivered(took: Duration, stalled: bool, confirm: impl FnOnce() -> bool) -> bool {
    took < JOURNAL_SEND_TIMEOUT && (!stalled || confirm())
}

/// The journald layer behind the [`JournalGate`]; everything but events
/// passes straight through (span fields are recorded as usual).
struct Bounded<L>(L);

impl<S: Subscriber, L: Layer<S>> Layer<S> for Bounded<L> {
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let started = Instant::now();
        if !GATE.lock().is_ok_and(|mut g| g.admit(started)) {
            return;
        }
        self.0.on_event(event, ctx);
        let took = started.elapsed();
        let stalled = GATE.lock().is_ok_and(|g| g.health.stalled_since.is_some());
        let delivered = delivered(took, stalled, || {
            journal::probe_again(JOURNAL_SEND_TIMEOUT).is_ok()
        });
        if let Ok(mut g) = GATE.lock() {
            g.sent(started, took, delivered);
        }
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.0.on_layer(subscriber);
    }
    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.0.enabled(metadata, ctx)
    }
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_new_span(attrs, id, ctx);
    }
    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.0.on_record(id, values, ctx);
    }
    fn on_follows_from(&self, id: &span::Id, follows: &span::Id, ctx: Context<'_, S>) {
        self.0.on_follows_from(id, follows, ctx);
    }
    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_enter(id, ctx);
    }
    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_exit(id, ctx);
    }
    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.0.on_close(id, ctx);
    }
    fn on_id_change(&self, old: &span::Id, new: &span::Id, ctx: Context<'_, S>) {
        self.0.on_id_change(old, new, ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_micros(50);

    #[test]
    fn a_healthy_journal_gets_every_message() {
        let mut g = JournalGate {
            health: JournalHealth::default(),
            retry_at: None,
        };
        let t0 = Instant::now();
        for i in 0..100 {
            let now = t0 + Duration::from_millis(i);
            assert!(g.admit(now));
            g.sent(now, FAST, true);
        }
        assert_eq!(g.health, JournalHealth::default());
    }

    #[test]
    fn a_stalled_journal_costs_one_timeout_per_retry_interval() {
        let mut g = JournalGate {
            health: JournalHealth::default(),
            retry_at: None,
        };
        let t0 = Instant::now();
        assert!(g.admit(t0));
        g.sent(t0, JOURNAL_SEND_TIMEOUT, false);
        assert_eq!(g.health.stalled_since, Some(t0));
        // Within the retry interval: dropped without waiting.
        let mut waited = 0;
        for ms in (20..2_500).step_by(20) {
            let now = t0 + Duration::from_millis(ms);
            if g.admit(now) {
                waited += 1;
                g.sent(now, JOURNAL_SEND_TIMEOUT, false);
            }
        }
        assert_eq!(waited, 2, "one try per second, at ~1.01 s and ~2.02 s");
        assert_eq!(g.health.dropped, 1 + 124);
        assert_eq!(g.health.stalled_since, Some(t0), "still the first failure");
        // The journal reads again: the next try goes through and clears the stall.
        let later = t0 + Duration::from_secs(4);
        assert!(g.admit(later));
        g.sent(later, FAST, true);
        assert_eq!(g.health.stalled_since, None);
        assert_eq!(g.health.dropped, 125, "the count of lost messages stays");
        assert!(g.admit(later + FAST));
    }

    #[test]
    fn a_quick_send_ends_a_stall_only_when_the_socket_confirms() {
        let never = || -> bool { panic!("a healthy journal needs no confirmation") };
        assert!(delivered(FAST, false, never));
        assert!(!delivered(JOURNAL_SEND_TIMEOUT, false, never));
        assert!(!delivered(JOURNAL_SEND_TIMEOUT, true, never), "timed out");
        // Stalled: a send cut short by a signal is as quick as a delivery.
        assert!(!delivered(FAST, true, || false));
        assert!(delivered(FAST, true, || true));
    }
}
