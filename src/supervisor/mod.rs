//! The supervisor: the one owner of the pool state, and its event loop.
//!
//! Everything arrives as an event on one task: child exits (SIGCHLD),
//! notify datagrams, signals, control commands and the scale tick. Each
//! event updates the state, then [`Supervisor::reconcile`] forks or retires
//! workers to match the target, and [`Supervisor::publish`] tells systemd,
//! the log and watchers what changed. No locks: one task owns it all.

pub mod control;
pub mod gate;
pub mod pool;
pub mod pool_cpu;
pub mod status;
pub mod systemd;
mod upgrade;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::config::{Config, ReadyMode};
use crate::handover::Counters;
use crate::notify;
use crate::scale::{PoolView, Sample, ScaleParams, Scaler};
use crate::sys::listen::Listener;
use crate::sys::notify_socket::NotifySocket;
use crate::sys::probe;
use crate::sys::process::{self, ExitStatus};
use crate::sys::spawn::{self, Credentials, SpawnSpec};

use control::{Command, ControlError, Event, WorkerInfo};
use gate::SpawnGate;
use pool::{Pool, StopReason, Worker, WorkerState};
use status::{ListenerStatus, Phase, Snapshot};
use systemd::Upward;

/// Re-reads the configuration (file plus command-line overrides) on reload.
pub type ConfigLoader = Box<dyn Fn() -> Result<Config, String> + Send>;

/// What `droved` hands the supervisor.
pub struct Setup {
    pub config: Config,
    pub load_config: ConfigLoader,
    pub listeners: Vec<Listener>,
    pub instance: String,
    /// How this process was started, to re-exec it for an upgrade.
    pub exe: PathBuf,
    pub argv: Vec<std::ffi::OsString>,
    /// State handed over by the previous binary, with its notify socket.
    pub restored: Option<(crate::handover::State, std::os::fd::OwnedFd)>,
}

/// The daemon's side of the control channel: commands in, state out.
#[derive(Clone)]
pub struct Handle {
    pub commands: mpsc::Sender<Command>,
    pub snapshot: watch::Receiver<Snapshot>,
    pub events: broadcast::Sender<Event>,
}

/// Worker settings resolved once per configuration generation.
struct WorkerPlan {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    credentials: Option<Credentials>,
}

/// A rolling restart in progress.
struct Rollout {
    /// Ready workers when it began: the floor we never go below.
    floor: u32,
    previous: Option<(Config, u64)>,
    failures: u32,
    replies: Vec<oneshot::Sender<Result<(), ControlError>>>,
    why: &'static str,
}

pub struct Supervisor {
    config: Config,
    load_config: ConfigLoader,
    instance: String,
    listeners: Vec<Listener>,
    notify: NotifySocket,
    plan: WorkerPlan,
    pool: Pool,
    target: u32,
    generation: u64,
    phase: Phase,
    fast_stop: bool,
    gate: SpawnGate,
    scaler: Scaler,
    /// The workers' CPU use, for the scaler's cpu-bound guard.
    cpu: pool_cpu::PoolCpu,
    rollout: Option<Rollout>,
    upward: Upward,
    started: Instant,
    last_failure: Option<String>,
    listener_status: Vec<ListenerStatus>,
    counters: Counters,
    /// The journal's health at the last tick, the drop count already
    /// reported and when the unreported stall began, to log each stall
    /// once, when it ends.
    journal_seen: crate::logging::JournalHealth,
    log_dropped_reported: u64,
    unreported_stall: Option<Instant>,
    snapshot_tx: watch::Sender<Snapshot>,
    events: broadcast::Sender<Event>,
    commands_rx: mpsc::Receiver<Command>,
    commands_tx: mpsc::Sender<Command>,
    exe: PathBuf,
    argv: Vec<std::ffi::OsString>,
    upgrade: upgrade::Upgrade,
    last_rss_check: Option<Instant>,
    cpu_recent_queue: bool,
    cpu_idle_ticks: u32,
    /// Version of the binary this one took over from (binary upgrade).
    upgraded_from: Option<String>,
}

/// Idle ticks between CPU baselines (10 ticks of 100 ms by default).
const CPU_IDLE_SAMPLE_TICKS: u32 = 10;

/// How often workers' memory is compared with `worker.max_rss`.
const RSS_CHECK_EVERY: Duration = Duration::from_secs(1);

fn scale_params(config: &Config) -> ScaleParams {
    ScaleParams {
        min: config.pool.min,
        max: config.pool.max,
        interval: config.scale.interval,
        cooldown: config.scale.cooldown,
        window: config.scale.window,
        cpu_guard: config.scale.cpu_guard,
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

impl WorkerPlan {
    fn new(
        config: &Config,
        listeners: &[Listener],
        notify_address: &str,
        instance: &str,
    ) -> Result<WorkerPlan, String> {
        let w = &config.worker;
        let credentials = Credentials::resolve(w.user.as_deref(), w.group.as_deref())
            .map_err(|e| format!("worker user/group: {e}"))?;
        let mut env: Vec<(String, String)> =
            std::env::vars().filter(|(k, _)| !private_env(k)).collect();
        for (k, v) in &w.environment {
            env.retain(|(key, _)| key != k);
            env.push((k.clone(), v.clone()));
        }
        env.push(("LISTEN_FDS".into(), listeners.len().to_string()));
        env.push((
            "LISTEN_FDNAMES".into(),
            listeners
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(":"),
        ));
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
        .map_err(|e| e.to_string())?;
        Ok(WorkerPlan {
            argv: w.command.clone(),
            env,
            credentials,
        })
    }
}

impl Supervisor {
    pub fn new(mut setup: Setup) -> anyhow::Result<Supervisor> {
        let restored = setup.restored.take();
        let w = &setup.config.worker;
        let workers = Credentials::resolve(w.user.as_deref(), w.group.as_deref()).unwrap_or(None);
        let notify = match &restored {
            Some((state, _)) if state.notify.address.is_empty() => {
                NotifySocket::open(&setup.instance, workers.as_ref())?
            }
            Some(_) => {
                let (state, fd) = restored
                    .as_ref()
                    .map(|(s, fd)| (s, fd.try_clone()))
                    .expect("some");
                NotifySocket::from_fd(fd?, state.notify.address.clone(), workers.as_ref())?
            }
            None => NotifySocket::open(&setup.instance, workers.as_ref())?,
        };
        let plan = WorkerPlan::new(
            &setup.config,
            &setup.listeners,
            &notify.address,
            &setup.instance,
        )
        .map_err(anyhow::Error::msg)?;
        let now = Instant::now();
        let config = setup.config;
        let gate = SpawnGate::new(
            config.pool.spawn_rate,
            config.pool.max,
            config.worker.restart_delay,
            config.worker.restart_delay_max,
            now,
        );
        let (commands_tx, commands_rx) = mpsc::channel(64);
        let (events, _) = broadcast::channel(256);
        let mut sup = Supervisor {
            target: config.initial_workers(),
            scaler: Scaler::new(scale_params(&config)),
            cpu: pool_cpu::PoolCpu::default(),
            config,
            load_config: setup.load_config,
            instance: setup.instance,
            listeners: setup.listeners,
            notify,
            plan,
            pool: Pool::default(),
            generation: 1,
            phase: Phase::Starting,
            fast_stop: false,
            gate,
            rollout: None,
            upward: Upward::from_env(),
            started: now,
            last_failure: None,
            listener_status: Vec::new(),
            counters: Counters::default(),
            journal_seen: Default::default(),
            log_dropped_reported: 0,
            unreported_stall: None,
            snapshot_tx: watch::channel(placeholder_snapshot()).0,
            events,
            commands_rx,
            commands_tx,
            exe: setup.exe,
            argv: setup.argv,
            upgrade: upgrade::Upgrade::default(),
            last_rss_check: None,
            cpu_recent_queue: false,
            // Take a baseline on the very first tick.
            cpu_idle_ticks: CPU_IDLE_SAMPLE_TICKS,
            upgraded_from: None,
        };
        if let Some((state, _)) = restored {
            sup.restore(state, now);
        }
        sup.probe_queues();
        let snap = sup.snapshot();
        sup.snapshot_tx = watch::channel(snap).0;
        Ok(sup)
    }

    /// A handle for control front-ends (D-Bus).
    pub fn handle(&self) -> Handle {
        Handle {
            commands: self.commands_tx.clone(),
            snapshot: self.snapshot_tx.subscribe(),
            events: self.events.clone(),
        }
    }

    /// Runs until the pool has stopped; returns the process exit code.
    pub async fn run(mut self) -> anyhow::Result<i32> {
        let mut sigchld = signal(SignalKind::child())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigquit = signal(SignalKind::quit())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let mut sigusr2 = signal(SignalKind::user_defined2())?;
        let mut sigttin = signal(SignalKind::from_raw(libc::SIGTTIN))?;
        let mut sigttou = signal(SignalKind::from_raw(libc::SIGTTOU))?;
        // Signals stay blocked across an upgrade exec; our handlers are in
        // place now, so let pending ones in.
        if let Err(e) = crate::sys::exec::unblock_signals() {
            warn!("cannot unblock signals: {e}");
        }
        let mut tick = tokio::time::interval(self.config.scale.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

        if self.pool.workers.is_empty() {
            info!(
                instance = %self.instance,
                listeners = %self.listeners.iter().map(|l| format!("{}={}", l.name, l.address)).collect::<Vec<_>>().join(", "),
                "droved {} starting {} workers (min {}, max {})",
                crate::version(),
                self.target,
                self.config.pool.min,
                self.config.pool.max
            );
        } else {
            // Taken over from the previous binary: tell systemd and
            // watchers we are back.
            if self.upgraded_from.take().is_some() {
                let _ = self.events.send(Event::Upgraded {
                    version: crate::version(),
                });
            }
            self.reap();
            let line = self.snapshot().status_line();
            self.upward.ready(&line);
        }
        self.reconcile();
        self.publish();

        loop {
            tokio::select! {
                _ = sigchld.recv() => self.reap(),
                datagram = self.notify.recv_from(|pid| self.pool.workers.contains_key(&Pid::from_raw(pid))) => match datagram {
                    Ok(d) => self.on_datagram(d),
                    Err(e) => warn!("notify socket: {e}"),
                },
                _ = tick.tick() => self.on_tick(),
                _ = sigterm.recv() => self.begin_stop(false, "SIGTERM"),
                _ = sigint.recv() => self.begin_stop(true, "SIGINT"),
                _ = sigquit.recv() => self.begin_stop(true, "SIGQUIT"),
                _ = sighup.recv() => {
                    if let Err(e) = self.reload(None) {
                        error!("reload on SIGHUP rejected: {e}");
                    }
                }
                _ = sigusr2.recv() => self.request_upgrade(None, "SIGUSR2"),
                Some(result) = self.upgrade.results.recv() => self.on_preflight(result),
                _ = sigttin.recv() => self.nudge(1, "SIGTTIN"),
                _ = sigttou.recv() => self.nudge(-1, "SIGTTOU"),
                Some(cmd) = self.commands_rx.recv() => self.on_command(cmd),
            }
            // Cheap: exits may have raced with the event we handled.
            self.reap();
            self.reconcile();
            self.publish();
            if self.phase == Phase::Stopping && self.pool.workers.is_empty() {
                break;
            }
        }
        for l in &self.listeners {
            if let Some(path) = &l.owned_path {
                let _ = std::fs::remove_file(path);
            }
        }
        info!("all workers stopped; droved exits");
        Ok(0)
    }

    // ---- events -------------------------------------------------------

    fn reap(&mut self) {
        let pids: Vec<Pid> = self.pool.workers.keys().copied().collect();
        for pid in pids {
            match process::try_reap(pid) {
                Ok(Some(status)) => self.on_exit(pid, status),
                Ok(None) => {}
                Err(e) => {
                    // ECHILD: not our child any more; forget it rather than loop.
                    warn!(
                        worker_pid = pid.as_raw(),
                        "cannot wait for worker: {e}; forgetting it"
                    );
                    self.pool.workers.remove(&pid);
                }
            }
        }
    }

    fn on_exit(&mut self, pid: Pid, status: ExitStatus) {
        let Some(w) = self.pool.workers.remove(&pid) else {
            return;
        };
        let now = Instant::now();
        let uptime = now.duration_since(w.started);
        self.counters.exited += 1;
        let _ = self.events.send(Event::WorkerExited {
            pid: pid.as_raw() as u32,
            slot: w.slot,
            status: status.to_string(),
            uptime_secs: uptime.as_secs_f64(),
        });
        if let Some((reason, _)) = w.stop {
            let failed = matches!(reason, StopReason::ReadyTimeout | StopReason::Watchdog);
            info!(
                worker_pid = pid.as_raw(),
                slot = w.slot,
                event = "exited",
                "worker {pid} (slot {}) exited with {status} after {:.1} s ({reason})",
                w.slot,
                uptime.as_secs_f64()
            );
            if failed {
                self.note_failed_start(&w, format!("worker {reason}"), now);
            }
            return;
        }
        let never_ready = w.ready_at.is_none();
        // A failed start: the command does not get going. A worker that was
        // ready and then was killed from outside (an operator, the OOM
        // killer) says nothing about the command; backing off for it would
        // only shrink the pool when it is needed.
        let killed_from_outside = matches!(
            status,
            ExitStatus::Signaled(
                Signal::SIGKILL | Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP,
                _
            )
        );
        let failed =
            never_ready || (uptime < self.config.worker.min_uptime && !killed_from_outside);
        if failed {
            let why = format!(
                "worker exited with {status} after {:.1} s{}",
                uptime.as_secs_f64(),
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
                "worker {pid} (slot {}) exited with {status} after {:.1} s; restarting in {} ms{}",
                w.slot,
                uptime.as_secs_f64(),
                delay.as_millis(),
                if self.gate.is_failing() {
                    " (pool is failing)"
                } else {
                    ""
                }
            );
        } else {
            warn!(
                worker_pid = pid.as_raw(),
                slot = w.slot,
                event = "exited",
                "worker {pid} (slot {}) exited with {status} after {:.1} s; restarting",
                w.slot,
                uptime.as_secs_f64()
            );
        }
    }

    /// A start failed: back off, and abort a rollout whose new generation
    /// cannot get ready.
    fn note_failed_start(&mut self, w: &Worker, why: String, now: Instant) -> Duration {
        self.counters.failed_starts += 1;
        let delay = self.gate.record_failure(now);
        self.last_failure = Some(why.clone());
        if let Some(r) = &mut self.rollout
            && w.generation == self.generation
        {
            r.failures += 1;
            if r.failures >= 3 {
                self.abort_rollout(format!(
                    "new generation {} cannot get ready: {why}",
                    self.generation
                ));
            }
        }
        delay
    }

    fn on_datagram(&mut self, d: crate::sys::notify_socket::Datagram) {
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
        if msg.ready && w.state == WorkerState::Starting {
            w.state = WorkerState::Ready;
            w.ready_at = Some(now);
            w.last_ping = now;
            info!(
                worker_pid = pid.as_raw(),
                slot = w.slot,
                event = "ready",
                "worker {pid} (slot {}) ready after {} ms",
                w.slot,
                now.duration_since(w.started).as_millis()
            );
        }
        if msg.watchdog_trigger && w.state == WorkerState::Ready {
            let pid = w.pid;
            self.stop_worker(pid, StopReason::Watchdog, true);
        } else if msg.stopping && w.state != WorkerState::Stopping {
            // The worker leaves by itself (e.g. its own max-requests): count
            // it as stopping so a replacement starts now, not at its exit.
            w.state = WorkerState::Stopping;
            w.stop = Some((StopReason::Lifetime, now));
            info!(
                worker_pid = pid.as_raw(),
                slot = w.slot,
                event = "stopping",
                "worker {pid} is stopping on its own"
            );
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if self.upgrade.exec_due(now) {
            self.exec_upgrade();
        }
        self.upward.watchdog_tick(now);
        for (pid, reason) in self.pool.overdue(
            now,
            self.config.worker.ready_timeout,
            self.config.worker.watchdog,
        ) {
            // A hung worker (watchdog) gets SIGKILL at once, as systemd's
            // watchdog would abort it; one that is merely not ready may be
            // serving requests already: stop it gracefully.
            let hung = reason == StopReason::Watchdog;
            warn!(
                worker_pid = pid.as_raw(),
                event = "timeout",
                "worker {pid}: {reason}; {}",
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
        // A worker that stays up past min_uptime proves the command healthy.
        if self.gate.consecutive_failures > 0
            && self.pool.workers.values().any(|w| {
                w.generation == self.generation
                    && w.ready_at
                        .is_some_and(|t| now.duration_since(t) >= self.config.worker.min_uptime)
            })
        {
            if self.gate.is_failing() {
                info!("workers stay up again; the pool is no longer failing");
            }
            self.gate.record_success();
            self.last_failure = None;
        }
        self.probe_queues();
        self.autoscale(now);
        self.check_journal();
    }

    /// A stalled journal shows in STATUS= (systemd's notify socket still
    /// works) and D-Bus; once it reads again, one warning says what was lost.
    fn check_journal(&mut self) {
        crate::logging::retry_journal();
        let health = crate::logging::journal_health();
        if let Some(t) = health.stalled_since {
            self.unreported_stall.get_or_insert(t);
        }
        if health == std::mem::replace(&mut self.journal_seen, health) {
            return;
        }
        if health.stalled_since.is_none() && health.dropped > self.log_dropped_reported {
            let lost = health.dropped - self.log_dropped_reported;
            let stalled = self
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
                self.log_dropped_reported = health.dropped;
                self.unreported_stall = None;
            }
        }
        self.publish();
    }

    fn probe_queues(&mut self) {
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
    fn queued_total(&self) -> Option<u32> {
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
        let sample_cpu =
            queued || self.cpu_recent_queue || self.cpu_idle_ticks >= CPU_IDLE_SAMPLE_TICKS;
        self.cpu_recent_queue = queued;
        let cpu_busy = if self.config.scale.cpu_guard && sample_cpu {
            self.cpu_idle_ticks = 0;
            self.cpu.sample(self.pool.workers.keys().copied(), now)
        } else {
            self.cpu_idle_ticks += 1;
            None
        };
        if !matches!(self.phase, Phase::Running) {
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

    fn nudge(&mut self, delta: i32, why: &str) {
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
        self.target = new;
    }

    fn begin_stop(&mut self, fast: bool, why: &str) {
        if self.phase == Phase::Stopping && (self.fast_stop || !fast) {
            return;
        }
        info!(
            event = "stop",
            "{why}: {} stop of {} workers",
            if fast { "fast" } else { "graceful" },
            self.pool.workers.len()
        );
        self.phase = Phase::Stopping;
        self.fast_stop = fast;
        if let Some(r) = self.rollout.take() {
            for reply in r.replies {
                let _ = reply.send(Err(ControlError::Stopping));
            }
        }
        let pids: Vec<Pid> = self.pool.workers.keys().copied().collect();
        for pid in pids {
            self.stop_worker(pid, StopReason::Shutdown, fast);
        }
        let line = self.snapshot().status_line();
        self.upward.stopping(&line);
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Scale { n, reply } => {
                let r = if self.phase == Phase::Stopping {
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
            Command::SetLimits { min, max, reply } => {
                let _ = reply.send(self.set_limits(min, max));
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

            Command::ListWorkers { reply } => {
                let now = Instant::now();
                let list = self
                    .pool
                    .workers
                    .values()
                    .map(|w| WorkerInfo {
                        pid: w.pid.as_raw() as u32,
                        slot: w.slot,
                        state: w.state.to_string(),
                        generation: w.generation,
                        age_secs: now.duration_since(w.started).as_secs_f64(),
                        rss_bytes: process::rss_bytes(w.pid).unwrap_or(0),
                        cpu_secs: process::cpu_time(w.pid)
                            .map(|d| d.as_secs_f64())
                            .unwrap_or(0.0),
                        status: w.status_text.clone().unwrap_or_default(),
                    })
                    .collect();
                let _ = reply.send(list);
            }
        }
    }

    fn set_limits(&mut self, min: u32, max: u32) -> Result<(u32, u32), ControlError> {
        if min == 0 || min > max || max > crate::config::MAX_WORKERS {
            return Err(ControlError::OutOfRange(format!(
                "limits must satisfy 1 <= min <= max <= {}; got min {min}, max {max}",
                crate::config::MAX_WORKERS
            )));
        }
        self.config.pool.min = min;
        self.config.pool.max = max;
        self.scaler.set_params(scale_params(&self.config));
        self.gate.set_limits(
            self.config.pool.spawn_rate,
            max,
            self.config.worker.restart_delay,
            self.config.worker.restart_delay_max,
        );
        let clamped = self.target.clamp(min, max);
        if clamped != self.target {
            self.nudge(clamped as i32 - self.target as i32, "new limits");
        }
        info!(event = "limits", "limits set to {min}..{max}");
        Ok((min, max))
    }

    /// Re-reads the config. An invalid one changes nothing; a valid one
    /// applies at once, with a rolling restart if worker settings changed.
    fn reload(
        &mut self,
        reply: Option<oneshot::Sender<Result<(), ControlError>>>,
    ) -> Result<(), String> {
        let fail = |reply: Option<oneshot::Sender<Result<(), ControlError>>>, msg: String| {
            if let Some(r) = reply {
                let _ = r.send(Err(ControlError::ReloadRejected(msg.clone())));
            }
            Err(msg)
        };
        if self.phase == Phase::Stopping {
            return fail(reply, "droved is stopping".into());
        }
        let new = match (self.load_config)() {
            Ok(c) => c,
            Err(e) => return fail(reply, e),
        };
        // Resolve the worker settings before touching anything: an unknown
        // user or a missing command rejects the reload like a parse error.
        let plan =
            match WorkerPlan::new(&new, &self.listeners, &self.notify.address, &self.instance) {
                Ok(p) => p,
                Err(e) => return fail(reply, e),
            };
        if new.listen != self.config.listen {
            warn!(
                "reload: [listen] changes take effect only after a restart; keeping the current sockets"
            );
        }
        self.counters.reloads += 1;
        let worker_changed = new.worker != self.config.worker;
        let old = std::mem::replace(&mut self.config, new);
        self.config.listen = old.listen.clone();
        self.notify.admit(plan.credentials.as_ref());
        self.plan = plan;
        self.scaler.set_params(scale_params(&self.config));
        self.gate.set_limits(
            self.config.pool.spawn_rate,
            self.config.pool.max,
            self.config.worker.restart_delay,
            self.config.worker.restart_delay_max,
        );
        self.target = self
            .target
            .clamp(self.config.pool.min, self.config.pool.max);
        info!(
            event = "reload",
            "configuration reloaded{}",
            if worker_changed {
                "; worker settings changed"
            } else {
                ""
            }
        );
        // Like gunicorn's HUP: always roll the workers, since the app's own
        // code and files may have changed even when drove's config did not.
        self.start_rollout("configuration reloaded", Some(old), reply);
        Ok(())
    }

    fn start_rollout(
        &mut self,
        why: &'static str,
        previous: Option<Config>,
        reply: Option<oneshot::Sender<Result<(), ControlError>>>,
    ) {
        if self.phase == Phase::Stopping {
            if let Some(r) = reply {
                let _ = r.send(Err(ControlError::Stopping));
            }
            return;
        }
        if let Some(r) = &mut self.rollout {
            // Coalesce: a rollout already replaces every older worker; a new
            // request joins it, and a new config joins by bumping the
            // generation so workers started with the old one roll too.
            if previous.is_some() {
                self.generation += 1;
            }
            if let Some(reply) = reply {
                r.replies.push(reply);
            }
            info!(
                "{why}: joined the rollout in progress (generation {})",
                self.generation
            );
            return;
        }
        let floor = self.pool.counts().ready.min(self.target);
        let previous = previous.map(|c| (c, self.generation));
        self.generation += 1;
        info!(
            event = "rollout",
            generation = self.generation,
            "{why}: rolling restart to generation {} ({} workers, keeping at least {floor} ready)",
            self.generation,
            self.pool.counts().active()
        );
        self.phase = Phase::Reloading;
        let line = self.snapshot().status_line();
        self.upward.reloading(&line);
        self.rollout = Some(Rollout {
            floor,
            previous,
            failures: 0,
            replies: reply.into_iter().collect(),
            why,
        });
    }

    fn abort_rollout(&mut self, why: String) {
        let Some(r) = self.rollout.take() else { return };
        error!(
            event = "rollout-aborted",
            "rollout aborted, old workers keep serving: {why}"
        );
        let failed_generation = self.generation;
        if let Some((config, generation)) = r.previous {
            match WorkerPlan::new(
                &config,
                &self.listeners,
                &self.notify.address,
                &self.instance,
            ) {
                Ok(plan) => {
                    self.notify.admit(plan.credentials.as_ref());
                    self.plan = plan
                }
                Err(e) => error!("cannot restore the previous worker settings: {e}"),
            }
            self.config.worker = config.worker;
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
        self.phase = Phase::Running;
        for reply in r.replies {
            let _ = reply.send(Err(ControlError::RolloutFailed(why.clone())));
        }
        let line = self.snapshot().status_line();
        self.upward.ready(&line);
    }

    // ---- actions ------------------------------------------------------

    fn stop_worker(&mut self, pid: Pid, reason: StopReason, kill: bool) {
        let Some(w) = self.pool.workers.get_mut(&pid) else {
            return;
        };
        if w.state == WorkerState::Stopping && (w.killed || !kill) {
            return;
        }
        let sig = if kill {
            Signal::SIGKILL
        } else {
            self.config.worker.stop_signal
        };
        if let Err(e) = process::send_signal(pid, sig) {
            warn!(worker_pid = pid.as_raw(), "cannot signal worker: {e}");
        }
        debug!(
            worker_pid = pid.as_raw(),
            slot = w.slot,
            "sent {} ({reason})",
            sig.as_str()
        );
        if w.stop.is_none() {
            w.stop = Some((reason, Instant::now()));
        }
        w.state = WorkerState::Stopping;
        w.killed |= kill;
    }

    /// Forks `n` workers, then confirms each exec: the children exec in
    /// parallel instead of one after another (a jump to max is one step).
    fn spawn_workers(&mut self, n: u32, now: Instant) {
        let mut pending = Vec::new();
        for _ in 0..n {
            let slot = self.pool.free_slot();
            let mut env = self.plan.env.clone();
            env.push(("DROVE_WORKER".into(), slot.to_string()));
            env.push(("DROVE_GENERATION".into(), self.generation.to_string()));
            let spec = SpawnSpec {
                argv: &self.plan.argv,
                env,
                working_directory: self.config.worker.working_directory.as_deref(),
                credentials: self.plan.credentials.as_ref(),
                listeners: self.listeners.iter().map(|l| l.as_fd()).collect(),
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
                Ok(_) => self.worker_started(pid, now),
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

    fn worker_started(&mut self, pid: Pid, now: Instant) {
        self.counters.spawned += 1;
        let exec_ready = self.config.worker.ready == ReadyMode::Exec;
        let lifetime = self.config.worker.max_lifetime;
        let jitter = self.config.worker.max_lifetime_jitter;
        let Some(w) = self.pool.workers.get_mut(&pid) else {
            return;
        };
        if exec_ready {
            w.state = WorkerState::Ready;
            w.ready_at = Some(now);
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

    /// Forks or retires workers until the pool matches the target (and the
    /// rollout, if one runs, makes progress).
    fn reconcile(&mut self) {
        if self.phase == Phase::Stopping {
            return;
        }
        let now = Instant::now();
        self.recycle(now);
        let generation = self.generation;
        let current_active = self
            .pool
            .workers
            .values()
            .filter(|w| w.is_staying(generation))
            .count() as u32;
        let current_starting = self
            .pool
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Starting && w.generation == generation)
            .count() as u32;

        // Spawn current-generation workers up to the target; during a
        // rollout, one at a time beside the old ones (batch of 1).
        let mut want = self.target.saturating_sub(current_active);
        if self.rollout.is_some() {
            want = want.min(1u32.saturating_sub(current_starting));
        }
        let allowed = self.gate.available(now).min(want);
        if allowed > 0 {
            self.spawn_workers(allowed, now);
        }

        // Outdated workers: starting ones go at once; ready ones one by one
        // as new ones become ready, never dropping below the floor.
        let outdated = self.pool.outdated(generation);
        if let Some(r) = &self.rollout {
            let floor = r.floor;
            for pid in outdated {
                let ready = self.pool.counts().ready;
                let w = &self.pool.workers[&pid];
                if w.state == WorkerState::Starting || ready > floor {
                    self.stop_worker(pid, StopReason::Rollout, false);
                }
            }
            // Done when the new generation serves at full size, not merely
            // when the old one is gone (a rollout begun with nothing ready
            // would otherwise "finish" at once and report READY=1 falsely).
            if self.pool.outdated(generation).is_empty()
                && self.pool.ready_in(generation) >= self.target
            {
                self.finish_rollout();
            }
        }

        // Too many current workers (scale down).
        let counts_active = self
            .pool
            .workers
            .values()
            .filter(|w| w.is_staying(generation))
            .count() as u32;
        if counts_active > self.target {
            let excess = (counts_active - self.target) as usize;
            for pid in self
                .pool
                .pick_to_retire(excess, process::is_waiting_for_connection)
            {
                self.stop_worker(pid, StopReason::ScaleDown, false);
            }
        }

        if self.phase == Phase::Starting
            && self.pool.counts().ready >= self.target.min(self.config.initial_workers())
        {
            self.phase = Phase::Running;
            let line = self.snapshot().status_line();
            info!(event = "ready", "pool ready: {line}");
            self.upward.ready(&line);
        }
    }

    /// Recycling (max_lifetime, max_rss), one worker at a time and gated
    /// on readiness like a rollout: the due worker keeps serving, a
    /// replacement starts (the due one no longer counts toward the
    /// target), and only once that one is ready does the old one get its
    /// stop signal.
    fn recycle(&mut self, now: Instant) {
        if self.rollout.is_some() {
            return; // a rollout replaces everyone anyway
        }
        let generation = self.generation;
        if let Some(w) = self
            .pool
            .workers
            .values()
            .find(|w| w.is_active() && w.replace.is_some())
        {
            let (pid, reason) = (w.pid, w.replace.expect("checked"));
            let ready_staying = self
                .pool
                .workers
                .values()
                .filter(|w| w.is_staying(generation) && w.state == WorkerState::Ready)
                .count() as u32;
            if ready_staying >= self.target {
                self.stop_worker(pid, reason, false);
            }
            return;
        }
        let check_rss = self.config.worker.max_rss.is_some()
            && self
                .last_rss_check
                .is_none_or(|t| now.duration_since(t) >= RSS_CHECK_EVERY);
        if check_rss {
            self.last_rss_check = Some(now);
        }
        let max_rss = self.config.worker.max_rss.unwrap_or(u64::MAX);
        let due = self
            .pool
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Ready && w.generation == generation)
            .find_map(|w| {
                if w.recycle_at.is_some_and(|t| now >= t) {
                    return Some((w.pid, StopReason::Lifetime, String::new()));
                }
                if check_rss {
                    let rss = process::rss_bytes(w.pid).unwrap_or(0);
                    if rss > max_rss {
                        let detail = format!(" ({} MiB > {} MiB)", rss >> 20, max_rss >> 20);
                        return Some((w.pid, StopReason::Memory, detail));
                    }
                }
                None
            });
        if let Some((pid, reason, detail)) = due {
            info!(
                worker_pid = pid.as_raw(),
                event = "recycle",
                "worker {pid}: {reason}{detail}; starting its replacement"
            );
            if let Some(w) = self.pool.workers.get_mut(&pid) {
                w.replace = Some(reason);
            }
        }
    }

    fn finish_rollout(&mut self) {
        let Some(r) = self.rollout.take() else { return };
        info!(
            event = "rollout-done",
            generation = self.generation,
            "rolling restart done ({}): generation {} serving",
            r.why,
            self.generation
        );
        self.phase = Phase::Running;
        let _ = self.events.send(Event::Reloaded {
            generation: self.generation,
        });
        for reply in r.replies {
            let _ = reply.send(Ok(()));
        }
        let line = self.snapshot().status_line();
        self.upward.ready(&line);
    }

    fn snapshot(&self) -> Snapshot {
        let counts = self.pool.counts();
        Snapshot {
            instance: self.instance.clone(),
            version: crate::version(),
            pid: std::process::id(),
            phase: self.phase,
            failing: self.gate.is_failing(),
            failure: self.last_failure.clone().filter(|_| self.gate.is_failing()),
            generation: self.generation,
            min: self.config.pool.min,
            max: self.config.pool.max,
            target: self.target,
            ready: counts.ready,
            starting: counts.starting,
            stopping: counts.stopping,
            listeners: self.listener_status.clone(),
            queued: self.queued_total(),
            last_scale: self.scaler.last_decision().map(|d| d.to_string()),
            spawned: self.counters.spawned,
            exited: self.counters.exited,
            failed_starts: self.counters.failed_starts,
            reloads: self.counters.reloads,
            upgrades: self.counters.upgrades,
            uptime_secs: self.started.elapsed().as_secs_f64(),
            journal_stalled: self.journal_seen.stalled_since.is_some(),
            log_dropped: self.journal_seen.dropped,
        }
    }

    fn publish(&mut self) {
        let snap = self.snapshot();
        // STATUS= also before READY=1: `systemctl status` then says why a
        // unit hangs in "activating" (e.g. a failing worker command).
        self.upward.status(&snap.status_line());
        self.snapshot_tx.send_if_modified(|old| {
            // uptime always moves; only wake watchers on real changes.
            let mut a = old.clone();
            a.uptime_secs = snap.uptime_secs;
            let changed = a != snap;
            *old = snap;
            changed
        });
    }
}

fn placeholder_snapshot() -> Snapshot {
    Snapshot {
        instance: String::new(),
        version: String::new(),
        pid: 0,
        phase: Phase::Starting,
        failing: false,
        failure: None,
        generation: 0,
        min: 0,
        max: 0,
        target: 0,
        ready: 0,
        starting: 0,
        stopping: 0,
        listeners: vec![],
        queued: None,
        last_scale: None,
        spawned: 0,
        exited: 0,
        failed_starts: 0,
        reloads: 0,
        upgrades: 0,
        journal_stalled: false,
        log_dropped: 0,
        uptime_secs: 0.0,
    }
}

/// Where a unix listener's socket file lives, for cleanup by callers.
pub fn owned_paths(listeners: &[Listener]) -> Vec<PathBuf> {
    listeners
        .iter()
        .filter_map(|l| l.owned_path.clone())
        .collect()
}
