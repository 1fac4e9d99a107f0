//! What happens on the scale tick: an upgrade's exec when due, deadlines
//! of workers (readiness, watchdog, stop timeout), queue probes,
//! autoscaling, and the journal's health.

use std::time::Instant;

use nix::sys::signal::Signal;
use tracing::{debug, info, warn};

use super::Supervisor;
use super::control::Event;
use super::lifecycle::Lifecycle;
use super::plan;
use super::pool::StopReason;
use super::status::ListenerStatus;
use crate::scale::{PoolView, Sample};
use crate::sys::{probe, process};

/// Idle ticks between CPU baselines (10 ticks of 100 ms by default).
const CPU_IDLE_SAMPLE_TICKS: u32 = 10;

/// When to sample the workers' CPU use for the scaler's guard.
pub(super) struct CpuSampling {
    recent_queue: bool,
    idle_ticks: u32,
}

impl Default for CpuSampling {
    fn default() -> Self {
        // Take a baseline on the very first tick.
        CpuSampling {
            recent_queue: false,
            idle_ticks: CPU_IDLE_SAMPLE_TICKS,
        }
    }
}

/// The journal's health at the last tick, the drop count already reported
/// and when the unreported stall began, to log each stall once, when it
/// ends.
#[derive(Default)]
pub(super) struct JournalWatch {
    pub(super) seen: crate::logging::JournalHealth,
    dropped_reported: u64,
    unreported_stall: Option<Instant>,
}

impl Supervisor {
    pub(super) fn on_tick(&mut self) {
        let now = Instant::now();
        if self.lifecycle.exec_at().is_some_and(|t| now >= t) {
            self.exec_upgrade(None);
        }
        self.upward.watchdog_tick(now);
        self.upward.retry();
        for (pid, reason) in self.pool.overdue(
            now,
            self.config.worker.ready_timeout,
            self.config.worker.watchdog,
        ) {
            // A hung worker (watchdog) gets SIGKILL at once, as systemd's
            // watchdog would abort it; one that is merely not ready may be
            // serving requests already: stop it gracefully.
            let hung = reason == StopReason::Watchdog;
            let what = match reason {
                StopReason::ReadyTimeout => self.no_ready_hint(),
                _ => reason.to_string(),
            };
            warn!(
                worker_pid = pid.as_raw(),
                event = "timeout",
                "worker {pid}: {what}; {}",
                if hung { "killing it" } else { "stopping it" }
            );
            self.stop_worker(pid, reason, hung);
        }
        for pid in self.pool.stop_expired(now, self.config.worker.stop_timeout) {
            warn!(
                worker_pid = pid.as_raw(),
                event = "kill",
                "worker {pid} still running {:?} after the stop signal; sending SIGKILL",
                self.config.worker.stop_timeout
            );
            let _ = process::send_signal(pid, Signal::SIGKILL);
            if let Some(w) = self.pool.workers.get_mut(&pid) {
                w.killed = true;
            }
        }
        if self.gate.consecutive_failures > 0
            && plan::proves_healthy(
                &self.pool,
                self.generation,
                self.gate.last_failure,
                now,
                self.config.worker.min_uptime,
            )
        {
            if self.gate.is_failing() {
                info!("workers stay up again; the pool is no longer failing");
            }
            self.gate.record_success();
            self.last_failure = None;
        }
        self.probe_queues();
        self.zero_tick(now);
        self.autoscale(now);
        self.check_journal();
    }

    /// A stalled journal shows in STATUS= (systemd's notify socket still
    /// works) and D-Bus; once it reads again, one warning says what was lost.
    fn check_journal(&mut self) {
        crate::logging::retry_journal();
        let health = crate::logging::journal_health();
        if let Some(t) = health.stalled_since {
            self.journal.unreported_stall.get_or_insert(t);
        }
        if health == std::mem::replace(&mut self.journal.seen, health) {
            return;
        }
        if health.stalled_since.is_none() && health.dropped > self.journal.dropped_reported {
            let lost = health.dropped - self.journal.dropped_reported;
            let stalled = self
                .journal
                .unreported_stall
                .map(|t| format!(" for {:.1}s", t.elapsed().as_secs_f64()))
                .unwrap_or_default();
            warn!(
                event = "journal",
                dropped = lost,
                "the journal did not take log messages{stalled}; {lost} message(s) from droved were dropped"
            );
            // A journald still catching up may time out this warning too:
            // then the next one covers this stall as well.
            if crate::logging::journal_health().stalled_since.is_none() {
                self.journal.dropped_reported = health.dropped;
                self.journal.unreported_stall = None;
            }
        }
        self.publish();
    }

    pub(super) fn probe_queues(&mut self) {
        self.listener_status = self
            .listeners
            .iter()
            .map(|l| {
                let (queued, backlog, error) = match probe::queue_depth(l.as_fd()) {
                    Ok(q) => (Some(q.queued), Some(q.backlog), None),
                    Err(e) => (None, None, Some(e.to_string())),
                };
                ListenerStatus {
                    name: l.name.clone(),
                    address: l.address.clone(),
                    family: format!("{:?}", l.family).to_lowercase(),
                    queued,
                    backlog,
                    error,
                }
            })
            .collect();
    }

    /// Total queued connections across listeners: the sum, because every
    /// worker accepts on every listener, so any waiting connection is work
    /// for the same pool. `None` when no listener could be read.
    pub(super) fn queued_total(&self) -> Option<u32> {
        let readable: Vec<u32> = self
            .listener_status
            .iter()
            .filter_map(|l| l.queued)
            .collect();
        if readable.is_empty() {
            None
        } else {
            Some(readable.iter().sum())
        }
    }

    fn autoscale(&mut self, now: Instant) {
        // The guard only judges ticks with a queue, but the first such tick
        // needs a baseline: sample while a queue is (or just was) there,
        // and once a second otherwise, which keeps idle ticks cheap.
        let queued = self.queued_total().unwrap_or(0) > 0;
        let sample_cpu = queued
            || self.cpu_sampling.recent_queue
            || self.cpu_sampling.idle_ticks >= CPU_IDLE_SAMPLE_TICKS;
        self.cpu_sampling.recent_queue = queued;
        let cpu_busy = if self.config.scale.cpu_guard && sample_cpu {
            self.cpu_sampling.idle_ticks = 0;
            self.cpu.sample(self.pool.workers.keys().copied(), now)
        } else {
            self.cpu_sampling.idle_ticks += 1;
            None
        };
        if !matches!(self.lifecycle, Lifecycle::Running) {
            return;
        }
        let counts = self.pool.counts();
        let sample = Sample {
            queued: self.queued_total(),
            listeners: self.listeners.len() as u32,
            cpu_busy,
        };
        if sample.queued.unwrap_or(0) > 0 {
            debug!(queued = ?sample.queued, cpu_busy = ?cpu_busy, ready = counts.ready, "queue sample");
        }
        let view = PoolView {
            target: self.target,
            alive: counts.active(),
            ready: counts.ready,
            starting: counts.starting,
        };
        let Some(d) = self
            .scaler
            .tick(now.duration_since(self.started), sample, view)
        else {
            return;
        };
        if d.is_hold() {
            // Holds (cpu-bound, at max, unreadable) are reported once each.
            info!(event = "scale-hold", target = d.to, "{d}");
            return;
        }
        if d.to == 0 && !self.may_go_to_zero() {
            debug!("scale-down to 0 waits: a worker is busy");
            return;
        }
        if d.to != self.target {
            info!(event = "scale", from = d.from, to = d.to, "{d}");
            let _ = self.events.send(Event::Scaled {
                from: d.from,
                to: d.to,
                reason: d.reason.to_string(),
            });
            self.target = d.to;
        }
    }
}
