//! `drovectl rollout status|pause|resume|abort`: Rollout(action).

use super::{CtlError, Target, print_json};

pub async fn run(target: &Target, action: &str, json: bool) -> Result<(), CtlError> {
    let proxy = target.proxy().await?;
    let line = proxy.rollout(action).await.map_err(|e| target.error(e))?;
    if json {
        print_json(&serde_json::json!({ "action": action, "rollout": line }))
    } else {
        println!("{}: {line}", target.instance);
        Ok(())
    }
}
