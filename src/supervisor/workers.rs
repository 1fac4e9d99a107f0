//! Workers one by one: the settings they are started with, forking and
//! stopping them, their exits and their notify datagrams.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use super::Supervisor;
use super::control::Event;
use super::environment::{self, Account};
use super::plan::{self, ExitVerdict};
use super::pool::{StopReason, Worker, WorkerState};
use crate::config::{Config, ReadyMode, WorkerSocket};
use crate::notify;
use crate::sys::listen::Listener;
use crate::sys::process::ExitStatus;
use crate::sys::spawn::{self, Credentials, SpawnSpec};
use crate::sys::users;

/// Worker settings resolved once per configuration generation.
pub(super) struct WorkerPlan {
    pub(super) argv: Vec<String>,
    pub(super) env: Vec<(String, String)>,
    pub(super) credentials: Option<Credentials>,
}

/// Why the worker settings of a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("worker user/group: {0}")]
    Credentials(std::io::Error),
    #[error(transparent)]
    Command(std::io::Error),
    #[error(
        "worker.socket = \"stdin\" gives each worker exactly one listener (fd 0), but droved has {0}; listen on one address (listen.addresses, --listen or the .socket unit)"
    )]
    StdinListeners(usize),
}

/// Where `socket` puts a worker's listeners.
fn placement(socket: WorkerSocket) -> spawn::Placement {
    match socket {
        WorkerSocket::Systemd => spawn::Placement::Systemd,
        WorkerSocket::Stdin => spawn::Placement::Stdin,
    }
}

/// Whether a variable of droved's own environment must stay out of
/// workers': what droved sets for them (LISTEN_*, NOTIFY_SOCKET, DROVE_*,
/// WATCHDOG_*) and what belongs to droved's own relationship with systemd.
fn private_env(key: &str) -> bool {
    crate::config::RESERVED_ENVIRONMENT.contains(&key)
        || key == "MAINPID"
        || key.starts_with("DROVE_")
}

/// The user and groups `config`'s workers run as (`None`: droved's own).
pub(super) fn resolve_credentials(config: &Config) -> Result<Option<Credentials>, PlanError> {
    let w = &config.worker;
    Credentials::resolve(w.user.as_deref(), w.group.as_deref()).map_err(PlanError::Credentials)
}

impl WorkerPlan {
    /// `credentials` as [`resolve_credentials`] gave them for `config`.
    pub(super) fn new(
        config: &Config,
        credentials: Option<Credentials>,
        listeners: &[Listener],
        notify_address: &str,
        instance: &str,
    ) -> Result<WorkerPlan, PlanError> {
        let w = &config.worker;
        // Built, not inherited: droved's own environment may hold the
        // unit's secrets (see `environment`).
        let uid = credentials
            .as_ref()
            .map_or_else(nix::unistd::geteuid, |c| c.uid);
        let account = users::account(uid)
            .map_err(PlanError::Credentials)?
            .map(|u| Account {
                name: u.name,
                home: u.dir.to_string_lossy().into_owned(),
                shell: u.shell.to_string_lossy().into_owned(),
            });
        let parent = std::env::vars().filter(|(k, _)| !private_env(k));
        let mut env = environment::build(
            parent,
            account.as_ref(),
            &w.inherit_environment,
            &w.environment,
        );
        if w.socket == WorkerSocket::Stdin && listeners.len() != 1 {
            return Err(PlanError::StdinListeners(listeners.len()));
        }
        let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
        env.extend(environment::listen_variables(w.socket, &names));
        env.push(("NOTIFY_SOCKET".into(), notify_address.to_string()));
        if let Some(wd) = w.watchdog {
            env.push(("WATCHDOG_USEC".into(), wd.as_micros().to_string()));
        }
        env.push(("DROVE_INSTANCE".into(), instance.to_string()));
        // Fail early with a clear message rather than at every fork.
        spawn::resolve_program(
            w.command.first().map(String::as_str).unwrap_or(""),
            env.iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.as_str()),
            w.working_directory.as_deref(),
        )
        .map_err(PlanError::Command)?;
        Ok(WorkerPlan {
            argv: w.command.clone(),
            env,
            credentials,
        })
    }
}

impl Supervisor {
    pub(super) fn on_exit(&mut self, pid: Pid, exit_status: ExitStatus) {
        let status = exit_status;
        let Some(w) = self.pool.workers.remove(&pid) else {
            return;
        };
        let now = Instant::now();
        let uptime = now.duration_since(w.started);
        self.counters.exited += 1;
        // A SIGKILL droved did not send may be the OOM killer's: its count
        // for droved's cgroup says (read only then).
        let oom_killed =
            !w.killed() && matches!(status, ExitStatus::Signaled(Signal::SIGKILL, _)) && {
                let count = self
                    .oom_counter
                    .as_deref()
                    .and_then(crate::sys::cgroup::read_oom_kills);
                self.oom.claim(count, now)
            };
        let cause = plan::end_cause(status, oom_killed);
        let status = if oom_killed {
            format!("{status} from the OOM killer")
        } else {
            status.to_string()
        };
        let _ = self.events.send(Event::WorkerExited {
            pid: pid.as_raw() as u32,
            slot: w.slot,
            status: status.clone(),
            uptime_secs: uptime.as_secs_f64(),
        });
        let secs = uptime.as_secs_f64();
        let verdict = plan::judge_exit(&w, exit_status, uptime, self.config.worker.min_uptime);
        self.metrics.worker_exited(&verdict, cause);
        if w.generation == self.generation && plan::fails_rollout(&verdict) {
            self.note_rollout_failure(format!(
                "worker {pid} of generation {} exited with {status} after {secs:.1} s",
                w.generation
            ));
        }
        match verdict {
            ExitVerdict::Stopped { reason, failed } => {
                info!(
                    worker_pid = pid.as_raw(),
                    slot = w.slot,
                    event = "exited",
                    "worker {pid} (slot {}) exited with {status} after {secs:.1} s ({reason})",
                    w.slot,
                );
                if failed {
                    let why = match reason {
                        StopReason::ReadyTimeout => self.no_ready_hint(),
                        _ => format!("worker {reason}"),
                    };
                    self.note_failed_start(&w, why, now);
                }
            }
            ExitVerdict::FailedStart { never_ready } => {
                let why = format!(
                    "worker exited with {status} after {secs:.1} s{}",
                    if never_ready {
                        " before it was ready"
                    } else {
                        ""
                    }
                );
                let delay = self.note_failed_start(&w, why, now);
                warn!(
                    worker_pid = pid.as_raw(),
                    slot = w.slot,
                    event = "exited",
                    "worker {pid} (slot {}) exited with {status} after {secs:.1} s; restarting in {} ms{}",
                    w.slot,
                    delay.as_millis(),
                    if self.gate.is_failing() {
                        " (pool is failing)"
                    } else {
                        ""
                    }
                );
            }
            ExitVerdict::Ended => warn!(
                worker_pid = pid.as_raw(),
                slot = w.slot,
                event = "exited",
                cause = cause.label(),
                "worker {pid} (slot {}) exited with {status} after {secs:.1} s; restarting",
                w.slot,
            ),
        }
    }

    /// Why a worker that was not ready in time failed, with the fix for the
    /// usual cause: a server that does not speak sd_notify under
    /// `ready = "notify"` (only notify mode can time out).
    pub(super) fn no_ready_hint(&self) -> String {
        format!(
            "worker sent no READY=1 within ready_timeout ({:?}); \
             a server that does not send READY=1 needs ready = \"exec\"",
            self.config.worker.ready_timeout
        )
    }

    /// A start failed: back off, and abort a rollout whose new generation
    /// cannot get ready.
    fn note_failed_start(&mut self, w: &Worker, why: String, now: Instant) -> Duration {
        self.counters.failed_starts += 1;
        let delay = self.gate.record_failure(now);
        self.last_failure = Some(why.clone());
        let generation = self.generation;
        // Guarded rollouts count failures themselves (note_rollout_failure).
        if let Some(r) = self.lifecycle.rollout_mut().filter(|r| r.guard.is_none()) {
            if w.generation == generation {
                r.failures += 1;
            }
            if plan::rollout_gives_up(w.generation, generation, r.failures) {
                self.abort_rollout(format!(
                    "new generation {generation} cannot get ready: {why}"
                ));
            }
        }
        delay
    }

    pub(super) fn on_datagram(&mut self, d: crate::sys::notify_socket::Datagram) {
        let Some(pid) = d.pid.map(Pid::from_raw) else {
            debug!("notify datagram without credentials ignored");
            return;
        };
        if d.fds_dropped > 0 {
            debug!(
                sender = pid.as_raw(),
                "closed {} fds attached to a notify datagram", d.fds_dropped
            );
        }
        // A forked worker whose template has not named it yet is kept.
        let Some(d) = self.keep_early_datagram(pid, d) else {
            return;
        };
        let Some(w) = self.pool.workers.get_mut(&pid) else {
            debug!(
                sender = pid.as_raw(),
                "notify datagram from a pid that is not a worker ignored"
            );
            return;
        };
        if d.truncated {
            debug!(
                worker_pid = pid.as_raw(),
                "oversized notify datagram ignored"
            );
            return;
        }
        let msg = match notify::parse(&d.bytes) {
            Ok(m) => m,
            Err(e) => {
                debug!(
                    worker_pid = pid.as_raw(),
                    "malformed notify datagram ignored: {e}"
                );
                return;
            }
        };
        let now = Instant::now();
        if let Some(text) = msg.status {
            w.status_text = Some(text);
        }
        if msg.watchdog {
            w.last_ping = now;
        }
        // WATCHDOG_USEC=: the worker sets its own watchdog (a server's own
        // timeout, e.g. gunicorn's), and the clock starts again, as systemd
        // does for a service. 0 is not a timeout: ignored.
        if let Some(usec) = msg.watchdog_usec.filter(|d| !d.is_zero())
            && w.watchdog != Some(usec)
        {
            w.watchdog = Some(usec);
            w.last_ping = now;
            info!(
                worker_pid = pid.as_raw(),
                slot = w.slot,
                event = "watchdog",
                "worker {pid} (slot {}) set its watchdog to {} ms",
                w.slot,
                usec.as_millis()
            );
        }
        if msg.ready && w.become_ready(now) {
            self.metrics.worker_ready(now.duration_since(w.started));
            info!(
                worker_pid = pid.as_raw(),
                slot = w.slot,
                event = "ready",
                "worker {pid} (slot {}) ready after {} ms",
                w.slot,
                now.duration_since(w.started).as_millis()
            );
        }
        if msg.watchdog_trigger && w.state() == WorkerState::Ready {
            let pid = w.pid;
            self.stop_worker(pid, StopReason::Watchdog, false);
        } else if msg.stopping && w.begin_stop(StopReason::StoppedItself, now) {
            // The worker leaves by itself (e.g. its own max-requests): count
            // it as stopping so a replacement starts now, not at its exit.
            info!(
                worker_pid = pid.as_raw(),
                slot = w.slot,
                event = "stopping",
                "worker {pid} is stopping on its own"
            );
        }
    }

    /// Stops a worker: SIGKILL if `kill`; else, for a worker that timed
    /// out (`reason.aborts()`), `worker.timeout_signal` (SIGABRT by
    /// default: Python's faulthandler and gunicorn print a traceback, C
    /// leaves a core), then SIGKILL after [`crate::config::ABORT_GRACE`]
    /// (`stop_expired`); else `worker.stop_signal`. One already stopping
    /// keeps its course, unless this kills it.
    pub(super) fn stop_worker(&mut self, pid: Pid, reason: StopReason, kill: bool) {
        let Some(w) = self.pool.workers.get_mut(&pid) else {
            return;
        };
        if w.state() == WorkerState::Stopping && (w.killed() || !kill) {
            return;
        }
        let sig = if kill {
            Signal::SIGKILL
        } else if reason.aborts() {
            self.config.worker.timeout_signal
        } else {
            self.config.worker.stop_signal
        };
        if let Err(e) = self.children.signal(pid, sig) {
            warn!(worker_pid = pid.as_raw(), "cannot signal worker: {e}");
        }
        debug!(
            worker_pid = pid.as_raw(),
            slot = w.slot,
            "sent {} ({reason})",
            sig.as_str()
        );
        if kill {
            w.mark_killed(reason, Instant::now());
        } else {
            w.begin_stop(reason, Instant::now());
        }
    }

    /// Forks `n` workers, then confirms each exec: the children exec in
    /// parallel instead of one after another (a jump to max is one step).
    pub(super) fn spawn_workers(&mut self, n: u32, now: Instant) {
        if self.template_mode() {
            return self.ask_template(n, now);
        }
        let mut pending = Vec::new();
        for slot in self.pool.free_slots(n as usize) {
            let mut env = self.plan.env.clone();
            env.push(("DROVE_WORKER".into(), slot.to_string()));
            env.push(("DROVE_GENERATION".into(), self.generation.to_string()));
            let spec = SpawnSpec {
                argv: &self.plan.argv,
                env,
                working_directory: self.config.worker.working_directory.as_deref(),
                credentials: self.plan.credentials.as_ref(),
                listeners: self.listeners.iter().map(|l| l.as_fd()).collect(),
                placement: placement(self.config.worker.socket),
                parent_death_signal: Some(self.config.worker.stop_signal),
            };
            self.gate.consume(now);
            match spawn::start(&spec) {
                Ok(p) => {
                    // Holds the slot while the exec is confirmed.
                    self.pool
                        .workers
                        .insert(p.pid(), Worker::new(p.pid(), slot, self.generation, now));
                    pending.push((p, slot));
                }
                Err(e) => {
                    self.spawn_failed(slot, e, now);
                    break;
                }
            }
        }
        for (p, slot) in pending {
            let pid = p.pid();
            match p.finish() {
                Ok(_) => {
                    // Exec'd, no longer held: ours alone to reap, so the
                    // pid still names it.
                    if let Err(e) = self.children.track(pid) {
                        error!(
                            worker_pid = pid.as_raw(),
                            "cannot hold worker {pid}: {e}; droved cannot signal it"
                        );
                    }
                    self.worker_started(pid, now)
                }
                Err(e) => {
                    self.pool.workers.remove(&pid);
                    self.spawn_failed(slot, e, now);
                }
            }
        }
    }

    fn spawn_failed(&mut self, slot: u32, e: std::io::Error, now: Instant) {
        self.counters.failed_starts += 1;
        let delay = self.gate.record_failure(now);
        let why = format!("cannot start worker: {e}");
        error!(
            slot,
            event = "spawn-failed",
            "{why}; retrying in {} ms",
            delay.as_millis()
        );
        self.last_failure = Some(why);
    }

    pub(super) fn worker_started(&mut self, pid: Pid, now: Instant) {
        self.counters.spawned += 1;
        let exec_ready = self.config.worker.ready == ReadyMode::Exec;
        let lifetime = self.config.worker.max_lifetime;
        let jitter = self.config.worker.max_lifetime_jitter;
        let Some(w) = self.pool.workers.get_mut(&pid) else {
            return;
        };
        if exec_ready {
            w.become_ready(now);
        }
        if let Some(life) = lifetime {
            // Spread recycling so workers started together do not all
            // restart at once; pid bits are random enough.
            let spread = (pid.as_raw() as u64 * 2_654_435_761 % 1000) as f64 / 1000.0;
            w.recycle_at = Some(now + life + jitter.mul_f64(spread));
        }
        let (slot, generation) = (w.slot, w.generation);
        info!(
            worker_pid = pid.as_raw(),
            slot,
            generation,
            event = "started",
            "worker {pid} (slot {slot}, generation {generation}) started"
        );
        let _ = self.events.send(Event::WorkerStarted {
            pid: pid.as_raw() as u32,
            slot,
            generation,
        });
    }
}
