//! `drovectl list-instances`: the drove names on the bus, unescaped.

use zbus::Connection;

use super::{CtlError, print_json};
use crate::bus::BusKind;

pub async fn run(conn: &Connection, bus: BusKind, json: bool) -> Result<(), CtlError> {
    let found = super::instances(conn, bus).await?;
    if json {
        let list: Vec<_> = found
            .iter()
            .map(|(i, n)| serde_json::json!({ "instance": i, "bus_name": n }))
            .collect();
        return print_json(&list);
    }
    if found.is_empty() {
        println!("no drove instances on the {bus} bus");
        return Ok(());
    }
    let width = found.iter().map(|(i, _)| i.len()).max().unwrap_or(0).max(8);
    println!("{:width$}  BUS NAME", "INSTANCE");
    for (instance, name) in &found {
        println!("{instance:width$}  {name}");
    }
    Ok(())
}
