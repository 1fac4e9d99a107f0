//! `drovectl watch`: one line per event, from the instance's signals (no
//! polling), until Ctrl-C. Subscribes first, then prints a header with the
//! current status, so nothing that happens after the header is missed.
//! Follows the name across restarts of droved.

use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::json;

use super::{CtlError, Target, human_duration};

pub async fn run(target: &Target, json: bool) -> Result<(), CtlError> {
    let proxy = target.proxy().await?;
    let props = target.properties().await?;
    let sub = |e| target.zbus_error(e);
    let mut started = proxy.receive_worker_started().await.map_err(sub)?;
    let mut exited = proxy.receive_worker_exited().await.map_err(sub)?;
    let mut scaled = proxy.receive_scaled().await.map_err(sub)?;
    let mut reloaded = proxy.receive_reloaded().await.map_err(sub)?;
    let mut upgraded = proxy.receive_upgraded().await.map_err(sub)?;
    let mut changed = props.receive_properties_changed().await.map_err(sub)?;
    let mut owner = proxy.inner().receive_owner_changed().await.map_err(sub)?;

    let status = proxy.status().await.map_err(sub)?;
    let pid = proxy.pid().await.map_err(sub)?;
    emit(
        json,
        json!({"event": "watching", "instance": target.instance, "bus_name": target.name, "pid": pid, "status": status}),
        format!(
            "watching {:?} ({}, pid {pid}): {status}; Ctrl-C to stop",
            target.instance, target.name
        ),
    )?;
    let mut last_status = status;

    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            Some(s) = started.next() => {
                let Ok(a) = s.args() else { continue };
                emit(json,
                    json!({"event": "worker-started", "pid": a.pid, "slot": a.slot, "generation": a.generation}),
                    format!("worker-started pid={} slot={} generation={}", a.pid, a.slot, a.generation))?;
            }
            Some(s) = exited.next() => {
                let Ok(a) = s.args() else { continue };
                emit(json,
                    json!({"event": "worker-exited", "pid": a.pid, "slot": a.slot, "status": a.status, "uptime_secs": a.uptime}),
                    format!("worker-exited pid={} slot={} status={:?} after {}", a.pid, a.slot, a.status, human_duration(a.uptime)))?;
            }
            Some(s) = scaled.next() => {
                let Ok(a) = s.args() else { continue };
                emit(json,
                    json!({"event": "scaled", "from": a.old, "to": a.new, "reason": a.reason}),
                    format!("scaled {} -> {}: {}", a.old, a.new, a.reason))?;
            }
            Some(s) = reloaded.next() => {
                let Ok(a) = s.args() else { continue };
                emit(json,
                    json!({"event": "reloaded", "generation": a.generation}),
                    format!("reloaded generation={}", a.generation))?;
            }
            Some(s) = upgraded.next() => {
                let Ok(a) = s.args() else { continue };
                emit(json,
                    json!({"event": "upgraded", "version": a.version}),
                    format!("upgraded version={}", a.version))?;
            }
            Some(s) = changed.next() => {
                let Ok(a) = s.args() else { continue };
                let Some(v) = a.changed_properties().get("Status") else { continue };
                let Ok(status) = v.try_clone().map_err(zbus::Error::from).and_then(|v| String::try_from(v).map_err(zbus::Error::from)) else { continue };
                if status != last_status {
                    emit(json, json!({"event": "status", "status": status}), format!("status: {status}"))?;
                    last_status = status;
                }
            }
            Some(o) = owner.next() => match o {
                Some(unique) => {
                    emit(json,
                        json!({"event": "instance-started", "owner": unique.to_string()}),
                        format!("instance {:?} started ({unique})", target.instance))?;
                    // A new process announces no change from its first state.
                    if let Ok(status) = proxy.status().await
                        && status != last_status
                    {
                        emit(json, json!({"event": "status", "status": status}), format!("status: {status}"))?;
                        last_status = status;
                    }
                }
                None => emit(json,
                    json!({"event": "instance-stopped"}),
                    format!("instance {:?} stopped; waiting for it to come back", target.instance))?,
            },
        }
    }
}

/// Prints one event line, stamped with the UTC time of day.
fn emit(json: bool, mut value: serde_json::Value, text: String) -> Result<(), CtlError> {
    use std::io::Write;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let line = if json {
        value["time"] = json!(now.as_secs_f64());
        value.to_string()
    } else {
        let s = now.as_secs() % 86400;
        format!(
            "{:02}:{:02}:{:02}.{:03}Z {text}",
            s / 3600,
            s / 60 % 60,
            s % 60,
            now.subsec_millis()
        )
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (watch | head) ends the watch quietly.
    writeln!(out, "{line}")
        .and_then(|_| out.flush())
        .map_err(|_| CtlError::Failed(String::new()))
}
