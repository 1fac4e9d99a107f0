//! Reload and rolling restarts: re-read the config, then replace every
//! worker, one at a time and gated on readiness, never with fewer ready
//! workers than before. Three failed starts of the new generation abort
//! the rollout and bring the previous settings back.

use std::time::Instant;

use nix::unistd::Pid;
use tracing::{error, info, warn};

use super::Supervisor;
use super::control::{ControlError, Event, RolloutAction};
use super::lifecycle::{CanaryStage, Guard, Lifecycle, Reply, Rollout};
use super::pool::StopReason;
use super::workers::{self, WorkerPlan};
use crate::config::Config;

/// Why a reload was not started.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReloadError {
    #[error("droved is stopping")]
    Stopping,
    #[error("a binary upgrade is in progress; retry when it has finished")]
    Upgrading,
    #[error("{0}")]
    Config(super::LoadFailure),
    #[error(transparent)]
    Workers(#[from] super::workers::PlanError),
    /// A setting that cannot work in droved's environment.
    #[error("{0}")]
    Environment(&'static str),
}

impl ReloadError {
    /// The message for a D-Bus caller: no value from the config file.
    fn public_message(&self) -> String {
        match self {
            ReloadError::Config(f) => f.public.clone(),
            other => other.to_string(),
        }
    }
}

impl Supervisor {
    /// Re-reads the config. An invalid one changes nothing; a valid one
    /// applies at once, with a rolling restart of every worker.
    pub(super) fn reload(&mut self, reply: Option<Reply>) -> Result<(), ReloadError> {
        let result = self.reload_config();
        self.metrics.reload(result.is_ok());
        match result {
            Ok(old) => {
                // Like gunicorn's HUP: always roll the workers, since the
                // app's own code and files may have changed even when
                // drove's config did not.
                self.start_rollout("configuration reloaded", Some(old), reply);
                Ok(())
            }
            Err(e) => {
                if let Some(r) = reply {
                    let _ = r.send(Err(ControlError::ReloadRejected(e.public_message())));
                }
                Err(e)
            }
        }
    }

    /// Loads and applies the new config; returns the one it replaced.
    fn reload_config(&mut self) -> Result<Config, ReloadError> {
        match self.lifecycle {
            Lifecycle::Stopping { .. } | Lifecycle::Draining { .. } => {
                return Err(ReloadError::Stopping);
            }
            Lifecycle::Upgrading(_) => return Err(ReloadError::Upgrading),
            Lifecycle::Starting | Lifecycle::Running | Lifecycle::Rolling(_) => {}
        }
        let new = (self.load_config)().map_err(ReloadError::Config)?;
        if new.pool.idle_exit.is_some()
            && let Some(why) = super::ondemand::idle_exit_refusal(self.on_demand.socket_activated)
        {
            return Err(ReloadError::Environment(why));
        }
        // Resolve the worker settings before touching anything: an unknown
        // user or a missing command rejects the reload like a parse error.
        let credentials = workers::resolve_credentials(&new)?;
        let plan = WorkerPlan::new(
            &new,
            credentials,
            &self.listeners,
            &self.notify.address,
            &self.instance,
        )?;
        if new.listen != self.config.listen {
            warn!(
                "reload: [listen] changes take effect only after a restart; keeping the current sockets"
            );
        }
        self.counters.reloads += 1;
        let worker_changed = new.worker != self.config.worker;
        self.file_limits = (new.pool.min, new.pool.max);
        let old = std::mem::replace(&mut self.config, new);
        self.config.listen = old.listen.clone();
        self.metrics.reconfigure(&self.config.metrics);
        self.notify.admit(plan.credentials.as_ref());
        self.plan = plan;
        self.apply_limits();
        self.bound_target(Instant::now());
        info!(
            event = "reload",
            "configuration reloaded{}",
            if worker_changed {
                "; worker settings changed"
            } else {
                ""
            }
        );
        Ok(old)
    }

    pub(super) fn start_rollout(
        &mut self,
        why: &'static str,
        previous: Option<Config>,
        reply: Option<Reply>,
    ) {
        let refusal = match &mut self.lifecycle {
            Lifecycle::Stopping { .. } | Lifecycle::Draining { .. } => Some(ControlError::Stopping),
            Lifecycle::Upgrading(_) => Some(ControlError::RolloutFailed(
                ReloadError::Upgrading.to_string(),
            )),
            Lifecycle::Rolling(r) => {
                // Coalesce: a rollout already replaces every older worker; a
                // new request joins it, and a new config joins by bumping
                // the generation so workers started with the old one roll too.
                if previous.is_some() {
                    self.generation += 1;
                }
                r.replies.extend(reply);
                info!(
                    "{why}: joined the rollout in progress (generation {})",
                    self.generation
                );
                return;
            }
            Lifecycle::Starting | Lifecycle::Running => None,
        };
        if let Some(e) = refusal {
            warn!("{why}: not rolling: {e}");
            if let Some(r) = reply {
                let _ = r.send(Err(e));
            }
            return;
        }
        let floor = self.pool.counts().ready.min(self.target);
        // A reload with [rollout] is guarded: canaries first, undone on
        // failures. A restart of the same settings has nothing to go back to.
        let guard = self
            .config
            .rollout
            .clone()
            .filter(|_| previous.is_some())
            .map(|settings| Guard {
                settings,
                stage: CanaryStage::Canary,
            });
        let previous = previous.map(|c| (c, self.generation));
        self.generation += 1;
        info!(
            event = "rollout",
            generation = self.generation,
            "{why}: rolling restart to generation {} ({} workers, keeping at least {floor} ready)",
            self.generation,
            self.pool.counts().active()
        );
        let from_starting = matches!(self.lifecycle, Lifecycle::Starting);
        self.enter(Lifecycle::Rolling(Box::new(Rollout {
            floor,
            previous,
            failures: 0,
            replies: reply.into_iter().collect(),
            why,
            from_starting,
            guard,
            paused: false,
            undoing: None,
        })));
    }

    /// Moves a guarded rollout through its stages: canaries ready ->
    /// observed -> the rest rolls.
    pub(super) fn advance_rollout(&mut self, now: Instant) {
        let generation = self.generation;
        let ready_new = self.pool.ready_in(generation);
        let Some(r) = self.lifecycle.rollout_mut().filter(|r| !r.paused) else {
            return;
        };
        let Some(g) = &mut r.guard else {
            return;
        };
        let next = g.stage.advance(&g.settings, ready_new, now);
        if next == g.stage {
            return;
        }
        let observe = humantime_secs(g.settings.observe);
        match next {
            CanaryStage::Observing { .. } => info!(
                event = "canary",
                generation,
                "{ready_new} canary worker(s) of generation {generation} ready; observing them for {observe}"
            ),
            CanaryStage::Rest if g.settings.canary > 0 => info!(
                event = "canary",
                generation,
                "canaries of generation {generation} served {observe} without failure; rolling the rest"
            ),
            _ => {}
        }
        g.stage = next;
    }

    /// A new-generation worker failed during a guarded rollout: at
    /// `max_failures`, the rollout is undone.
    pub(super) fn note_rollout_failure(&mut self, what: String) {
        let Some(r) = self.lifecycle.rollout_mut() else {
            return;
        };
        let Some(g) = &r.guard else {
            return;
        };
        r.failures += 1;
        let (failures, max) = (r.failures, g.settings.max_failures);
        warn!(
            event = "rollout-failure",
            "{what} ({failures} of {max} failures allowed in this rollout)"
        );
        if failures >= max {
            self.undo_rollout(format!(
                "{failures} failure(s) of the new generation, the last: {what}"
            ));
        }
    }

    /// Undoes a guarded rollout: the previous worker settings come back as
    /// a new generation that the old workers belong to, and the new
    /// generation's workers are replaced one by one, readiness-gated like
    /// any rollout, so the pool never shrinks below what served. Callers
    /// of the reload get the reason.
    pub(super) fn undo_rollout(&mut self, why: String) {
        let Some(r) = self.lifecycle.rollout_mut() else {
            return;
        };
        let Some((config, old_generation)) = r.previous.take() else {
            return self.abort_rollout(why);
        };
        let replies = std::mem::take(&mut r.replies);
        let from_starting = r.from_starting;
        error!(
            event = "rollback",
            "rolling back generation {} to the previous settings: {why}", self.generation
        );
        self.restore_worker_settings(config);
        // A fresh generation number: a reload during the rollback must not
        // reuse the failed generation's number while its workers remain.
        self.generation += 1;
        for w in self.pool.workers.values_mut() {
            if w.generation == old_generation && w.is_active() {
                w.generation = self.generation;
            }
        }
        self.gate.record_success();
        let _ = self.events.send(Event::RolledBack {
            generation: self.generation,
            reason: why.clone(),
        });
        for reply in replies {
            let _ = reply.send(Err(ControlError::RolloutFailed(format!(
                "rolled back: {why}"
            ))));
        }
        let floor = self.pool.counts().ready.min(self.target);
        self.enter(Lifecycle::Rolling(Box::new(Rollout {
            floor,
            previous: None,
            failures: 0,
            replies: Vec::new(),
            why: "rollback",
            from_starting,
            guard: None,
            paused: false,
            undoing: Some(why),
        })));
    }

    /// `drovectl rollout status|pause|resume|abort`.
    pub(super) fn rollout_command(
        &mut self,
        action: RolloutAction,
    ) -> Result<String, ControlError> {
        let now = Instant::now();
        let generation = self.generation;
        let Some(r) = self.lifecycle.rollout_mut() else {
            return match action {
                RolloutAction::Status => Ok(format!("no rollout; generation {generation} serving")),
                _ => Err(ControlError::NoRollout),
            };
        };
        match action {
            RolloutAction::Status => {}
            RolloutAction::Pause => {
                r.paused = true;
                info!(
                    event = "rollout-paused",
                    "rollout to generation {generation} paused"
                );
            }
            RolloutAction::Resume => {
                r.paused = false;
                info!(
                    event = "rollout-resumed",
                    "rollout to generation {generation} resumed"
                );
            }
            RolloutAction::Abort => {
                if r.undoing.is_some() {
                    return Err(ControlError::RolloutFailed(
                        "a rollback cannot be aborted; reload to roll forward again".into(),
                    ));
                }
                let why = "aborted by request".to_string();
                if r.previous.is_some() {
                    self.undo_rollout(why);
                } else {
                    self.abort_rollout(why);
                }
            }
        }
        // An abort or undo moves the generation: describe the one now
        // current, counting only its own ready workers.
        let generation = self.generation;
        Ok(match self.lifecycle.rollout() {
            Some(r) => r.describe(generation, self.pool.ready_in(generation), now),
            None => format!("no rollout; generation {generation} serving"),
        })
    }

    pub(super) fn finish_rollout(&mut self) {
        let Some(from_starting) = self.lifecycle.rollout().map(|r| r.from_starting) else {
            return;
        };
        let Lifecycle::Rolling(r) = self.enter(Lifecycle::settled(from_starting)) else {
            unreachable!("checked above");
        };
        self.metrics.rollout(match r.undoing {
            None => crate::metrics::RolloutResult::Completed,
            Some(_) => crate::metrics::RolloutResult::RolledBack,
        });
        info!(
            event = "rollout-done",
            generation = self.generation,
            "rolling restart done ({}): generation {} serving",
            r.why,
            self.generation
        );
        let _ = self.events.send(Event::Reloaded {
            generation: self.generation,
        });
        for reply in r.replies {
            let _ = reply.send(Ok(()));
        }
    }

    /// The worker settings of `config` (a rollout's previous one) again.
    fn restore_worker_settings(&mut self, config: Config) {
        let plan = workers::resolve_credentials(&config).and_then(|credentials| {
            WorkerPlan::new(
                &config,
                credentials,
                &self.listeners,
                &self.notify.address,
                &self.instance,
            )
        });
        match plan {
            Ok(plan) => {
                self.notify.admit(plan.credentials.as_ref());
                self.plan = plan
            }
            Err(e) => error!("cannot restore the previous worker settings: {e}"),
        }
        self.config.worker = config.worker;
        self.config.rollout = config.rollout;
    }

    pub(super) fn abort_rollout(&mut self, why: String) {
        let Some(from_starting) = self.lifecycle.rollout().map(|r| r.from_starting) else {
            return;
        };
        self.metrics.rollout(crate::metrics::RolloutResult::Aborted);
        error!(
            event = "rollout-aborted",
            "rollout aborted, old workers keep serving: {why}"
        );
        let failed_generation = self.generation;
        if self
            .lifecycle
            .rollout()
            .is_some_and(|r| r.undoing.is_some())
        {
            // A rollback that cannot get ready: keep whatever serves, of
            // either generation (the pool reports FAILING), never empty.
            error!("the rollback cannot get ready; the pool keeps the workers that serve");
            let Lifecycle::Rolling(r) = self.enter(Lifecycle::settled(from_starting)) else {
                unreachable!("checked above");
            };
            for reply in r.replies {
                let _ = reply.send(Err(ControlError::RolloutFailed(why.clone())));
            }
            return;
        }
        // Restore the previous settings before announcing READY=1 again.
        let previous = self.lifecycle.rollout_mut().and_then(|r| r.previous.take());
        if let Some((config, generation)) = previous {
            self.restore_worker_settings(config);
            self.generation = generation;
        } else {
            // A plain restart: the old workers are as good as the new ones;
            // adopt them as current so nothing keeps rolling.
            self.generation -= 1;
        }
        let doomed: Vec<Pid> = self
            .pool
            .workers
            .values()
            .filter(|w| w.generation == failed_generation && w.is_active())
            .map(|w| w.pid)
            .collect();
        for pid in doomed {
            self.stop_worker(pid, StopReason::Rollout, false);
        }
        // Old workers of the restored generation stay; others are outdated.
        for w in self.pool.workers.values_mut() {
            if w.generation < self.generation && w.is_active() {
                w.generation = self.generation;
            }
        }
        self.gate.record_success();
        let Lifecycle::Rolling(r) = self.enter(Lifecycle::settled(from_starting)) else {
            unreachable!("checked above");
        };
        for reply in r.replies {
            let _ = reply.send(Err(ControlError::RolloutFailed(why.clone())));
        }
    }
}

/// "30s", "1.5s", "250ms" for log lines.
fn humantime_secs(d: std::time::Duration) -> String {
    crate::config::format_duration(d)
}
