// SPDX-License-Identifier: MIT OR Apache-2.0
//! Event counters across a binary upgrade: the old image writes them into
//! the handover, the new one starts from them, so that
//! `drove_reloads_total` and its siblings keep counting as
//! `drove_worker_starts_total` and the D-Bus counters do (they reset to 0
//! at every upgrade before). Pure.
//!
//! A counter is carried as `family{label=value,…}` → count. Label values
//! are interned against the lists below: the families' label sets take
//! `&'static str`, and a value an older or newer image knows but this one
//! does not is dropped rather than invented. The histogram of the time to
//! READY=1 is not carried: it starts afresh, as at any restart.

use std::collections::BTreeMap;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::render::{Events, ReasonLabel, ResultLabel, ScaleLabels};

/// Every direction and reason `Metrics::scale_decision` and
/// `Metrics::manual_scale` write.
const DIRECTIONS: [&str; 3] = ["up", "down", "hold"];
const SCALE_REASONS: [&str; 10] = [
    "queue",
    "quiet",
    "below-min",
    "above-max",
    "cpu-bound",
    "at-max",
    "unreadable",
    "manual",
    "wake",
    "spare",
];
/// Every reason `Metrics::worker_exited` writes.
const EXIT_REASONS: [&str; 13] = [
    "scale-down",
    "shutdown",
    "ready-timeout",
    "watchdog",
    "request-timeout",
    "rollout",
    "max-lifetime",
    "max-rss",
    "stopped-itself",
    "failed-start",
    "ended",
    "crashed",
    "oom-killed",
];
const RELOAD_RESULTS: [&str; 2] = ["applied", "rejected"];
const ROLLOUT_RESULTS: [&str; 3] = ["completed", "rolled-back", "aborted"];
const UPGRADE_RESULTS: [&str; 3] = ["done", "refused", "failed"];

/// The counts of `events` worth carrying (the non-zero ones).
pub fn counts(events: &Events) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut put = |key: String, n: u64| {
        if n > 0 {
            out.insert(key, n);
        }
    };
    put(
        "max_children_reached".into(),
        events.max_children_reached.get(),
    );
    for direction in DIRECTIONS {
        for reason in SCALE_REASONS {
            let n = get(&events.scale_decisions, &ScaleLabels { direction, reason });
            put(scale_key(direction, reason), n);
        }
    }
    for reason in EXIT_REASONS {
        put(
            exit_key(reason),
            get(&events.worker_exits, &ReasonLabel { reason }),
        );
    }
    for (name, family, results) in result_families(events) {
        for &result in results {
            put(
                result_key(name, result),
                get(family, &ResultLabel { result }),
            );
        }
    }
    out
}

/// Adds carried `counts` to `events` (a new image's, at 0). Keys this
/// image does not know are skipped.
pub fn restore(events: &Events, counts: &BTreeMap<String, u64>) {
    let count = |key: String| counts.get(&key).copied().unwrap_or(0);
    events
        .max_children_reached
        .inc_by(count("max_children_reached".into()));
    for direction in DIRECTIONS {
        for reason in SCALE_REASONS {
            let n = count(scale_key(direction, reason));
            if n > 0 {
                events
                    .scale_decisions
                    .get_or_create(&ScaleLabels { direction, reason })
                    .inc_by(n);
            }
        }
    }
    for reason in EXIT_REASONS {
        let n = count(exit_key(reason));
        if n > 0 {
            events
                .worker_exits
                .get_or_create(&ReasonLabel { reason })
                .inc_by(n);
        }
    }
    for (name, family, results) in result_families(events) {
        for &result in results {
            let n = count(result_key(name, result));
            if n > 0 {
                family.get_or_create(&ResultLabel { result }).inc_by(n);
            }
        }
    }
    events.changed();
}

type ResultFamily<'a> = (
    &'static str,
    &'a Family<ResultLabel, Counter>,
    &'static [&'static str],
);

fn result_families(e: &Events) -> [ResultFamily<'_>; 3] {
    [
        ("reloads", &e.reloads, &RELOAD_RESULTS),
        ("rollouts", &e.rollouts, &ROLLOUT_RESULTS),
        ("upgrades", &e.upgrades, &UPGRADE_RESULTS),
    ]
}

fn get<L>(family: &Family<L, Counter>, labels: &L) -> u64
where
    L: Clone + std::hash::Hash + Eq,
{
    family.get(labels).map(|c| c.get()).unwrap_or(0)
}

fn scale_key(direction: &str, reason: &str) -> String {
    format!("scale_decisions{{direction={direction},reason={reason}}}")
}

fn exit_key(reason: &str) -> String {
    format!("worker_exits{{reason={reason}}}")
}

fn result_key(family: &str, result: &str) -> String {
    format!("{family}{{result={result}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_a_round_trip_and_add_up() {
        let old = Events::default();
        old.max_children_reached.inc_by(3);
        old.scale_decisions
            .get_or_create(&ScaleLabels {
                direction: "down",
                reason: "manual",
            })
            .inc_by(2);
        old.worker_exits
            .get_or_create(&ReasonLabel { reason: "max-rss" })
            .inc();
        old.upgrades
            .get_or_create(&ResultLabel { result: "done" })
            .inc_by(4);
        let carried = counts(&old);
        assert_eq!(carried.len(), 4, "{carried:?}");

        let new = Events::default();
        restore(&new, &carried);
        assert_eq!(counts(&new), carried);
        // The new image counts on from there.
        new.upgrades
            .get_or_create(&ResultLabel { result: "done" })
            .inc();
        assert_eq!(counts(&new)["upgrades{result=done}"], 5);
    }

    #[test]
    fn unknown_keys_are_skipped() {
        let new = Events::default();
        let carried = BTreeMap::from([
            ("worker_exits{reason=oom}".to_string(), 7),
            ("reloads{result=applied}".to_string(), 1),
        ]);
        restore(&new, &carried);
        assert_eq!(
            counts(&new),
            BTreeMap::from([("reloads{result=applied}".to_string(), 1)])
        );
    }

    /// Every label value the hooks write must be one `restore` knows, or
    /// its count would be lost at the next upgrade.
    #[test]
    fn every_label_the_hooks_write_is_carried() {
        use crate::scale::{Decision, Reason};
        use crate::supervisor::plan::{EndCause, ExitVerdict};
        use crate::supervisor::pool::StopReason;
        let m = super::super::Metrics::default();
        let reasons = [
            Reason::Queue {
                queued: 1,
                ready: 1,
                starting: 0,
                busy_samples: 1,
                wanted: 2,
                max: 3,
                cpu_busy: None,
            },
            Reason::Quiet {
                quiet: std::time::Duration::ZERO,
            },
            Reason::BelowMin { min: 1 },
            Reason::AboveMax { max: 1 },
            Reason::CpuBound {
                busy: 1.0,
                queued: 1,
            },
            Reason::AtMax { queued: 1, max: 1 },
            Reason::Unreadable { listeners: 1 },
            Reason::Wake { queued: 1 },
            Reason::Spare { busy: 1, spare: 1 },
        ];
        for reason in reasons {
            for to in [1, 2, 3] {
                m.scale_decision(&Decision {
                    at: std::time::Duration::ZERO,
                    from: 2,
                    to,
                    reason: reason.clone(),
                });
            }
        }
        m.manual_scale(1, 2);
        m.manual_scale(2, 1);
        for reason in StopReason::ALL {
            m.worker_exited(
                &ExitVerdict::Stopped {
                    reason,
                    failed: false,
                },
                EndCause::Exited,
            );
        }
        m.worker_exited(
            &ExitVerdict::FailedStart { never_ready: true },
            EndCause::Exited,
        );
        for cause in [EndCause::Exited, EndCause::Crashed, EndCause::OomKilled] {
            m.worker_exited(&ExitVerdict::Ended, cause);
        }
        for applied in [true, false] {
            m.reload(applied);
        }
        use super::super::{RolloutResult, UpgradeResult};
        for r in [
            RolloutResult::Completed,
            RolloutResult::RolledBack,
            RolloutResult::Aborted,
        ] {
            m.rollout(r);
        }
        for r in [
            UpgradeResult::Done,
            UpgradeResult::Refused,
            UpgradeResult::Failed,
        ] {
            m.upgrade(r);
        }
        let written = render_counter_lines(&m.inner.events);
        let carried = counts(&m.inner.events);
        let total: u64 = carried.values().sum();
        assert_eq!(total, written, "carried {carried:?}");
    }

    /// The sum of every event counter's value, read from the families
    /// themselves (whatever labels the hooks used).
    fn render_counter_lines(e: &Events) -> u64 {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("s", "", e.scale_decisions.clone());
        registry.register("x", "", e.worker_exits.clone());
        registry.register("r", "", e.reloads.clone());
        registry.register("o", "", e.rollouts.clone());
        registry.register("u", "", e.upgrades.clone());
        registry.register("m", "", e.max_children_reached.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}
