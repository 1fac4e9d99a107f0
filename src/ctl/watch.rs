//! `drovectl watch`: one line per event, from the instance's signals (no
//! polling), until Ctrl-C. All signals come through one match rule and one
//! stream, so lines keep the order droved emitted them in. Subscribes
//! first, then prints a header with the current status, so nothing that
//! happens after the header is missed. Follows the name across restarts
//! (and binary upgrades) of droved.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_lite::StreamExt;
use serde_json::json;
use zbus::MatchRule;
use zbus::message::{Message, Type};
use zbus::names::{BusName, OwnedUniqueName, WellKnownName};
use zbus::zvariant::OwnedValue;

use super::{CtlError, Target, human_duration};
use crate::bus::{INTERFACE, OBJECT_PATH};

pub async fn run(target: &Target, json: bool) -> Result<(), CtlError> {
    let sub = |e| target.zbus_error(e);
    let proxy = target.proxy().await?;
    let dbus = zbus::fdo::DBusProxy::new(&target.conn).await.map_err(sub)?;
    // One stream of everything the connection receives, opened before the
    // match rules are added: drove's signals and the changes of our name's
    // owner then arrive in the order the bus sent them.
    let mut incoming = zbus::MessageStream::from(&target.conn);
    let rules = [
        // Every drove instance uses this path: signals are kept only from
        // the current owner of our name (below).
        MatchRule::builder()
            .msg_type(Type::Signal)
            .path(OBJECT_PATH)
            .map_err(sub)?
            .build(),
        MatchRule::builder()
            .msg_type(Type::Signal)
            .sender("org.freedesktop.DBus")
            .and_then(|b| b.interface("org.freedesktop.DBus"))
            .and_then(|b| b.member("NameOwnerChanged"))
            .and_then(|b| b.arg(0, target.name.as_str()))
            .map_err(sub)?
            .build(),
    ];
    for rule in rules {
        dbus.add_match_rule(rule).await.map_err(|e| sub(e.into()))?;
    }
    let name = WellKnownName::try_from(target.name.as_str()).map_err(|e| sub(e.into()))?;
    let mut owner: Option<OwnedUniqueName> = Some(
        dbus.get_name_owner(BusName::from(name))
            .await
            .map_err(|e| sub(e.into()))?,
    );

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
        let msg = tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            msg = incoming.next() => match msg {
                Some(Ok(msg)) => msg,
                Some(Err(_)) => continue,
                None => return Err(CtlError::Failed(format!("the {} bus closed the connection", target.bus))),
            },
        };
        if msg.message_type() != Type::Signal {
            continue;
        }
        if let Some(change) = owner_change(&msg, &target.name) {
            match change {
                Some(unique) => {
                    emit(
                        json,
                        json!({"event": "instance-started", "owner": unique.to_string()}),
                        format!("instance {:?} started ({unique})", target.instance),
                    )?;
                    owner = Some(unique);
                    // A new process announces no change from its first state.
                    if let Ok(status) = proxy.status().await
                        && status != last_status
                    {
                        emit(
                            json,
                            json!({"event": "status", "status": status}),
                            format!("status: {status}"),
                        )?;
                        last_status = status;
                    }
                }
                None => {
                    owner = None;
                    emit(
                        json,
                        json!({"event": "instance-stopped"}),
                        format!(
                            "instance {:?} stopped; waiting for it to come back",
                            target.instance
                        ),
                    )?;
                }
            }
            continue;
        }
        let from_owner = {
            let header = msg.header();
            owner
                .as_ref()
                .is_some_and(|o| header.sender() == Some(&**o))
        };
        if !from_owner {
            continue;
        }
        if let Some(status) = status_change(&msg) {
            if status != last_status {
                emit(
                    json,
                    json!({"event": "status", "status": status}),
                    format!("status: {status}"),
                )?;
                last_status = status;
            }
        } else if let Some((value, text)) = event(&msg) {
            emit(json, value, text)?;
        }
    }
}

/// NameOwnerChanged for `name`: `Some(new owner)`, `Some(None)` when it
/// was released.
fn owner_change(msg: &Message, name: &str) -> Option<Option<OwnedUniqueName>> {
    let header = msg.header();
    if header.sender()?.as_str() != "org.freedesktop.DBus"
        || header.member()?.as_str() != "NameOwnerChanged"
    {
        return None;
    }
    let (changed, _old, new): (String, String, String) = msg.body().deserialize().ok()?;
    if changed != name {
        return None;
    }
    Some(OwnedUniqueName::try_from(new).ok())
}

/// The new Status from a PropertiesChanged, if it carries one.
fn status_change(msg: &Message) -> Option<String> {
    let header = msg.header();
    if header.interface()?.as_str() != "org.freedesktop.DBus.Properties"
        || header.member()?.as_str() != "PropertiesChanged"
    {
        return None;
    }
    let (iface, changed, _): (String, HashMap<String, OwnedValue>, Vec<String>) =
        msg.body().deserialize().ok()?;
    if iface != INTERFACE {
        return None;
    }
    String::try_from(changed.get("Status")?.try_clone().ok()?).ok()
}

/// One of drove's own signals as a JSON value and a line of text.
fn event(msg: &Message) -> Option<(serde_json::Value, String)> {
    let header = msg.header();
    if header.interface()?.as_str() != INTERFACE {
        return None;
    }
    let body = msg.body();
    Some(match header.member()?.as_str() {
        "WorkerStarted" => {
            let (pid, slot, generation): (u32, u32, u64) = body.deserialize().ok()?;
            (
                json!({"event": "worker-started", "pid": pid, "slot": slot, "generation": generation}),
                format!("worker-started pid={pid} slot={slot} generation={generation}"),
            )
        }
        "WorkerExited" => {
            let (pid, slot, status, uptime): (u32, u32, String, f64) = body.deserialize().ok()?;
            (
                json!({"event": "worker-exited", "pid": pid, "slot": slot, "status": status, "uptime_secs": uptime}),
                format!(
                    "worker-exited pid={pid} slot={slot} status={status:?} after {}",
                    human_duration(uptime)
                ),
            )
        }
        "Scaled" => {
            let (old, new, reason): (u32, u32, String) = body.deserialize().ok()?;
            (
                json!({"event": "scaled", "from": old, "to": new, "reason": reason}),
                format!("scaled {old} -> {new}: {reason}"),
            )
        }
        "Reloaded" => {
            let generation: u64 = body.deserialize().ok()?;
            (
                json!({"event": "reloaded", "generation": generation}),
                format!("reloaded generation={generation}"),
            )
        }
        "Upgraded" => {
            let version: String = body.deserialize().ok()?;
            (
                json!({"event": "upgraded", "version": version}),
                format!("upgraded version={version}"),
            )
        }
        "RolledBack" => {
            let (generation, reason): (u64, String) = body.deserialize().ok()?;
            (
                json!({"event": "rolled-back", "generation": generation, "reason": reason}),
                format!("rolled-back generation={generation}: {reason}"),
            )
        }
        _ => return None,
    })
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
    // A closed pipe (watch | head) ends drovectl by SIGPIPE, quietly (see
    // main); another write error (a full disk) ends the watch with it.
    writeln!(out, "{line}")
        .and_then(|_| out.flush())
        .map_err(|e| CtlError::Failed(format!("cannot write the watch: {e}")))
}
