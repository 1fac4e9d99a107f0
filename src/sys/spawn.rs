//! Worker creation: fork + execve with the systemd socket-activation contract.
//!
//! This is the only code in drove that runs between `fork()` and `execve()`.
//! droved is multi-threaded (tokio), so the child may only make
//! async-signal-safe calls: everything it needs (argv, envp, the fd plan, the
//! resolved credentials) is built by [`SpawnSpec::prepare`] in the parent.
//!
//! Why not `std::process::Command` or `posix_spawn`: `LISTEN_PID` must hold
//! the worker's *own* pid (sd_listen_fds(3)), which is only known in the
//! child. We pre-allocate `LISTEN_PID=` followed by 20 spaces, and the child
//! writes its pid into that buffer with `getpid()` before `execve`.
//!
//! Fd invariants (the moves are planned in the parent by [`fd_plan`]):
//! - every fd of droved is CLOEXEC, so nothing leaks into a worker;
//! - a CLOEXEC "exec status" pipe tells the parent whether `execve` happened
//!   (EOF) or which step failed (a step code and errno), so a missing binary
//!   is a clear error, and `ready = "exec"` means what systemd's Type=exec
//!   means. The child first moves its end above the target range, wherever
//!   the pipe landed, and reports every later failure through the moved fd;
//! - the child then duplicates each listener to a CLOEXEC fd above the
//!   target range (so the `dup2`s cannot clobber each other, and `dup2(3, 3)`
//!   no-ops cannot keep CLOEXEC set), then `dup2`s them to 3, 4, …, which
//!   clears CLOEXEC on exactly those fds;
//! - with [`Placement::Stdin`] (the FastCGI convention) the one listener goes
//!   to fd 0 instead and `LISTEN_PID` is not set; fds 1 and 2 are never a
//!   move's target in either placement, so stdout and stderr stay droved's.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Pid, Uid};

use super::users::{lookup_group, lookup_user};

/// First fd handed to workers (SD_LISTEN_FDS_START).
pub const LISTEN_FDS_START: RawFd = 3;

/// The listening socket of the FastCGI convention (FCGI_LISTENSOCK_FILENO).
pub const FCGI_LISTENSOCK_FILENO: RawFd = 0;

/// Where a worker's listeners go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// sd_listen_fds(3): fds 3, 4, … and `LISTEN_PID` (the caller sets
    /// `LISTEN_FDS` and `LISTEN_FDNAMES`).
    Systemd,
    /// FastCGI: exactly one listener, on fd 0; no `LISTEN_PID`.
    Stdin,
}

impl Placement {
    /// The fd the first listener is placed at.
    pub fn first_fd(self) -> RawFd {
        match self {
            Placement::Systemd => LISTEN_FDS_START,
            Placement::Stdin => FCGI_LISTENSOCK_FILENO,
        }
    }
}

/// Room for the decimal pid in `LISTEN_PID=`.
const PID_DIGITS: usize = 20;

/// Credentials a worker runs with, resolved in the parent (getpwnam and
/// initgroups read files and allocate, so they cannot run in the child).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
}

impl Credentials {
    /// Resolves `user` and `group` names (or numeric ids) as systemd's
    /// User=/Group= do: the user's primary group unless `group` is given, and
    /// the user's supplementary groups.
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> io::Result<Option<Credentials>> {
        if user.is_none() && group.is_none() {
            return Ok(None);
        }
        let current_uid = Uid::current();
        let (uid, mut gid, name) = match user {
            Some(u) => {
                let entry = lookup_user(u)?;
                (entry.uid, entry.gid, Some(entry.name))
            }
            None => (current_uid, Gid::current(), None),
        };
        if let Some(g) = group {
            gid = lookup_group(g)?;
        }
        let groups = match &name {
            Some(n) => {
                let cname = CString::new(n.as_bytes()).map_err(invalid)?;
                nix::unistd::getgrouplist(&cname, gid).map_err(io::Error::from)?
            }
            None => vec![gid],
        };
        Ok(Some(Credentials { uid, gid, groups }))
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

/// What to run, as the caller describes it.
pub struct SpawnSpec<'a> {
    /// argv; `argv[0]` is resolved against `PATH` unless it contains a `/`.
    pub argv: &'a [String],
    /// The complete environment, minus `LISTEN_PID` which spawn adds.
    pub env: Vec<(String, String)>,
    pub working_directory: Option<&'a Path>,
    pub credentials: Option<&'a Credentials>,
    /// Listening sockets, placed at fds 3, 4, … in this order, or the one
    /// listener at fd 0 (see `placement`).
    pub listeners: Vec<BorrowedFd<'a>>,
    pub placement: Placement,
    /// Sent to the worker if droved dies (PR_SET_PDEATHSIG), so a killed
    /// supervisor leaves no orphan pool serving stale code.
    pub parent_death_signal: Option<nix::sys::signal::Signal>,
}

/// A spec with every byte the child needs already allocated.
struct Prepared {
    program: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// `LISTEN_PID=` + spaces + NUL; the child writes its pid in place.
    listen_pid: Vec<u8>,
    cwd: Option<CString>,
    creds: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    fds: Vec<RawFd>,
    first_fd: RawFd,
    death_signal: libc::c_int,
    parent: libc::pid_t,
}

/// Steps the child reports on failure, so the parent can say which one failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ChildStep {
    Fds = 1,
    Chdir = 2,
    Credentials = 3,
    Exec = 4,
}

impl ChildStep {
    fn from_u32(v: u32) -> &'static str {
        match v {
            1 => "placing the listening sockets",
            2 => "changing to the working directory",
            3 => "dropping privileges",
            _ => "executing the command",
        }
    }
}

/// One fd move of the child's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdMove {
    /// `dup3(from, to, O_CLOEXEC)`: a copy above the target range that the
    /// later moves cannot clobber; closed at exec.
    Park { from: RawFd, to: RawFd },
    /// `dup2(from, to)` into a listener slot, which clears CLOEXEC there.
    Place { from: RawFd, to: RawFd },
}

/// Where the child puts its fds before exec; see [`fd_plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdPlan {
    /// The status pipe's write end as created, possibly inside the target
    /// range (then a listener is placed over it).
    pub status_from: RawFd,
    /// Where the status pipe's write end is moved first (`dup3` with
    /// CLOEXEC; equal to `status_from` when that is already safe): at or
    /// above `high_base`, never a source or destination of `moves`.
    pub status: RawFd,
    /// The listener moves, in order, after the status pipe moved.
    pub moves: Vec<FdMove>,
    /// First fd above both the listener targets `first..first + n` and
    /// stdin, stdout and stderr (so at least 3): every fd from here up is
    /// droved's own and closed at exec.
    pub high_base: RawFd,
}

/// Plans the fds of a worker: listener `i` (fd `listeners[i]`) ends at
/// `first + i` without CLOEXEC, and the exec status pipe (fd `status`) ends
/// at `FdPlan::status`, untouched by every later move. No move targets an
/// fd below `high_base` other than the listener slots, so the stdio fds
/// outside `first..first + n` stay as droved has them. Fds that are neither
/// listeners nor the status pipe may be overwritten above `high_base`: in
/// the child they are droved's own, all closed at exec anyway. Pure, so it
/// is tested without forking; the child only follows it.
pub fn fd_plan(listeners: &[RawFd], status: RawFd, first: RawFd) -> FdPlan {
    let high_base = (first + listeners.len() as RawFd).max(LISTEN_FDS_START);
    let mut taken: Vec<RawFd> = listeners.to_vec();
    let next_free = |taken: &mut Vec<RawFd>| {
        let fd = (high_base..)
            .find(|fd| !taken.contains(fd))
            .expect("an fd number above the listeners is free");
        taken.push(fd);
        fd
    };
    let status_to = if status >= high_base && !listeners.contains(&status) {
        taken.push(status);
        status
    } else {
        next_free(&mut taken)
    };
    let parked: Vec<RawFd> = listeners.iter().map(|_| next_free(&mut taken)).collect();
    let moves = listeners
        .iter()
        .zip(&parked)
        .map(|(&from, &to)| FdMove::Park { from, to })
        .chain(parked.iter().enumerate().map(|(i, &from)| FdMove::Place {
            from,
            to: first + i as RawFd,
        }))
        .collect();
    FdPlan {
        status_from: status,
        status: status_to,
        moves,
        high_base,
    }
}

/// Resolves a bare program name against `PATH` (from the worker's env).
pub fn resolve_program(
    program: &str,
    path_env: Option<&str>,
    cwd: Option<&Path>,
) -> io::Result<PathBuf> {
    if program.contains('/') {
        let p = Path::new(program);
        let full = match (p.is_relative(), cwd) {
            (true, Some(dir)) => dir.join(p),
            _ => p.to_path_buf(),
        };
        if !is_executable(&full) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "worker command {} is not an executable file",
                    full.display()
                ),
            ));
        }
        return Ok(PathBuf::from(program));
    }
    let search = path_env.unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in search.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(program);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("worker command {program:?} not found in PATH ({search})"),
    ))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn cstring(s: &[u8], what: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| invalid(format!("{what} contains a NUL byte")))
}

impl SpawnSpec<'_> {
    fn prepare(&self) -> io::Result<Prepared> {
        let first = self
            .argv
            .first()
            .ok_or_else(|| invalid("worker command is empty"))?;
        let path_env = self
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str());
        let program = resolve_program(first, path_env, self.working_directory)?;
        let program = cstring(program.as_os_str().as_bytes(), "worker command")?;
        let argv = self
            .argv
            .iter()
            .map(|a| cstring(a.as_bytes(), "worker argument"))
            .collect::<io::Result<Vec<_>>>()?;
        let env = self
            .env
            .iter()
            .filter(|(k, _)| k != "LISTEN_PID")
            .map(|(k, v)| cstring(format!("{k}={v}").as_bytes(), "worker environment"))
            .collect::<io::Result<Vec<_>>>()?;
        if self.placement == Placement::Stdin && self.listeners.len() != 1 {
            return Err(invalid(format!(
                "the FastCGI socket convention (fd 0) takes exactly one listener, not {}",
                self.listeners.len()
            )));
        }
        let mut listen_pid = b"LISTEN_PID=".to_vec();
        listen_pid.extend(std::iter::repeat_n(b' ', PID_DIGITS));
        listen_pid.push(0);

        let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<_> = env.iter().map(|e| e.as_ptr()).collect();
        if self.placement == Placement::Systemd {
            envp_ptrs.push(listen_pid.as_ptr().cast());
        }
        envp_ptrs.push(std::ptr::null());

        let cwd = self
            .working_directory
            .map(|d| cstring(OsStr::new(d).as_bytes(), "working directory"))
            .transpose()?;
        let creds = self.credentials.map(|c| {
            (
                c.uid.as_raw(),
                c.gid.as_raw(),
                c.groups.iter().map(|g| g.as_raw()).collect::<Vec<_>>(),
            )
        });
        Ok(Prepared {
            program,
            _argv: argv,
            argv_ptrs,
            _env: env,
            envp_ptrs,
            listen_pid,
            cwd,
            creds,
            fds: self.listeners.iter().map(|fd| fd.as_raw_fd()).collect(),
            first_fd: self.placement.first_fd(),
            death_signal: self.parent_death_signal.map_or(0, |s| s as libc::c_int),
            parent: std::process::id() as libc::pid_t,
        })
    }
}

/// Forks and execs a worker. Returns once the child has exec'd (or reports
/// the step that failed, after reaping the child).
pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Pid> {
    start(spec)?.finish()
}

/// A forked child whose exec has not been confirmed yet. Forking several
/// workers and then confirming them lets their exec (and the page-table
/// copies) overlap instead of running one after another.
pub struct Pending {
    pid: Pid,
    status: std::fs::File,
    program: CString,
    /// Out of droved's reaping sweep until the exec is confirmed.
    _held: Option<super::process::Held>,
}

/// Forks a worker; [`Pending::finish`] waits for its exec.
pub fn start(spec: &SpawnSpec<'_>) -> io::Result<Pending> {
    let mut prepared = spec.prepare()?;
    let (status_read, status_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let listen_pid_ptr = prepared.listen_pid.as_mut_ptr();
    let plan = fd_plan(&prepared.fds, status_write.as_raw_fd(), prepared.first_fd);

    // Held until the exec is confirmed: a failed child is reaped by
    // `finish`, not by droved's sweep of exited children.
    let (pid, held) = super::process::fork_held(
        || {
            // SAFETY: fork() in a multi-threaded process is sound as long as
            // the child only makes async-signal-safe calls before
            // execve/_exit. `child_exec` makes only such calls (see its doc)
            // and touches only memory prepared above, which the child's copy
            // of the address space holds too (the child never touches the
            // lock fork_held holds).
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                return Err(io::Error::last_os_error());
            }
            if pid == 0 {
                // SAFETY: we are the child of fork(); see child_exec's contract.
                unsafe { child_exec(&prepared, &plan, listen_pid_ptr) }
            }
            Ok(Pid::from_raw(pid))
        },
        |pid| Some(*pid),
    )?;
    drop(status_write);
    Ok(Pending {
        pid,
        status: std::fs::File::from(status_read),
        program: prepared.program.clone(),
        _held: held,
    })
}

impl Pending {
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Waits for exec (EOF on the status pipe) or a failure report (step,
    /// errno); a child that failed is reaped here, it was never a worker.
    pub fn finish(self) -> io::Result<Pid> {
        let mut report = [0u8; 8];
        let mut got = 0;
        loop {
            match nix::unistd::read(&self.status, &mut report[got..]) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    if got == report.len() {
                        break;
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if got == 0 {
            return Ok(self.pid);
        }
        let _ = nix::sys::wait::waitpid(self.pid, None);
        let step = u32::from_ne_bytes(report[..4].try_into().expect("4 bytes"));
        let errno = i32::from_ne_bytes(report[4..].try_into().expect("4 bytes"));
        let err = io::Error::from_raw_os_error(errno);
        Err(io::Error::new(
            err.kind(),
            format!(
                "{} failed for {:?}: {err}",
                ChildStep::from_u32(step),
                self.program
            ),
        ))
    }
}

/// Reports the failed `step` and errno on the status pipe, then exits 127.
/// Async-signal-safe.
fn fail(status_fd: RawFd, step: ChildStep) -> ! {
    // SAFETY: reading errno, write and _exit are async-signal-safe; `msg`
    // is a local buffer of the length passed.
    unsafe {
        let errno = *libc::__errno_location();
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&(step as u32).to_ne_bytes());
        msg[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(status_fd, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// The child side of [`spawn`]. Never returns.
///
/// # Safety
/// Must only be called in the child of `fork()`. It calls only
/// async-signal-safe functions (signal(7)): sigaction, sigprocmask, setsid,
/// dup2, dup3, close_range, chdir, setgroups, setgid, setuid, prctl,
/// getppid, getpid, write, execve,
/// _exit; it neither allocates nor takes locks.
unsafe fn child_exec(p: &Prepared, plan: &FdPlan, listen_pid: *mut u8) -> ! {
    // SAFETY: all calls below are async-signal-safe and operate on memory
    // prepared before fork; pointers are valid NUL-terminated arrays.
    unsafe {
        // Signals: droved's handlers and ignores (Rust ignores SIGPIPE) must
        // not leak into the worker; start with defaults and an empty mask.
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // Own session: a Ctrl-C on droved's terminal reaches droved alone,
        // which then stops the workers the way it is configured to.
        libc::setsid();

        // The status pipe first, out of the listeners' way; from here on
        // every failure is reported through the moved fd (the original may
        // become a listener's slot).
        if plan.status != plan.status_from
            && libc::dup3(plan.status_from, plan.status, libc::O_CLOEXEC) < 0
        {
            fail(plan.status_from, ChildStep::Fds);
        }
        let status_fd = plan.status;
        // Listeners to 3.. (or 0): first above the target range (CLOEXEC
        // copies), then dup2 down, which clears CLOEXEC on exactly the targets.
        for step in &plan.moves {
            let done = match *step {
                FdMove::Park { from, to } => libc::dup3(from, to, libc::O_CLOEXEC),
                FdMove::Place { from, to } => libc::dup2(from, to),
            };
            if done < 0 {
                fail(status_fd, ChildStep::Fds);
            }
        }

        // Whatever droved itself inherited without CLOEXEC (a shell's or a
        // build tool's fds) must not reach the worker either: mark every fd
        // above the listeners CLOEXEC (close_range(2), Linux 5.11).
        if libc::syscall(
            libc::SYS_close_range,
            plan.high_base as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) < 0
        {
            fail(status_fd, ChildStep::Fds);
        }

        if let Some((uid, gid, groups)) = &p.creds
            && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(*gid) < 0
                || libc::setuid(*uid) < 0)
        {
            fail(status_fd, ChildStep::Credentials);
        }
        // As the worker's user (systemd does the same): a directory only
        // that user may enter works without extra capabilities for droved.
        if let Some(cwd) = &p.cwd
            && libc::chdir(cwd.as_ptr()) < 0
        {
            fail(status_fd, ChildStep::Chdir);
        }

        // After the credential change (which clears it): die with the
        // supervisor. If it already died, getppid() moved on: stop now.
        if p.death_signal != 0 {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                p.death_signal as libc::c_ulong,
                0,
                0,
                0,
            ) < 0
            {
                fail(status_fd, ChildStep::Credentials);
            }
            if libc::getppid() != p.parent {
                libc::_exit(0);
            }
        }

        // LISTEN_PID=<our pid>: write the digits over the spaces.
        let mut pid = libc::getpid() as u64;
        let mut digits = [0u8; PID_DIGITS];
        let mut len = 0;
        loop {
            digits[len] = b'0' + (pid % 10) as u8;
            len += 1;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        let value = listen_pid.add(b"LISTEN_PID=".len());
        for i in 0..len {
            *value.add(i) = digits[len - 1 - i];
        }
        *value.add(len) = 0;

        libc::execve(
            p.program.as_ptr(),
            p.argv_ptrs.as_ptr(),
            p.envp_ptrs.as_ptr(),
        );
        fail(status_fd, ChildStep::Exec)
    }
}

// --- drovectl -H: a transport process (ssh) on a socket ---------------------

/// A program drovectl speaks D-Bus through (`ssh ... systemd-stdio-bridge`,
/// what sd-bus's `unixexec:` transport runs for `systemctl -H`), started
/// with std's Command: no listeners or LISTEN_PID here, and drovectl is
/// single-threaded when it runs this.
#[derive(Debug)]
pub struct StdioPeer {
    /// drovectl's end of the socket whose other end is the program's stdin
    /// and stdout.
    pub socket: std::os::unix::net::UnixStream,
    pub child: std::process::Child,
}

/// Starts `program args` with stdin and stdout on one end of a fresh
/// socketpair (returned as [`StdioPeer::socket`]) and stderr on a pipe
/// (`child.stderr`), so a failure can be told from what the program said.
pub fn spawn_stdio_peer(program: &OsStr, args: &[&OsStr]) -> io::Result<StdioPeer> {
    use std::process::{Command, Stdio};
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let theirs = OwnedFd::from(theirs);
    let stdout = theirs.try_clone()?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::piped())
        .spawn()?;
    Ok(StdioPeer {
        socket: ours,
        child,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::TcpListener;
    use std::os::fd::AsFd;

    fn wait_exit(pid: Pid) -> i32 {
        match nix::sys::wait::waitpid(pid, None).unwrap() {
            nix::sys::wait::WaitStatus::Exited(_, code) => code,
            other => panic!("unexpected wait status {other:?}"),
        }
    }

    #[test]
    fn child_sees_its_own_listen_pid_and_fds() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = std::env::temp_dir().join(format!("drove-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let script = format!(
            "echo \"$LISTEN_PID $$ $LISTEN_FDS $LISTEN_FDNAMES\" > {0}; exec ls /proc/self/fd >> {0}",
            out.display()
        );
        // $$ is the pid of the spawned shell itself.
        let argv = vec!["sh".to_string(), "-c".to_string(), script];
        let spec = SpawnSpec {
            argv: &argv,
            env: vec![
                ("PATH".into(), std::env::var("PATH").unwrap()),
                ("LISTEN_FDS".into(), "1".into()),
                ("LISTEN_FDNAMES".into(), "web".into()),
            ],
            working_directory: None,
            credentials: None,
            listeners: vec![listener.as_fd()],
            placement: Placement::Systemd,
            parent_death_signal: None,
        };
        let pid = spawn(&spec).unwrap();
        assert_eq!(wait_exit(pid), 0);
        let text = std::fs::read_to_string(&out).unwrap();
        let first = text.lines().next().unwrap();
        let fields: Vec<_> = first.split(' ').collect();
        assert_eq!(
            fields[0],
            pid.to_string(),
            "LISTEN_PID is the child's pid: {text}"
        );
        assert_eq!(fields[1], pid.to_string());
        assert_eq!(&fields[2..], ["1", "web"]);
        // ls replaced the shell (same pid, same fds): 0-2, 3 (the listener)
        // and ls's own directory fd, nothing of this test process (cargo's
        // jobserver fds, other tests' sockets).
        let fds: Vec<i32> = text.lines().skip(1).map(|l| l.parse().unwrap()).collect();
        assert!(fds.contains(&3), "listener at fd 3: {fds:?}");
        assert!(fds.iter().all(|&fd| fd <= 4), "no leaked fds: {fds:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stdin_placement_puts_the_listener_on_fd_0_and_sets_no_listen_pid() {
        use std::os::unix::fs::MetadataExt;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
            .unwrap()
            .ino();
        let dir = std::env::temp_dir().join(format!("drove-spawn-stdin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        // $$ is the shell itself; readlink shows what its fds are.
        let script = format!(
            "echo \"${{LISTEN_PID-unset}} $(readlink /proc/$$/fd/0) $(readlink /proc/$$/fd/1) $(readlink /proc/$$/fd/2)\" > {0}; exec ls /proc/self/fd >> {0}",
            out.display()
        );
        let argv = vec!["sh".to_string(), "-c".to_string(), script];
        let spec = SpawnSpec {
            argv: &argv,
            env: vec![("PATH".into(), std::env::var("PATH").unwrap())],
            working_directory: None,
            credentials: None,
            listeners: vec![listener.as_fd()],
            placement: Placement::Stdin,
            parent_death_signal: None,
        };
        let pid = spawn(&spec).unwrap();
        assert_eq!(wait_exit(pid), 0);
        let text = std::fs::read_to_string(&out).unwrap();
        let first = text.lines().next().unwrap();
        let fields: Vec<_> = first.split(' ').collect();
        assert_eq!(fields[0], "unset", "no LISTEN_PID: {text}");
        assert_eq!(fields[1], format!("socket:[{inode}]"), "fd 0: {text}");
        let ours = |fd: i32| std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert_eq!(Path::new(fields[2]), ours(1), "stdout unchanged: {text}");
        assert_eq!(Path::new(fields[3]), ours(2), "stderr unchanged: {text}");
        // ls: 0-2 and its own directory fd; nothing at 3 but that.
        let fds: Vec<i32> = text.lines().skip(1).map(|l| l.parse().unwrap()).collect();
        assert!(fds.iter().all(|&fd| fd <= 3), "no leaked fds: {fds:?}");
        std::fs::remove_dir_all(&dir).unwrap();

        // Two listeners cannot share fd 0.
        let second = TcpListener::bind("127.0.0.1:0").unwrap();
        let spec = SpawnSpec {
            listeners: vec![listener.as_fd(), second.as_fd()],
            ..spec
        };
        let err = spawn(&spec).unwrap_err();
        assert!(err.to_string().contains("exactly one listener"), "{err}");
    }

    #[test]
    fn missing_program_is_a_clear_error() {
        let argv = vec!["/nonexistent/drove-test-binary".to_string()];
        let spec = SpawnSpec {
            argv: &argv,
            env: vec![],
            working_directory: None,
            credentials: None,
            listeners: vec![],
            placement: Placement::Systemd,
            parent_death_signal: None,
        };
        let err = spawn(&spec).unwrap_err();
        assert!(err.to_string().contains("not an executable"), "{err}");
    }

    #[test]
    fn bad_working_directory_reports_the_step() {
        let argv = vec!["true".to_string()];
        let spec = SpawnSpec {
            argv: &argv,
            env: vec![("PATH".into(), std::env::var("PATH").unwrap())],
            working_directory: Some(Path::new("/nonexistent-drove-dir")),
            credentials: None,
            listeners: vec![],
            placement: Placement::Systemd,
            parent_death_signal: None,
        };
        let err = spawn(&spec).unwrap_err();
        assert!(err.to_string().contains("working directory"), "{err}");
    }

    #[test]
    fn resolves_users_and_groups() {
        let creds = Credentials::resolve(Some("root"), None).unwrap().unwrap();
        assert_eq!(creds.uid.as_raw(), 0);
        assert!(Credentials::resolve(Some("no-such-user-drove"), None).is_err());
        assert!(Credentials::resolve(None, None).unwrap().is_none());
    }

    /// Runs the fd plan on a model fd table and checks the invariants the
    /// child relies on: listener `i` ends at `first + i` without CLOEXEC,
    /// the status pipe, once moved, is never overwritten, and no move
    /// touches a stdio fd that is not a listener slot.
    fn check_plan(listeners: &[RawFd], status: RawFd, first: RawFd) {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Open {
            Listener(usize),
            Status,
        }
        let plan = fd_plan(listeners, status, first);
        let ctx = format!("listeners {listeners:?}, status {status}, first {first}: {plan:?}");
        let slots = first..first + listeners.len() as RawFd;
        // fd -> (what is open there, CLOEXEC)
        let mut table: BTreeMap<RawFd, (Open, bool)> = listeners
            .iter()
            .enumerate()
            .map(|(i, &fd)| (fd, (Open::Listener(i), true)))
            .collect();
        table.insert(status, (Open::Status, true));
        let high_base = slots.end.max(3);
        assert_eq!(plan.high_base, high_base, "{ctx}");
        assert_eq!(plan.status_from, status, "{ctx}");
        assert!(plan.status >= high_base, "{ctx}");
        if plan.status != status {
            table.insert(plan.status, (Open::Status, true));
        }
        for step in &plan.moves {
            let (from, to, cloexec) = match *step {
                FdMove::Park { from, to } => {
                    assert_ne!(from, to, "dup3 refuses from == to: {ctx}");
                    assert!(to >= high_base, "parked inside the targets: {ctx}");
                    (from, to, true)
                }
                FdMove::Place { from, to } => (from, to, false),
            };
            assert_ne!(to, plan.status, "a move overwrites the status pipe: {ctx}");
            assert!(
                to >= high_base || slots.contains(&to),
                "a move targets fd {to}, below every parking slot and no listener's: {ctx}"
            );
            let (open, _) = *table
                .get(&from)
                .unwrap_or_else(|| panic!("{from} is closed: {ctx}"));
            table.insert(to, (open, cloexec));
            assert_eq!(table[&plan.status].0, Open::Status, "{ctx}");
        }
        for i in 0..listeners.len() {
            let fd = first + i as RawFd;
            assert_eq!(
                table.get(&fd),
                Some(&(Open::Listener(i), false)),
                "fd {fd}: {ctx}"
            );
        }
        assert_eq!(table[&plan.status].0, Open::Status, "{ctx}");
    }

    #[test]
    fn fd_plan_moves() {
        // Nothing to place: the pipe stays where it is.
        assert_eq!(
            fd_plan(&[], 5, LISTEN_FDS_START),
            FdPlan {
                status_from: 5,
                status: 5,
                moves: vec![],
                high_base: 3
            }
        );
        // The usual case: the pipe above the listeners stays put.
        assert_eq!(
            fd_plan(&[7], 8, LISTEN_FDS_START),
            FdPlan {
                status_from: 8,
                status: 8,
                moves: vec![
                    FdMove::Park { from: 7, to: 4 },
                    FdMove::Place { from: 4, to: 3 }
                ],
                high_base: 4,
            }
        );
        // The pipe inside the target range (fd 4, where listener 1 goes):
        // it moves first, above every listener's source and parking slot.
        assert_eq!(
            fd_plan(&[5, 6, 7], 4, LISTEN_FDS_START),
            FdPlan {
                status_from: 4,
                status: 8,
                moves: vec![
                    FdMove::Park { from: 5, to: 9 },
                    FdMove::Park { from: 6, to: 10 },
                    FdMove::Park { from: 7, to: 11 },
                    FdMove::Place { from: 9, to: 3 },
                    FdMove::Place { from: 10, to: 4 },
                    FdMove::Place { from: 11, to: 5 },
                ],
                high_base: 6,
            }
        );
        // Already at its target, a listener still goes through a copy, so
        // that the dup2 clears CLOEXEC.
        let plan = fd_plan(&[3], 4, LISTEN_FDS_START);
        assert_eq!(plan.status, 4);
        assert_eq!(
            plan.moves,
            [
                FdMove::Park { from: 3, to: 5 },
                FdMove::Place { from: 5, to: 3 }
            ]
        );
        // FastCGI: the listener to fd 0, parked above stdio, never at 1 or 2.
        assert_eq!(
            fd_plan(&[7], 8, FCGI_LISTENSOCK_FILENO),
            FdPlan {
                status_from: 8,
                status: 8,
                moves: vec![
                    FdMove::Park { from: 7, to: 3 },
                    FdMove::Place { from: 3, to: 0 }
                ],
                high_base: 3,
            }
        );
    }

    #[test]
    fn fd_plan_holds_for_every_small_layout() {
        fn layouts(n: usize, from: &[RawFd], acc: &mut Vec<RawFd>, out: &mut Vec<Vec<RawFd>>) {
            if acc.len() == n {
                out.push(acc.clone());
                return;
            }
            for &fd in from {
                if !acc.contains(&fd) {
                    acc.push(fd);
                    layouts(n, from, acc, out);
                    acc.pop();
                }
            }
        }
        let fds: Vec<RawFd> = (0..10).collect();
        let mut checked = 0;
        for n in 0..=3 {
            let mut all = Vec::new();
            layouts(n, &fds, &mut Vec::new(), &mut all);
            for listeners in all {
                for &status in fds.iter().filter(|fd| !listeners.contains(fd)) {
                    check_plan(&listeners, status, LISTEN_FDS_START);
                    checked += 1;
                    if n == 1 {
                        check_plan(&listeners, status, FCGI_LISTENSOCK_FILENO);
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 5000, "{checked}");
    }

    /// Set when this test binary runs one test alone in a fresh process.
    const ISOLATED: &str = "DROVE_TEST_ISOLATED";

    /// Runs test `name` alone in a fresh copy of this test binary, where no
    /// other test opens or closes fds meanwhile; fails if it fails there.
    fn run_isolated(name: &str) {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--test-threads=1", "--nocapture"])
            .env(ISOLATED, "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::Read;
            let (mut out, mut err) = (String::new(), String::new());
            let _ = stdout.read_to_string(&mut out);
            let _ = stderr.read_to_string(&mut err);
            let _ = tx.send((child.wait(), out, err));
        });
        let Ok((status, out, err)) = rx.recv_timeout(std::time::Duration::from_secs(60)) else {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("{name} did not finish within 60s in its own process");
        };
        assert!(
            status.unwrap().success() && out.contains("test result: ok. 1 passed"),
            "{name} in its own process:\n{out}\n{err}"
        );
    }

    #[test]
    fn failures_are_reported_when_the_status_pipe_lands_among_the_listener_slots() {
        let name = "sys::spawn::tests::failures_are_reported_when_the_status_pipe_lands_among_the_listener_slots";
        if std::env::var_os(ISOLATED).is_none() {
            return run_isolated(name);
        }
        // fd numbers are process-wide, so this part runs alone in its own
        // process. Each listener takes the lowest free fd; moving the two
        // lowest up (clones land above the last one) frees their fds, which
        // the exec status pipe (read end, write end) then takes: the write
        // end lies inside the target range 3..3+N.
        const N: usize = 16;
        let mut listeners: Vec<OwnedFd> = (0..N)
            .map(|_| OwnedFd::from(TcpListener::bind("127.0.0.1:0").unwrap()))
            .collect();
        listeners.sort_by_key(AsRawFd::as_raw_fd);
        let moved: Vec<OwnedFd> = listeners[..2]
            .iter()
            .map(|l| l.try_clone().unwrap())
            .collect();
        listeners.splice(..2, moved);
        let target_end = LISTEN_FDS_START + N as RawFd;
        let (probe_read, probe_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let status_fd = probe_write.as_raw_fd();
        assert!(
            (LISTEN_FDS_START..target_end).contains(&status_fd),
            "setup: the status pipe would be fd {status_fd}, not inside 3..{target_end}"
        );
        drop((probe_read, probe_write));

        let argv = vec!["true".to_string()];
        let spec = SpawnSpec {
            argv: &argv,
            env: vec![("PATH".into(), std::env::var("PATH").unwrap())],
            working_directory: Some(Path::new("/nonexistent-drove-dir")),
            credentials: None,
            listeners: listeners.iter().map(|l| l.as_fd()).collect(),
            placement: Placement::Systemd,
            parent_death_signal: None,
        };
        match spawn(&spec) {
            Ok(pid) => panic!(
                "spawn reported success; the child exited with {:?}",
                nix::sys::wait::waitpid(pid, None)
            ),
            Err(e) => assert!(
                e.to_string()
                    .contains("changing to the working directory failed"),
                "{e}"
            ),
        }
    }
}
