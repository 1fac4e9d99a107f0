// SPDX-License-Identifier: MIT OR Apache-2.0
//! The last rendered scrape per format, reused for a short while, pure.
//!
//! Rendering reads /proc for every worker and builds every family afresh
//! (1-3 ms of droved's CPU with a few dozen workers); a client scraping in
//! a loop made droved spend most of a core on it. A scrape within
//! [`REUSE_FOR`] of the last render of the same format, with the same
//! snapshot (uptime aside) and no event counted since, gets the same text.
//! So a change the supervisor publishes is seen by the next scrape at once;
//! what may lag by up to [`REUSE_FOR`] is what the scrape itself reads
//! (RSS, CPU times, netstat, the queue high-water marks) and the uptime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::render::Format;
use crate::supervisor::status::Snapshot;

/// How long a rendered scrape is reused.
pub const REUSE_FOR: Duration = Duration::from_secs(1);

/// What a rendered text depends on, apart from /proc and the clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    snapshot: Snapshot,
    events: u64,
}

impl Key {
    /// `events`: the count of event-counter changes so far.
    pub fn new(snapshot: &Snapshot, events: u64) -> Key {
        let mut snapshot = snapshot.clone();
        snapshot.uptime_secs = 0.0;
        Key { snapshot, events }
    }
}

struct Entry {
    at: Instant,
    key: Key,
    text: Arc<String>,
}

/// One entry per format.
#[derive(Default)]
pub struct Cache {
    entries: [Option<Entry>; 2],
}

fn slot(format: Format) -> usize {
    match format {
        Format::Text => 0,
        Format::OpenMetrics => 1,
    }
}

impl Cache {
    /// The text rendered for `format` with `key`, if not older than
    /// [`REUSE_FOR`] at `now`.
    pub fn get(&self, format: Format, key: &Key, now: Instant) -> Option<Arc<String>> {
        self.entries[slot(format)]
            .as_ref()
            .filter(|e| &e.key == key && now.saturating_duration_since(e.at) < REUSE_FOR)
            .map(|e| e.text.clone())
    }

    pub fn put(&mut self, format: Format, key: Key, now: Instant, text: Arc<String>) {
        self.entries[slot(format)] = Some(Entry { at: now, key, text });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::status::Phase;

    fn snapshot() -> Snapshot {
        Snapshot {
            instance: "web".into(),
            version: "0.1.0 (dev)".into(),
            pid: 1,
            phase: Phase::Running,
            failing: false,
            failure: None,
            generation: 1,
            min: 1,
            max: 4,
            target: 2,
            ready: 2,
            starting: 0,
            stopping: 0,
            busy: None,
            idle: None,
            listeners: vec![],
            queued: Some(0),
            demand: Some(2),
            last_scale: None,
            spawned: 2,
            exited: 0,
            failed_starts: 0,
            reloads: 0,
            upgrades: 0,
            uptime_secs: 10.0,
            journal_stalled: false,
            log_dropped: 0,
            template: None,
        }
    }

    #[test]
    fn reused_for_a_while_per_format() {
        let t0 = Instant::now();
        let mut c = Cache::default();
        let key = Key::new(&snapshot(), 3);
        assert_eq!(c.get(Format::Text, &key, t0), None);
        c.put(Format::Text, key.clone(), t0, Arc::new("text".into()));
        let got = c.get(Format::Text, &key, t0 + REUSE_FOR / 2).unwrap();
        assert_eq!(got.as_str(), "text");
        assert_eq!(c.get(Format::OpenMetrics, &key, t0), None, "per format");
        assert_eq!(c.get(Format::Text, &key, t0 + REUSE_FOR), None, "expired");
    }

    #[test]
    fn a_change_the_supervisor_published_or_an_event_is_seen_at_once() {
        let t0 = Instant::now();
        let mut c = Cache::default();
        c.put(
            Format::Text,
            Key::new(&snapshot(), 3),
            t0,
            Arc::new("old".into()),
        );
        // The uptime alone moves on every publish: not a change.
        let mut later = snapshot();
        later.uptime_secs = 10.5;
        assert!(c.get(Format::Text, &Key::new(&later, 3), t0).is_some());
        later.ready = 3;
        assert!(c.get(Format::Text, &Key::new(&later, 3), t0).is_none());
        assert!(c.get(Format::Text, &Key::new(&snapshot(), 4), t0).is_none());
    }
}
