//! Which workers' memory to read for `worker.max_rss`, and when.
//!
//! `max_rss` compares what a worker owns (USS + its swap share, see
//! `sys::memory`), which only smaps_rollup tells, and reading that walks
//! the worker's page tables: about 7 ms for a 130 MB worker, so 64 of them
//! would cost 0.45 s a sweep. So once a second the watch first reads the
//! cheap bound (`VmRSS + VmSwap` from /proc/PID/status); a worker under the
//! limit by that bound is under it for sure. Only the others get an exact
//! reading, oldest reading first, within [`BUDGET`] per check: at most ~1 %
//! of a core, and every worker is read again within a minute or so even in
//! a large template pool where every worker's RSS is over the limit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

/// How often workers' memory is compared with `worker.max_rss`.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Time a check may spend on exact readings (at least one is made).
pub const BUDGET: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
pub struct MemoryWatch {
    last_check: Option<Instant>,
    seen: HashMap<Pid, Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Owned memory, or an upper bound of it that is within the limit.
    owned: u64,
    /// When it was read exactly (`None`: only the bound is known).
    exact_at: Option<Instant>,
}

impl MemoryWatch {
    /// Whether a check is due at `now`; if so, it counts as made.
    pub fn due(&mut self, now: Instant) -> bool {
        let due = self
            .last_check
            .is_none_or(|t| now.duration_since(t) >= CHECK_EVERY);
        if due {
            self.last_check = Some(now);
        }
        due
    }

    /// Reads the workers `pids` against `limit`: `bound` is the cheap upper
    /// bound, `exact` the owned memory (either `None` when unreadable), and
    /// `spent` the time used so far in this check.
    pub fn check(
        &mut self,
        now: Instant,
        limit: u64,
        pids: &[Pid],
        mut bound: impl FnMut(Pid) -> Option<u64>,
        mut exact: impl FnMut(Pid) -> Option<u64>,
        spent: impl Fn() -> Duration,
    ) {
        self.seen.retain(|pid, _| pids.contains(pid));
        let mut over = Vec::new();
        for &pid in pids {
            match bound(pid) {
                Some(b) if b <= limit => {
                    self.seen.insert(
                        pid,
                        Seen {
                            owned: b,
                            exact_at: None,
                        },
                    );
                }
                Some(_) => over.push((self.seen.get(&pid).and_then(|s| s.exact_at), pid)),
                None => {
                    self.seen.remove(&pid);
                }
            }
        }
        // Never read exactly first, then the oldest reading.
        over.sort();
        for (i, (_, pid)) in over.into_iter().enumerate() {
            if i > 0 && spent() >= BUDGET {
                break;
            }
            if let Some(owned) = exact(pid) {
                self.seen.insert(
                    pid,
                    Seen {
                        owned,
                        exact_at: Some(now),
                    },
                );
            }
        }
    }

    /// A worker's owned memory as last read, or a bound of it within the
    /// limit; `None` when it is over the bound and not read exactly yet.
    pub fn owned(&self, pid: Pid) -> Option<u64> {
        self.seen.get(&pid).map(|s| s.owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    const MIB: u64 = 1 << 20;

    fn pids(n: i32) -> Vec<Pid> {
        (1..=n).map(Pid::from_raw).collect()
    }

    #[test]
    fn checks_once_a_second() {
        let mut w = MemoryWatch::default();
        let t = Instant::now();
        assert!(w.due(t));
        assert!(!w.due(t + Duration::from_millis(500)));
        assert!(w.due(t + CHECK_EVERY));
    }

    #[test]
    fn under_the_bound_needs_no_exact_reading() {
        let mut w = MemoryWatch::default();
        let read = RefCell::new(vec![]);
        w.check(
            Instant::now(),
            32 * MIB,
            &pids(2),
            |_| Some(20 * MIB),
            |p| {
                read.borrow_mut().push(p);
                Some(1)
            },
            || Duration::ZERO,
        );
        assert!(read.borrow().is_empty());
        assert_eq!(w.owned(Pid::from_raw(1)), Some(20 * MIB));
    }

    /// One check where every worker's bound is over the limit and each
    /// exact reading takes 7 ms; returns the pids read exactly.
    fn round(w: &mut MemoryWatch, all: &[Pid], t: Instant) -> Vec<i32> {
        let spent = Cell::new(Duration::ZERO);
        let reads = RefCell::new(vec![]);
        w.check(
            t,
            32 * MIB,
            all,
            |_| Some(130 * MIB),
            |p| {
                reads.borrow_mut().push(p.as_raw());
                spent.set(spent.get() + Duration::from_millis(7));
                Some(if p.as_raw() == 3 { 48 * MIB } else { 3 * MIB })
            },
            || spent.get(),
        );
        reads.into_inner()
    }

    /// Template mode: every worker's RSS is over the limit; the exact
    /// readings go round, oldest first, within the budget.
    #[test]
    fn exact_readings_take_turns_within_the_budget() {
        let mut w = MemoryWatch::default();
        let all = pids(4);
        let t0 = Instant::now();
        assert_eq!(round(&mut w, &all, t0), vec![1, 2]);
        assert_eq!(w.owned(Pid::from_raw(1)), Some(3 * MIB));
        assert_eq!(w.owned(Pid::from_raw(3)), None, "not read yet: unknown");
        assert_eq!(round(&mut w, &all, t0 + CHECK_EVERY), vec![3, 4]);
        assert_eq!(w.owned(Pid::from_raw(3)), Some(48 * MIB));
        assert_eq!(
            round(&mut w, &all, t0 + 2 * CHECK_EVERY),
            vec![1, 2],
            "oldest first"
        );
    }

    #[test]
    fn gone_and_unreadable_workers_are_forgotten_or_unknown() {
        let mut w = MemoryWatch::default();
        let t = Instant::now();
        w.check(
            t,
            MIB,
            &pids(2),
            |_| Some(2 * MIB),
            |_| Some(5),
            || Duration::ZERO,
        );
        assert_eq!(w.owned(Pid::from_raw(2)), Some(5));
        w.check(
            t,
            MIB,
            &pids(1),
            |_| Some(2 * MIB),
            |_| None,
            || Duration::ZERO,
        );
        assert_eq!(w.owned(Pid::from_raw(2)), None, "gone");
        assert_eq!(
            w.owned(Pid::from_raw(1)),
            Some(5),
            "last exact reading kept"
        );
        w.check(t, MIB, &pids(1), |_| None, |_| Some(5), || Duration::ZERO);
        assert_eq!(w.owned(Pid::from_raw(1)), None, "exited meanwhile");
    }
}
