//! Signals to and exit statuses of worker processes, reaping, and /proc
//! readings.
//!
//! Reaping: droved waits for every child it has, known or not (as PID 1 of a
//! container, or as a subreaper, orphans of whole process trees come to it).
//! One sweep ([`reap_next`]) takes exited children in the kernel's order;
//! the few places that wait for a particular child themselves hold it
//! ([`fork_held`]) so the sweep cannot steal its status.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(Signal, bool),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "status {code}"),
            ExitStatus::Signaled(sig, core) => {
                write!(f, "signal {}", sig.as_str())?;
                if *core {
                    write!(f, " (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

/// Reaps `pid` if it has exited; `Ok(None)` while it runs.
pub fn try_reap(pid: Pid) -> io::Result<Option<ExitStatus>> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(Some(ExitStatus::Exited(code))),
            Ok(WaitStatus::Signaled(_, sig, core)) => {
                return Ok(Some(ExitStatus::Signaled(sig, core)));
            }
            Ok(_) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Makes droved the parent of orphans in its process subtree
/// (PR_SET_CHILD_SUBREAPER): a template's double-forked workers become
/// droved's children, reaped and signalled like exec'd ones.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Whether this process is PID 1 of its PID namespace (a container's
/// entrypoint): orphans of the whole namespace come to it, and the kernel
/// drops any signal it has no handler for.
pub fn is_namespace_init() -> bool {
    nix::unistd::getpid().as_raw() == 1
}

/// Children whose exit status some code waits for by pid itself: a fork
/// whose exec is not yet confirmed (sys::spawn), the upgrade's preflight
/// (tokio's Command). [`reap_next`] leaves them alone: reaping one would
/// hand its waiter ECHILD instead of the status.
static WAITED_ELSEWHERE: Mutex<Vec<Pid>> = Mutex::new(Vec::new());

fn waited_elsewhere() -> std::sync::MutexGuard<'static, Vec<Pid>> {
    // The list stays consistent even if a holder panicked: it only pushes
    // and removes pids.
    WAITED_ELSEWHERE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A child kept out of droved's reaping sweep while it lives; dropping it
/// hands the child (or a zombie its waiter left) back to the sweep.
#[derive(Debug)]
pub struct Held(Pid);

impl Held {
    pub fn pid(&self) -> Pid {
        self.0
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut list = waited_elsewhere();
        if let Some(i) = list.iter().position(|p| *p == self.0) {
            list.swap_remove(i);
        }
    }
}

/// Runs `fork`, which creates one child that its caller will wait for by
/// pid (`pid_of` names it), and keeps that child out of the sweep until
/// the returned [`Held`] drops. The sweep cannot run in between: the list's
/// lock is held across the fork.
pub fn fork_held<T>(
    fork: impl FnOnce() -> io::Result<T>,
    pid_of: impl FnOnce(&T) -> Option<Pid>,
) -> io::Result<(T, Option<Held>)> {
    let mut list = waited_elsewhere();
    let child = fork()?;
    let held = pid_of(&child).map(|pid| {
        list.push(pid);
        Held(pid)
    });
    Ok((child, held))
}

/// What [`reap_next`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    /// A child exited and is reaped now; its session as it was a zombie
    /// (`None` if /proc could not tell).
    Child(Pid, ExitStatus, Option<Pid>),
    /// The next exited child is waited for elsewhere; `waitid(P_ALL)` sees
    /// no further while it is there ([`reap_unheld`] looks past it).
    Held(Pid),
    /// No child has exited (or there are none).
    Nothing,
}

/// Reaps one exited child, whichever it is (known worker or orphan), except
/// those [`Held`] for another waiter: peeks with
/// `waitid(P_ALL, WEXITED|WNOHANG|WNOWAIT)`, then reaps that pid.
pub fn reap_next() -> io::Result<Reaped> {
    let held = waited_elsewhere();
    let Some(pid) = exited_child()? else {
        return Ok(Reaped::Nothing);
    };
    if held.contains(&pid) {
        return Ok(Reaped::Held(pid));
    }
    // Read while it is a zombie: the session tells whose fork it was.
    let session = stat(pid).ok().map(|s| s.session);
    Ok(match try_reap(pid)? {
        Some(status) => Reaped::Child(pid, status, session),
        None => Reaped::Nothing,
    })
}

/// Reaps every exited child except the [`Held`] ones, child by child from
/// /proc/self/task/*/children: the slow way past a held zombie that blocks
/// [`reap_next`].
pub fn reap_unheld() -> io::Result<Vec<(Pid, ExitStatus, Option<Pid>)>> {
    let held = waited_elsewhere();
    let mut out = Vec::new();
    for pid in own_children()? {
        if held.contains(&pid) {
            continue;
        }
        // Only zombies, whose session is read before they go; one that
        // exits after this look is taken by the next sweep (its SIGCHLD).
        let Ok(zombie) = stat(pid) else { continue };
        if zombie.state != 'Z' {
            continue;
        }
        // ECHILD (reaped meanwhile): nothing to take.
        if let Ok(Some(status)) = try_reap(pid) {
            out.push((pid, status, Some(zombie.session)));
        }
    }
    Ok(out)
}

/// Whether `pid` is a child some other code waits for (an unconfirmed
/// fork, the upgrade's preflight): never a worker, never to be signalled.
pub fn is_held(pid: Pid) -> bool {
    waited_elsewhere().contains(&pid)
}

/// The pid of some exited child not yet reaped, without reaping it
/// (`waitid(P_ALL, WEXITED|WNOHANG|WNOWAIT)`); `None` when none has exited.
fn exited_child() -> io::Result<Option<Pid>> {
    use nix::sys::wait::{Id, waitid};
    loop {
        match waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) => {
                return Ok(Some(pid));
            }
            Ok(_) | Err(nix::errno::Errno::ECHILD) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Where a process stands in the process tree, from /proc/PID/stat (a
/// zombie's too, until it is reaped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `Z`, ... (proc(5)).
    pub state: char,
    pub parent: Pid,
    /// The session: every process droved spawns starts one (setsid), and
    /// only the leader's forks are in it, so the session id tells whose
    /// fork a process is. A pid stays allocated while its session has a
    /// member, so the id cannot name a later process.
    pub session: Pid,
    /// When it started, since boot (CLOCK_BOOTTIME, in whole clock
    /// ticks: see [`clock_tick`]).
    pub started: Duration,
}

/// `pid`'s [`Stat`].
pub fn stat(pid: Pid) -> io::Result<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed /proc/{pid}/stat"),
        )
    })
}

/// Parses /proc/PID/stat: after the ")" that ends comm come state, ppid,
/// pgrp, session. Pure.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let mut pid = || fields.next()?.parse().ok().map(Pid::from_raw);
    let parent = pid()?;
    let _group = pid()?;
    let session = pid()?;
    // tty_nr .. itrealvalue, then starttime (field 22).
    let ticks: u64 = fields.nth(15)?.parse().ok()?;
    Some(Stat {
        state,
        parent,
        session,
        started: clock_tick() * u32::try_from(ticks).ok()?,
    })
}

/// The unit of /proc's process times (USER_HZ).
pub fn clock_tick() -> Duration {
    Duration::from_secs(1) / clock_ticks() as u32
}

/// Time since boot, on the clock of [`Stat::started`].
pub fn since_boot() -> io::Result<Duration> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)?;
    Ok(Duration::from(t))
}

/// droved's own children, from /proc/self/task/*/children.
pub fn own_children() -> io::Result<Vec<Pid>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task")? {
        let path = task?.path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|s| s.parse().ok())
                    .map(Pid::from_raw),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// A process droved may signal: a pidfd (pidfd_open(2)), which names that
/// process and never a later one that reuses its pid. Taken while the
/// process is droved's unreaped child, when its pid surely still names it.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// Opens `pid`, which must be droved's own child, not yet reaped and
    /// not [held](is_held) for another waiter (it could be reaped under
    /// us). Checked after the open: a pidfd of any other process is
    /// refused.
    pub fn open_child(pid: Pid) -> io::Result<PidFd> {
        if is_held(pid) {
            return Err(io::Error::other(format!("{pid} is waited for elsewhere")));
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd (or
        // -1); no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("pidfd_open({pid}): {e}")));
        }
        // SAFETY: the fd was just returned to us and nothing else owns it
        // (pidfd_open sets O_CLOEXEC itself).
        let pidfd = PidFd(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        // The open named whoever had `pid` then; if that is our child now,
        // it was then too (only droved reaps its unheld children).
        let parent = stat(pid)?.parent;
        if parent != nix::unistd::getpid() {
            return Err(io::Error::other(format!(
                "{pid} is not droved's child (its parent is {parent})"
            )));
        }
        Ok(pidfd)
    }

    /// Sends `sig` (pidfd_send_signal(2)); `Ok(false)` when the process
    /// has exited already.
    pub fn send_signal(&self, sig: Signal) -> io::Result<bool> {
        // SAFETY: a valid pidfd, a signal number, no siginfo (NULL: as
        // kill(2)), no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
            e => Err(e),
        }
    }
}

/// The children droved may signal, each by a [`PidFd`] taken when it was
/// spawned, adopted or taken over, and dropped when the sweep reaps it:
/// no signal of droved's can reach a pid it has reaped.
#[derive(Debug, Default)]
pub struct Signallable {
    fds: HashMap<Pid, PidFd>,
}

impl Signallable {
    /// Starts tracking `pid` (see [`PidFd::open_child`] for what it must be).
    pub fn track(&mut self, pid: Pid) -> io::Result<()> {
        let fd = PidFd::open_child(pid)?;
        self.fds.insert(pid, fd);
        Ok(())
    }

    /// `pid` was reaped: never signal it again.
    pub fn reaped(&mut self, pid: Pid) {
        self.fds.remove(&pid);
    }

    pub fn is_tracked(&self, pid: Pid) -> bool {
        self.fds.contains_key(&pid)
    }

    /// Sends `sig` to the tracked child `pid`; a child that has exited (a
    /// zombie not reaped yet) is not an error, an untracked pid is.
    pub fn signal(&self, pid: Pid, sig: Signal) -> io::Result<()> {
        let fd = self.fds.get(&pid).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{pid} is not a live child of droved's; not signalled"),
            )
        })?;
        fd.send_signal(sig).map(|_| ())
    }
}

/// Resident set size of a process in bytes, from /proc/PID/statm.
pub fn rss_bytes(pid: Pid) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed statm"))?;
    Ok(pages * page_size())
}

/// A process's resident set size in bytes and its user+system CPU time,
/// from one read of /proc/PID/stat: `drovectl list` wants both of every
/// worker, and one read instead of two halves its cost on droved's loop.
pub fn usage(pid: Pid) -> io::Result<(u64, Duration)> {
    let path = format!("/proc/{pid}/stat");
    let (pages, ticks) = parse_usage(&std::fs::read_to_string(&path)?)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("malformed {path}")))?;
    let cpu = Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64);
    Ok((pages * page_size(), cpu))
}

/// (RSS in pages, utime + stime in clock ticks) from /proc/PID/stat:
/// after the ")" that ends comm, utime and stime are fields 14 and 15,
/// rss field 24 (proc_pid_stat(5)). Pure.
fn parse_usage(text: &str) -> Option<(u64, u64)> {
    let (_, rest) = text.rsplit_once(')')?;
    // Fields 3.. follow; nth counts from field 3.
    let mut fields = rest.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let rss: u64 = fields.nth(8)?.parse().ok()?;
    Some((rss, utime + stime))
}

/// User+system CPU time consumed by a process, from /proc/PID/stat.
pub fn cpu_time(pid: Pid) -> io::Result<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the ")" that ends comm: state is field 3, utime 14, stime 15.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let total = ticks(11) + ticks(12);
    Ok(Duration::from_secs_f64(total as f64 / clock_ticks() as f64))
}

/// One thread's scheduling record: time on a CPU, time waiting on a run
/// queue for one, how many times it got one, and whether it was runnable
/// (running or queued) when read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadTimes {
    pub tid: i32,
    pub run: Duration,
    pub wait: Duration,
    pub arrivals: u64,
    pub runnable: bool,
}

/// Each thread's scheduling record, from /proc/PID/task/*/schedstat
/// (sched_info; nanosecond precision) and the state in .../stat. Per
/// thread, not summed: a thread that sleeps is time another worker could
/// use, and a sum over threads would hide it.
pub fn sched_times(pid: Pid) -> io::Result<Vec<ThreadTimes>> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let (Ok(sched), Ok(stat)) = (
            std::fs::read_to_string(task.path().join("schedstat")),
            std::fs::read_to_string(task.path().join("stat")),
        ) else {
            continue; // the thread just exited
        };
        let Some(times) = parse_schedstat(tid, &sched, &stat) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed /proc/{pid}/task/{tid}/schedstat or stat: {sched:?}"),
            ));
        };
        threads.push(times);
    }
    Ok(threads)
}

/// Pure: "run wait arrivals" from schedstat, and the state letter after
/// the command name in stat (which may itself hold spaces and parens).
fn parse_schedstat(tid: i32, sched: &str, stat: &str) -> Option<ThreadTimes> {
    let mut fields = sched.split_whitespace().map(|f| f.parse::<u64>().ok());
    let (run, wait, arrivals) = (fields.next()??, fields.next()??, fields.next()??);
    let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
    Some(ThreadTimes {
        tid,
        run: Duration::from_nanos(run),
        wait: Duration::from_nanos(wait),
        arrivals,
        runnable: state == 'R',
    })
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64
}

fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_and_state_are_parsed() {
        let stat = "4242 (a (b) c) R 1 4242 4242 0 -1 4194560";
        let t = parse_schedstat(4242, "1500 2500 7\n", stat).unwrap();
        assert_eq!(
            (t.run, t.wait, t.arrivals, t.runnable),
            (
                Duration::from_nanos(1500),
                Duration::from_nanos(2500),
                7,
                true
            )
        );
        let sleeping = parse_schedstat(1, "1 2 3", "1 (x) S 0").unwrap();
        assert!(!sleeping.runnable);
        assert_eq!(parse_schedstat(1, "1 2", "1 (x) S 0"), None);
        assert_eq!(parse_schedstat(1, "1 2 3", "1 x S 0"), None);
        // This thread, running the test, is runnable.
        let me = sched_times(Pid::this()).unwrap();
        let tid = nix::unistd::gettid().as_raw();
        assert!(me.iter().any(|t| t.tid == tid && t.runnable), "{me:?}");
    }

    #[test]
    fn usage_is_rss_and_cpu_of_one_stat_read() {
        // A command name with spaces and parentheses, as proc(5) allows.
        let text = "42 (a b) c)) S 1 42 42 0 -1 4194560 100 0 0 0 \
                    7 3 0 0 20 0 1 0 1000 2000000 250 18446744073709551615 \
                    1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_usage(text), Some((250, 10)));
        assert_eq!(parse_usage("42 (x) S 1 2"), None);
        // The same numbers as the two reads it replaces.
        let me = Pid::this();
        let _busy: u64 = (0..2_000_000u64).map(|i| i ^ (i >> 3)).sum();
        let (rss, cpu) = usage(me).unwrap();
        let statm = rss_bytes(me).unwrap();
        assert!(
            rss > 0 && rss.abs_diff(statm) < 16 << 20,
            "{rss} vs {statm}"
        );
        let cpu_after = cpu_time(me).unwrap();
        assert!(cpu <= cpu_after, "{cpu:?} then {cpu_after:?}");
    }

    /// Set when this test binary runs one test alone in a fresh process.
    const ISOLATED: &str = "DROVE_TEST_ISOLATED";

    /// Runs test `name` alone in a fresh copy of this test binary: the
    /// sweep waits for any child, so it must not run beside other tests
    /// that wait for theirs.
    fn run_isolated(name: &str) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--test-threads=1", "--nocapture"])
            .env(ISOLATED, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("test result: ok. 1 passed"),
            "{name} in its own process:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn exited(pid: Pid) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
    }

    fn child(code: i32) -> std::process::Child {
        std::process::Command::new("sh")
            .args(["-c", &format!("exit {code}")])
            .spawn()
            .unwrap()
    }

    #[test]
    fn the_sweep_reaps_every_child_but_a_held_one() {
        let name = "sys::process::tests::the_sweep_reaps_every_child_but_a_held_one";
        if std::env::var_os(ISOLATED).is_none() {
            return run_isolated(name);
        }
        // The held child exits first and comes first in the kernel's list:
        // the sweep must look past it.
        let (mut held_child, held) =
            fork_held(|| Ok(child(3)), |c| Some(Pid::from_raw(c.id() as i32))).unwrap();
        let held = held.unwrap();
        let others: Vec<Pid> = (0..3)
            .map(|i| Pid::from_raw(child(10 + i).id() as i32))
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !exited(held.pid()) || !others.iter().all(|p| exited(*p)) {
            assert!(
                std::time::Instant::now() < deadline,
                "children did not exit"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut reaped = Vec::new();
        loop {
            match reap_next().unwrap() {
                Reaped::Child(pid, status, session) => {
                    // Read as a zombie: the session it inherited from us.
                    assert_eq!(session, Some(nix::unistd::getsid(None).unwrap()));
                    reaped.push((pid, status))
                }
                Reaped::Held(pid) => {
                    assert_eq!(pid, held.pid());
                    reaped.extend(reap_unheld().unwrap().into_iter().map(|(p, s, _)| (p, s)));
                    break;
                }
                Reaped::Nothing => break,
            }
        }
        reaped.sort_by_key(|(p, _)| p.as_raw());
        let expected: Vec<_> = others
            .iter()
            .zip(10..)
            .map(|(p, code)| (*p, ExitStatus::Exited(code)))
            .collect();
        assert_eq!(reaped, expected);
        // Its own waiter still gets its status.
        assert_eq!(held_child.wait().unwrap().code(), Some(3));
        drop(held);
        assert_eq!(reap_next().unwrap(), Reaped::Nothing);
    }

    #[test]
    fn stat_fields_after_a_command_name_with_spaces_and_parens() {
        let text = "4242 (a b) c) Z 17 4242 4240 0 -1 4194564 0 0 0 0 3 4 0 0 20 0 1 0 250 0 0";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                state: 'Z',
                parent: Pid::from_raw(17),
                session: Pid::from_raw(4240),
                started: clock_tick() * 250,
            })
        );
        assert_eq!(parse_stat("4242 (x) S 17"), None);
        assert_eq!(parse_stat("4242 (x) S 17 4242 4240 0 -1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_pidfd_signals_its_child_and_nothing_once_that_child_is_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        let mut children = Signallable::default();
        children.track(pid).unwrap();
        let kept = PidFd::open_child(pid).unwrap();
        children.signal(pid, Signal::SIGKILL).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        // Reaped: its pidfd reaches nobody, whoever gets the pid next.
        assert!(!kept.send_signal(Signal::SIGKILL).unwrap());
        children.reaped(pid);
        assert!(!children.is_tracked(pid));
        let err = children.signal(pid, Signal::SIGKILL).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    #[test]
    fn only_an_unheld_child_can_be_tracked() {
        // Not our child: our parent (cargo's test runner or a shell).
        let parent = nix::unistd::getppid();
        let err = PidFd::open_child(parent).unwrap_err();
        assert!(err.to_string().contains("not droved's child"), "{err}");
        // A child some other code waits for (the preflight's case).
        let (mut child, held) = fork_held(
            || std::process::Command::new("sleep").arg("60").spawn(),
            |c| Some(Pid::from_raw(c.id() as i32)),
        )
        .unwrap();
        let held = held.unwrap();
        assert!(is_held(held.pid()));
        let err = PidFd::open_child(held.pid()).unwrap_err();
        assert!(err.to_string().contains("waited for elsewhere"), "{err}");
        child.kill().unwrap();
        child.wait().unwrap();
        drop(held);
    }
}
