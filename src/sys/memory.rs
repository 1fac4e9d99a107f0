//! What a process's memory costs, from /proc/PID/smaps_rollup (proc(5)).
//!
//! RSS counts every page a worker maps, including the ones it shares
//! copy-on-write with its template and siblings, so in template mode each
//! worker looks as big as the whole app. smaps_rollup splits it:
//! - USS (`Private_Clean + Private_Dirty`): the pages only this process
//!   maps, which the kernel frees when it exits. It does not change when a
//!   sibling starts or exits, so it is what `max_rss` compares (plus the
//!   swapped-out share, `SwapPss`, so that a leak cannot hide in swap).
//! - PSS: each page divided by the number of processes mapping it; summed
//!   over the pool (templates included) it is the pool's real footprint.
//!
//! Reading it walks the page tables (about 7 ms for a 130 MB worker on a
//! loaded 2-core machine), so callers read it sparingly. Opening it needs
//! ptrace read access (PTRACE_MODE_READ_FSCREDS); droved under the packaged
//! unit is root without CAP_SYS_PTRACE, which is enough only for processes
//! whose uids and gids equal its file-system ids, so it takes the worker's
//! for the `open` (setfsuid/setfsgid act on the calling thread only).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::unistd::{Pid, geteuid};
use tracing::warn;

/// One process's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Memory {
    pub rss: u64,
    /// Proportional set size: shared pages divided among their mappers.
    pub pss: u64,
    /// Unique set size: `Private_Clean + Private_Dirty`.
    pub uss: u64,
    /// The process's share of swapped-out pages (`SwapPss`).
    pub swap: u64,
}

impl Memory {
    /// What the process alone holds, in RAM or swap: what `max_rss`
    /// compares.
    pub fn owned(&self) -> u64 {
        self.uss + self.swap
    }
}

/// Parses /proc/PID/smaps_rollup: `Name:   123 kB` lines after the
/// `[rollup]` header. `None` if a field drove needs is missing.
pub fn parse_smaps_rollup(text: &str) -> Option<Memory> {
    let (mut rss, mut pss, mut clean, mut dirty, mut swap) = (None, None, None, None, None);
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match name {
            "Rss" => &mut rss,
            "Pss" => &mut pss,
            "Private_Clean" => &mut clean,
            "Private_Dirty" => &mut dirty,
            "SwapPss" => &mut swap,
            _ => continue,
        };
        *slot = Some(parse_kb(value)?);
    }
    Some(Memory {
        rss: rss?,
        pss: pss?,
        uss: clean? + dirty?,
        // Kernels before 4.14 lack smaps_rollup; SwapPss came with 4.3.
        swap: swap.unwrap_or(0),
    })
}

/// A cheap upper bound on [`Memory::owned`], from /proc/PID/status:
/// `VmRSS + VmSwap`. Reading status does not walk the page tables.
pub fn parse_status_bound(text: &str) -> Option<u64> {
    let field = |want: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(want)?.strip_prefix(':'))
            .and_then(parse_kb)
    };
    Some(field("VmRSS")? + field("VmSwap").unwrap_or(0))
}

fn parse_kb(value: &str) -> Option<u64> {
    let n: u64 = value.trim().strip_suffix("kB")?.trim().parse().ok()?;
    n.checked_mul(1024)
}

/// Reads `pid`'s smaps_rollup. Denied and root, it opens the file again
/// with the process's uid and gid as this thread's file-system ids.
pub fn read(pid: Pid) -> io::Result<Memory> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = match std::fs::read_to_string(&path) {
        Err(e) if denied(&e) && geteuid().is_root() => read_as_owner(pid, &path),
        other => other,
    }
    .inspect_err(|e| {
        if denied(e) {
            warn_once(pid, e)
        }
    })?;
    parse_smaps_rollup(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("malformed {path}")))
}

/// Readings older than this leave the cache of [`read_cached`].
const CACHE_FOR: Duration = Duration::from_secs(120);

/// How often the cache of [`read_cached`] drops the readings older than
/// [`CACHE_FOR`]: that scans the whole cache, and one scrape calls
/// `read_cached` once per worker (a scan per call made a scrape of 1,024
/// workers quadratic).
const PRUNE_EVERY: Duration = Duration::from_secs(10);

static CACHE: Mutex<Option<ReadingCache>> = Mutex::new(None);

/// The readings of [`read_cached`], by pid. Pure.
#[derive(Debug, Default)]
struct ReadingCache {
    readings: HashMap<Pid, (Instant, Memory)>,
    pruned: Option<Instant>,
    /// Scans of the whole cache so far.
    prunes: u64,
}

impl ReadingCache {
    /// `pid`'s reading if younger than `max_age` at `now`; drops the old
    /// readings first if a prune is due.
    fn get(&mut self, pid: Pid, now: Instant, max_age: Duration) -> Option<Memory> {
        if self
            .pruned
            .is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY)
        {
            self.readings
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < CACHE_FOR);
            self.pruned = Some(now);
            self.prunes += 1;
        }
        self.readings
            .get(&pid)
            .filter(|(at, _)| now.saturating_duration_since(*at) < max_age)
            .map(|&(_, m)| m)
    }

    fn insert(&mut self, pid: Pid, now: Instant, m: Memory) {
        self.readings.insert(pid, (now, m));
    }
}

/// [`read`], reusing a reading younger than `max_age`: for the readers
/// anyone may trigger (`ListMemory` on D-Bus, a metrics scrape), so that
/// asking often does not make droved walk page tables often.
pub fn read_cached(pid: Pid, max_age: Duration) -> io::Result<Memory> {
    let now = Instant::now();
    let cached = CACHE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_default()
        .get(pid, now, max_age);
    if let Some(m) = cached {
        return Ok(m);
    }
    let m = read(pid)?;
    CACHE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_default()
        .insert(pid, now, m);
    Ok(m)
}

/// The upper bound of [`parse_status_bound`] for `pid`.
pub fn owned_bound(pid: Pid) -> io::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path)?;
    parse_status_bound(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("malformed {path}")))
}

fn denied(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied
}

/// The ptrace check passes when the caller's fsuid/fsgid equal the
/// target's real, effective and saved ids (see `sys::owner`).
fn read_as_owner(pid: Pid, path: &str) -> io::Result<String> {
    // The check happens at open; reading uses the mm it pinned.
    let opened = super::owner::as_owner_of(pid, || std::fs::File::open(path))?;
    io::read_to_string(opened)
}

static WARNED: AtomicBool = AtomicBool::new(false);

fn warn_once(pid: Pid, e: &io::Error) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        warn!(
            event = "memory",
            "cannot read /proc/{pid}/smaps_rollup ({e}): droved needs ptrace read access to its workers (same uid, or CAP_SYS_PTRACE); until it has it, max_rss compares RSS and `drovectl list` and the metrics leave out PSS and USS (said once)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker forked from a template holding ~140 MB (Linux 6.18).
    const FORKED: &str = "\
560a84980000-7ffd0985e000 ---p 00000000 00:00 0                          [rollup]
Rss:              145180 kB
Pss:               73733 kB
Pss_Dirty:         72568 kB
Pss_Anon:          72568 kB
Pss_File:           1165 kB
Pss_Shmem:             0 kB
Shared_Clean:       3072 kB
Shared_Dirty:     139080 kB
Private_Clean:         4 kB
Private_Dirty:      3028 kB
Referenced:         6500 kB
Anonymous:        142108 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                 64 kB
SwapPss:              32 kB
Locked:                0 kB
";

    #[test]
    fn parses_smaps_rollup() {
        let m = parse_smaps_rollup(FORKED).unwrap();
        assert_eq!(
            m,
            Memory {
                rss: 145180 << 10,
                pss: 73733 << 10,
                uss: 3032 << 10,
                swap: 32 << 10,
            }
        );
        assert_eq!(m.owned(), (3032 + 32) << 10);
    }

    #[test]
    fn older_kernels_without_swap_pss_count_no_swap() {
        let text = FORKED.replace("SwapPss:              32 kB\n", "");
        assert_eq!(parse_smaps_rollup(&text).unwrap().swap, 0);
    }

    #[test]
    fn missing_or_garbled_fields_are_not_guessed() {
        let text = FORKED.replace("Private_Dirty:      3028 kB\n", "");
        assert_eq!(parse_smaps_rollup(&text), None);
        let text = FORKED.replace("Pss:               73733 kB", "Pss: lots");
        assert_eq!(parse_smaps_rollup(&text), None);
        assert_eq!(parse_smaps_rollup(""), None);
    }

    #[test]
    fn status_bound_is_rss_plus_swap() {
        let status = "Name:\tpython3\nVmPeak:\t  200000 kB\nVmRSS:\t  145180 kB\nRssAnon:\t  142108 kB\nVmSwap:\t      64 kB\n";
        assert_eq!(parse_status_bound(status), Some((145180 + 64) << 10));
        // Kernel threads have no VmRSS.
        assert_eq!(parse_status_bound("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn cached_readings_are_reused_within_their_age() {
        let me = Pid::this();
        let first = read_cached(me, Duration::from_secs(60)).unwrap();
        let _grow = vec![1u8; 8 << 20];
        assert_eq!(read_cached(me, Duration::from_secs(60)).unwrap(), first);
        assert_ne!(read_cached(me, Duration::ZERO).unwrap(), first);
    }

    #[test]
    fn reading_cache_keeps_ages_and_prunes_once_per_interval() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let m = |n| Memory {
            rss: n,
            ..Memory::default()
        };
        let mut cache = ReadingCache::default();
        for pid in 1..=1000 {
            assert_eq!(cache.get(Pid::from_raw(pid), t0, s(30)), None);
            cache.insert(Pid::from_raw(pid), t0, m(pid as u64));
        }
        assert_eq!(cache.prunes, 1, "one scan for a thousand readers at once");
        // Within max_age: the reading; past it: none, for that caller only.
        assert_eq!(cache.get(Pid::from_raw(7), t0 + s(5), s(30)), Some(m(7)));
        assert_eq!(cache.get(Pid::from_raw(7), t0 + s(5), s(1)), None);
        assert_eq!(cache.get(Pid::from_raw(7), t0 + s(5), Duration::ZERO), None);
        // Old readings leave at the next prune after CACHE_FOR.
        cache.insert(Pid::from_raw(5000), t0 + CACHE_FOR, m(1));
        assert_eq!(cache.get(Pid::from_raw(7), t0 + CACHE_FOR, s(1000)), None);
        assert_eq!(cache.readings.len(), 1, "only the fresh reading stays");
        assert_eq!(
            cache.get(Pid::from_raw(5000), t0 + CACHE_FOR, s(30)),
            Some(m(1))
        );
    }

    #[test]
    fn reads_its_own() {
        let m = read(Pid::this()).unwrap();
        assert!(m.rss > 0 && m.pss > 0 && m.uss > 0, "{m:?}");
        assert!(m.uss <= m.pss && m.pss <= m.rss, "{m:?}");
        let bound = owned_bound(Pid::this()).unwrap();
        assert!(bound > 0);
    }
}
