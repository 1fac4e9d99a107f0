//! Reaping: droved waits for every child it has, known or not, as soon as
//! it exits.
//!
//! Workers and templates are droved's own children; orphans come to it
//! too, from the whole namespace when droved is PID 1 of a container, and
//! from its workers' subtrees when it is a child subreaper (template mode,
//! or ever since). One sweep takes every exited child
//! ([`process::reap_next`]) and hands it to the accounting it belongs to:
//! a worker's exit to `on_exit`, a template's to `on_template_exit`; an
//! unknown child is logged at debug level with its status, or, while a
//! template owes fork answers, kept as an early exit of a worker it has not
//! named yet. Children another waiter holds (an unconfirmed fork, the
//! upgrade's preflight) are never taken here: see `sys::process`.

use tracing::{debug, warn};

use nix::unistd::Pid;

use super::Supervisor;
use super::template_io::EARLY_MAX;
use crate::sys::process::{self, ExitStatus, Reaped};

/// Children reaped in one sweep at most; the main loop sweeps again after
/// every event, so a flood of exits cannot starve everything else.
const SWEEP_MAX: usize = 4096;

impl Supervisor {
    /// Reaps every child that has exited.
    pub(super) fn reap(&mut self) {
        for _ in 0..SWEEP_MAX {
            match process::reap_next() {
                Ok(Reaped::Child(pid, status, session)) => self.on_child_exit(pid, status, session),
                Ok(Reaped::Nothing) => return,
                Ok(Reaped::Held(held)) => {
                    // Its waiter reaps it soon; the kernel's P_ALL wait
                    // shows nothing past it meanwhile, so look child by
                    // child this once.
                    debug!(
                        pid = held.as_raw(),
                        "exited child {held} is waited for elsewhere"
                    );
                    match process::reap_unheld() {
                        Ok(exits) => {
                            for (pid, status, session) in exits {
                                self.on_child_exit(pid, status, session);
                            }
                        }
                        Err(e) => warn!("cannot list droved's children to reap them: {e}"),
                    }
                    return;
                }
                Err(e) => {
                    warn!("cannot wait for exited children: {e}");
                    return;
                }
            }
        }
    }

    fn on_child_exit(&mut self, pid: Pid, status: ExitStatus, session: Option<Pid>) {
        // Reaped: its pid may name another process from now on.
        self.children.reaped(pid);
        if self.pool.workers.contains_key(&pid) {
            self.on_exit(pid, status);
        } else if self.pool.templates.all.iter().any(|t| t.pid == pid) {
            self.on_template_exit(pid, status);
        } else if !self.pool.templates.forks.is_empty() && self.early.exits.len() < EARLY_MAX {
            // Perhaps a forked worker its template has not named yet.
            self.early.exits.push((pid, status, session));
        } else {
            debug!(
                pid = pid.as_raw(),
                event = "orphan-reaped",
                "reaped {pid}, not a worker ({status})"
            );
        }
    }
}
