// SPDX-License-Identifier: MIT OR Apache-2.0
//! `/livez` and `/readyz`, for load balancers and Kubernetes probes. Pure:
//! each answer is read from what the supervisor already publishes (its
//! snapshot, and a heartbeat it stores on every turn of its loop), so a
//! probe never waits on the supervisor and never reads /proc.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::supervisor::status::{Phase, Snapshot};

/// The shortest silence of the supervisor's loop that `/livez` calls
/// stuck: the loop turns at least once per `scale.interval` (100 ms by
/// default), so ten seconds without a turn is no slow tick.
pub const MIN_STALL: Duration = Duration::from_secs(10);

/// A probe's answer: 200 or 503, and one line saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub ok: bool,
    pub reason: String,
}

impl Answer {
    fn new(ok: bool, reason: impl Into<String>) -> Answer {
        Answer {
            ok,
            reason: reason.into(),
        }
    }

    pub fn status(&self) -> &'static str {
        if self.ok {
            "200 OK"
        } else {
            "503 Service Unavailable"
        }
    }
}

/// Whether the pool can take traffic: 200 while it serves, including a
/// pool at zero workers that starts one on the next connection
/// (`pool.min = 0`); 503 while starting, draining (`stop.delay`) or
/// stopping, and while no worker is ready in a pool that should have one.
pub fn readiness(s: &Snapshot) -> Answer {
    match s.phase {
        Phase::Starting => return Answer::new(false, "starting: no worker ready yet"),
        Phase::Draining => {
            return Answer::new(
                false,
                format!(
                    "draining (stop.delay): {} workers serve what still comes; stopping next",
                    s.ready
                ),
            );
        }
        Phase::Stopping => return Answer::new(false, "stopping"),
        Phase::Running | Phase::Reloading | Phase::Upgrading => {}
    }
    let during = match s.phase {
        Phase::Reloading | Phase::Upgrading => format!(" ({})", s.phase),
        _ => String::new(),
    };
    if s.ready > 0 {
        return Answer::new(true, format!("ready: {} workers{during}", s.ready));
    }
    if s.failing {
        let why = s
            .failure
            .as_deref()
            .unwrap_or("workers exit right after start");
        return Answer::new(false, format!("failing: no worker ready; {why}"));
    }
    if s.min == 0 {
        let how = if s.starting > 0 {
            format!("waking: {} workers starting", s.starting)
        } else {
            "at zero workers: a connection starts one (pool.min = 0)".to_owned()
        };
        return Answer::new(true, format!("{how}{during}"));
    }
    Answer::new(
        false,
        format!("no worker ready ({} starting){during}", s.starting),
    )
}

/// Whether droved's loop turns: 200 when it turned within the allowed
/// silence, 503 after it.
pub fn liveness(heartbeat: &Heartbeat, now: Instant) -> Answer {
    let (since, allowed) = heartbeat.read(now);
    match since {
        None => Answer::new(false, "the supervisor's loop has not started"),
        Some(d) if d > allowed => Answer::new(
            false,
            format!(
                "the supervisor's loop has not turned for {:.1} s (allowed {:.0} s)",
                d.as_secs_f64(),
                allowed.as_secs_f64()
            ),
        ),
        Some(d) => Answer::new(
            true,
            format!("alive: the loop turned {} ms ago", d.as_millis()),
        ),
    }
}

/// When the supervisor's loop last turned, and how long a silence is
/// allowed; written by the loop, read by `/livez`. Two atomics, no lock.
#[derive(Default)]
pub struct Heartbeat {
    /// Milliseconds since [`base`], plus one (0: never).
    last: AtomicU64,
    allowed_ms: AtomicU64,
}

/// The clock's zero for [`Heartbeat`]: the first use in this process.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

impl Heartbeat {
    /// The loop turned at `now`; it turns at least every `interval`.
    pub fn beat(&self, now: Instant, interval: Duration) {
        let ms = now.saturating_duration_since(base()).as_millis() as u64;
        let allowed = MIN_STALL.max(interval.saturating_mul(3));
        self.allowed_ms
            .store(allowed.as_millis() as u64, Ordering::Relaxed);
        self.last.store(ms + 1, Ordering::Release);
    }

    /// Time since the last beat (`None`: none yet), and the silence allowed.
    pub fn read(&self, now: Instant) -> (Option<Duration>, Duration) {
        let last = self.last.load(Ordering::Acquire);
        let allowed = Duration::from_millis(self.allowed_ms.load(Ordering::Relaxed));
        let since = (last > 0).then(|| {
            let at = base() + Duration::from_millis(last - 1);
            now.saturating_duration_since(at)
        });
        (since, allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(phase: Phase, min: u32, ready: u32, starting: u32) -> Snapshot {
        Snapshot {
            instance: "t".into(),
            version: "0".into(),
            pid: 1,
            phase,
            generation: 1,
            min,
            max: 8,
            target: ready + starting,
            ready,
            starting,
            queued: Some(0),
            uptime_secs: 1.0,
            ..Snapshot::default()
        }
    }

    #[test]
    fn readiness_in_each_state() {
        use Phase::*;
        // (phase, min, ready, starting, 200?, reason starts with)
        let table = [
            (Starting, 2, 0, 2, false, "starting"),
            (Starting, 2, 1, 1, false, "starting"),
            (Running, 2, 2, 0, true, "ready: 2 workers"),
            (Reloading, 2, 2, 1, true, "ready: 2 workers (reloading)"),
            (Upgrading, 2, 2, 0, true, "ready: 2 workers (upgrading)"),
            (Running, 0, 0, 0, true, "at zero workers"),
            (Running, 0, 0, 1, true, "waking: 1 workers starting"),
            (Running, 2, 0, 2, false, "no worker ready (2 starting)"),
            (Draining, 2, 2, 0, false, "draining (stop.delay)"),
            (Draining, 0, 0, 0, false, "draining"),
            (Stopping, 2, 2, 0, false, "stopping"),
        ];
        for (phase, min, ready, starting, ok, reason) in table {
            let a = readiness(&snapshot(phase, min, ready, starting));
            assert_eq!(a.ok, ok, "{phase} min {min} ready {ready}: {a:?}");
            assert!(a.reason.starts_with(reason), "{a:?} vs {reason}");
        }
    }

    #[test]
    fn a_failing_pool_is_not_ready_even_at_min_zero() {
        let mut s = snapshot(Phase::Running, 0, 0, 0);
        s.failing = true;
        s.failure = Some("worker exited with status 1 after 0.0 s".into());
        let a = readiness(&s);
        assert!(!a.ok);
        assert_eq!(
            a.reason,
            "failing: no worker ready; worker exited with status 1 after 0.0 s"
        );
        // A worker that still serves keeps the pool ready.
        s.ready = 1;
        assert!(readiness(&s).ok);
    }

    #[test]
    fn liveness_follows_the_heartbeat() {
        let h = Heartbeat::default();
        let t0 = Instant::now();
        assert!(!liveness(&h, t0).ok, "no beat yet");
        h.beat(t0, Duration::from_millis(100));
        assert!(liveness(&h, t0 + Duration::from_secs(9)).ok);
        let stuck = liveness(&h, t0 + Duration::from_secs(11));
        assert!(!stuck.ok);
        assert!(stuck.reason.contains("not turned for 11.0 s"), "{stuck:?}");
        // A slow interval allows a longer silence.
        h.beat(t0, Duration::from_secs(5));
        assert!(liveness(&h, t0 + Duration::from_secs(14)).ok);
        assert!(!liveness(&h, t0 + Duration::from_secs(16)).ok);
    }
}
