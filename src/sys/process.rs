//! Signals to and exit statuses of worker processes, reaping, and /proc
//! readings.
//!
//! Reaping: droved waits for every child it has, known or not (as PID 1 of a
//! container, or as a subreaper, orphans of whole process trees come to it).
//! One sweep ([`reap_next`]) takes exited children in the kernel's order;
//! the few places that wait for a particular child themselves hold it
//! ([`fork_held`]) so the sweep cannot steal its status.

use std::io;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{self, Signal};
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

impl ExitStatus {
    /// `true` for a clean exit (status 0, or killed by the signal we sent).
    pub fn is_clean(&self, stop_signal: Signal) -> bool {
        matches!(self, ExitStatus::Exited(0))
            || matches!(self, ExitStatus::Signaled(s, _) if *s == stop_signal)
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

/// Whether droved is a child subreaper (it stays one across a reload to
/// exec mode and across an upgrade's exec).
pub fn is_subreaper() -> bool {
    nix::sys::prctl::get_child_subreaper().unwrap_or(false)
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
    /// A child exited and is reaped now.
    Child(Pid, ExitStatus),
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
    Ok(match try_reap(pid)? {
        Some(status) => Reaped::Child(pid, status),
        None => Reaped::Nothing,
    })
}

/// Reaps every exited child except the [`Held`] ones, child by child from
/// /proc/self/task/*/children: the slow way past a held zombie that blocks
/// [`reap_next`].
pub fn reap_unheld() -> io::Result<Vec<(Pid, ExitStatus)>> {
    let held = waited_elsewhere();
    let mut out = Vec::new();
    for pid in own_children()? {
        if held.contains(&pid) {
            continue;
        }
        // Running, or ECHILD (reaped meanwhile): nothing to take.
        if let Ok(Some(status)) = try_reap(pid) {
            out.push((pid, status));
        }
    }
    Ok(out)
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

/// The parent pid of `pid`, from /proc/PID/stat.
pub fn parent_pid(pid: Pid) -> io::Result<Pid> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the ")" that ends comm: state, then ppid.
    text.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .map(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed stat"))
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

/// Sends `sig` to `pid`; a process that is already gone is not an error.
pub fn send_signal(pid: Pid, sig: Signal) -> io::Result<()> {
    match signal::kill(pid, sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
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

/// Time a process (all its threads) spent running on a CPU and waiting on
/// a run queue for one, from /proc/PID/task/*/schedstat (sched_info;
/// nanosecond precision).
pub fn sched_times(pid: Pid) -> io::Result<(Duration, Duration)> {
    let (mut run, mut wait) = (0u64, 0u64);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(text) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue; // the thread just exited
        };
        let mut fields = text.split_whitespace().map(|f| f.parse::<u64>());
        match (fields.next(), fields.next()) {
            (Some(Ok(r)), Some(Ok(w))) => {
                run += r;
                wait += w;
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "malformed schedstat",
                ));
            }
        }
    }
    Ok((Duration::from_nanos(run), Duration::from_nanos(wait)))
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

/// Number of open fds of this process (leak checks, status).
pub fn own_fd_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

/// Best guess whether a worker sits idle waiting for a connection (blocked
/// in accept(2) or poll/epoll on its listeners), from /proc/PID/wchan.
/// Used to retire idle workers first when scaling down.
pub fn is_waiting_for_connection(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/wchan"))
        .map(|w| waits_for_connection(&w))
        .unwrap_or(false)
}

/// Whether a kernel wait channel is that of a process waiting for work:
/// in accept(2) on TCP (`inet_csk_accept`), in poll/select/epoll, or in
/// accept(2) on a unix stream socket, which waits in the skb queue
/// (`__skb_wait_for_more_packets`; php-cgi on fd 0 does this). Pure.
pub fn waits_for_connection(wchan: &str) -> bool {
    ["accept", "poll", "select", "skb_wait_for_more_packets"]
        .iter()
        .any(|w| wchan.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_channels_of_idle_and_busy_workers() {
        for idle in [
            "inet_csk_accept",
            "do_sys_poll",
            "ep_poll",
            "do_select",
            "__skb_wait_for_more_packets",
        ] {
            assert!(waits_for_connection(idle), "{idle}");
        }
        for busy in [
            "0",
            "",
            "hrtimer_nanosleep",
            "unix_stream_data_wait",
            "wait_woken",
        ] {
            assert!(!waits_for_connection(busy), "{busy}");
        }
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
                Reaped::Child(pid, status) => reaped.push((pid, status)),
                Reaped::Held(pid) => {
                    assert_eq!(pid, held.pid());
                    reaped.extend(reap_unheld().unwrap());
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
}
