//! A pool on demand (`pool.min = 0`) and droved's exit when idle
//! (`pool.idle_exit`).
//!
//! "At zero, waiting for a connection" is a condition of the pool, not a
//! state of droved's lifecycle (docs/lifecycle.md): droved is Running (or
//! Rolling, Upgrading) with a target of 0, and every event means what it
//! means with workers. What the condition adds:
//! - while the target is 0, a readability watch on the listeners
//!   (`sys::arrival`, the watch the scaler arms for bursts; this one stays
//!   armed in every state but Stopping, and acts on a single connection)
//!   wakes the pool the moment a connection waits: the
//!   target jumps to the number queued (at least 1), as the scaler's
//!   one-jump rule would, and the scaler counts it as its own scale-up;
//!   the queue probe of every tick does the same, should the watch fail;
//! - the step from 1 to 0 waits until no worker is busy (holds a
//!   connection, see `activity`; the scaler only sees the queue); it is
//!   tried again a cooldown later;
//! - after `pool.idle_exit` at zero workers while Running, droved stops
//!   (STOPPING=1) and exits 0; the socket unit starts it again.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::Supervisor;
use super::lifecycle::Lifecycle;
use crate::sys::arrival::ArrivalWatch;

#[derive(Default)]
pub(super) struct OnDemand {
    /// Readability watch on the listeners, armed while the target is 0.
    pub(super) watch: ArrivalWatch,
    /// Since when the pool has had no process at all (no worker, no fork
    /// asked of a template).
    zero_since: Option<Instant>,
    /// The listeners came from systemd socket activation (a .socket unit),
    /// which alone can start droved again after an idle exit.
    pub(super) socket_activated: bool,
    /// The watch could not be made; the tick's queue probe stands in.
    watch_failed: bool,
}

impl OnDemand {
    pub(super) fn new(socket_activated: bool) -> OnDemand {
        OnDemand {
            socket_activated,
            ..OnDemand::default()
        }
    }
}

/// Why a setting of the pool on demand cannot work here.
pub fn idle_exit_refusal(socket_activated: bool) -> Option<&'static str> {
    (!socket_activated).then_some(
        "pool.idle_exit needs socket activation: droved's sockets were not passed by systemd (a .socket unit), so nothing would start droved again after it exits; start it from a .socket unit or remove pool.idle_exit",
    )
}

impl Supervisor {
    /// After every event: watch the listeners exactly while the target is
    /// 0, and note since when the pool is empty.
    pub(super) fn track_zero(&mut self, now: Instant) {
        let waiting = self.target == 0 && !self.lifecycle.is_stopping();
        if !waiting {
            self.on_demand.watch.disarm();
        } else if !self.on_demand.watch.is_armed() && !self.on_demand.watch_failed {
            match self
                .on_demand
                .watch
                .arm(self.listeners.iter().map(|l| l.as_fd()))
            {
                Ok(()) => {}
                Err(e) => {
                    warn!(
                        "cannot watch the listeners for connections ({e}); a connection at zero workers is noticed on the next queue probe (scale.interval) instead"
                    );
                    self.on_demand.watch_failed = true;
                }
            }
        }
        let empty = self.target == 0
            && self.pool.workers.is_empty()
            && self.pool.templates.forks.is_empty();
        if !empty {
            self.on_demand.zero_since = None;
        } else if self.on_demand.zero_since.is_none() {
            self.on_demand.zero_since = Some(now);
            if self.config.pool.min == 0 && self.phase() != super::status::Phase::Starting {
                info!(event = "zero", "no workers; waiting for a connection");
            }
        }
    }

    /// The watch fired: a connection waits.
    pub(super) fn on_connection_waiting(&mut self) {
        self.on_demand.watch.disarm();
        self.probe_queues();
        self.wake_from_zero();
    }

    /// Starts workers for the connections queued at zero workers.
    fn wake_from_zero(&mut self) {
        if self.target > 0 || self.lifecycle.is_stopping() {
            return;
        }
        let queued = self.queued_total().unwrap_or(0);
        let to = wake_target(queued, self.config.pool.max);
        let now = Instant::now().duration_since(self.started);
        let d = self.scaler.woke(now, to, queued);
        self.apply_scale(d);
    }

    /// On every tick, after the queue probe: the probe as a stand-in for
    /// the watch, and the idle exit.
    pub(super) fn zero_tick(&mut self, now: Instant) {
        if self.target == 0 && self.queued_total().unwrap_or(0) > 0 {
            self.wake_from_zero();
        }
        let Some(limit) = self.config.pool.idle_exit else {
            return;
        };
        let due = idle_exit_due(IdleView {
            limit,
            at_zero_for: self.on_demand.zero_since.map(|t| now.duration_since(t)),
            running: matches!(self.lifecycle, Lifecycle::Running),
            queued: self.queued_total(),
            socket_activated: self.on_demand.socket_activated,
        });
        if !due {
            return;
        }
        info!(
            event = "idle-exit",
            "no workers for {limit:?} (pool.idle_exit): exiting; systemd's socket unit starts droved again on the next connection"
        );
        self.begin_stop(false, "pool.idle_exit");
    }

    /// Whether the last worker may go (a scale-down to 0): not while one
    /// is busy (holds a connection, see `activity`), asked afresh. When
    /// droved cannot tell, it may go: its stop is graceful, so a request
    /// in progress still completes.
    pub(super) fn may_go_to_zero(&mut self) -> bool {
        self.sample_activity(Instant::now(), None);
        !self
            .pool
            .workers
            .values()
            .any(|w| w.is_active() && self.activity.is_busy(w.pid))
    }
}

/// Workers to start for `queued` connections at zero: what the scaler's
/// one-jump rule asks (`ready + queued`, with none ready), at least one
/// (the watch fired: a connection came, even if it left again), at most
/// `max`.
pub fn wake_target(queued: u32, max: u32) -> u32 {
    queued.max(1).min(max)
}

/// What decides an idle exit.
#[derive(Debug, Clone, Copy)]
pub struct IdleView {
    pub limit: Duration,
    /// How long the pool has had no process, if it has none.
    pub at_zero_for: Option<Duration>,
    /// In Lifecycle::Running (not starting, rolling, upgrading, stopping).
    pub running: bool,
    pub queued: Option<u32>,
    pub socket_activated: bool,
}

/// Whether droved should exit for `pool.idle_exit` now: only under socket
/// activation, only while Running, with no connection waiting (and the
/// queue readable), after `limit` with no worker.
pub fn idle_exit_due(v: IdleView) -> bool {
    v.socket_activated
        && v.running
        && v.queued == Some(0)
        && v.at_zero_for.is_some_and(|d| d >= v.limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn how_many_workers_a_wake_starts() {
        // (queued, max, target)
        for (queued, max, want) in [(0, 8, 1), (1, 8, 1), (5, 8, 5), (30, 8, 8), (3, 1, 1)] {
            assert_eq!(wake_target(queued, max), want, "queued {queued} max {max}");
        }
    }

    #[test]
    fn when_droved_exits_for_idleness() {
        let s = Duration::from_secs(1);
        let base = IdleView {
            limit: 10 * s,
            at_zero_for: Some(10 * s),
            running: true,
            queued: Some(0),
            socket_activated: true,
        };
        assert!(idle_exit_due(base));
        let not = [
            IdleView {
                at_zero_for: Some(9 * s),
                ..base
            },
            IdleView {
                at_zero_for: None,
                ..base
            },
            IdleView {
                running: false,
                ..base
            },
            IdleView {
                queued: Some(1),
                ..base
            },
            IdleView {
                queued: None,
                ..base
            },
            IdleView {
                socket_activated: false,
                ..base
            },
        ];
        for v in not {
            assert!(!idle_exit_due(v), "{v:?}");
        }
        assert!(idle_exit_refusal(false).is_some());
        assert!(idle_exit_refusal(true).is_none());
    }
}
