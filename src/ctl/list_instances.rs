//! `drovectl list-instances`: the drove instances reachable: their names on
//! the bus, unescaped, and (unless --bus names a bus) the droveds on
//! private sockets that are not on the bus.

use super::route::Via;
use super::{CtlError, Reach, print_json};

pub async fn run(reach: &Reach, json: bool) -> Result<(), CtlError> {
    let found = reach.all().await?;
    if json {
        let list: Vec<_> = found
            .iter()
            .map(|(i, via, at)| match via {
                Via::Private(_) => serde_json::json!({ "instance": i, "socket": at }),
                _ => serde_json::json!({ "instance": i, "bus_name": at }),
            })
            .collect();
        return print_json(&list);
    }
    if found.is_empty() {
        println!("no drove instances on {}", reach.places());
        return Ok(());
    }
    let width = found
        .iter()
        .map(|(i, _, _)| i.len())
        .max()
        .unwrap_or(0)
        .max(8);
    println!("{:width$}  BUS NAME OR PRIVATE SOCKET", "INSTANCE");
    for (instance, _, at) in &found {
        println!("{instance:width$}  {at}");
    }
    Ok(())
}
