//! `drovectl restart-workers`: RestartWorkers(); waits until every worker has been replaced.

use super::{CtlError, Target, print_json};

pub async fn run(target: &Target, json: bool) -> Result<(), CtlError> {
    let proxy = target.proxy().await?;
    proxy.restart_workers().await.map_err(|e| target.error(e))?;
    if json {
        print_json(&serde_json::json!({ "ok": true }))
    } else {
        println!("{}: all workers restarted", target.instance);
        Ok(())
    }
}
