//! drove on D-Bus: one interface definition (`org.drove.Drove1`) that
//! serves the daemon side ([`serve`]) and generates the client proxy
//! ([`Drove1Proxy`]) that `drovectl` uses. See docs/dbus.md.
//!
//! Naming: each instance owns the well-known name
//! `org.drove.Drove1.<label>`, where `<label>` is the instance name escaped
//! by [`escape_instance`] (systemd's bus-label rule), and serves one object,
//! [`OBJECT_PATH`]. Reading is open to everyone; mutating methods check the
//! caller's uid as the bus daemon reports it (see `access::Access`).
//!
//! Invariant: the daemon never trusts identity from arguments; it asks the
//! bus for the sender's uid on every mutating call.

mod access;
mod private;
pub mod properties;
mod sasl;
mod server;
pub mod throttle;
pub mod wire;

use serde::{Deserialize, Serialize};
use zbus::zvariant::{OwnedValue, Type, Value};

use crate::supervisor::control::{ControlError, WorkerInfo};
use crate::supervisor::status::ListenerStatus;

pub use access::{Access, Denials, Grant};
pub use private::serve_private;
pub use server::{Drove1, Drove1Proxy, ServeError, report_denials, serve};

/// The D-Bus interface name.
pub const INTERFACE: &str = "org.drove.Drove1";
/// The one object each instance serves.
pub const OBJECT_PATH: &str = "/org/drove/Drove1";
/// Well-known names are this prefix plus the escaped instance name.
pub const NAME_PREFIX: &str = "org.drove.Drove1.";
/// D-Bus limits a whole name to 255 bytes.
const MAX_NAME_LEN: usize = 255;

/// Which bus to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BusKind {
    System,
    Session,
}

impl std::fmt::Display for BusKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BusKind::System => "system",
            BusKind::Session => "session",
        })
    }
}

impl BusKind {
    /// Connects as zbus does: DBUS_SYSTEM_BUS_ADDRESS / DBUS_SESSION_BUS_ADDRESS
    /// when set, else the standard addresses.
    pub fn builder(self) -> zbus::Result<zbus::connection::Builder<'static>> {
        match self {
            BusKind::System => zbus::connection::Builder::system(),
            BusKind::Session => zbus::connection::Builder::session(),
        }
    }
}

/// Escapes an instance name into one D-Bus name element, the way systemd's
/// `bus_label_escape()` does: ASCII letters and digits stay, except a digit
/// in first place; every other byte (including `_`, `-`, `.` and each byte
/// of a multi-byte UTF-8 character) becomes `_` and two lower-case hex
/// digits. The empty string becomes `_`. The result is a valid element for
/// any input and [`unescape_label`] reverses it.
pub fn escape_instance(instance: &str) -> String {
    if instance.is_empty() {
        return "_".into();
    }
    let mut out = String::with_capacity(instance.len());
    for (i, b) in instance.bytes().enumerate() {
        if b.is_ascii_alphabetic() || (b.is_ascii_digit() && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

/// Reverses [`escape_instance`]; `None` for a label it cannot have made.
pub fn unescape_label(label: &str) -> Option<String> {
    if label == "_" {
        return Some(String::new());
    }
    let bytes = label.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = label.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if bytes[i].is_ascii_alphanumeric() {
            out.push(bytes[i]);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// The well-known bus name of `instance`; an error when the escaped name
/// would exceed D-Bus's 255-byte limit.
pub fn bus_name(instance: &str) -> Result<String, NameTooLong> {
    let name = format!("{NAME_PREFIX}{}", escape_instance(instance));
    if name.len() > MAX_NAME_LEN {
        return Err(NameTooLong {
            instance: instance.to_string(),
            len: name.len(),
        });
    }
    Ok(name)
}

/// The instance a well-known name belongs to, if it is a drove name.
pub fn instance_of(bus_name: &str) -> Option<String> {
    unescape_label(bus_name.strip_prefix(NAME_PREFIX)?)
}

#[derive(Debug, thiserror::Error)]
#[error(
    "instance name {instance:?} is too long for D-Bus: its bus name would be {len} bytes (at most {MAX_NAME_LEN})"
)]
pub struct NameTooLong {
    pub instance: String,
    pub len: usize,
}

/// The errors drove's methods answer with, as named D-Bus errors
/// `org.drove.Error.<Variant>`; the string is the human message.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.drove.Error")]
pub enum BusError {
    /// Not a drove error: a failure of the bus itself, or another
    /// service's error (e.g. org.freedesktop.DBus.Error.ServiceUnknown).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The caller is neither root, droved's own user, nor a member of
    /// control.group.
    AccessDenied(String),
    /// Scale outside [min, max], or limits that are not 0 <= min <= max, max >= 1.
    OutOfRange(String),
    /// Reload found an invalid configuration; nothing changed.
    ReloadRejected(String),
    /// A rolling restart gave up (new workers kept failing).
    RolloutFailed(String),
    /// Upgrade preflight failed; the running process keeps serving.
    UpgradeRefused(String),
    /// droved is shutting down.
    Stopping(String),
    /// `Rollout` asked to pause, resume or abort with no rollout running.
    NoRollout(String),
}

impl From<ControlError> for BusError {
    fn from(e: ControlError) -> Self {
        let msg = e.to_string();
        match e {
            ControlError::OutOfRange(_) => BusError::OutOfRange(msg),
            ControlError::ReloadRejected(_) => BusError::ReloadRejected(msg),
            ControlError::RolloutFailed(_) => BusError::RolloutFailed(msg),
            ControlError::UpgradeRefused(_) => BusError::UpgradeRefused(msg),
            ControlError::Stopping => BusError::Stopping(msg),
            ControlError::NoRollout => BusError::NoRollout(msg),
        }
    }
}

/// One listener in the `Listeners` property: `(sssiis)`. Unknown numbers
/// are -1; `error` is empty when the queue was readable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct Listener {
    pub name: String,
    pub address: String,
    pub family: String,
    pub queued: i32,
    pub backlog: i32,
    pub error: String,
}

impl From<&ListenerStatus> for Listener {
    fn from(l: &ListenerStatus) -> Self {
        Listener {
            name: l.name.clone(),
            address: l.address.clone(),
            family: l.family.clone(),
            queued: opt_i32(l.queued),
            backlog: opt_i32(l.backlog),
            error: l.error.clone().unwrap_or_default(),
        }
    }
}

impl From<Listener> for ListenerStatus {
    fn from(l: Listener) -> Self {
        ListenerStatus {
            name: l.name,
            address: l.address,
            family: l.family,
            queued: u32::try_from(l.queued).ok(),
            backlog: u32::try_from(l.backlog).ok(),
            error: Some(l.error).filter(|e| !e.is_empty()),
        }
    }
}

/// -1 for "unknown" in a signed D-Bus integer.
pub fn opt_i32(v: Option<u32>) -> i32 {
    v.map(|v| i32::try_from(v).unwrap_or(i32::MAX))
        .unwrap_or(-1)
}

/// One worker as ListWorkers returns it: `(uustdtds)`; the supervisor's
/// own record is the wire type.
pub type Worker = WorkerInfo;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_valid_and_reversible() {
        for (instance, label) in [
            ("default", "default"),
            ("web", "web"),
            ("web-1", "web_2d1"),
            ("2fast", "_32fast"),
            ("a_b", "a_5fb"),
            ("a.b", "a_2eb"),
            ("", "_"),
            ("ü", "_c3_bc"),
            ("_", "_5f"),
        ] {
            assert_eq!(escape_instance(instance), label, "{instance:?}");
            assert_eq!(
                unescape_label(label).as_deref(),
                Some(instance),
                "{label:?}"
            );
            let name = bus_name(instance).unwrap();
            zbus::names::WellKnownName::try_from(name.as_str())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(instance_of(&name).as_deref(), Some(instance));
        }
    }

    #[test]
    fn every_byte_escapes_to_a_valid_name() {
        // In chunks: the whole set would exceed the 255-byte name limit.
        let all: Vec<char> = (0u8..128)
            .map(|b| b as char)
            .chain(['ü', '€', '😀'])
            .collect();
        for chunk in all.chunks(50) {
            let instance: String = chunk.iter().collect();
            let name = bus_name(&instance).unwrap();
            zbus::names::WellKnownName::try_from(name.as_str())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(instance_of(&name).as_deref(), Some(instance.as_str()));
        }
    }

    #[test]
    fn foreign_labels_are_rejected() {
        assert_eq!(unescape_label("a-b"), None);
        assert_eq!(unescape_label("a_zz"), None);
        assert_eq!(unescape_label("a_4"), None);
        assert_eq!(instance_of("org.other.Thing"), None);
    }

    #[test]
    fn long_names_are_refused() {
        assert!(bus_name(&"a".repeat(238)).is_ok());
        let e = bus_name(&"a".repeat(239)).unwrap_err();
        assert!(e.to_string().contains("too long"), "{e}");
        assert!(bus_name(&"-".repeat(80)).is_err());
    }
}
