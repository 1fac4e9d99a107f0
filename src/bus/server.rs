//! The daemon side of `org.drove.Drove1`: an object over the supervisor's
//! [`Handle`], the forwarding of snapshots (PropertiesChanged) and events
//! (signals), and the access check for mutating methods. The same
//! `#[interface]` block generates [`Drove1Proxy`] for drovectl.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use zbus::message::Header;
use zbus::names::{BusName, InterfaceName};
use zbus::object_server::SignalEmitter;
use zbus::zvariant::Value;
use zbus::{Connection, interface};

use super::access::{Access, DENIAL_WINDOW, Grant};
use super::{BusError, BusKind, Listener, OBJECT_PATH, Worker};
use crate::supervisor::Handle;
use crate::supervisor::control::{
    Command, ControlError, Event, ProcessMemory, RolloutAction, WorkerActivity,
};
use crate::supervisor::status::Snapshot;
use crate::sys::control_socket::Peer;
use crate::sys::memory;

/// The object at /org/drove/Drove1.
pub struct Drove1 {
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Snapshot>,
    access: Access,
    /// The bus daemon's interface, made once (asked on every mutating call).
    dbus: tokio::sync::OnceCell<zbus::fdo::DBusProxy<'static>>,
    /// When droved started, for the Uptime property.
    started: Instant,
    /// On the private socket: the client, as the kernel reported it at
    /// accept (there is no bus daemon to ask).
    peer: Option<Peer>,
    lists: WorkerLists,
}

/// ListWorkers answers shared by the callers that wait at the same time,
/// so a flood of them (anyone may call it) asks the supervisor one at a
/// time instead of filling its command queue ahead of root's Scale. A
/// caller gets a list the supervisor made after the call arrived, never an
/// older one. Shared by every object (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct WorkerLists(std::sync::Arc<Lists>);

#[derive(Debug, Default)]
struct Lists {
    /// Requests to the supervisor started so far.
    started: std::sync::atomic::AtomicU64,
    /// The latest answer and the number of its request.
    last: tokio::sync::Mutex<Option<(u64, Vec<Worker>)>>,
}

impl WorkerLists {
    async fn get(
        &self,
        ask: impl std::future::Future<Output = Result<Vec<Worker>, BusError>>,
    ) -> Result<Vec<Worker>, BusError> {
        use std::sync::atomic::Ordering::SeqCst;
        let seen = self.0.started.load(SeqCst);
        // tokio's Mutex is fair: callers are served in arrival order.
        let mut last = self.0.last.lock().await;
        if let Some((n, list)) = &*last
            && *n > seen
        {
            // Asked for after this call arrived.
            return Ok(list.clone());
        }
        let n = self.0.started.fetch_add(1, SeqCst) + 1;
        let list = ask.await?;
        *last = Some((n, list.clone()));
        Ok(list)
    }
}

impl Drove1 {
    pub fn new(handle: &Handle, access: Access) -> Drove1 {
        let uptime = handle.snapshot.borrow().uptime_secs;
        Drove1 {
            commands: handle.commands.clone(),
            snapshot: handle.snapshot.clone(),
            access,
            dbus: tokio::sync::OnceCell::new(),
            started: Instant::now() - Duration::from_secs_f64(uptime.max(0.0)),
            peer: None,
            lists: WorkerLists::default(),
        }
    }

    /// The object for one client of the private socket; `lists` is shared
    /// by all of them.
    pub fn for_peer(handle: &Handle, access: Access, peer: Peer, lists: WorkerLists) -> Drove1 {
        Drove1 {
            peer: Some(peer),
            lists,
            ..Drove1::new(handle, access)
        }
    }

    /// Sends a command and waits for its reply.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, BusError> {
        let (tx, rx) = oneshot::channel();
        let stopping = || BusError::from(ControlError::Stopping);
        self.commands.send(make(tx)).await.map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())
    }

    /// Resolves the caller's uid from the bus (never from arguments) and
    /// checks it.
    async fn authorize(
        &self,
        header: &Header<'_>,
        conn: &Connection,
        action: &str,
    ) -> Result<Grant, BusError> {
        if let Some(peer) = self.peer {
            let who = format!("private socket, pid {}", peer.pid);
            return self.decide(peer.uid, &who, action).await;
        }
        let sender = header.sender().ok_or_else(|| {
            BusError::AccessDenied("access denied: the call has no sender".into())
        })?;
        let dbus = self
            .dbus
            .get_or_try_init(|| async {
                zbus::fdo::DBusProxy::builder(conn)
                    .cache_properties(zbus::proxy::CacheProperties::No)
                    .build()
                    .await
            })
            .await?;
        let uid = dbus
            .get_connection_unix_user(BusName::Unique(sender.clone()))
            .await
            .map_err(|e| {
                BusError::AccessDenied(format!("access denied: cannot identify {sender}: {e}"))
            })?;
        self.decide(uid, sender.as_str(), action).await
    }

    /// Checks `uid` (reached through `who`) and logs the answer.
    async fn decide(&self, uid: u32, who: &str, action: &str) -> Result<Grant, BusError> {
        let result = self.access.check(uid, action).await;
        match &result {
            Ok(_) => info!(event = "control", "{action} requested by uid {uid} ({who})"),
            Err(_) => self.access.log_denied(uid, who, action),
        }
        result
    }

    fn snap(&self) -> watch::Ref<'_, Snapshot> {
        self.snapshot.borrow()
    }
}

#[interface(
    name = "org.drove.Drove1",
    proxy(default_path = "/org/drove/Drove1", gen_blocking = false)
)]
impl Drove1 {
    /// Sets the target number of workers (within Min..Max); returns it.
    #[zbus(out_args("target"))]
    async fn scale(
        &self,
        n: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<u32, BusError> {
        self.authorize(&header, conn, &format!("Scale({n})"))
            .await?;
        Ok(self.ask(|reply| Command::Scale { n, reply }).await??)
    }

    /// Sets the pool limits; returns them.
    #[zbus(out_args("min", "max"))]
    async fn set_limits(
        &self,
        min: u32,
        max: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(u32, u32), BusError> {
        let grant = self
            .authorize(&header, conn, &format!("SetLimits({min}, {max})"))
            .await?;
        let privileged = grant == Grant::Root;
        Ok(self
            .ask(|reply| Command::SetLimits {
                min,
                max,
                privileged,
                reply,
            })
            .await??)
    }

    /// Re-reads the configuration; returns when a resulting rolling
    /// restart has finished.
    async fn reload(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        self.authorize(&header, conn, "Reload").await?;
        Ok(self.ask(|reply| Command::Reload { reply }).await??)
    }

    /// Replaces the droved binary in place (same pid).
    async fn upgrade(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        self.authorize(&header, conn, "Upgrade").await?;
        Ok(self.ask(|reply| Command::Upgrade { reply }).await??)
    }

    /// Rolling restart of all workers; returns when it has finished.
    async fn restart_workers(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        self.authorize(&header, conn, "RestartWorkers").await?;
        Ok(self
            .ask(|reply| Command::RestartWorkers { reply })
            .await??)
    }

    /// The rollout in progress: `action` is "status" (anyone), or "pause",
    /// "resume", "abort" (like Reload, root, droved's user or
    /// control.group). Returns the rollout's status line.
    async fn rollout(
        &self,
        action: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, BusError> {
        let action: RolloutAction = action.parse()?;
        if action != RolloutAction::Status {
            self.authorize(&header, conn, "Rollout").await?;
        }
        Ok(self
            .ask(|reply| Command::Rollout { action, reply })
            .await??)
    }

    /// The workers: pid, slot, state, generation, age (s), RSS (bytes),
    /// CPU (s), last STATUS=.
    async fn list_workers(&self) -> Result<Vec<Worker>, BusError> {
        let ask = self.ask(|reply| Command::ListWorkers { reply });
        let mut list = self.lists.get(ask).await?;
        list.sort_by_key(|w| (w.slot, w.pid));
        Ok(list)
    }

    /// Memory of the workers and templates from /proc/PID/smaps_rollup:
    /// pid, PSS, USS, swap (bytes). Processes droved cannot read are left
    /// out. Readings may be up to 10 s old (each costs a page-table walk).
    async fn list_memory(&self) -> Result<Vec<ProcessMemory>, BusError> {
        // Only the pids: a ListWorkers here would read every worker's
        // /proc/PID/stat on droved's loop for nothing.
        let pids: Vec<u32> = self.ask(|reply| Command::ListPids { reply }).await?;
        let read = move || {
            pids.iter()
                .filter_map(|&raw| {
                    let pid = nix::unistd::Pid::from_raw(i32::try_from(raw).ok()?);
                    let m = memory::read_cached(pid, Duration::from_secs(10)).ok()?;
                    Some(ProcessMemory {
                        pid: raw,
                        pss_bytes: m.pss,
                        uss_bytes: m.uss,
                        swap_bytes: m.swap,
                    })
                })
                .collect()
        };
        tokio::task::spawn_blocking(read).await.map_err(|e| {
            BusError::ZBus(zbus::Error::Failure(format!("reading memory failed: {e}")))
        })
    }

    /// The ready workers droved could read: pid, busy (holds a connection
    /// accepted from a listener), and for how long in seconds (0 when
    /// idle), as last sampled (at most a second old).
    async fn list_activity(&self) -> Result<Vec<WorkerActivity>, BusError> {
        let mut list = self.ask(|reply| Command::ListActivity { reply }).await?;
        list.sort_by_key(|w| w.pid);
        Ok(list)
    }

    // ---- properties: constant -----------------------------------------

    #[zbus(property(emits_changed_signal = "const"))]
    fn instance(&self) -> String {
        self.snap().instance.clone()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        self.snap().version.clone()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn pid(&self) -> u32 {
        self.snap().pid
    }

    /// control.group as droved started with ("" when none).
    #[zbus(property(emits_changed_signal = "const"))]
    fn control_group(&self) -> String {
        self.access.group.clone().unwrap_or_default()
    }

    /// Seconds since droved started; changes constantly, so it is never
    /// signalled.
    #[zbus(property(emits_changed_signal = "false"))]
    fn uptime(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    // ---- properties: live (PropertiesChanged from the snapshot) -------

    /// starting, running, reloading, upgrading or stopping.
    #[zbus(property)]
    fn state(&self) -> String {
        self.snap().phase.to_string()
    }

    /// The one-line summary droved also sends as STATUS=.
    #[zbus(property)]
    fn status(&self) -> String {
        self.snap().status_line()
    }

    #[zbus(property)]
    fn failing(&self) -> bool {
        self.snap().failing
    }

    #[zbus(property)]
    fn failure(&self) -> String {
        self.snap().failure.clone().unwrap_or_default()
    }

    #[zbus(property)]
    fn generation(&self) -> u64 {
        self.snap().generation
    }

    #[zbus(property)]
    fn min(&self) -> u32 {
        self.snap().min
    }

    #[zbus(property)]
    fn max(&self) -> u32 {
        self.snap().max
    }

    #[zbus(property)]
    fn target(&self) -> u32 {
        self.snap().target
    }

    #[zbus(property)]
    fn ready(&self) -> u32 {
        self.snap().ready
    }

    #[zbus(property)]
    fn starting(&self) -> u32 {
        self.snap().starting
    }

    #[zbus(property)]
    fn stopping(&self) -> u32 {
        self.snap().stopping
    }

    /// Ready workers that hold a connection accepted from a listener; -1
    /// when droved cannot tell.
    #[zbus(property)]
    fn busy(&self) -> i32 {
        super::opt_i32(self.snap().busy)
    }

    /// Ready workers that hold none; -1 when droved cannot tell.
    #[zbus(property)]
    fn idle(&self) -> i32 {
        super::opt_i32(self.snap().idle)
    }

    /// Sum of the readable accept queues; -1 when none is readable.
    #[zbus(property)]
    fn queue_depth(&self) -> i32 {
        super::opt_i32(self.snap().queued)
    }

    /// Per listener: name, address, family, queued, backlog, error.
    #[zbus(property)]
    fn listeners(&self) -> Vec<Listener> {
        self.snap().listeners.iter().map(Listener::from).collect()
    }

    /// The last scaling decision and its reason ("" before the first).
    #[zbus(property)]
    fn last_scale(&self) -> String {
        self.snap().last_scale.clone().unwrap_or_default()
    }

    #[zbus(property)]
    fn spawned(&self) -> u64 {
        self.snap().spawned
    }

    #[zbus(property)]
    fn exited(&self) -> u64 {
        self.snap().exited
    }

    #[zbus(property)]
    fn failed_starts(&self) -> u64 {
        self.snap().failed_starts
    }

    #[zbus(property)]
    fn reloads(&self) -> u64 {
        self.snap().reloads
    }

    #[zbus(property)]
    fn upgrades(&self) -> u64 {
        self.snap().upgrades
    }

    #[zbus(property)]
    fn journal_stalled(&self) -> bool {
        self.snap().journal_stalled
    }

    #[zbus(property)]
    fn log_dropped(&self) -> u64 {
        self.snap().log_dropped
    }

    #[zbus(property)]
    fn template(&self) -> String {
        self.snap().template.clone().unwrap_or_default()
    }

    // ---- signals ------------------------------------------------------

    #[zbus(signal)]
    async fn worker_started(
        emitter: &SignalEmitter<'_>,
        pid: u32,
        slot: u32,
        generation: u64,
    ) -> zbus::Result<()>;

    /// `status` is how it ended, e.g. "status 1" or "signal SIGKILL";
    /// `uptime` is in seconds.
    #[zbus(signal)]
    async fn worker_exited(
        emitter: &SignalEmitter<'_>,
        pid: u32,
        slot: u32,
        status: &str,
        uptime: f64,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn scaled(
        emitter: &SignalEmitter<'_>,
        old: u32,
        new: u32,
        reason: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn reloaded(emitter: &SignalEmitter<'_>, generation: u64) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn upgraded(emitter: &SignalEmitter<'_>, version: &str) -> zbus::Result<()>;

    /// A guarded rollout failed and is being undone (`[rollout]`).
    #[zbus(signal)]
    async fn rolled_back(
        emitter: &SignalEmitter<'_>,
        generation: u64,
        reason: &str,
    ) -> zbus::Result<()>;
}

/// Connects to `bus`, serves the object, takes the instance's name (after
/// registering the object, so no caller sees the name without it), and
/// forwards snapshots and events in a background task, which keeps the
/// connection open until the supervisor is gone. That task ends after it
/// signalled the supervisor's last state (stopping): await it before the
/// process exits, so observers see it.
///
/// When the bus goes away (dbus-daemon restarted), the task connects and
/// takes the name again, as systemd does, retrying with a back-off from
/// [`RECONNECT_FIRST`] to [`RECONNECT_MAX`]; the pool never notices.
pub async fn serve(
    bus: BusKind,
    handle: Handle,
    access: Access,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let instance = handle.snapshot.borrow().instance.clone();
    let name = super::bus_name(&instance)?;
    let conn = connect(bus, &handle, &access, &name, &instance).await?;
    info!("serving {name} on the {bus} bus");
    // The task owns the connection: it lives as long as the supervisor.
    // Subscribed now, not in the task: an event sent right after this
    // returns (the new image's Upgraded) must reach the bus.
    let mut events = handle.events.subscribe();
    let forwarding = tokio::spawn(async move {
        let mut conn = conn;
        loop {
            let closed = connection_closed(conn.clone());
            let ended = forward(conn, handle.snapshot.clone(), events, closed).await;
            if ended == Ended::SupervisorGone {
                return;
            }
            warn!("lost the {bus} bus connection; taking {name} again once the bus is back");
            let mut delay = RECONNECT_FIRST;
            conn = loop {
                tokio::time::sleep(delay).await;
                if handle.snapshot.has_changed().is_err() {
                    return; // the supervisor is gone meanwhile
                }
                match connect(bus, &handle, &access, &name, &instance).await {
                    Ok(conn) => break conn,
                    Err(e) => {
                        debug!("{e:#}; retrying in {delay:?}");
                        delay = (delay * 2).min(RECONNECT_MAX);
                    }
                }
            };
            events = handle.events.subscribe();
            info!("serving {name} on the {bus} bus again");
        }
    });
    Ok(forwarding)
}

/// First wait before connecting to a bus that went away.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(250);
/// Longest wait between attempts to reach a bus that went away.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

async fn connect(
    bus: BusKind,
    handle: &Handle,
    access: &Access,
    name: &str,
    instance: &str,
) -> Result<Connection, ServeError> {
    let object = Drove1::new(handle, access.clone());
    let conn = bus
        .builder()
        .and_then(|b| b.serve_at(OBJECT_PATH, object))
        .map_err(|e| ServeError::Connect(bus, e))?
        .build()
        .await
        .map_err(|e| ServeError::Connect(bus, e))?;
    take_name(&conn, name).await.map_err(|e| match e {
        zbus::Error::NameTaken => {
            ServeError::NameTaken(bus, name.to_string(), instance.to_string())
        }
        e => ServeError::RequestName(bus, name.to_string(), e),
    })?;
    Ok(conn)
}

/// Completes when `conn`'s socket is closed (the bus went away).
async fn connection_closed(conn: Connection) {
    use futures_lite::StreamExt;
    let mut messages = zbus::MessageStream::from(&conn);
    drop(conn);
    while messages.next().await.is_some() {}
}

/// Logs the counts of denied calls (bus and private socket alike) every
/// [`DENIAL_WINDOW`], for as long as the runtime lives.
pub fn report_denials(access: Access) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(DENIAL_WINDOW);
        loop {
            tick.tick().await;
            access.flush_denials();
        }
    });
}

/// Requests `name` without queueing. After a binary upgrade (exec in
/// place) the name may still belong to our own pre-exec connection until
/// the bus notices it closed: while the owner is our own pid, retry for up
/// to 5 s instead of failing.
async fn take_name(conn: &Connection, name: &str) -> zbus::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match conn
            .request_name_with_flags(name, zbus::fdo::RequestNameFlags::DoNotQueue.into())
            .await
        {
            Err(zbus::Error::NameTaken) if Instant::now() < deadline => {
                let dbus = zbus::fdo::DBusProxy::new(conn).await?;
                let wkn = zbus::names::WellKnownName::try_from(name)?;
                let owner_pid = match dbus.get_name_owner(wkn.into()).await {
                    Ok(owner) => dbus
                        .get_connection_unix_process_id(owner.into_inner().into())
                        .await
                        .ok(),
                    // Released meanwhile: just ask again.
                    Err(_) => Some(std::process::id()),
                };
                if owner_pid != Some(std::process::id()) {
                    return Err(zbus::Error::NameTaken);
                }
                debug!("{name} still held by our pre-exec connection; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other.map(|_| ()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Name(#[from] super::NameTooLong),
    #[error("cannot connect to the {0} bus")]
    Connect(BusKind, #[source] zbus::Error),
    #[error(
        "{1} is already taken on the {0} bus: is another droved with instance {2:?} running? (pick another with --instance)"
    )]
    NameTaken(BusKind, String, String),
    #[error(
        "cannot take the name {1} on the {0} bus (is the D-Bus policy org.drove.Drove1.conf installed?)"
    )]
    RequestName(BusKind, String, #[source] zbus::Error),
}

/// Why [`forward`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// `until` completed: the connection closed.
    Closed,
    /// The supervisor is gone (droved stops).
    SupervisorGone,
}

/// Turns snapshot changes into PropertiesChanged and events into signals,
/// until the supervisor is gone or `until` completes (the connection
/// closed).
pub(super) async fn forward(
    conn: Connection,
    mut snapshot: watch::Receiver<Snapshot>,
    mut events: broadcast::Receiver<Event>,
    until: impl std::future::Future<Output = ()>,
) -> Ended {
    tokio::pin!(until);
    let emitter = match SignalEmitter::new(&conn, OBJECT_PATH) {
        Ok(e) => e,
        Err(e) => {
            warn!("D-Bus: cannot emit signals: {e}");
            return Ended::SupervisorGone;
        }
    };
    let iface = InterfaceName::from_static_str_unchecked(super::INTERFACE);
    let mut last = super::properties::live_properties(&snapshot.borrow_and_update());
    // Once, as this connection starts serving: observers that cached the
    // properties of a previous image (a binary upgrade, a restart) would
    // otherwise keep its last values, e.g. State "upgrading", until the
    // next change.
    let all: HashMap<&str, Value<'_>> = last
        .iter()
        .map(|(name, v)| (*name, v.try_clone().expect("no fds in properties")))
        .collect();
    if let Err(e) =
        zbus::fdo::Properties::properties_changed(&emitter, iface.clone(), all, Cow::Borrowed(&[]))
            .await
    {
        debug!("D-Bus: PropertiesChanged: {e}");
    }
    loop {
        tokio::select! {
            _ = &mut until => return Ended::Closed,
            changed = snapshot.changed() => {
                if changed.is_err() {
                    return Ended::SupervisorGone;
                }
                let now = super::properties::live_properties(&snapshot.borrow_and_update());
                let diff: HashMap<&str, Value<'_>> = now
                    .iter()
                    .zip(&last)
                    .filter(|((_, new), (_, old))| new != old)
                    .map(|((name, v), _)| (*name, v.try_clone().expect("no fds in properties")))
                    .collect();
                if !diff.is_empty()
                    && let Err(e) = zbus::fdo::Properties::properties_changed(
                        &emitter,
                        iface.clone(),
                        diff,
                        Cow::Borrowed(&[]),
                    )
                    .await
                {
                    debug!("D-Bus: PropertiesChanged: {e}");
                }
                last = now;
            }
            event = events.recv() => match event {
                Ok(event) => {
                    if let Err(e) = emit(&emitter, &event).await {
                        debug!("D-Bus: signal for {event:?}: {e}");
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!("D-Bus: {n} events dropped (signals lagged behind)");
                }
                Err(broadcast::error::RecvError::Closed) => return Ended::SupervisorGone,
            },
        }
    }
}

async fn emit(emitter: &SignalEmitter<'_>, event: &Event) -> zbus::Result<()> {
    match event {
        Event::WorkerStarted {
            pid,
            slot,
            generation,
        } => Drove1::worker_started(emitter, *pid, *slot, *generation).await,
        Event::WorkerExited {
            pid,
            slot,
            status,
            uptime_secs,
        } => Drove1::worker_exited(emitter, *pid, *slot, status, *uptime_secs).await,
        Event::Scaled { from, to, reason } => Drove1::scaled(emitter, *from, *to, reason).await,
        Event::Reloaded { generation } => Drove1::reloaded(emitter, *generation).await,
        Event::Upgraded { version } => Drove1::upgraded(emitter, version).await,
        Event::RolledBack { generation, reason } => {
            Drove1::rolled_back(emitter, *generation, reason).await
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn list_workers_callers_waiting_together_share_one_fresh_answer() {
        let lists = WorkerLists::default();
        let asked = AtomicU32::new(0);
        let (release, held) = oneshot::channel::<()>();
        let ask = |gate: Option<oneshot::Receiver<()>>| {
            let asked = &asked;
            async move {
                if let Some(gate) = gate {
                    let _ = gate.await;
                }
                asked.fetch_add(1, Ordering::SeqCst);
                Ok(Vec::new())
            }
        };
        // One caller's request is in flight while three more arrive: they
        // need an answer made after they arrived, so one more request,
        // which all three share.
        let release = async {
            tokio::task::yield_now().await;
            release.send(()).unwrap();
        };
        let (a, b, c, d, ()) = tokio::join!(
            lists.get(ask(Some(held))),
            lists.get(ask(None)),
            lists.get(ask(None)),
            lists.get(ask(None)),
            release
        );
        for r in [a, b, c, d] {
            r.unwrap();
        }
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        // A caller arriving later gets a new answer.
        lists.get(ask(None)).await.unwrap();
        assert_eq!(asked.load(Ordering::SeqCst), 3);
    }
}
