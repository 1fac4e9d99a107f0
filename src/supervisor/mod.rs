//! The supervisor: the one owner of the pool state, and its event loop.
//!
//! Everything arrives as an event on one task: child exits (SIGCHLD),
//! notify datagrams, signals, control commands and the scale tick. Each
//! event updates the state, then [`Supervisor::reconcile`] forks or retires
//! workers to match the target, and [`Supervisor::publish`] tells systemd,
//! the log and watchers what changed. No locks: one task owns it all.
//!
//! Where to look:
//! - `lifecycle`: droved's own states (starting, running, rolling,
//!   upgrading, stopping) and what systemd hears on each change;
//! - `plan`: the pool's decisions, pure (forks, stops, exit verdicts);
//! - `reconcile`: carries out those decisions, incl. recycling;
//! - `reap`: every exited child, known or not, to its accounting;
//! - `workers`: forking, stopping, exits and notify datagrams of workers;
//! - `rollout`: reload and rolling restarts; `upgrade`: binary upgrade;
//! - `commands`: D-Bus commands, signals for scaling and stopping;
//! - `tick`: timers, queue probes, autoscaling, the journal's health;
//! - `activity`: busy and idle workers, from the kernel;
//! - `pool`, `gate`, `pool_cpu`, `status`, `control`, `systemd`: the data
//!   and the vocabulary these share.

pub mod activity;
mod commands;
pub mod control;
pub mod environment;
pub mod gate;
pub mod lifecycle;
mod memory_watch;
pub mod ondemand;
pub mod plan;
pub mod pool;
pub mod pool_cpu;
mod reap;
mod reconcile;
mod rollout;
pub mod status;
pub mod systemd;
pub mod template;
mod template_io;
mod tick;
mod upgrade;
mod workers;

use std::path::PathBuf;
use std::time::Instant;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::handover::Counters;
use crate::oneline::OneLine;
use crate::scale::{ScaleParams, Scaler};
use crate::sys::listen::Listener;
use crate::sys::notify_socket::NotifySocket;

use control::{Command, Event};
use gate::SpawnGate;
use lifecycle::{Announcement, Lifecycle};
use pool::Pool;
use status::{ListenerStatus, Phase, Snapshot};
use systemd::Upward;
use workers::WorkerPlan;

/// Re-reads the configuration (file plus command-line overrides) on reload.
pub type ConfigLoader = Box<dyn Fn() -> Result<Config, LoadFailure> + Send>;

/// Why a reload could not load the configuration: `detail` for droved's
/// journal, `public` for D-Bus callers, which names the file, line and key
/// but quotes no value from the file (it may hold secrets).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{detail}")]
pub struct LoadFailure {
    pub detail: String,
    pub public: String,
}

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
    /// The listeners came from systemd socket activation (a .socket unit).
    pub socket_activated: bool,
    /// Prometheus metrics: the supervisor only feeds them (`crate::metrics`).
    pub metrics: crate::metrics::Metrics,
}

/// Why the supervisor cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot create the workers' notify socket: {0}")]
    NotifySocket(std::io::Error),
    #[error(transparent)]
    Workers(#[from] workers::PlanError),
    #[error("cannot install a signal handler: {0}")]
    Signals(std::io::Error),
}

/// The daemon's side of the control channel: commands in, state out.
#[derive(Clone)]
pub struct Handle {
    pub commands: mpsc::Sender<Command>,
    pub snapshot: watch::Receiver<Snapshot>,
    pub events: broadcast::Sender<Event>,
}

pub struct Supervisor {
    /// droved's own state; changed only through [`Supervisor::enter`].
    lifecycle: Lifecycle,
    config: Config,
    load_config: ConfigLoader,
    instance: String,
    listeners: Vec<Listener>,
    notify: NotifySocket,
    plan: WorkerPlan,
    pool: Pool,
    target: u32,
    generation: u64,
    gate: SpawnGate,
    scaler: Scaler,
    /// The workers' CPU use, for the scaler's cpu-bound guard.
    cpu: pool_cpu::PoolCpu,
    upward: Upward,
    started: Instant,
    last_failure: Option<String>,
    listener_status: Vec<ListenerStatus>,
    counters: Counters,
    /// Where the OOM killer's count for droved's cgroup is, if readable,
    /// and the kills not yet matched to a worker's exit.
    oom_counter: Option<std::path::PathBuf>,
    oom: plan::OomLedger,
    journal: tick::JournalWatch,
    cpu_sampling: tick::CpuSampling,
    /// The scale tick's own cost, logged at debug (see `tick::TickTimes`).
    tick_times: tick::TickTimes,
    /// A regular tick is being handled, since then.
    tick_began: Option<Instant>,
    /// The wake on a burst's first connection, and the early ticks after it.
    arrival: tick::Arrival,
    /// Workers' owned memory, for `worker.max_rss`.
    memory: memory_watch::MemoryWatch,
    /// Which ready workers are busy (hold a connection), last sampled.
    activity: activity::Activity,
    /// The listeners' keys for `activity`, worked out at the first sample.
    activity_keys: Option<activity::Keys>,
    snapshot_tx: watch::Sender<Snapshot>,
    events: broadcast::Sender<Event>,
    commands_rx: mpsc::Receiver<Command>,
    commands_tx: mpsc::Sender<Command>,
    exe: PathBuf,
    argv: Vec<std::ffi::OsString>,
    preflight_tx: mpsc::Sender<upgrade::PreflightResult>,
    preflight_rx: mpsc::Receiver<upgrade::PreflightResult>,
    /// The new binary as its preflight opened and ran it; the upgrade execs
    /// this very file (see `sys::exec::Image`).
    checked_image: Option<crate::sys::exec::Image>,
    /// pool.min and pool.max as the config file says (SetLimits may move
    /// `config.pool`): the bounds a control.group member stays within.
    file_limits: (u32, u32),
    /// Version of the binary this one took over from (binary upgrade).
    upgraded_from: Option<String>,
    /// Template mode: the current template's socket.
    template_io: template_io::TemplateIo,
    /// Template mode: what forked workers did before they were named.
    early: template_io::Early,
    /// Template mode: when to look for forks of a lost template.
    stray_checks: Vec<Instant>,
    /// Templates lost with forks unanswered: where their forks are.
    stray_sessions: Vec<template::LostTemplate>,
    /// Workers and templates, each held by a pidfd until reaped: every
    /// signal droved sends them goes through it.
    children: crate::sys::process::Signallable,
    /// pool.min = 0: the watch for a connection at zero workers, idle exit.
    on_demand: ondemand::OnDemand,
    /// Prometheus metrics, fed by one-line hooks at the events.
    metrics: crate::metrics::Metrics,
}

fn scale_params(config: &Config) -> ScaleParams {
    ScaleParams {
        min: config.pool.min,
        max: config.pool.max,
        interval: config.scale.interval,
        cooldown: config.scale.cooldown,
        window: config.scale.window,
        cpu_guard: config.scale.cpu_guard,
        spare: config.pool.spare,
    }
}

impl Supervisor {
    pub fn new(mut setup: Setup) -> Result<Supervisor, SetupError> {
        let restored = setup.restored.take();
        // Once: the notify socket's group and the workers' plan both need them.
        let workers = workers::resolve_credentials(&setup.config)?;
        let notify = match &restored {
            Some((state, fd)) if !state.notify.address.is_empty() => {
                let fd = fd.try_clone().map_err(SetupError::NotifySocket)?;
                NotifySocket::from_fd(fd, state.notify.address.clone(), workers.as_ref())
            }
            _ => NotifySocket::open(&setup.instance, workers.as_ref()),
        }
        .map_err(SetupError::NotifySocket)?;
        let plan = WorkerPlan::new(
            &setup.config,
            workers,
            &setup.listeners,
            &notify.address,
            &setup.instance,
        )?;
        let now = Instant::now();
        let config = setup.config;
        let file_limits = (config.pool.min, config.pool.max);
        let gate = SpawnGate::new(
            config.pool.spawn_rate,
            config.pool.max,
            config.worker.restart_delay,
            config.worker.restart_delay_max,
            now,
        );
        let (commands_tx, commands_rx) = mpsc::channel(64);
        let (preflight_tx, preflight_rx) = mpsc::channel(4);
        let (events, _) = broadcast::channel(256);
        let mut sup = Supervisor {
            lifecycle: Lifecycle::Starting,
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
            gate,
            upward: Upward::from_env(),
            started: now,
            last_failure: None,
            listener_status: Vec::new(),
            counters: Counters::default(),
            oom_counter: None,
            oom: plan::OomLedger::default(),
            journal: Default::default(),
            cpu_sampling: Default::default(),
            tick_times: tick::TickTimes::new(now),
            tick_began: None,
            arrival: Default::default(),
            memory: memory_watch::MemoryWatch::default(),
            activity: Default::default(),
            activity_keys: None,
            snapshot_tx: watch::channel(Snapshot::default()).0,
            events,
            commands_rx,
            commands_tx,
            exe: setup.exe,
            argv: setup.argv,
            preflight_tx,
            preflight_rx,
            checked_image: None,
            file_limits,
            upgraded_from: None,
            template_io: None,
            early: Default::default(),
            stray_checks: Vec::new(),
            stray_sessions: Vec::new(),
            children: Default::default(),
            on_demand: ondemand::OnDemand::new(setup.socket_activated),
            metrics: setup.metrics,
        };
        if let Some((state, _)) = restored {
            sup.restore(state, now);
        }
        // The baseline: kills counted before now are no worker's of ours.
        sup.oom_counter = crate::sys::cgroup::oom_counter();
        let count = sup
            .oom_counter
            .as_deref()
            .and_then(crate::sys::cgroup::read_oom_kills);
        sup.oom.note(count, now);
        sup.probe_queues();
        let snap = sup.snapshot();
        sup.snapshot_tx = watch::channel(snap).0;
        Ok(sup)
    }

    /// droved's runtime directory (where the notify socket is, and the
    /// private control socket goes), and whether droved removes it when
    /// done; `None` when the notify socket is abstract.
    pub fn runtime_dir(&self) -> Option<(PathBuf, bool)> {
        self.notify
            .directory()
            .map(|(dir, remove)| (dir.to_path_buf(), remove))
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
    pub async fn run(mut self) -> Result<i32, SetupError> {
        let on = |kind: SignalKind| signal(kind).map_err(SetupError::Signals);
        let mut sigchld = on(SignalKind::child())?;
        let mut sigterm = on(SignalKind::terminate())?;
        let mut sigint = on(SignalKind::interrupt())?;
        let mut sigquit = on(SignalKind::quit())?;
        let mut sighup = on(SignalKind::hangup())?;
        let mut sigusr2 = on(SignalKind::user_defined2())?;
        let mut sigttin = on(SignalKind::from_raw(libc::SIGTTIN))?;
        let mut sigttou = on(SignalKind::from_raw(libc::SIGTTOU))?;
        // Signals stay blocked across an upgrade exec; our handlers are in
        // place now, so let pending ones in.
        if let Err(e) = crate::sys::exec::unblock_signals() {
            warn!("cannot unblock signals: {e}");
        }
        let mut tick = tokio::time::interval(self.config.scale.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

        if let Some(from) = self.upgraded_from.take() {
            // Taken over from the previous binary: tell watchers we are
            // back, now that front-ends listen.
            let _ = self.events.send(Event::Upgraded {
                version: crate::version(),
            });
            info!("took over from {from}");
            self.reap();
        } else {
            info!(
                instance = %self.instance,
                listeners = %self.listeners.iter().map(|l| format!("{}={}", l.name, l.address)).collect::<Vec<_>>().join(", "),
                "droved {} starting {} workers (min {}, max {})",
                crate::version(),
                self.target,
                self.config.pool.min,
                self.config.pool.max
            );
        }
        self.reconcile();
        self.track_zero(Instant::now());
        self.publish();
        self.metrics.heartbeat(self.config.scale.interval);

        loop {
            tokio::select! {
                _ = sigchld.recv() => self.reap(),
                (pid, msg) = template_io::recv(&self.template_io) => self.on_template_message(pid, msg),
                // Template mode: while forks are unanswered, a worker may
                // notify before its template names it; it is kept for then.
                datagram = self.notify.recv_from(|pid| {
                    self.pool.workers.contains_key(&nix::unistd::Pid::from_raw(pid))
                        || !self.pool.templates.forks.is_empty()
                }) => match datagram {
                    Ok(d) => self.on_datagram(d),
                    Err(e) => warn!("notify socket: {e}"),
                },
                _ = tick.tick() => self.on_tick(),
                _ = self.arrival.watch.arrived() => self.on_arrival(),
                _ = tick::sleep_until(self.arrival.next) => self.on_early_tick(),
                _ = sigterm.recv() => self.request_stop(false, "SIGTERM"),
                _ = sigint.recv() => self.request_stop(true, "SIGINT"),
                _ = sigquit.recv() => self.request_stop(true, "SIGQUIT"),
                _ = tick::sleep_until(self.lifecycle.drain_until()) => {
                    self.begin_stop(false, "stop.delay over");
                }
                _ = sighup.recv() => {
                    if let Err(e) = self.reload(None) {
                        error!("reload on SIGHUP rejected: {e}");
                    }
                }
                _ = sigusr2.recv() => self.request_upgrade(None, "SIGUSR2"),
                Some(result) = self.preflight_rx.recv() => self.on_preflight(result),
                _ = sigttin.recv() => self.nudge(1, "SIGTTIN"),
                _ = sigttou.recv() => self.nudge(-1, "SIGTTOU"),
                Some(cmd) = self.commands_rx.recv() => self.on_command(cmd),
                // pool.min = 0: a connection waits and the pool is empty.
                _ = self.on_demand.watch.arrived() => self.on_connection_waiting(),
            }
            // Cheap: exits may have raced with the event we handled.
            self.reap();
            self.reconcile();
            self.track_zero(Instant::now());
            self.publish();
            self.metrics.heartbeat(self.config.scale.interval);
            if let Some(began) = self.tick_began.take() {
                self.tick_times.record(began.elapsed(), Instant::now());
            }
            if self.lifecycle.is_stopping()
                && self.pool.workers.is_empty()
                && self.pool.templates.all.is_empty()
            {
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

    /// The one way droved changes state: swaps in `next`, tells systemd
    /// what the change means (see [`lifecycle::announcement`]) and
    /// publishes the new State on D-Bus. Returns the state left, whose
    /// data (waiting callers) the caller settles.
    fn enter(&mut self, next: Lifecycle) -> Lifecycle {
        let old = std::mem::replace(&mut self.lifecycle, next);
        let (from, to) = (old.phase(), self.lifecycle.phase());
        let line = OneLine::new(&self.snapshot().status_line());
        match lifecycle::announcement(from, to) {
            Announcement::Ready => self.upward.ready(&line),
            Announcement::Reloading => self.upward.reloading(&line),
            Announcement::Stopping => self.upward.stopping(&line),
            Announcement::Nothing => {}
        }
        if from != to {
            info!(event = "state", "state {from} -> {to}");
        }
        self.publish();
        old
    }

    fn phase(&self) -> Phase {
        self.lifecycle.phase()
    }

    fn snapshot(&self) -> Snapshot {
        let counts = self.pool.counts();
        let activity = self
            .activity
            .counts()
            .map(|c| activity::within(c, counts.ready));
        Snapshot {
            instance: self.instance.clone(),
            version: crate::version(),
            pid: std::process::id(),
            phase: self.phase(),
            failing: self.gate.is_failing(),
            // Worker or template text may be in it: one line, bounded.
            failure: self
                .last_failure
                .as_deref()
                .filter(|_| self.gate.is_failing())
                .map(|f| OneLine::new(f).into_string()),
            generation: self.generation,
            min: self.config.pool.min,
            max: self.config.pool.max,
            target: self.target,
            ready: counts.ready,
            starting: counts.starting,
            stopping: counts.stopping,
            busy: activity.map(|(busy, _)| busy),
            idle: activity.map(|(_, idle)| idle),
            listeners: self.listener_status.clone(),
            queued: self.queued_total(),
            demand: self.scaler.demand(),
            last_scale: self.scaler.last_decision().map(|d| d.to_string()),
            spawned: self.counters.spawned,
            exited: self.counters.exited,
            failed_starts: self.counters.failed_starts,
            reloads: self.counters.reloads,
            upgrades: self.counters.upgrades,
            uptime_secs: self.started.elapsed().as_secs_f64(),
            journal_stalled: self.journal.seen.stalled_since.is_some(),
            log_dropped: self.journal.seen.dropped,
            template: self.template_summary(),
        }
    }

    fn publish(&mut self) {
        let snap = self.snapshot();
        // STATUS= also before READY=1: `systemctl status` then says why a
        // unit hangs in "activating" (e.g. a failing worker command).
        self.upward.status(&OneLine::new(&snap.status_line()));
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
