//! What happens on the scale tick: an upgrade's exec when due, deadlines
//! of workers (readiness, watchdog, stop timeout), queue probes,
//! autoscaling, and the journal's health.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{debug, info, warn};

use super::Supervisor;
use super::control::Event;
use super::lifecycle::Lifecycle;
use super::plan;
use super::pool::StopReason;
use super::status::ListenerStatus;
use crate::scale::{BLIP, PoolView, Sample};
use crate::sys::arrival::ArrivalWatch;
use crate::sys::probe;

/// Idle ticks between CPU baselines (10 ticks of 100 ms by default).
const CPU_IDLE_SAMPLE_TICKS: u32 = 10;

/// When to sample the workers' CPU use for the scaler's guard.
pub(super) struct CpuSampling {
    recent_queue: bool,
    idle_ticks: u32,
}

impl CpuSampling {
    /// Whether this tick samples the workers' CPU (a /proc read per
    /// worker and thread). The guard only judges ticks with a queue, but
    /// the first such tick needs a baseline: sample while a queue is (or
    /// just was) there, and once a second otherwise, which keeps idle
    /// ticks cheap. Never while the pool cannot grow (`can_grow`: the
    /// target is below max; a static pool never can): the guard only
    /// holds back growth, and at max the scaler holds without asking it.
    /// Pure.
    fn due(&mut self, queued: bool, cpu_guard: bool, can_grow: bool) -> bool {
        let due = cpu_guard
            && can_grow
            && (queued || self.recent_queue || self.idle_ticks >= CPU_IDLE_SAMPLE_TICKS);
        self.recent_queue = queued;
        if due {
            self.idle_ticks = 0;
        } else {
            // Saturating: a pool at max for days must not wrap around.
            self.idle_ticks = self.idle_ticks.saturating_add(1);
        }
        due
    }
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

/// From a burst's first connection to its first probe: long enough for a
/// client opening many connections at once to have queued them, so the
/// probe sees the burst rather than its first connection.
const ARRIVAL_SETTLE: Duration = Duration::from_millis(2);
/// The CPU window of the decision that follows: the guard needs a sample
/// taken wholly while connections waited, and /proc schedstat is too coarse
/// for less (a busy worker's run time is updated every few ms).
const EARLY_CPU_WINDOW: Duration = Duration::from_millis(25);

/// The wake on the first connection after a quiet tick, and the two early
/// probes it starts: one that takes the CPU baseline with the burst
/// queued, one that decides.
#[derive(Debug, Default)]
pub(super) struct Arrival {
    pub(super) watch: ArrivalWatch,
    pub(super) next: Option<Instant>,
    /// The baseline was taken with a queue: the next probe decides.
    baseline_taken: bool,
}

/// Sleeps until `at`; never resolves for `None`.
pub(super) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
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

/// How often [`TickTimes`] reports.
const TICK_REPORT_EVERY: Duration = Duration::from_secs(10);

/// The scale tick's own cost (the tick's work and the reconcile and
/// publish after it, as the event loop runs them), so that droved's cost
/// per tick can be watched as a pool grows (bench/fleet.py). Two clock
/// reads a tick; every [`TICK_REPORT_EVERY`] one debug line under the
/// target `drove::tick_time` (`DROVE_LOG=info,drove::tick_time=debug`)
/// gives the count, the mean and the slowest.
#[derive(Debug)]
pub(super) struct TickTimes {
    since: Instant,
    ticks: u32,
    total: Duration,
    slowest: Duration,
}

/// One report of [`TickTimes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TickSummary {
    pub(super) ticks: u32,
    pub(super) mean: Duration,
    pub(super) slowest: Duration,
}

impl TickTimes {
    pub(super) fn new(now: Instant) -> TickTimes {
        TickTimes {
            since: now,
            ticks: 0,
            total: Duration::ZERO,
            slowest: Duration::ZERO,
        }
    }

    /// Adds one tick that took `took`, and logs the summary of the
    /// window ending at `now` if one is due.
    pub(super) fn record(&mut self, took: Duration, now: Instant) {
        if let Some(s) = self.add(took, now) {
            debug!(
                target: "drove::tick_time",
                ticks = s.ticks,
                mean_us = s.mean.as_micros() as u64,
                slowest_us = s.slowest.as_micros() as u64,
                "scale ticks in the last {TICK_REPORT_EVERY:?}"
            );
        }
    }

    /// Pure: adds one tick; once the window is over, its summary, and a
    /// new window begins.
    fn add(&mut self, took: Duration, now: Instant) -> Option<TickSummary> {
        self.ticks += 1;
        self.total += took;
        self.slowest = self.slowest.max(took);
        if now.duration_since(self.since) < TICK_REPORT_EVERY {
            return None;
        }
        let summary = TickSummary {
            ticks: self.ticks,
            mean: self.total / self.ticks,
            slowest: self.slowest,
        };
        *self = TickTimes::new(now);
        Some(summary)
    }
}

impl Supervisor {
    pub(super) fn on_tick(&mut self) {
        let now = Instant::now();
        self.tick_began = Some(now);
        // A fork asked of the template and not answered yet would be lost
        // in the exec: its worker unknown to the new image, the template
        // not handed over. No new forks are asked while upgrading, so wait
        // for the answers (at most template::ANSWER_TIMEOUT, after which the
        // template is killed and its forks dropped).
        if self.lifecycle.exec_at().is_some_and(|t| now >= t)
            && self.pool.templates.forks.is_empty()
        {
            self.exec_upgrade(None);
        }
        self.upward.watchdog_tick(now);
        self.upward.retry();
        for (pid, reason) in self.pool.overdue(
            now,
            self.config.worker.ready_timeout,
            self.config.worker.watchdog,
        ) {
            // A hung worker (watchdog) is aborted, as systemd's watchdog
            // does: worker.timeout_signal for a traceback or a core, then
            // SIGKILL; one that is merely not ready may be serving
            // requests already: stop it gracefully.
            let hung = reason.aborts();
            let what = match reason {
                StopReason::ReadyTimeout => self.no_ready_hint(),
                _ => reason.to_string(),
            };
            warn!(
                worker_pid = pid.as_raw(),
                event = "timeout",
                "worker {pid}: {what}; {}",
                if hung {
                    format!(
                        "aborting it ({})",
                        self.config.worker.timeout_signal.as_str()
                    )
                } else {
                    "stopping it".to_string()
                }
            );
            // stop_worker picks the signal by the reason.
            self.stop_worker(pid, reason, false);
        }
        let abort_grace = crate::config::ABORT_GRACE;
        for pid in self
            .pool
            .stop_expired(now, self.config.worker.stop_timeout, abort_grace)
        {
            warn!(
                worker_pid = pid.as_raw(),
                event = "kill",
                "worker {pid} still running {:?} after the stop signal; sending SIGKILL",
                self.config.worker.stop_timeout
            );
            if let Err(e) = self.children.signal(pid, Signal::SIGKILL) {
                warn!(worker_pid = pid.as_raw(), "cannot kill worker: {e}");
            }
            if let Some(w) = self.pool.workers.get_mut(&pid) {
                w.mark_killed(StopReason::Shutdown, now);
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
        self.activity_tick(now);
        self.zero_tick(now);
        let pids = self.pool.workers.keys().map(|p| p.as_raw());
        let templates = self.pool.templates.all.iter().map(|t| t.pid.as_raw());
        self.metrics.tick(&self.listener_status, pids, templates);
        self.autoscale(now, false);
        self.arm_arrival();
        self.check_journal();
    }

    /// Watches the listeners for the next connection while a scale-up may
    /// be needed and the queues read empty (see `sys::arrival`).
    fn arm_arrival(&mut self) {
        let scaling = self.config.pool.min != self.config.pool.max;
        let wanted = scaling
            && matches!(self.lifecycle, Lifecycle::Running)
            && self.target < self.config.pool.max
            && self.queued_total() == Some(0);
        if !wanted {
            self.arrival.watch.disarm();
        } else if !self.arrival.watch.is_armed() {
            match self
                .arrival
                .watch
                .arm(self.listeners.iter().map(|l| l.as_fd()))
            {
                Ok(()) => debug!("queues empty; watching the listeners for the next connection"),
                Err(e) => debug!("cannot watch the listeners for arrivals: {e}"),
            }
        }
    }

    /// A connection came after a quiet tick: probe soon rather than at the
    /// next regular tick, which may be a whole interval away.
    pub(super) fn on_arrival(&mut self) {
        self.arrival.watch.disarm();
        self.arrival.next = Some(Instant::now() + ARRIVAL_SETTLE);
        self.arrival.baseline_taken = false;
    }

    /// An early probe. It acts only on a burst (more than a blip queued):
    /// blips stay the regular ticks' business, so early probes cannot make
    /// the scaler count them twice. The first takes the workers' CPU
    /// baseline with the burst queued; the second, one CPU window later,
    /// lets the scaler decide with a sample it knows was taken wholly
    /// under the queue (the CPU guard then needs no extra tick).
    pub(super) fn on_early_tick(&mut self) {
        self.arrival.next = None;
        let now = Instant::now();
        self.probe_queues();
        let queued = self.queued_total().unwrap_or(0);
        if queued <= BLIP || !matches!(self.lifecycle, Lifecycle::Running) {
            return;
        }
        if self.config.scale.cpu_guard && !self.arrival.baseline_taken {
            debug!(queued, "early probe after an arrival: CPU baseline");
            self.cpu.sample(self.pool.workers.keys().copied());
            self.arrival.baseline_taken = true;
            self.arrival.next = Some(now + EARLY_CPU_WINDOW);
            return;
        }
        debug!(queued, "early probe after an arrival: deciding");
        self.autoscale(now, true);
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

    /// One scaler decision. `cpu_while_queued`: the CPU sample about to be
    /// taken spans only time with a queue (see `on_early_tick`).
    fn autoscale(&mut self, now: Instant, cpu_while_queued: bool) {
        // The guard only judges ticks with a queue, but the first such tick
        // needs a baseline: sample while a queue is (or just was) there,
        // and once a second otherwise, which keeps idle ticks cheap.
        let queued = self.queued_total().unwrap_or(0) > 0;
        let sample_cpu = self.cpu_sampling.due(
            queued,
            self.config.scale.cpu_guard,
            self.target < self.config.pool.max,
        );
        let cpu_busy = if sample_cpu {
            self.cpu.sample(self.pool.workers.keys().copied())
        } else {
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
            cpu_while_queued,
        };
        if sample.queued.unwrap_or(0) > 0 {
            debug!(queued = ?sample.queued, cpu_busy = ?cpu_busy, ready = counts.ready, "queue sample");
        }
        // Read only where it can matter: a quiet pool of one at min 0.
        let last_worker_busy = self.target == 1
            && self.config.pool.min == 0
            && sample.queued == Some(0)
            && !self.may_go_to_zero();
        let view = PoolView {
            target: self.target,
            alive: counts.active(),
            ready: counts.ready,
            starting: counts.starting,
            last_worker_busy,
            // Only pool.spare needs it (sampled once a second).
            busy: (self.config.pool.spare > 0)
                .then(|| self.activity.counts())
                .flatten()
                .map(|c| super::activity::within(c, counts.ready).0),
        };
        let Some(d) = self
            .scaler
            .tick(now.duration_since(self.started), sample, view)
        else {
            return;
        };
        self.apply_scale(d);
    }

    /// Carries out and reports one scaler decision: the journal line, the
    /// D-Bus event, the metric, the target. Every decision of the scaler
    /// (ticks, the wake from zero, limits that moved) goes through here.
    pub(super) fn apply_scale(&mut self, d: crate::scale::Decision) {
        self.metrics.scale_decision(&d);
        if d.is_hold() {
            // Holds (cpu-bound, at max, unreadable) are reported once each.
            info!(event = "scale-hold", target = d.to, "{d}");
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

    /// After the limits changed (reload, upgrade): a target outside them
    /// is brought back, reported like any scale decision.
    pub(super) fn bound_target(&mut self, now: Instant) {
        if let Some(d) = self
            .scaler
            .bound(now.duration_since(self.started), self.target)
        {
            self.apply_scale(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_sampled_while_queued_once_a_second_idle_and_never_at_max() {
        let mut s = CpuSampling::default();
        // A baseline on the first tick, then one after each
        // CPU_IDLE_SAMPLE_TICKS ticks without.
        let idle: Vec<bool> = (0..23).map(|_| s.due(false, true, true)).collect();
        let expected: Vec<bool> = (0..23).map(|i| i % 11 == 0).collect();
        assert_eq!(idle, expected);
        // Every tick with a queue, and the one after.
        assert!(s.due(true, true, true));
        assert!(s.due(true, true, true));
        assert!(s.due(false, true, true));
        assert!(!s.due(false, true, true));
        // Guard off: never.
        let mut off = CpuSampling::default();
        assert!((0..30).all(|i| !off.due(i % 2 == 0, false, true)));
        // At max (or a static pool): never, queue or not; below max again,
        // a baseline at once.
        let mut at_max = CpuSampling::default();
        assert!((0..30).all(|i| !at_max.due(i % 3 == 0, true, false)));
        assert!(at_max.due(false, true, true));
    }

    #[test]
    fn tick_times_report_once_a_window_with_mean_and_slowest() {
        let t0 = Instant::now();
        let mut times = TickTimes::new(t0);
        let ms = Duration::from_millis;
        assert_eq!(times.add(ms(1), t0 + ms(100)), None);
        assert_eq!(times.add(ms(5), t0 + ms(200)), None);
        let end = t0 + TICK_REPORT_EVERY;
        assert_eq!(
            times.add(ms(3), end),
            Some(TickSummary {
                ticks: 3,
                mean: ms(3),
                slowest: ms(5)
            })
        );
        // A new window: the old ticks are gone.
        assert_eq!(times.add(ms(2), end + ms(100)), None);
        assert_eq!(
            times.add(ms(2), end + TICK_REPORT_EVERY),
            Some(TickSummary {
                ticks: 2,
                mean: ms(2),
                slowest: ms(2)
            })
        );
    }
}
