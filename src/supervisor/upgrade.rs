//! Binary upgrade: open the binary on disk, preflight that file, hand the
//! state over, and exec the same file in place (what was checked is what
//! runs, whatever replaces the path meanwhile). Same pid, so systemd's MainPID never changes, the
//! workers stay our children (their exits wait as zombies across the exec,
//! nothing is lost), and the listening sockets are never closed.
//!
//! Per state (see `lifecycle`): requests while an upgrade is in flight join
//! it (one exec answers them all); requests during a rolling restart or a
//! stop are refused with the reason, since both would have to be handed
//! over half-done; a reload during an upgrade is refused likewise. A stop
//! during the preflight drops the upgrade (callers get an error); a stop
//! once the exec is due execs now and hands the stop over.

use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::Supervisor;
use super::control::ControlError;
use super::lifecycle::{Lifecycle, Reply, Upgrade, UpgradeStage};
use super::ondemand;
use super::pool::Worker;
use crate::handover::{self, Resume, State};
use crate::sys::{exec, process};

/// How long the new binary may take to answer `--preflight`.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(15);
/// Delay between answering the callers and exec, so their replies reach
/// the bus before this image (and its connection) is gone.
const EXEC_DELAY: Duration = Duration::from_millis(200);

/// The new binary's version and the opened file that gave it, or why it
/// was refused.
pub(super) type PreflightResult = Result<(String, exec::Image), PreflightError>;

/// Why the new binary was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum PreflightError {
    #[error("cannot run {}: {error}", .exe.display())]
    Run {
        exe: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("{} --preflight did not finish within {PREFLIGHT_TIMEOUT:?}", .0.display())]
    Timeout(std::path::PathBuf),
    #[error("{} --preflight failed ({status}){}{detail}", .exe.display(), if .detail.is_empty() { "" } else { ": " })]
    Failed {
        exe: std::path::PathBuf,
        status: std::process::ExitStatus,
        detail: String,
    },
    #[error(transparent)]
    Handover(#[from] handover::PreflightLineError),
}

fn age_ms(now: Instant, t: Instant) -> u64 {
    now.saturating_duration_since(t).as_millis() as u64
}

impl Supervisor {
    pub(super) fn request_upgrade(&mut self, reply: Option<Reply>, why: &str) {
        let refuse = |reply: Option<Reply>, msg: &str| {
            warn!(event = "upgrade-refused", "{why}: upgrade refused: {msg}");
            if let Some(r) = reply {
                let _ = r.send(Err(ControlError::UpgradeRefused(msg.to_string())));
            }
        };
        let from_starting = match &mut self.lifecycle {
            Lifecycle::Stopping { .. } | Lifecycle::Draining { .. } => {
                return refuse(reply, "droved is stopping");
            }
            Lifecycle::Rolling(_) => {
                return refuse(
                    reply,
                    "a rolling restart is in progress; retry when it has finished",
                );
            }
            Lifecycle::Upgrading(Upgrade {
                stage: UpgradeStage::Handing { .. },
                ..
            }) => {
                // Preflight passed and its callers were answered: this
                // request is served by the exec about to happen.
                info!("{why}: the upgrade is about to happen");
                if let Some(r) = reply {
                    let _ = r.send(Ok(()));
                }
                return;
            }
            Lifecycle::Upgrading(Upgrade {
                stage: UpgradeStage::Preflight { replies },
                ..
            }) => {
                replies.extend(reply);
                info!("{why}: joined the upgrade in progress");
                return;
            }
            Lifecycle::Starting => true,
            Lifecycle::Running => false,
        };
        info!(
            event = "upgrade",
            "{why}: checking {} before re-executing it",
            self.exe.display()
        );
        self.enter(Lifecycle::Upgrading(Upgrade {
            stage: UpgradeStage::Preflight {
                replies: reply.into_iter().collect(),
            },
            from_starting,
        }));
        let exe = self.exe.clone();
        let args: Vec<_> = self.argv.iter().skip(1).cloned().collect();
        let tx = self.preflight_tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(preflight(&exe, &args).await).await;
        });
    }

    pub(super) fn on_preflight(&mut self, result: PreflightResult) {
        let Lifecycle::Upgrading(Upgrade {
            stage: UpgradeStage::Preflight { replies },
            from_starting,
        }) = &mut self.lifecycle
        else {
            // The upgrade was dropped meanwhile (a stop): nothing to do.
            info!(
                "preflight result ignored: droved is {}",
                self.lifecycle.phase()
            );
            return;
        };
        let from_starting = *from_starting;
        let replies = std::mem::take(replies);
        match result {
            Err(msg) => {
                self.metrics.upgrade(crate::metrics::UpgradeResult::Refused);
                error!(
                    event = "upgrade-refused",
                    "upgrade refused, still running {}: {msg}",
                    crate::version()
                );
                self.enter(Lifecycle::settled(from_starting));
                for r in replies {
                    let _ = r.send(Err(ControlError::UpgradeRefused(msg.to_string())));
                }
            }
            Ok((version, image)) => {
                info!(
                    event = "upgrade",
                    "preflight passed; re-executing as {version}"
                );
                self.checked_image = Some(image);
                if replies.is_empty() && self.pool.templates.forks.is_empty() {
                    // Nobody waits for an answer (SIGUSR2): exec right away.
                    self.exec_upgrade(None);
                    return;
                }
                // With callers, give their replies time to leave; without,
                // exec at the first tick that owes no fork of the template.
                let delay = if replies.is_empty() {
                    Duration::ZERO
                } else {
                    EXEC_DELAY
                };
                for r in replies {
                    let _ = r.send(Ok(()));
                }
                self.enter(Lifecycle::Upgrading(Upgrade {
                    stage: UpgradeStage::Handing {
                        exec_at: Instant::now() + delay,
                    },
                    from_starting,
                }));
            }
        }
    }

    fn capture(&self, notify_fd: i32, now: Instant) -> State {
        let resume = match &self.lifecycle {
            Lifecycle::Upgrading(u) if u.from_starting => Resume::Starting,
            Lifecycle::Starting => Resume::Starting,
            _ => Resume::Running,
        };
        State {
            from_version: crate::version(),
            instance: self.instance.clone(),
            generation: self.generation,
            target: self.target,
            listeners: self
                .listeners
                .iter()
                .map(|l| handover::ListenerState {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&l.fd),
                    name: l.name.clone(),
                    address: l.address.clone(),
                    owned_path: l.owned_path.clone(),
                })
                .collect(),
            notify: handover::NotifyState {
                fd: notify_fd,
                address: self.notify.address.clone(),
            },
            workers: self
                .pool
                .workers
                .values()
                .map(|w| handover::WorkerState {
                    pid: w.pid.as_raw(),
                    slot: w.slot,
                    generation: w.generation,
                    state: w.state(),
                    age_ms: age_ms(now, w.started),
                    ready_age_ms: w.ready_at().map(|t| age_ms(now, t)),
                    last_ping_age_ms: age_ms(now, w.last_ping),
                    stop: w.stop().map(|(r, t)| (r, age_ms(now, t))),
                    killed: w.killed(),
                    status_text: w.status_text.clone(),
                    recycle_in_ms: w
                        .recycle_at
                        .map(|t| t.saturating_duration_since(now).as_millis() as u64),
                    watchdog_usec: w.watchdog.map(|d| d.as_micros() as u64),
                })
                .collect(),
            counters: self.counters,
            uptime_ms: age_ms(now, self.started),
            consecutive_failures: self.gate.consecutive_failures,
            resume,
            template: self.template_to_hand_over(now),
            socket_activated: self.on_demand.socket_activated,
            event_counts: self.metrics.event_counts(),
        }
    }

    /// Hands over and execs; `stop` hands over a stop that arrived while
    /// the exec was due. Returns only if exec failed; then droved goes back
    /// to the state it upgraded from and the pool keeps running.
    pub(super) fn exec_upgrade(&mut self, stop: Option<bool>) {
        let Some(image) = self.checked_image.take() else {
            return self.upgrade_failed("no checked binary to execute".into());
        };
        let now = Instant::now();
        let notify_fd = self.notify.raw_fd();
        let mut state = self.capture(notify_fd, now);
        if let Some(fast) = stop {
            state.resume = Resume::Stopping { fast };
        }
        let memfd = match exec::memfd_with(&handover::encode(&state)) {
            Ok(fd) => fd,
            Err(e) => return self.upgrade_failed(format!("cannot write the handover state: {e}")),
        };
        let keep: Vec<std::os::fd::BorrowedFd<'_>> = self
            .listeners
            .iter()
            .map(|l| l.as_fd())
            .chain(std::iter::once(self.notify.borrowed_fd()))
            .chain(
                self.template_io
                    .as_ref()
                    .filter(|_| state.template.is_some())
                    .map(|(_, socket)| socket.as_fd()),
            )
            .collect();
        for fd in &keep {
            if let Err(e) = exec::set_inheritable(*fd, true) {
                for fd in &keep {
                    let _ = exec::set_inheritable(*fd, false);
                }
                return self.upgrade_failed(format!("cannot keep fds across exec: {e}"));
            }
        }
        let env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
            .filter(|(k, _)| {
                !matches!(
                    k.to_str(),
                    Some("LISTEN_FDS" | "LISTEN_PID" | "LISTEN_FDNAMES" | handover::ENV_FD)
                )
            })
            .chain(std::iter::once((
                handover::ENV_FD.into(),
                std::os::fd::AsRawFd::as_raw_fd(&memfd).to_string().into(),
            )))
            .collect();
        info!(
            event = "upgrade-exec",
            "handing {} workers and {} sockets to {}",
            state.workers.len(),
            state.listeners.len(),
            self.exe.display()
        );
        if let Err(e) = exec::block_signals() {
            warn!("cannot block signals for the exec: {e}");
        }
        let err = image.exec(&self.argv, &env);
        // Still here: exec failed. Undo and keep serving.
        let _ = exec::unblock_signals();
        for fd in &keep {
            let _ = exec::set_inheritable(*fd, false);
        }
        drop(memfd);
        self.upgrade_failed(format!("cannot execute {}: {err}", self.exe.display()));
    }

    fn upgrade_failed(&mut self, msg: String) {
        self.metrics.upgrade(crate::metrics::UpgradeResult::Failed);
        error!(
            event = "upgrade-failed",
            "upgrade failed, still running {}: {msg}",
            crate::version()
        );
        let from_starting = matches!(&self.lifecycle, Lifecycle::Upgrading(u) if u.from_starting);
        if matches!(self.lifecycle, Lifecycle::Upgrading(_)) {
            self.enter(Lifecycle::settled(from_starting));
        }
    }

    /// Takes over the pool described by the previous image.
    pub(super) fn restore(&mut self, state: State, now: Instant) {
        let back = |ms: u64| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
        self.generation = state.generation;
        self.target = state.target;
        self.counters = state.counters;
        self.counters.upgrades += 1;
        self.metrics.restore_event_counts(&state.event_counts);
        self.metrics.upgrade(crate::metrics::UpgradeResult::Done);
        self.started = back(state.uptime_ms);
        // This image's config may have other limits: reported, not silent.
        self.bound_target(now);
        self.gate.consecutive_failures = state.consecutive_failures;
        self.on_demand.socket_activated = state.socket_activated;
        if self.config.pool.idle_exit.is_some()
            && let Some(why) = ondemand::idle_exit_refusal(state.socket_activated)
        {
            warn!("{why}; pool.idle_exit is ignored until droved restarts");
        }
        for w in state.workers {
            let pid = nix::unistd::Pid::from_raw(w.pid);
            // Still droved's children across the exec (same pid) and not
            // reaped yet (nothing reaps before this): their pids name them.
            if let Err(e) = self.children.track(pid) {
                warn!(worker_pid = w.pid, "not taking over worker {pid}: {e}");
                continue;
            }
            let mut worker = Worker::new(pid, w.slot, w.generation, back(w.age_ms)).taken_over(
                w.state,
                w.ready_age_ms.map(back),
                w.stop.map(|(r, ms)| (r, back(ms))),
                w.killed,
                now,
            );
            worker.last_ping = back(w.last_ping_age_ms);
            worker.status_text = w.status_text;
            worker.recycle_at = w.recycle_in_ms.map(|ms| now + Duration::from_millis(ms));
            worker.watchdog = w.watchdog_usec.map(Duration::from_micros);
            self.pool.workers.insert(pid, worker);
        }
        if let Some(t) = state.template {
            let started = back(t.age_ms);
            self.restore_template(t, started);
        }
        info!(
            event = "upgraded",
            "droved {} took over {} workers from {} (pid {} unchanged)",
            crate::version(),
            self.pool.workers.len(),
            state.from_version,
            std::process::id()
        );
        // Event::Upgraded goes out from run(), once front-ends listen.
        self.upgraded_from = Some(state.from_version);
        match state.resume {
            // READY=1 again (systemd heard RELOADING=1 from the old image).
            Resume::Running => {
                self.enter(Lifecycle::Running);
            }
            // Still owed: reconcile sends it once the pool is ready.
            Resume::Starting => {}
            // The old image drained nothing (the exec was due): drain here.
            // Not knowing whether the pool had become ready, it drains
            // anyway; `/readyz` says 503 either way.
            Resume::Stopping { fast: false } if !self.config.stop.delay.is_zero() => {
                self.drain("stop received during the upgrade")
            }
            Resume::Stopping { fast } => self.begin_stop(fast, "stop received during the upgrade"),
        }
    }
}

/// Opens `exe` and runs that file with `--preflight ARGS`: the new binary
/// must start, accept the current configuration, and read our handover
/// format. The open file is what the upgrade then execs.
async fn preflight(exe: &std::path::Path, args: &[std::ffi::OsString]) -> PreflightResult {
    let image = exec::Image::open(exe).map_err(|e| PreflightError::Run {
        exe: exe.into(),
        error: e,
    })?;
    let mut cmd = image.command();
    cmd.arg("--preflight")
        .args(args)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    // tokio waits for this child by its pid: droved's sweep of exited
    // children must leave it alone while it does (see sys::process).
    let (child, _held) = process::fork_held(
        || {
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
        },
        |c| c.id().map(|id| nix::unistd::Pid::from_raw(id as i32)),
    )
    .map_err(|e| PreflightError::Run {
        exe: exe.into(),
        error: e,
    })?;
    let output = match tokio::time::timeout(PREFLIGHT_TIMEOUT, child.wait_with_output()).await {
        Err(_) => return Err(PreflightError::Timeout(exe.into())),
        Ok(Err(e)) => {
            return Err(PreflightError::Run {
                exe: exe.into(),
                error: e,
            });
        }
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(PreflightError::Failed {
            exe: exe.into(),
            status: output.status,
            detail: stderr.trim().to_string(),
        });
    }
    Ok((handover::check_preflight(&stdout)?, image))
}
