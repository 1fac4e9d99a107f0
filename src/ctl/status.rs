//! `drovectl status`: every property in one GetAll call, shown like
//! `systemctl status`, or as JSON (the daemon's snapshot, plus the bus
//! name and control group).

use std::collections::HashMap;

use serde::Serialize;
use zbus::names::InterfaceName;
use zbus::zvariant::OwnedValue;

use super::{CtlError, Target, human_duration, print_json};
use crate::bus;
use crate::bus::properties::{self, PropertyError};
use crate::supervisor::status::Snapshot;

#[derive(Debug, Serialize)]
struct Status {
    bus_name: String,
    control_group: Option<String>,
    #[serde(flatten)]
    snapshot: Snapshot,
}

pub async fn run(target: &Target, json: bool) -> Result<(), CtlError> {
    let status = fetch(target).await?;
    if json {
        print_json(&status)
    } else {
        print!("{}", render(target, &status));
        Ok(())
    }
}

async fn fetch(target: &Target) -> Result<Status, CtlError> {
    let props = target.properties().await?;
    let map = props
        .get_all(InterfaceName::from_static_str_unchecked(bus::INTERFACE))
        .await
        .map_err(|e| target.zbus_error(e.into()))?;
    decode(&map).map_err(|e| {
        CtlError::Failed(format!(
            "{} answered with unexpected properties: {e}",
            target.name
        ))
    })
}

/// droved's properties as `drovectl status` shows them.
fn decode(map: &HashMap<String, OwnedValue>) -> Result<Status, PropertyError> {
    let snapshot = properties::snapshot_from(map)?;
    Ok(Status {
        bus_name: bus::bus_name(&snapshot.instance).unwrap_or_default(),
        control_group: properties::control_group(map)?,
        snapshot,
    })
}

fn render(target: &Target, st: &Status) -> String {
    let s = &st.snapshot;
    let mut out = String::new();
    let mut line = |label: &str, text: String| {
        out.push_str(&format!("{label:>11}: {text}\n"));
    };
    let mark = if s.failing { "×" } else { "●" };
    let head = format!("{mark} drove instance {:?}: {}\n", s.instance, s.phase);
    line("Bus name", format!("{} (via {})", target.name, target.via));
    line(
        "Main PID",
        format!(
            "{} (droved {}), up {}",
            s.pid,
            s.version,
            human_duration(s.uptime_secs)
        ),
    );
    line("Status", s.status_line());
    let activity = match (s.busy, s.idle) {
        (Some(busy), Some(idle)) => format!(" ({busy} busy, {idle} idle)"),
        _ => String::new(),
    };
    let mut workers = format!(
        "{} ready{activity}, {} starting, {} stopping; target {} (min {}, max {})",
        s.ready, s.starting, s.stopping, s.target, s.min, s.max
    );
    if s.failing {
        workers.push_str(&format!(
            "; FAILING: {}",
            s.failure
                .as_deref()
                .unwrap_or("workers exit right after start")
        ));
    }
    line("Workers", workers);
    if let Some(t) = &s.template {
        line("Template", t.clone());
    }
    line(
        "Queue",
        s.queued
            .map(|q| q.to_string())
            .unwrap_or_else(|| "unknown".into()),
    );
    for l in &s.listeners {
        let q = match (l.queued, l.backlog, &l.error) {
            (Some(q), Some(b), _) => format!("{q} queued of backlog {b}"),
            (Some(q), None, _) => format!("{q} queued"),
            (None, _, Some(e)) => format!("queue unreadable: {e}"),
            (None, _, None) => "queue unknown".into(),
        };
        line(
            "Listener",
            format!("{} {} ({}): {q}", l.name, l.address, l.family),
        );
    }
    line(
        "Last scale",
        s.last_scale.clone().unwrap_or_else(|| "none yet".into()),
    );
    line(
        "Generation",
        format!(
            "{} ({} reloads, {} upgrades)",
            s.generation, s.reloads, s.upgrades
        ),
    );
    line(
        "Counters",
        format!(
            "{} spawned, {} exited, {} failed starts",
            s.spawned, s.exited, s.failed_starts
        ),
    );
    if s.journal_stalled || s.log_dropped > 0 {
        line(
            "Journal",
            format!(
                "{}{} log message(s) from droved dropped",
                if s.journal_stalled {
                    "not reading; "
                } else {
                    ""
                },
                s.log_dropped
            ),
        );
    }
    line(
        "Control",
        match &st.control_group {
            Some(g) => format!("root, droved's user and group {g:?}"),
            None => "root and droved's user".into(),
        },
    );
    head + &out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::status::{ListenerStatus, Phase};

    fn snapshot() -> Snapshot {
        Snapshot {
            instance: "demo".into(),
            version: "0.1.0".into(),
            pid: 42,
            phase: Phase::Running,
            failing: false,
            failure: None,
            generation: 3,
            min: 2,
            max: 8,
            target: 4,
            ready: 4,
            starting: 0,
            stopping: 1,
            busy: Some(3),
            idle: Some(1),
            listeners: vec![ListenerStatus {
                name: "web".into(),
                address: "127.0.0.1:8080".into(),
                family: "tcp".into(),
                queued: Some(2),
                backlog: Some(128),
                error: None,
            }],
            queued: Some(2),
            demand: None,
            last_scale: Some("scale up 2 -> 4".into()),
            spawned: 9,
            exited: 5,
            failed_starts: 1,
            reloads: 2,
            upgrades: 0,
            uptime_secs: 12.5,
            journal_stalled: true,
            log_dropped: 17,
            template: Some("ready (pid 42)".into()),
        }
    }

    /// GetAll's answer for `s`, as the daemon builds it.
    fn properties(s: &Snapshot) -> HashMap<String, OwnedValue> {
        let mut map: HashMap<String, OwnedValue> = properties::live_properties(s)
            .into_iter()
            .map(|(k, v)| (k.to_string(), OwnedValue::try_from(v).unwrap()))
            .collect();
        for (k, v) in [
            (
                "Instance",
                OwnedValue::from(zbus::zvariant::Str::from(s.instance.clone())),
            ),
            (
                "Version",
                OwnedValue::from(zbus::zvariant::Str::from(s.version.clone())),
            ),
            ("Pid", OwnedValue::from(s.pid)),
            (
                "ControlGroup",
                OwnedValue::from(zbus::zvariant::Str::from("")),
            ),
            ("Uptime", OwnedValue::from(s.uptime_secs)),
        ] {
            map.insert(k.into(), v);
        }
        map
    }

    #[test]
    fn the_bus_properties_decode_to_the_daemons_snapshot() {
        let s = snapshot();
        assert_eq!(decode(&properties(&s)).unwrap().snapshot, s);
    }

    #[test]
    fn unknown_activity_decodes_to_none_and_is_left_out_of_the_text() {
        let mut s = snapshot();
        s.busy = None;
        s.idle = None;
        let map = properties(&s);
        assert_eq!(map["Busy"], OwnedValue::from(-1i32));
        assert_eq!(decode(&map).unwrap().snapshot, s);
    }

    #[test]
    fn a_droved_without_the_journal_properties_still_has_a_status() {
        let s = snapshot();
        let mut map = properties(&s);
        map.remove("JournalStalled");
        map.remove("LogDropped");
        map.remove("Template");
        map.remove("Busy");
        map.remove("Idle");
        let got = decode(&map).unwrap().snapshot;
        assert_eq!(got.template, None);
        assert_eq!((got.busy, got.idle), (None, None));
        assert!(!got.journal_stalled);
        assert_eq!(got.log_dropped, 0);
        // An older property stays required: its absence is an error.
        map.remove("Ready");
        assert_eq!(decode(&map).unwrap_err().to_string(), "no property Ready");
    }
}
