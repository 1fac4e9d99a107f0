//! `drovectl upgrade`: Upgrade(); droved replaces its binary in place.

use super::{CtlError, Target, print_json};

pub async fn run(target: &Target, json: bool) -> Result<(), CtlError> {
    let proxy = target.proxy().await?;
    proxy.upgrade().await.map_err(|e| target.error(e))?;
    if json {
        print_json(&serde_json::json!({ "ok": true }))
    } else {
        println!("{}: upgraded", target.instance);
        Ok(())
    }
}
