//! Template mode, carried out: starting and stopping templates, asking
//! them for workers, their answers, and a template's exit (the sweep in
//! `reap` hands it over). The decisions are in `template`; the protocol is
//! docs/template.md.

use std::io;
use std::time::Instant;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use super::Supervisor;
use super::lifecycle::Lifecycle;
use super::pool::Worker;
use super::template::{
    self, Message, PendingFork, Template, TemplateAction, TemplateExit, TemplateState,
};
use crate::config::WorkerMode;
use crate::sys::notify_socket::Datagram;
use crate::sys::process::{self, ExitStatus};
use crate::sys::spawn::{self, SpawnSpec};
use crate::sys::template_socket::{self, Received, TemplateSocket};

/// Datagrams and exits of unknown children kept while forks are
/// unanswered, at most this many of each.
pub(super) const EARLY_MAX: usize = 64;

/// What a worker did before its template's answer named it.
#[derive(Default)]
pub(super) struct Early {
    datagrams: Vec<(Pid, Datagram)>,
    /// With the session each had as a zombie: whose fork it was.
    pub(super) exits: Vec<(Pid, ExitStatus, Option<Pid>)>,
}

/// When to look for workers forked by a template that was lost before it
/// named them (they would serve unsupervised): twice, as a slow
/// intermediate may still fork after the template died.
const STRAY_CHECKS: [std::time::Duration; 2] = [
    std::time::Duration::from_millis(200),
    std::time::Duration::from_secs(2),
];

/// The socket of the current template, if one runs.
pub(super) type TemplateIo = Option<(Pid, TemplateSocket)>;

/// The next message of the current template (pending forever without one).
pub(super) async fn recv(io: &TemplateIo) -> (Pid, io::Result<Received>) {
    match io {
        Some((pid, socket)) => (*pid, socket.recv().await),
        None => std::future::pending().await,
    }
}

impl Supervisor {
    pub(super) fn template_mode(&self) -> bool {
        self.config.worker.mode == WorkerMode::Template
    }

    /// Starts, stops and kills templates as `template::plan_templates` says.
    pub(super) fn reconcile_templates(&mut self, now: Instant) {
        let generation =
            (!self.lifecycle.is_stopping() && self.template_mode()).then_some(self.generation);
        if generation.is_none() && self.pool.templates.all.is_empty() {
            return;
        }
        // Not while forks are unanswered: their workers are not strays.
        if self.pool.templates.forks.is_empty() && self.stray_checks.iter().any(|t| now >= *t) {
            self.stray_checks.retain(|t| now < *t);
            self.kill_strays();
            if self.stray_checks.is_empty() {
                self.stray_sessions.clear();
            }
        }
        let budget = self.gate.available(now);
        for action in template::plan_templates(
            &self.pool.templates,
            generation,
            now,
            self.config.worker.ready_timeout,
            budget,
        ) {
            match action {
                TemplateAction::Start => self.start_template(now),
                TemplateAction::Stop(pid) => self.stop_template(pid, now),
                TemplateAction::Kill(pid, why) => self.kill_template(pid, why, now),
                TemplateAction::NoteWaiting(pid) => self.note_hello_wait(pid),
            }
        }
    }

    fn start_template(&mut self, now: Instant) {
        if let Err(e) = process::become_subreaper() {
            self.template_failed(format!("cannot become a subreaper: {e}"), now);
            return;
        }
        let (socket, theirs) = match template_socket::pair() {
            Ok(p) => p,
            Err(e) => {
                self.template_failed(format!("cannot create the template's socket: {e}"), now);
                return;
            }
        };
        let mut env = self.plan.env.clone();
        env.push(("DROVE_GENERATION".into(), self.generation.to_string()));
        env.push((
            "DROVE_TEMPLATE_FD".into(),
            (3 + self.listeners.len()).to_string(),
        ));
        let mut fds: Vec<_> = self.listeners.iter().map(|l| l.as_fd()).collect();
        // Placed right after the listeners, without CLOEXEC.
        fds.push(std::os::fd::AsFd::as_fd(&theirs));
        let spec = SpawnSpec {
            argv: &self.plan.argv,
            env,
            working_directory: self.config.worker.working_directory.as_deref(),
            credentials: self.plan.credentials.as_ref(),
            listeners: fds,
            placement: spawn::Placement::Systemd,
            parent_death_signal: Some(Signal::SIGKILL),
        };
        self.gate.consume(now);
        match spawn::spawn(&spec) {
            Ok(pid) => {
                if let Err(e) = self.children.track(pid) {
                    // Unreachable for a child just spawned; without a pidfd
                    // droved could not signal it, so let it go: it exits
                    // on end of file (our end drops here), the sweep reaps it.
                    self.template_failed(format!("cannot hold template {pid}: {e}"), now);
                    return;
                }
                info!(
                    template_pid = pid.as_raw(),
                    generation = self.generation,
                    event = "template-started",
                    "template {pid} (generation {}) started",
                    self.generation
                );
                self.pool
                    .templates
                    .all
                    .push(Template::new(pid, self.generation, now));
                self.template_io = Some((pid, socket));
            }
            Err(e) => self.template_failed(format!("cannot start the template: {e}"), now),
        }
    }

    /// A template failed to start, serve or stay: back off, and abort a
    /// rollout whose new generation's template cannot get ready (its
    /// workers could not be forked), as failing workers do in exec mode.
    fn template_failed(&mut self, why: String, now: Instant) {
        self.counters.failed_starts += 1;
        let delay = self.gate.record_failure(now);
        let generation = self.generation;
        let guarded = self.lifecycle.rollout().is_some_and(|r| r.guard.is_some());
        if guarded {
            // A guarded rollout judges by its own rule (max_failures, then
            // a rollback), as for a failing worker.
            self.last_failure = Some(why.clone());
            self.note_rollout_failure(format!("template of generation {generation}: {why}"));
        } else if let Some(r) = self.lifecycle.rollout_mut() {
            r.failures += 1;
            if super::plan::rollout_gives_up(generation, generation, r.failures) {
                self.last_failure = Some(why.clone());
                self.abort_rollout(format!(
                    "new generation {generation} cannot get ready: {why}"
                ));
            }
        }
        error!(
            event = "template-failed",
            "{why}; next template in {} ms{}",
            delay.as_millis(),
            if self.gate.is_failing() {
                " (pool is failing)"
            } else {
                ""
            }
        );
        self.last_failure = Some(why);
    }

    /// Says once what droved waits for from a template that is slow to
    /// say hello.
    fn note_hello_wait(&mut self, pid: Pid) {
        if let Some(t) = self.pool.templates.get_mut(pid) {
            t.hello_noted = true;
        }
        info!(
            template_pid = pid.as_raw(),
            "waiting for template {pid} to say hello (DROVE-TEMPLATE {} on fd {}); \
             it is killed at ready_timeout = {:?}",
            template::PROTOCOL_VERSION,
            3 + self.listeners.len(),
            self.config.worker.ready_timeout
        );
    }

    /// Closes our end (the template exits on EOF) and sends SIGTERM.
    fn stop_template(&mut self, pid: Pid, now: Instant) {
        self.forget_io(pid);
        if let Some(t) = self.pool.templates.get_mut(pid) {
            if !t.is_active() {
                return;
            }
            t.state = TemplateState::Stopping {
                since: now,
                killed: false,
            };
        }
        info!(template_pid = pid.as_raw(), "stopping template {pid}");
        if let Err(e) = self.children.signal(pid, Signal::SIGTERM) {
            warn!(template_pid = pid.as_raw(), "cannot signal template: {e}");
        }
    }

    fn kill_template(&mut self, pid: Pid, why: &'static str, now: Instant) {
        self.forget_io(pid);
        if let Some(t) = self.pool.templates.get_mut(pid) {
            if t.is_active() {
                t.broken = Some(why);
            }
            t.state = TemplateState::Stopping {
                since: now,
                killed: true,
            };
        }
        warn!(
            template_pid = pid.as_raw(),
            event = "template-killed",
            "killing template {pid}: it {why}"
        );
        if let Err(e) = self.children.signal(pid, Signal::SIGKILL) {
            warn!(template_pid = pid.as_raw(), "cannot signal template: {e}");
        }
    }

    /// Drops our socket to `pid` and the forks it will never answer now.
    fn forget_io(&mut self, pid: Pid) {
        if self.template_io.as_ref().is_some_and(|(p, _)| *p == pid) {
            self.template_io = None;
        }
        let first_ask = self
            .pool
            .templates
            .forks
            .iter()
            .filter(|f| f.template == pid)
            .map(|f| f.asked)
            .min();
        let before = self.pool.templates.forks.len();
        self.pool.templates.forks.retain(|f| f.template != pid);
        let dropped = before - self.pool.templates.forks.len();
        if let Some(first_ask) = first_ask {
            let now = Instant::now();
            // Its forks are in its session (droved made it a session
            // leader), whatever program they run by now, and started
            // after droved asked. Unknown boot time: the whole session.
            let asked = process::since_boot()
                .map(|b| b.saturating_sub(now.saturating_duration_since(first_ask)))
                .unwrap_or_default();
            match self.stray_sessions.iter_mut().find(|l| l.session == pid) {
                Some(l) => l.asked = l.asked.min(asked),
                None => self.stray_sessions.push(template::LostTemplate {
                    session: pid,
                    asked,
                }),
            }
            self.stray_checks
                .extend(STRAY_CHECKS.iter().map(|d| now + *d));
            warn!(
                template_pid = pid.as_raw(),
                "{dropped} forks asked of template {pid} stay unanswered"
            );
        }
        if self.pool.templates.forks.is_empty() {
            self.early = Early::default();
        }
    }

    /// Asks the current template for `n` workers; none while it is not
    /// ready (reconcile asks again).
    pub(super) fn ask_template(&mut self, n: u32, now: Instant) {
        if !self.stray_checks.is_empty() {
            // Until the lost template's forks are found, new unnamed forks
            // would look just like them.
            return;
        }
        if matches!(self.lifecycle, Lifecycle::Upgrading(_)) {
            // No fork may be unanswered at the exec: the template is then
            // handed over with nothing owed (forks wait for the new image).
            return;
        }
        let generation = self.generation;
        let Some(t) = self.pool.templates.current(generation) else {
            return;
        };
        if t.state != TemplateState::Ready {
            return;
        }
        let pid = t.pid;
        for _ in 0..n {
            let slot = self.pool.free_slot();
            let sent = match &self.template_io {
                Some((p, socket)) if *p == pid => {
                    socket.send(&template::spawn_request(slot, generation))
                }
                _ => return,
            };
            if let Err(e) = sent {
                warn!(
                    template_pid = pid.as_raw(),
                    "cannot ask template {pid} to fork: {e}"
                );
                self.kill_template(pid, "does not read its socket", now);
                return;
            }
            self.gate.consume(now);
            debug!(
                template_pid = pid.as_raw(),
                slot, "asked template for a worker"
            );
            self.pool.templates.forks.push_back(PendingFork {
                template: pid,
                slot,
                generation,
                asked: now,
            });
        }
    }

    /// A message (or an error) on the current template's socket.
    pub(super) fn on_template_message(&mut self, pid: Pid, msg: io::Result<Received>) {
        let now = Instant::now();
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => {
                warn!(template_pid = pid.as_raw(), "template socket: {e}");
                self.kill_template(pid, "broke its socket", now);
                return;
            }
        };
        let parsed = template::parse(&msg.bytes);
        let Some(t) = self.pool.templates.get_mut(pid) else {
            return;
        };
        let state = t.state;
        if !msg.bytes.is_empty()
            && let Err((explanation, why)) = template::judge_sender(pid, state, msg.sender)
        {
            error!(template_pid = pid.as_raw(), "{explanation}");
            self.kill_template(pid, why, now);
            return;
        }
        match (parsed, state) {
            (Ok(Message::Hello(v)), TemplateState::Starting) if v == template::PROTOCOL_VERSION => {
                t.state = TemplateState::Ready;
                info!(
                    template_pid = pid.as_raw(),
                    event = "template-ready",
                    "template {pid} ready after {} ms",
                    now.duration_since(t.started).as_millis()
                );
            }
            (Ok(Message::Hello(v)), TemplateState::Starting) => {
                error!(
                    template_pid = pid.as_raw(),
                    "template {pid} speaks protocol version {v}; droved speaks {}",
                    template::PROTOCOL_VERSION
                );
                self.kill_template(pid, "speaks another protocol version", now);
            }
            (Ok(Message::Pid(worker)), TemplateState::Ready) => {
                self.template_forked(pid, worker, now)
            }
            (Ok(Message::Error(text)), TemplateState::Ready)
                if self
                    .pool
                    .templates
                    .forks
                    .front()
                    .is_some_and(|f| f.template == pid) =>
            {
                let f = self.pool.templates.forks.pop_front().expect("checked");
                self.counters.failed_starts += 1;
                let delay = self.gate.record_failure(now);
                let why = format!("template could not fork a worker: {text}");
                error!(
                    slot = f.slot,
                    event = "spawn-failed",
                    "{why}; retrying in {} ms",
                    delay.as_millis()
                );
                self.last_failure = Some(why);
            }
            (Err(template::MessageError::Closed), _) => {
                // Usually it is exiting: its exit is judged as what it was
                // when it is reaped (now, or within CLOSED_GRACE: a dying
                // process closes its files before it is a zombie). One
                // that stays is killed then (`plan_templates`).
                self.reap();
                self.forget_io(pid);
                if let Some(t) = self.pool.templates.get_mut(pid) {
                    debug!(
                        template_pid = pid.as_raw(),
                        "end of file from template {pid}; waiting for its exit"
                    );
                    t.closed = Some(now);
                }
            }
            (_, state) => {
                let owed = self
                    .pool
                    .templates
                    .forks
                    .iter()
                    .find(|f| f.template == pid)
                    .map(|f| f.slot);
                let shown = template::shown(&msg.bytes);
                error!(
                    template_pid = pid.as_raw(),
                    "{}",
                    template::unexpected(pid, &shown, state, owed)
                );
                self.kill_template(pid, "sent a message the protocol does not allow here", now);
            }
        }
    }

    /// The template named the worker of its oldest unanswered fork.
    fn template_forked(&mut self, template: Pid, pid: Pid, now: Instant) {
        let Some(f) = self
            .pool
            .templates
            .forks
            .front()
            .filter(|f| f.template == template)
            .copied()
        else {
            self.kill_template(template, "answered a spawn never asked", now);
            return;
        };
        let droved = nix::unistd::getpid();
        let early = self.early.exits.iter().position(|(p, ..)| *p == pid);
        // An early exit was droved's child, reaped already: its lineage is
        // what its zombie showed. Else it must be an unreaped child now.
        let lineage = match early {
            Some(i) => self.early.exits[i].2.map(|session| (droved, session)),
            None => process::stat(pid).ok().map(|s| (s.parent, s.session)),
        };
        let answered = template::Answered {
            pid,
            lineage,
            is_template: self.pool.templates.all.iter().any(|t| t.pid == pid),
            is_worker: self.pool.workers.contains_key(&pid),
            is_held: process::is_held(pid),
        };
        // Never adopt a pid that is not this template's fork: droved would
        // book its exit and signal it later.
        let judged = template::judge_answer(&answered, template, droved).and_then(|()| {
            match early {
                Some(_) => Ok(()),
                // Held from now until it is reaped: signals reach it only.
                None => self.children.track(pid).map_err(|e| {
                    warn!(worker_pid = pid.as_raw(), "cannot hold {pid}: {e}");
                    template::Refusal::NotOurChild
                }),
            }
        });
        if let Err(refusal) = judged {
            warn!(
                template_pid = template.as_raw(),
                "template {template} answered pid {pid}, which droved does not adopt: \
                 {refusal:?} ({lineage:?})"
            );
            self.kill_template(template, refusal.reason(), now);
            return;
        }
        let early_exit = early.map(|i| self.early.exits.remove(i).1);
        self.pool.templates.forks.pop_front();
        self.pool
            .workers
            .insert(pid, Worker::new(pid, f.slot, f.generation, now));
        self.worker_started(pid, now);
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early.datagrams)
            .into_iter()
            .partition(|(p, _)| *p == pid);
        self.early.datagrams = others;
        for (_, d) in mine {
            self.on_datagram(d);
        }
        if let Some(status) = early_exit {
            self.on_exit(pid, status);
        }
        if self.pool.templates.forks.is_empty() {
            self.early = Early::default();
        }
    }

    /// Kills droved's children that are neither workers nor templates but
    /// are in the session of a template that was lost with forks
    /// unanswered: its unnamed forks, whatever they exec'd since. An
    /// orphan from anywhere else (droved as PID 1 adopts them all) is in
    /// another session and left alone.
    fn kill_strays(&mut self) {
        if matches!(self.lifecycle, Lifecycle::Upgrading(_)) {
            return;
        }
        let children = match process::own_children() {
            Ok(c) => c,
            Err(e) => {
                warn!("cannot list droved's children to find stray forks: {e}");
                return;
            }
        };
        for pid in children {
            if self.pool.workers.contains_key(&pid)
                || self.pool.templates.all.iter().any(|t| t.pid == pid)
            {
                continue;
            }
            let Ok(stat) = process::stat(pid) else {
                continue;
            };
            if !template::is_stray(
                stat.session,
                stat.started,
                &self.stray_sessions,
                process::clock_tick(),
            ) {
                continue;
            }
            // Through a pidfd taken while it is our unreaped child: the
            // kill cannot reach a later owner of the pid.
            let killed =
                process::PidFd::open_child(pid).and_then(|fd| fd.send_signal(Signal::SIGKILL));
            match killed {
                Ok(_) => warn!(
                    pid = pid.as_raw(),
                    session = stat.session.as_raw(),
                    event = "stray-killed",
                    "killing {pid}: forked by lost template {} that never named it",
                    stat.session
                ),
                Err(e) => warn!(pid = pid.as_raw(), "cannot kill stray fork {pid}: {e}"),
            }
        }
    }

    /// Keeps a datagram of an unknown sender while forks are unanswered:
    /// a forked worker may send READY=1 before its template names it.
    /// Gives it back when not kept.
    pub(super) fn keep_early_datagram(&mut self, pid: Pid, d: Datagram) -> Option<Datagram> {
        if self.pool.workers.contains_key(&pid)
            || self.pool.templates.forks.is_empty()
            || self.early.datagrams.len() >= EARLY_MAX
        {
            return Some(d);
        }
        self.early.datagrams.push((pid, d));
        None
    }

    pub(super) fn on_template_exit(&mut self, pid: Pid, status: ExitStatus) {
        self.forget_io(pid);
        let Some(t) = self.pool.templates.remove(pid) else {
            return;
        };
        let now = Instant::now();
        let uptime = now.duration_since(t.started);
        let secs = uptime.as_secs_f64();
        match template::judge_exit(
            &t,
            status,
            uptime,
            self.config.worker.min_uptime,
            t.broken.is_some(),
        ) {
            TemplateExit::Stopped => info!(
                template_pid = pid.as_raw(),
                event = "template-exited",
                "template {pid} exited with {status} after {secs:.1} s"
            ),
            TemplateExit::Ended => warn!(
                template_pid = pid.as_raw(),
                event = "template-exited",
                "template {pid} exited with {status} after {secs:.1} s; starting a new one \
                 (its workers keep serving)"
            ),
            TemplateExit::Failed => {
                let why = match t.broken {
                    Some(why) => format!("template {why}; it exited with {status}"),
                    None => format!(
                        "template exited with {status} after {secs:.1} s{}",
                        if t.state == TemplateState::Starting {
                            " before it was ready"
                        } else {
                            ""
                        }
                    ),
                };
                self.template_failed(why, now);
            }
        }
    }

    /// The template a binary upgrade hands over: the current one, when it
    /// is ready and owes no answer (else the new image starts another).
    pub(super) fn template_to_hand_over(
        &self,
        now: Instant,
    ) -> Option<crate::handover::TemplateHandover> {
        let (pid, socket) = self.template_io.as_ref()?;
        let t = self.pool.templates.current(self.generation)?;
        (t.pid == *pid && t.state == TemplateState::Ready && self.pool.templates.forks.is_empty())
            .then(|| crate::handover::TemplateHandover {
                pid: pid.as_raw(),
                generation: t.generation,
                fd: std::os::fd::AsRawFd::as_raw_fd(&socket.as_fd()),
                age_ms: now.saturating_duration_since(t.started).as_millis() as u64,
            })
    }

    /// Takes over the template the previous image handed over.
    pub(super) fn restore_template(
        &mut self,
        t: crate::handover::TemplateHandover,
        started: Instant,
    ) {
        let pid = Pid::from_raw(t.pid);
        let socket = crate::sys::exec::adopt_inherited(t.fd).and_then(TemplateSocket::from_fd);
        match socket {
            Ok(socket) => {
                if let Err(e) = self.children.track(pid) {
                    // Not signallable: let it go (EOF as `socket` drops).
                    warn!(template_pid = t.pid, "cannot take over template {pid}: {e}");
                    return;
                }
                let _ = process::become_subreaper();
                let mut template = Template::new(pid, t.generation, started);
                template.state = TemplateState::Ready;
                self.pool.templates.all.push(template);
                self.template_io = Some((pid, socket));
                info!(template_pid = t.pid, "took over template {pid}");
            }
            Err(e) => {
                // Without its socket it is useless: it exits on EOF, and
                // the sweep reaps it.
                warn!(template_pid = t.pid, "cannot take over template {pid}: {e}");
            }
        }
    }

    /// The current template for status: `None` in exec mode.
    pub(super) fn template_summary(&self) -> Option<String> {
        if !self.template_mode() {
            return None;
        }
        Some(match self.pool.templates.current(self.generation) {
            Some(t) if t.state == TemplateState::Ready => format!("ready (pid {})", t.pid),
            Some(t) => format!("starting (pid {})", t.pid),
            None => "none".into(),
        })
    }
}
