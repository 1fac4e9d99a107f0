//! The D-Bus properties of a snapshot, both ways, in one place: what the
//! daemon exports ([`live_properties`], plus the constant ones on the
//! interface) and how drovectl reads them back ([`snapshot_from`]). The
//! round trip is tested in `ctl::status`.

use std::collections::HashMap;

use zbus::zvariant::{OwnedValue, Value};

use super::Listener;
use crate::supervisor::status::{Phase, Snapshot};

/// The live properties of a snapshot, in the names and types the interface
/// exports them with.
pub fn live_properties(s: &Snapshot) -> Vec<(&'static str, Value<'static>)> {
    vec![
        ("State", Value::from(s.phase.to_string())),
        ("Status", Value::from(s.status_line())),
        ("Failing", Value::from(s.failing)),
        (
            "Failure",
            Value::from(s.failure.clone().unwrap_or_default()),
        ),
        ("Generation", Value::from(s.generation)),
        ("Min", Value::from(s.min)),
        ("Max", Value::from(s.max)),
        ("Target", Value::from(s.target)),
        ("Ready", Value::from(s.ready)),
        ("Starting", Value::from(s.starting)),
        ("Stopping", Value::from(s.stopping)),
        ("Busy", Value::from(super::opt_i32(s.busy))),
        ("Idle", Value::from(super::opt_i32(s.idle))),
        ("QueueDepth", Value::from(super::opt_i32(s.queued))),
        (
            "Listeners",
            Value::from(s.listeners.iter().map(Listener::from).collect::<Vec<_>>()),
        ),
        (
            "LastScale",
            Value::from(s.last_scale.clone().unwrap_or_default()),
        ),
        ("Spawned", Value::from(s.spawned)),
        ("Exited", Value::from(s.exited)),
        ("FailedStarts", Value::from(s.failed_starts)),
        ("Reloads", Value::from(s.reloads)),
        ("Upgrades", Value::from(s.upgrades)),
        ("JournalStalled", Value::from(s.journal_stalled)),
        ("LogDropped", Value::from(s.log_dropped)),
        (
            "Template",
            Value::from(s.template.clone().unwrap_or_default()),
        ),
    ]
}

/// Why droved's properties do not make a status.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PropertyError {
    #[error("no property {0}")]
    Missing(String),
    #[error("{0}: {1}")]
    Malformed(String, String),
    #[error("State: unknown state {0:?}")]
    UnknownState(String),
}

fn get<T>(map: &HashMap<String, OwnedValue>, key: &str) -> Result<T, PropertyError>
where
    T: TryFrom<OwnedValue>,
    T::Error: std::fmt::Display,
{
    let malformed = |e: &dyn std::fmt::Display| PropertyError::Malformed(key.into(), e.to_string());
    let v = map
        .get(key)
        .ok_or_else(|| PropertyError::Missing(key.into()))?;
    let v = v.try_clone().map_err(|e| malformed(&e))?;
    T::try_from(v).map_err(|e| malformed(&e))
}

/// For properties newer than drove 0.1.0: a droved that predates them (an
/// upgrade it refused, the exec window) still gets a status.
fn get_or_default<T>(map: &HashMap<String, OwnedValue>, key: &str) -> Result<T, PropertyError>
where
    T: TryFrom<OwnedValue> + Default,
    T::Error: std::fmt::Display,
{
    match map.contains_key(key) {
        true => get(map, key),
        false => Ok(T::default()),
    }
}

/// A count that may be unknown (-1), or absent from a droved that
/// predates it: `None` both ways.
fn get_count(map: &HashMap<String, OwnedValue>, key: &str) -> Result<Option<u32>, PropertyError> {
    match map.contains_key(key) {
        true => Ok(u32::try_from(get::<i32>(map, key)?).ok()),
        false => Ok(None),
    }
}

fn nonempty(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

/// The reverse of [`live_properties`] plus the constant properties: the
/// daemon's snapshot from a GetAll answer (drovectl's side of the table).
pub fn snapshot_from(map: &HashMap<String, OwnedValue>) -> Result<Snapshot, PropertyError> {
    let state: String = get(map, "State")?;
    let phase: Phase = serde_json::from_value(serde_json::Value::String(state.clone()))
        .map_err(|_| PropertyError::UnknownState(state))?;
    let listeners: Vec<Listener> = get(map, "Listeners")?;
    let queued: i32 = get(map, "QueueDepth")?;
    let snapshot = Snapshot {
        instance: get(map, "Instance")?,
        version: get(map, "Version")?,
        pid: get(map, "Pid")?,
        phase,
        failing: get(map, "Failing")?,
        failure: nonempty(get(map, "Failure")?),
        generation: get(map, "Generation")?,
        min: get(map, "Min")?,
        max: get(map, "Max")?,
        target: get(map, "Target")?,
        ready: get(map, "Ready")?,
        starting: get(map, "Starting")?,
        stopping: get(map, "Stopping")?,
        busy: get_count(map, "Busy")?,
        idle: get_count(map, "Idle")?,
        listeners: listeners.into_iter().map(Into::into).collect(),
        queued: u32::try_from(queued).ok(),
        demand: None,
        last_scale: nonempty(get(map, "LastScale")?),
        spawned: get(map, "Spawned")?,
        exited: get(map, "Exited")?,
        failed_starts: get(map, "FailedStarts")?,
        reloads: get(map, "Reloads")?,
        upgrades: get(map, "Upgrades")?,
        uptime_secs: get(map, "Uptime")?,
        journal_stalled: get_or_default(map, "JournalStalled")?,
        log_dropped: get_or_default(map, "LogDropped")?,
        template: nonempty(get_or_default(map, "Template")?),
    };
    Ok(snapshot)
}

/// control.group as droved started with (None when empty).
pub fn control_group(map: &HashMap<String, OwnedValue>) -> Result<Option<String>, PropertyError> {
    Ok(nonempty(get(map, "ControlGroup")?))
}
