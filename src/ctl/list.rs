//! `drovectl list`: ListWorkers() as a table, or JSON, with each process's
//! PSS and USS from ListMemory() where droved could read them, and each
//! ready worker's activity from ListActivity().

use std::collections::HashMap;

use serde::Serialize;

use super::{CtlError, Target, human_bytes, human_duration, print_json};
use crate::bus::BusError;
use crate::supervisor::control::{ProcessMemory, WorkerActivity};
use crate::supervisor::template::NO_SLOT;

/// One line of `list --json`: the ListWorkers record, its slot `null` for
/// a template (the wire form says NO_SLOT), and the memory (`null` where
/// unknown: not readable, or a droved without ListMemory), and whether it
/// is busy and for how long (`null` where unknown: not ready, not read
/// yet, or a droved without ListActivity).
#[derive(Serialize)]
struct Listed<'a> {
    pid: u32,
    slot: Option<u32>,
    state: &'a str,
    generation: u64,
    age_secs: f64,
    rss_bytes: u64,
    cpu_secs: f64,
    status: &'a str,
    busy: Option<bool>,
    busy_secs: Option<f64>,
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
    let activity: HashMap<u32, WorkerActivity> = match proxy.list_activity().await {
        Ok(list) => list.into_iter().map(|a| (a.pid, a)).collect(),
        // A droved from before ListActivity: the list without it.
        Err(e) if is_unknown_method(&e) => HashMap::new(),
        Err(e) => return Err(target.error(e)),
    };
    let listed: Vec<Listed> = workers
        .iter()
        .map(|w| {
            let m = memory.get(&w.pid);
            let a = activity.get(&w.pid);
            Listed {
                pid: w.pid,
                slot: (w.slot != NO_SLOT).then_some(w.slot),
                state: &w.state,
                generation: w.generation,
                age_secs: w.age_secs,
                rss_bytes: w.rss_bytes,
                cpu_secs: w.cpu_secs,
                status: &w.status,
                busy: a.map(|a| a.busy),
                busy_secs: a.filter(|a| a.busy).map(|a| a.busy_secs),
                pss_bytes: m.map(|m| m.pss_bytes),
                uss_bytes: m.map(|m| m.uss_bytes),
                swap_bytes: m.map(|m| m.swap_bytes),
            }
        })
        .collect();
    if json {
        return print_json(&listed);
    }
    print!("{}", table(&listed));
    Ok(())
}

fn is_unknown_method(e: &BusError) -> bool {
    matches!(e, BusError::ZBus(zbus::Error::MethodError(name, _, _))
        if name.as_str() == "org.freedesktop.DBus.Error.UnknownMethod")
}

/// The table `drovectl list` prints, one row per process.
fn table(listed: &[Listed]) -> String {
    use std::fmt::Write;
    // The widest state ("template-starting") sets the column.
    let state_width = listed
        .iter()
        .map(|l| l.state.len())
        .max()
        .unwrap_or(0)
        .max(5);
    let mut out = format!(
        "{:>8} {:>4} {:<state_width$} {:>4} {:>11} {:>10} {:>7} {:>7} {:>7} {:>8}  STATUS\n",
        "PID", "SLOT", "STATE", "GEN", "AGE", "BUSY", "RSS", "PSS", "USS", "CPU"
    );
    let bytes = |b: Option<u64>| b.map_or("-".to_string(), human_bytes);
    for l in listed {
        // A template (worker.mode = "template") has no slot.
        let slot = l.slot.map_or("-".to_string(), |s| s.to_string());
        // Busy for how long, idle, or unknown.
        let busy = match (l.busy, l.busy_secs) {
            (Some(true), secs) => human_duration(secs.unwrap_or(0.0)),
            (Some(false), _) => "idle".to_string(),
            (None, _) => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "{:>8} {:>4} {:<state_width$} {:>4} {:>11} {:>10} {:>7} {:>7} {:>7} {:>7.2}s  {}",
            l.pid,
            slot,
            l.state,
            l.generation,
            human_duration(l.age_secs),
            busy,
            human_bytes(l.rss_bytes),
            bytes(l.pss_bytes),
            bytes(l.uss_bytes),
            l.cpu_secs,
            l.status
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pid: u32, slot: Option<u32>, state: &'static str) -> Listed<'static> {
        Listed {
            pid,
            slot,
            state,
            generation: 3,
            age_secs: 5.0,
            rss_bytes: 1 << 20,
            cpu_secs: 0.5,
            status: "",
            busy: None,
            busy_secs: None,
            pss_bytes: None,
            uss_bytes: None,
            swap_bytes: None,
        }
    }

    #[test]
    fn a_starting_template_keeps_the_columns_aligned() {
        let t = table(&[
            row(10, Some(0), "ready"),
            row(11, None, "template-starting"),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        // GEN's column starts at the same place in every line.
        let gen_at = lines[0].find("GEN").unwrap() + 3;
        for l in &lines[1..] {
            assert_eq!(&l[gen_at - 1..gen_at], "3", "{t}");
        }
        assert!(lines[2].contains("   - template-starting"), "{t}");
    }

    #[test]
    fn the_busy_column_says_for_how_long_idle_or_unknown() {
        let mut busy = row(10, Some(0), "ready");
        busy.busy = Some(true);
        busy.busy_secs = Some(75.0);
        let mut idle = row(11, Some(1), "ready");
        idle.busy = Some(false);
        let t = table(&[busy, idle, row(12, None, "template")]);
        let lines: Vec<&str> = t.lines().collect();
        let at = lines[0].find("BUSY").unwrap() + 4;
        assert!(lines[1][..at].ends_with("1 min 15 s"), "{t}");
        assert!(lines[2][..at].ends_with(" idle"), "{t}");
        assert!(lines[3][..at].ends_with(" -"), "{t}");
    }

    #[test]
    fn a_template_has_no_slot_in_json() {
        let v = serde_json::to_value(row(11, None, "template")).unwrap();
        assert!(v["slot"].is_null(), "{v}");
        let v = serde_json::to_value(row(10, Some(2), "ready")).unwrap();
        assert_eq!(v["slot"], 2, "{v}");
    }
}
