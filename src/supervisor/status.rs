//! What the supervisor tells the world: the lifecycle phase, a snapshot of
//! the pool (for STATUS=, D-Bus and `drovectl status --json`), and the
//! one-line summary systemd shows in `systemctl status`. Pure.

use serde::{Deserialize, Serialize};

/// Lifecycle of droved itself, published when it becomes true.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Starting,
    Running,
    Reloading,
    Upgrading,
    /// `stop.delay`: serving still, but no longer ready (`/readyz` 503).
    Draining,
    Stopping,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Reloading => "reloading",
            Phase::Upgrading => "upgrading",
            Phase::Draining => "draining",
            Phase::Stopping => "stopping",
        })
    }
}

/// One listener's accept queue, as last probed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub address: String,
    pub family: String,
    /// Connections waiting in the accept queue; `None` when unreadable.
    pub queued: Option<u32>,
    pub backlog: Option<u32>,
    /// Why the queue could not be read.
    pub error: Option<String>,
}

/// Everything `drovectl status` shows. The default is what is published
/// before the supervisor's first snapshot: starting, all zero.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub instance: String,
    pub version: String,
    pub pid: u32,
    pub phase: Phase,
    /// Workers die right after start repeatedly (see `failure`).
    pub failing: bool,
    /// Why, as one line (worker and template text go through `oneline`).
    pub failure: Option<String>,
    pub generation: u64,
    pub min: u32,
    pub max: u32,
    pub target: u32,
    pub ready: u32,
    pub starting: u32,
    pub stopping: u32,
    /// Ready workers that hold a connection accepted from a listener, and
    /// those that hold none (`supervisor::activity`), as last sampled;
    /// `None` when droved cannot tell. Ready workers not read yet are in
    /// neither.
    #[serde(default)]
    pub busy: Option<u32>,
    #[serde(default)]
    pub idle: Option<u32>,
    pub listeners: Vec<ListenerStatus>,
    /// Sum of the readable queues (see `scale` for why the sum).
    pub queued: Option<u32>,
    /// Workers the scaler would want with no `max` (scale::Scaler::demand);
    /// `None` while no queue can be read. Not a D-Bus property (yet): the
    /// metrics carry it, and drovectl's JSON leaves it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand: Option<u32>,
    pub last_scale: Option<String>,
    pub spawned: u64,
    pub exited: u64,
    pub failed_starts: u64,
    pub reloads: u64,
    pub upgrades: u64,
    pub uptime_secs: f64,
    /// The journal does not take droved's log messages (see `logging`).
    #[serde(default)]
    pub journal_stalled: bool,
    /// Log messages lost to a stalled journal since droved started.
    #[serde(default)]
    pub log_dropped: u64,
    /// Template mode: the current template, e.g. "ready (pid 42)",
    /// "starting (pid 42)" or "none"; `None` in exec mode.
    #[serde(default)]
    pub template: Option<String>,
}

impl Snapshot {
    /// The STATUS= line: short, live, the numbers an operator looks for.
    pub fn status_line(&self) -> String {
        let mut line = match self.phase {
            Phase::Stopping => format!(
                "stopping: {} workers left",
                self.ready + self.starting + self.stopping
            ),
            _ => format!(
                "{} worker{} ready (min {}, max {})",
                self.ready,
                if self.ready == 1 { "" } else { "s" },
                self.min,
                self.max
            ),
        };
        if self.phase != Phase::Stopping {
            if self.starting > 0 {
                line.push_str(&format!(", {} starting", self.starting));
            }
            if self.stopping > 0 {
                line.push_str(&format!(", {} stopping", self.stopping));
            }
            if let Some(busy) = self.busy {
                line.push_str(&format!(", {busy} busy"));
            }
            match self.queued {
                Some(q) => line.push_str(&format!(", queue {q}")),
                None if !self.listeners.is_empty() => line.push_str(", queue unknown"),
                None => {}
            }
            if matches!(
                self.phase,
                Phase::Reloading | Phase::Upgrading | Phase::Draining
            ) {
                line.push_str(&format!("; {}", self.phase));
            }
        }
        if self.failing {
            line.push_str("; FAILING: ");
            line.push_str(
                self.failure
                    .as_deref()
                    .unwrap_or("workers exit right after start"),
            );
        }
        if let Some(t) = self
            .template
            .as_ref()
            .filter(|t| !t.starts_with("ready") && self.phase != Phase::Stopping)
        {
            line.push_str(&format!("; template {t}"));
        }
        if self.journal_stalled {
            line.push_str(&format!(
                "; journal not reading: {} log message{} dropped",
                self.log_dropped,
                if self.log_dropped == 1 { "" } else { "s" }
            ));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            instance: "demo".into(),
            version: "0.1.0".into(),
            pid: 1,
            phase: Phase::Running,
            failing: false,
            failure: None,
            generation: 1,
            min: 2,
            max: 16,
            target: 4,
            ready: 4,
            starting: 0,
            stopping: 0,
            busy: None,
            idle: None,
            listeners: vec![ListenerStatus {
                name: "web".into(),
                address: "127.0.0.1:8080".into(),
                family: "tcp".into(),
                queued: Some(0),
                backlog: Some(1024),
                error: None,
            }],
            queued: Some(0),
            demand: None,
            last_scale: None,
            spawned: 4,
            exited: 0,
            failed_starts: 0,
            reloads: 0,
            upgrades: 0,
            journal_stalled: false,
            log_dropped: 0,
            template: None,
            uptime_secs: 1.0,
        }
    }

    #[test]
    fn status_lines() {
        let mut s = snapshot();
        assert_eq!(s.status_line(), "4 workers ready (min 2, max 16), queue 0");
        // Busy workers, before the queue (tests split the line at it).
        s.busy = Some(3);
        s.idle = Some(1);
        assert_eq!(
            s.status_line(),
            "4 workers ready (min 2, max 16), 3 busy, queue 0"
        );
        s.busy = None;
        s.idle = None;
        s.ready = 1;
        s.starting = 3;
        s.queued = Some(12);
        assert_eq!(
            s.status_line(),
            "1 worker ready (min 2, max 16), 3 starting, queue 12"
        );
        s.queued = None;
        s.failing = true;
        s.failure = Some("worker exited with status 1 after 0.0 s".into());
        assert_eq!(
            s.status_line(),
            "1 worker ready (min 2, max 16), 3 starting, queue unknown; FAILING: worker exited with status 1 after 0.0 s"
        );
        s.failing = false;
        // Template mode: only a template that is not ready is news.
        s.template = Some("starting (pid 7)".into());
        assert_eq!(
            s.status_line(),
            "1 worker ready (min 2, max 16), 3 starting, queue unknown; template starting (pid 7)"
        );
        s.template = Some("ready (pid 7)".into());
        assert_eq!(
            s.status_line(),
            "1 worker ready (min 2, max 16), 3 starting, queue unknown"
        );
        s.template = None;
        s.journal_stalled = true;
        s.log_dropped = 1;
        assert_eq!(
            s.status_line(),
            "1 worker ready (min 2, max 16), 3 starting, queue unknown; journal not reading: 1 log message dropped"
        );
        s.journal_stalled = false;
        s.phase = Phase::Draining;
        assert_eq!(
            s.status_line(),
            "1 worker ready (min 2, max 16), 3 starting, queue unknown; draining"
        );
        s.phase = Phase::Stopping;
        s.stopping = 2;
        assert_eq!(s.status_line(), "stopping: 6 workers left");
    }

    #[test]
    fn snapshot_json_round_trip() {
        let s = snapshot();
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"phase\":\"running\""), "{json}");
        assert_eq!(serde_json::from_str::<Snapshot>(&json).unwrap(), s);
    }
}
