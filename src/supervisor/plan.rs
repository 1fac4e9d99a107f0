//! The pool's decisions, without I/O: what to fork, whom to stop and why,
//! how an exit is judged. Inputs are the worker table, the time and a few
//! numbers; outputs are [`Action`]s the supervisor carries out. Like
//! `scale.rs`, every rule has a table test here instead of only a slow
//! process test.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::pool::{Pool, StopReason, Worker, WorkerState};
use crate::sys::process::ExitStatus;

/// Failed starts of a new generation after which its rollout is aborted.
pub const ROLLOUT_MAX_FAILURES: u32 = 3;

/// Something the supervisor should do to the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fork this many current-generation workers.
    Spawn(u32),
    /// Send the stop signal (graceful) to one worker.
    Stop(Pid, StopReason),
    /// Start a replacement for this worker (recycling); it keeps serving
    /// until the replacement is ready.
    Replace(Pid, StopReason),
    /// The rolling restart has reached its goal.
    FinishRollout,
    /// The pool is ready for the first time: tell systemd.
    PoolReady,
}

/// The pool's goal at this instant.
#[derive(Debug, Clone, Copy)]
pub struct Goal {
    pub generation: u64,
    pub target: u32,
    /// Forks the spawn gate allows now (rate limit and back-off).
    pub spawn_budget: u32,
    /// During a rollout: the number of ready workers never to go below.
    pub rollout_floor: Option<u32>,
    /// During a rollout: the most current-generation workers allowed
    /// (canaries, or a paused rollout); a capped rollout does not finish.
    pub rollout_cap: Option<u32>,
    /// While starting: ready workers needed to announce READY=1.
    pub ready_when: Option<u32>,
}

/// Workers of `generation` the target counts: active, not on their way
/// out, plus the forks asked of a template and not answered yet.
fn staying(pool: &Pool, generation: u64) -> u32 {
    pool.workers
        .values()
        .filter(|w| w.is_staying(generation))
        .count() as u32
        + pool.templates.forks_of(generation)
}

/// Whether [`reconcile`] would retire workers for being over `target`
/// (and so ask whether they are idle).
pub fn over_target(pool: &Pool, generation: u64, target: u32) -> bool {
    staying(pool, generation) > target
}

/// Forks and stops that bring the pool to its goal. `is_idle` tells
/// whether a worker holds no connection (scale-down prefers those; see
/// `activity`).
pub fn reconcile(pool: &Pool, goal: Goal, is_idle: impl Fn(Pid) -> bool) -> Vec<Action> {
    let mut actions = Vec::new();
    let generation = goal.generation;
    // Forks asked of a template and not answered yet count as starting
    // workers (template mode; none in exec mode).
    let asked = pool.templates.forks_of(generation);
    let staying = staying(pool, generation);
    let starting = pool
        .workers
        .values()
        .filter(|w| w.state() == WorkerState::Starting && w.generation == generation)
        .count() as u32
        + asked;

    // Current-generation workers up to the target; during a rollout one at
    // a time beside the old ones (a batch of 1).
    let mut want = goal.target.saturating_sub(staying);
    if goal.rollout_floor.is_some() {
        want = want.min(1u32.saturating_sub(starting));
    }
    if let Some(cap) = goal.rollout_cap {
        want = want.min(cap.saturating_sub(staying));
    }
    let spawn = goal.spawn_budget.min(want);
    if spawn > 0 {
        actions.push(Action::Spawn(spawn));
    }

    let mut ready = pool.counts().ready;
    if let Some(floor) = goal.rollout_floor {
        // Outdated workers: starting ones go at once; ready ones one by one
        // as new ones become ready, never dropping below the floor.
        let mut left_outdated = 0;
        for w in pool
            .workers
            .values()
            .filter(|w| w.is_active() && w.generation != generation)
        {
            if w.state() == WorkerState::Starting {
                actions.push(Action::Stop(w.pid, StopReason::Rollout));
            } else if ready > floor {
                ready -= 1;
                actions.push(Action::Stop(w.pid, StopReason::Rollout));
            } else {
                left_outdated += 1;
            }
        }
        // Done when the new generation serves at full size, not merely when
        // the old one is gone: a rollout begun with nothing ready would
        // otherwise "finish" at once and report READY=1 falsely.
        if left_outdated == 0
            && pool.ready_in(generation) >= goal.target
            && goal.rollout_cap.is_none()
        {
            actions.push(Action::FinishRollout);
        }
    }

    if staying > goal.target {
        let excess = (staying - goal.target) as usize;
        for pid in pool.pick_to_retire(excess, is_idle) {
            actions.push(Action::Stop(pid, StopReason::ScaleDown));
        }
    }

    if let Some(needed) = goal.ready_when
        && ready >= needed
    {
        actions.push(Action::PoolReady);
    }
    actions
}

/// Recycling (max_lifetime, max_rss), one worker at a time and gated on
/// readiness like a rollout: the due worker keeps serving while its
/// replacement starts, and gets its stop signal only once enough workers
/// are ready without it. `owned` (a worker's own memory, `None` when
/// unknown) is asked only when `max_rss` is given (the caller passes `None`
/// between its periodic memory checks).
pub fn recycle(
    pool: &Pool,
    generation: u64,
    target: u32,
    now: Instant,
    max_rss: Option<u64>,
    owned: impl Fn(Pid) -> Option<u64>,
) -> Option<Action> {
    if let Some(w) = pool
        .workers
        .values()
        .find(|w| w.is_active() && w.replace.is_some())
    {
        let ready_staying = pool
            .workers
            .values()
            .filter(|w| w.is_staying(generation) && w.state() == WorkerState::Ready)
            .count() as u32;
        return (ready_staying >= target).then(|| Action::Stop(w.pid, w.replace.expect("checked")));
    }
    pool.workers
        .values()
        .filter(|w| w.state() == WorkerState::Ready && w.generation == generation)
        .find_map(|w| {
            if w.recycle_at.is_some_and(|t| now >= t) {
                return Some(Action::Replace(w.pid, StopReason::Lifetime));
            }
            let limit = max_rss?;
            (owned(w.pid)? > limit).then_some(Action::Replace(w.pid, StopReason::Memory))
        })
}

/// How a worker's exit is judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitVerdict {
    /// droved stopped it. `failed` when the stop was for a failure of the
    /// worker (not ready in time, watchdog), which counts as a failed start.
    Stopped { reason: StopReason, failed: bool },
    /// The command does not get going: back off before the next fork.
    FailedStart { never_ready: bool },
    /// It served and then ended (its own decision, or killed from outside):
    /// replace it at once.
    Ended,
}

/// Judges an exit from the worker's record, its status and its uptime.
pub fn judge_exit(
    w: &Worker,
    status: ExitStatus,
    uptime: Duration,
    min_uptime: Duration,
) -> ExitVerdict {
    if let Some((reason, _)) = w.stop() {
        let failed = matches!(reason, StopReason::ReadyTimeout | StopReason::Watchdog);
        return ExitVerdict::Stopped { reason, failed };
    }
    let never_ready = w.ready_at().is_none();
    // A worker that was ready and then was killed from outside (an
    // operator, the OOM killer) says nothing about the command; backing off
    // for it would only shrink the pool when it is needed.
    let killed_from_outside = matches!(
        status,
        ExitStatus::Signaled(
            Signal::SIGKILL | Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP,
            _
        )
    );
    if never_ready || (uptime < min_uptime && !killed_from_outside) {
        ExitVerdict::FailedStart { never_ready }
    } else {
        ExitVerdict::Ended
    }
}

/// How a worker ended that droved did not stop, for people (journal,
/// `drovectl watch`, the exits metric): the OOM killer's kills are what
/// users of every peer find hardest to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCause {
    /// It exited with a status.
    Exited,
    /// A signal ended it (a crash, or a kill from outside).
    Crashed,
    /// The kernel's OOM killer killed it.
    OomKilled,
}

impl EndCause {
    /// Its name in the journal (`CAUSE=`) and the exits metric.
    pub fn label(self) -> &'static str {
        match self {
            EndCause::Exited => "ended",
            EndCause::Crashed => "crashed",
            EndCause::OomKilled => "oom-killed",
        }
    }
}

/// The cause of an end; `oom_killed` when the OOM killer's count for
/// droved's cgroup rose for this SIGKILL (see [`OomLedger`]).
pub fn end_cause(status: ExitStatus, oom_killed: bool) -> EndCause {
    match status {
        ExitStatus::Exited(_) => EndCause::Exited,
        ExitStatus::Signaled(Signal::SIGKILL, _) if oom_killed => EndCause::OomKilled,
        ExitStatus::Signaled(..) => EndCause::Crashed,
    }
}

/// OOM kills the kernel counted in droved's cgroup and no exit has been
/// matched to yet. Each exit by a SIGKILL droved did not send takes one, if
/// one was counted within [`OOM_MATCH_WINDOW`] (the kernel counts the kill
/// before the process is reaped; an old count must not mark a later
/// `kill -9` from an operator).
#[derive(Debug, Default)]
pub struct OomLedger {
    seen: Option<u64>,
    unclaimed: Vec<Instant>,
}

/// How long a counted OOM kill waits for its exit.
pub const OOM_MATCH_WINDOW: Duration = Duration::from_secs(5);

impl OomLedger {
    /// Notes the count read at `now` (`None`: unreadable).
    pub fn note(&mut self, count: Option<u64>, now: Instant) {
        let Some(count) = count else {
            return;
        };
        if let Some(seen) = self.seen {
            // Bounded: a burst of kills is counted, a wild jump is not
            // turned into a huge vector.
            let new = count.saturating_sub(seen).min(1024);
            self.unclaimed.extend((0..new).map(|_| now));
        }
        self.seen = Some(count);
        self.unclaimed
            .retain(|&at| now.saturating_duration_since(at) < OOM_MATCH_WINDOW);
    }

    /// Whether an exit by SIGKILL at `now`, with the count read then, was
    /// one of the OOM killer's.
    pub fn claim(&mut self, count: Option<u64>, now: Instant) -> bool {
        self.note(count, now);
        self.unclaimed.pop().is_some()
    }
}

/// Whether an exit of a new-generation worker counts against a guarded
/// rollout (`[rollout]`): any end droved did not ask for, a stop for a
/// failure (not ready in time, watchdog), and a request timeout (no failed
/// start, but a release whose requests hang is a bad release). Pure.
pub fn fails_rollout(verdict: &ExitVerdict) -> bool {
    match verdict {
        ExitVerdict::Stopped { failed, reason } => *failed || *reason == StopReason::RequestTimeout,
        ExitVerdict::FailedStart { .. } | ExitVerdict::Ended => true,
    }
}

/// Whether the worker command has proven healthy again after failed
/// starts: a current worker ready for `min_uptime`, that started after the
/// last failure. One that was up before says nothing about its siblings
/// dying now (a server that binds its own port keeps it while every other
/// start fails on EADDRINUSE).
pub fn proves_healthy(
    pool: &Pool,
    generation: u64,
    last_failure: Option<Instant>,
    now: Instant,
    min_uptime: Duration,
) -> bool {
    pool.workers.values().any(|w| {
        w.generation == generation
            && last_failure.is_none_or(|f| w.started > f)
            && w.ready_at()
                .is_some_and(|t| now.duration_since(t) >= min_uptime)
    })
}

/// Whether a failed start of a `worker_generation` worker aborts the
/// rollout to `generation` that has now seen `failures` of them.
pub fn rollout_gives_up(worker_generation: u64, generation: u64, failures: u32) -> bool {
    worker_generation == generation && failures >= ROLLOUT_MAX_FAILURES
}

#[cfg(test)]
mod tests {
    use super::*;
    use WorkerState::*;

    const MS: Duration = Duration::from_millis(1);

    /// A pool from rows of (pid, generation, state); ages are 1 s.
    fn pool(rows: &[(i32, u64, WorkerState)], now: Instant) -> Pool {
        let mut pool = Pool::default();
        for (slot, &(pid, generation, state)) in rows.iter().enumerate() {
            let mut w = Worker::new(Pid::from_raw(pid), slot as u32, generation, now - 1000 * MS);
            if state == Ready {
                w.become_ready(now - 900 * MS);
            }
            if state == Stopping {
                w.begin_stop(StopReason::ScaleDown, now);
            }
            pool.workers.insert(w.pid, w);
        }
        pool
    }

    fn goal(target: u32) -> Goal {
        Goal {
            generation: 1,
            target,
            spawn_budget: 100,
            rollout_floor: None,
            rollout_cap: None,
            ready_when: None,
        }
    }

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    fn never_idle(_: Pid) -> bool {
        false
    }

    #[test]
    fn reconcile_fills_and_trims_to_the_target() {
        let now = Instant::now();
        let p = pool(&[(10, 1, Ready), (11, 1, Starting), (12, 1, Stopping)], now);
        // (target, spawn budget, expected actions)
        let table: &[(u32, u32, Vec<Action>)] = &[
            (2, 100, vec![]),
            (5, 100, vec![Action::Spawn(3)]),
            (5, 1, vec![Action::Spawn(1)]),
            (5, 0, vec![]),
            // Starting ones go first; stopping ones never count.
            (1, 100, vec![Action::Stop(pid(11), StopReason::ScaleDown)]),
        ];
        for (target, budget, want) in table {
            let g = Goal {
                spawn_budget: *budget,
                ..goal(*target)
            };
            assert_eq!(
                &reconcile(&p, g, never_idle),
                want,
                "target {target}, budget {budget}"
            );
        }
    }

    #[test]
    fn forks_asked_of_a_template_count_as_starting_workers() {
        use crate::supervisor::template::PendingFork;
        let now = Instant::now();
        let mut p = pool(&[(10, 1, Ready)], now);
        let ask = |slot, generation| PendingFork {
            template: pid(99),
            slot,
            generation,
            asked: now,
        };
        p.templates.forks.push_back(ask(1, 1));
        p.templates.forks.push_back(ask(2, 1));
        // (target, rollout floor, expected actions)
        let table: &[(u32, Option<u32>, Vec<Action>)] = &[
            (3, None, vec![]),
            (4, None, vec![Action::Spawn(1)]),
            // Answers are pending: they hold the slots, not new forks.
            (2, None, vec![Action::Stop(pid(10), StopReason::ScaleDown)]),
        ];
        for (target, floor, want) in table {
            let g = Goal {
                rollout_floor: *floor,
                rollout_cap: None,
                ..goal(*target)
            };
            assert_eq!(&reconcile(&p, g, never_idle), want, "target {target}");
        }
        assert_eq!(p.free_slot(), 3, "slots 1 and 2 are held by the asks");
        // A rollout forks one at a time: a pending ask of the new
        // generation is that one.
        let mut r = pool(&[(10, 1, Ready)], now);
        r.templates.forks.push_back(ask(1, 2));
        let g = Goal {
            generation: 2,
            rollout_floor: Some(1),
            rollout_cap: None,
            ..goal(1)
        };
        assert_eq!(reconcile(&r, g, never_idle), vec![]);
    }

    #[test]
    fn scale_down_prefers_idle_workers() {
        let now = Instant::now();
        let p = pool(&[(10, 1, Ready), (11, 1, Ready), (12, 1, Ready)], now);
        let idle = |p: Pid| p.as_raw() == 10;
        assert_eq!(
            reconcile(&p, goal(2), idle),
            vec![Action::Stop(pid(10), StopReason::ScaleDown)]
        );
    }

    #[test]
    fn rollout_replaces_one_at_a_time_above_the_floor() {
        let now = Instant::now();
        let rolling = |target, floor| Goal {
            generation: 2,
            rollout_floor: Some(floor),
            rollout_cap: None,
            ..goal(target)
        };
        // Begins: one new worker at a time; no old one stops while only
        // `floor` are ready.
        let p = pool(&[(10, 1, Ready), (11, 1, Ready)], now);
        assert_eq!(
            reconcile(&p, rolling(2, 2), never_idle),
            vec![Action::Spawn(1)]
        );
        // The new one starting: no second fork, still nobody stops.
        let p = pool(&[(10, 1, Ready), (11, 1, Ready), (20, 2, Starting)], now);
        assert_eq!(reconcile(&p, rolling(2, 2), never_idle), vec![]);
        // The new one ready: one old one goes (3 ready > floor 2), then the
        // next new one starts.
        let p = pool(&[(10, 1, Ready), (11, 1, Ready), (20, 2, Ready)], now);
        assert_eq!(
            reconcile(&p, rolling(2, 2), never_idle),
            vec![Action::Spawn(1), Action::Stop(pid(10), StopReason::Rollout)]
        );
        // An outdated worker still starting is stopped at once.
        let p = pool(&[(10, 1, Starting), (11, 1, Ready), (20, 2, Starting)], now);
        assert_eq!(
            reconcile(&p, rolling(2, 1), never_idle),
            vec![Action::Stop(pid(10), StopReason::Rollout)]
        );
        // All new and ready: done.
        let p = pool(&[(20, 2, Ready), (21, 2, Ready), (10, 1, Stopping)], now);
        assert_eq!(
            reconcile(&p, rolling(2, 2), never_idle),
            vec![Action::FinishRollout]
        );
    }

    #[test]
    fn a_capped_rollout_starts_only_its_canaries_and_does_not_finish() {
        let now = Instant::now();
        let canary = |target, cap| Goal {
            generation: 2,
            rollout_floor: Some(3),
            rollout_cap: Some(cap),
            ..goal(target)
        };
        // One canary of three: it starts, one old worker goes once it is
        // ready (the pool keeps its size), and then nothing more happens.
        let p = pool(&[(10, 1, Ready), (11, 1, Ready), (12, 1, Ready)], now);
        assert_eq!(
            reconcile(&p, canary(3, 1), never_idle),
            vec![Action::Spawn(1)]
        );
        let p = pool(
            &[
                (10, 1, Ready),
                (11, 1, Ready),
                (12, 1, Ready),
                (20, 2, Ready),
            ],
            now,
        );
        assert_eq!(
            reconcile(&p, canary(3, 1), never_idle),
            vec![Action::Stop(pid(10), StopReason::Rollout)]
        );
        let p = pool(&[(11, 1, Ready), (12, 1, Ready), (20, 2, Ready)], now);
        assert_eq!(reconcile(&p, canary(3, 1), never_idle), vec![]);
        // Canaries as many as the pool: all new, ready, but no finish
        // while capped (observing); uncapped, it finishes.
        let p = pool(&[(20, 2, Ready), (21, 2, Ready)], now);
        assert_eq!(reconcile(&p, canary(2, 2), never_idle), vec![]);
        let uncapped = Goal {
            rollout_cap: None,
            ..canary(2, 2)
        };
        assert_eq!(
            reconcile(&p, uncapped, never_idle),
            vec![Action::FinishRollout]
        );
    }

    #[test]
    fn rollout_with_nothing_ready_waits_for_the_new_generation() {
        // Regression (fault suite): a rollout begun with no ready worker
        // "finished" as soon as the old ones were gone, and sent READY=1
        // for a pool that served nothing.
        let now = Instant::now();
        let g = Goal {
            generation: 2,
            rollout_floor: Some(0),
            rollout_cap: None,
            ..goal(2)
        };
        let p = pool(&[(10, 1, Starting), (11, 1, Starting)], now);
        let actions = reconcile(&p, g, never_idle);
        assert!(!actions.contains(&Action::FinishRollout), "{actions:?}");
        let p = pool(&[(20, 2, Starting), (21, 2, Starting)], now);
        assert_eq!(reconcile(&p, g, never_idle), vec![]);
        let p = pool(&[(20, 2, Ready), (21, 2, Starting)], now);
        assert_eq!(reconcile(&p, g, never_idle), vec![]);
        let p = pool(&[(20, 2, Ready), (21, 2, Ready)], now);
        assert_eq!(reconcile(&p, g, never_idle), vec![Action::FinishRollout]);
    }

    #[test]
    fn pool_ready_once_enough_workers_are() {
        let now = Instant::now();
        let starting = |needed| Goal {
            ready_when: Some(needed),
            ..goal(3)
        };
        let p = pool(&[(10, 1, Ready), (11, 1, Starting), (12, 1, Starting)], now);
        assert_eq!(reconcile(&p, starting(2), never_idle), vec![]);
        assert_eq!(
            reconcile(&p, starting(1), never_idle),
            vec![Action::PoolReady]
        );
    }

    #[test]
    fn recycling_is_gated_on_readiness() {
        let now = Instant::now();
        let mut p = pool(&[(10, 1, Ready), (11, 1, Ready)], now);
        let no_rss = |_: Pid| None;
        assert_eq!(recycle(&p, 1, 2, now, None, no_rss), None);
        // Lifetime over: its replacement starts first.
        p.workers.get_mut(&pid(10)).unwrap().recycle_at = Some(now - MS);
        assert_eq!(
            recycle(&p, 1, 2, now, None, no_rss),
            Some(Action::Replace(pid(10), StopReason::Lifetime))
        );
        // Marked: no stop while fewer than `target` others are ready.
        p.workers.get_mut(&pid(10)).unwrap().replace = Some(StopReason::Lifetime);
        assert_eq!(recycle(&p, 1, 2, now, None, no_rss), None);
        let mut w = Worker::new(pid(12), 2, 1, now);
        w.become_ready(now);
        p.workers.insert(w.pid, w);
        assert_eq!(
            recycle(&p, 1, 2, now, None, no_rss),
            Some(Action::Stop(pid(10), StopReason::Lifetime))
        );
    }

    /// Template mode: every worker maps the template's 130 MB, but owns
    /// only what it allocated itself; only that is compared.
    #[test]
    fn recycling_compares_owned_memory_not_rss() {
        use crate::sys::memory::Memory;
        let now = Instant::now();
        let p = pool(&[(10, 1, Ready), (11, 1, Ready)], now);
        let forked = |uss| Memory {
            rss: 130 << 20,
            pss: 70 << 20,
            uss,
            swap: 0,
        };
        let lean = |_: Pid| Some(forked(3 << 20).owned());
        assert_eq!(recycle(&p, 1, 1, now, Some(32 << 20), lean), None);
        let grown =
            |p: Pid| Some(forked(if p.as_raw() == 11 { 48 << 20 } else { 3 << 20 }).owned());
        assert_eq!(
            recycle(&p, 1, 1, now, Some(32 << 20), grown),
            Some(Action::Replace(pid(11), StopReason::Memory))
        );
    }

    #[test]
    fn recycling_by_memory_only_when_checked() {
        let now = Instant::now();
        let p = pool(&[(10, 1, Ready), (11, 2, Ready)], now);
        let rss = |p: Pid| Some(if p.as_raw() == 11 { 900 } else { 50 });
        assert_eq!(recycle(&p, 1, 1, now, None, rss), None);
        assert_eq!(
            recycle(&p, 1, 1, now, Some(100), rss),
            None,
            "other generations are left alone"
        );
        let rss = |_: Pid| Some(900);
        assert_eq!(
            recycle(&p, 1, 1, now, Some(100), rss),
            Some(Action::Replace(pid(10), StopReason::Memory))
        );
        assert_eq!(
            recycle(&p, 1, 1, now, Some(100), |_| None),
            None,
            "unreadable is not over"
        );
    }

    #[test]
    fn exit_verdicts() {
        let now = Instant::now();
        let min_uptime = 1000 * MS;
        let ready = {
            let mut w = Worker::new(pid(1), 0, 1, now);
            w.become_ready(now);
            w
        };
        let never_ready = Worker::new(pid(2), 0, 1, now);
        let stopped = |reason| {
            let mut w = ready.clone();
            w.begin_stop(reason, now);
            w
        };
        let kill = ExitStatus::Signaled(Signal::SIGKILL, false);
        let segv = ExitStatus::Signaled(Signal::SIGSEGV, true);
        let exit1 = ExitStatus::Exited(1);
        use ExitVerdict::*;
        let table = [
            // (worker, status, uptime, verdict)
            (
                stopped(StopReason::ScaleDown),
                exit1,
                10 * MS,
                Stopped {
                    reason: StopReason::ScaleDown,
                    failed: false,
                },
            ),
            (
                stopped(StopReason::Watchdog),
                kill,
                5000 * MS,
                Stopped {
                    reason: StopReason::Watchdog,
                    failed: true,
                },
            ),
            (
                stopped(StopReason::ReadyTimeout),
                kill,
                5000 * MS,
                Stopped {
                    reason: StopReason::ReadyTimeout,
                    failed: true,
                },
            ),
            (
                never_ready.clone(),
                exit1,
                5000 * MS,
                FailedStart { never_ready: true },
            ),
            (
                never_ready,
                kill,
                5000 * MS,
                FailedStart { never_ready: true },
            ),
            (
                ready.clone(),
                exit1,
                10 * MS,
                FailedStart { never_ready: false },
            ),
            (
                ready.clone(),
                segv,
                10 * MS,
                FailedStart { never_ready: false },
            ),
            (ready.clone(), exit1, 5000 * MS, Ended),
            // Regression (fault suite): ready workers killed from outside
            // soon after start were counted as failed starts, and a kill
            // storm drove the pool into back-off.
            (ready.clone(), kill, 10 * MS, Ended),
            (
                ready,
                ExitStatus::Signaled(Signal::SIGTERM, false),
                10 * MS,
                Ended,
            ),
        ];
        for (w, status, uptime, want) in table {
            assert_eq!(
                judge_exit(&w, status, uptime, min_uptime),
                want,
                "{status} after {uptime:?}"
            );
        }
    }

    #[test]
    fn only_a_worker_started_after_the_last_failure_proves_health() {
        let now = Instant::now();
        let min_uptime = 500 * MS;
        // Worker 10 started 1 s ago, ready 0.9 s ago (see `pool`).
        let p = pool(&[(10, 1, Ready)], now);
        // (last failure, generation, healthy)
        let table = [
            (None, 1, true),
            (Some(now - 2000 * MS), 1, true),
            // It was up before the failure: a sibling dying on EADDRINUSE
            // while it holds the port is not cured by it.
            (Some(now - 100 * MS), 1, false),
            (None, 2, false),
        ];
        for (failure, generation, want) in table {
            assert_eq!(
                proves_healthy(&p, generation, failure, now, min_uptime),
                want,
                "{failure:?} gen {generation}"
            );
        }
        assert!(
            !proves_healthy(&p, 1, None, now, 1000 * MS),
            "not up long enough"
        );
    }

    #[test]
    fn what_counts_against_a_guarded_rollout() {
        let stopped = |reason, failed| ExitVerdict::Stopped { reason, failed };
        assert!(fails_rollout(&ExitVerdict::Ended), "a crash after ready");
        assert!(fails_rollout(&ExitVerdict::FailedStart {
            never_ready: true
        }));
        assert!(fails_rollout(&stopped(StopReason::Watchdog, true)));
        assert!(fails_rollout(&stopped(StopReason::ReadyTimeout, true)));
        assert!(!fails_rollout(&stopped(StopReason::Rollout, false)));
        assert!(!fails_rollout(&stopped(StopReason::ScaleDown, false)));
    }

    #[test]
    fn rollouts_give_up_after_three_failures_of_the_new_generation() {
        assert!(!rollout_gives_up(2, 2, 2));
        assert!(rollout_gives_up(2, 2, 3));
        assert!(
            !rollout_gives_up(1, 2, 5),
            "old workers failing say nothing of the new config"
        );
    }

    #[test]
    fn end_causes() {
        let kill = ExitStatus::Signaled(Signal::SIGKILL, false);
        assert_eq!(end_cause(ExitStatus::Exited(3), true), EndCause::Exited);
        assert_eq!(end_cause(kill, true), EndCause::OomKilled);
        assert_eq!(end_cause(kill, false), EndCause::Crashed);
        let segv = ExitStatus::Signaled(Signal::SIGSEGV, true);
        assert_eq!(
            end_cause(segv, true),
            EndCause::Crashed,
            "only SIGKILL is the OOM killer's"
        );
    }

    #[test]
    fn oom_kills_are_matched_to_exits_once_and_only_while_fresh() {
        let t0 = Instant::now();
        let mut l = OomLedger::default();
        l.note(Some(4), t0); // baseline: earlier kills are not ours
        assert!(!l.claim(Some(4), t0 + MS), "no new kill");
        // Two workers killed at once: two exits match, the third does not.
        assert!(l.claim(Some(6), t0 + 10 * MS));
        assert!(l.claim(Some(6), t0 + 11 * MS));
        assert!(!l.claim(Some(6), t0 + 12 * MS));
        // A kill counted long before an exit is not that exit's (a later
        // kill -9 from an operator).
        l.note(Some(7), t0 + 20 * MS);
        assert!(!l.claim(Some(7), t0 + 20 * MS + OOM_MATCH_WINDOW));
        // Unreadable: nothing is matched, the count resumes when readable.
        assert!(!l.claim(None, t0 + 30_000 * MS));
        assert!(l.claim(Some(8), t0 + 31_000 * MS));
        // No baseline yet: the first read is the baseline.
        let mut fresh = OomLedger::default();
        assert!(!fresh.claim(Some(9), t0));
    }
}
