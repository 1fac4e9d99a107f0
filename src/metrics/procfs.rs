// SPDX-License-Identifier: MIT OR Apache-2.0
//! What a scrape reads from /proc (proc(5)): the netns-wide TCP listen
//! overflow counters, droved's RSS, and its workers' RSS and CPU time.
//! Run on a blocking-pool thread, never on the supervisor's.

use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::resource::{UsageWho, getrusage};
use nix::unistd::Pid;

use crate::sys::process;

/// TcpExt counters of droved's network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Netstat {
    pub listen_overflows: u64,
    pub listen_drops: u64,
}

/// One scrape's readings; `None` where /proc could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct Readings {
    pub netstat: Option<Netstat>,
    pub own_rss: Option<u64>,
    pub workers_rss: u64,
    pub workers_cpu_seconds: f64,
}

/// Parses /proc/net/netstat: pairs of lines, names then values, per
/// prefix (`TcpExt:`).
pub fn parse_netstat(text: &str) -> Option<Netstat> {
    let mut lines = text.lines();
    while let Some(names) = lines.next() {
        let values = lines.next()?;
        let (Some(names), Some(values)) = (
            names.strip_prefix("TcpExt:"),
            values.strip_prefix("TcpExt:"),
        ) else {
            continue;
        };
        let field = |want: &str| {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == want)
                .and_then(|(_, v)| v.parse().ok())
        };
        return Some(Netstat {
            listen_overflows: field("ListenOverflows")?,
            listen_drops: field("ListenDrops")?,
        });
    }
    None
}

/// Reads everything a scrape shows from /proc. `cpu_floor` holds the last
/// CPU total reported (as f64 bits): the total is the reaped children's
/// rusage plus the living workers' /proc times, and a worker reaped
/// between the two reads would count twice and then drop out; the floor
/// keeps the counter from going backwards.
pub fn read(worker_pids: &[i32], cpu_floor: &AtomicU64) -> Readings {
    let netstat = std::fs::read_to_string("/proc/net/netstat")
        .ok()
        .and_then(|t| parse_netstat(&t));
    let own_rss = process::rss_bytes(Pid::this()).ok();
    let mut workers_rss = 0;
    let mut cpu = 0.0;
    for &pid in worker_pids {
        let pid = Pid::from_raw(pid);
        workers_rss += process::rss_bytes(pid).unwrap_or(0);
        cpu += process::cpu_time(pid).map_or(0.0, |d| d.as_secs_f64());
    }
    if let Ok(u) = getrusage(UsageWho::RUSAGE_CHILDREN) {
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        cpu += secs(u.user_time()) + secs(u.system_time());
    }
    let floor = f64::from_bits(cpu_floor.load(Ordering::Relaxed));
    let cpu = cpu.max(floor);
    cpu_floor.fetch_max(cpu.to_bits(), Ordering::Relaxed);
    Readings {
        netstat,
        own_rss,
        workers_rss,
        workers_cpu_seconds: cpu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_netstat() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPHPHits\n\
                    TcpExt: 0 17 19 4\n\
                    IpExt: InNoRoutes\n\
                    IpExt: 0\n";
        assert_eq!(
            parse_netstat(text),
            Some(Netstat {
                listen_overflows: 17,
                listen_drops: 19
            })
        );
        assert_eq!(parse_netstat("IpExt: A\nIpExt: 1\n"), None);
        assert_eq!(parse_netstat("TcpExt: ListenOverflows\n"), None);
        assert_eq!(parse_netstat(""), None);
    }

    #[test]
    fn reads_this_machine() {
        let floor = AtomicU64::new(0);
        let r = read(&[std::process::id() as i32], &floor);
        assert!(r.netstat.is_some(), "/proc/net/netstat has TcpExt");
        assert!(r.own_rss.unwrap() > 0);
        assert!(r.workers_rss > 0);
        // Never backwards, even when the readings are.
        floor.store(1e9f64.to_bits(), Ordering::Relaxed);
        assert_eq!(read(&[], &floor).workers_cpu_seconds, 1e9);
    }
}
