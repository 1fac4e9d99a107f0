//! The pool's own CPU use, for the scaler's cpu-bound guard.
//!
//! Machine-wide CPU (/proc/stat, or PSI) counts everything else on the host
//! too: a compile job or the load generator would freeze scaling of an
//! I/O-bound pool that needs more workers. What matters is whether *our
//! workers* are short of CPU. From each worker's /proc/PID/schedstat (time
//! on a CPU, time waiting on a run queue) over the last tick:
//! - `share`: their CPU time over the cores available to droved (affinity
//!   and quota, via available_parallelism);
//! - `contention`: the part of their runnable time spent waiting for a CPU.
//!
//! The pool counts as fully busy (1.0) when contention is high: its workers
//! already queue for the CPUs, so more workers of the same app would only
//! queue too, whatever else shares the machine. Otherwise the share is the
//! answer, and the scaler caps a jump at what would saturate the cores.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::sys::process;

/// Waiting this much of their runnable time means the workers are CPU-starved.
pub const CONTENTION_BUSY: f64 = 0.3;

/// (time on a CPU, time waiting for one) per worker.
type SchedTimes = HashMap<Pid, (Duration, Duration)>;

#[derive(Debug, Default)]
pub struct PoolCpu {
    last: Option<(Instant, SchedTimes)>,
}

impl PoolCpu {
    /// Busy fraction (0..=1) of the pool since the previous call; `None` on
    /// the first call or when nothing could be read.
    pub fn sample(&mut self, pids: impl Iterator<Item = Pid>, now: Instant) -> Option<f64> {
        let current: SchedTimes = pids
            .filter_map(|pid| process::sched_times(pid).ok().map(|t| (pid, t)))
            .collect();
        let busy = self.last.as_ref().and_then(|(then, before)| {
            let wall = now.saturating_duration_since(*then).as_secs_f64();
            if wall <= 0.0 {
                return None;
            }
            let (mut run, mut wait, mut compared) = (0.0, 0.0, 0);
            for (pid, (r, w)) in &current {
                if let Some((r0, w0)) = before.get(pid) {
                    run += r.saturating_sub(*r0).as_secs_f64();
                    wait += w.saturating_sub(*w0).as_secs_f64();
                    compared += 1;
                }
            }
            // No worker read twice (unreadable, or all new): unknown, not
            // idle; an idle reading would let the scaler jump on a
            // CPU-bound pool.
            if compared == 0 {
                return None;
            }
            let cores = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1) as f64;
            Some(busy_fraction(run, wait, wall, cores))
        });
        self.last = Some((now, current));
        busy
    }
}

/// Pure: the pool's busy fraction from its run and run-queue wait times.
pub fn busy_fraction(run: f64, wait: f64, wall: f64, cores: f64) -> f64 {
    let share = (run / (wall * cores)).clamp(0.0, 1.0);
    let runnable = run + wait;
    // Ignore contention on a nearly idle pool: a few µs of wait on a
    // wake-up say nothing about CPU shortage.
    if runnable > 0.05 * wall && wait / runnable >= CONTENTION_BUSY {
        1.0
    } else {
        share
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_contention_and_idle() {
        // One worker at full speed on one of two cores.
        assert!((busy_fraction(0.1, 0.0, 0.1, 2.0) - 0.5).abs() < 1e-9);
        // Four workers queueing for two cores: starved.
        assert_eq!(busy_fraction(0.2, 0.2, 0.1, 2.0), 1.0);
        // I/O-bound: little CPU, a little wake-up latency.
        assert!(busy_fraction(0.002, 0.001, 0.1, 2.0) < 0.05);
    }

    #[test]
    fn samples_real_processes() {
        let mut cpu = PoolCpu::default();
        let me = Pid::this();
        let t0 = Instant::now();
        assert_eq!(
            cpu.sample([me].into_iter(), t0),
            None,
            "first call is the baseline"
        );
        let spin_until = Instant::now() + Duration::from_millis(50);
        while Instant::now() < spin_until {}
        let busy = cpu.sample([me].into_iter(), Instant::now()).unwrap();
        assert!(busy > 0.0 && busy <= 1.0, "{busy}");
        // A pid that cannot be read (gone) makes the sample unknown, not 0.
        let gone = Pid::from_raw(i32::MAX);
        cpu.sample([gone].into_iter(), Instant::now());
        assert_eq!(cpu.sample([gone].into_iter(), Instant::now()), None);
    }
}
