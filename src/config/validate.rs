// SPDX-License-Identifier: MIT OR Apache-2.0
//! Phase two of parsing: type-check and validate the raw document
//! ([`super::raw`]) into a [`Config`], with the key, file, line and column of
//! the offending value in every error.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Spanned, Value};

use super::raw::*;
use super::types::*;
use super::values::{format_duration, parse_duration, parse_signal, parse_size};
use super::{
    Config, ConfigError, DEFAULT_LISTEN_NAME, MAX_WORKERS, Position, RESERVED_ENVIRONMENT,
};

/// Longest `stop.delay`: a drain is for a load balancer to notice, not a
/// place to park a stopping service.
pub const MAX_STOP_DELAY: Duration = Duration::from_secs(3600);

/// Parse and validate `text`; `origin` names the file in messages.
pub(super) fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    let cx = Cx { text, origin };
    let raw: RawConfig = toml::from_str(text).map_err(|e| cx.toml_error(&e))?;
    cx.build(raw)
}

/// The document being validated, for turning spans into positions.
struct Cx<'a> {
    text: &'a str,
    origin: &'a Path,
}

type Res<T> = Result<T, ConfigError>;

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("string {s:?}"),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(x) => format!("float {x}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(d) => format!("datetime {d}"),
        Value::Array(_) => "an array".to_owned(),
        Value::Table(_) => "a table".to_owned(),
    }
}

/// "unknown key" with the keys allowed there, and the closest one (by edit
/// distance) when it is close enough to be a likely typo.
fn unknown_key_message(key: &str, section: &str, expected: &[&str]) -> String {
    let mut msg = format!(
        "unknown key `{key}` in {section}; expected one of {}",
        expected.join(", ")
    );
    let distance = |k: &&&str| strsim::levenshtein(key, k);
    if let Some(best) = expected
        .iter()
        .filter(|k| distance(k) <= 2.max(key.len() / 4))
        .min_by_key(distance)
    {
        msg.push_str(&format!(" (did you mean `{best}`?)"));
    }
    msg
}

impl Cx<'_> {
    fn position(&self, offset: usize) -> Position {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Position {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    fn error(&self, span: Option<Range<usize>>, key: Option<&str>, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: Some(self.origin.to_owned()),
            position: span.map(|s| self.position(s.start)),
            key: key.map(str::to_owned),
            message,
        }
    }

    fn at<T>(&self, v: &Spanned<T>, key: &str, message: String) -> ConfigError {
        self.error(Some(v.span()), Some(key), message)
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let raw = e.message().trim_end();
        let message = if raw == "duplicate key" {
            let key = e.span().and_then(|s| self.text.get(s)).unwrap_or("");
            format!(
                "duplicate key `{}`; a key may appear only once in a table",
                key.trim()
            )
        } else {
            self.rewrite_unknown_field(raw).unwrap_or_else(|| {
                // Do not leak the private struct names into messages.
                let mut m = raw.to_owned();
                for (name, table) in [
                    ("struct RawListen", "a table [listen]"),
                    ("struct RawWorker", "a table [worker]"),
                    ("struct RawPool", "a table [pool]"),
                    ("struct RawScale", "a table [scale]"),
                    ("struct RawControl", "a table [control]"),
                    ("struct RawMetrics", "a table [metrics]"),
                    ("struct RawStop", "a table [stop]"),
                ] {
                    m = m.replace(name, table);
                }
                m
            })
        };
        self.error(e.span(), None, message)
    }

    /// serde says "unknown field `x`, expected one of `a`, `b`"; name the
    /// section and drop the quotes, as the rest of our messages do.
    fn rewrite_unknown_field(&self, raw: &str) -> Option<String> {
        let rest = raw.strip_prefix("unknown field `")?;
        let (key, rest) = rest.split_once('`')?;
        let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
        let (section, keys) = SECTIONS.iter().find(|(_, keys)| {
            keys.len() == expected.len() && keys.iter().all(|k| expected.contains(k))
        })?;
        Some(unknown_key_message(key, section, keys))
    }

    fn type_error(&self, v: &Spanned<Value>, key: &str, expected: &str) -> ConfigError {
        self.at(
            v,
            key,
            format!("{key} must be {expected}, found {}", describe(v.get_ref())),
        )
    }

    fn string<'v>(&self, v: &'v Spanned<Value>, key: &str, expected: &str) -> Res<&'v str> {
        match v.get_ref() {
            Value::String(s) => Ok(s),
            _ => Err(self.type_error(v, key, expected)),
        }
    }

    /// A name or path: a non-empty string without NUL.
    fn name(&self, v: &Field, key: &str) -> Res<Option<String>> {
        let Some(v) = v else { return Ok(None) };
        let s = self.string(v, key, "a string")?;
        if s.is_empty() {
            return Err(self.at(
                v,
                key,
                format!("{key} must not be empty; remove the key instead"),
            ));
        }
        if s.contains('\0') {
            return Err(self.at(v, key, format!("{key} must not contain a NUL byte")));
        }
        Ok(Some(s.to_owned()))
    }

    fn int(&self, v: &Field, key: &str, min: u32, max: u32) -> Res<Option<u32>> {
        let Some(v) = v else { return Ok(None) };
        let expected = format!("a whole number from {min} to {max}");
        match v.get_ref() {
            Value::Integer(i) => match u32::try_from(*i) {
                Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(self.at(v, key, format!("{key} ({i}) must be {expected}"))),
            },
            _ => Err(self.type_error(v, key, &expected)),
        }
    }

    fn boolean(&self, v: &Field, key: &str) -> Res<Option<bool>> {
        let Some(v) = v else { return Ok(None) };
        match v.get_ref() {
            Value::Boolean(b) => Ok(Some(*b)),
            _ => Err(self.type_error(v, key, "true or false")),
        }
    }

    fn duration(&self, v: &Field, key: &str) -> Res<Option<Duration>> {
        let Some(v) = v else { return Ok(None) };
        match v.get_ref() {
            Value::String(s) => parse_duration(s)
                .map(Some)
                .map_err(|e| self.at(v, key, format!("{key}: {e}"))),
            Value::Integer(0) => Ok(Some(Duration::ZERO)),
            Value::Integer(i) => Err(self.at(
                v,
                key,
                format!("{key} must be a duration string with a unit, e.g. \"{i}s\" or \"{i}ms\", found integer {i}"),
            )),
            _ => Err(self.type_error(v, key, "a duration string such as \"30s\" or \"100ms\"")),
        }
    }

    /// A duration that must be at least `floor` (nonzero when `floor` is 1ns).
    fn duration_min(&self, v: &Field, key: &str, floor: Duration) -> Res<Option<Duration>> {
        let d = self.duration(v, key)?;
        if let (Some(d), Some(v)) = (d, v)
            && d < floor
        {
            let msg = if floor == Duration::from_nanos(1) {
                format!("{key} must be greater than zero")
            } else {
                format!(
                    "{key} ({}) must be at least {}",
                    format_duration(d),
                    format_duration(floor)
                )
            };
            return Err(self.at(v, key, msg));
        }
        Ok(d)
    }

    fn build(&self, raw: RawConfig) -> Res<Config> {
        let mut config = Config::default();
        self.build_listen(&raw.listen, &mut config.listen)?;
        self.build_worker(&raw.worker, &mut config.worker)?;
        self.build_pool(&raw.pool, &mut config.pool)?;
        self.build_scale(&raw.scale, &mut config.scale)?;
        config.control.group = self.name(&raw.control.group, "control.group")?;
        config.metrics.listen = self.metrics_listen(&raw.metrics, &config.listen)?;
        config.stop.delay = self.stop_delay(&raw.stop)?;
        if let Some(r) = &raw.rollout {
            config.rollout = Some(self.build_rollout(r)?);
        }
        self.check_socket(&raw.worker, &config)?;
        Ok(config)
    }

    /// `metrics.listen`: an address like listen.addresses, but never one
    /// of them (metrics are droved's, not the workers').
    fn metrics_listen(&self, raw: &RawMetrics, listen: &ListenConfig) -> Res<Option<ListenAddr>> {
        let key = "metrics.listen";
        let Some(v) = &raw.listen else {
            return Ok(None);
        };
        let s = self.string(v, key, "an address string such as \"127.0.0.1:9464\"")?;
        let address: ListenAddr = s
            .parse()
            .map_err(|e: ListenAddrError| self.at(v, key, format!("{key}: {e}")))?;
        if listen.addresses.iter().any(|a| a.address == address) {
            return Err(self.at(
                v,
                key,
                format!("{key} {address} is also in listen.addresses; metrics need an address of their own"),
            ));
        }
        Ok(Some(address))
    }

    /// `stop.delay`: zero (no drain) up to [`MAX_STOP_DELAY`].
    fn stop_delay(&self, raw: &RawStop) -> Res<Duration> {
        let key = "stop.delay";
        let Some(d) = self.duration(&raw.delay, key)? else {
            return Ok(Duration::ZERO);
        };
        if d > MAX_STOP_DELAY {
            let v = raw.delay.as_ref().expect("a duration was read from it");
            return Err(self.at(
                v,
                key,
                format!(
                    "{key} ({}) must be at most {}: it only needs to outlast the load balancer taking the instance out (a few seconds)",
                    format_duration(d),
                    format_duration(MAX_STOP_DELAY)
                ),
            ));
        }
        Ok(d)
    }

    /// `worker.socket = "stdin"`: one listener, on fd 0 of an exec'd worker.
    fn check_socket(&self, raw: &RawWorker, config: &Config) -> Res<()> {
        let Some(v) = &raw.socket else {
            return Ok(());
        };
        let key = "worker.socket";
        if config.worker.socket != WorkerSocket::Stdin {
            return Ok(());
        }
        if config.worker.mode == WorkerMode::Template {
            return Err(self.at(
                v,
                key,
                "worker.socket = \"stdin\" needs worker.mode = \"exec\": in template mode the template forks the workers and hands them the listeners at fds 3, 4, …; remove one of the two".into(),
            ));
        }
        let n = config.listen.addresses.len();
        if n > 1 {
            return Err(self.at(
                v,
                key,
                format!("worker.socket = \"stdin\" gives each worker exactly one listener (fd 0), but listen.addresses lists {n}; keep one address, or run one droved per address"),
            ));
        }
        Ok(())
    }

    fn build_listen(&self, raw: &RawListen, out: &mut ListenConfig) -> Res<()> {
        if let Some(addresses) = &raw.addresses {
            let entries: Vec<Spanned<Value>> = match addresses.get_ref() {
                OneOrMany::One(s) => vec![Spanned::new(addresses.span(), Value::String(s.clone()))],
                OneOrMany::Many(items) => items.clone(),
            };
            for entry in &entries {
                let spec = self.listen_spec(entry)?;
                if out.addresses.iter().any(|s| s.address == spec.address) {
                    return Err(self.at(
                        entry,
                        "listen.addresses",
                        format!("listen.addresses lists {} twice", spec.address),
                    ));
                }
                out.addresses.push(spec);
            }
        }
        if let Some(b) = self.int(&raw.backlog, "listen.backlog", 1, 65535)? {
            out.backlog = b;
        }
        if let Some(v) = &raw.socket_mode {
            let key = "listen.socket_mode";
            let s = self.string(v, key, "an octal string such as \"0660\"")?;
            let digits = s.strip_prefix("0o").unwrap_or(s);
            let mode = u32::from_str_radix(digits, 8)
                .ok()
                .filter(|_| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    self.at(
                        v,
                        key,
                        format!("{key} {s:?} is not an octal mode; expected e.g. \"0660\""),
                    )
                })?;
            if mode > 0o777 {
                return Err(self.at(
                    v,
                    key,
                    format!("{key} {s:?} is more than 0777; only permission bits are allowed"),
                ));
            }
            out.socket_mode = Some(mode);
        }
        out.socket_user = self.name(&raw.socket_user, "listen.socket_user")?;
        out.socket_group = self.name(&raw.socket_group, "listen.socket_group")?;
        Ok(())
    }

    fn listen_spec(&self, entry: &Spanned<Value>) -> Res<ListenSpec> {
        let key = "listen.addresses";
        let expected = "an address string or a table { address = \"…\", name = \"…\" }";
        let (address, name) = match entry.get_ref() {
            Value::String(s) => (s.as_str(), None),
            Value::Table(t) => {
                if let Some(unknown) = t.keys().find(|k| !ADDRESS_KEYS.contains(&k.as_str())) {
                    return Err(self.at(
                        entry,
                        key,
                        unknown_key_message(unknown, "a listen.addresses entry", ADDRESS_KEYS),
                    ));
                }
                let address = match t.get("address") {
                    Some(Value::String(s)) => s.as_str(),
                    Some(other) => {
                        return Err(self.at(
                            entry,
                            key,
                            format!(
                                "{key} entry: address must be a string, found {}",
                                describe(other)
                            ),
                        ));
                    }
                    None => {
                        return Err(self.at(
                            entry,
                            key,
                            format!("{key} entry has no address; add address = \"127.0.0.1:8080\" or similar"),
                        ));
                    }
                };
                let name = match t.get("name") {
                    Some(Value::String(s)) => Some(s.as_str()),
                    Some(other) => {
                        return Err(self.at(
                            entry,
                            key,
                            format!(
                                "{key} entry: name must be a string, found {}",
                                describe(other)
                            ),
                        ));
                    }
                    None => None,
                };
                (address, name)
            }
            _ => return Err(self.type_error(entry, key, expected)),
        };
        let address: ListenAddr = address
            .parse()
            .map_err(|e: ListenAddrError| self.at(entry, key, format!("{key}: {e}")))?;
        let name = name.unwrap_or(DEFAULT_LISTEN_NAME);
        if name.is_empty() || name.len() > 255 {
            return Err(self.at(
                entry,
                key,
                format!("{key}: name must be 1 to 255 characters long (sd_listen_fds(3))"),
            ));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| *c == ':' || !c.is_ascii() || c.is_ascii_control())
        {
            return Err(self.at(
                entry,
                key,
                format!(
                    "{key}: name {name:?} contains {bad:?}; names are printable ASCII without `:` (sd_listen_fds(3))"
                ),
            ));
        }
        Ok(ListenSpec {
            address,
            name: name.to_owned(),
        })
    }

    fn build_worker(&self, raw: &RawWorker, out: &mut WorkerConfig) -> Res<()> {
        if let Some(v) = &raw.command {
            out.command = self.command(v)?;
        }
        if let Some(dir) = self.name(&raw.working_directory, "worker.working_directory")? {
            out.working_directory = Some(PathBuf::from(dir));
        }
        if let Some(env) = &raw.environment {
            for (name, value) in &env.0 {
                out.environment
                    .insert(name.clone(), self.env_entry(name, value)?);
            }
        }
        out.user = self.name(&raw.user, "worker.user")?;
        out.group = self.name(&raw.group, "worker.group")?;
        if let (Some(v), None) = (&raw.group, &out.user) {
            return Err(self.at(
                v,
                "worker.group",
                "worker.group needs worker.user: without it workers would keep droved's own user (root, as a service) with only the group changed; set worker.user too".into(),
            ));
        }
        if let Some(b) = self.boolean(&raw.allow_root, "worker.allow_root")? {
            out.allow_root = b;
        }
        if let Some(v) = &raw.inherit_environment {
            out.inherit_environment = self.env_names(v)?;
        }
        if let Some(v) = &raw.mode {
            let s = self.string(v, "worker.mode", "\"exec\" or \"template\"")?;
            out.mode = s.parse().map_err(|e: WorkerModeError| {
                self.at(v, "worker.mode", format!("worker.mode: {e}"))
            })?;
        }
        if let Some(v) = &raw.socket {
            let s = self.string(v, "worker.socket", "\"systemd\" or \"stdin\"")?;
            out.socket = s.parse().map_err(|e: WorkerSocketError| {
                self.at(v, "worker.socket", format!("worker.socket: {e}"))
            })?;
        }
        if let Some(v) = &raw.ready {
            let s = self.string(v, "worker.ready", "\"notify\" or \"exec\"")?;
            out.ready = s.parse().map_err(|e: ReadyModeError| {
                self.at(v, "worker.ready", format!("worker.ready: {e}"))
            })?;
        }
        let nonzero = Duration::from_nanos(1);
        if let Some(d) = self.duration_min(&raw.ready_timeout, "worker.ready_timeout", nonzero)? {
            out.ready_timeout = d;
        }
        if let Some(v) = &raw.stop_signal {
            let key = "worker.stop_signal";
            let s = self.string(v, key, "a signal name such as \"SIGTERM\"")?;
            out.stop_signal =
                parse_signal(s).map_err(|e| self.at(v, key, format!("{key}: {e}")))?;
        }
        if let Some(d) = self.duration_min(&raw.stop_timeout, "worker.stop_timeout", nonzero)? {
            out.stop_timeout = d;
        }
        if let Some(v) = &raw.timeout_signal {
            let key = "worker.timeout_signal";
            let s = self.string(v, key, "a signal name such as \"SIGABRT\"")?;
            out.timeout_signal =
                parse_signal(s).map_err(|e| self.at(v, key, format!("{key}: {e}")))?;
        }
        out.watchdog =
            self.duration_min(&raw.watchdog, "worker.watchdog", Duration::from_millis(10))?;
        // Waits are seen once a second and measured to the kernel's
        // millisecond: less than a second cannot be kept.
        out.request_timeout = self.duration_min(
            &raw.request_timeout,
            "worker.request_timeout",
            Duration::from_secs(1),
        )?;
        if let Some(d) = self.duration_min(&raw.restart_delay, "worker.restart_delay", nonzero)? {
            out.restart_delay = d;
        }
        if let Some(d) =
            self.duration_min(&raw.restart_delay_max, "worker.restart_delay_max", nonzero)?
        {
            out.restart_delay_max = d;
        }
        if out.restart_delay > out.restart_delay_max {
            let v = raw
                .restart_delay
                .as_ref()
                .or(raw.restart_delay_max.as_ref());
            return Err(self.error(
                v.map(Spanned::span),
                Some("worker.restart_delay"),
                format!(
                    "worker.restart_delay ({}) must not exceed worker.restart_delay_max ({})",
                    format_duration(out.restart_delay),
                    format_duration(out.restart_delay_max)
                ),
            ));
        }
        if let Some(d) = self.duration_min(&raw.min_uptime, "worker.min_uptime", nonzero)? {
            out.min_uptime = d;
        }
        out.max_lifetime = self.duration_min(&raw.max_lifetime, "worker.max_lifetime", nonzero)?;
        if let Some(d) = self.duration(&raw.max_lifetime_jitter, "worker.max_lifetime_jitter")? {
            out.max_lifetime_jitter = d;
            if out.max_lifetime.is_none() && !d.is_zero() {
                return Err(self.error(
                    raw.max_lifetime_jitter.as_ref().map(Spanned::span),
                    Some("worker.max_lifetime_jitter"),
                    "worker.max_lifetime_jitter has no effect without worker.max_lifetime; set both or remove it".into(),
                ));
            }
        }
        if let Some(v) = &raw.max_rss {
            let key = "worker.max_rss";
            let bytes = match v.get_ref() {
                Value::Integer(i) => u64::try_from(*i)
                    .map_err(|_| self.at(v, key, format!("{key} ({i}) must not be negative")))?,
                Value::String(s) => {
                    parse_size(s).map_err(|e| self.at(v, key, format!("{key}: {e}")))?
                }
                _ => {
                    return Err(self.type_error(
                        v,
                        key,
                        "a size such as \"512MiB\" or a byte count",
                    ));
                }
            };
            if bytes == 0 {
                return Err(self.at(
                    v,
                    key,
                    format!("{key} must be greater than zero; remove the key for no limit"),
                ));
            }
            out.max_rss = Some(bytes);
        }
        Ok(())
    }

    fn command(&self, v: &Spanned<Value>) -> Res<Vec<String>> {
        let key = "worker.command";
        let expected = "an array of strings or a string";
        let argv: Vec<String> = match v.get_ref() {
            Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.at(
                        v,
                        key,
                        format!("{key}[{i}] must be a string, found {}", describe(other)),
                    )),
                })
                .collect::<Res<_>>()?,
            _ => return Err(self.type_error(v, key, expected)),
        };
        if argv.first().is_some_and(String::is_empty) {
            return Err(self.at(v, key, format!("{key} starts with an empty program name")));
        }
        if let Some(arg) = argv.iter().find(|a| a.contains('\0')) {
            return Err(self.at(
                v,
                key,
                format!("{key} argument {arg:?} contains a NUL byte"),
            ));
        }
        Ok(argv)
    }

    /// `worker.inherit_environment`: variable names, none that droved sets.
    fn env_names(&self, v: &Spanned<Value>) -> Res<Vec<String>> {
        let key = "worker.inherit_environment";
        let Value::Array(items) = v.get_ref() else {
            return Err(self.type_error(v, key, "an array of variable names"));
        };
        items
            .iter()
            .map(|item| match item {
                Value::String(name) if !name.is_empty() && !name.contains(['=', '\0']) => {
                    if RESERVED_ENVIRONMENT.contains(&name.as_str()) || name.starts_with("DROVE_") {
                        Err(self.at(
                            v,
                            key,
                            format!("{key}: {name} is set by droved for each worker; remove it"),
                        ))
                    } else {
                        Ok(name.clone())
                    }
                }
                Value::String(name) => Err(self.at(
                    v,
                    key,
                    format!("{key}: {name:?} is not a variable name (non-empty, no `=` or NUL)"),
                )),
                other => Err(self.at(
                    v,
                    key,
                    format!("{key} must hold strings, found {}", describe(other)),
                )),
            })
            .collect()
    }

    fn env_entry(&self, name: &str, v: &Spanned<Value>) -> Res<String> {
        let key = format!("worker.environment.{name}");
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(self.at(
                v,
                &key,
                format!(
                    "environment variable name {name:?} must be non-empty and contain no `=` or NUL"
                ),
            ));
        }
        if RESERVED_ENVIRONMENT.contains(&name) {
            return Err(self.at(
                v,
                &key,
                format!("environment variable {name} is set by droved for each worker; remove it"),
            ));
        }
        let value = match v.get_ref() {
            Value::String(s) => s.clone(),
            Value::Integer(i) => i.to_string(),
            Value::Boolean(b) => b.to_string(),
            _ => return Err(self.type_error(v, &key, "a string, integer or boolean")),
        };
        if value.contains('\0') {
            return Err(self.at(v, &key, format!("{key} must not contain a NUL byte")));
        }
        Ok(value)
    }

    fn build_pool(&self, raw: &RawPool, out: &mut PoolConfig) -> Res<()> {
        if let Some(n) = self.int(&raw.min, "pool.min", 0, MAX_WORKERS)? {
            out.min = n;
        }
        if let Some(n) = self.int(&raw.max, "pool.max", 1, MAX_WORKERS)? {
            out.max = n;
        }
        if out.min > out.max {
            let v = raw.min.as_ref().or(raw.max.as_ref());
            return Err(self.error(
                v.map(Spanned::span),
                Some("pool.min"),
                format!(
                    "pool.min ({}) must not exceed pool.max ({})",
                    out.min, out.max
                ),
            ));
        }
        out.initial = self.int(&raw.initial, "pool.initial", 0, MAX_WORKERS)?;
        if let (Some(n), Some(v)) = (out.initial, &raw.initial)
            && !(out.min..=out.max).contains(&n)
        {
            return Err(self.at(
                v,
                "pool.initial",
                format!(
                    "pool.initial ({n}) must be between pool.min ({}) and pool.max ({})",
                    out.min, out.max
                ),
            ));
        }
        if let Some(n) = self.int(&raw.spawn_rate, "pool.spawn_rate", 1, 10_000)? {
            out.spawn_rate = n;
        }
        if let Some(n) = self.int(&raw.spare, "pool.spare", 0, MAX_WORKERS)? {
            out.spare = n;
        }
        self.build_idle_exit(raw, out)
    }

    /// `pool.idle_exit`: only for a pool that may be empty (`min = 0`).
    /// Whether the sockets are socket-activated is checked at start-up.
    fn build_idle_exit(&self, raw: &RawPool, out: &mut PoolConfig) -> Res<()> {
        let nonzero = Duration::from_nanos(1);
        out.idle_exit = self.duration_min(&raw.idle_exit, "pool.idle_exit", nonzero)?;
        if let (Some(_), Some(v)) = (out.idle_exit, &raw.idle_exit)
            && out.min > 0
        {
            return Err(self.at(
                v,
                "pool.idle_exit",
                format!(
                    "pool.idle_exit needs pool.min = 0 (it is {}): droved exits only after a time at zero workers",
                    out.min
                ),
            ));
        }
        Ok(())
    }

    fn build_rollout(&self, raw: &RawRollout) -> Res<RolloutConfig> {
        let mut out = RolloutConfig::default();
        if let Some(n) = self.int(&raw.canary, "rollout.canary", 0, 10_000)? {
            out.canary = n;
        }
        if let Some(d) = self.duration(&raw.observe, "rollout.observe")? {
            out.observe = d;
        }
        if let Some(n) = self.int(&raw.max_failures, "rollout.max_failures", 1, 10_000)? {
            out.max_failures = n;
        }
        Ok(out)
    }

    fn build_scale(&self, raw: &RawScale, out: &mut ScaleConfig) -> Res<()> {
        let tick = Duration::from_millis(10);
        if let Some(d) = self.duration_min(&raw.interval, "scale.interval", tick)? {
            out.interval = d;
        }
        if let Some(d) = self.duration(&raw.cooldown, "scale.cooldown")? {
            out.cooldown = d;
        }
        if let Some(d) = self.duration(&raw.window, "scale.window")? {
            out.window = d;
        }
        if out.window < out.interval {
            let v = raw.window.as_ref().or(raw.interval.as_ref());
            return Err(self.error(
                v.map(Spanned::span),
                Some("scale.window"),
                format!(
                    "scale.window ({}) must be at least scale.interval ({})",
                    format_duration(out.window),
                    format_duration(out.interval)
                ),
            ));
        }
        if let Some(b) = self.boolean(&raw.cpu_guard, "scale.cpu_guard")? {
            out.cpu_guard = b;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{assert_err, parse};

    #[test]
    fn syntax_and_unknown_keys() {
        assert_err(
            "\n\nworkerz = 1",
            "3:1: unknown key `workerz` in the top level; expected one of listen, worker, pool, scale, control, rollout, metrics, stop (did you mean `worker`?)",
        );
        assert_err(
            "[pool]\nminimum = 1",
            "2:1: unknown key `minimum` in [pool]; expected one of min, max, initial, spawn_rate, idle_exit, spare",
        );
        assert_err(
            "[worker]\n  comand = []",
            "2:3: unknown key `comand` in [worker]; expected one of command, working_directory, environment, user, group, mode, socket, ready, ready_timeout, stop_signal, stop_timeout, timeout_signal, watchdog, request_timeout, restart_delay, restart_delay_max, min_uptime, max_lifetime, max_lifetime_jitter, max_rss, allow_root, inherit_environment (did you mean `command`?)",
        );
        assert_err(
            "[listen]\nport = 80",
            "2:1: unknown key `port` in [listen]; expected one of addresses, backlog, socket_mode, socket_user, socket_group",
        );
        assert_err(
            "[scale]\ninterval = \"1s\"\ncpuguard = true",
            "3:1: unknown key `cpuguard` in [scale]; expected one of interval, cooldown, window, cpu_guard (did you mean `cpu_guard`?)",
        );
        assert_err(
            "[control]\nuser = \"x\"",
            "2:1: unknown key `user` in [control]; expected one of group",
        );
        assert_err(
            "[listen]\naddresses = [{ address = \"127.0.0.1:1\", nam = \"x\" }]",
            "2:14: unknown key `nam` in a listen.addresses entry; expected one of address, name (did you mean `name`?)",
        );
        assert_err("[pool\n", "1:6: unclosed table, expected `]`");
        assert_err(
            "[pool]\nmin = 1\nmin = 2",
            "3:1: duplicate key `min`; a key may appear only once in a table",
        );
        // Columns count characters, not bytes.
        assert_err(
            "# é\n[worker]\nready_timeout = \"é\"",
            "3:17: worker.ready_timeout: `é` is not a duration; expected a number and a unit, e.g. \"100ms\", \"30s\", \"2m\"",
        );
        assert_err(
            "pool = 3",
            "1:8: invalid type: integer `3`, expected a table [pool]",
        );
    }

    #[test]
    fn listen_errors() {
        let p = |v: &str| format!("[listen]\naddresses = [{v}]");
        assert_err(
            &p("\"localhost:8080\""),
            "2:14: listen.addresses: `localhost:8080` names a host; droved binds literal IP addresses only, e.g. 127.0.0.1:8080 or [::1]:8080",
        );
        assert_err(
            &p("\"8080\""),
            "2:14: listen.addresses: `8080` is a bare port; write 127.0.0.1:8080 (loopback) or 0.0.0.0:8080 / [::]:8080 (all addresses)",
        );
        assert_err(
            &p("\":8080\""),
            "2:14: listen.addresses: `:8080` has no host; write 0.0.0.0:8080 or [::]:8080 for all addresses",
        );
        assert_err(
            &p("\"::1:8080\""),
            "2:14: listen.addresses: `::1:8080` is an IPv6 address without brackets; write [::1]:8080",
        );
        assert_err(
            &p("\"127.0.0.1:80\", \"127.0.0.1:80\""),
            "2:30: listen.addresses lists 127.0.0.1:80 twice",
        );
        assert_err(
            &p("\"unix:\""),
            "2:14: listen.addresses: the unix socket path is empty; write e.g. unix:/run/app.sock",
        );
        let long = format!("\"unix:/{}\"", "a".repeat(107));
        assert_err(
            &p(&long),
            "2:14: listen.addresses: the unix socket path is 108 bytes long; the limit is 107 bytes",
        );
        let ok = format!("\"unix:/{}\"", "a".repeat(106));
        assert_eq!(parse(&p(&ok)).listen.addresses.len(), 1);
        assert_err(
            &p("\"unix:@abstract\""),
            "2:14: listen.addresses: abstract unix sockets (`unix:@…`) are not supported; use a filesystem path",
        );
        assert_err(
            &p("\"unix:/a\\u0000b\""),
            "2:14: listen.addresses: the unix socket path contains a NUL byte",
        );
        assert_err(
            &p("\"http://x/\""),
            "2:14: listen.addresses: `http://x/` is not a listen address; expected IP:PORT (127.0.0.1:8080, [::1]:8080) or unix:/path",
        );
        assert_err(
            &p("80"),
            "2:14: listen.addresses must be an address string or a table { address = \"…\", name = \"…\" }, found integer 80",
        );
        assert_err(
            &p("{ name = \"x\" }"),
            "2:14: listen.addresses entry has no address; add address = \"127.0.0.1:8080\" or similar",
        );
        assert_err(
            &p("{ address = 1 }"),
            "2:14: listen.addresses entry: address must be a string, found integer 1",
        );
        assert_err(
            &p("{ address = \"127.0.0.1:1\", name = 1 }"),
            "2:14: listen.addresses entry: name must be a string, found integer 1",
        );
        assert_err(
            &p("{ address = \"127.0.0.1:1\", name = \"a:b\" }"),
            "2:14: listen.addresses: name \"a:b\" contains ':'; names are printable ASCII without `:` (sd_listen_fds(3))",
        );
        assert_err(
            &p("{ address = \"127.0.0.1:1\", name = \"tab\\there\" }"),
            "2:14: listen.addresses: name \"tab\\there\" contains '\\t'; names are printable ASCII without `:` (sd_listen_fds(3))",
        );
        assert_err(
            &p("{ address = \"127.0.0.1:1\", name = \"\" }"),
            "2:14: listen.addresses: name must be 1 to 255 characters long (sd_listen_fds(3))",
        );
        let name = format!(
            "{{ address = \"127.0.0.1:1\", name = \"{}\" }}",
            "n".repeat(256)
        );
        assert_err(
            &p(&name),
            "2:14: listen.addresses: name must be 1 to 255 characters long (sd_listen_fds(3))",
        );
        assert_err(
            "[listen]\nbacklog = 0",
            "2:11: listen.backlog (0) must be a whole number from 1 to 65535",
        );
        assert_err(
            "[listen]\nbacklog = 65536",
            "2:11: listen.backlog (65536) must be a whole number from 1 to 65535",
        );
        assert_err(
            "[listen]\nsocket_mode = 0o660",
            "2:15: listen.socket_mode must be an octal string such as \"0660\", found integer 432",
        );
        assert_err(
            "[listen]\nsocket_mode = \"0999\"",
            "2:15: listen.socket_mode \"0999\" is not an octal mode; expected e.g. \"0660\"",
        );
        assert_err(
            "[listen]\nsocket_mode = \"+660\"",
            "2:15: listen.socket_mode \"+660\" is not an octal mode; expected e.g. \"0660\"",
        );
        assert_err(
            "[listen]\nsocket_mode = \"1777\"",
            "2:15: listen.socket_mode \"1777\" is more than 0777; only permission bits are allowed",
        );
        assert_err(
            "[listen]\nsocket_user = \"\"",
            "2:15: listen.socket_user must not be empty; remove the key instead",
        );
        assert_err(
            "[listen]\nsocket_group = 5",
            "2:16: listen.socket_group must be a string, found integer 5",
        );
    }

    #[test]
    fn worker_errors() {
        let w = |line: &str| format!("[worker]\n{line}");
        assert_err(
            &w("command = 5"),
            "2:11: worker.command must be an array of strings or a string, found integer 5",
        );
        assert_err(
            &w("command = [\"a\", 1]"),
            "2:11: worker.command[1] must be a string, found integer 1",
        );
        assert_err(
            &w("command = [\"\", \"x\"]"),
            "2:11: worker.command starts with an empty program name",
        );
        assert_err(
            &w("command = [\"a\\u0000b\"]"),
            "2:11: worker.command argument \"a\\0b\" contains a NUL byte",
        );
        assert_err(
            &w("working_directory = \"\""),
            "2:21: worker.working_directory must not be empty; remove the key instead",
        );
        assert_err(
            &w("user = \"a\\u0000\""),
            "2:8: worker.user must not contain a NUL byte",
        );
        assert_err(
            &w("environment = { \"A=B\" = \"x\" }"),
            "2:25: environment variable name \"A=B\" must be non-empty and contain no `=` or NUL",
        );
        assert_err(
            &w("environment = { \"\" = \"x\" }"),
            "2:22: environment variable name \"\" must be non-empty and contain no `=` or NUL",
        );
        assert_err(
            &w("[worker.environment]\nLISTEN_FDS = \"3\""),
            "3:14: environment variable LISTEN_FDS is set by droved for each worker; remove it",
        );
        assert_err(
            &w("[worker.environment]\nDROVE_INSTANCE = \"x\""),
            "3:18: environment variable DROVE_INSTANCE is set by droved for each worker; remove it",
        );
        assert_err(
            &w("environment = { A = 1.5 }"),
            "2:21: worker.environment.A must be a string, integer or boolean, found float 1.5",
        );
        assert_err(
            &w("environment = { A = \"\\u0000\" }"),
            "2:21: worker.environment.A must not contain a NUL byte",
        );
        assert_err(
            &w("environment = 3"),
            "2:15: invalid type: integer `3`, expected worker.environment as a table, e.g. { NAME = \"value\" }",
        );
        assert_err(
            &w("ready = \"simple\""),
            "2:9: worker.ready: unknown ready mode `simple`; expected \"notify\" or \"exec\"",
        );
        assert_err(
            &w("ready = true"),
            "2:9: worker.ready must be \"notify\" or \"exec\", found boolean true",
        );
        assert_err(
            &w("stop_signal = \"SIGFOO\""),
            "2:15: worker.stop_signal: `SIGFOO` is not a signal name; expected e.g. \"SIGTERM\", \"SIGINT\", \"SIGQUIT\"",
        );
        assert_err(
            &w("stop_signal = \"15\""),
            "2:15: worker.stop_signal: `15`: give the signal by name, e.g. \"SIGTERM\" or \"SIGQUIT\"",
        );
        assert_err(
            &w("stop_signal = 15"),
            "2:15: worker.stop_signal must be a signal name such as \"SIGTERM\", found integer 15",
        );
        assert_err(
            &w("ready_timeout = \"0s\""),
            "2:17: worker.ready_timeout must be greater than zero",
        );
        assert_err(
            &w("stop_timeout = 0"),
            "2:16: worker.stop_timeout must be greater than zero",
        );
        assert_err(
            &w("stop_timeout = 30"),
            "2:16: worker.stop_timeout must be a duration string with a unit, e.g. \"30s\" or \"30ms\", found integer 30",
        );
        assert_err(
            &w("stop_timeout = 1.5"),
            "2:16: worker.stop_timeout must be a duration string such as \"30s\" or \"100ms\", found float 1.5",
        );
        assert_err(
            &w("request_timeout = \"500ms\""),
            "2:19: worker.request_timeout (500ms) must be at least 1s",
        );
        assert_eq!(
            parse(&w("request_timeout = \"30s\""))
                .worker
                .request_timeout,
            Some(std::time::Duration::from_secs(30))
        );
        assert_err(
            &w("watchdog = \"9ms\""),
            "2:12: worker.watchdog (9ms) must be at least 10ms",
        );
        assert_err(
            &w("restart_delay = \"0\""),
            "2:17: worker.restart_delay must be greater than zero",
        );
        assert_err(
            &w("restart_delay = \"20s\""),
            "2:17: worker.restart_delay (20s) must not exceed worker.restart_delay_max (10s)",
        );
        assert_err(
            &w("restart_delay_max = \"50ms\""),
            "2:21: worker.restart_delay (100ms) must not exceed worker.restart_delay_max (50ms)",
        );
        assert_err(
            &w("min_uptime = \"0ms\""),
            "2:14: worker.min_uptime must be greater than zero",
        );
        assert_err(
            &w("max_lifetime = \"0\""),
            "2:16: worker.max_lifetime must be greater than zero",
        );
        assert_err(
            &w("max_lifetime_jitter = \"1m\""),
            "2:23: worker.max_lifetime_jitter has no effect without worker.max_lifetime; set both or remove it",
        );
        assert_err(
            &w("max_rss = \"0\""),
            "2:11: worker.max_rss must be greater than zero; remove the key for no limit",
        );
        assert_err(
            &w("max_rss = -1"),
            "2:11: worker.max_rss (-1) must not be negative",
        );
        assert_err(
            &w("max_rss = \"512MB\""),
            "2:11: worker.max_rss: `512MB`: `MB` is ambiguous; write `MiB` (1024-based, like systemd's `M`)",
        );
        assert_err(
            &w("max_rss = true"),
            "2:11: worker.max_rss must be a size such as \"512MiB\" or a byte count, found boolean true",
        );
    }

    #[test]
    fn worker_socket() {
        use crate::config::WorkerSocket;
        assert_eq!(parse("").worker.socket, WorkerSocket::Systemd);
        let one = "[listen]\naddresses = \"unix:/run/php.sock\"\n[worker]\nsocket = \"stdin\"";
        assert_eq!(parse(one).worker.socket, WorkerSocket::Stdin);
        // No address in the file: droved -l or systemd supplies it, and
        // the worker plan checks the count at start.
        assert_eq!(
            parse("[worker]\nsocket = \"stdin\"").worker.socket,
            WorkerSocket::Stdin
        );
        assert_eq!(
            parse("[worker]\nsocket = \"systemd\"").worker.socket,
            WorkerSocket::Systemd
        );
        assert_err(
            "[worker]\nsocket = \"fd0\"",
            "2:10: worker.socket: unknown socket convention `fd0`; expected \"systemd\" or \"stdin\"",
        );
        assert_err(
            "[worker]\nsocket = 0",
            "2:10: worker.socket must be \"systemd\" or \"stdin\", found integer 0",
        );
        assert_err(
            "[listen]\naddresses = [\"127.0.0.1:9000\", \"unix:/run/php.sock\"]\n[worker]\nsocket = \"stdin\"",
            "4:10: worker.socket = \"stdin\" gives each worker exactly one listener (fd 0), but listen.addresses lists 2; keep one address, or run one droved per address",
        );
        assert_err(
            "[worker]\nmode = \"template\"\nsocket = \"stdin\"",
            "3:10: worker.socket = \"stdin\" needs worker.mode = \"exec\": in template mode the template forks the workers and hands them the listeners at fds 3, 4, …; remove one of the two",
        );
        // Two addresses are fine the systemd way.
        parse(
            "[listen]\naddresses = [\"127.0.0.1:9000\", \"unix:/run/php.sock\"]\n[worker]\nsocket = \"systemd\"",
        );
    }

    #[test]
    fn pool_and_scale_errors() {
        assert_err(
            "[pool]\nmin = 10\nmax = 4",
            "2:7: pool.min (10) must not exceed pool.max (4)",
        );
        assert_err(
            "[pool]\nmin = 10",
            "2:7: pool.min (10) must not exceed pool.max (8)",
        );
        assert_err(
            "[pool]\nmax = 1",
            "2:7: pool.min (2) must not exceed pool.max (1)",
        );
        assert_err(
            "[pool]\nmin = 2\nidle_exit = \"10m\"",
            "3:13: pool.idle_exit needs pool.min = 0 (it is 2): droved exits only after a time at zero workers",
        );
        assert_err(
            "[pool]\nmin = 0\nidle_exit = \"0s\"",
            "3:13: pool.idle_exit must be greater than zero",
        );
        assert_err(
            "[pool]\nmax = 0",
            "2:7: pool.max (0) must be a whole number from 1 to 4096",
        );
        assert_err(
            "[pool]\nmax = 4097",
            "2:7: pool.max (4097) must be a whole number from 1 to 4096",
        );
        assert_err(
            "[pool]\nmin = -1",
            "2:7: pool.min (-1) must be a whole number from 0 to 4096",
        );
        assert_err(
            "[pool]\nmin = 1.0",
            "2:7: pool.min must be a whole number from 0 to 4096, found float 1",
        );
        assert_err(
            "[pool]\nmin = 2\nmax = 4\ninitial = 5",
            "4:11: pool.initial (5) must be between pool.min (2) and pool.max (4)",
        );
        assert_err(
            "[pool]\ninitial = 1",
            "2:11: pool.initial (1) must be between pool.min (2) and pool.max (8)",
        );
        assert_err(
            "[pool]\nspawn_rate = 0",
            "2:14: pool.spawn_rate (0) must be a whole number from 1 to 10000",
        );
        assert_err(
            "[scale]\ninterval = \"5ms\"",
            "2:12: scale.interval (5ms) must be at least 10ms",
        );
        assert_err(
            "[scale]\ninterval = \"2s\"",
            "2:12: scale.window (1s) must be at least scale.interval (2s)",
        );
        assert_err(
            "[scale]\nwindow = \"10ms\"",
            "2:10: scale.window (10ms) must be at least scale.interval (100ms)",
        );
        assert_err(
            "[scale]\ncooldown = \"10\"",
            "2:12: scale.cooldown: `10` has no unit; write e.g. \"10s\" or \"10ms\"",
        );
        assert_err(
            "[scale]\ncpu_guard = \"yes\"",
            "2:13: scale.cpu_guard must be true or false, found string \"yes\"",
        );
        assert_err(
            "[control]\ngroup = \"\"",
            "2:9: control.group must not be empty; remove the key instead",
        );
    }

    #[test]
    fn stop_delay() {
        use std::time::Duration;
        assert_eq!(
            parse("[stop]\ndelay = \"5s\"").stop.delay,
            Duration::from_secs(5)
        );
        assert_eq!(parse("").stop.delay, Duration::ZERO);
        assert_eq!(parse("[stop]\ndelay = 0").stop.delay, Duration::ZERO);
        assert_err(
            "[stop]\ndelay = 5",
            "2:9: stop.delay must be a duration string with a unit, e.g. \"5s\" or \"5ms\", found integer 5",
        );
        assert_err(
            "[stop]\ndelay = \"2h\"",
            "2:9: stop.delay (2h) must be at most 1h: it only needs to outlast the load balancer taking the instance out (a few seconds)",
        );
        assert_err(
            "[stop]\ndelay = \"soon\"",
            "2:9: stop.delay: `soon` is not a duration; expected a number and a unit, e.g. \"100ms\", \"30s\", \"2m\"",
        );
        assert_err(
            "[stop]\ntimeout = \"5s\"",
            "2:1: unknown key `timeout` in [stop]; expected one of delay",
        );
    }

    #[test]
    fn metrics_listen() {
        use crate::config::{Config, ListenAddr};
        use std::path::Path;
        let c = Config::from_toml_str("[metrics]\nlisten = \"127.0.0.1:9464\"", Path::new("t"));
        assert_eq!(
            c.unwrap().metrics.listen,
            Some(ListenAddr::Tcp("127.0.0.1:9464".parse().unwrap()))
        );
        let c = Config::from_toml_str("[metrics]\nlisten = \"unix:/run/m.sock\"", Path::new("t"));
        assert_eq!(
            c.unwrap().metrics.listen,
            Some(ListenAddr::Unix("/run/m.sock".into()))
        );
        assert_eq!(Config::default().metrics.listen, None);
        assert_err(
            "[metrics]\nlisten = \"9464\"",
            "2:10: metrics.listen: `9464` is a bare port; write 127.0.0.1:9464 (loopback) or 0.0.0.0:9464 / [::]:9464 (all addresses)",
        );
        assert_err(
            "[metrics]\nlisten = 9464",
            "2:10: metrics.listen must be an address string such as \"127.0.0.1:9464\", found integer 9464",
        );
        assert_err(
            "[listen]\naddresses = \"127.0.0.1:8080\"\n[metrics]\nlisten = \"127.0.0.1:8080\"",
            "4:10: metrics.listen 127.0.0.1:8080 is also in listen.addresses; metrics need an address of their own",
        );
        assert_err(
            "[metrics]\nport = 1",
            "2:1: unknown key `port` in [metrics]; expected one of listen",
        );
    }
}
