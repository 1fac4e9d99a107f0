//! How fast unprivileged clients of the private socket may send messages
//! (pure): a token bucket per uid and one for all unprivileged uids
//! together. droved serves everyone on one thread, so without this a
//! flood of cheap read-only calls from any local user takes the time
//! root's calls need. A message over the rate is not refused: it is read
//! later, so the flooding client waits on its own socket.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Messages per second one unprivileged uid may send (all its
/// connections together), after a burst of [`UID_BURST`].
pub const UID_RATE: f64 = 100.0;
pub const UID_BURST: f64 = 50.0;
/// Messages per second all unprivileged uids may send together.
pub const ALL_RATE: f64 = 400.0;
pub const ALL_BURST: f64 = 200.0;
/// uids tracked beyond which full (idle) buckets are forgotten.
const MAX_TRACKED: usize = 256;

#[derive(Debug, Clone)]
struct Bucket {
    /// Negative: messages already promised to waiting readers.
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    /// Takes one token; how long until it is really there.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst) - 1.0;
        self.at = now;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }

    fn is_full(&self, rate: f64, burst: f64, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate >= burst
    }
}

/// The buckets of every unprivileged uid.
#[derive(Debug)]
pub struct Throttle {
    per_uid: HashMap<u32, Bucket>,
    all: Bucket,
}

impl Throttle {
    pub fn new(now: Instant) -> Throttle {
        Throttle {
            per_uid: HashMap::new(),
            all: Bucket::full(ALL_BURST, now),
        }
    }

    /// Accounts for one message from `uid` at `now`; returns how long its
    /// reader must wait before taking it.
    pub fn take(&mut self, uid: u32, now: Instant) -> Duration {
        if self.per_uid.len() >= MAX_TRACKED {
            self.per_uid
                .retain(|_, b| !b.is_full(UID_RATE, UID_BURST, now));
        }
        let own = self
            .per_uid
            .entry(uid)
            .or_insert_with(|| Bucket::full(UID_BURST, now))
            .take(UID_RATE, UID_BURST, now);
        let all = self.all.take(ALL_RATE, ALL_BURST, now);
        own.max(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_free_then_one_uid_gets_its_rate() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0);
        for _ in 0..UID_BURST as usize {
            assert_eq!(t.take(65534, t0), Duration::ZERO);
        }
        // Each further message waits one more interval: 100/s.
        let waits: Vec<Duration> = (0..3).map(|_| t.take(65534, t0)).collect();
        let step = Duration::from_secs_f64(1.0 / UID_RATE);
        assert_eq!(waits, vec![step, step * 2, step * 3]);
        // Time pays the debt back.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(t.take(65534, later), Duration::ZERO);
        // Another uid is not held up by the first one's debt.
        assert_eq!(t.take(1000, t0), Duration::ZERO);
    }

    #[test]
    fn many_uids_together_get_the_shared_rate() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0);
        let mut uid = 2000;
        let mut free = 0;
        while t.take(uid, t0).is_zero() {
            free += 1;
            uid += 1;
        }
        assert_eq!(free, ALL_BURST as usize);
        assert!(
            t.take(uid + 1, t0) > Duration::ZERO,
            "a fresh uid waits too"
        );
    }

    #[test]
    fn idle_uids_are_forgotten() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0);
        for uid in 0..MAX_TRACKED as u32 {
            t.take(uid, t0);
        }
        t.take(99_999, t0 + Duration::from_secs(60));
        assert_eq!(t.per_uid.len(), 1);
    }
}
