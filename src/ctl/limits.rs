//! `drovectl limits MIN MAX`: SetLimits(MIN, MAX).

use super::{CtlError, Target, print_json};

pub async fn run(target: &Target, min: u32, max: u32, json: bool) -> Result<(), CtlError> {
    let proxy = target.proxy().await?;
    let (min, max) = proxy
        .set_limits(min, max)
        .await
        .map_err(|e| target.error(e))?;
    if json {
        print_json(&serde_json::json!({ "min": min, "max": max }))
    } else {
        println!("{}: limits {min}..{max}", target.instance);
        Ok(())
    }
}
