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
    "listen", "worker", "pool", "scale", "control", "rollout", "metrics", "stop",
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
    "timeout_signal",
    "watchdog",
    "request_timeout",
    "restart_delay",
    "restart_delay_max",
    "min_uptime",
    "max_lifetime",
    "max_lifetime_jitter",
    "max_rss",
    "allow_root",
    "inherit_environment",
];
const POOL_KEYS: &[&str] = &["min", "max", "initial", "spawn_rate", "idle_exit", "spare"];
const SCALE_KEYS: &[&str] = &["interval", "cooldown", "window", "cpu_guard"];
const CONTROL_KEYS: &[&str] = &["group"];
const METRICS_KEYS: &[&str] = &["listen"];
const ROLLOUT_KEYS: &[&str] = &["canary", "observe", "max_failures"];
const STOP_KEYS: &[&str] = &["delay"];

/// Every key the parser accepts, by table (`"listen.addresses"`: the keys
/// of an address entry table). The documentation is checked against it
/// (tests/suite/docs.rs); the unit tests below check it against the
/// `Raw*` structs serde parses with.
pub const KEYS: &[(&str, &[&str])] = &[
    ("listen", LISTEN_KEYS),
    ("listen.addresses", ADDRESS_KEYS),
    ("worker", WORKER_KEYS),
    ("pool", POOL_KEYS),
    ("scale", SCALE_KEYS),
    ("control", CONTROL_KEYS),
    ("rollout", ROLLOUT_KEYS),
    ("metrics", METRICS_KEYS),
    ("stop", STOP_KEYS),
];

pub(super) const SECTIONS: &[(&str, &[&str])] = &[
    ("the top level", TOP_KEYS),
    ("[listen]", LISTEN_KEYS),
    ("[worker]", WORKER_KEYS),
    ("[pool]", POOL_KEYS),
    ("[scale]", SCALE_KEYS),
    ("[control]", CONTROL_KEYS),
    ("[rollout]", ROLLOUT_KEYS),
    ("[metrics]", METRICS_KEYS),
    ("[stop]", STOP_KEYS),
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
    pub(super) stop: RawStop,
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
    pub(super) timeout_signal: Field,
    pub(super) watchdog: Field,
    pub(super) request_timeout: Field,
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
    pub(super) spare: Field,
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

/// `[stop]`: how a graceful stop begins.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStop {
    pub(super) delay: Field,
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

    /// The field names serde's derive gives `T` (what it accepts under
    /// `deny_unknown_fields`): a deserializer that only records the
    /// `fields` of the `deserialize_struct` call and stops there.
    fn fields_of<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
        use serde::de::{self, Visitor};

        struct Probe<'a>(&'a mut Vec<&'static str>);
        impl<'de> de::Deserializer<'de> for Probe<'_> {
            type Error = de::value::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _name: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                self.0.extend_from_slice(fields);
                Err(de::Error::custom("fields recorded"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
                bytes byte_buf option unit unit_struct newtype_struct seq tuple
                tuple_struct map enum identifier ignored_any
            }
        }
        let mut fields = Vec::new();
        let _ = T::deserialize(Probe(&mut fields));
        assert!(
            !fields.is_empty(),
            "{} is not a struct",
            std::any::type_name::<T>()
        );
        fields
    }

    fn keys_of(table: &str) -> Vec<&'static str> {
        KEYS.iter()
            .find(|(t, _)| *t == table)
            .unwrap_or_else(|| panic!("KEYS has no {table}"))
            .1
            .to_vec()
    }

    #[test]
    fn keys_are_the_fields_serde_accepts() {
        // KEYS drives the documentation checks, so it must be exactly what
        // the parser takes: a field added to a Raw* struct fails here
        // until it is listed (and then documented).
        assert_eq!(fields_of::<RawConfig>(), TOP_KEYS);
        assert_eq!(fields_of::<RawListen>(), keys_of("listen"));
        assert_eq!(fields_of::<RawWorker>(), keys_of("worker"));
        assert_eq!(fields_of::<RawPool>(), keys_of("pool"));
        assert_eq!(fields_of::<RawScale>(), keys_of("scale"));
        assert_eq!(fields_of::<RawControl>(), keys_of("control"));
        assert_eq!(fields_of::<RawRollout>(), keys_of("rollout"));
        assert_eq!(fields_of::<RawMetrics>(), keys_of("metrics"));
        assert_eq!(fields_of::<RawStop>(), keys_of("stop"));
        let mut tables: Vec<&str> = KEYS
            .iter()
            .map(|(t, _)| *t)
            .filter(|t| !t.contains('.'))
            .collect();
        tables.sort_unstable();
        let mut top = TOP_KEYS.to_vec();
        top.sort_unstable();
        assert_eq!(tables, top, "KEYS lists every table once");
    }

    #[test]
    fn address_entries_take_exactly_their_keys() {
        // Entries of listen.addresses are checked against ADDRESS_KEYS by
        // validate.rs itself; this pins that both directions hold.
        let ok = Config::from_toml_str(
            "[listen]\naddresses = [{ address = \"127.0.0.1:1\", name = \"a\" }]",
            Path::new(ORIGIN),
        );
        assert!(ok.is_ok(), "{ok:?}");
        let e = Config::from_toml_str(
            "[listen]\naddresses = [{ address = \"127.0.0.1:1\", port = 1 }]",
            Path::new(ORIGIN),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown key"), "{e}");
    }

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
