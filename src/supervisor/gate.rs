//! When a new worker may be forked: spawn-rate budget and crash backoff.
//!
//! Two independent brakes, both pure (time is passed in):
//! - a token bucket bounds forks per second (`pool.spawn_rate`), with a
//!   burst of `pool.max` so a scale-up to max happens in one step;
//! - after a failed start (the worker exited before `min_uptime`, or never
//!   became ready), further spawns wait `restart_delay * 2^(n-1)`, capped at
//!   `restart_delay_max`. A command that exits at once therefore costs a
//!   handful of forks per second at most, never a fork storm.

use std::time::{Duration, Instant};

/// Consecutive failed starts from which the pool is reported as failing.
pub const FAILING_AFTER: u32 = 3;

#[derive(Debug, Clone)]
pub struct SpawnGate {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    pub restart_delay: Duration,
    pub restart_delay_max: Duration,
    /// Failed starts in a row (reset when a worker proves healthy).
    pub consecutive_failures: u32,
    /// No spawn before this instant (backoff).
    pub not_before: Option<Instant>,
    /// When the last failed start was recorded (None once healthy again):
    /// only a worker started after it can prove the command healthy.
    pub last_failure: Option<Instant>,
}

impl SpawnGate {
    pub fn new(
        rate_per_sec: u32,
        burst: u32,
        restart_delay: Duration,
        restart_delay_max: Duration,
        now: Instant,
    ) -> Self {
        let burst = burst.max(1) as f64;
        SpawnGate {
            rate: rate_per_sec.max(1) as f64,
            burst,
            tokens: burst,
            refilled: now,
            restart_delay,
            restart_delay_max,
            consecutive_failures: 0,
            not_before: None,
            last_failure: None,
        }
    }

    pub fn set_limits(
        &mut self,
        rate_per_sec: u32,
        burst: u32,
        restart_delay: Duration,
        restart_delay_max: Duration,
    ) {
        self.rate = rate_per_sec.max(1) as f64;
        self.burst = burst.max(1) as f64;
        self.tokens = self.tokens.min(self.burst);
        self.restart_delay = restart_delay;
        self.restart_delay_max = restart_delay_max;
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
    }

    /// How many spawns are allowed right now (does not consume).
    pub fn available(&mut self, now: Instant) -> u32 {
        if self.not_before.is_some_and(|t| now < t) {
            return 0;
        }
        self.refill(now);
        self.tokens.floor() as u32
    }

    /// Records one fork.
    pub fn consume(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    /// Records a failed start; returns the backoff now in force.
    pub fn record_failure(&mut self, now: Instant) -> Duration {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let exp = self.consecutive_failures.saturating_sub(1).min(20);
        let delay = self
            .restart_delay
            .saturating_mul(1u32 << exp)
            .min(self.restart_delay_max);
        self.not_before = Some(now + delay);
        self.last_failure = Some(now);
        delay
    }

    /// A worker proved healthy: forget earlier failures.
    pub fn record_success(&mut self) {
        self.consecutive_failures = 0;
        self.not_before = None;
        self.last_failure = None;
    }

    pub fn is_failing(&self) -> bool {
        self.consecutive_failures >= FAILING_AFTER
    }

    /// Time until the next spawn may happen, if backoff holds it.
    pub fn backoff_left(&self, now: Instant) -> Option<Duration> {
        self.not_before
            .and_then(|t| t.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn burst_then_rate_limited() {
        let t0 = Instant::now();
        let mut g = SpawnGate::new(10, 16, 100 * MS, 10_000 * MS, t0);
        assert_eq!(g.available(t0), 16, "a jump to max is one step");
        for _ in 0..16 {
            g.consume(t0);
        }
        assert_eq!(g.available(t0), 0);
        assert_eq!(g.available(t0 + 100 * MS), 1, "10/s refills one per 100 ms");
        assert_eq!(g.available(t0 + 10_000 * MS), 16, "never above the burst");
    }

    #[test]
    fn exponential_backoff_capped_and_reset() {
        let t0 = Instant::now();
        let mut g = SpawnGate::new(50, 4, 100 * MS, 1_000 * MS, t0);
        let delays: Vec<_> = (0..6).map(|_| g.record_failure(t0)).collect();
        assert_eq!(
            delays,
            vec![100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert!(g.is_failing());
        assert_eq!(g.available(t0 + 999 * MS), 0, "held by backoff");
        assert_eq!(g.backoff_left(t0 + 400 * MS), Some(600 * MS));
        assert!(g.available(t0 + 1000 * MS) > 0);
        g.record_success();
        assert!(!g.is_failing());
        assert_eq!(g.record_failure(t0), 100 * MS, "backoff starts over");
    }

    #[test]
    fn fork_storm_is_bounded() {
        // A command that dies instantly: simulate 10 s of "spawn whenever
        // allowed, fail at once" and count forks.
        let t0 = Instant::now();
        let mut g = SpawnGate::new(50, 8, 100 * MS, 10_000 * MS, t0);
        let mut forks = 0;
        let mut t = t0;
        while t < t0 + 10_000 * MS {
            if g.available(t) > 0 {
                g.consume(t);
                forks += 1;
                g.record_failure(t);
            }
            t += 10 * MS;
        }
        assert!(forks <= 10, "{forks} forks in 10 s");
    }
}
