//! `drovectl reload`: Reload(); waits until a resulting rolling restart has finished.

use super::{CtlError, Target, print_json};

pub async fn run(target: &Target, json: bool) -> Result<(), CtlError> {
    let proxy = target.proxy().await?;
    proxy.reload().await.map_err(|e| target.error(e))?;
    if json {
        print_json(&serde_json::json!({ "ok": true }))
    } else {
        println!("{}: configuration reloaded", target.instance);
        Ok(())
    }
}
