//! Carrying out the pool's decisions (`plan`): recycling first, then forks
//! and stops toward the target, the rollout's progress and the first
//! READY=1.

use std::time::Instant;

use tracing::info;

use super::Supervisor;
use super::lifecycle::Lifecycle;
use super::plan::{self, Action, Goal};
use super::pool::WorkerState;
use crate::sys::{memory, process};

impl Supervisor {
    /// Forks or retires workers until the pool matches the target (and the
    /// rollout, if one runs, makes progress).
    pub(super) fn reconcile(&mut self) {
        let now = Instant::now();
        self.reconcile_templates(now);
        if self.lifecycle.is_stopping() {
            return;
        }
        if self.lifecycle.drain_until().is_some() {
            return self.hold_while_draining(now);
        }
        // A rollout replaces everyone anyway: no recycling during one.
        if self.lifecycle.rollout().is_none()
            && let Some(action) = self.recycle_step(now)
        {
            self.apply(action, now);
        }
        self.advance_rollout(now);
        let active_new = self
            .pool
            .workers
            .values()
            .filter(|w| w.is_staying(self.generation))
            .count() as u32;
        let goal = Goal {
            generation: self.generation,
            target: self.target,
            spawn_budget: self.gate.available(now),
            rollout_floor: self.lifecycle.rollout().map(|r| r.floor),
            rollout_cap: self
                .lifecycle
                .rollout()
                .and_then(|r| r.new_generation_cap(active_new)),
            ready_when: matches!(self.lifecycle, Lifecycle::Starting)
                .then(|| self.target.min(self.config.initial_workers())),
        };
        // Whom a scale-down retires depends on who is busy right now.
        if plan::over_target(&self.pool, self.generation, self.target) {
            self.sample_activity(now, None);
        }
        let actions = plan::reconcile(&self.pool, goal, |pid| self.activity.is_idle(pid));
        for action in actions {
            self.apply(action, now);
        }
    }

    /// Draining: the pool stays as it is, whatever its generations (a
    /// rollout cut short keeps its old workers), and none retires; only
    /// workers short of the target start (a wake from zero, a crash).
    fn hold_while_draining(&mut self, now: Instant) {
        let asked = self.pool.templates.forks.len() as u32;
        let short = self
            .target
            .saturating_sub(self.pool.counts().active() + asked);
        let n = short.min(self.gate.available(now));
        if n > 0 {
            self.spawn_workers(n, now);
        }
    }

    fn recycle_step(&mut self, now: Instant) -> Option<Action> {
        let max_rss = self.config.worker.max_rss.filter(|_| self.memory.due(now));
        if let Some(limit) = max_rss {
            // Only ready workers of this generation can be recycled.
            let pids: Vec<_> = self
                .pool
                .workers
                .values()
                .filter(|w| w.state() == WorkerState::Ready && w.generation == self.generation)
                .map(|w| w.pid)
                .collect();
            let started = Instant::now();
            self.memory.check(
                now,
                limit,
                &pids,
                |pid| memory::owned_bound(pid).ok(),
                // Unreadable smaps_rollup (no ptrace access): RSS, as
                // before (sys::memory logs it once).
                |pid| {
                    memory::read(pid)
                        .map(|m| m.owned())
                        .or_else(|_| process::rss_bytes(pid))
                        .ok()
                },
                || started.elapsed(),
            );
        }
        plan::recycle(
            &self.pool,
            self.generation,
            self.target,
            now,
            max_rss,
            |pid| self.memory.owned(pid),
        )
    }

    fn apply(&mut self, action: Action, now: Instant) {
        match action {
            Action::Spawn(n) => self.spawn_workers(n, now),
            Action::Stop(pid, reason) => self.stop_worker(pid, reason, false),
            Action::Replace(pid, reason) => {
                let detail = match (reason, self.config.worker.max_rss) {
                    (super::pool::StopReason::Memory, Some(max)) => {
                        let owned = self.memory.owned(pid).unwrap_or(0);
                        format!(" (owns {} MiB > {} MiB)", owned >> 20, max >> 20)
                    }
                    _ => String::new(),
                };
                info!(
                    worker_pid = pid.as_raw(),
                    event = "recycle",
                    "worker {pid}: {reason}{detail}; starting its replacement"
                );
                if let Some(w) = self.pool.workers.get_mut(&pid) {
                    w.replace = Some(reason);
                }
            }
            Action::FinishRollout => self.finish_rollout(),
            Action::PoolReady => {
                let line = self.snapshot().status_line();
                info!(event = "ready", "pool ready: {line}");
                self.enter(Lifecycle::Running);
            }
        }
    }
}
