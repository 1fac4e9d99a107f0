//! The control vocabulary: commands the supervisor accepts (from D-Bus or
//! signals), the events it broadcasts, and the errors it answers with.

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// A request to the supervisor; each carries its own reply channel.
#[derive(Debug)]
pub enum Command {
    /// Set the target number of workers (within [min, max]).
    Scale {
        n: u32,
        reply: oneshot::Sender<Result<u32, ControlError>>,
    },
    SetLimits {
        min: u32,
        max: u32,
        /// Asked by root (or droved's own user): may go beyond the limits
        /// of the config file; a control.group member may not.
        privileged: bool,
        reply: oneshot::Sender<Result<(u32, u32), ControlError>>,
    },
    /// Re-read the config; answers when the rollout (if any) finished.
    Reload {
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    /// Rolling restart of all workers with the current config.
    RestartWorkers {
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    ListWorkers {
        reply: oneshot::Sender<Vec<WorkerInfo>>,
    },
    /// The ready workers' activity as last sampled (no /proc read).
    ListActivity {
        reply: oneshot::Sender<Vec<WorkerActivity>>,
    },
    /// The pids of the workers and templates, without reading /proc (what
    /// ListMemory needs of the pool).
    ListPids { reply: oneshot::Sender<Vec<u32>> },
    /// Re-exec the binary on disk in place (same pid); answers with the
    /// refusal reason if preflight fails.
    Upgrade {
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    /// `drovectl rollout ...`: answers with the rollout's status line.
    Rollout {
        action: RolloutAction,
        reply: oneshot::Sender<Result<String, ControlError>>,
    },
}

/// What `drovectl rollout` asks of a rollout in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    Status,
    /// Start no more new-generation workers until resumed.
    Pause,
    Resume,
    /// Undo it: the previous settings come back, readiness-gated.
    Abort,
}

impl std::str::FromStr for RolloutAction {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, ControlError> {
        match s {
            "status" => Ok(RolloutAction::Status),
            "pause" => Ok(RolloutAction::Pause),
            "resume" => Ok(RolloutAction::Resume),
            "abort" => Ok(RolloutAction::Abort),
            other => Err(ControlError::OutOfRange(format!(
                "unknown rollout action {other:?}; expected status, pause, resume or abort"
            ))),
        }
    }
}

/// Errors a caller can act on; named on the bus as org.drove.Error.*.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("out of range: {0}")]
    OutOfRange(String),
    #[error("reload rejected: {0}")]
    ReloadRejected(String),
    #[error("rollout failed: {0}")]
    RolloutFailed(String),
    #[error("upgrade refused: {0}")]
    UpgradeRefused(String),
    #[error("droved is stopping")]
    Stopping,
    #[error("no rollout in progress")]
    NoRollout,
}

/// One worker, as `drovectl list` shows it (also its D-Bus wire form,
/// signature `(uustdtds)`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, zbus::zvariant::Type)]
pub struct WorkerInfo {
    pub pid: u32,
    pub slot: u32,
    pub state: String,
    pub generation: u64,
    pub age_secs: f64,
    pub rss_bytes: u64,
    pub cpu_secs: f64,
    /// Last STATUS= the worker sent.
    pub status: String,
}

/// One process of the pool (a worker or a template) as `ListMemory`
/// returns it, signature `(uttt)`; see `sys::memory`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, zbus::zvariant::Type)]
pub struct ProcessMemory {
    pub pid: u32,
    pub pss_bytes: u64,
    /// Private_Clean + Private_Dirty.
    pub uss_bytes: u64,
    /// SwapPss.
    pub swap_bytes: u64,
}

/// One ready worker's activity as `ListActivity` returns it, signature
/// `(ubd)`; see `supervisor::activity`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, zbus::zvariant::Type)]
pub struct WorkerActivity {
    pub pid: u32,
    /// It holds a connection accepted from a listener.
    pub busy: bool,
    /// For how long (at least) it has held the connections it holds; 0
    /// when idle.
    pub busy_secs: f64,
}

/// What happened, for D-Bus signals and `drovectl watch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    WorkerStarted {
        pid: u32,
        slot: u32,
        generation: u64,
    },
    WorkerExited {
        pid: u32,
        slot: u32,
        status: String,
        uptime_secs: f64,
    },
    Scaled {
        from: u32,
        to: u32,
        reason: String,
    },
    Reloaded {
        generation: u64,
    },
    Upgraded {
        version: String,
    },
    /// A guarded rollout failed and is being undone.
    RolledBack {
        generation: u64,
        reason: String,
    },
}
