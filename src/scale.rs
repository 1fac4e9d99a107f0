//! The autoscaling policy: how many workers the pool should have, decided
//! from the accept-queue depth of its listeners. Pure: no I/O and no clock;
//! the caller passes the time, the samples and the pool's state, so every
//! case is a unit test.
//!
//! The supervisor calls [`Scaler::tick`] every `interval` (100 ms by
//! default), and early, every 10 ms for one interval, when a connection
//! arrives after a quiet tick and more than a blip is queued
//! (`sys::arrival`), with the total number of connections queued on all listeners
//! ([`crate::sys::probe::queue_depth`]), the share of the cores the pool's
//! workers would keep busy (`supervisor::pool_cpu`) and a [`PoolView`]. A
//! [`Decision`] says what the target should become and why; its `Display`
//! is the log line.
//!
//! # Policy
//!
//! - **Up, fast and in one jump.** A queued connection is one that no
//!   worker is free to take, so the pool wants `ready + max(starting,
//!   queued)` workers: the ready ones (busy, or the queue would be empty),
//!   plus one per waiting connection, of which the workers already starting
//!   will take the first `starting`. The target jumps there in one step,
//!   capped at `max`. Counting starting workers this way keeps the next
//!   ticks, which still see the queue while the new workers boot, from
//!   adding more for the same connections. A burst of 64 on a pool of 2
//!   (max 16) moves the target to 16 on the first tick that sees it (the
//!   second with the CPU guard, see below).
//! - **Hysteresis on the way up.** A queue of more than [`BLIP`]
//!   connections scales at once. A queue of 1..=[`BLIP`] is what a pool
//!   that keeps up shows now and then (a request arrives while every worker
//!   is finishing one); it scales only when the queue was non-empty in at
//!   least [`PERSIST_FRACTION`] of the `window`'s samples (3 of 10 by
//!   default), counting only samples taken since the last scale-up, so a
//!   run of blips cannot ratchet the pool up one worker per blip.
//! - **Down, slowly.** One worker per `cooldown` (10 s), and only when
//!   every sample of the whole cooldown read an empty queue and the
//!   cooldown has passed since the last change in either direction. Never
//!   below `min`. An unreadable sample breaks the quiet run.
//! - **Down backs off when it was wrong.** An empty queue cannot tell
//!   "N-1 workers would do" from "N workers are exactly enough". When a
//!   scale-up follows a scale-down within `cooldown`, the scale-down was a
//!   mistake, and the quiet time required for the next one doubles (up to
//!   [`MAX_DOWN_BACKOFF`] × cooldown); a scale-down that holds for a
//!   cooldown halves it again. A load that sits on the boundary thus
//!   converges instead of flapping every 10 s.
//! - **CPU guard.** Queue depth alone cannot tell "too few workers" from
//!   "too little CPU" (DESIGN.md: 4 workers of a CPU-bound app on 2 cores
//!   served as much as 16). With `cpu_guard` and a CPU sample, a scale-up
//!   waits until the CPU sample of a tick was taken wholly while the queue
//!   was non-empty (the previous tick saw a queue too): the sample ending
//!   at a burst's first tick is mostly idle time from before the burst, and
//!   the one-jump policy would spend it on 14 workers. Then, if the workers
//!   would keep at least [`CPU_BUSY`] of the available cores busy, the
//!   scaler adds no workers and says `cpu-bound`; otherwise it caps the
//!   jump at `ready / busy` workers, the number that would saturate the
//!   cores (2 ready at 50% -> at most 4). "Would keep busy" leaves out the
//!   time the workers waited for a CPU: on a host loaded by other
//!   processes an I/O-bound pool waits at each wake-up yet mostly sleeps,
//!   and more workers still serve more; a CPU-bound pool never sleeps, and
//!   reads as busy whoever takes the CPUs. The guard costs one tick (100 ms)
//!   of reaction time; it still raises the pool to `min` and still scales
//!   down. It judges the latest 100 ms sample, not a window mean: a mean
//!   over a window that began before the burst would never hold back the
//!   first, largest, jump.
//! - **Bounds.** The target never leaves `[min, max]`: a target outside
//!   (at start, or after [`Scaler::set_params`]) is clamped on the next
//!   tick whatever the samples say. `min == max` disables scaling.
//! - **No signal, no scaling.** When no listener could be read
//!   (`queued: None`) the scaler neither grows nor shrinks.
//!
//! # Decisions and holds
//!
//! [`Scaler::tick`] returns `None` when there is nothing new to say. It
//! returns a [`Decision`] when the target changes, and also, once, when the
//! scaler starts holding the pool back although the queue asks for more
//! ([`Reason::CpuBound`], [`Reason::AtMax`], [`Reason::Unreadable`]); a hold
//! has `to == from`, so applying `to` is always right. A hold is not
//! repeated while it lasts; it ends with the next change, or once the queue
//! has been empty for a `cooldown` (an unreadable-queue hold: once it reads
//! again). [`Scaler::last_decision`] keeps the
//! latest one for status.
//!
//! # Demand
//!
//! [`Scaler::demand`] is what this tick's decision would have been with no
//! `max` and no CPU guard: the workers the pool wants, host limits aside.
//! While connections queue (beyond a blip) it is the same `wanted` the
//! scale-up computes, `ready + max(starting, queued)`, or the target if that
//! is more; otherwise it is the target the tick leaves. A pod whose demand
//! exceeds its `max` wants more pods: it is the signal a cluster autoscaler
//! reads (docs/autoscaling.md). The CPU guard's cap counts as a host limit
//! too, since more pods bring more cores. [`utilization`] is the share of
//! the pool's room in use.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

/// A queue of at most this many connections is a blip unless it persists.
pub const BLIP: u32 = 2;
/// Fraction of a window's samples that must see a (small) queue before it
/// counts as persistent; at least 2 samples.
pub const PERSIST_FRACTION: f64 = 0.3;
/// Share of the cores the workers would keep busy (latest sample) at
/// which the CPU guard holds.
pub const CPU_BUSY: f64 = 0.9;
/// Cap on the scale-down backoff, as a multiple of `cooldown`.
pub const MAX_DOWN_BACKOFF: u32 = 8;

/// Tuning of the scaler; usually from the config file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleParams {
    /// Fewest workers. The pool is raised to it even when CPU-bound.
    pub min: u32,
    /// Most workers. If below `min`, `min` wins.
    pub max: u32,
    /// How often the supervisor samples and calls [`Scaler::tick`].
    pub interval: Duration,
    /// Quiet time per worker removed, and the least time after any change
    /// before a scale-down.
    pub cooldown: Duration,
    /// How far back samples count when deciding whether a small queue
    /// persists (at least two intervals).
    pub window: Duration,
    /// Hold scale-ups while the pool is CPU-bound.
    pub cpu_guard: bool,
    /// Idle workers to keep beside the busy ones (`pool.spare`), within
    /// `min..=max`: the pool grows to busy + spare without waiting for a
    /// queue, and never shrinks below it.
    pub spare: u32,
}

impl ScaleParams {
    /// `min..=max` workers with the default timing: sample every 100 ms,
    /// 10 s cooldown, 1 s window, CPU guard on.
    pub fn new(min: u32, max: u32) -> Self {
        ScaleParams {
            min,
            max,
            interval: Duration::from_millis(100),
            cooldown: Duration::from_secs(10),
            window: Duration::from_secs(1),
            cpu_guard: true,
            spare: 0,
        }
    }

    fn sanitized(mut self) -> Self {
        self.max = self.max.max(self.min);
        if self.interval.is_zero() {
            self.interval = Duration::from_millis(100);
        }
        self.window = self.window.max(self.interval * 2);
        self
    }

    /// Samples of a (small) queue in one window that make it persistent.
    fn persist_samples(&self) -> usize {
        let per_window = self.window.as_secs_f64() / self.interval.as_secs_f64();
        ((per_window * PERSIST_FRACTION).ceil() as usize).max(2)
    }
}

/// What the probes read this tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Connections waiting in all listeners' accept queues; `None` if no
    /// listener could be read (listeners that could be read are summed).
    pub queued: Option<u32>,
    /// Number of listeners probed (for the reason text).
    pub listeners: u32,
    /// Share `0.0..=1.0` of the available cores the workers would have kept
    /// busy since the last sample had they never waited for a CPU, if
    /// known (`supervisor::pool_cpu`).
    pub cpu_busy: Option<f64>,
    /// The supervisor knows `cpu_busy` was measured wholly while
    /// connections waited (an early probe after an arrival took its
    /// baseline with a queue), so the guard may judge it at once.
    pub cpu_while_queued: bool,
}

/// The pool as the supervisor sees it this tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolView {
    /// The current target size (what the last decision asked for).
    pub target: u32,
    /// Workers alive in any state; informational, the policy uses
    /// `ready` and `starting`.
    pub alive: u32,
    /// Workers that reported READY=1 (or are taken as ready).
    pub ready: u32,
    /// Workers spawned and not ready yet.
    pub starting: u32,
    /// The last worker is on a request: a step to zero waits for it. The
    /// caller need only look when `target` is 1 and `min` 0.
    pub last_worker_busy: bool,
    /// Ready workers on a connection, when known (`pool.spare` needs it).
    pub busy: Option<u32>,
}

/// Why the target changed, or why it is being held.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// Connections are waiting: grow to cover them.
    Queue {
        queued: u32,
        ready: u32,
        starting: u32,
        /// Samples with a non-empty queue in the window (counts for small
        /// queues, which must persist).
        busy_samples: u32,
        /// Workers wanted before the caps at `max` and by CPU.
        wanted: u32,
        max: u32,
        /// The workers' CPU demand over the cores, when the CPU guard used it.
        cpu_busy: Option<f64>,
    },
    /// The queue stayed empty for `quiet`: shrink by one.
    Quiet { quiet: Duration },
    /// The target was below `min`.
    BelowMin { min: u32 },
    /// The target was above `max`.
    AboveMax { max: u32 },
    /// Hold: the queue asks for more, but the workers would keep the CPUs busy.
    CpuBound { busy: f64, queued: u32 },
    /// Hold: the queue asks for more, but the pool is at `max`.
    AtMax { queued: u32, max: u32 },
    /// Hold: no listener's queue could be read.
    Unreadable { listeners: u32 },
    /// Connections arrived at zero workers (`min = 0`): the pool wakes.
    Wake { queued: u32 },
    /// Fewer idle workers than `pool.spare`: grow to busy + spare.
    Spare { busy: u32, spare: u32 },
}

impl Reason {
    /// Whether this reason holds the target rather than changing it.
    pub fn is_hold(&self) -> bool {
        matches!(
            self,
            Reason::CpuBound { .. } | Reason::AtMax { .. } | Reason::Unreadable { .. }
        )
    }
}

/// A change of the target (`from != to`) or the start of a hold
/// (`from == to`, see [`Reason::is_hold`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The `now` of the tick that decided.
    pub at: Duration,
    pub from: u32,
    pub to: u32,
    pub reason: Reason,
}

impl Decision {
    /// Whether this holds the target instead of changing it.
    pub fn is_hold(&self) -> bool {
        self.from == self.to
    }
}

fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn plural(n: u32, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The cause alone, e.g. `queue 23 with 2 ready and 0 starting`.
impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Reason::Queue {
                queued,
                ready,
                starting,
                busy_samples,
                ..
            } => {
                write!(f, "queue {queued}")?;
                if queued <= BLIP {
                    write!(f, ", non-empty in {busy_samples} recent samples,")?;
                }
                write!(f, " with {ready} ready and {starting} starting")
            }
            Reason::Quiet { quiet } => write!(f, "queue empty for {}", secs(quiet)),
            Reason::BelowMin { min } => write!(f, "below min {min}"),
            Reason::AboveMax { max } => write!(f, "above max {max}"),
            Reason::CpuBound { busy, queued } => write!(
                f,
                "cpu-bound: workers need {:.0}% of the CPUs despite queue {queued}",
                busy * 100.0
            ),
            Reason::AtMax { queued, max } => write!(f, "queue {queued} at max {max}"),
            Reason::Unreadable { listeners } => write!(
                f,
                "queue unreadable on all {}",
                plural(listeners, "listener", "listeners")
            ),
            Reason::Wake { queued } => write!(
                f,
                "{} waiting at zero workers",
                plural(queued, "connection", "connections")
            ),
            Reason::Spare { busy, spare } => {
                write!(f, "{busy} busy, {spare} spare wanted")
            }
        }
    }
}

/// The log line, e.g. `queue 23 with 2 ready and 0 starting: scale up 2 ->
/// 16 (wanted 25, capped at max 16)`.
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (from, to) = (self.from, self.to);
        match self.reason {
            Reason::Queue {
                wanted,
                max,
                cpu_busy,
                ..
            } => {
                write!(f, "{}: scale up {from} -> {to}", self.reason)?;
                match cpu_busy {
                    _ if wanted <= to => Ok(()),
                    Some(busy) if to < max => write!(
                        f,
                        " (wanted {wanted}, capped at {to}: workers need {:.0}% of the CPUs)",
                        busy * 100.0
                    ),
                    _ => write!(f, " (wanted {wanted}, capped at max {max})"),
                }
            }
            Reason::BelowMin { .. } => {
                write!(f, "target {from} {}: scale up {from} -> {to}", self.reason)
            }
            Reason::AboveMax { .. } => {
                write!(
                    f,
                    "target {from} {}: scale down {from} -> {to}",
                    self.reason
                )
            }
            Reason::Quiet { .. } => write!(f, "{}: scale down {from} -> {to}", self.reason),
            Reason::CpuBound { busy, queued } => write!(
                f,
                "cpu-bound: workers need {:.0}% of the CPUs, holding at {to} despite queue {queued}",
                busy * 100.0
            ),
            Reason::AtMax { .. } => write!(f, "{}: holding at {to}", self.reason),
            Reason::Unreadable { .. } => write!(f, "{}: holding at {to}", self.reason),
            Reason::Wake { .. } | Reason::Spare { .. } => {
                write!(f, "{}: scale up {from} -> {to}", self.reason)
            }
        }
    }
}

/// A queue that asks for workers: how many the pool wants in all, and the
/// samples since the last scale-up that saw a queue.
#[derive(Debug, Clone, Copy)]
struct QueueWants {
    wanted: u32,
    busy_samples: u32,
}

/// The share `0.0..=1.0` of the pool's room in use: `busy / ready` when the
/// busy workers are known, else `target / max`, the share of `max` the
/// scaler has asked for (a pool at `max` reads 1.0 whether it keeps up or
/// not; [`Scaler::demand`] says by how much it falls short). `None` when
/// neither can be computed (`max` 0). droved does not count busy workers
/// yet, so it passes `None` for `busy`; the metrics say which one it is.
pub fn utilization(busy: Option<u32>, ready: u32, target: u32, max: u32) -> Option<f64> {
    match busy {
        Some(busy) if ready > 0 => Some((f64::from(busy) / f64::from(ready)).min(1.0)),
        _ if max > 0 => Some((f64::from(target) / f64::from(max)).min(1.0)),
        _ => None,
    }
}

/// The scaler's memory between ticks: recent samples, when it last
/// changed the target, and the hold it is in.
#[derive(Debug, Clone)]
pub struct Scaler {
    params: ScaleParams,
    /// Queue samples within the window, oldest first.
    queue: VecDeque<(Duration, Option<u32>)>,
    /// This tick's CPU sample, if the caller had one.
    cpu: Option<f64>,
    /// Ready workers at the previous tick: a CPU sample only speaks for
    /// the ready set it was taken over.
    prev_ready: Option<u32>,
    /// Time of the first sample of the current run of empty-queue samples.
    quiet_since: Option<Duration>,
    last_up: Option<Duration>,
    last_down: Option<Duration>,
    /// Quiet time needed per scale-down, in cooldowns (1..=MAX_DOWN_BACKOFF).
    down_backoff: u32,
    /// The last change was a scale-down that no cooldown has confirmed yet.
    down_unconfirmed: bool,
    /// The hold announced and still in force, if any.
    hold: Option<std::mem::Discriminant<Reason>>,
    last: Option<Decision>,
    /// The latest tick's demand (see the module doc); `None` before the
    /// first tick and while no queue can be read.
    demand: Option<u32>,
}

impl Scaler {
    /// A scaler with no history: the first scale-down waits a full
    /// cooldown of empty samples.
    pub fn new(params: ScaleParams) -> Self {
        Scaler {
            params: params.sanitized(),
            queue: VecDeque::new(),
            cpu: None,
            prev_ready: None,
            quiet_since: None,
            last_up: None,
            last_down: None,
            down_backoff: 1,
            down_unconfirmed: false,
            hold: None,
            last: None,
            demand: None,
        }
    }

    /// Replace the parameters (config reload), keeping the history. A
    /// target outside the new bounds is clamped on the next tick.
    pub fn set_params(&mut self, params: ScaleParams) {
        self.params = params.sanitized();
    }

    /// The parameters in force (after sanitizing: `max >= min`, `window >=
    /// 2 * interval`).
    pub fn params(&self) -> &ScaleParams {
        &self.params
    }

    /// The pool was woken from zero workers outside the scaler (a
    /// connection arrived with `pool.min = 0`): a scale-up like its own, so
    /// the next scale-down waits a whole quiet cooldown from `now`.
    pub fn woke(&mut self, now: Duration, to: u32, queued: u32) -> Decision {
        self.last_up = Some(now);
        self.quiet_since = None;
        self.hold = None;
        let d = Decision {
            at: now,
            from: 0,
            to,
            reason: Reason::Wake { queued },
        };
        self.last = Some(d.clone());
        d
    }

    /// Brings a `target` outside `min..=max` (after a reload or an
    /// upgrade changed the limits) back within them, as a decision like
    /// any other; `None` when it is within.
    pub fn bound(&mut self, now: Duration, target: u32) -> Option<Decision> {
        let p = self.params;
        if target < p.min {
            self.last_up = Some(now);
            return self.decide(now, target, p.min, Reason::BelowMin { min: p.min });
        }
        if target > p.max {
            self.last_down = Some(now);
            return self.decide(now, target, p.max, Reason::AboveMax { max: p.max });
        }
        None
    }

    /// The latest decision or hold, for status.
    pub fn last_decision(&self) -> Option<&Decision> {
        self.last.as_ref()
    }

    /// The workers the pool would want with no `max` and no CPU guard, as
    /// of the latest tick (see the module doc); `None` before the first
    /// tick and while no listener's queue can be read.
    pub fn demand(&self) -> Option<u32> {
        self.demand
    }

    /// Take one sample and decide. `now` is any monotonic time (tests pass
    /// simulated time); it should not go backwards.
    pub fn tick(&mut self, now: Duration, sample: Sample, pool: PoolView) -> Option<Decision> {
        self.record(now, sample);
        // Before deciding: a scale-up restarts the count of busy samples.
        let wants = sample.queued.and_then(|q| self.queue_wants(q, pool));
        let decision = self.decide_tick(now, sample, pool, wants);
        let target = decision.as_ref().map_or(pool.target, |d| d.to);
        self.demand = sample
            .queued
            .map(|_| wants.map_or(target, |w| w.wanted.max(target)));
        self.prev_ready = Some(pool.ready);
        decision
    }

    /// What a queue of `queued` asks for, unless it is empty or a blip
    /// that has not persisted (yet).
    fn queue_wants(&self, queued: u32, pool: PoolView) -> Option<QueueWants> {
        if queued == 0 {
            return None;
        }
        let after_up = self.last_up;
        let busy_samples = self
            .queue
            .iter()
            .filter(|&&(t, q)| after_up.is_none_or(|u| t > u) && q.is_some_and(|q| q > 0))
            .count();
        if queued <= BLIP && busy_samples < self.params.persist_samples() {
            return None; // a blip, so far
        }
        Some(QueueWants {
            wanted: pool.ready.saturating_add(pool.starting.max(queued)),
            busy_samples: busy_samples as u32,
        })
    }

    fn decide_tick(
        &mut self,
        now: Duration,
        sample: Sample,
        pool: PoolView,
        wants: Option<QueueWants>,
    ) -> Option<Decision> {
        let p = self.params;
        let target = pool.target;

        if let Some(d) = self.bound(now, target) {
            return Some(d);
        }
        if let (Some(floor), Some(busy)) = (self.spare_floor(pool), pool.busy)
            && target < floor
        {
            self.last_up = Some(now);
            let reason = Reason::Spare {
                busy,
                spare: p.spare,
            };
            return self.decide(now, target, floor, reason);
        }
        if p.min == p.max {
            return None;
        }

        // A scale-down that held for a cooldown was right: relax the backoff.
        if self.down_unconfirmed && self.since(self.last_down, now) >= p.cooldown {
            self.down_unconfirmed = false;
            self.down_backoff = (self.down_backoff / 2).max(1);
        }

        let Some(queued) = sample.queued else {
            return self.hold(
                now,
                target,
                Reason::Unreadable {
                    listeners: sample.listeners,
                },
            );
        };
        if queued > 0 {
            let wants = wants?; // a blip, so far
            self.scale_up(now, queued, wants, pool, sample.cpu_while_queued)
        } else {
            self.scale_down(now, pool)
        }
    }

    fn record(&mut self, now: Duration, sample: Sample) {
        let horizon = now.saturating_sub(self.params.window);
        self.queue.push_back((now, sample.queued));
        while self.queue.front().is_some_and(|&(t, _)| t <= horizon) {
            self.queue.pop_front();
        }
        self.cpu = sample
            .cpu_busy
            .filter(|b| b.is_finite())
            .map(|b| b.clamp(0.0, 1.0));
        match sample.queued {
            Some(0) => {
                self.quiet_since.get_or_insert(now);
            }
            _ => self.quiet_since = None,
        }
        // A hold on an unreadable queue ends when it reads again; the
        // others once the queue has been quiet for a cooldown, so a load
        // that keeps coming back announces them at most once per cooldown.
        let unreadable = std::mem::discriminant(&Reason::Unreadable { listeners: 0 });
        let quiet = self.since(self.quiet_since, now) >= self.params.cooldown;
        if quiet || (sample.queued.is_some() && self.hold == Some(unreadable)) {
            self.hold = None;
        }
    }

    /// Time since `t`, or zero if `t` is unknown.
    fn since(&self, t: Option<Duration>, now: Duration) -> Duration {
        t.map_or(Duration::ZERO, |t| now.saturating_sub(t))
    }

    fn scale_up(
        &mut self,
        now: Duration,
        queued: u32,
        wants: QueueWants,
        pool: PoolView,
        cpu_while_queued: bool,
    ) -> Option<Decision> {
        let p = self.params;
        let target = pool.target;
        let QueueWants {
            wanted,
            busy_samples,
        } = wants;
        if wanted <= target {
            return None; // the workers already asked for will take them
        }
        if target >= p.max {
            if pool.starting > 0 {
                return None; // not at max yet in fact
            }
            return self.hold(now, target, Reason::AtMax { queued, max: p.max });
        }
        let mut to = wanted.min(p.max);
        let cpu_busy = self.cpu.filter(|_| p.cpu_guard);
        if let Some(busy) = cpu_busy {
            // Judge the CPU only by a sample taken wholly while connections
            // waited: the one ending at a burst's first tick is mostly idle.
            let before = self.queue.iter().rev().nth(1).and_then(|&(_, q)| q);
            if before.unwrap_or(0) == 0 && !cpu_while_queued {
                return None;
            }
            // After a scale-up, wait until the new workers are ready and a
            // whole sample was taken with them: a sample from while they
            // started understates the pool's CPU use and would open the
            // gate to max in a few ticks for a CPU-bound app.
            if pool.starting > 0 || self.prev_ready != Some(pool.ready) {
                return None;
            }
            if busy >= CPU_BUSY {
                return self.hold(now, target, Reason::CpuBound { busy, queued });
            }
            // The ready workers are all busy and use `busy` of the cores:
            // about ready / busy workers saturate it, more would only wait.
            if pool.ready > 0 && busy > 0.0 {
                let saturating = (f64::from(pool.ready) / busy).ceil() as u32;
                to = to.min(saturating);
            }
            if to <= target {
                return None;
            }
        }
        if self.down_unconfirmed && self.since(self.last_down, now) < p.cooldown {
            // The last scale-down was one too many: wait longer next time.
            self.down_unconfirmed = false;
            self.down_backoff = (self.down_backoff * 2).min(MAX_DOWN_BACKOFF);
        }
        self.last_up = Some(now);
        let reason = Reason::Queue {
            queued,
            ready: pool.ready,
            starting: pool.starting,
            busy_samples,
            wanted,
            max: p.max,
            cpu_busy,
        };
        self.decide(now, target, to, reason)
    }

    fn scale_down(&mut self, now: Duration, pool: PoolView) -> Option<Decision> {
        let target = pool.target;
        let p = self.params;
        if target <= p.min || self.spare_floor(pool).is_some_and(|floor| target <= floor) {
            return None;
        }
        let needed = p.cooldown * self.down_backoff;
        let quiet = self.since(self.quiet_since, now);
        let changed = self.last_up.max(self.last_down);
        let recent_change = changed.is_some_and(|c| now.saturating_sub(c) < needed);
        if self.quiet_since.is_none() || quiet < needed || recent_change {
            return None;
        }
        if target == 1 && pool.last_worker_busy {
            // Not a decision yet: nothing is recorded until the step is
            // taken, so a veto neither counts nor feeds the backoff.
            return None;
        }
        self.last_down = Some(now);
        self.down_unconfirmed = true;
        self.decide(now, target, target - 1, Reason::Quiet { quiet })
    }

    /// The workers `pool.spare` asks for (busy + spare, within min..=max);
    /// `None` without spares or without a busy count.
    fn spare_floor(&self, pool: PoolView) -> Option<u32> {
        let p = self.params;
        if p.spare == 0 {
            return None;
        }
        Some(pool.busy?.saturating_add(p.spare).clamp(p.min, p.max))
    }

    /// Announce a hold once; stay silent while the same hold lasts.
    fn hold(&mut self, now: Duration, target: u32, reason: Reason) -> Option<Decision> {
        let kind = std::mem::discriminant(&reason);
        if self.hold == Some(kind) {
            return None;
        }
        self.hold = Some(kind);
        let d = Decision {
            at: now,
            from: target,
            to: target,
            reason,
        };
        self.last = Some(d.clone());
        Some(d)
    }

    fn decide(&mut self, now: Duration, from: u32, to: u32, reason: Reason) -> Option<Decision> {
        self.hold = None;
        let d = Decision {
            at: now,
            from,
            to,
            reason,
        };
        self.last = Some(d.clone());
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    fn sample(queued: u32) -> Sample {
        Sample {
            queued: Some(queued),
            listeners: 1,
            cpu_busy: None,
            cpu_while_queued: false,
        }
    }

    fn pool(target: u32, ready: u32, starting: u32) -> PoolView {
        PoolView {
            target,
            alive: ready + starting,
            ready,
            starting,
            last_worker_busy: false,
            busy: None,
        }
    }

    /// A pool driven by the scaler's decisions: spawned workers become
    /// ready `spawn` after they were asked for; removed ones go at once.
    struct Sim {
        scaler: Scaler,
        now: Duration,
        interval: Duration,
        spawn: Duration,
        target: u32,
        ready: u32,
        /// Ready-at times of starting workers.
        starting: Vec<Duration>,
        decisions: Vec<Decision>,
    }

    impl Sim {
        fn new(params: ScaleParams, workers: u32) -> Self {
            Sim {
                scaler: Scaler::new(params),
                now: Duration::ZERO,
                interval: params.interval,
                spawn: 150 * MS,
                target: workers,
                ready: workers,
                starting: Vec::new(),
                decisions: Vec::new(),
            }
        }

        fn view(&self) -> PoolView {
            pool(self.target, self.ready, self.starting.len() as u32)
        }

        /// Advance one interval, sample with `queue(view)` and apply the
        /// decision, if any.
        fn step_with(
            &mut self,
            cpu: Option<f64>,
            queue: impl FnOnce(&PoolView) -> Option<u32>,
        ) -> Option<Decision> {
            self.now += self.interval;
            let now = self.now;
            let before = self.starting.len();
            self.starting.retain(|&t| t > now);
            self.ready += (before - self.starting.len()) as u32;
            let view = self.view();
            let s = Sample {
                queued: queue(&view),
                listeners: 1,
                cpu_busy: cpu,
                cpu_while_queued: false,
            };
            let d = self.scaler.tick(now, s, view)?;
            assert_eq!(d.from, self.target, "decision from the current target");
            let alive = self.ready + self.starting.len() as u32;
            for _ in alive..d.to {
                self.starting.push(now + self.spawn);
            }
            for _ in d.to..alive {
                if self.starting.pop().is_none() {
                    self.ready -= 1;
                }
            }
            self.target = d.to;
            self.decisions.push(d.clone());
            Some(d)
        }

        fn step(&mut self, queued: Option<u32>) -> Option<Decision> {
            self.step_with(None, |_| queued)
        }

        fn run_for(&mut self, d: Duration, mut queue: impl FnMut(&Sim, &PoolView) -> Option<u32>) {
            let end = self.now + d;
            while self.now < end {
                self.now += self.interval;
                let view = self.view();
                let q = queue(self, &view);
                self.now -= self.interval;
                self.step(q);
            }
        }

        fn changes(&self) -> Vec<(u32, u32)> {
            self.decisions
                .iter()
                .filter(|d| !d.is_hold())
                .map(|d| (d.from, d.to))
                .collect()
        }
    }

    /// A cheap deterministic pseudo-random sequence for load patterns.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        fn chance(&mut self, percent: u32) -> bool {
            self.next() % 100 < percent
        }
    }

    #[test]
    fn burst_reaches_max_within_two_ticks() {
        let mut sim = Sim::new(ScaleParams::new(2, 16), 2);
        sim.run_for(3 * S, |_, _| Some(0));
        // 64 connections arrive between ticks; two workers drain slowly.
        let mut left = 64u32;
        let mut ticks = 0;
        while sim.target < 16 {
            ticks += 1;
            assert!(ticks <= 2, "still at {} after {ticks} ticks", sim.target);
            sim.step(Some(left));
            left -= 2;
        }
        // Workers start while the queue is still long: no second decision.
        for _ in 0..10 {
            sim.step(Some(left));
            left = left.saturating_sub(sim.ready);
        }
        assert_eq!(sim.changes(), vec![(2, 16)]);
        assert_eq!(
            sim.decisions[0].to_string(),
            "queue 64 with 2 ready and 0 starting: scale up 2 -> 16 (wanted 66, capped at max 16)"
        );
        assert!(sim.ready == 16 && sim.starting.is_empty());
    }

    #[test]
    fn scale_up_covers_the_shortfall_in_one_jump() {
        // (min, max, target, ready, starting, queued) -> new target
        type Row = ((u32, u32, u32, u32, u32, u32), Option<u32>);
        let table: &[Row] = &[
            ((2, 16, 2, 2, 0, 64), Some(16)),
            ((2, 16, 2, 2, 0, 5), Some(7)),
            ((2, 100, 2, 2, 0, 64), Some(66)),
            ((1, 4, 1, 1, 0, 3), Some(4)),
            ((0, 8, 0, 0, 0, 3), Some(3)),
            // Starting workers take the first queued connections.
            ((2, 16, 6, 2, 4, 3), None),
            ((2, 16, 6, 2, 4, 4), None),
            ((2, 16, 6, 2, 4, 10), Some(12)),
            // Target already above what is alive (a crashed worker is
            // being restarted): no extra scale-up for the same queue.
            ((2, 16, 8, 5, 0, 3), None),
            // A blip of one or two waits for persistence.
            ((2, 16, 4, 4, 0, 2), None),
            // At max: a hold, not a change.
            ((2, 16, 16, 16, 0, 30), Some(16)),
        ];
        for &((min, max, target, ready, starting, queued), want) in table {
            let mut s = Scaler::new(ScaleParams::new(min, max));
            let got = s
                .tick(S, sample(queued), pool(target, ready, starting))
                .map(|d| d.to);
            assert_eq!(
                got, want,
                "min {min} max {max} target {target} ready {ready} starting {starting} queued {queued}"
            );
        }
    }

    #[test]
    fn starting_workers_are_counted_no_double_scale_up() {
        let mut sim = Sim::new(ScaleParams::new(2, 32), 2);
        sim.spawn = 2 * S; // slow to boot
        sim.step(Some(10));
        assert_eq!(sim.target, 12);
        // The same ten connections stay queued while workers boot.
        for _ in 0..15 {
            sim.step(Some(10));
        }
        assert_eq!(sim.changes(), vec![(2, 12)]);
        // More arrive than the starting workers will take: grow by the rest.
        let d = sim.step(Some(14)).expect("scale up");
        assert_eq!((d.from, d.to), (12, 16));
    }

    #[test]
    fn persistent_small_queue_scales_by_one() {
        let mut sim = Sim::new(ScaleParams::new(2, 16), 4);
        sim.run_for(2 * S, |_, _| Some(0));
        assert_eq!(sim.step(Some(1)), None);
        assert_eq!(sim.step(Some(1)), None);
        let d = sim.step(Some(1)).expect("third non-empty sample of ten");
        assert_eq!((d.from, d.to), (4, 5));
        assert_eq!(
            d.to_string(),
            "queue 1, non-empty in 3 recent samples, with 4 ready and 0 starting: scale up 4 -> 5"
        );
        // The blips before the scale-up do not count again.
        assert_eq!(sim.step(Some(1)), None);
        assert_eq!(sim.step(Some(1)), None);
    }

    #[test]
    fn steady_load_with_blips_does_not_oscillate() {
        // Four workers serve the load; the queue is mostly empty with a
        // blip of 1-2 in ~4% of samples, sometimes two close together.
        let mut sim = Sim::new(ScaleParams::new(4, 16), 4);
        let mut rng = Lcg(7);
        sim.run_for(100 * S, |_, _| {
            Some(if rng.chance(4) { 1 + rng.next() % 2 } else { 0 })
        });
        assert!(
            sim.decisions.len() <= 1,
            "{:#?}",
            sim.decisions
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
        );

        // With room to shrink, it shrinks only during long quiet spells,
        // and never back and forth.
        let mut sim = Sim::new(ScaleParams::new(2, 16), 4);
        let mut rng = Lcg(11);
        sim.run_for(100 * S, |_, _| {
            Some(if rng.chance(2) { 1 + rng.next() % 2 } else { 0 })
        });
        let ch = sim.changes();
        assert!(ch.len() <= 3, "{ch:?}");
        assert!(ch.iter().all(|&(f, t)| t < f), "only scale-downs: {ch:?}");
    }

    #[test]
    fn slow_decay_one_step_per_cooldown_to_min() {
        let mut sim = Sim::new(ScaleParams::new(2, 16), 8);
        sim.run_for(100 * S, |_, _| Some(0));
        let ch = sim.changes();
        assert_eq!(ch, vec![(8, 7), (7, 6), (6, 5), (5, 4), (4, 3), (3, 2)]);
        let at: Vec<Duration> = sim.decisions.iter().map(|d| d.at).collect();
        assert!(at[0] >= 10 * S && at[0] <= 10 * S + 200 * MS, "{at:?}");
        for w in at.windows(2) {
            assert!(w[1] - w[0] >= 10 * S, "{at:?}");
        }
        assert_eq!(
            sim.decisions[1].to_string(),
            "queue empty for 20s: scale down 7 -> 6"
        );
        assert_eq!(sim.target, 2);
    }

    #[test]
    fn a_wake_from_zero_waits_a_cooldown_before_going_back() {
        // min 0: a long quiet run at zero, then droved wakes the pool for a
        // connection (outside the scaler) and the worker takes it before
        // the next tick sees a queue.
        let mut sim = Sim::new(ScaleParams::new(0, 8), 0);
        sim.run_for(30 * S, |_, _| Some(0));
        assert!(sim.decisions.is_empty(), "{:?}", sim.decisions);
        sim.scaler.woke(sim.now, 1, 1);
        sim.target = 1;
        sim.ready = 1;
        let woke = sim.now;
        sim.run_for(30 * S, |_, _| Some(0));
        let down = sim.decisions.iter().find(|d| d.to == 0).expect("back to 0");
        assert!(down.at - woke >= 10 * S, "{:?}", down.at - woke);
        // Without the wake, the old quiet run would take it down at once.
        let mut sim = Sim::new(ScaleParams::new(0, 8), 0);
        sim.run_for(30 * S, |_, _| Some(0));
        sim.target = 1;
        sim.ready = 1;
        let at = sim.now;
        sim.step(Some(0));
        assert_eq!(
            sim.decisions.last().map(|d| (d.to, d.at)),
            Some((0, at + 100 * MS))
        );
    }

    #[test]
    fn no_scale_down_within_cooldown_of_a_scale_up() {
        let mut sim = Sim::new(ScaleParams::new(2, 16), 2);
        sim.step(Some(20));
        assert_eq!(sim.target, 16);
        sim.run_for(30 * S, |_, _| Some(0));
        let first_down = sim.decisions.iter().find(|d| d.to < d.from).unwrap();
        assert!(first_down.at - sim.decisions[0].at >= 10 * S);
    }

    #[test]
    fn flapping_load_scales_up_once_and_holds() {
        // 2 s of 20 queued (drained as workers come), 3 s idle, for a minute.
        let mut sim = Sim::new(ScaleParams::new(2, 16), 2);
        sim.run_for(60 * S, |sim, view| {
            let phase = sim.now.as_millis() % 5000;
            Some(if phase < 2000 {
                20u32.saturating_sub(view.ready)
            } else {
                0
            })
        });
        let ch = sim.changes();
        assert!(!ch.is_empty() && ch.len() <= 2, "{ch:?}");
        // Held at max: said once, not once per burst.
        let holds = sim.decisions.iter().filter(|d| d.is_hold()).count();
        assert!(holds <= 1, "{:?}", sim.decisions);
        assert!(ch.iter().all(|&(f, t)| t > f), "no scale-down: {ch:?}");
        // When the load stops, the pool decays one per cooldown.
        let top = sim.target;
        sim.run_for(25 * S, |_, _| Some(0));
        assert_eq!(sim.target, top - 2);
    }

    #[test]
    fn boundary_load_backs_off_instead_of_flapping() {
        // Four workers are exactly enough: with three, a queue builds.
        let mut sim = Sim::new(ScaleParams::new(2, 16), 4);
        sim.spawn = 50 * MS;
        sim.run_for(200 * S, |_, view| Some(u32::from(view.ready < 4)));
        let downs: Vec<Duration> = sim
            .decisions
            .iter()
            .filter(|d| d.to < d.from)
            .map(|d| d.at)
            .collect();
        // Without backoff this would be ~19 downs (one per 10 s).
        assert!(downs.len() <= 5, "{downs:?}");
        for w in downs.windows(2) {
            assert!(w[1] - w[0] >= 20 * S, "backoff grows: {downs:?}");
        }
        assert_eq!(sim.scaler.down_backoff, MAX_DOWN_BACKOFF);
        assert!(sim.target >= 4 || sim.target == 3);
    }

    #[test]
    fn clamps_to_min_and_max_whatever_the_samples() {
        // (min, max, target, queued, cpu) -> (to, text)
        type Row = (u32, u32, u32, Option<u32>, Option<f64>, u32, &'static str);
        let table: &[Row] = &[
            (
                2,
                16,
                1,
                Some(0),
                None,
                2,
                "target 1 below min 2: scale up 1 -> 2",
            ),
            (
                2,
                16,
                0,
                None,
                None,
                2,
                "target 0 below min 2: scale up 0 -> 2",
            ),
            (
                2,
                16,
                1,
                Some(9),
                Some(1.0),
                2,
                "target 1 below min 2: scale up 1 -> 2",
            ),
            (
                2,
                16,
                20,
                Some(50),
                None,
                16,
                "target 20 above max 16: scale down 20 -> 16",
            ),
            (
                4,
                4,
                3,
                Some(0),
                None,
                4,
                "target 3 below min 4: scale up 3 -> 4",
            ),
            (
                4,
                4,
                6,
                None,
                None,
                4,
                "target 6 above max 4: scale down 6 -> 4",
            ),
            // max below min: min wins.
            (
                5,
                3,
                4,
                Some(0),
                None,
                5,
                "target 4 below min 5: scale up 4 -> 5",
            ),
        ];
        for &(min, max, target, queued, cpu, to, text) in table {
            let mut s = Scaler::new(ScaleParams::new(min, max));
            let sample = Sample {
                queued,
                listeners: 1,
                cpu_busy: cpu,
                cpu_while_queued: false,
            };
            let d = s.tick(S, sample, pool(target, target, 0)).expect("clamp");
            assert_eq!((d.to, d.to_string().as_str()), (to, text));
            assert_eq!(s.last_decision(), Some(&d));
        }
    }

    #[test]
    fn min_equal_to_max_disables_scaling() {
        let mut sim = Sim::new(ScaleParams::new(4, 4), 4);
        sim.run_for(5 * S, |_, _| Some(64));
        sim.run_for(60 * S, |_, _| Some(0));
        sim.run_for(5 * S, |_, _| None);
        assert!(sim.decisions.is_empty(), "{:?}", sim.decisions);
    }

    #[test]
    fn set_params_reclamps_on_next_tick() {
        let mut sim = Sim::new(ScaleParams::new(2, 16), 10);
        sim.step(Some(0));
        sim.scaler.set_params(ScaleParams::new(2, 6));
        let d = sim.step(Some(0)).expect("clamp to new max");
        assert_eq!((d.from, d.to), (10, 6));
        sim.scaler.set_params(ScaleParams::new(8, 16));
        let d = sim.step(Some(0)).expect("clamp to new min");
        assert_eq!((d.from, d.to), (6, 8));
    }

    #[test]
    fn unreadable_queue_holds_and_says_so() {
        let mut sim = Sim::new(ScaleParams::new(2, 16), 6);
        let d = sim.step(None).expect("announce the hold");
        assert!(d.is_hold() && d.reason.is_hold());
        assert_eq!(
            d.to_string(),
            "queue unreadable on all 1 listener: holding at 6"
        );
        // Said once, and no scale-down on a queue it cannot see.
        sim.run_for(30 * S, |_, _| None);
        assert_eq!(sim.decisions.len(), 1);
        assert_eq!(sim.target, 6);
        // Readable again: the quiet run starts now, not before.
        sim.run_for(9 * S, |_, _| Some(0));
        assert_eq!(sim.target, 6);
        sim.run_for(2 * S, |_, _| Some(0));
        assert_eq!(sim.target, 5);
        // A hole in the middle of a quiet run restarts it.
        sim.run_for(9 * S, |_, _| Some(0));
        sim.step(None);
        sim.run_for(5 * S, |_, _| Some(0));
        assert_eq!(sim.target, 5);
        // Several listeners, none readable.
        let mut s = Scaler::new(ScaleParams::new(2, 16));
        let none = Sample {
            queued: None,
            listeners: 3,
            cpu_busy: None,
            cpu_while_queued: false,
        };
        let d = s.tick(S, none, pool(4, 4, 0)).unwrap();
        assert_eq!(
            d.to_string(),
            "queue unreadable on all 3 listeners: holding at 4"
        );
    }

    #[test]
    fn cpu_bound_pool_holds() {
        let mut sim = Sim::new(ScaleParams::new(2, 16), 6);
        for _ in 0..10 {
            sim.step_with(Some(0.2), |_| Some(0));
        }
        // A queue builds and the machine saturates: hold, once. The first
        // tick waits for a CPU sample taken under load.
        assert_eq!(sim.step_with(Some(0.6), |_| Some(12)), None);
        let d = sim.step_with(Some(0.98), |_| Some(12)).expect("hold");
        assert!(d.is_hold() && d.reason.is_hold());
        assert_eq!(
            d.to_string(),
            "cpu-bound: workers need 98% of the CPUs, holding at 6 despite queue 12"
        );
        for _ in 0..15 {
            assert_eq!(sim.step_with(Some(0.99), |_| Some(12)), None);
        }
        assert_eq!(sim.scaler.last_decision(), Some(&d));
        assert_eq!(sim.target, 6);
        // CPU frees up (the app now waits on I/O): scale up, capped at
        // what would saturate the machine.
        let up = sim.step_with(Some(0.5), |_| Some(12)).expect("scale up");
        assert_eq!(
            up.to_string(),
            "queue 12 with 6 ready and 0 starting: scale up 6 -> 12 (wanted 18, capped at 12: workers need 50% of the CPUs)"
        );

        // CPU-bound but idle queue: still scales down.
        let mut sim = Sim::new(ScaleParams::new(2, 16), 6);
        for _ in 0..120 {
            sim.step_with(Some(1.0), |_| Some(0));
        }
        assert_eq!(sim.target, 5);

        // A nonsense CPU reading is no reading: the first tick scales.
        let mut sim = Sim::new(ScaleParams::new(2, 16), 6);
        let d = sim.step_with(Some(f64::NAN), |_| Some(12)).unwrap();
        assert_eq!((d.from, d.to), (6, 16));

        // Guard off: CPU is ignored, and the first tick scales.
        let mut p = ScaleParams::new(2, 16);
        p.cpu_guard = false;
        let mut sim = Sim::new(p, 6);
        let d = sim.step_with(Some(1.0), |_| Some(12)).unwrap();
        assert_eq!((d.from, d.to), (6, 16));
    }

    #[test]
    fn burst_with_cpu_guard_reaches_max_on_second_tick() {
        // (cpu busy under load) -> target after two ticks
        for (busy, want) in [(0.1, 16), (0.2, 10), (0.5, 4), (0.95, 2)] {
            let mut sim = Sim::new(ScaleParams::new(2, 16), 2);
            for _ in 0..10 {
                sim.step_with(Some(0.02), |_| Some(0));
            }
            assert_eq!(sim.step_with(Some(busy / 2.0), |_| Some(64)), None);
            sim.step_with(Some(busy), |_| Some(62));
            assert_eq!(sim.target, want, "busy {busy}");
        }
    }

    #[test]
    fn a_cpu_sample_known_to_be_taken_under_the_queue_is_judged_at_once() {
        // An early probe after an arrival: the previous (regular) sample saw
        // no queue, but the supervisor took the CPU baseline with the queue
        // already there, so the guard decides on this tick.
        for (busy, want) in [
            (Some(0.1), Some(16)),
            (Some(0.5), Some(4)),
            (Some(0.95), None),
        ] {
            let mut s = Scaler::new(ScaleParams::new(2, 16));
            for i in 1..=10 {
                s.tick(i * 100 * MS, sample(0), pool(2, 2, 0));
            }
            let early = Sample {
                cpu_busy: busy,
                cpu_while_queued: true,
                ..sample(62)
            };
            let d = s.tick(1030 * MS, early, pool(2, 2, 0));
            let to = d.filter(|d| !d.is_hold()).map(|d| d.to);
            assert_eq!(to, want, "busy {busy:?}");
            // The same sample without that knowledge waits a tick.
            let mut s = Scaler::new(ScaleParams::new(2, 16));
            for i in 1..=10 {
                s.tick(i * 100 * MS, sample(0), pool(2, 2, 0));
            }
            let plain = Sample {
                cpu_while_queued: false,
                ..early
            };
            assert_eq!(s.tick(1030 * MS, plain, pool(2, 2, 0)), None);
        }
    }

    #[test]
    fn at_max_holds_once() {
        let mut s = Scaler::new(ScaleParams::new(2, 16));
        let full = pool(16, 16, 0);
        let mut now = S;
        let mut tick = |s: &mut Scaler, q: u32| {
            now += 100 * MS;
            s.tick(now, sample(q), full)
        };
        let d = tick(&mut s, 40).expect("announce");
        assert_eq!(d.to_string(), "queue 40 at max 16: holding at 16");
        for _ in 0..20 {
            assert_eq!(tick(&mut s, 40), None);
        }
        // Brief lulls do not end the hold; a cooldown of quiet does.
        for _ in 0..50 {
            tick(&mut s, 0);
        }
        assert_eq!(tick(&mut s, 40), None);
        for _ in 0..101 {
            tick(&mut s, 0);
        }
        assert!(tick(&mut s, 40).is_some_and(|d| d.is_hold()));
        // While workers are still starting, the pool is not at max yet.
        let mut s = Scaler::new(ScaleParams::new(2, 16));
        assert_eq!(s.tick(S, sample(40), pool(16, 4, 12)), None);
    }

    #[test]
    fn demand_is_the_target_before_the_cap_at_max() {
        let mut sim = Sim::new(ScaleParams::new(1, 4), 1);
        assert_eq!(sim.scaler.demand(), None, "no tick yet");
        sim.step(Some(0));
        assert_eq!(sim.scaler.demand(), Some(1), "idle: the target");
        // 20 queued on 1 ready: the jump is capped at 4, demand is not.
        let d = sim.step(Some(20)).expect("scale up");
        assert_eq!((d.to, sim.scaler.demand()), (4, Some(21)));
        // While the three start, they count against the queue.
        sim.step(Some(20));
        assert_eq!(sim.scaler.demand(), Some(21));
        // At max, still 20 waiting: 4 ready + 20.
        sim.run_for(S, |_, _| Some(20));
        assert_eq!((sim.target, sim.ready), (4, 4));
        assert_eq!(sim.scaler.demand(), Some(24));
        // The load ends: demand falls to the target, and with it.
        sim.step(Some(0));
        assert_eq!(sim.scaler.demand(), Some(4));
        sim.run_for(11 * S, |_, _| Some(0));
        assert_eq!((sim.target, sim.scaler.demand()), (3, Some(3)));
        // Unreadable queues: no demand to report.
        sim.step(None);
        assert_eq!(sim.scaler.demand(), None);
    }

    #[test]
    fn demand_table() {
        // (min, max, target, ready, starting, queued, prior queued samples)
        //   -> demand after one tick
        type Row = ((u32, u32, u32, u32, u32, Option<u32>, usize), Option<u32>);
        let table: &[Row] = &[
            // A blip that has not persisted: the target.
            ((1, 4, 2, 2, 0, Some(1), 0), Some(2)),
            // The same blip after 3 of 10 samples saw a queue: scales.
            ((1, 4, 2, 2, 0, Some(1), 3), Some(3)),
            // A fixed pool (min == max) never scales; demand still moves.
            ((4, 4, 4, 4, 0, Some(10), 0), Some(14)),
            // Workers starting already cover the queue: the target.
            ((1, 8, 6, 2, 4, Some(3), 0), Some(6)),
            // The target below min is raised: demand follows the new target.
            ((3, 8, 1, 1, 0, Some(0), 0), Some(3)),
            // Pool at zero (min 0), one waiting: one worker.
            ((0, 4, 0, 0, 0, Some(1), 3), Some(1)),
            ((1, 4, 2, 2, 0, None, 0), None),
        ];
        for &((min, max, target, ready, starting, queued, prior), want) in table {
            let mut s = Scaler::new(ScaleParams::new(min, max));
            let view = pool(target, ready, starting);
            for i in 0..prior {
                s.tick(i as u32 * 100 * MS, sample(1), view);
            }
            let s_ = Sample {
                queued,
                ..sample(0)
            };
            s.tick(S, s_, view);
            assert_eq!(
                s.demand(),
                want,
                "min {min} max {max} target {target} ready {ready} starting {starting} queued {queued:?} after {prior}"
            );
        }
    }

    #[test]
    fn demand_ignores_the_cpu_guard() {
        let mut sim = Sim::new(ScaleParams::new(2, 16), 6);
        for _ in 0..10 {
            sim.step_with(Some(0.2), |_| Some(0));
        }
        sim.step_with(Some(0.6), |_| Some(12));
        let d = sim.step_with(Some(0.98), |_| Some(12)).expect("hold");
        assert!(d.is_hold());
        // More cores (another pod) would take the 12 waiting.
        assert_eq!(sim.scaler.demand(), Some(18));
    }

    #[test]
    fn utilization_table() {
        // (busy, ready, target, max) -> utilization
        type Row = ((Option<u32>, u32, u32, u32), Option<f64>);
        let table: &[Row] = &[
            ((None, 2, 2, 8), Some(0.25)),
            ((None, 4, 4, 4), Some(1.0)),
            ((None, 0, 0, 4), Some(0.0)),
            ((None, 3, 6, 4), Some(1.0)), // above max after a reload
            ((Some(3), 4, 4, 8), Some(0.75)),
            ((Some(5), 4, 4, 8), Some(1.0)),
            ((Some(0), 0, 1, 4), Some(0.25)), // no ready worker to divide by
            ((None, 0, 0, 0), None),
        ];
        for &((busy, ready, target, max), want) in table {
            assert_eq!(
                utilization(busy, ready, target, max),
                want,
                "busy {busy:?} ready {ready} target {target} max {max}"
            );
        }
    }

    /// A step to zero vetoed by a busy last worker is no decision: not
    /// recorded, not counted, and it does not feed the backoff (a
    /// scale-up after it used to double the backoff for a step never
    /// taken).
    #[test]
    fn a_vetoed_step_to_zero_is_not_a_decision() {
        let mut s = Scaler::new(ScaleParams::new(0, 4));
        let busy = PoolView {
            last_worker_busy: true,
            ..pool(1, 1, 0)
        };
        let mut t = Duration::ZERO;
        while t <= 30 * S {
            assert_eq!(s.tick(t, sample(0), busy), None, "at {t:?}");
            t += 100 * MS;
        }
        assert_eq!(s.last_decision(), None);
        // A burst, then quiet again: the next step to zero comes after one
        // cooldown of quiet, not two.
        for _ in 0..5 {
            s.tick(t, sample(3), pool(1, 1, 0));
            t += 100 * MS;
        }
        let up = s.last_decision().cloned().expect("scaled up");
        assert!(up.to > 1, "{up:?}");
        let quiet_from = t;
        let mut target = up.to;
        let mut downs = Vec::new();
        while target > 0 && t < quiet_from + 120 * S {
            if let Some(d) = s.tick(t, sample(0), pool(target, target, 0)) {
                downs.push(t - quiet_from);
                target = d.to;
            }
            t += 100 * MS;
        }
        assert_eq!(target, 0, "{downs:?}");
        assert!(
            downs[0] <= 10 * S + 200 * MS,
            "first step down after {downs:?}"
        );
    }

    #[test]
    fn a_wake_from_zero_is_a_decision() {
        let mut s = Scaler::new(ScaleParams::new(0, 4));
        let d = s.woke(5 * S, 2, 3);
        assert_eq!((d.from, d.to), (0, 2));
        assert_eq!(
            d.to_string(),
            "3 connections waiting at zero workers: scale up 0 -> 2"
        );
        assert_eq!(s.last_decision(), Some(&d));
        // Like any scale-up, the next scale-down waits a cooldown of quiet.
        assert_eq!(s.tick(5 * S + 100 * MS, sample(0), pool(2, 2, 0)), None);
    }

    /// `pool.spare`: idle workers are kept beside the busy ones, without
    /// waiting for a queue, and the pool never shrinks below busy + spare.
    #[test]
    fn spares_grow_with_the_busy_workers_and_hold_the_floor() {
        let mut params = ScaleParams::new(1, 8);
        params.spare = 2;
        let mut s = Scaler::new(params);
        let view = |target, busy| PoolView {
            busy: Some(busy),
            ..pool(target, target, 0)
        };
        // 1 ready, 0 busy: 2 spares wanted.
        let d = s
            .tick(Duration::ZERO, sample(0), view(1, 0))
            .expect("spares");
        assert_eq!((d.from, d.to), (1, 2));
        assert_eq!(d.to_string(), "0 busy, 2 spare wanted: scale up 1 -> 2");
        // Two become busy, no queue: grow to 4 at once.
        let d = s
            .tick(100 * MS, sample(0), view(2, 2))
            .expect("more spares");
        assert_eq!(d.to, 4);
        // Five busy: 7.
        let d = s.tick(200 * MS, sample(0), view(4, 5)).expect("five busy");
        assert_eq!(d.to, 7);
        // All idle again: shrink one per quiet cooldown, never below 2.
        let mut target = 7;
        let mut t = 300 * MS;
        while t < 200 * S {
            if let Some(d) = s.tick(t, sample(0), view(target, 0)) {
                target = d.to;
            }
            t += 100 * MS;
        }
        assert_eq!(target, 2);
        // Without a busy count (not sampled yet), spares decide nothing.
        let mut blind = Scaler::new(params);
        assert_eq!(blind.tick(Duration::ZERO, sample(0), pool(1, 1, 0)), None);
    }
}
