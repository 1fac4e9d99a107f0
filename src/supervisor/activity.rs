//! Busy and idle workers, from the kernel alone.
//!
//! **A worker is busy while it holds a connection accepted from droved's
//! listeners, and idle otherwise.** droved finds the connections open on
//! its listeners (sock_diag: TCP sockets with a listener's local address,
//! unix sockets bound to a listener's name) and matches their inodes with
//! the `socket:[N]` links in each worker's /proc/PID/fd, read as the
//! worker's owner (`sys::owner`), so it works for TCP and unix listeners
//! alike, for workers of any user, and for servers that tell droved
//! nothing. What it means:
//! - a synchronous server (gunicorn sync, php-cgi, a one-request-at-a-time
//!   worker) is busy exactly while it serves a request, including while it
//!   waits on a database or reads a slow client; idle while it waits in
//!   accept(2) or poll(2) on the listeners;
//! - a threaded or asynchronous server (gthread, Puma, uvicorn, Node) is
//!   busy while it holds at least one connection, whatever it does with it:
//!   "has clients", not "has no room left";
//! - a keep-alive connection keeps its worker busy until one side closes
//!   it (servers close idle ones after a few seconds by default: gunicorn
//!   2 s, uvicorn and Node 5 s), so a busy period is one connection, not
//!   one request.
//!
//! Each busy worker keeps the time it was first seen holding the
//! connections it holds now (`busy_since`, reset when none of them is
//! left): "on one connection for at least this long", to the sampling
//! period. Only ready workers are sampled.
//!
//! **A request waits on a TCP connection** while data came in after the
//! last data went out (the kernel's tcp_info, asked for only with
//! `worker.request_timeout`; see `sys::conns::Exchange`), for as long as
//! nothing goes out on that connection: an answer (or its first byte) ends
//! the wait, an idle keep-alive connection never starts one, and
//! back-to-back requests on one connection each start their own. A wait
//! starts when the request's last byte came, but never before droved first
//! saw the connection held: a request that sat in the accept queue while
//! the pool was saturated is not the worker's time. Connections are
//! watched every [`WATCH_EVERY`] for that (a dump, no /proc read), so a
//! wait is seen that much late at most, never early. A worker has been on
//! one request for the longest wait among the connections it holds. When
//! the first wait would pass the limit, a fresh sample of every worker
//! decides ([`Activity::request_deadline`], [`Activity::take_overdue`]).
//!
//! Cost: a sample is due once per [`SAMPLE_EVERY`] (and is taken afresh
//! right before a scale-down chooses whom to retire, and before the last
//! worker goes at `min = 0`). When no connection is open on the listeners,
//! every worker is idle and no worker's /proc is read. A TCP dump walks
//! the kernel's whole connection table (~1.5 ms per address family on a
//! 24 GB machine), so after one that found none open, the next waits for
//! the namespace's passive-open counter to move (else nothing can have
//! changed), and then, for the reports, also for a tick that saw a queue
//! or for [`QUIET_TCP_DUMP_EVERY`]: on a quiet pool in a busy namespace
//! the reports may see a new busy worker that much later, decisions never.
//! Otherwise workers are read oldest reading first, within [`BUDGET`], and
//! stop being read once every open connection is found.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use tracing::{debug, warn};

use super::pool::StopReason;

use super::Supervisor;
use super::pool::WorkerState;
use crate::sys::conns::{self, Held, ListenerKey, Waiting};

/// How often the pool's activity is sampled for the reports.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// With `worker.request_timeout`, how often the open connections are
/// listed (no worker is read): the first sighting of a connection bounds
/// when its worker took it.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);
/// Time one sample may spend reading workers' fds (at least one is read).
pub const BUDGET: Duration = Duration::from_millis(5);
/// While the last TCP dump found no connection open and connections came
/// to other listeners of the namespace since, how often a sample for the
/// reports dumps again (unless a tick saw connections queued): each dump
/// walks the kernel's whole connection table.
pub const QUIET_TCP_DUMP_EVERY: Duration = Duration::from_secs(5);

/// What the last reading of a worker found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Idle,
    /// Holding the connections `conns` (socket inodes), since `since`.
    Busy {
        since: Instant,
        conns: Vec<u64>,
    },
    /// Its fds could not be read (it exited meanwhile, or droved may not
    /// look: not root, and the worker changed its own user).
    Unknown,
}

#[derive(Debug, Clone)]
struct Reading {
    seen: Seen,
    at: Instant,
}

/// The connections open on the listeners, as a sample found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Open {
    /// Their socket inodes, with their exchanges where known.
    Connections(Held),
    /// droved cannot tell, and why.
    Unknown(String),
}

/// The activity of the pool's ready workers. Pure: the I/O comes in as
/// arguments and closures.
#[derive(Debug, Default)]
pub struct Activity {
    readings: HashMap<Pid, Reading>,
    last: Option<Instant>,
    /// The last TCP dump, if it found no connection open: when, and the
    /// passive-open count read right before it.
    tcp_quiet: Option<(Instant, Option<u64>)>,
    /// A tick saw connections queued since the last TCP dump.
    queue_seen: bool,
    /// Why the last sample could not tell (the counts are unknown).
    blind: Option<String>,
    /// (busy, idle) among the workers of the last sample: counted once per
    /// sample, not on every report (a pool of 1,024 made that a tenth of
    /// droved's idle CPU).
    counts: Option<(u32, u32)>,
    /// The connections on which a request waits for its answer, by inode.
    waits: HashMap<u64, Wait>,
    /// When each open connection was first seen held, by inode.
    first_seen: HashMap<u64, Instant>,
    /// The last listing of the open connections (a sample or a watch).
    last_watch: Option<Instant>,
    /// Which listeners `worker.request_timeout` cannot time was said.
    timing_announced: bool,
}

/// A request waiting on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Wait {
    since: Instant,
    /// The connection's data segments out when the wait was first seen:
    /// any change ends this wait.
    segments_out: u32,
    /// A sample at its deadline has dealt with it (its worker was reported,
    /// or no ready worker holds it): its deadline no longer calls for one.
    checked: bool,
    /// Only ever seen as [`Waiting::Tied`]: maybe no request at all.
    tied: bool,
}

/// A worker on one request past the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overdue {
    pub pid: Pid,
    /// How long it has been on it.
    pub on: Duration,
    /// Every wait that put it over is [`Waiting::Tied`]: whether the worker
    /// waits for input decides ([`conns::waits_for_input`]).
    pub tied: bool,
    /// The connections it holds.
    pub conns: Vec<u64>,
}

impl Activity {
    /// Whether a sample for the reports is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|t| now.saturating_duration_since(t) >= SAMPLE_EVERY)
    }

    /// Whether the TCP connections must be dumped at `now`, given the
    /// passive-open count now, for a `decision` or for the reports. After
    /// a dump that found none open: not while the count is what it was
    /// before it (no connection has come since: exact); else for a
    /// decision, once a tick saw a queue, or [`QUIET_TCP_DUMP_EVERY`]
    /// after it.
    pub fn tcp_dump_needed(
        &self,
        passive_opens: Option<u64>,
        now: Instant,
        decision: bool,
    ) -> bool {
        let Some((at, count)) = self.tcp_quiet else {
            return true;
        };
        if passive_opens.is_some() && passive_opens == count {
            return false;
        }
        decision || self.queue_seen || now.saturating_duration_since(at) >= QUIET_TCP_DUMP_EVERY
    }

    /// A TCP dump was made at `now` after reading `passive_opens`; it
    /// found `found` connections open.
    pub fn tcp_dumped(&mut self, passive_opens: Option<u64>, found: usize, now: Instant) {
        self.tcp_quiet = (found == 0).then_some((now, passive_opens));
        self.queue_seen = false;
    }

    /// A tick saw connections queued on the listeners.
    pub fn queued(&mut self) {
        self.queue_seen = true;
    }

    /// Takes a sample at `now` of the workers `ready`: `open` is what the
    /// listeners hold, `sockets_of` a worker's socket inodes (`None` when
    /// unreadable), `spent` the time used so far, which may reach `budget`
    /// (at least one worker is read).
    pub fn sample(
        &mut self,
        now: Instant,
        ready: &[Pid],
        open: Open,
        budget: Duration,
        mut sockets_of: impl FnMut(Pid) -> Option<Vec<u64>>,
        spent: impl Fn() -> Duration,
    ) {
        self.last = Some(now);
        let keep: HashSet<Pid> = ready.iter().copied().collect();
        self.readings.retain(|pid, _| keep.contains(pid));
        let mut remaining = match open {
            Open::Unknown(why) => {
                self.blind = Some(why);
                self.counts = None;
                self.waits.clear();
                self.first_seen.clear();
                return;
            }
            Open::Connections(c) => c,
        };
        self.blind = None;
        self.watch(&remaining, now);
        let mut order: Vec<(Option<Instant>, Pid)> = ready
            .iter()
            .map(|&pid| (self.readings.get(&pid).map(|r| r.at), pid))
            .collect();
        // Never read first (None sorts first), then the oldest reading.
        order.sort_unstable();
        for (i, (_, pid)) in order.into_iter().enumerate() {
            let seen = if remaining.is_empty() {
                // Every open connection is someone else's.
                Seen::Idle
            } else if i > 0 && spent() >= budget {
                // Out of time: the old reading stands until the next sample.
                continue;
            } else {
                match sockets_of(pid) {
                    None => Seen::Unknown,
                    Some(sockets) => {
                        let conns: Vec<u64> = sockets
                            .into_iter()
                            .filter(|s| remaining.remove(s).is_some())
                            .collect();
                        let before = self.readings.get(&pid).map(|r| &r.seen);
                        busy_or_idle(before, conns, now)
                    }
                }
            };
            self.readings.insert(pid, Reading { seen, at: now });
        }
        self.counts = self.count(ready);
    }

    /// What the last reading of `pid` found; `None` if it was never read.
    pub fn seen(&self, pid: Pid) -> Option<&Seen> {
        self.readings.get(&pid).map(|r| &r.seen)
    }

    /// Idle at its last reading (scale-down retires these first).
    pub fn is_idle(&self, pid: Pid) -> bool {
        self.blind.is_none() && self.seen(pid) == Some(&Seen::Idle)
    }

    /// Busy at its last reading.
    pub fn is_busy(&self, pid: Pid) -> bool {
        self.blind.is_none() && matches!(self.seen(pid), Some(Seen::Busy { .. }))
    }

    /// Since when `pid` holds the connections it held at its last reading.
    pub fn busy_since(&self, pid: Pid) -> Option<Instant> {
        match self.seen(pid) {
            Some(Seen::Busy { since, .. }) if self.blind.is_none() => Some(*since),
            _ => None,
        }
    }

    /// True the first time only: whether to say which listeners
    /// `worker.request_timeout` cannot time.
    pub fn first_timed_tick(&mut self) -> bool {
        !std::mem::replace(&mut self.timing_announced, true)
    }

    /// Whether the open connections are due to be watched at `now`
    /// (`worker.request_timeout`).
    pub fn watch_due(&self, now: Instant) -> bool {
        self.last_watch
            .is_none_or(|t| now.saturating_duration_since(t) >= WATCH_EVERY)
    }

    /// The open connections at `now` (a sample's, or a watch's listing):
    /// when each was first seen, and the waits on them.
    pub fn watch(&mut self, open: &Held, now: Instant) {
        self.last_watch = Some(now);
        self.first_seen.retain(|inode, _| open.contains_key(inode));
        for inode in open.keys() {
            self.first_seen.entry(*inode).or_insert(now);
        }
        track_waits(&mut self.waits, &self.first_seen, open, now);
    }

    /// How long `pid` has been on one request, as of `now`: the longest
    /// wait on the connections it held at its last reading.
    pub fn on_request_for(&self, pid: Pid, now: Instant) -> Option<Duration> {
        let Some(Seen::Busy { conns, .. }) = self.seen(pid) else {
            return None;
        };
        conns
            .iter()
            .filter_map(|c| self.waits.get(c))
            .map(|w| now.saturating_duration_since(w.since))
            .max()
    }

    /// When the first wait not yet dealt with passes `limit`.
    pub fn request_deadline(&self, limit: Duration) -> Option<Instant> {
        self.waits
            .values()
            .filter(|w| !w.checked)
            .map(|w| w.since + limit)
            .min()
    }

    /// After a fresh sample at `now`: the workers among `ready` on one
    /// request for longer than `limit` (by a wait not dealt with yet), and
    /// how long. Every wait past its deadline is then dealt with: it is
    /// taken once, and calls for no more samples.
    pub fn take_overdue(&mut self, ready: &[Pid], limit: Duration, now: Instant) -> Vec<Overdue> {
        let over_now = |w: &Wait| !w.checked && now.saturating_duration_since(w.since) > limit;
        let mut out = Vec::new();
        for &pid in ready {
            let Some(Seen::Busy { conns, .. }) = self.seen(pid) else {
                continue;
            };
            let over: Vec<&Wait> = conns
                .iter()
                .filter_map(|c| self.waits.get(c))
                .filter(|w| over_now(w))
                .collect();
            if over.is_empty() {
                continue;
            }
            out.push(Overdue {
                pid,
                on: self.on_request_for(pid, now).unwrap_or_default(),
                tied: over.iter().all(|w| w.tied),
                conns: conns.clone(),
            });
        }
        // The same test as over_now: a wait exactly at the limit is not
        // over it yet, and must not be dealt with unreported.
        for w in self.waits.values_mut() {
            if now.saturating_duration_since(w.since) > limit {
                w.checked = true;
            }
        }
        out
    }

    /// (busy, idle) among the workers of the last sample; workers never
    /// read or unreadable are in neither. `None` before the first sample,
    /// and when nothing is known of any of them.
    pub fn counts(&self) -> Option<(u32, u32)> {
        self.counts
    }

    fn count(&self, ready: &[Pid]) -> Option<(u32, u32)> {
        let (mut busy, mut idle, mut unknown) = (0, 0, 0);
        for &pid in ready {
            match self.seen(pid) {
                Some(Seen::Busy { .. }) => busy += 1,
                Some(Seen::Idle) => idle += 1,
                _ => unknown += 1,
            }
        }
        (busy + idle > 0 || unknown == 0).then_some((busy, idle))
    }
}

/// Counts of a sample made when there were `ready` workers: a worker that
/// left since is taken from the idle ones first (a second at most, until
/// the next sample). Pure.
pub fn within((busy, idle): (u32, u32), ready: u32) -> (u32, u32) {
    let busy = busy.min(ready);
    (busy, idle.min(ready - busy))
}

/// The waits on the open connections `open` at `now`: a wait goes on while
/// its connection is open, a request still waits on it and nothing went
/// out since it was first seen. It began when the request's last byte
/// came, as first seen (later readings come after later bytes), but not
/// before the connection was first seen held (`first_seen`). Pure.
fn track_waits(
    waits: &mut HashMap<u64, Wait>,
    first_seen: &HashMap<u64, Instant>,
    open: &Held,
    now: Instant,
) {
    let waiting = |e: &Option<conns::Exchange>| match e.map(|e| e.waiting) {
        Some(Waiting::Since(ago)) => Some((ago, false)),
        Some(Waiting::Tied(ago)) => Some((ago, true)),
        Some(Waiting::No) | None => None,
    };
    waits.retain(|inode, _| open.get(inode).and_then(waiting).is_some());
    for (inode, exchange) in open {
        let Some((ago, tied)) = waiting(exchange) else {
            continue;
        };
        let segments_out = exchange.map_or(0, |e| e.segments_out);
        let came = now.checked_sub(ago).unwrap_or(now);
        let since = first_seen.get(inode).map_or(came, |&seen| came.max(seen));
        match waits.get_mut(inode) {
            // The same wait, unless it was a tie and data came since: then
            // the tie was most likely a request answered at once (its
            // worker may have been spared as waiting for input), and this
            // is the next request, with a clock of its own.
            Some(w) if w.segments_out == segments_out && (!w.tied || tied) => {
                w.since = w.since.min(since);
            }
            _ => {
                waits.insert(
                    *inode,
                    Wait {
                        since,
                        segments_out,
                        checked: false,
                        tied,
                    },
                );
            }
        }
    }
}

/// A worker's new state from the open connections it holds now and what it
/// was before: its busy period goes on while it holds one it held then.
/// Pure.
fn busy_or_idle(before: Option<&Seen>, conns: Vec<u64>, now: Instant) -> Seen {
    if conns.is_empty() {
        return Seen::Idle;
    }
    let since = match before {
        Some(Seen::Busy { since, conns: old }) if conns.iter().any(|c| old.contains(c)) => *since,
        _ => now,
    };
    Seen::Busy { since, conns }
}

/// The listeners' keys, worked out once (listeners never change while
/// droved runs), or why busy workers cannot be told.
pub(super) type Keys = Result<Vec<ListenerKey>, String>;

/// The keys of the listeners, or why droved cannot see their connections.
fn listener_keys(listeners: &[crate::sys::listen::Listener]) -> Keys {
    listeners
        .iter()
        .map(|l| {
            if conns::in_other_netns(l.as_fd()) {
                return Err(format!(
                    "listener {} is in another network namespace than droved",
                    l.address
                ));
            }
            conns::key_of(l.as_fd())
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("listener {} has no address to match", l.address))
        })
        .collect()
}

impl Supervisor {
    /// On the tick: a sample for the reports, once per [`SAMPLE_EVERY`],
    /// within [`BUDGET`].
    pub(super) fn activity_tick(&mut self, now: Instant) {
        if self.queued_total().unwrap_or(0) > 0 {
            self.activity.queued();
        }
        if self.activity.due(now) {
            // With pool.spare the count decides (the scaler's floor): read
            // it whole and fresh, as for any decision.
            let budget = (self.config.pool.spare == 0).then_some(BUDGET);
            self.sample_activity(now, budget);
        } else if self.config.worker.request_timeout.is_some() && self.activity.watch_due(now) {
            let any_ready = self
                .pool
                .workers
                .values()
                .any(|w| w.state() == WorkerState::Ready);
            if let Open::Connections(open) = self.open_connections(any_ready, now, true) {
                self.activity.watch(&open, now);
            }
        }
        self.request_timeout_tick(now);
    }

    /// Samples the ready workers' activity now, every one of them unless
    /// reading takes longer than `budget`: a decision (whom to retire,
    /// whether the last may go) passes `None`, so that no stale reading
    /// decides. Returns the ready workers it sampled.
    pub(super) fn sample_activity(&mut self, now: Instant, budget: Option<Duration>) -> Vec<Pid> {
        let ready = self.ready_pids();
        let open = self.open_connections(!ready.is_empty(), now, budget.is_none());
        let started = Instant::now();
        let budget = budget.unwrap_or(Duration::MAX);
        self.activity.sample(
            now,
            &ready,
            open,
            budget,
            |pid| conns::sockets_of(pid).ok(),
            || started.elapsed(),
        );
        ready
    }

    fn ready_pids(&self) -> Vec<Pid> {
        self.pool
            .workers
            .values()
            .filter(|w| w.state() == WorkerState::Ready)
            .map(|w| w.pid)
            .collect()
    }

    /// `worker.request_timeout`: when the first wait reaches the limit, a
    /// fresh sample of every worker; each one still on a request past the
    /// limit is aborted (`worker.timeout_signal`, then SIGKILL).
    fn request_timeout_tick(&mut self, now: Instant) {
        let Some(limit) = self.config.worker.request_timeout else {
            return;
        };
        if self.activity.first_timed_tick() {
            self.announce_untimed_listeners();
        }
        if self
            .activity
            .request_deadline(limit)
            .is_none_or(|d| now < d)
        {
            return;
        }
        let ready = self.sample_activity(now, None);
        for over in self.activity.take_overdue(&ready, limit, now) {
            let pid = over.pid;
            // A worker blocked reading one of its connections waits for
            // its client (a slow or silent one sending the rest of a
            // request): not on a request. After a tie (data came in the
            // tick the last went out), one in poll, select or epoll most
            // likely answered at once and waits for the next.
            match conns::waits_for_input(pid, &over.conns, over.tied) {
                Ok(false) => {}
                Ok(true) => {
                    debug!(
                        worker_pid = pid.as_raw(),
                        "waits for input on its connections: not on a request"
                    );
                    continue;
                }
                Err(e) if over.tied => {
                    debug!(
                        worker_pid = pid.as_raw(),
                        "cannot tell whether it waits for input ({e}): not timed"
                    );
                    continue;
                }
                Err(e) => debug!(
                    worker_pid = pid.as_raw(),
                    "cannot tell whether it waits for input ({e}): timed as on a request"
                ),
            }
            warn!(
                worker_pid = pid.as_raw(),
                event = "timeout",
                "worker {pid}: on one request for {:.1} s, over worker.request_timeout ({}); aborting it ({})",
                over.on.as_secs_f64(),
                crate::config::format_duration(limit),
                self.config.worker.timeout_signal.as_str()
            );
            self.stop_worker(pid, StopReason::RequestTimeout, false);
        }
    }

    /// Says once which listeners' requests `worker.request_timeout` cannot
    /// time: unix sockets (the kernel keeps no send and receive times for
    /// them), or all when droved cannot see the connections.
    fn announce_untimed_listeners(&mut self) {
        let keys = self
            .activity_keys
            .get_or_insert_with(|| listener_keys(&self.listeners));
        match keys {
            Err(why) => warn!("worker.request_timeout cannot be kept: {why}"),
            Ok(keys) => {
                for (l, k) in self.listeners.iter().zip(keys.iter()) {
                    if matches!(k, ListenerKey::Unix(_)) {
                        warn!(
                            "worker.request_timeout does not apply to listener {} ({}): \
                             the kernel keeps no request times for unix sockets",
                            l.name, l.address
                        );
                    }
                }
            }
        }
    }

    /// The connections open on the listeners (with no worker ready, no
    /// dump: nobody can hold one), for a `decision` or for the reports.
    /// With `worker.request_timeout`, TCP connections come with their
    /// exchanges, and every sample is as fresh as a decision's (a wait
    /// must not be seen late).
    fn open_connections(&mut self, any_ready: bool, now: Instant, decision: bool) -> Open {
        if !any_ready {
            return Open::Connections(Held::new());
        }
        let timed = self.config.worker.request_timeout.is_some();
        let keys = self
            .activity_keys
            .get_or_insert_with(|| listener_keys(&self.listeners));
        let keys = match keys {
            Ok(k) => k,
            Err(why) => return Open::Unknown(why.clone()),
        };
        let (mut tcp, mut unix) = (Vec::new(), Vec::new());
        for k in keys.iter() {
            match k {
                ListenerKey::Tcp(a) => tcp.push(*a),
                ListenerKey::Unix(n) => unix.push(n.clone()),
            }
        }
        let mut open = Held::new();
        if !tcp.is_empty() {
            let opens = conns::passive_opens()
                .inspect_err(|e| debug!("cannot read the TCP passive-open count: {e}"))
                .ok();
            if self.activity.tcp_dump_needed(opens, now, decision || timed) {
                match conns::held_tcp(&tcp, timed) {
                    Ok(found) => {
                        self.activity.tcp_dumped(opens, found.len(), now);
                        open.extend(found);
                    }
                    Err(e) => return Open::Unknown(format!("cannot list TCP connections: {e}")),
                }
            }
        }
        if !unix.is_empty() {
            match conns::held_unix(&unix) {
                Ok(found) => open.extend(found),
                Err(e) => return Open::Unknown(format!("cannot list unix connections: {e}")),
            }
        }
        Open::Connections(open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    fn open(inodes: &[u64]) -> Open {
        Open::Connections(inodes.iter().map(|&i| (i, None)).collect())
    }

    /// A fake /proc: each worker's socket inodes (absent: unreadable),
    /// and a log of whose fds were read.
    struct Procs {
        sockets: HashMap<i32, Vec<u64>>,
        read: Vec<i32>,
    }

    impl Procs {
        fn new(sockets: &[(i32, &[u64])]) -> Procs {
            Procs {
                sockets: sockets.iter().map(|(p, s)| (*p, s.to_vec())).collect(),
                read: Vec::new(),
            }
        }

        fn sockets_of(&mut self, pid: Pid) -> Option<Vec<u64>> {
            self.read.push(pid.as_raw());
            self.sockets.get(&pid.as_raw()).cloned()
        }
    }

    fn sample(a: &mut Activity, now: Instant, ready: &[i32], o: Open, procs: &mut Procs) {
        let ready: Vec<Pid> = ready.iter().map(|&p| pid(p)).collect();
        a.sample(
            now,
            &ready,
            o,
            BUDGET,
            |p| procs.sockets_of(p),
            || Duration::ZERO,
        );
    }

    #[test]
    fn a_worker_is_busy_while_it_holds_an_open_connection() {
        let t0 = Instant::now();
        let mut a = Activity::default();
        assert_eq!(a.counts(), None, "never sampled");
        // 1 holds connection 100 (and the listener 7 and a DB socket 9,
        // which are not connections of the listeners); 2 holds nothing;
        // 3 cannot be read.
        let mut procs = Procs::new(&[(1, &[7, 100, 9]), (2, &[7, 9]), (4, &[7])]);
        sample(&mut a, t0, &[1, 2, 3], open(&[100, 555]), &mut procs);
        assert!(a.is_busy(pid(1)) && !a.is_idle(pid(1)));
        assert!(a.is_idle(pid(2)) && !a.is_busy(pid(2)));
        assert_eq!(a.seen(pid(3)), Some(&Seen::Unknown));
        assert!(!a.is_idle(pid(3)) && !a.is_busy(pid(3)));
        assert_eq!(a.busy_since(pid(1)), Some(t0));
        assert_eq!(a.counts(), Some((1, 1)));
        // Only unreadable ones: nothing known.
        sample(&mut a, t0, &[3], open(&[100]), &mut procs);
        assert_eq!(a.counts(), None);
        sample(&mut a, t0, &[], open(&[]), &mut procs);
        assert_eq!(a.counts(), Some((0, 0)));
        // A worker gone since the sample leaves the idle ones first.
        assert_eq!(within((1, 2), 3), (1, 2));
        assert_eq!(within((1, 2), 2), (1, 1));
        assert_eq!(within((2, 0), 1), (1, 0));
        assert_eq!(within((0, 3), 0), (0, 0));
    }

    #[test]
    fn a_busy_period_lasts_while_one_of_its_connections_does() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut a = Activity::default();
        let mut procs = Procs::new(&[(1, &[100])]);
        sample(&mut a, t0, &[1], open(&[100]), &mut procs);
        // Still on 100, and a second connection 101 (keep-alive, async).
        procs.sockets.insert(1, vec![100, 101]);
        sample(&mut a, t0 + s, &[1], open(&[100, 101]), &mut procs);
        assert_eq!(a.busy_since(pid(1)), Some(t0));
        procs.sockets.insert(1, vec![101]);
        sample(&mut a, t0 + 2 * s, &[1], open(&[101]), &mut procs);
        assert_eq!(a.busy_since(pid(1)), Some(t0));
        // Back to back on new connections (a loaded sync worker): each is
        // a new busy period.
        procs.sockets.insert(1, vec![102]);
        sample(&mut a, t0 + 3 * s, &[1], open(&[102]), &mut procs);
        assert_eq!(a.busy_since(pid(1)), Some(t0 + 3 * s));
        // Idle, then busy again: from then.
        sample(&mut a, t0 + 4 * s, &[1], open(&[]), &mut procs);
        assert!(a.is_idle(pid(1)) && a.busy_since(pid(1)).is_none());
        sample(&mut a, t0 + 5 * s, &[1], open(&[102]), &mut procs);
        assert_eq!(a.busy_since(pid(1)), Some(t0 + 5 * s));
    }

    #[test]
    fn nothing_open_reads_no_worker_and_all_found_reads_no_more() {
        let t0 = Instant::now();
        let mut a = Activity::default();
        let mut procs = Procs::new(&[(1, &[]), (2, &[100]), (3, &[])]);
        sample(&mut a, t0, &[1, 2, 3], open(&[]), &mut procs);
        assert!(procs.read.is_empty(), "{:?}", procs.read);
        assert_eq!(a.counts(), Some((0, 3)));
        // 100 open: reading stops at its holder; the rest are idle. All
        // were read at t0, so the order is by pid.
        sample(
            &mut a,
            t0 + SAMPLE_EVERY,
            &[1, 2, 3],
            open(&[100]),
            &mut procs,
        );
        assert_eq!(procs.read, vec![1, 2]);
        assert_eq!(a.counts(), Some((1, 2)));
    }

    #[test]
    fn out_of_budget_the_oldest_readings_go_first_and_the_rest_stand() {
        let t0 = Instant::now();
        let mut a = Activity::default();
        let mut procs = Procs::new(&[(1, &[101]), (2, &[102]), (3, &[103])]);
        let all = open(&[101, 102, 103, 999]);
        let ready = [1, 2, 3].map(pid);
        // Time runs out after each read: one worker per sample.
        let spent = || BUDGET;
        a.sample(
            t0,
            &ready,
            all.clone(),
            BUDGET,
            |p| procs.sockets_of(p),
            spent,
        );
        assert_eq!(procs.read, vec![1]);
        assert_eq!(a.counts(), Some((1, 0)), "2 and 3 unknown yet");
        a.sample(
            t0 + SAMPLE_EVERY,
            &ready,
            all.clone(),
            BUDGET,
            |p| procs.sockets_of(p),
            spent,
        );
        a.sample(
            t0 + 2 * SAMPLE_EVERY,
            &ready,
            all.clone(),
            BUDGET,
            |p| procs.sockets_of(p),
            spent,
        );
        // Never-read ones first, then the oldest reading.
        assert_eq!(procs.read, vec![1, 2, 3]);
        a.sample(
            t0 + 3 * SAMPLE_EVERY,
            &ready,
            all,
            BUDGET,
            |p| procs.sockets_of(p),
            spent,
        );
        assert_eq!(procs.read, vec![1, 2, 3, 1]);
        assert_eq!(a.counts(), Some((3, 0)));
        // Without a budget (a decision), every worker is read.
        procs.read.clear();
        a.sample(
            t0 + 4 * SAMPLE_EVERY,
            &ready,
            open(&[101, 102, 103, 999]),
            Duration::MAX,
            |p| procs.sockets_of(p),
            spent,
        );
        assert_eq!(procs.read, vec![2, 3, 1]);
    }

    #[test]
    fn gone_workers_are_forgotten_and_blindness_hides_everything() {
        let t0 = Instant::now();
        let mut a = Activity::default();
        let mut procs = Procs::new(&[(1, &[100]), (2, &[])]);
        sample(&mut a, t0, &[1, 2], open(&[100]), &mut procs);
        sample(&mut a, t0 + SAMPLE_EVERY, &[2], open(&[]), &mut procs);
        assert_eq!(a.seen(pid(1)), None);
        sample(
            &mut a,
            t0 + 2 * SAMPLE_EVERY,
            &[2],
            Open::Unknown("netns".into()),
            &mut procs,
        );
        assert_eq!(a.counts(), None);
        assert!(!a.is_idle(pid(2)) && !a.is_busy(pid(2)));
    }

    #[test]
    fn after_an_empty_tcp_dump_the_next_waits_for_a_connection_a_queue_or_a_while() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut a = Activity::default();
        assert!(a.tcp_dump_needed(Some(10), t0, false), "no dump yet");
        a.tcp_dumped(Some(10), 0, t0);
        // Nothing came since: no dump, not even for a decision, however long.
        assert!(!a.tcp_dump_needed(Some(10), t0 + 60 * s, true));
        // Connections came (to any listener of the namespace): a decision
        // dumps at once, the reports after QUIET_TCP_DUMP_EVERY...
        assert!(a.tcp_dump_needed(Some(11), t0 + s, true));
        assert!(!a.tcp_dump_needed(Some(11), t0 + s, false));
        assert!(a.tcp_dump_needed(Some(11), t0 + QUIET_TCP_DUMP_EVERY, false));
        // ... or once a tick saw a queue.
        a.queued();
        assert!(a.tcp_dump_needed(Some(11), t0 + s, false));
        // Counter unreadable: by time alone.
        a.tcp_dumped(None, 0, t0);
        assert!(!a.tcp_dump_needed(None, t0 + s, false));
        assert!(a.tcp_dump_needed(None, t0 + QUIET_TCP_DUMP_EVERY, false));
        // Connections were open: every sample dumps.
        a.tcp_dumped(Some(11), 2, t0);
        assert!(a.tcp_dump_needed(Some(11), t0, false));
    }

    /// Open connections with exchanges: (inode, waiting for ms, segments out).
    fn open_timed(conns: &[(u64, Option<u64>, u32)]) -> Open {
        Open::Connections(
            conns
                .iter()
                .map(|&(inode, ms, out)| {
                    let e = conns::Exchange {
                        waiting: ms
                            .map_or(Waiting::No, |ms| Waiting::Since(Duration::from_millis(ms))),
                        segments_out: out,
                    };
                    (inode, Some(e))
                })
                .collect(),
        )
    }

    #[test]
    fn a_request_waits_until_something_goes_out_on_its_connection() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let s = Duration::from_secs(1);
        let ms = Duration::from_millis;
        let mut a = Activity::default();
        let mut procs = Procs::new(&[(1, &[100]), (2, &[200]), (3, &[])]);
        // 1: a request came 300 ms ago; 2: an idle keep-alive connection
        // (answered); 3: holds nothing.
        let at = |a: &mut Activity, procs: &mut Procs, t, o| sample(a, t, &[1, 2, 3], o, procs);
        // Both connections held since before t0, nothing asked yet.
        at(
            &mut a,
            &mut procs,
            t0 - s,
            open_timed(&[(100, None, 0), (200, None, 5)]),
        );
        at(
            &mut a,
            &mut procs,
            t0,
            open_timed(&[(100, Some(300), 1), (200, None, 5)]),
        );
        assert_eq!(a.on_request_for(pid(1), t0), Some(ms(300)));
        assert!(a.is_busy(pid(2)), "holding a connection is busy...");
        assert_eq!(a.on_request_for(pid(2), t0), None, "...not on a request");
        assert_eq!(a.on_request_for(pid(3), t0), None);
        assert_eq!(a.request_deadline(s), Some(t0 - ms(300) + s));
        // Still waiting, nothing went out: from its first sighting (a
        // later byte of the same request does not restart it).
        at(
            &mut a,
            &mut procs,
            t0 + s,
            open_timed(&[(100, Some(20), 1), (200, None, 5)]),
        );
        assert_eq!(a.on_request_for(pid(1), t0 + s), Some(ms(1300)));
        // Something went out, and the next request on that connection came
        // (keep-alive, back to back): a new wait.
        at(
            &mut a,
            &mut procs,
            t0 + 2 * s,
            open_timed(&[(100, Some(10), 2)]),
        );
        assert_eq!(a.on_request_for(pid(1), t0 + 2 * s), Some(ms(10)));
        // Answered: no wait, no deadline.
        at(
            &mut a,
            &mut procs,
            t0 + 3 * s,
            open_timed(&[(100, None, 3)]),
        );
        assert_eq!(a.on_request_for(pid(1), t0 + 3 * s), None);
        assert_eq!(a.request_deadline(s), None);
        // Without exchanges (unix, or not asked): never a wait.
        at(&mut a, &mut procs, t0 + 4 * s, open(&[100]));
        assert!(a.is_busy(pid(1)));
        assert_eq!(a.request_deadline(s), None);
        // A connection first seen with a request that came 5 s before
        // (it sat in the accept queue of a saturated pool): its wait
        // starts when it was first seen held, not when the request came.
        procs.sockets.insert(1, vec![100, 150]);
        let t = t0 + 4 * s + ms(500);
        at(&mut a, &mut procs, t, open_timed(&[(150, Some(5000), 0)]));
        assert_eq!(a.on_request_for(pid(1), t), Some(Duration::ZERO));
        assert_eq!(a.request_deadline(s), Some(t + s));
        // A watch (no worker read) keeps the waits going.
        a.watch(
            &Held::from([(
                150,
                Some(conns::Exchange {
                    waiting: Waiting::Since(ms(5250)),
                    segments_out: 0,
                }),
            )]),
            t + ms(250),
        );
        assert_eq!(a.on_request_for(pid(1), t + ms(250)), Some(ms(250)));
        assert!(!a.watch_due(t + ms(400)) && a.watch_due(t + ms(500)));
        // Blind: every wait is forgotten.
        at(
            &mut a,
            &mut procs,
            t0 + 5 * s,
            open_timed(&[(100, Some(1), 4)]),
        );
        at(
            &mut a,
            &mut procs,
            t0 + 6 * s,
            Open::Unknown("netns".into()),
        );
        assert_eq!(a.request_deadline(s), None);
    }

    #[test]
    fn at_the_deadline_the_workers_over_it_are_taken_once() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let s = Duration::from_secs(1);
        let ms = Duration::from_millis;
        let limit = 2 * s;
        let mut a = Activity::default();
        // 1 waits on 100 and also holds an answered 101; 2 waits less
        // long; 300 waits but no ready worker holds it (its worker is
        // stopping, say).
        let mut procs = Procs::new(&[(1, &[100, 101]), (2, &[200])]);
        let o = |w100, w200, w300| {
            open_timed(&[
                (100, Some(w100), 1),
                (101, None, 9),
                (200, Some(w200), 1),
                (300, Some(w300), 1),
            ])
        };
        let held_before = open_timed(&[
            (100, None, 1),
            (101, None, 9),
            (200, None, 1),
            (300, None, 1),
        ]);
        sample(&mut a, t0 - s, &[1, 2], held_before, &mut procs);
        sample(&mut a, t0, &[1, 2], o(500, 100, 900), &mut procs);
        assert_eq!(a.request_deadline(limit), Some(t0 - ms(900) + limit));
        // Before anyone is over: nobody taken, and only waits past their
        // deadline are dealt with.
        let t1 = t0 + ms(1200);
        sample(&mut a, t1, &[1, 2], o(1700, 1300, 2100), &mut procs);
        assert_eq!(a.take_overdue(&[pid(1), pid(2)], limit, t1), vec![]);
        assert_eq!(a.request_deadline(limit), Some(t0 - ms(500) + limit));
        // At 1's deadline (and a little after): 1 is over, 2 is not.
        let t2 = t0 + ms(1600);
        sample(&mut a, t2, &[1, 2], o(2100, 1700, 2500), &mut procs);
        assert_eq!(
            a.take_overdue(&[pid(1), pid(2)], limit, t2),
            vec![Overdue {
                pid: pid(1),
                on: ms(2100),
                tied: false,
                conns: vec![100, 101]
            }]
        );
        assert_eq!(a.request_deadline(limit), Some(t0 - ms(100) + limit));
        // The same wait is never taken twice.
        assert_eq!(a.take_overdue(&[pid(1), pid(2)], limit, t2), vec![]);
        // 2's wait exactly at the limit: not over it yet, and still due.
        let at_limit = t0 - ms(100) + limit;
        assert_eq!(a.take_overdue(&[pid(1), pid(2)], limit, at_limit), vec![]);
        assert_eq!(a.request_deadline(limit), Some(at_limit));
    }

    #[test]
    fn a_tie_stays_a_maybe_until_data_comes_after_it() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let s = Duration::from_secs(1);
        let ms = Duration::from_millis;
        let ex = |waiting, segments_out| {
            Some(conns::Exchange {
                waiting,
                segments_out,
            })
        };
        let mut a = Activity::default();
        let mut procs = Procs::new(&[(1, &[100]), (2, &[200])]);
        let both =
            |w100, w200| Open::Connections(Held::from([(100, ex(w100, 4)), (200, ex(w200, 7))]));
        sample(
            &mut a,
            t0 - s,
            &[1, 2],
            both(Waiting::No, Waiting::No),
            &mut procs,
        );
        // Both tied (a request answered at once, or the next one came at
        // once): waits, marked as ties.
        sample(
            &mut a,
            t0,
            &[1, 2],
            both(Waiting::Tied(ms(10)), Waiting::Tied(ms(10))),
            &mut procs,
        );
        assert_eq!(a.on_request_for(pid(1), t0), Some(ms(10)));
        // On 200, more data came since, nothing went out: a request.
        sample(
            &mut a,
            t0 + s,
            &[1, 2],
            both(Waiting::Tied(ms(1010)), Waiting::Since(ms(5))),
            &mut procs,
        );
        let t = t0 + 3 * s;
        sample(
            &mut a,
            t,
            &[1, 2],
            both(Waiting::Tied(ms(3010)), Waiting::Since(ms(2005))),
            &mut procs,
        );
        let over = a.take_overdue(&[pid(1), pid(2)], 2 * s, t);
        let tied: Vec<(i32, bool)> = over.iter().map(|o| (o.pid.as_raw(), o.tied)).collect();
        // 200: data came after its tie, so a new wait from that data
        // (2.005 s), not from the tie (3.01 s).
        assert_eq!(tied, vec![(1, true), (2, false)]);
        assert_eq!(over[1].on, ms(2005));
        // 1 was spared (its worker waited for input, say): dealt with.
        // Then its client sends the next request and nothing goes out: a
        // wait of its own, timed from that request, not from the tie.
        let t2 = t + s;
        sample(
            &mut a,
            t2,
            &[1, 2],
            both(Waiting::Since(ms(100)), Waiting::No),
            &mut procs,
        );
        assert_eq!(a.on_request_for(pid(1), t2), Some(ms(100)));
        assert_eq!(a.request_deadline(2 * s), Some(t2 - ms(100) + 2 * s));
    }

    #[test]
    fn samples_are_due_once_per_period() {
        let t0 = Instant::now();
        let mut a = Activity::default();
        assert!(a.due(t0));
        let mut procs = Procs::new(&[]);
        sample(&mut a, t0, &[], open(&[]), &mut procs);
        assert!(!a.due(t0 + SAMPLE_EVERY / 2));
        assert!(a.due(t0 + SAMPLE_EVERY));
    }
}
