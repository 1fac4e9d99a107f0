//! `drovectl list`: ListWorkers() as a table, or JSON.

use super::{CtlError, Target, human_bytes, human_duration, print_json};

pub async fn run(target: &Target, json: bool) -> Result<(), CtlError> {
    let proxy = target.proxy().await?;
    let workers = proxy.list_workers().await.map_err(|e| target.error(e))?;
    if json {
        return print_json(&workers);
    }
    println!(
        "{:>8} {:>4} {:<9} {:>4} {:>11} {:>7} {:>8}  STATUS",
        "PID", "SLOT", "STATE", "GEN", "AGE", "RSS", "CPU"
    );
    for w in &workers {
        // A template (worker.mode = "template") has no slot.
        let slot = if w.slot == crate::supervisor::template::NO_SLOT {
            "-".to_string()
        } else {
            w.slot.to_string()
        };
        println!(
            "{:>8} {:>4} {:<9} {:>4} {:>11} {:>7} {:>7.2}s  {}",
            w.pid,
            slot,
            w.state,
            w.generation,
            human_duration(w.age_secs),
            human_bytes(w.rss_bytes),
            w.cpu_secs,
            w.status
        );
    }
    Ok(())
}
