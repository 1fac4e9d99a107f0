//! `drovectl list`: ListWorkers() as a table, or JSON, with each process's
//! PSS and USS from ListMemory() where droved could read them.

use std::collections::HashMap;

use serde::Serialize;

use super::{CtlError, Target, human_bytes, human_duration, print_json};
use crate::bus::BusError;
use crate::supervisor::control::{ProcessMemory, WorkerInfo};

/// One line of `list --json`: the ListWorkers record and the memory
/// (`null` where unknown: not readable, or a droved without ListMemory).
#[derive(Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    worker: &'a WorkerInfo,
    pss_bytes: Option<u64>,
    uss_bytes: Option<u64>,
    swap_bytes: Option<u64>,
}

pub async fn run(target: &Target, json: bool) -> Result<(), CtlError> {
    let proxy = target.proxy().await?;
    let workers = proxy.list_workers().await.map_err(|e| target.error(e))?;
    let memory: HashMap<u32, ProcessMemory> = match proxy.list_memory().await {
        Ok(list) => list.into_iter().map(|m| (m.pid, m)).collect(),
        // A droved from before ListMemory: the list without memory.
        Err(e) if is_unknown_method(&e) => HashMap::new(),
        Err(e) => return Err(target.error(e)),
    };
    let listed: Vec<Listed> = workers
        .iter()
        .map(|w| {
            let m = memory.get(&w.pid);
            Listed {
                worker: w,
                pss_bytes: m.map(|m| m.pss_bytes),
                uss_bytes: m.map(|m| m.uss_bytes),
                swap_bytes: m.map(|m| m.swap_bytes),
            }
        })
        .collect();
    if json {
        return print_json(&listed);
    }
    println!(
        "{:>8} {:>4} {:<9} {:>4} {:>11} {:>7} {:>7} {:>7} {:>8}  STATUS",
        "PID", "SLOT", "STATE", "GEN", "AGE", "RSS", "PSS", "USS", "CPU"
    );
    let bytes = |b: Option<u64>| b.map_or("-".to_string(), human_bytes);
    for l in &listed {
        let w = l.worker;
        // A template (worker.mode = "template") has no slot.
        let slot = if w.slot == crate::supervisor::template::NO_SLOT {
            "-".to_string()
        } else {
            w.slot.to_string()
        };
        println!(
            "{:>8} {:>4} {:<9} {:>4} {:>11} {:>7} {:>7} {:>7} {:>7.2}s  {}",
            w.pid,
            slot,
            w.state,
            w.generation,
            human_duration(w.age_secs),
            human_bytes(w.rss_bytes),
            bytes(l.pss_bytes),
            bytes(l.uss_bytes),
            w.cpu_secs,
            w.status
        );
    }
    Ok(())
}

fn is_unknown_method(e: &BusError) -> bool {
    matches!(e, BusError::ZBus(zbus::Error::MethodError(name, _, _))
        if name.as_str() == "org.freedesktop.DBus.Error.UnknownMethod")
}
