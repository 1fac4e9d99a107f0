//! drovectl: the command line over drove's D-Bus interface, one file per
//! verb (`status.rs`, `scale.rs`, ...). This module holds the clap
//! definition (also the source of completions), the choice of instance and
//! of the way to reach it (`route.rs`: a bus, droved's private socket, or
//! another host's system bus through ssh), and the error type whose
//! variants are drovectl's exit codes:
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
pub mod route;
mod scale;
mod status;
mod upgrade;
mod watch;

use std::time::Duration;

use clap::{Parser, Subcommand};
use zbus::Connection;
use zbus::proxy::CacheProperties;

use crate::bus::{self, BusError, BusKind, Drove1Proxy};
use route::{Host, Via};

#[derive(Parser, Debug)]
#[command(
    name = "drovectl",
    version,
    about = "Control running drove instances over D-Bus",
    after_help = "Exit status: 0 ok, 1 operation failed, 2 usage (or several instances and no --instance), 3 instance not running."
)]
pub struct Cli {
    /// The instance to address (default: the only one running).
    #[arg(long, global = true, value_name = "NAME")]
    pub instance: Option<String>,

    /// Where droved is reached: "system" or "session" (that bus only), or
    /// "private" (droved's private socket only). Default: the system bus,
    /// and droved's private socket when the bus is unreachable or the
    /// instance is not on it. DBUS_SYSTEM_BUS_ADDRESS and
    /// DBUS_SESSION_BUS_ADDRESS override the bus addresses.
    #[arg(long, global = true, value_enum, value_name = "BUS")]
    pub bus: Option<Route>,

    /// Control the droveds of another host, on its system bus, through
    /// `ssh -xT [-p PORT] [USER@]HOST systemd-stdio-bridge` (as
    /// `systemctl -H` does).
    #[arg(
        short = 'H',
        long = "host",
        global = true,
        value_name = "[USER@]HOST[:PORT]",
        value_parser = parse_host,
        conflicts_with = "bus"
    )]
    pub host: Option<Host>,

    /// Print JSON instead of text (one object per line for watch).
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub verb: Verb,
}

/// drovectl's `--bus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Route {
    System,
    Session,
    /// droved's private socket (D-Bus peer-to-peer, no bus needed).
    Private,
}

fn parse_host(s: &str) -> Result<Host, String> {
    s.parse()
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
    /// List the drove instances running (on the bus, and on private
    /// sockets).
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
    // The bus (or the remote host's), unless only the private socket is
    // wanted; without an explicit --bus, an unreachable system bus is not
    // an error: the private sockets remain.
    let mut unreachable = None;
    let bus = match (&cli.host, cli.bus) {
        (Some(host), _) => Some((
            route::connect_remote(host, timeout).await?,
            Via::Remote(host.clone()),
        )),
        (None, Some(Route::Private)) => None,
        (None, Some(Route::System)) => Some((
            connect(BusKind::System, timeout).await?,
            Via::Bus(BusKind::System),
        )),
        (None, Some(Route::Session)) => Some((
            connect(BusKind::Session, timeout).await?,
            Via::Bus(BusKind::Session),
        )),
        (None, None) => match connect(BusKind::System, timeout).await {
            Ok(conn) => Some((conn, Via::Bus(BusKind::System))),
            Err(e) => {
                unreachable = Some(e.to_string());
                None
            }
        },
    };
    let private = cli.host.is_none() && matches!(cli.bus, None | Some(Route::Private));
    let reach = Reach {
        bus,
        private,
        unreachable,
        timeout,
    };
    if let Verb::ListInstances = cli.verb {
        return list_instances::run(&reach, cli.json).await;
    }
    let target = Target::resolve(reach, cli.instance.as_deref()).await?;
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

/// The ways to reach droved this run may use.
pub struct Reach {
    /// A bus connection (the system bus of another host with -H).
    pub bus: Option<(Connection, Via)>,
    /// Whether private sockets are looked at.
    pub private: bool,
    /// Why the default system bus could not be reached, if it could not.
    pub unreachable: Option<String>,
    pub timeout: Duration,
}

impl Reach {
    /// Where instances were looked for, for messages.
    fn places(&self) -> String {
        let bus = self.bus.as_ref().map(|(_, via)| via.to_string());
        match (bus, self.private) {
            (Some(bus), true) => format!("{bus} or a private socket"),
            (Some(bus), false) => bus,
            (None, _) => match &self.unreachable {
                Some(e) => format!("a private socket (and {e})"),
                None => "a private socket".into(),
            },
        }
    }

    /// Every instance reachable: (instance, how), bus first, sorted within.
    async fn all(&self) -> Result<Vec<(String, Via, String)>, CtlError> {
        let mut found = Vec::new();
        if let Some((conn, via)) = &self.bus {
            for (instance, name) in instances(conn, via).await? {
                found.push((instance, via.clone(), name));
            }
        }
        if self.private {
            for (instance, path) in route::private_instances(self.timeout).await {
                if !found.iter().any(|(i, _, _)| *i == instance) {
                    let shown = path.display().to_string();
                    found.push((instance, Via::Private(path), shown));
                }
            }
        }
        Ok(found)
    }
}

/// The drove instances on the bus: (instance, bus name), sorted.
async fn instances(conn: &Connection, bus: &Via) -> Result<Vec<(String, String)>, CtlError> {
    let dbus = zbus::fdo::DBusProxy::new(conn)
        .await
        .map_err(|e| CtlError::Failed(format!("{bus}: {e}")))?;
    let names = dbus
        .list_names()
        .await
        .map_err(|e| CtlError::Failed(format!("cannot list the names on {bus}: {e}")))?;
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
    pub via: Via,
    pub instance: String,
    /// Its bus name (also when reached on the private socket, for display).
    pub name: String,
}

impl Target {
    async fn resolve(reach: Reach, instance: Option<&str>) -> Result<Target, CtlError> {
        let instance = match instance {
            Some(i) => i.to_string(),
            None => {
                let mut found = reach.all().await?;
                match found.len() {
                    0 => {
                        return Err(CtlError::NotRunning(format!(
                            "no drove instance is running on {}",
                            reach.places()
                        )));
                    }
                    1 => found.remove(0).0,
                    n => {
                        let names: Vec<String> =
                            found.iter().map(|(i, _, _)| format!("{i:?}")).collect();
                        return Err(CtlError::Usage(format!(
                            "{n} drove instances are running on {}: {}; pick one with --instance NAME",
                            reach.places(),
                            names.join(", ")
                        )));
                    }
                }
            }
        };
        let name = bus::bus_name(&instance).map_err(|e| CtlError::Usage(e.to_string()))?;
        let on_bus = match &reach.bus {
            // Only the bus: its answer (or its error) is the one.
            Some(_) if !reach.private => true,
            Some((conn, _)) => has_owner(conn, &name).await,
            None => false,
        };
        if !on_bus && reach.private {
            if let Some((path, conn)) = route::find_private(&instance, reach.timeout).await? {
                return Ok(Target {
                    conn,
                    via: Via::Private(path),
                    instance,
                    name,
                });
            }
            let looked: Vec<String> = route::private_paths(&instance)
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            let bus = match (&reach.bus, &reach.unreachable) {
                (Some((_, via)), _) => format!("not on {via} ({name} has no owner), "),
                (None, Some(e)) => format!("{e}; "),
                (None, None) => String::new(),
            };
            return Err(CtlError::NotRunning(format!(
                "drove instance {instance:?} is not running: {bus}no private socket answers ({})",
                looked.join(", ")
            )));
        }
        let (conn, via) = reach.bus.expect("on the bus");
        Ok(Target {
            conn,
            via,
            instance,
            name,
        })
    }

    /// The generated proxy, without property caching (one call, one answer).
    async fn proxy(&self) -> Result<Drove1Proxy<'static>, CtlError> {
        // Peer-to-peer, the destination is not looked at (but required).
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
                "drove instance {:?} is not running on {} ({} has no owner)",
                self.instance, self.via, self.name
            ));
        }
        CtlError::Failed(format!("{} ({}): {e}", self.instance, self.name))
    }
}

/// Whether `name` has an owner on the bus of `conn` (false when the bus
/// cannot say).
async fn has_owner(conn: &Connection, name: &str) -> bool {
    let Ok(dbus) = zbus::fdo::DBusProxy::new(conn).await else {
        return false;
    };
    let Ok(name) = zbus::names::BusName::try_from(name) else {
        return false;
    };
    dbus.name_has_owner(name).await.unwrap_or(false)
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
