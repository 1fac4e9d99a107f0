// SPDX-License-Identifier: MIT OR Apache-2.0
//! Phase one of parsing: the raw document as serde and the `toml` crate see
//! it. Every table rejects unknown keys, and every scalar keeps its
//! [`Spanned`] position for the messages of phase two ([`super::validate`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use toml::{Spanned, Value};

pub(super) type Field = Option<Spanned<Value>>;

const TOP_KEYS: &[&str] = &[
    "listen", "worker", "pool", "scale", "control", "rollout", "metrics",
];
const LISTEN_KEYS: &[&str] = &[
    "addresses",
    "backlog",
    "socket_mode",
    "socket_user",
    "socket_group",
];
pub(super) const ADDRESS_KEYS: &[&str] = &["address", "name"];
const WORKER_KEYS: &[&str] = &[
    "command",
    "working_directory",
    "environment",
    "user",
    "group",
    "mode",
    "socket",
    "ready",
    "ready_timeout",
    "stop_signal",
    "stop_timeout",
    "watchdog",
    "restart_delay",
    "restart_delay_max",
    "min_uptime",
    "max_lifetime",
    "max_lifetime_jitter",
    "max_rss",
    "allow_root",
    "inherit_environment",
];
const POOL_KEYS: &[&str] = &["min", "max", "initial", "spawn_rate", "idle_exit"];
const SCALE_KEYS: &[&str] = &["interval", "cooldown", "window", "cpu_guard"];
const CONTROL_KEYS: &[&str] = &["group"];
const METRICS_KEYS: &[&str] = &["listen"];
const ROLLOUT_KEYS: &[&str] = &["canary", "observe", "max_failures"];

pub(super) const SECTIONS: &[(&str, &[&str])] = &[
    ("the top level", TOP_KEYS),
    ("[listen]", LISTEN_KEYS),
    ("[worker]", WORKER_KEYS),
    ("[pool]", POOL_KEYS),
    ("[scale]", SCALE_KEYS),
    ("[control]", CONTROL_KEYS),
    ("[rollout]", ROLLOUT_KEYS),
    ("[metrics]", METRICS_KEYS),
];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) listen: RawListen,
    pub(super) worker: RawWorker,
    pub(super) pool: RawPool,
    pub(super) scale: RawScale,
    pub(super) control: RawControl,
    pub(super) rollout: Option<RawRollout>,
    pub(super) metrics: RawMetrics,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawListen {
    pub(super) addresses: Option<Spanned<OneOrMany>>,
    pub(super) backlog: Field,
    pub(super) socket_mode: Field,
    pub(super) socket_user: Field,
    pub(super) socket_group: Field,
}

/// `addresses = "…"` or `addresses = ["…", { address = "…", name = "…" }]`.
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<Spanned<Value>>),
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("listen.addresses as an address string or an array of addresses")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(OneOrMany::Many(items))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawWorker {
    pub(super) command: Field,
    pub(super) working_directory: Field,
    pub(super) environment: Option<EnvTable>,
    pub(super) user: Field,
    pub(super) group: Field,
    pub(super) mode: Field,
    pub(super) socket: Field,
    pub(super) ready: Field,
    pub(super) ready_timeout: Field,
    pub(super) stop_signal: Field,
    pub(super) stop_timeout: Field,
    pub(super) watchdog: Field,
    pub(super) restart_delay: Field,
    pub(super) restart_delay_max: Field,
    pub(super) min_uptime: Field,
    pub(super) max_lifetime: Field,
    pub(super) max_lifetime_jitter: Field,
    pub(super) max_rss: Field,
    pub(super) allow_root: Field,
    pub(super) inherit_environment: Field,
}

/// `worker.environment`, with a span per value.
pub(super) struct EnvTable(pub(super) BTreeMap<String, Spanned<Value>>);

impl<'de> Deserialize<'de> for EnvTable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = EnvTable;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("worker.environment as a table, e.g. { NAME = \"value\" }")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<EnvTable, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry()? {
                    out.insert(k, v);
                }
                Ok(EnvTable(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPool {
    pub(super) min: Field,
    pub(super) max: Field,
    pub(super) initial: Field,
    pub(super) spawn_rate: Field,
    pub(super) idle_exit: Field,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawScale {
    pub(super) interval: Field,
    pub(super) cooldown: Field,
    pub(super) window: Field,
    pub(super) cpu_guard: Field,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawControl {
    pub(super) group: Field,
}

/// `[metrics]` (see `crate::metrics`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMetrics {
    pub(super) listen: Field,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRollout {
    pub(super) canary: Field,
    pub(super) observe: Field,
    pub(super) max_failures: Field,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::config::testing::ORIGIN;

    #[test]
    fn unknown_key_table_matches_structs() {
        // Every key listed for error messages is accepted by the parser, so
        // the lists cannot drift from the Raw* structs unnoticed.
        for (section, keys) in SECTIONS {
            for key in *keys {
                let doc = match *section {
                    "the top level" => format!("[{key}]"),
                    s => format!("{s}\n{key} = \"\\u0001\""),
                };
                if let Err(e) = Config::from_toml_str(&doc, Path::new(ORIGIN)) {
                    assert!(!e.to_string().contains("unknown key"), "{doc}: {e}");
                }
            }
        }
    }
}
