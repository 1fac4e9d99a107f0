//! droved's own lifecycle, as one enum.
//!
//! ```text
//!             pool ready                      rollout done / aborted
//!  Starting ─────────────▶ Running ◀──────────────────────────── Rolling
//!     │  │                 │  ▲  │  reload, restart-workers          ▲
//!     │  │  reload         │  │  └───────────────────────────────────┘
//!     │  └─────────────────┼──┼──────────────────────────────────────┘
//!     │  upgrade           │  │ preflight refused / exec failed
//!     └──────────────▶ Upgrading { Preflight ─▶ Handing } ──exec──▶ (new image:
//!                          │                                 Starting/Running/Stopping)
//!  Running/Rolling/Upgrading ── SIGTERM, stop.delay > 0 ──▶ Draining ──delay over──▶ Stopping { graceful }
//!  any state ── SIGTERM/SIGINT/SIGQUIT ──▶ Stopping { fast } ──last worker gone──▶ exit
//!  Draining ── a second SIGTERM / SIGINT / SIGQUIT ──▶ Stopping at once
//!  Running at zero workers for pool.idle_exit ──▶ Stopping { graceful }
//! ```
//!
//! A pool at zero workers (`pool.min = 0`) is a condition of the pool, not
//! a state here: see `ondemand.rs` and docs/lifecycle.md.
//!
//! Every state owns exactly the data that exists in it (a rollout's floor
//! and callers, an upgrade's callers and exec time), so "rolling and
//! upgrading at once" or "stopping with an exec pending" cannot be written
//! down. [`announcement`] is the one rule for what systemd hears on a change
//! of phase; `Supervisor::enter` applies it and publishes the new State on
//! D-Bus.

use std::time::Instant;

use tokio::sync::oneshot;

use super::control::ControlError;
use super::status::Phase;
use crate::config::{Config, RolloutConfig};

pub type Reply = oneshot::Sender<Result<(), ControlError>>;

/// Where droved is in its life. See the module docs for the diagram.
pub enum Lifecycle {
    /// Forking the first workers; READY=1 not sent yet.
    Starting,
    Running,
    /// A rolling restart (reload or restart-workers) is under way.
    Rolling(Box<Rollout>),
    /// A binary upgrade: the new binary is being checked, or the exec is due.
    Upgrading(Upgrade),
    /// A graceful stop with `stop.delay`: until `until` the workers keep
    /// serving as they are (no scaling but a wake from zero, no rollout,
    /// no upgrade) while `/readyz` says 503; then Stopping.
    Draining {
        until: Instant,
    },
    /// Workers were told to stop; droved exits when the last one is gone.
    Stopping {
        fast: bool,
    },
}

/// A rolling restart in progress.
pub struct Rollout {
    /// Ready workers when it began: the floor we never go below.
    pub floor: u32,
    /// The config and generation to go back to if the new one fails
    /// (`None` for a plain restart of the same config).
    pub previous: Option<(Config, u64)>,
    /// Failed starts of the new generation so far.
    pub failures: u32,
    pub replies: Vec<Reply>,
    pub why: &'static str,
    /// What droved was before: a rollout begun while starting still owes
    /// systemd its first READY=1, which it sends when the rollout ends.
    pub from_starting: bool,
    /// `[rollout]` in the new config: canaries first, and undone on
    /// failures; `None` rolls as before (give up after three failed starts).
    pub guard: Option<Guard>,
    /// `drovectl rollout pause`: no new worker of the new generation until
    /// resumed (the stage does not advance either).
    pub paused: bool,
    /// This rollout undoes a failed one, for this reason.
    pub undoing: Option<String>,
}

/// A guarded rollout's policy and where it stands.
pub struct Guard {
    pub settings: RolloutConfig,
    pub stage: CanaryStage,
}

/// The stages of a guarded rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanaryStage {
    /// Starting `canary` workers of the new generation (and no more).
    Canary,
    /// The canaries serve real traffic until `until`; no more start.
    Observing { until: Instant },
    /// The rest of the pool rolls, one at a time, as in a plain rollout.
    Rest,
}

impl CanaryStage {
    /// The next stage, from the new generation's ready workers. Pure.
    pub fn advance(self, settings: &RolloutConfig, ready_new: u32, now: Instant) -> CanaryStage {
        match self {
            CanaryStage::Canary if settings.canary == 0 => CanaryStage::Rest,
            CanaryStage::Canary if ready_new >= settings.canary => CanaryStage::Observing {
                until: now + settings.observe,
            },
            CanaryStage::Observing { until } if now >= until => CanaryStage::Rest,
            other => other,
        }
    }
}

impl Rollout {
    /// The most new-generation workers allowed now (`active_new` of them
    /// run): while paused, those; while canaries start or are observed,
    /// `canary`; otherwise no cap. A capped rollout does not finish.
    pub fn new_generation_cap(&self, active_new: u32) -> Option<u32> {
        if self.paused {
            return Some(active_new);
        }
        match &self.guard {
            Some(Guard {
                settings,
                stage: CanaryStage::Canary | CanaryStage::Observing { .. },
            }) => Some(settings.canary),
            _ => None,
        }
    }

    /// One line for `drovectl rollout status`.
    pub fn describe(&self, generation: u64, ready_new: u32, now: Instant) -> String {
        let what = match &self.undoing {
            Some(why) => format!("rolling back to the previous settings ({why})"),
            None => self.why.to_string(),
        };
        let stage = match &self.guard {
            None => "rolling".to_string(),
            Some(g) => match g.stage {
                CanaryStage::Canary => {
                    format!("canary: {ready_new} of {} ready", g.settings.canary)
                }
                CanaryStage::Observing { until } => format!(
                    "observing {} canary worker(s), {:.0} s left",
                    g.settings.canary,
                    until.saturating_duration_since(now).as_secs_f64()
                ),
                CanaryStage::Rest => "rolling the rest".to_string(),
            },
        };
        let failures = match &self.guard {
            Some(g) => format!(
                "; {} of {} failures",
                self.failures, g.settings.max_failures
            ),
            None => String::new(),
        };
        format!(
            "generation {generation}: {what}; {stage}{failures}{}",
            if self.paused { "; paused" } else { "" }
        )
    }
}

/// A binary upgrade in progress.
pub struct Upgrade {
    pub stage: UpgradeStage,
    /// Whether the pool had become ready before the upgrade began; the new
    /// image resumes in the same state.
    pub from_starting: bool,
}

pub enum UpgradeStage {
    /// `droved --preflight` of the new binary runs; callers wait for it.
    Preflight { replies: Vec<Reply> },
    /// Preflight passed and the callers were answered; the exec happens at
    /// `exec_at`, once their replies have left on the bus.
    Handing { exec_at: Instant },
}

impl Lifecycle {
    /// The phase shown in `STATUS=`, the D-Bus State property and
    /// `drovectl status`.
    pub fn phase(&self) -> Phase {
        match self {
            Lifecycle::Starting => Phase::Starting,
            Lifecycle::Running => Phase::Running,
            Lifecycle::Rolling(_) => Phase::Reloading,
            Lifecycle::Upgrading(_) => Phase::Upgrading,
            Lifecycle::Draining { .. } => Phase::Draining,
            Lifecycle::Stopping { .. } => Phase::Stopping,
        }
    }

    pub fn is_stopping(&self) -> bool {
        matches!(self, Lifecycle::Stopping { .. })
    }

    /// Stopping, or draining before it: no request that changes the pool
    /// (scale, reload, upgrade) is taken.
    pub fn is_ending(&self) -> bool {
        matches!(
            self,
            Lifecycle::Stopping { .. } | Lifecycle::Draining { .. }
        )
    }

    /// When a drain ends.
    pub fn drain_until(&self) -> Option<Instant> {
        match self {
            Lifecycle::Draining { until } => Some(*until),
            _ => None,
        }
    }

    /// Whether a graceful stop drains first (given `stop.delay` > 0): only
    /// a pool that became ready serves anyone a load balancer could move
    /// away; an upgrade whose exec is due execs first and the new image
    /// drains.
    pub fn drains_on_stop(&self) -> bool {
        match self {
            Lifecycle::Running => true,
            Lifecycle::Rolling(r) => !r.from_starting,
            Lifecycle::Upgrading(u) => {
                !u.from_starting && matches!(u.stage, UpgradeStage::Preflight { .. })
            }
            Lifecycle::Starting | Lifecycle::Draining { .. } | Lifecycle::Stopping { .. } => false,
        }
    }

    pub fn rollout(&self) -> Option<&Rollout> {
        match self {
            Lifecycle::Rolling(r) => Some(r),
            _ => None,
        }
    }

    pub fn rollout_mut(&mut self) -> Option<&mut Rollout> {
        match self {
            Lifecycle::Rolling(r) => Some(r),
            _ => None,
        }
    }

    /// When an upgrade's exec is due.
    pub fn exec_at(&self) -> Option<Instant> {
        match self {
            Lifecycle::Upgrading(Upgrade {
                stage: UpgradeStage::Handing { exec_at },
                ..
            }) => Some(*exec_at),
            _ => None,
        }
    }

    /// The state to go back to when a rollout or upgrade ends: Running,
    /// unless the pool never got ready.
    pub fn settled(from_starting: bool) -> Lifecycle {
        if from_starting {
            Lifecycle::Starting
        } else {
            Lifecycle::Running
        }
    }
}

/// What droved tells systemd (sd_notify) when its phase changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// `READY=1`: serving (again) after start-up, a reload or an upgrade.
    Ready,
    /// `RELOADING=1`: a rollout or an upgrade began.
    Reloading,
    /// `STOPPING=1`.
    Stopping,
    /// Only `STATUS=` (sent on every change anyway).
    Nothing,
}

/// The one rule for what systemd hears on a change of phase. Pure.
pub fn announcement(from: Phase, to: Phase) -> Announcement {
    match (from, to) {
        (a, b) if a == b => Announcement::Nothing,
        (_, Phase::Running) => Announcement::Ready,
        (_, Phase::Reloading | Phase::Upgrading) => Announcement::Reloading,
        // The drain already said STOPPING=1.
        (Phase::Draining, Phase::Stopping) => Announcement::Nothing,
        (_, Phase::Stopping | Phase::Draining) => Announcement::Stopping,
        (_, Phase::Starting) => Announcement::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Announcement as A;
    use Phase::*;

    #[test]
    fn what_systemd_hears_on_each_change() {
        // (from, to, announcement): every pair droved can make.
        let table = [
            (Starting, Running, A::Ready),
            (Starting, Reloading, A::Reloading),
            (Starting, Upgrading, A::Reloading),
            (Starting, Stopping, A::Stopping),
            (Running, Reloading, A::Reloading),
            (Running, Upgrading, A::Reloading),
            (Running, Stopping, A::Stopping),
            (Reloading, Running, A::Ready),
            (Reloading, Stopping, A::Stopping),
            (Running, Draining, A::Stopping),
            (Reloading, Draining, A::Stopping),
            (Upgrading, Draining, A::Stopping),
            (Draining, Stopping, A::Nothing),
            // A rollout begun while starting that ends before the pool is
            // ready: systemd still waits for the first READY=1.
            (Reloading, Starting, A::Nothing),
            (Upgrading, Running, A::Ready),
            (Upgrading, Starting, A::Nothing),
            (Upgrading, Stopping, A::Stopping),
            (Running, Running, A::Nothing),
            (Upgrading, Upgrading, A::Nothing),
            (Stopping, Stopping, A::Nothing),
        ];
        for (from, to, want) in table {
            assert_eq!(announcement(from, to), want, "{from} -> {to}");
        }
    }

    #[test]
    fn canary_stages_advance_on_readiness_then_time() {
        let now = Instant::now();
        let s = RolloutConfig {
            canary: 2,
            observe: std::time::Duration::from_secs(30),
            max_failures: 1,
        };
        let obs = CanaryStage::Observing {
            until: now + s.observe,
        };
        // (stage, ready new-generation workers, seconds later, next stage)
        let table = [
            (CanaryStage::Canary, 0, 0, CanaryStage::Canary),
            (CanaryStage::Canary, 1, 0, CanaryStage::Canary),
            (CanaryStage::Canary, 2, 0, obs),
            (obs, 2, 29, obs),
            (obs, 0, 30, CanaryStage::Rest),
            (CanaryStage::Rest, 0, 0, CanaryStage::Rest),
        ];
        for (stage, ready, secs, want) in table {
            let at = now + std::time::Duration::from_secs(secs);
            assert_eq!(
                stage.advance(&s, ready, at),
                want,
                "{stage:?} {ready} {secs}"
            );
        }
        let none = RolloutConfig { canary: 0, ..s };
        assert_eq!(
            CanaryStage::Canary.advance(&none, 0, now),
            CanaryStage::Rest
        );
    }

    #[test]
    fn new_generation_cap_by_stage_and_pause() {
        let now = Instant::now();
        let mut r = Rollout {
            floor: 2,
            previous: None,
            failures: 0,
            replies: vec![],
            why: "test",
            from_starting: false,
            guard: None,
            paused: false,
            undoing: None,
        };
        assert_eq!(r.new_generation_cap(3), None, "plain rollout");
        r.paused = true;
        assert_eq!(r.new_generation_cap(3), Some(3), "paused holds what runs");
        r.paused = false;
        let settings = RolloutConfig::default();
        for (stage, want) in [
            (CanaryStage::Canary, Some(1)),
            (CanaryStage::Observing { until: now }, Some(1)),
            (CanaryStage::Rest, None),
        ] {
            r.guard = Some(Guard {
                settings: settings.clone(),
                stage,
            });
            assert_eq!(r.new_generation_cap(5), want, "{stage:?}");
        }
    }

    #[test]
    fn only_a_pool_that_served_drains() {
        let now = Instant::now();
        let upgrading = |stage, from_starting| {
            Lifecycle::Upgrading(Upgrade {
                stage,
                from_starting,
            })
        };
        assert!(Lifecycle::Running.drains_on_stop());
        assert!(!Lifecycle::Starting.drains_on_stop());
        assert!(!Lifecycle::Draining { until: now }.drains_on_stop());
        assert!(!Lifecycle::Stopping { fast: false }.drains_on_stop());
        let preflight = || UpgradeStage::Preflight { replies: vec![] };
        assert!(upgrading(preflight(), false).drains_on_stop());
        assert!(!upgrading(preflight(), true).drains_on_stop());
        // The exec is due: it happens first, and the new image drains.
        assert!(!upgrading(UpgradeStage::Handing { exec_at: now }, false).drains_on_stop());
    }

    #[test]
    fn phase_of_each_state() {
        assert_eq!(Lifecycle::Starting.phase(), Starting);
        assert_eq!(Lifecycle::Running.phase(), Running);
        assert_eq!(Lifecycle::Stopping { fast: true }.phase(), Stopping);
        let up = Lifecycle::Upgrading(Upgrade {
            stage: UpgradeStage::Preflight { replies: vec![] },
            from_starting: false,
        });
        assert_eq!(up.phase(), Upgrading);
        assert!(up.exec_at().is_none());
        let now = Instant::now();
        let handing = Lifecycle::Upgrading(Upgrade {
            stage: UpgradeStage::Handing { exec_at: now },
            from_starting: false,
        });
        assert_eq!(handing.exec_at(), Some(now));
        let draining = Lifecycle::Draining { until: now };
        assert_eq!(draining.phase(), Draining);
        assert_eq!(draining.drain_until(), Some(now));
        assert!(draining.is_ending() && !draining.is_stopping());
        assert!(matches!(Lifecycle::settled(true), Lifecycle::Starting));
        assert!(matches!(Lifecycle::settled(false), Lifecycle::Running));
    }
}
