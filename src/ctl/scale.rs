//! `drovectl scale N`: Scale(N).

use super::{CtlError, Target, print_json};

pub async fn run(target: &Target, n: u32, json: bool) -> Result<(), CtlError> {
    let proxy = target.proxy().await?;
    let now = proxy.scale(n).await.map_err(|e| target.error(e))?;
    if json {
        print_json(&serde_json::json!({ "target": now }))
    } else {
        println!("{}: target {now} workers", target.instance);
        Ok(())
    }
}
