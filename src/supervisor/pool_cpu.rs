//! The pool's own CPU use, for the scaler's cpu-bound guard.
//!
//! Machine-wide CPU (/proc/stat, or PSI) counts everything else on the host
//! too: a compile job or the load generator would freeze scaling of an
//! I/O-bound pool that needs more workers. What matters is whether *our
//! workers* would keep the CPUs busy. From each worker thread's
//! /proc/PID/task/TID/schedstat over the last tick: time on a CPU (`run`),
//! time waiting on a run queue for one (`wait`), and the rest of the wall
//! time, when the thread was blocked (`blocked`: sleeping, waiting for I/O
//! or a connection).
//!
//! Waiting for a CPU says the host is short of CPUs, not that the pool is
//! CPU-bound: on a host kept busy by other processes an I/O-bound worker
//! waits each time it wakes, yet it still spends most of its time blocked,
//! and another worker would use that time. So the wait is taken out: a
//! thread's *need* is `run / (run + blocked)`, the part of its time it
//! would spend on a CPU if it never waited for one (1 for a CPU-bound
//! thread however long it queues, 0.05 for one that computes 1 ms per
//! 20 ms sleep however long it queues). The pool's *demand* is the sum of
//! its threads' needs, in cores. The busy fraction is the larger of
//! `demand / cores` and the pool's measured share of the cores (`run` over
//! wall × cores), where cores are those available to droved (affinity and
//! quota, via available_parallelism).
//!
//! This holds a CPU-bound pool whether the CPUs are short because of its
//! own workers or because of others (its threads never block, so its
//! demand is its thread count), and lets an I/O-bound pool grow on a
//! loaded host. Per thread, not per process: a thread pool's sleeping
//! threads must not hide a thread that computes.
//!
//! schedstat counts a wait only when it ends; a thread still queued when
//! read (its state is `R`) has the rest of its wait estimated from its
//! mean wait per turn on a CPU (see [`need`]), so a starved worker never
//! reads as an idle one.

use std::collections::HashMap;
use std::time::Instant;

use nix::unistd::Pid;
use tracing::debug;

use crate::sys::process;

/// Scheduling record per worker thread.
type SchedTimes = HashMap<(Pid, i32), process::ThreadTimes>;

#[derive(Debug, Default)]
pub struct PoolCpu {
    last: Option<(Instant, SchedTimes)>,
}

impl PoolCpu {
    /// Busy fraction (0..=1) of the pool since the previous call; `None` on
    /// the first call or when nothing could be read.
    pub fn sample(&mut self, pids: impl Iterator<Item = Pid>) -> Option<f64> {
        // The window ends when the threads are read, not when the tick
        // began: droved itself may wait for a CPU in between on a loaded
        // host, and time counted in the wall but not in the threads' times
        // would read as blocked.
        let start = Instant::now();
        let current: SchedTimes = pids
            .filter_map(|pid| process::sched_times(pid).ok().map(|t| (pid, t)))
            .flat_map(|(pid, threads)| threads.into_iter().map(move |t| ((pid, t.tid), t)))
            .collect();
        let now = start + start.elapsed() / 2;
        let busy = self.last.as_ref().and_then(|(then, before)| {
            let wall = now.saturating_duration_since(*then).as_secs_f64();
            if wall <= 0.0 {
                return None;
            }
            let deltas: Vec<ThreadDelta> = current
                .iter()
                .filter_map(|(key, now)| {
                    let then = before.get(key)?;
                    Some(ThreadDelta {
                        run: now.run.saturating_sub(then.run).as_secs_f64(),
                        wait: now.wait.saturating_sub(then.wait).as_secs_f64(),
                        arrivals: now.arrivals.saturating_sub(then.arrivals),
                        runnable: now.runnable,
                    })
                })
                .collect();
            // No thread read twice (unreadable, or all new): unknown, not
            // idle; an idle reading would let the scaler jump on a
            // CPU-bound pool.
            if deltas.is_empty() {
                return None;
            }
            let cores = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1) as f64;
            let busy = busy_fraction(&deltas, wall, cores);
            debug!(
                wall_ms = wall * 1e3,
                threads = deltas.len(),
                run_ms = deltas.iter().map(|t| t.run).sum::<f64>() * 1e3,
                wait_ms = deltas.iter().map(|t| t.wait).sum::<f64>() * 1e3,
                demand = demand(&deltas, wall),
                busy,
                "pool CPU sample"
            );
            Some(busy)
        });
        self.last = Some((now, current));
        busy
    }
}

/// One thread's times over a sample window, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThreadDelta {
    /// On a CPU.
    pub run: f64,
    /// Runnable, waiting on a run queue for a CPU (each wait counted
    /// when it ends).
    pub wait: f64,
    /// Times it got a CPU.
    pub arrivals: u64,
    /// Running or queued for a CPU at the window's end.
    pub runnable: bool,
}

/// Time of a window not taken as blocked, per thread, in seconds: a
/// running thread's time is counted at each scheduler tick (4 ms at
/// HZ=250), so up to a tick of running reads as neither run nor wait.
pub const UNCOUNTED_RUN: f64 = 0.004;

/// Pure: the part of its time a thread would spend on a CPU if it never
/// waited for one, `run / (run + blocked)`, over a window of `wall`
/// seconds. A thread that only waited (starved) needs a whole CPU.
///
/// `blocked` is the time neither on a CPU nor queued for one. schedstat
/// counts a wait when it ends, so a thread still queued when read has a
/// wait that shows only in the next window; taken as blocked, it would
/// make a starved CPU-bound thread look idle (need 0) and open the guard
/// on a loaded host. For a thread runnable at the end that tail is taken
/// as twice its mean wait per arrival (the wait one lands in is the
/// longer kind), or the whole uncounted time if it got no CPU at all.
pub fn need(t: ThreadDelta, wall: f64) -> f64 {
    let uncounted = wall - t.run - t.wait;
    let queued_tail = match (t.runnable, t.arrivals) {
        (false, _) => 0.0,
        (true, 0) => uncounted,
        (true, n) => 2.0 * t.wait / n as f64,
    };
    let blocked = (uncounted - queued_tail - UNCOUNTED_RUN).max(0.0);
    if t.run + blocked > 0.0 {
        t.run / (t.run + blocked)
    } else if t.wait > 0.0 || t.runnable {
        1.0
    } else {
        0.0
    }
}

/// Pure: the cores the threads would keep busy if none waited for a CPU.
pub fn demand(threads: &[ThreadDelta], wall: f64) -> f64 {
    threads.iter().map(|&t| need(t, wall)).sum()
}

/// Pure: the pool's busy fraction (0..=1) of `cores` over a window of
/// `wall` seconds: its demand over the cores. Never less than its measured
/// share of the cores (each thread's need is at least `run / wall`).
pub fn busy_fraction(threads: &[ThreadDelta], wall: f64, cores: f64) -> f64 {
    if wall <= 0.0 || cores <= 0.0 {
        return 0.0;
    }
    (demand(threads, wall) / cores).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A thread that ran `run`, waited `wait` over `arrivals` turns on a
    /// CPU, and was sleeping (`runnable` false) or not when read.
    fn th(run: f64, wait: f64, arrivals: u64, runnable: bool) -> ThreadDelta {
        ThreadDelta {
            run,
            wait,
            arrivals,
            runnable,
        }
    }

    #[test]
    fn busy_is_demand_over_cores_whoever_causes_the_wait() {
        // 1 ms of CPU per 20 ms sleep, on a loaded host 10 ms of wait at
        // each wake-up: still blocked two thirds of the time.
        let io = th(0.003, 0.030, 3, false);
        // A CPU-bound worker getting a third of a CPU: never blocks.
        let cpu_loaded = th(0.033, 0.067, 8, false);
        let idle = th(0.0, 0.0, 0, false);
        let mut thread_pool = vec![th(0.1, 0.0, 1, true)];
        thread_pool.extend([idle; 7]);
        // (case, threads, cores, busy low, busy high) over 100 ms
        let table: Vec<(&str, Vec<ThreadDelta>, f64, f64, f64)> = vec![
            ("idle", vec![idle; 4], 2.0, 0.0, 0.0),
            (
                "one at full speed",
                vec![th(0.1, 0.0, 1, true)],
                2.0,
                0.5,
                0.5,
            ),
            (
                "four CPU-bound, own contention",
                vec![th(0.05, 0.05, 10, true); 4],
                2.0,
                1.0,
                1.0,
            ),
            (
                "I/O-bound, quiet host",
                vec![th(0.003, 0.0002, 3, false); 2],
                2.0,
                0.03,
                0.035,
            ),
            (
                "mixed, 60 % CPU, quiet host",
                vec![th(0.06, 0.0, 3, false); 2],
                2.0,
                0.6,
                0.65,
            ),
            // The old contention rule said 1.0 for these two.
            (
                "I/O-bound, host loaded by others",
                vec![io; 2],
                2.0,
                0.04,
                0.05,
            ),
            (
                "16 I/O-bound, host loaded by others",
                vec![io; 16],
                2.0,
                0.35,
                0.37,
            ),
            (
                "CPU-bound, host loaded by others",
                vec![cpu_loaded; 2],
                2.0,
                1.0,
                1.0,
            ),
            (
                "one CPU-bound, host loaded by others",
                vec![cpu_loaded],
                2.0,
                0.5,
                0.5,
            ),
            (
                "starved: only waited",
                vec![th(0.0, 0.1, 1, true)],
                2.0,
                0.5,
                0.5,
            ),
            (
                "a thread pool, one thread computing",
                thread_pool,
                2.0,
                0.5,
                0.5,
            ),
            (
                "times past the wall (read jitter)",
                vec![th(0.08, 0.03, 2, false)],
                1.0,
                1.0,
                1.0,
            ),
        ];
        for (case, threads, cores, low, high) in table {
            let busy = busy_fraction(&threads, 0.1, cores);
            assert!(
                (low - 1e-9..=high + 1e-9).contains(&busy),
                "{case}: busy {busy}, expected {low}..={high}"
            );
        }
        assert_eq!(busy_fraction(&[io; 2], 0.0, 2.0), 0.0, "no window");
    }

    #[test]
    fn need_takes_the_wait_out() {
        // 2 ms on a CPU per 18 ms blocked: fifty rounds in a second.
        let quiet = need(th(0.100, 0.0, 50, false), 1.0);
        // The same rounds with 10 ms of waiting for a CPU in each: fewer
        // rounds in a second, the same need.
        let loaded = need(th(0.100 / 1.5, 0.100 / 0.3, 33, false), 1.0);
        assert!((quiet - 0.1).abs() < 0.001, "{quiet}");
        assert!((loaded - 0.1).abs() < 0.001, "{loaded}");
    }

    #[test]
    fn a_wait_not_counted_yet_is_not_taken_as_blocked() {
        // CPU-bound on a loaded host, read while queued for 15 ms: that
        // wait is not in this window's numbers.
        let queued = th(0.030, 0.055, 5, true);
        assert_eq!(need(queued, 0.1), 1.0);
        // Queued for the whole window: no run, no wait counted. Not idle.
        assert_eq!(need(th(0.0, 0.0, 0, true), 0.1), 1.0);
        assert_eq!(need(th(0.0, 0.0, 0, false), 0.1), 0.0, "idle");
        // The same in a 25 ms window (the early probe after an arrival).
        assert_eq!(need(th(0.008, 0.009, 2, true), 0.025), 1.0);
        // I/O-bound threads in that short window are still judged by
        // their sleep, whether read asleep or just woken.
        assert!(need(th(0.0005, 0.004, 1, false), 0.025) < 0.05);
        assert!(need(th(0.0005, 0.004, 1, true), 0.025) < 0.1);
        // Woken on a loaded host, read queued: a little more, still small.
        assert!(need(th(0.003, 0.030, 3, true), 0.1) < 0.07);
    }

    #[test]
    fn samples_real_processes() {
        let mut cpu = PoolCpu::default();
        let me = Pid::this();
        assert_eq!(
            cpu.sample([me].into_iter()),
            None,
            "first call is the baseline"
        );
        let spin_until = Instant::now() + Duration::from_millis(50);
        while Instant::now() < spin_until {}
        let busy = cpu.sample([me].into_iter()).unwrap();
        assert!(busy > 0.0 && busy <= 1.0, "{busy}");
        // A pid that cannot be read (gone) makes the sample unknown, not 0.
        let gone = Pid::from_raw(i32::MAX);
        cpu.sample([gone].into_iter());
        assert_eq!(cpu.sample([gone].into_iter()), None);
    }
}
