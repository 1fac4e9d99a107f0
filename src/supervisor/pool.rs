//! The worker table: who runs, in which slot, in which state.
//!
//! Plain data plus decisions that need no I/O (which slot is free, which
//! workers are overdue, which to retire), so the event loop in `mod.rs`
//! stays a thin shell of syscalls around it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use serde::Serialize;

/// Lifecycle of one worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Exec'd, not yet ready (waiting for READY=1 in notify mode).
    Starting,
    /// Serving.
    Ready,
    /// Asked to stop; SIGKILL follows after stop_timeout.
    Stopping,
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stopping => "stopping",
        })
    }
}

/// Why a worker is being stopped (logged, and decides whether its exit
/// counts as a failure). Its [`label`](StopReason::label) is its one
/// name for machines: the exits metric's `reason` and the handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    ScaleDown,
    Shutdown,
    ReadyTimeout,
    Watchdog,
    /// On one request longer than `worker.request_timeout`.
    RequestTimeout,
    Rollout,
    // Images before the labels were one name handed these over as
    // "lifetime" and "memory".
    #[serde(rename = "max-lifetime", alias = "lifetime")]
    Lifetime,
    #[serde(rename = "max-rss", alias = "memory")]
    Memory,
    /// The worker said STOPPING=1 (its own max-requests, say): a planned
    /// replacement it asked for.
    StoppedItself,
}

impl StopReason {
    /// Every reason, for tables and tests.
    pub const ALL: [StopReason; 9] = [
        StopReason::ScaleDown,
        StopReason::Shutdown,
        StopReason::ReadyTimeout,
        StopReason::Watchdog,
        StopReason::RequestTimeout,
        StopReason::Rollout,
        StopReason::Lifetime,
        StopReason::Memory,
        StopReason::StoppedItself,
    ];

    /// Its name for machines (the exits metric, the handover).
    pub fn label(self) -> &'static str {
        match self {
            StopReason::ScaleDown => "scale-down",
            StopReason::Shutdown => "shutdown",
            StopReason::ReadyTimeout => "ready-timeout",
            StopReason::Watchdog => "watchdog",
            StopReason::RequestTimeout => "request-timeout",
            StopReason::Rollout => "rollout",
            StopReason::Lifetime => "max-lifetime",
            StopReason::Memory => "max-rss",
            StopReason::StoppedItself => "stopped-itself",
        }
    }

    /// A stop for a worker that timed out: aborted with
    /// `worker.timeout_signal` (a traceback, a core), and SIGKILLed after
    /// [`ABORT_GRACE`](crate::config::ABORT_GRACE).
    pub fn aborts(self) -> bool {
        matches!(self, StopReason::Watchdog | StopReason::RequestTimeout)
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::ScaleDown => "scale down",
            StopReason::Shutdown => "shutdown",
            StopReason::ReadyTimeout => "not ready in time",
            StopReason::Watchdog => "watchdog timeout",
            StopReason::RequestTimeout => "request timeout",
            StopReason::Rollout => "replaced by a new generation",
            StopReason::Lifetime => "max_lifetime reached",
            StopReason::Memory => "max_rss exceeded",
            StopReason::StoppedItself => "stopping on its own",
        })
    }
}

/// One worker process. Its lifecycle (`state`, when it became ready, why
/// and since when it stops, whether it was killed) changes only through
/// the methods below, which keep the rule the rest of droved relies on:
/// a worker is `Stopping` exactly when it has a stop reason, and a killed
/// worker is stopping.
#[derive(Debug, Clone)]
pub struct Worker {
    pub pid: Pid,
    pub slot: u32,
    pub generation: u64,
    state: WorkerState,
    pub started: Instant,
    ready_at: Option<Instant>,
    /// Last WATCHDOG=1 (or readiness, which starts the clock).
    pub last_ping: Instant,
    stop: Option<(StopReason, Instant)>,
    killed: bool,
    /// Last STATUS= text the worker sent.
    pub status_text: Option<String>,
    /// Recycle deadline (max_lifetime with jitter), if configured.
    pub recycle_at: Option<Instant>,
    /// Due for recycling: it serves until its replacement is ready.
    pub replace: Option<StopReason>,
    /// The watchdog timeout the worker asked for itself (`WATCHDOG_USEC=`,
    /// as systemd takes it from a service), over `worker.watchdog`.
    pub watchdog: Option<Duration>,
}

impl Worker {
    pub fn new(pid: Pid, slot: u32, generation: u64, now: Instant) -> Worker {
        Worker {
            pid,
            slot,
            generation,
            state: WorkerState::Starting,
            started: now,
            ready_at: None,
            last_ping: now,
            stop: None,
            killed: false,
            status_text: None,
            recycle_at: None,
            replace: None,
            watchdog: None,
        }
    }

    /// A worker taken over from the previous image (binary upgrade), as
    /// that image described it. A description that breaks the rule is
    /// mended: a stop reason or a kill makes it stopping, and a stopping
    /// worker without a reason is taken as scaled down (a planned stop).
    pub fn taken_over(
        mut self,
        state: WorkerState,
        ready_at: Option<Instant>,
        stop: Option<(StopReason, Instant)>,
        killed: bool,
        now: Instant,
    ) -> Worker {
        self.state = state;
        self.ready_at = ready_at;
        self.stop = stop;
        self.killed = killed;
        if self.stop.is_some() || killed {
            self.state = WorkerState::Stopping;
        }
        if self.state == WorkerState::Stopping && self.stop.is_none() {
            self.stop = Some((StopReason::ScaleDown, now));
        }
        self
    }

    pub fn state(&self) -> WorkerState {
        self.state
    }

    /// When it became ready, if it did (kept while it stops).
    pub fn ready_at(&self) -> Option<Instant> {
        self.ready_at
    }

    /// Why and since when it stops, once it does.
    pub fn stop(&self) -> Option<(StopReason, Instant)> {
        self.stop
    }

    /// SIGKILL was sent.
    pub fn killed(&self) -> bool {
        self.killed
    }

    /// Starting -> Ready at `now` (READY=1, or its exec when readiness is
    /// "exec"); the watchdog clock starts. False in any other state.
    pub fn become_ready(&mut self, now: Instant) -> bool {
        if self.state != WorkerState::Starting {
            return false;
        }
        self.state = WorkerState::Ready;
        self.ready_at = Some(now);
        self.last_ping = now;
        true
    }

    /// -> Stopping, for `reason` since `now`. A worker already stopping
    /// keeps its first reason and time (false).
    pub fn begin_stop(&mut self, reason: StopReason, now: Instant) -> bool {
        if self.stop.is_some() {
            return false;
        }
        self.state = WorkerState::Stopping;
        self.stop = Some((reason, now));
        true
    }

    /// SIGKILL was sent: stopping (for `reason` unless it already was).
    pub fn mark_killed(&mut self, reason: StopReason, now: Instant) {
        self.begin_stop(reason, now);
        self.killed = true;
    }

    pub fn is_active(&self) -> bool {
        self.state != WorkerState::Stopping
    }

    /// Active, of `generation`, and not on its way out: what the target counts.
    pub fn is_staying(&self, generation: u64) -> bool {
        self.is_active() && self.generation == generation && self.replace.is_none()
    }
}

/// All live worker processes, keyed by pid, and in template mode the
/// templates and the forks asked of them.
#[derive(Debug, Default)]
pub struct Pool {
    pub workers: BTreeMap<Pid, Worker>,
    pub templates: super::template::Templates,
}

/// Counts by state, for status and scaling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub starting: u32,
    pub ready: u32,
    pub stopping: u32,
}

impl Counts {
    pub fn active(&self) -> u32 {
        self.starting + self.ready
    }
}

impl Pool {
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for w in self.workers.values() {
            match w.state() {
                WorkerState::Starting => c.starting += 1,
                WorkerState::Ready => c.ready += 1,
                WorkerState::Stopping => c.stopping += 1,
            }
        }
        c
    }

    /// Ready workers of one generation.
    pub fn ready_in(&self, generation: u64) -> u32 {
        self.workers
            .values()
            .filter(|w| w.generation == generation && w.state() == WorkerState::Ready)
            .count() as u32
    }

    /// Active workers (starting or ready) not of `generation`.
    pub fn outdated(&self, generation: u64) -> Vec<Pid> {
        self.workers
            .values()
            .filter(|w| w.is_active() && w.generation != generation)
            .map(|w| w.pid)
            .collect()
    }

    /// Lowest slot number no live worker holds. Slots are stable names for
    /// workers (DROVE_WORKER), reused as workers come and go.
    pub fn free_slot(&self) -> u32 {
        self.free_slots(1)[0]
    }

    /// The `n` lowest free slots (see [`Pool::free_slot`]): for a burst of
    /// spawns, one sort of the used slots rather than one per spawn.
    pub fn free_slots(&self, n: usize) -> Vec<u32> {
        // A fork asked of a template holds its slot until answered.
        let mut used: Vec<u32> = self
            .workers
            .values()
            .map(|w| w.slot)
            .chain(self.templates.forks.iter().map(|f| f.slot))
            .collect();
        used.sort_unstable();
        used.dedup();
        let mut used = used.into_iter().peekable();
        let mut free = Vec::with_capacity(n);
        let mut slot = 0;
        while free.len() < n {
            if used.next_if_eq(&slot).is_none() {
                free.push(slot);
            }
            slot += 1;
        }
        free
    }

    /// Chooses `n` active workers to retire: starting ones first (they serve
    /// nothing yet), then idle ones (per `is_idle`), then the youngest.
    pub fn pick_to_retire(&self, n: usize, is_idle: impl Fn(Pid) -> bool) -> Vec<Pid> {
        let mut candidates: Vec<&Worker> = self
            .workers
            .values()
            .filter(|w| w.is_active() && w.replace.is_none())
            .collect();
        // is_idle reads /proc: once per candidate, not per comparison.
        candidates.sort_by_cached_key(|w| {
            (
                w.state() == WorkerState::Ready,
                !is_idle(w.pid),
                std::cmp::Reverse(w.started),
            )
        });
        candidates.into_iter().take(n).map(|w| w.pid).collect()
    }

    /// Workers that missed their deadline: not ready within `ready_timeout`,
    /// or silent past the watchdog interval.
    pub fn overdue(
        &self,
        now: Instant,
        ready_timeout: Duration,
        watchdog: Option<Duration>,
    ) -> Vec<(Pid, StopReason)> {
        self.workers
            .values()
            .filter_map(|w| match w.state() {
                WorkerState::Starting if now.duration_since(w.started) > ready_timeout => {
                    Some((w.pid, StopReason::ReadyTimeout))
                }
                WorkerState::Ready => match w.watchdog.or(watchdog) {
                    Some(limit) if now.duration_since(w.last_ping) > limit => {
                        Some((w.pid, StopReason::Watchdog))
                    }
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    /// Stopping workers whose grace period is over and that still run:
    /// `stop_timeout`, or for one aborted because it timed out (the
    /// watchdog) `abort_grace`, if shorter.
    pub fn stop_expired(
        &self,
        now: Instant,
        stop_timeout: Duration,
        abort_grace: Duration,
    ) -> Vec<Pid> {
        self.workers
            .values()
            .filter(|w| !w.killed())
            .filter(|w| match w.stop() {
                Some((reason, since)) => {
                    let grace = match reason {
                        r if r.aborts() => abort_grace.min(stop_timeout),
                        _ => stop_timeout,
                    };
                    now.duration_since(since) >= grace
                }
                None => false,
            })
            .map(|w| w.pid)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_with(states: &[(i32, u32, WorkerState, u64)], now: Instant) -> Pool {
        let mut pool = Pool::default();
        for &(pid, slot, state, age_ms) in states {
            let mut w = Worker::new(
                Pid::from_raw(pid),
                slot,
                1,
                now - Duration::from_millis(age_ms),
            );
            match state {
                WorkerState::Starting => {}
                WorkerState::Ready => {
                    w.become_ready(now);
                }
                WorkerState::Stopping => {
                    w.begin_stop(StopReason::ScaleDown, now);
                }
            }
            pool.workers.insert(w.pid, w);
        }
        pool
    }

    /// Three ready workers in slots 0, 2 and 3: a gap at 1.
    fn gapped_pool(now: Instant) -> Pool {
        pool_with(
            &[
                (10, 0, WorkerState::Ready, 5),
                (11, 2, WorkerState::Ready, 5),
                (12, 3, WorkerState::Ready, 5),
            ],
            now,
        )
    }

    #[test]
    fn free_slot_fills_gaps_first() {
        let now = Instant::now();
        let pool = gapped_pool(now);
        assert_eq!(pool.free_slot(), 1);
        assert_eq!(Pool::default().free_slot(), 0);
    }

    #[test]
    fn retires_starting_then_idle_then_youngest() {
        let now = Instant::now();
        let pool = pool_with(
            &[
                (10, 0, WorkerState::Ready, 5000),
                (11, 1, WorkerState::Ready, 100),
                (12, 2, WorkerState::Starting, 50),
                (13, 3, WorkerState::Ready, 3000),
                (14, 4, WorkerState::Stopping, 10),
            ],
            now,
        );
        let idle = |pid: Pid| pid.as_raw() == 10;
        assert_eq!(pool.pick_to_retire(1, idle), vec![Pid::from_raw(12)]);
        assert_eq!(
            pool.pick_to_retire(3, idle),
            vec![Pid::from_raw(12), Pid::from_raw(10), Pid::from_raw(11)]
        );
        assert_eq!(
            pool.pick_to_retire(10, idle).len(),
            4,
            "stopping workers are never picked"
        );
    }

    #[test]
    fn retiring_asks_about_each_worker_once() {
        let now = Instant::now();
        let states: Vec<_> = (0..64)
            .map(|i| (100 + i, i as u32, WorkerState::Ready, 10 * i as u64))
            .collect();
        let pool = pool_with(&states, now);
        let asked = std::cell::Cell::new(0);
        let idle = |pid: Pid| {
            asked.set(asked.get() + 1);
            pid.as_raw() % 2 == 0
        };
        let picked = pool.pick_to_retire(3, idle);
        assert_eq!(asked.get(), 64, "one /proc read per worker");
        // The youngest idle ones: pids 100, 102, 104 are the youngest evens.
        assert_eq!(
            picked,
            vec![Pid::from_raw(100), Pid::from_raw(102), Pid::from_raw(104)]
        );
    }

    #[test]
    fn free_slots_are_the_lowest_unused() {
        let now = Instant::now();
        let pool = gapped_pool(now);
        assert_eq!(pool.free_slots(4), vec![1, 4, 5, 6]);
        assert_eq!(pool.free_slots(0), Vec::<u32>::new());
        assert_eq!(Pool::default().free_slots(2), vec![0, 1]);
        // The same as taking free_slot one by one.
        let mut one_by_one = gapped_pool(now);
        let mut taken = Vec::new();
        for pid in 20..24 {
            let slot = one_by_one.free_slot();
            taken.push(slot);
            let w = Worker::new(Pid::from_raw(pid), slot, 1, now);
            one_by_one.workers.insert(w.pid, w);
        }
        assert_eq!(taken, pool.free_slots(4));
    }

    #[test]
    fn overdue_and_stop_deadlines() {
        let now = Instant::now();
        let mut pool = pool_with(
            &[
                (10, 0, WorkerState::Starting, 3000),
                (11, 1, WorkerState::Ready, 9000),
            ],
            now,
        );
        pool.workers.get_mut(&Pid::from_raw(11)).unwrap().last_ping = now - Duration::from_secs(6);
        let overdue = pool.overdue(now, Duration::from_secs(2), Some(Duration::from_secs(5)));
        assert_eq!(
            overdue,
            vec![
                (Pid::from_raw(10), StopReason::ReadyTimeout),
                (Pid::from_raw(11), StopReason::Watchdog)
            ]
        );
        assert!(pool.overdue(now, Duration::from_secs(10), None).is_empty());
        // A worker's own WATCHDOG_USEC= holds with no worker.watchdog, and
        // over it.
        pool.workers.get_mut(&Pid::from_raw(11)).unwrap().watchdog = Some(Duration::from_secs(7));
        assert!(pool.overdue(now, Duration::from_secs(10), None).is_empty());
        assert!(
            pool.overdue(now, Duration::from_secs(10), Some(Duration::from_secs(5)))
                .is_empty()
        );
        pool.workers.get_mut(&Pid::from_raw(11)).unwrap().watchdog = Some(Duration::from_secs(3));
        assert_eq!(
            pool.overdue(now, Duration::from_secs(10), None),
            vec![(Pid::from_raw(11), StopReason::Watchdog)]
        );
        pool.workers.get_mut(&Pid::from_raw(11)).unwrap().watchdog = None;

        let w = pool.workers.get_mut(&Pid::from_raw(10)).unwrap();
        w.begin_stop(StopReason::ScaleDown, now - Duration::from_secs(31));
        assert_eq!(
            pool.stop_expired(now, Duration::from_secs(30), Duration::from_secs(5)),
            vec![Pid::from_raw(10)]
        );
        pool.workers
            .get_mut(&Pid::from_raw(10))
            .unwrap()
            .mark_killed(StopReason::Shutdown, now);
        assert!(
            pool.stop_expired(now, Duration::from_secs(30), Duration::from_secs(5))
                .is_empty()
        );
    }

    #[test]
    fn a_worker_changes_state_only_forward_and_stopping_has_a_reason() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1);
        let mut w = Worker::new(Pid::from_raw(7), 0, 1, t0);
        assert_eq!(
            (w.state(), w.stop(), w.killed()),
            (WorkerState::Starting, None, false)
        );
        assert!(w.become_ready(later));
        assert_eq!(
            (w.state(), w.ready_at(), w.last_ping),
            (WorkerState::Ready, Some(later), later)
        );
        assert!(
            !w.become_ready(later + Duration::from_secs(1)),
            "ready once"
        );
        assert_eq!(w.ready_at(), Some(later));

        assert!(w.begin_stop(StopReason::ScaleDown, later));
        assert_eq!(w.state(), WorkerState::Stopping);
        assert!(!w.begin_stop(StopReason::Shutdown, later + Duration::from_secs(1)));
        assert_eq!(
            w.stop(),
            Some((StopReason::ScaleDown, later)),
            "the first reason stays"
        );
        assert!(
            !w.become_ready(later),
            "a stopping worker never serves again"
        );
        assert_eq!(w.state(), WorkerState::Stopping);

        // A kill out of any state leaves it stopping, with a reason.
        let mut starting = Worker::new(Pid::from_raw(8), 1, 1, t0);
        starting.mark_killed(StopReason::Watchdog, later);
        assert_eq!(starting.state(), WorkerState::Stopping);
        assert_eq!(starting.stop(), Some((StopReason::Watchdog, later)));
        assert!(starting.killed());
    }

    #[test]
    fn a_taken_over_worker_is_mended_to_the_rule() {
        let t0 = Instant::now();
        let new = || Worker::new(Pid::from_raw(7), 0, 1, t0);
        let stopping_without_reason =
            new().taken_over(WorkerState::Stopping, None, None, false, t0);
        assert_eq!(
            stopping_without_reason.stop(),
            Some((StopReason::ScaleDown, t0))
        );
        let ready_with_reason = new().taken_over(
            WorkerState::Ready,
            Some(t0),
            Some((StopReason::Rollout, t0)),
            false,
            t0,
        );
        assert_eq!(ready_with_reason.state(), WorkerState::Stopping);
        let killed = new().taken_over(WorkerState::Ready, Some(t0), None, true, t0);
        assert_eq!(killed.state(), WorkerState::Stopping);
        assert!(killed.stop().is_some());
        let ready = new().taken_over(WorkerState::Ready, Some(t0), None, false, t0);
        assert_eq!(
            (ready.state(), ready.ready_at()),
            (WorkerState::Ready, Some(t0))
        );
    }
}
