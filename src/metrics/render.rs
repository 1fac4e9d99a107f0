// SPDX-License-Identifier: MIT OR Apache-2.0
//! The metric families and their text, pure: a scrape is
//! `render(snapshot, events, live, readings, format)`. Event counters live
//! in [`Events`] for droved's lifetime; everything else is built afresh
//! for each scrape from the values it was given.

use std::borrow::Cow;

use prometheus_client::encoding::{EncodeLabelSet, prometheus_text, text};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::Live;
use super::procfs::Readings;
use crate::supervisor::status::Snapshot;

/// Buckets of the time to READY=1, in seconds: an exec'd interpreter
/// takes 0.1-1 s, a fork from a template a few ms.
const READY_BUCKETS: [f64; 14] = [
    0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ScaleLabels {
    pub(super) direction: &'static str,
    pub(super) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReasonLabel {
    pub(super) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ResultLabel {
    pub(super) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
    address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    build: String,
}

/// Counters of events, kept for droved's lifetime and carried across a
/// binary upgrade (`carry`); the READY=1 histogram starts afresh there.
#[derive(Debug)]
pub struct Events {
    pub(super) max_children_reached: Counter,
    pub(super) scale_decisions: Family<ScaleLabels, Counter>,
    pub(super) worker_exits: Family<ReasonLabel, Counter>,
    pub(super) ready_seconds: Histogram,
    pub(super) reloads: Family<ResultLabel, Counter>,
    pub(super) rollouts: Family<ResultLabel, Counter>,
    pub(super) upgrades: Family<ResultLabel, Counter>,
    /// Bumped by every hook that counts an event, so that a reused scrape
    /// (see `cache`) is never older than the last event.
    pub(super) changes: std::sync::atomic::AtomicU64,
}

impl Default for Events {
    fn default() -> Self {
        let e = Events {
            max_children_reached: Counter::default(),
            scale_decisions: Family::default(),
            worker_exits: Family::default(),
            ready_seconds: Histogram::new(READY_BUCKETS),
            reloads: Family::default(),
            rollouts: Family::default(),
            upgrades: Family::default(),
            changes: Default::default(),
        };
        // Series that exist from the start, at 0, so that queries and
        // alerts on them work before the first event.
        for (family, results) in [
            (&e.reloads, &["applied", "rejected"][..]),
            (&e.rollouts, &["completed", "rolled-back", "aborted"]),
            (&e.upgrades, &["done", "refused", "failed"]),
        ] {
            for &result in results {
                let _ = family.get_or_create(&ResultLabel { result });
            }
        }
        for (direction, reason) in [
            ("up", "queue"),
            ("down", "quiet"),
            ("hold", "at-max"),
            ("hold", "cpu-bound"),
        ] {
            let _ = e
                .scale_decisions
                .get_or_create(&ScaleLabels { direction, reason });
        }
        e
    }
}

impl Events {
    pub(super) fn count_result(&self, family: &Family<ResultLabel, Counter>, result: &'static str) {
        family.get_or_create(&ResultLabel { result }).inc();
        self.changed();
    }

    /// Notes that a counter changed (see `changes`).
    pub(super) fn changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    pub(super) fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The exposition format a scraper asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (`text/plain`).
    Text,
    /// OpenMetrics 1.0 text (`application/openmetrics-text`).
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

fn gauge(v: i64) -> ConstGauge {
    ConstGauge::new(v)
}

/// One scrape's text.
pub fn render(
    snap: &Snapshot,
    events: &Events,
    live: &Live,
    readings: &Readings,
    format: Format,
) -> String {
    // Every series names its pool (the instance name), as php-fpm_exporter
    // does: one matcher selects a deployment's pods in an autoscaler's
    // query. Not `instance` or `job`, which Prometheus sets itself.
    let pool = [(Cow::Borrowed("pool"), Cow::Owned(snap.instance.clone()))];
    let mut r = Registry::with_prefix_and_labels("drove", pool.into_iter());

    // --- Listeners (php-fpm_exporter: listen_queue, listen_queue_length,
    // max_listen_queue; uwsgi_exporter: listen_queue).
    let queue = Family::<ListenerLabels, Gauge>::default();
    let high = Family::<ListenerLabels, Gauge>::default();
    let backlog = Family::<ListenerLabels, Gauge>::default();
    for (i, l) in snap.listeners.iter().enumerate() {
        let labels = ListenerLabels {
            listener: l.name.clone(),
            address: l.address.clone(),
        };
        if let Some(q) = l.queued {
            queue.get_or_create(&labels).set(i64::from(q));
        }
        let h = live.high_water.get(i).copied().unwrap_or(0);
        high.get_or_create(&labels)
            .set(i64::from(h.max(l.queued.unwrap_or(0))));
        if let Some(b) = l.backlog {
            backlog.get_or_create(&labels).set(i64::from(b));
        }
    }
    r.register(
        "listen_queue",
        "Connections waiting in the listener's accept queue, as last probed",
        queue,
    );
    r.register(
        "max_listen_queue",
        "Highest accept-queue depth seen on the listener since droved started (probed every scale.interval)",
        high,
    );
    r.register(
        "listen_queue_length",
        "Size of the listener's accept queue (its listen backlog)",
        backlog,
    );
    if let Some(n) = &readings.netstat {
        r.register(
            "listen_overflows",
            "TCP connections dropped because an accept queue was full (TcpExt ListenOverflows): netns-wide, for every listener in droved's network namespace, not only drove's",
            ConstCounter::new(n.listen_overflows),
        );
        r.register(
            "listen_drops",
            "TCP connection requests to a listener dropped for any reason (TcpExt ListenDrops): netns-wide, for every listener in droved's network namespace, not only drove's",
            ConstCounter::new(n.listen_drops),
        );
    }

    // --- The pool.
    let workers = Family::<StateLabel, Gauge>::default();
    for (state, n) in [
        ("starting", snap.starting),
        ("ready", snap.ready),
        ("stopping", snap.stopping),
    ] {
        workers
            .get_or_create(&StateLabel { state })
            .set(i64::from(n));
    }
    r.register(
        "workers",
        "Worker processes by state (starting: not yet ready; ready; stopping: told to stop)",
        workers,
    );
    // Busy and idle as gauges of their own, not more states of
    // drove_workers: its states partition the processes (a sum over them
    // is the pool), and busy + idle partition the ready ones.
    if let (Some(busy), Some(idle)) = (snap.busy, snap.idle) {
        r.register(
            "workers_busy",
            "Ready workers that hold a connection accepted from a listener (sampled once a second from the kernel; docs: droved(8), BUSY AND IDLE WORKERS)",
            gauge(i64::from(busy)),
        );
        r.register(
            "workers_idle",
            "Ready workers that hold no connection accepted from a listener (waiting for one)",
            gauge(i64::from(idle)),
        );
    }
    r.register(
        "workers_target",
        "Number of workers the pool aims for now (the autoscaler's target)",
        gauge(i64::from(snap.target)),
    );
    // --- Signals for a cluster autoscaler (docs/autoscaling.md).
    if let Some(demand) = snap.demand {
        r.register(
            "workers_demand",
            "Workers the autoscaler would want with no pool.max and no CPU guard: ready + queued while connections wait, else the target; above drove_workers_max the pod wants more pods (docs/autoscaling.md)",
            gauge(i64::from(demand)),
        );
    }
    if let Some(u) = crate::scale::utilization(snap.busy, snap.ready, snap.target, snap.max) {
        r.register_with_unit(
            "workers_utilization",
            "Share of the pool's room in use, 0 to 1: drove_workers_busy / ready workers; drove_workers_target / drove_workers_max while busy workers are unknown or none is ready",
            Unit::Other("ratio".into()),
            ConstGauge::new(u),
        );
    }
    r.register("workers_min", "pool.min", gauge(i64::from(snap.min)));
    r.register("workers_max", "pool.max", gauge(i64::from(snap.max)));
    r.register(
        "max_children_reached",
        "Times the pool was held at pool.max while connections waited (php-fpm's max children reached)",
        events.max_children_reached.clone(),
    );
    r.register(
        "scale_decisions",
        "Scale decisions by direction (up, down, hold) and reason: the autoscaler's (queue, quiet, below-min, above-max, at-max, cpu-bound, unreadable), wake (a connection at zero workers), spare (pool.spare) or manual (drovectl scale or limits, SIGTTIN/SIGTTOU); a hold is counted once when it begins",
        events.scale_decisions.clone(),
    );

    // --- Workers.
    r.register(
        "worker_starts",
        "Workers started (forked) since droved started, across binary upgrades",
        ConstCounter::new(snap.spawned),
    );
    r.register(
        "worker_failed_starts",
        "Worker starts that failed (could not start, exited before min_uptime, never ready) since droved started, across binary upgrades",
        ConstCounter::new(snap.failed_starts),
    );
    r.register(
        "worker_exits",
        "Worker exits by reason: droved stopped it (scale-down, shutdown, rollout, max-lifetime, max-rss, ready-timeout, watchdog, request-timeout, stopped-itself: the worker sent STOPPING=1), failed-start, or after serving: ended (exited with a status), crashed (a signal droved did not send) or oom-killed (the kernel's OOM killer)",
        events.worker_exits.clone(),
    );
    r.register_with_unit(
        "worker_ready",
        "Time from a worker's start to its READY=1 (notify readiness)",
        Unit::Seconds,
        events.ready_seconds.clone(),
    );
    r.register_with_unit(
        "workers_resident_memory",
        "Sum of the resident set sizes of the current workers",
        Unit::Bytes,
        gauge(readings.workers_rss as i64),
    );
    if let Some(m) = readings.pool_memory {
        let memory = Family::<KindLabel, Gauge>::default();
        for (kind, bytes) in [("pss", m.pss), ("uss", m.uss)] {
            memory.get_or_create(&KindLabel { kind }).set(bytes as i64);
        }
        r.register_with_unit(
            "pool_memory",
            "Memory of the workers and templates from /proc/PID/smaps_rollup, summed (at most 30 s old): pss (shared pages divided among the processes mapping them; the pool's real footprint) and uss (pages only one of them maps)",
            Unit::Bytes,
            memory,
        );
    }
    r.register_with_unit(
        "workers_cpu",
        "CPU time (user + system) used by droved's children: the current workers, and the exited workers and templates droved reaped",
        Unit::Seconds,
        ConstCounter::new(readings.workers_cpu_seconds),
    );

    // --- droved itself.
    r.register(
        "reloads",
        "Configuration reloads by result (applied, rejected)",
        events.reloads.clone(),
    );
    r.register(
        "rollouts",
        "Rolling restarts of the workers by result: completed, rolled-back (a guarded rollout failed and its rollback completed), aborted",
        events.rollouts.clone(),
    );
    r.register(
        "upgrades",
        "Binary upgrades by result: done (counted by the new binary), refused by the preflight or failed (counted by the old one, which keeps running)",
        events.upgrades.clone(),
    );
    r.register(
        "generation",
        "Configuration generation of the current workers",
        gauge(snap.generation as i64),
    );
    if let Some(rss) = readings.own_rss {
        r.register_with_unit(
            "resident_memory",
            "Resident set size of droved itself",
            Unit::Bytes,
            gauge(rss as i64),
        );
    }
    r.register_with_unit(
        "uptime",
        "Time since droved started (a binary upgrade continues it)",
        Unit::Seconds,
        ConstGauge::new(snap.uptime_secs),
    );
    let build = Family::<BuildLabels, Gauge>::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            build: crate::build_id(),
        })
        .set(1);
    r.register(
        "build_info",
        "droved's version and build id; always 1",
        build,
    );

    let mut out = String::with_capacity(16 * 1024);
    let done = match format {
        Format::Text => prometheus_text::encode(&mut out, &r),
        Format::OpenMetrics => text::encode(&mut out, &r),
    };
    done.expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::procfs::{Netstat, PoolMemory};
    use crate::supervisor::status::{ListenerStatus, Phase};

    fn snapshot() -> Snapshot {
        Snapshot {
            instance: "web".into(),
            version: "0.1.0 (dev)".into(),
            pid: 1,
            phase: Phase::Running,
            failing: false,
            failure: None,
            generation: 3,
            min: 2,
            max: 16,
            target: 4,
            ready: 3,
            starting: 1,
            stopping: 0,
            busy: None,
            idle: None,
            listeners: vec![ListenerStatus {
                name: "http".into(),
                address: "127.0.0.1:8080".into(),
                family: "tcp".into(),
                queued: Some(5),
                backlog: Some(1024),
                error: None,
            }],
            queued: Some(5),
            demand: Some(7),
            last_scale: None,
            spawned: 9,
            exited: 5,
            failed_starts: 1,
            reloads: 2,
            upgrades: 0,
            uptime_secs: 12.5,
            journal_stalled: false,
            log_dropped: 0,
            template: None,
        }
    }

    fn readings() -> Readings {
        Readings {
            netstat: Some(Netstat {
                listen_overflows: 7,
                listen_drops: 8,
            }),
            own_rss: Some(6_000_000),
            workers_rss: 40_000_000,
            workers_cpu_seconds: 1.5,
            pool_memory: Some(PoolMemory {
                pss: 30_000_000,
                uss: 12_000_000,
            }),
        }
    }

    /// The sample lines of `text` (no comments), for exact assertions.
    fn has(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[test]
    fn renders_the_text_format() {
        let events = Events::default();
        events.max_children_reached.inc();
        events.ready_seconds.observe(0.2);
        let live = Live {
            high_water: vec![12],
            worker_pids: Default::default(),
        };
        let text = render(&snapshot(), &events, &live, &readings(), Format::Text);
        for line in [
            r#"drove_listen_queue{pool="web",listener="http",address="127.0.0.1:8080"} 5"#,
            r#"drove_max_listen_queue{pool="web",listener="http",address="127.0.0.1:8080"} 12"#,
            r#"drove_listen_queue_length{pool="web",listener="http",address="127.0.0.1:8080"} 1024"#,
            r#"drove_listen_overflows_total{pool="web"} 7"#,
            r#"drove_listen_drops_total{pool="web"} 8"#,
            r#"drove_workers{pool="web",state="ready"} 3"#,
            r#"drove_workers{pool="web",state="starting"} 1"#,
            r#"drove_workers{pool="web",state="stopping"} 0"#,
            r#"drove_workers_target{pool="web"} 4"#,
            r#"drove_workers_demand{pool="web"} 7"#,
            r#"drove_workers_utilization_ratio{pool="web"} 0.25"#,
            r#"drove_workers_min{pool="web"} 2"#,
            r#"drove_workers_max{pool="web"} 16"#,
            r#"drove_max_children_reached_total{pool="web"} 1"#,
            r#"drove_scale_decisions_total{pool="web",direction="hold",reason="at-max"} 0"#,
            r#"drove_worker_starts_total{pool="web"} 9"#,
            r#"drove_worker_failed_starts_total{pool="web"} 1"#,
            r#"drove_worker_ready_seconds_bucket{pool="web",le="0.25"} 1"#,
            r#"drove_worker_ready_seconds_bucket{pool="web",le="0.1"} 0"#,
            r#"drove_worker_ready_seconds_count{pool="web"} 1"#,
            r#"drove_workers_resident_memory_bytes{pool="web"} 40000000"#,
            r#"drove_workers_cpu_seconds_total{pool="web"} 1.5"#,
            r#"drove_pool_memory_bytes{pool="web",kind="pss"} 30000000"#,
            r#"drove_pool_memory_bytes{pool="web",kind="uss"} 12000000"#,
            r#"drove_reloads_total{pool="web",result="applied"} 0"#,
            r#"drove_upgrades_total{pool="web",result="failed"} 0"#,
            r#"drove_rollouts_total{pool="web",result="aborted"} 0"#,
            r#"drove_resident_memory_bytes{pool="web"} 6000000"#,
            r#"drove_uptime_seconds{pool="web"} 12.5"#,
            r#"drove_generation{pool="web"} 3"#,
            "# TYPE drove_listen_overflows_total counter",
        ] {
            assert!(has(&text, line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains("netns-wide"), "{text}");
        assert!(
            text.contains(&format!(
                r#"drove_build_info{{pool="web",version="{}",build="{}"}} 1"#,
                env!("CARGO_PKG_VERSION"),
                crate::build_id()
            )),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        if std::env::var_os("DROVE_PRINT_METRICS").is_some() {
            println!("{text}");
        }
    }

    #[test]
    fn renders_openmetrics() {
        let text = render(
            &snapshot(),
            &Events::default(),
            &Live::default(),
            &readings(),
            Format::OpenMetrics,
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            has(&text, "# TYPE drove_listen_overflows counter"),
            "{text}"
        );
        assert!(has(&text, "# UNIT drove_uptime_seconds seconds"), "{text}");
        assert!(
            has(&text, "# UNIT drove_workers_utilization_ratio ratio"),
            "{text}"
        );
        // The probe's current depth is a floor for the high-water mark.
        assert!(
            has(
                &text,
                r#"drove_max_listen_queue{pool="web",listener="http",address="127.0.0.1:8080"} 5"#
            ),
            "{text}"
        );
    }

    #[test]
    fn unreadable_values_are_left_out() {
        let mut snap = snapshot();
        snap.listeners[0].queued = None;
        snap.listeners[0].backlog = None;
        snap.demand = None;
        let r = Readings {
            netstat: None,
            own_rss: None,
            pool_memory: None,
            ..readings()
        };
        let text = render(
            &snap,
            &Events::default(),
            &Live::default(),
            &r,
            Format::Text,
        );
        assert!(
            !text.contains(r#"drove_listen_queue{pool="web","#),
            "{text}"
        );
        assert!(
            !text.contains(r#"drove_listen_queue_length{pool="web","#),
            "{text}"
        );
        assert!(
            !text.contains(r#"drove_listen_overflows_total{pool="web"} "#),
            "{text}"
        );
        assert!(
            !text.contains(r#"drove_resident_memory_bytes{pool="web"} "#),
            "{text}"
        );
        assert!(!text.contains("drove_pool_memory_bytes"), "{text}");
        assert!(!text.contains("\ndrove_workers_demand{"), "{text}");
        // Busy workers unknown (the snapshot's default here).
        assert!(!text.contains("\ndrove_workers_busy{"), "{text}");
        assert!(!text.contains("\ndrove_workers_idle{"), "{text}");
    }

    #[test]
    fn busy_and_idle_workers_and_the_utilization_they_give() {
        let mut snap = snapshot();
        snap.ready = 4;
        snap.busy = Some(3);
        snap.idle = Some(1);
        let text = render(
            &snap,
            &Events::default(),
            &Live::default(),
            &readings(),
            Format::Text,
        );
        for line in [
            r#"drove_workers_busy{pool="web"} 3"#,
            r#"drove_workers_idle{pool="web"} 1"#,
            r#"drove_workers_utilization_ratio{pool="web"} 0.75"#,
            // The lifecycle states are as they were.
            r#"drove_workers{pool="web",state="ready"} 4"#,
        ] {
            assert!(has(&text, line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains(r#"state="busy""#), "{text}");
    }
}
