//! The supervisor state handed from one droved binary to the next across
//! `execve` (binary upgrade). Pure: encoding and decoding only.
//!
//! Format: the 8-byte magic `DROVEHO\0`, a little-endian u32 format
//! version, a u32 payload length, then the payload as JSON. A new binary
//! accepts exactly the versions in [`SUPPORTED`]; preflight asks the new
//! binary for them (`droved --preflight`) before the old one execs it, so
//! an incompatible binary is refused while the old one still runs.
//!
//! Times are stored as ages (milliseconds before the handover), because
//! `Instant` means nothing to another process image.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::supervisor::pool::{StopReason, WorkerState as PoolWorkerState};

pub const MAGIC: &[u8; 8] = b"DROVEHO\0";
/// The format this binary writes.
pub const FORMAT_VERSION: u32 = 1;
/// The formats this binary reads.
pub const SUPPORTED: &[u32] = &[1];
/// Environment variable naming the fd that holds the state.
pub const ENV_FD: &str = "DROVE_HANDOVER_FD";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Version string of the binary that wrote this.
    pub from_version: String,
    pub instance: String,
    pub generation: u64,
    pub target: u32,
    pub listeners: Vec<ListenerState>,
    pub notify: NotifyState,
    pub workers: Vec<WorkerState>,
    pub counters: Counters,
    pub uptime_ms: u64,
    pub consecutive_failures: u32,
    /// The lifecycle state the new image resumes in. Absent in states of
    /// binaries older than this field: they handed over only when running.
    #[serde(default)]
    pub resume: Resume,
    /// Template mode: the current, ready template, whose socket (`fd`) is
    /// kept open across the exec. Absent otherwise and in older states.
    #[serde(default)]
    pub template: Option<TemplateHandover>,
    /// The listeners came from systemd socket activation (pool.idle_exit
    /// needs it). Absent in older states: then false.
    #[serde(default)]
    pub socket_activated: bool,
    /// The metrics' event counters (`metrics::carry`), so that they keep
    /// counting across the upgrade. Absent in older states: they start at 0.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub event_counts: BTreeMap<String, u64>,
}

/// A template handed over with its socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateHandover {
    pub pid: i32,
    pub generation: u64,
    pub fd: i32,
    pub age_ms: u64,
}

/// Where the new image picks up droved's lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resume {
    /// The pool had not become ready yet: READY=1 is still owed.
    Starting,
    #[default]
    Running,
    /// A stop arrived while the exec was due: the new image stops at once.
    Stopping { fast: bool },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerState {
    pub fd: i32,
    pub name: String,
    pub address: String,
    pub owned_path: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotifyState {
    pub fd: i32,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerState {
    pub pid: i32,
    pub slot: u32,
    pub generation: u64,
    pub state: PoolWorkerState,
    pub age_ms: u64,
    pub ready_age_ms: Option<u64>,
    pub last_ping_age_ms: u64,
    /// Stop reason and how long ago the stop began.
    pub stop: Option<(StopReason, u64)>,
    pub killed: bool,
    pub status_text: Option<String>,
    pub recycle_in_ms: Option<u64>,
    /// The worker's own WATCHDOG_USEC= (absent from older droveds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog_usec: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub spawned: u64,
    pub exited: u64,
    pub failed_starts: u64,
    pub reloads: u64,
    pub upgrades: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandoverError {
    #[error("handover data is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("handover data does not start with the drove magic")]
    BadMagic,
    #[error("handover format {found} is not supported by this binary (it reads {supported:?})")]
    Version { found: u32, supported: Vec<u32> },
    #[error("handover payload is malformed: {0}")]
    Malformed(String),
}

pub fn encode(state: &State) -> Vec<u8> {
    let payload = serde_json::to_vec(state).expect("state serializes");
    let mut out = Vec::with_capacity(16 + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

pub fn decode(bytes: &[u8]) -> Result<State, HandoverError> {
    if bytes.len() < 16 {
        return Err(HandoverError::Truncated(bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err(HandoverError::BadMagic);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if !SUPPORTED.contains(&version) {
        return Err(HandoverError::Version {
            found: version,
            supported: SUPPORTED.to_vec(),
        });
    }
    let len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    let payload = &bytes[16..];
    if payload.len() < len {
        return Err(HandoverError::Truncated(bytes.len()));
    }
    serde_json::from_slice(&payload[..len]).map_err(|e| HandoverError::Malformed(e.to_string()))
}

/// The line `droved --preflight` prints, and its parser (old binary side).
pub fn preflight_line() -> String {
    let formats: Vec<String> = SUPPORTED.iter().map(u32::to_string).collect();
    format!(
        "drove-handover formats={} version={}",
        formats.join(","),
        crate::version()
    )
}

/// Why a new binary's preflight line does not allow a handover.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PreflightLineError {
    #[error("the new binary printed no handover line (too old, or not droved)")]
    NoLine,
    #[error("the handover line has no formats")]
    NoFormats,
    #[error("the new binary reads handover formats {0:?}, this one writes {FORMAT_VERSION}")]
    Incompatible(Vec<u32>),
}

/// Parses a preflight line: the new binary's version, if it can read the
/// format this binary writes.
pub fn check_preflight(output: &str) -> Result<String, PreflightLineError> {
    let line = output
        .lines()
        .find(|l| l.starts_with("drove-handover "))
        .ok_or(PreflightLineError::NoLine)?;
    let mut formats = None;
    // `version=` comes last and runs to the end of the line (it has spaces).
    let (fields, rest) = match line.split_once(" version=") {
        Some((f, v)) => (f, Some(v.trim().to_string())),
        None => (line, None),
    };
    let version = rest;
    for field in fields.split_whitespace().skip(1) {
        if let Some(v) = field.strip_prefix("formats=") {
            formats = Some(
                v.split(',')
                    .filter_map(|f| f.parse::<u32>().ok())
                    .collect::<Vec<_>>(),
            );
        }
    }
    let formats = formats.ok_or(PreflightLineError::NoFormats)?;
    if !formats.contains(&FORMAT_VERSION) {
        return Err(PreflightLineError::Incompatible(formats));
    }
    Ok(version.unwrap_or_else(|| "unknown".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_reasons_travel_by_their_label_and_old_names_still_read() {
        for reason in StopReason::ALL {
            let text = serde_json::to_string(&reason).unwrap();
            assert_eq!(text, format!("\"{}\"", reason.label()));
            assert_eq!(serde_json::from_str::<StopReason>(&text).unwrap(), reason);
        }
        // What images before the labels were one name handed over.
        let old = |s: &str| serde_json::from_str::<StopReason>(s).unwrap();
        assert_eq!(old("\"lifetime\""), StopReason::Lifetime);
        assert_eq!(old("\"memory\""), StopReason::Memory);
    }

    fn state() -> State {
        State {
            from_version: "0.1.0 (dev)".into(),
            instance: "demo".into(),
            generation: 3,
            target: 4,
            listeners: vec![ListenerState {
                fd: 7,
                name: "web".into(),
                address: "127.0.0.1:8080".into(),
                owned_path: None,
            }],
            notify: NotifyState {
                fd: 9,
                address: "@drove/1/notify-1".into(),
            },
            workers: vec![WorkerState {
                pid: 1234,
                slot: 0,
                generation: 3,
                state: PoolWorkerState::Ready,
                age_ms: 5000,
                ready_age_ms: Some(4900),
                last_ping_age_ms: 100,
                stop: None,
                killed: false,
                status_text: Some("serving".into()),
                recycle_in_ms: None,
                watchdog_usec: None,
            }],
            counters: Counters {
                spawned: 5,
                exited: 1,
                failed_starts: 0,
                reloads: 2,
                upgrades: 1,
            },
            uptime_ms: 60_000,
            consecutive_failures: 0,
            resume: Resume::Stopping { fast: false },
            template: Some(TemplateHandover {
                pid: 4321,
                generation: 3,
                fd: 9,
                age_ms: 1000,
            }),
            socket_activated: true,
            event_counts: BTreeMap::from([("reloads{result=applied}".into(), 2)]),
        }
    }

    #[test]
    fn reads_what_the_previous_binary_wrote() {
        // Format 1 as written before worker states were typed and before
        // `resume` existed: plain strings, and no lifecycle.
        let json = r#"{"from_version":"0.1.0","instance":"demo","generation":3,"target":4,
            "listeners":[],"notify":{"fd":9,"address":"@drove/1/notify-1"},
            "workers":[{"pid":1234,"slot":0,"generation":3,"state":"stopping","age_ms":5000,
              "ready_age_ms":4900,"last_ping_age_ms":100,"stop":["scale-down",10],
              "killed":false,"status_text":null,"recycle_in_ms":null}],
            "counters":{"spawned":5,"exited":1,"failed_starts":0,"reloads":2,"upgrades":1},
            "uptime_ms":60000,"consecutive_failures":0}"#;
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
        bytes.extend_from_slice(json.as_bytes());
        let s = decode(&bytes).unwrap();
        assert_eq!(s.resume, Resume::Running);
        assert!(!s.socket_activated);
        assert!(s.event_counts.is_empty());
        assert_eq!(s.workers[0].state, PoolWorkerState::Stopping);
        assert_eq!(s.workers[0].stop, Some((StopReason::ScaleDown, 10)));
        // And what this binary writes reads the same way in the old one's
        // terms: the same strings.
        let text = String::from_utf8(encode(&state())[16..].to_vec()).unwrap();
        assert!(text.contains(r#""state":"ready""#), "{text}");
    }

    #[test]
    fn round_trip() {
        let s = state();
        assert_eq!(decode(&encode(&s)).unwrap(), s);
    }

    #[test]
    fn version_mismatch_and_truncation_and_garbage() {
        let mut bytes = encode(&state());
        bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
        assert_eq!(
            decode(&bytes),
            Err(HandoverError::Version {
                found: 99,
                supported: vec![1]
            })
        );

        let bytes = encode(&state());
        for cut in [0, 5, 15, 16, bytes.len() - 1] {
            assert!(
                matches!(decode(&bytes[..cut]), Err(HandoverError::Truncated(_))),
                "cut at {cut}"
            );
        }
        let mut bytes = encode(&state());
        bytes[0] = b'X';
        assert_eq!(decode(&bytes), Err(HandoverError::BadMagic));
        let mut bytes = encode(&state());
        let last = bytes.len() - 2;
        bytes[last] = b'#';
        assert!(matches!(decode(&bytes), Err(HandoverError::Malformed(_))));
    }

    #[test]
    fn preflight_lines() {
        assert_eq!(
            check_preflight(&preflight_line()).unwrap(),
            crate::version()
        );
        assert_eq!(
            check_preflight("drove-handover formats=1,2 version=9.9").unwrap(),
            "9.9"
        );
        assert!(
            check_preflight("drove-handover formats=2 version=9.9")
                .unwrap_err()
                .to_string()
                .contains("writes 1")
        );
        assert!(check_preflight("hello").is_err());
    }
}
