//! Requests from outside: D-Bus commands, and the signals that scale or
//! stop the pool (TTIN/TTOU, TERM/INT/QUIT).

use std::time::Instant;

use nix::unistd::Pid;
use tracing::{error, info};

use super::Supervisor;
use super::control::{Command, ControlError, Event, WorkerActivity, WorkerInfo};
use super::lifecycle::{Lifecycle, UpgradeStage};
use super::pool::StopReason;
use super::scale_params;
use crate::sys::process;

impl Supervisor {
    pub(super) fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Scale { n, reply } => {
                let r = if self.lifecycle.is_ending() {
                    Err(ControlError::Stopping)
                } else if n < self.config.pool.min || n > self.config.pool.max {
                    Err(ControlError::OutOfRange(format!(
                        "{n} is outside the limits {}..{}; change them with SetLimits first",
                        self.config.pool.min, self.config.pool.max
                    )))
                } else {
                    self.nudge(n as i32 - self.target as i32, "scale request");
                    Ok(self.target)
                };
                let _ = reply.send(r);
            }
            Command::SetLimits {
                min,
                max,
                privileged,
                reply,
            } => {
                let _ = reply.send(self.set_limits(min, max, privileged));
            }
            Command::Reload { reply } => {
                if let Err(e) = self.reload(Some(reply)) {
                    error!("reload rejected: {e}");
                }
            }
            Command::RestartWorkers { reply } => {
                self.start_rollout("restart requested", None, Some(reply))
            }
            Command::Upgrade { reply } => self.request_upgrade(Some(reply), "upgrade request"),
            Command::Rollout { action, reply } => {
                let _ = reply.send(self.rollout_command(action));
            }

            Command::ListActivity { reply } => {
                let now = Instant::now();
                let list =
                    self.pool
                        .workers
                        .values()
                        .filter(|w| w.state() == super::pool::WorkerState::Ready)
                        .filter_map(|w| {
                            let busy = self.activity.is_busy(w.pid);
                            (busy || self.activity.is_idle(w.pid)).then(|| WorkerActivity {
                                pid: w.pid.as_raw() as u32,
                                busy,
                                busy_secs: self.activity.busy_since(w.pid).map_or(0.0, |t| {
                                    now.saturating_duration_since(t).as_secs_f64()
                                }),
                            })
                        })
                        .collect();
                let _ = reply.send(list);
            }
            Command::ListPids { reply } => {
                let workers = self.pool.workers.keys();
                let templates = self.pool.templates.all.iter().map(|t| &t.pid);
                let pids = workers.chain(templates).map(|p| p.as_raw() as u32);
                let _ = reply.send(pids.collect());
            }
            Command::ListWorkers { reply } => {
                let now = Instant::now();
                // One /proc read per process, on droved's loop.
                let usage = |pid| {
                    process::usage(pid).map_or((0, 0.0), |(rss, cpu)| (rss, cpu.as_secs_f64()))
                };
                let list = self
                    .pool
                    .workers
                    .values()
                    .map(|w| {
                        let (rss_bytes, cpu_secs) = usage(w.pid);
                        WorkerInfo {
                            pid: w.pid.as_raw() as u32,
                            slot: w.slot,
                            state: w.state().to_string(),
                            generation: w.generation,
                            age_secs: now.duration_since(w.started).as_secs_f64(),
                            rss_bytes,
                            cpu_secs,
                            status: w.status_text.clone().unwrap_or_default(),
                        }
                    })
                    .chain(self.pool.templates.all.iter().map(|t| {
                        let (rss_bytes, cpu_secs) = usage(t.pid);
                        WorkerInfo {
                            pid: t.pid.as_raw() as u32,
                            // Not a worker: no slot.
                            slot: super::template::NO_SLOT,
                            state: t.list_state().to_string(),
                            generation: t.generation,
                            age_secs: now.duration_since(t.started).as_secs_f64(),
                            rss_bytes,
                            cpu_secs,
                            status: String::new(),
                        }
                    }))
                    .collect();
                let _ = reply.send(list);
            }
        }
    }

    fn set_limits(
        &mut self,
        min: u32,
        max: u32,
        privileged: bool,
    ) -> Result<(u32, u32), ControlError> {
        if max == 0 || min > max || max > crate::config::MAX_WORKERS {
            return Err(ControlError::OutOfRange(format!(
                "limits must satisfy 0 <= min <= max <= {}, max >= 1; got min {min}, max {max}",
                crate::config::MAX_WORKERS
            )));
        }
        if let Some(msg) = limits_beyond_config(min, max, self.file_limits, privileged) {
            return Err(ControlError::OutOfRange(msg));
        }
        self.config.pool.min = min;
        self.config.pool.max = max;
        self.apply_limits();
        let clamped = self.target.clamp(min, max);
        if clamped != self.target {
            self.nudge(clamped as i32 - self.target as i32, "new limits");
        }
        info!(event = "limits", "limits set to {min}..{max}");
        Ok((min, max))
    }

    pub(super) fn nudge(&mut self, delta: i32, why: &str) {
        // As `drovectl scale` is refused: the pool is on its way out, and a
        // worker started now would be stopped at once.
        if self.lifecycle.is_ending() {
            info!("{why} ignored: droved is {}", self.lifecycle.phase());
            return;
        }
        let new = (self.target as i64 + delta as i64)
            .clamp(self.config.pool.min as i64, self.config.pool.max as i64)
            as u32;
        if new == self.target {
            info!(
                "{why}: target stays {} (limits {}..{})",
                self.target, self.config.pool.min, self.config.pool.max
            );
            return;
        }
        info!(
            event = "scale",
            from = self.target,
            to = new,
            "{why}: scale {} -> {new}",
            self.target
        );
        let _ = self.events.send(Event::Scaled {
            from: self.target,
            to: new,
            reason: why.to_string(),
        });
        self.metrics.manual_scale(self.target, new);
        self.target = new;
    }

    /// A stop from outside (SIGTERM, SIGINT, SIGQUIT). A graceful one
    /// drains first for `stop.delay` when the pool has served (see
    /// [`Lifecycle::drains_on_stop`]); any stop during the drain stops at
    /// once, gracefully or fast as asked.
    pub(super) fn request_stop(&mut self, fast: bool, why: &str) {
        if let Some(until) = self.lifecycle.drain_until() {
            let left = until.saturating_duration_since(Instant::now());
            info!(
                event = "stop",
                "{why} during the drain ({:.1} s left): stopping now",
                left.as_secs_f64()
            );
        } else if !fast && !self.config.stop.delay.is_zero() && self.lifecycle.drains_on_stop() {
            return self.drain(why);
        }
        self.begin_stop(fast, why);
    }

    /// Enters the drain: `/readyz` answers 503 while the workers keep
    /// serving for `stop.delay`; then the graceful stop (`run` arms the
    /// timer from [`Lifecycle::drain_until`]).
    pub(super) fn drain(&mut self, why: &str) {
        let delay = self.config.stop.delay;
        info!(
            event = "drain",
            "{why}: draining for {} (stop.delay): not ready any more, the {} workers keep serving; then a graceful stop",
            crate::config::format_duration(delay),
            self.pool.workers.len()
        );
        let left = self.enter(Lifecycle::Draining {
            until: Instant::now() + delay,
        });
        refuse_waiting(left);
    }

    /// Stops the pool: every worker gets its stop signal (SIGKILL when
    /// `fast`); droved exits when the last one is gone. A stop wins over
    /// everything in progress: a rollout's callers get an error, an upgrade
    /// still checking the new binary is dropped (its callers get an error),
    /// and one whose exec is due happens now, with the stop handed over so
    /// the new image stops at once (its callers were told it would happen).
    pub(super) fn begin_stop(&mut self, fast: bool, why: &str) {
        if matches!(self.lifecycle, Lifecycle::Stopping { fast: already } if already || !fast) {
            return;
        }
        if self.lifecycle.exec_at().is_some() {
            info!(
                event = "stop",
                "{why}: stopping after the upgrade that is due now"
            );
            self.exec_upgrade(Some(fast));
            // Still here: the exec failed; stop in this image.
        }
        info!(
            event = "stop",
            "{why}: {} stop of {} workers",
            if fast { "fast" } else { "graceful" },
            self.pool.workers.len()
        );
        let left = self.enter(Lifecycle::Stopping { fast });
        refuse_waiting(left);
        let pids: Vec<Pid> = self.pool.workers.keys().copied().collect();
        for pid in pids {
            self.stop_worker(pid, StopReason::Shutdown, fast);
        }
    }

    /// The spawn gate and scaler follow the config's limits.
    pub(super) fn apply_limits(&mut self) {
        self.scaler.set_params(scale_params(&self.config));
        self.gate.set_limits(
            self.config.pool.spawn_rate,
            self.config.pool.max,
            self.config.worker.restart_delay,
            self.config.worker.restart_delay_max,
        );
    }
}

/// The callers a stop leaves waiting (a rollout's, an upgrade's preflight)
/// get an error: it will not happen.
fn refuse_waiting(left: Lifecycle) {
    let replies = match left {
        Lifecycle::Rolling(r) => r.replies,
        Lifecycle::Upgrading(u) => match u.stage {
            UpgradeStage::Preflight { replies } => replies,
            UpgradeStage::Handing { .. } => vec![],
        },
        _ => vec![],
    };
    for reply in replies {
        let _ = reply.send(Err(ControlError::Stopping));
    }
}

/// Why a caller who is not root may not set these limits, if they may
/// not: a control.group member stays within the config file's
/// `pool.min..pool.max` (`file`); root (or droved's own user) may not be
/// held to them.
fn limits_beyond_config(min: u32, max: u32, file: (u32, u32), privileged: bool) -> Option<String> {
    let (fmin, fmax) = file;
    (!privileged && (min < fmin || max > fmax)).then(|| {
        format!(
            "limits {min}..{max} go beyond the configuration's {fmin}..{fmax} (pool.min..pool.max): only root may set those; members of control.group may set limits within {fmin}..{fmax}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::limits_beyond_config as beyond;

    #[test]
    fn group_members_stay_within_the_config_file() {
        assert_eq!(beyond(2, 8, (2, 8), false), None);
        assert_eq!(beyond(3, 5, (2, 8), false), None);
        let msg = beyond(1, 4096, (2, 8), false).unwrap();
        assert!(
            msg.starts_with("limits 1..4096 go beyond the configuration's 2..8"),
            "{msg}"
        );
        assert!(msg.contains("only root"), "{msg}");
        assert!(beyond(2, 9, (2, 8), false).is_some());
        assert!(beyond(1, 8, (2, 8), false).is_some());
        assert_eq!(beyond(1, 4096, (2, 8), true), None);
    }
}
