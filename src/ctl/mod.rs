//! drovectl: the command line over drove's D-Bus interface, one file per
//! verb (`status.rs`, `scale.rs`, ...). This module holds the clap
//! definition (also the source of completions), the choice of instance,
//! and the error type whose variants are drovectl's exit codes:
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | success |
//! | 1 | the operation failed (message on stderr) |
//! | 2 | usage: bad arguments, or several instances and no `--instance` |
//! | 3 | the instance is not running (no owner of its bus name) |

mod completions;
mod limits;
mod list;
mod list_instances;
mod reload;
mod restart_workers;
mod rollout;
mod scale;
mod status;
mod upgrade;
mod watch;

use std::time::Duration;

use clap::{Parser, Subcommand};
use zbus::Connection;
use zbus::proxy::CacheProperties;

use crate::bus::{self, BusError, BusKind, Drove1Proxy};

#[derive(Parser, Debug)]
#[command(
    name = "drovectl",
    version,
    about = "Control running drove instances over D-Bus",
    after_help = "Exit status: 0 ok, 1 operation failed, 2 usage (or several instances and no --instance), 3 instance not running."
)]
pub struct Cli {
    /// The instance to address (default: the only one running on the bus).
    #[arg(long, global = true, value_name = "NAME")]
    pub instance: Option<String>,

    /// The bus droved serves on; DBUS_SYSTEM_BUS_ADDRESS and
    /// DBUS_SESSION_BUS_ADDRESS override the addresses.
    #[arg(long, global = true, value_enum, default_value_t = BusKind::System)]
    pub bus: BusKind,

    /// Print JSON instead of text (one object per line for watch).
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub verb: Verb,
}

#[derive(Subcommand, Debug)]
pub enum Verb {
    /// Show the instance's state, pool, queues and counters.
    Status,
    /// List the workers.
    List,
    /// Set the target number of workers (within the limits).
    Scale {
        #[arg(value_name = "N")]
        n: u32,
    },
    /// Set the pool limits.
    Limits {
        #[arg(value_name = "MIN")]
        min: u32,
        #[arg(value_name = "MAX")]
        max: u32,
    },
    /// Re-read the configuration (waits for a resulting rolling restart).
    Reload,
    /// Replace droved's binary in place.
    Upgrade,
    /// Restart all workers, a few at a time.
    RestartWorkers,
    /// Show, pause, resume or abort (roll back) the rollout in progress.
    Rollout {
        #[arg(value_enum, value_name = "ACTION", default_value = "status")]
        action: RolloutVerb,
    },
    /// Print events as they happen, until Ctrl-C.
    Watch,
    /// List the drove instances running on the bus.
    ListInstances,
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

/// What `drovectl rollout` does.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum RolloutVerb {
    Status,
    Pause,
    Resume,
    Abort,
}

impl RolloutVerb {
    fn as_str(self) -> &'static str {
        match self {
            RolloutVerb::Status => "status",
            RolloutVerb::Pause => "pause",
            RolloutVerb::Resume => "resume",
            RolloutVerb::Abort => "abort",
        }
    }
}

/// drovectl's failures; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    NotRunning(String),
}

impl CtlError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Failed(_) => 1,
            CtlError::Usage(_) => 2,
            CtlError::NotRunning(_) => 3,
        }
    }
}

/// Runs one verb.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    // Reads answer at once; mutations may wait for a rolling restart.
    let timeout = match cli.verb {
        Verb::Reload | Verb::RestartWorkers | Verb::Upgrade => Duration::from_secs(900),
        _ => Duration::from_secs(25),
    };
    if let Verb::Completions { shell } = cli.verb {
        return completions::run(shell);
    }
    let conn = connect(cli.bus, timeout).await?;
    if let Verb::ListInstances = cli.verb {
        return list_instances::run(&conn, cli.bus, cli.json).await;
    }
    let target = Target::resolve(conn, cli.bus, cli.instance.as_deref()).await?;
    match cli.verb {
        Verb::Status => status::run(&target, cli.json).await,
        Verb::List => list::run(&target, cli.json).await,
        Verb::Scale { n } => scale::run(&target, n, cli.json).await,
        Verb::Limits { min, max } => limits::run(&target, min, max, cli.json).await,
        Verb::Reload => reload::run(&target, cli.json).await,
        Verb::Upgrade => upgrade::run(&target, cli.json).await,
        Verb::RestartWorkers => restart_workers::run(&target, cli.json).await,
        Verb::Rollout { action } => rollout::run(&target, action.as_str(), cli.json).await,
        Verb::Watch => watch::run(&target, cli.json).await,
        Verb::ListInstances | Verb::Completions { .. } => unreachable!("handled above"),
    }
}

async fn connect(bus: BusKind, timeout: Duration) -> Result<Connection, CtlError> {
    let fail = |e: zbus::Error| CtlError::Failed(format!("cannot connect to the {bus} bus: {e}"));
    bus.builder()
        .map_err(fail)?
        .method_timeout(timeout)
        .build()
        .await
        .map_err(fail)
}

/// The drove instances on the bus: (instance, bus name), sorted.
async fn instances(conn: &Connection, bus: BusKind) -> Result<Vec<(String, String)>, CtlError> {
    let dbus = zbus::fdo::DBusProxy::new(conn)
        .await
        .map_err(|e| CtlError::Failed(format!("the {bus} bus: {e}")))?;
    let names = dbus
        .list_names()
        .await
        .map_err(|e| CtlError::Failed(format!("cannot list the names on the {bus} bus: {e}")))?;
    let mut found: Vec<(String, String)> = names
        .iter()
        .filter_map(|n| bus::instance_of(n.as_str()).map(|i| (i, n.to_string())))
        .collect();
    found.sort();
    Ok(found)
}

/// The instance a verb talks to.
pub struct Target {
    pub conn: Connection,
    pub bus: BusKind,
    pub instance: String,
    pub name: String,
}

impl Target {
    async fn resolve(
        conn: Connection,
        bus: BusKind,
        instance: Option<&str>,
    ) -> Result<Target, CtlError> {
        let instance = match instance {
            Some(i) => i.to_string(),
            None => {
                let mut found = instances(&conn, bus).await?;
                match found.len() {
                    0 => {
                        return Err(CtlError::NotRunning(format!(
                            "no drove instance is running on the {bus} bus"
                        )));
                    }
                    1 => found.remove(0).0,
                    n => {
                        let names: Vec<String> =
                            found.iter().map(|(i, _)| format!("{i:?}")).collect();
                        return Err(CtlError::Usage(format!(
                            "{n} drove instances are running on the {bus} bus: {}; pick one with --instance NAME",
                            names.join(", ")
                        )));
                    }
                }
            }
        };
        let name = bus::bus_name(&instance).map_err(|e| CtlError::Usage(e.to_string()))?;
        Ok(Target {
            conn,
            bus,
            instance,
            name,
        })
    }

    /// The generated proxy, without property caching (one call, one answer).
    async fn proxy(&self) -> Result<Drove1Proxy<'static>, CtlError> {
        Drove1Proxy::builder(&self.conn)
            .destination(self.name.clone())
            .map_err(|e| self.zbus_error(e))?
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| self.zbus_error(e))
    }

    async fn properties(&self) -> Result<zbus::fdo::PropertiesProxy<'static>, CtlError> {
        zbus::fdo::PropertiesProxy::builder(&self.conn)
            .destination(self.name.clone())
            .and_then(|b| b.path(bus::OBJECT_PATH))
            .map_err(|e| self.zbus_error(e))?
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| self.zbus_error(e))
    }

    /// A method's error as drovectl reports it.
    fn error(&self, e: BusError) -> CtlError {
        use zbus::DBusError;
        match e {
            BusError::ZBus(e) => self.zbus_error(e),
            e => CtlError::Failed(format!(
                "{} [{}]",
                e.description().unwrap_or("failed"),
                e.name()
            )),
        }
    }

    fn zbus_error(&self, e: zbus::Error) -> CtlError {
        const GONE: [&str; 2] = [
            "org.freedesktop.DBus.Error.ServiceUnknown",
            "org.freedesktop.DBus.Error.NameHasNoOwner",
        ];
        let name = match &e {
            zbus::Error::MethodError(name, _, _) => Some(name.to_string()),
            zbus::Error::FDO(f) => Some(zbus::DBusError::name(f.as_ref()).to_string()),
            _ => None,
        };
        if name.as_deref().is_some_and(|n| GONE.contains(&n)) {
            return CtlError::NotRunning(format!(
                "drove instance {:?} is not running on the {} bus ({} has no owner)",
                self.instance, self.bus, self.name
            ));
        }
        CtlError::Failed(format!("{} ({}): {e}", self.instance, self.name))
    }
}

/// Prints `value` as one line of JSON.
fn print_json(value: &impl serde::Serialize) -> Result<(), CtlError> {
    let text = serde_json::to_string(value)
        .map_err(|e| CtlError::Failed(format!("cannot encode JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// "3 s", "4 min 12 s", "2 h 5 min", "3 d 4 h", like systemctl.
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 10.0 {
        return format!("{s:.1} s");
    }
    let s = s as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// "512K", "12.3M", "1.2G".
pub fn human_bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let f = b as f64;
    if f < K {
        format!("{b}B")
    } else if f < K * K {
        format!("{:.0}K", f / K)
    } else if f < K * K * K {
        format!("{:.1}M", f / (K * K))
    } else {
        format!("{:.1}G", f / (K * K * K))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn humans() {
        assert_eq!(human_duration(2.345), "2.3 s");
        assert_eq!(human_duration(252.0), "4 min 12 s");
        assert_eq!(human_duration(7500.0), "2 h 5 min");
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(12 * 1024 * 1024 + 300 * 1024), "12.3M");
    }
}
