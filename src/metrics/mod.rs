// SPDX-License-Identifier: MIT OR Apache-2.0
//! Prometheus metrics: `/metrics` served by droved itself on
//! `[metrics] listen` (off by default), never on a worker socket.
//!
//! The supervisor never waits for a scrape. It owns a [`Metrics`] and
//! calls one hook per event ([`Metrics::worker_ready`],
//! [`Metrics::scale_decision`], …): each is a few atomic increments or a
//! short, uncontended lock of plain data. Everything else a scrape shows
//! comes from the [`Snapshot`](crate::supervisor::status::Snapshot) the
//! supervisor publishes anyway, and from /proc, read by the HTTP side on a
//! blocking-pool thread. The HTTP side only reads.
//!
//! - `render`: the metric families and their text (pure, unit-tested);
//! - `procfs`: the /proc readings (netns-wide listen overflows, RSS, CPU,
//!   the pool's PSS and USS);
//! - `http`: the request parser and responses (pure, unit-tested);
//! - `health`: `/livez` and `/readyz` (pure, unit-tested);
//! - `server`: the listener, the accept loop and its bounds per connection;
//! - `slots`: which connection makes room for a new one (pure);
//! - `cache`: a rendered scrape reused for a second (pure).
//!
//! Names follow php-fpm_exporter and uwsgi_exporter where they have one
//! (`listen_queue`, `listen_queue_length`, `max_listen_queue`,
//! `max_children_reached`), all prefixed `drove_`; docs/reference/metrics.md
//! lists them (tests/suite/docs.rs checks it against a scrape).

mod cache;
mod carry;
mod health;
mod http;
mod procfs;
mod render;
mod server;
mod slots;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, info};

use crate::config::{ListenAddr, MetricsConfig};
use crate::scale::{Decision, Reason};
use crate::supervisor::plan::{EndCause, ExitVerdict};
use crate::supervisor::status::{ListenerStatus, Snapshot};

pub use render::Events;
pub use server::BindError;

/// The supervisor's side of the metrics: event counters and the little
/// the snapshot does not carry. Cheap to clone (one `Arc`).
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    events: Events,
    live: Mutex<Live>,
    server: Mutex<ServerControl>,
    /// The workers' CPU total last reported (f64 bits; see `procfs::read`).
    cpu_floor: std::sync::atomic::AtomicU64,
    /// The supervisor's loop turned, for `/livez`.
    heartbeat: health::Heartbeat,
}

/// How a rolling restart ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutResult {
    /// The new generation serves.
    Completed,
    /// A guarded rollout failed and its rollback (itself a rollout to the
    /// previous settings) completed.
    RolledBack,
    /// Given up; the old workers keep serving.
    Aborted,
}

/// How a binary upgrade ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeResult {
    /// The new image took over (counted by the new image).
    Done,
    /// Its preflight refused the new binary; the old one keeps running.
    Refused,
    /// The exec or the handover failed; the old one keeps running.
    Failed,
}

/// What the supervisor writes on every tick and a scrape copies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Live {
    /// Highest accept-queue depth seen per listener (by position in the
    /// snapshot's listener list, which never changes while droved runs).
    pub high_water: Vec<u32>,
    /// The pool's pids: the workers' and the templates'.
    pub worker_pids: PoolPids,
}

/// The processes of the pool, by kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolPids {
    /// Workers, for their RSS and CPU time and the pool's memory.
    pub workers: Vec<i32>,
    /// Templates (template mode), for the pool's memory.
    pub templates: Vec<i32>,
}

#[derive(Default)]
struct ServerControl {
    /// The address served now.
    listen: Option<ListenAddr>,
    /// Bound at start, before the server task runs.
    pending: Option<server::Bound>,
    /// Hands a new listener (or none) to the running server task.
    swap: Option<mpsc::UnboundedSender<Option<server::Bound>>>,
}

/// Locks plain data; a panic elsewhere while holding it leaves nothing
/// half-written that a reader could trip on, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// Binds `config.listen`, if any, so that a bad address stops droved
    /// at start with a message naming it. Serving begins with
    /// [`Metrics::serve`].
    pub fn bind(config: &MetricsConfig) -> Result<Metrics, BindError> {
        let metrics = Metrics::default();
        if let Some(addr) = &config.listen {
            let bound = server::bind(addr)?;
            let mut s = lock(&metrics.inner.server);
            s.listen = Some(addr.clone());
            s.pending = Some(bound);
        }
        Ok(metrics)
    }

    /// Starts the HTTP side on the current tokio runtime; it reads the
    /// supervisor's snapshots from `snapshot`.
    pub fn serve(&self, snapshot: watch::Receiver<Snapshot>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = {
            let mut s = lock(&self.inner.server);
            s.swap = Some(tx);
            s.pending.take()
        };
        if let Some(addr) = &lock(&self.inner.server).listen {
            info!(
                event = "metrics",
                "serving Prometheus metrics at /metrics on {addr}"
            );
        }
        let source = server::Source {
            metrics: self.clone(),
            snapshot,
            cache: Default::default(),
        };
        tokio::spawn(server::run(pending, rx, source));
    }

    /// After a reload: serve on the new `listen`. An address that cannot
    /// be bound keeps the current listener (and is logged).
    pub fn reconfigure(&self, config: &MetricsConfig) {
        let mut s = lock(&self.inner.server);
        if s.listen == config.listen {
            return;
        }
        let Some(swap) = s.swap.clone() else { return };
        let bound = match &config.listen {
            None => None,
            Some(addr) => match server::bind(addr) {
                Ok(b) => Some(b),
                Err(e) => {
                    let kept = match &s.listen {
                        Some(old) => format!("metrics stay on {old}"),
                        None => "metrics stay off".to_owned(),
                    };
                    error!(event = "metrics", "reload: {e}; {kept}");
                    return;
                }
            },
        };
        if swap.send(bound).is_err() {
            return;
        }
        match (&s.listen, &config.listen) {
            (Some(old), Some(new)) => info!(event = "metrics", "metrics moved from {old} to {new}"),
            (None, Some(new)) => info!(
                event = "metrics",
                "serving Prometheus metrics at /metrics on {new}"
            ),
            (Some(old), None) => info!(event = "metrics", "metrics on {old} turned off"),
            (None, None) => {}
        }
        s.listen = config.listen.clone();
    }

    pub(crate) fn events(&self) -> &Events {
        &self.inner.events
    }

    pub(crate) fn live(&self) -> Live {
        lock(&self.inner.live).clone()
    }

    /// The event counters, for the handover to the next image.
    pub fn event_counts(&self) -> std::collections::BTreeMap<String, u64> {
        carry::counts(&self.inner.events)
    }

    /// Starts from the event counters the previous image handed over.
    pub fn restore_event_counts(&self, counts: &std::collections::BTreeMap<String, u64>) {
        carry::restore(&self.inner.events, counts);
    }

    // --- Hooks, called by the supervisor at its events -------------------

    /// The supervisor's loop turned (it turns at least every `interval`).
    pub fn heartbeat(&self, interval: Duration) {
        self.inner
            .heartbeat
            .beat(std::time::Instant::now(), interval);
    }

    /// After each queue probe: high-water marks, the workers' and the
    /// templates' pids.
    pub fn tick(
        &self,
        listeners: &[ListenerStatus],
        workers: impl Iterator<Item = i32>,
        templates: impl Iterator<Item = i32>,
    ) {
        let mut live = lock(&self.inner.live);
        live.high_water.resize(listeners.len(), 0);
        for (high, l) in live.high_water.iter_mut().zip(listeners) {
            *high = (*high).max(l.queued.unwrap_or(0));
        }
        let pids = &mut live.worker_pids;
        pids.workers.clear();
        pids.workers.extend(workers);
        pids.templates.clear();
        pids.templates.extend(templates);
    }

    /// The scaler decided (a change of target or the start of a hold).
    pub fn scale_decision(&self, d: &Decision) {
        let e = &self.inner.events;
        let direction = match d.to.cmp(&d.from) {
            std::cmp::Ordering::Greater => "up",
            std::cmp::Ordering::Less => "down",
            std::cmp::Ordering::Equal => "hold",
        };
        let reason = match d.reason {
            Reason::Queue { .. } => "queue",
            Reason::Quiet { .. } => "quiet",
            Reason::BelowMin { .. } => "below-min",
            Reason::AboveMax { .. } => "above-max",
            Reason::CpuBound { .. } => "cpu-bound",
            Reason::AtMax { .. } => "at-max",
            Reason::Unreadable { .. } => "unreadable",
            Reason::Wake { .. } => "wake",
            Reason::Spare { .. } => "spare",
        };
        e.scale_decisions
            .get_or_create(&render::ScaleLabels { direction, reason })
            .inc();
        if matches!(d.reason, Reason::AtMax { .. }) {
            e.max_children_reached.inc();
        }
        e.changed();
    }

    /// The target was changed by hand (D-Bus Scale or SetLimits,
    /// SIGTTIN/SIGTTOU): a decision with reason "manual".
    pub fn manual_scale(&self, from: u32, to: u32) {
        let direction = if to > from { "up" } else { "down" };
        self.inner
            .events
            .scale_decisions
            .get_or_create(&render::ScaleLabels {
                direction,
                reason: "manual",
            })
            .inc();
        self.inner.events.changed();
    }

    /// A worker sent READY=1 `after` its start.
    pub fn worker_ready(&self, after: Duration) {
        self.inner.events.ready_seconds.observe(after.as_secs_f64());
        self.inner.events.changed();
    }

    /// A worker exited; `verdict` says why, and `cause` how it ended when
    /// droved did not stop it.
    pub fn worker_exited(&self, verdict: &ExitVerdict, cause: EndCause) {
        let reason = match verdict {
            ExitVerdict::Stopped { reason, .. } => reason.label(),
            ExitVerdict::FailedStart { .. } => "failed-start",
            ExitVerdict::Ended => cause.label(),
        };
        self.inner
            .events
            .worker_exits
            .get_or_create(&render::ReasonLabel { reason })
            .inc();
        self.inner.events.changed();
    }

    /// A reload was applied (`true`) or rejected.
    pub fn reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.inner
            .events
            .count_result(&self.inner.events.reloads, result);
    }

    /// A rolling restart ended (see [`RolloutResult`]).
    pub fn rollout(&self, result: RolloutResult) {
        let result = match result {
            RolloutResult::Completed => "completed",
            RolloutResult::RolledBack => "rolled-back",
            RolloutResult::Aborted => "aborted",
        };
        self.inner
            .events
            .count_result(&self.inner.events.rollouts, result);
    }

    /// A binary upgrade ended (see [`UpgradeResult`]).
    pub fn upgrade(&self, result: UpgradeResult) {
        let result = match result {
            UpgradeResult::Done => "done",
            UpgradeResult::Refused => "refused",
            UpgradeResult::Failed => "failed",
        };
        self.inner
            .events
            .count_result(&self.inner.events.upgrades, result);
    }
}
