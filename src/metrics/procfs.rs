// SPDX-License-Identifier: MIT OR Apache-2.0
//! What a scrape reads from /proc (proc(5)): the netns-wide TCP listen
//! overflow counters, droved's RSS, its workers' RSS and CPU time, and the
//! pool's PSS and USS (workers and templates).
//! Run on a blocking-pool thread, never on the supervisor's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::resource::{UsageWho, getrusage};
use nix::unistd::Pid;

use super::PoolPids;
use crate::sys::{memory, process};

/// How old a process's PSS/USS may be in a scrape: reading smaps_rollup
/// costs ~7 ms per 130 MB process (0.45 s for 64 such workers), too much
/// for every scrape of a large pool; the totals move slowly anyway.
const MEMORY_MAX_AGE: Duration = Duration::from_secs(30);

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
    /// `None` when no process of the pool could be read.
    pub pool_memory: Option<PoolMemory>,
}

/// The summed smaps_rollup of the workers and templates (`sys::memory`):
/// the PSS sum is the pool's real footprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolMemory {
    pub pss: u64,
    pub uss: u64,
}

/// Sums what could be read; processes that exited meanwhile or that
/// droved may not read are left out.
fn pool_memory(pids: &PoolPids) -> Option<PoolMemory> {
    let mut total: Option<PoolMemory> = None;
    for &pid in pids.workers.iter().chain(&pids.templates) {
        let Ok(m) = memory::read_cached(Pid::from_raw(pid), MEMORY_MAX_AGE) else {
            continue;
        };
        let t = total.get_or_insert(PoolMemory { pss: 0, uss: 0 });
        t.pss += m.pss;
        t.uss += m.uss;
    }
    total
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

/// A process's RSS and CPU time, from /proc/PID/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatTimes {
    pub rss_pages: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
}

/// Parses /proc/PID/stat (proc_pid_stat(5)): after the `)` that ends the
/// command name, utime and stime are fields 14 and 15, rss field 24.
pub fn parse_stat(text: &str) -> Option<StatTimes> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // Fields 3.. follow; nth counts from field 3.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let rss: u64 = fields.nth(8)?.parse().ok()?;
    Some(StatTimes {
        rss_pages: rss,
        cpu_ticks: utime + stime,
    })
}

struct Units {
    page_size: u64,
    ticks_per_second: f64,
}

impl Units {
    fn get() -> Units {
        use nix::unistd::{SysconfVar, sysconf};
        let var = |v, default| sysconf(v).ok().flatten().unwrap_or(default);
        Units {
            page_size: var(SysconfVar::PAGE_SIZE, 4096) as u64,
            ticks_per_second: var(SysconfVar::CLK_TCK, 100) as f64,
        }
    }
}

/// Reads everything a scrape shows from /proc. `cpu_floor` holds the last
/// CPU total reported (as f64 bits): the total is the reaped children's
/// rusage plus the living workers' /proc times, and a worker reaped
/// between the two reads would count twice and then drop out; the floor
/// keeps the counter from going backwards.
pub fn read(pids: &PoolPids, cpu_floor: &AtomicU64) -> Readings {
    let netstat = std::fs::read_to_string("/proc/net/netstat")
        .ok()
        .and_then(|t| parse_netstat(&t));
    let own_rss = process::rss_bytes(Pid::this()).ok();
    let units = Units::get();
    let mut workers_rss = 0;
    let mut cpu = 0.0;
    // One read of /proc/PID/stat per worker, into one buffer.
    let mut buf = String::with_capacity(512);
    for &pid in &pids.workers {
        buf.clear();
        let Ok(mut f) = std::fs::File::open(format!("/proc/{pid}/stat")) else {
            continue; // exited meanwhile
        };
        if std::io::Read::read_to_string(&mut f, &mut buf).is_err() {
            continue;
        }
        if let Some(t) = parse_stat(&buf) {
            workers_rss += t.rss_pages * units.page_size;
            cpu += t.cpu_ticks as f64 / units.ticks_per_second;
        }
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
        pool_memory: pool_memory(pids),
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
    fn parses_stat() {
        // A command name with spaces and parentheses, as proc(5) allows.
        let text = "42 (a b) c)) S 1 42 42 0 -1 4194560 100 0 0 0 \
                    7 3 0 0 20 0 1 0 1000 2000000 250 18446744073709551615 \
                    1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(
            parse_stat(text),
            Some(StatTimes {
                rss_pages: 250,
                cpu_ticks: 10
            })
        );
        assert_eq!(parse_stat("42 (x) S 1 2"), None);
        assert_eq!(parse_stat(""), None);
        // The same numbers as the rest of droved reads.
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_stat(&me).unwrap().rss_pages > 0);
    }

    #[test]
    fn reads_this_machine() {
        let floor = AtomicU64::new(0);
        let me = std::process::id() as i32;
        let pids = PoolPids {
            workers: vec![me],
            templates: vec![me],
        };
        let r = read(&pids, &floor);
        assert!(r.netstat.is_some(), "/proc/net/netstat has TcpExt");
        assert!(r.own_rss.unwrap() > 0);
        assert!(r.workers_rss > 0);
        let m = r.pool_memory.unwrap();
        assert!(m.uss > 0 && m.uss <= m.pss, "{m:?}");
        assert_eq!(read(&PoolPids::default(), &floor).pool_memory, None);
        // Never backwards, even when the readings are.
        floor.store(1e9f64.to_bits(), Ordering::Relaxed);
        assert_eq!(read(&PoolPids::default(), &floor).workers_cpu_seconds, 1e9);
    }
}
