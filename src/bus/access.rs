//! Who may call mutating methods, and what droved says about those who
//! may not.
//!
//! Allowed: uid 0, the uid droved runs as, and the members of
//! `control.group` by the account database (see [`users::is_member`]).
//!
//! Anyone on the bus can call, as often as they like, so a denial must cost
//! droved next to nothing: group membership is cached per uid for
//! [`MEMBERSHIP_TTL`] (NSS may be slow: LDAP, sssd), one lookup at a time,
//! on a blocking thread, never on the supervisor's; and denials are logged
//! once per caller uid per [`DENIAL_WINDOW`], with a count of the rest, so
//! a flood cannot push droved's own messages out of journald's rate limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Uid};
use tracing::warn;

use super::BusError;
use crate::sys::users;

/// How long a group membership answer (or lookup failure) is reused.
pub const MEMBERSHIP_TTL: Duration = Duration::from_secs(5);
/// At most one denial line per caller uid per window (plus a count).
pub const DENIAL_WINDOW: Duration = Duration::from_secs(10);
/// How long one membership lookup may take before the call is denied.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Cached uids beyond which expired entries are dropped.
const MAX_CACHED: usize = 1024;

/// Why a caller may mutate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// uid 0 or droved's own uid.
    Root,
    /// A member of control.group.
    Group,
}

/// The access check shared by every method call (cheap to clone).
#[derive(Debug, Clone)]
pub struct Access {
    pub group: Option<String>,
    pub own_uid: u32,
    membership: Arc<tokio::sync::Mutex<Membership>>,
    denials: Arc<Mutex<Denials>>,
}

impl Access {
    pub fn new(group: Option<String>) -> Access {
        Access {
            group,
            own_uid: nix::unistd::geteuid().as_raw(),
            membership: Arc::new(tokio::sync::Mutex::new(Membership::default())),
            denials: Arc::new(Mutex::new(Denials::new(DENIAL_WINDOW))),
        }
    }

    /// Whether `uid` may mutate, and as whom; the error says why not.
    pub async fn check(&self, uid: u32, action: &str) -> Result<Grant, BusError> {
        if uid == 0 || uid == self.own_uid {
            return Ok(Grant::Root);
        }
        let Some(group) = self.group.clone() else {
            return Err(BusError::AccessDenied(format!(
                "access denied: {action} needs root (uid {uid} is not root, and no control.group is configured)"
            )));
        };
        match self.is_member(uid, &group).await {
            Ok(true) => Ok(Grant::Group),
            Ok(false) => Err(BusError::AccessDenied(format!(
                "access denied: {action} needs root or membership in group {group:?}; uid {uid} is neither"
            ))),
            Err(e) => Err(BusError::AccessDenied(format!(
                "access denied: {action}: cannot check membership of uid {uid} in group {group:?}: {e}"
            ))),
        }
    }

    /// Membership from the cache, or one lookup on a blocking thread while
    /// other callers wait for its answer instead of starting their own.
    async fn is_member(&self, uid: u32, group: &str) -> Result<bool, String> {
        let mut cache = self.membership.lock().await;
        let now = Instant::now();
        if let Some(answer) = cache.get(uid, now) {
            return answer;
        }
        let g = group.to_string();
        let gid = cache.gid.clone().filter(|(_, at)| fresh(*at, now));
        let lookup = tokio::task::spawn_blocking(move || {
            let gid = match gid {
                Some((gid, _)) => gid,
                None => users::lookup_group(&g).map_err(|e| e.to_string()),
            };
            let member = gid.clone().and_then(|gid| {
                users::is_member(Uid::from_raw(uid), gid).map_err(|e| e.to_string())
            });
            (gid, member)
        });
        // A hung NSS backend must not hold every later caller forever:
        // give up, and remember the failure like any other answer.
        let (gid, member) = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                let msg = format!("lookup failed: {e}");
                (Err(msg.clone()), Err(msg))
            }
            Err(_) => {
                let msg = format!("the account database did not answer within {LOOKUP_TIMEOUT:?}");
                (Err(msg.clone()), Err(msg))
            }
        };
        let now = Instant::now();
        cache.gid = Some((gid, now));
        cache.put(uid, member.clone(), now);
        member
    }

    /// Logs a denial, or counts it toward the next line for that uid.
    pub fn log_denied(&self, uid: u32, sender: &str, action: &str) {
        let line = self
            .denials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(uid, &format!("{action} ({sender})"), Instant::now());
        if let Some(line) = line {
            warn!(event = "control-denied", uid, "{line}");
        }
    }

    /// Logs the counts of denials not yet reported whose window has ended
    /// (called every [`DENIAL_WINDOW`]).
    pub fn flush_denials(&self) {
        let lines = self
            .denials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush(Instant::now());
        for (uid, line) in lines {
            warn!(event = "control-denied", uid, "{line}");
        }
    }
}

fn fresh(at: Instant, now: Instant) -> bool {
    now.saturating_duration_since(at) < MEMBERSHIP_TTL
}

type Answer = Result<bool, String>;

/// Cached answers of the account database.
#[derive(Debug, Default)]
struct Membership {
    gid: Option<(Result<Gid, String>, Instant)>,
    members: HashMap<u32, (Answer, Instant)>,
}

impl Membership {
    fn get(&self, uid: u32, now: Instant) -> Option<Answer> {
        self.members
            .get(&uid)
            .filter(|(_, at)| fresh(*at, now))
            .map(|(a, _)| a.clone())
    }

    fn put(&mut self, uid: u32, answer: Answer, now: Instant) {
        if self.members.len() >= MAX_CACHED {
            self.members.retain(|_, (_, at)| fresh(*at, now));
        }
        self.members.insert(uid, (answer, now));
    }
}

/// Per-uid denial accounting (pure: the caller logs what it returns).
#[derive(Debug)]
pub struct Denials {
    window: Duration,
    per_uid: HashMap<u32, Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    /// Denials since the last line for this uid.
    unreported: u64,
    /// The last of them, for the summary.
    last: String,
}

impl Denials {
    pub fn new(window: Duration) -> Denials {
        Denials {
            window,
            per_uid: HashMap::new(),
        }
    }

    /// A denial of `what` for `uid` at `now`: the line to log, if any.
    pub fn record(&mut self, uid: u32, what: &str, now: Instant) -> Option<String> {
        let window = self.window;
        match self.per_uid.get_mut(&uid) {
            Some(w) if now.saturating_duration_since(w.started) < window => {
                w.unreported += 1;
                w.last = what.to_string();
                None
            }
            Some(w) => {
                let before = std::mem::take(&mut w.unreported);
                w.started = now;
                w.last.clear();
                Some(if before > 0 {
                    format!(
                        "{what} by uid {uid} denied ({before} more denied before it since the last report)"
                    )
                } else {
                    format!("{what} by uid {uid} denied")
                })
            }
            None => {
                if self.per_uid.len() >= MAX_CACHED {
                    self.per_uid.retain(|_, w| {
                        w.unreported > 0 || now.saturating_duration_since(w.started) < window
                    });
                }
                self.per_uid.insert(
                    uid,
                    Window {
                        started: now,
                        unreported: 0,
                        last: String::new(),
                    },
                );
                Some(format!(
                    "{what} by uid {uid} denied (further denials for uid {uid} are counted and reported at most every {}s)",
                    window.as_secs()
                ))
            }
        }
    }

    /// Summaries for uids whose window ended with denials unreported; uids
    /// quiet for a whole window are forgotten (their next denial is logged
    /// at once).
    pub fn flush(&mut self, now: Instant) -> Vec<(u32, String)> {
        let window = self.window;
        let mut out = Vec::new();
        self.per_uid.retain(|&uid, w| {
            if now.saturating_duration_since(w.started) < window {
                return true;
            }
            if w.unreported == 0 {
                return false;
            }
            out.push((
                uid,
                format!(
                    "{} more calls by uid {uid} denied in the last {}s (the last: {})",
                    w.unreported,
                    now.saturating_duration_since(w.started).as_secs(),
                    w.last
                ),
            ));
            w.unreported = 0;
            w.started = now;
            true
        });
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(10);

    #[test]
    fn one_line_per_uid_per_window_with_a_count() {
        let t0 = Instant::now();
        let mut d = Denials::new(W);
        let first = d.record(65534, "Scale(3)", t0).unwrap();
        assert_eq!(
            first,
            "Scale(3) by uid 65534 denied (further denials for uid 65534 are counted and reported at most every 10s)"
        );
        // Another uid has its own line.
        assert!(d.record(1000, "Reload", t0).is_some());
        for i in 1..=9999 {
            let at = t0 + Duration::from_micros(i * 500);
            assert_eq!(d.record(65534, "Scale(3)", at), None);
        }
        // Within the window: nothing to flush yet.
        assert!(d.flush(t0 + Duration::from_secs(9)).is_empty());
        // The window ended: one summary with the count and the last call.
        let flushed = d.flush(t0 + W);
        assert_eq!(
            flushed,
            [(
                65534,
                "9999 more calls by uid 65534 denied in the last 10s (the last: Scale(3))"
                    .to_string()
            )]
        );
        // uid 1000 was quiet for a window: forgotten, logged at once again.
        assert!(
            d.record(1000, "Reload", t0 + W)
                .unwrap()
                .contains("further denials")
        );
        // 65534's new window began at the flush: counted again.
        assert_eq!(d.record(65534, "Upgrade", t0 + W + W / 2), None);
        let line = d.record(65534, "Upgrade", t0 + 3 * W).unwrap();
        assert_eq!(
            line,
            "Upgrade by uid 65534 denied (1 more denied before it since the last report)"
        );
    }

    #[test]
    fn membership_answers_expire() {
        let t0 = Instant::now();
        let mut m = Membership::default();
        assert_eq!(m.get(5, t0), None);
        m.put(5, Ok(true), t0);
        assert_eq!(m.get(5, t0 + MEMBERSHIP_TTL / 2), Some(Ok(true)));
        assert_eq!(m.get(5, t0 + MEMBERSHIP_TTL), None);
        m.put(6, Err("ldap down".into()), t0);
        assert_eq!(m.get(6, t0), Some(Err("ldap down".into())));
    }
}
