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
//! Fd invariants:
//! - every fd of droved is CLOEXEC, so nothing leaks into a worker;
//! - the child first duplicates each listener to a CLOEXEC fd above the
//!   target range (so the `dup2`s cannot clobber each other, and `dup2(3, 3)`
//!   no-ops cannot keep CLOEXEC set), then `dup2`s them to 3, 4, …, which
//!   clears CLOEXEC on exactly those fds;
//! - a CLOEXEC "exec status" pipe tells the parent whether `execve` happened
//!   (EOF) or which step failed (a step code and errno), so a missing binary
//!   is a clear error, and `ready = "exec"` means what systemd's Type=exec means.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Pid, Uid};

use super::users::{lookup_group, lookup_user};

/// First fd handed to workers (SD_LISTEN_FDS_START).
pub const LISTEN_FDS_START: RawFd = 3;

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
    /// Listening sockets, placed at fds 3, 4, … in this order.
    pub listeners: Vec<BorrowedFd<'a>>,
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
        let mut listen_pid = b"LISTEN_PID=".to_vec();
        listen_pid.extend(std::iter::repeat_n(b' ', PID_DIGITS));
        listen_pid.push(0);

        let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<_> = env.iter().map(|e| e.as_ptr()).collect();
        envp_ptrs.push(listen_pid.as_ptr().cast());
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
}

/// Forks a worker; [`Pending::finish`] waits for its exec.
pub fn start(spec: &SpawnSpec<'_>) -> io::Result<Pending> {
    let mut prepared = spec.prepare()?;
    let (status_read, status_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let listen_pid_ptr = prepared.listen_pid.as_mut_ptr();
    let status_fd = status_write.as_raw_fd();

    // SAFETY: fork() in a multi-threaded process is sound as long as the child
    // only makes async-signal-safe calls before execve/_exit. `child_exec`
    // makes only such calls (see its doc) and touches only memory prepared
    // above, which the child's copy of the address space holds too.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the child of fork(); see child_exec's contract.
        unsafe { child_exec(&prepared, listen_pid_ptr, status_fd) }
    }
    drop(status_write);
    Ok(Pending {
        pid: Pid::from_raw(pid),
        status: std::fs::File::from(status_read),
        program: prepared.program.clone(),
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

/// The child side of [`spawn`]. Never returns.
///
/// # Safety
/// Must only be called in the child of `fork()`. It calls only
/// async-signal-safe functions (signal(7)): sigaction, sigprocmask, setsid,
/// fcntl, dup2, close_range, chdir, setgroups, setgid, setuid, prctl,
/// getppid, getpid, write, execve,
/// _exit; it neither allocates nor takes locks.
unsafe fn child_exec(p: &Prepared, listen_pid: *mut u8, status_fd: RawFd) -> ! {
    let fail = |step: ChildStep| -> ! {
        // SAFETY: errno location, write and _exit are async-signal-safe.
        unsafe {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&(step as u32).to_ne_bytes());
            msg[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(status_fd, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
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

        // Listeners to 3..: first above the target range (CLOEXEC copies),
        // then dup2 down, which clears CLOEXEC on exactly the targets. The
        // status pipe moves up too, so no dup2 can clobber it.
        let n = p.fds.len() as RawFd;
        let high_base = LISTEN_FDS_START + n;
        let status_fd = libc::fcntl(status_fd, libc::F_DUPFD_CLOEXEC, high_base);
        if status_fd < 0 {
            libc::_exit(127);
        }
        let mut high = [0 as RawFd; 64];
        if p.fds.len() > high.len() {
            *libc::__errno_location() = libc::EMFILE;
            fail(ChildStep::Fds);
        }
        for (i, &fd) in p.fds.iter().enumerate() {
            let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, high_base);
            if h < 0 {
                fail(ChildStep::Fds);
            }
            high[i] = h;
        }
        for (i, &h) in high.iter().take(p.fds.len()).enumerate() {
            if libc::dup2(h, LISTEN_FDS_START + i as RawFd) < 0 {
                fail(ChildStep::Fds);
            }
        }

        // Whatever droved itself inherited without CLOEXEC (a shell's or a
        // build tool's fds) must not reach the worker either: mark every fd
        // above the listeners CLOEXEC (close_range(2), Linux 5.11).
        if libc::syscall(
            libc::SYS_close_range,
            high_base as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) < 0
        {
            fail(ChildStep::Fds);
        }

        if let Some((uid, gid, groups)) = &p.creds
            && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(*gid) < 0
                || libc::setuid(*uid) < 0)
        {
            fail(ChildStep::Credentials);
        }
        // As the worker's user (systemd does the same): a directory only
        // that user may enter works without extra capabilities for droved.
        if let Some(cwd) = &p.cwd
            && libc::chdir(cwd.as_ptr()) < 0
        {
            fail(ChildStep::Chdir);
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
                fail(ChildStep::Credentials);
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
        fail(ChildStep::Exec)
    }
}

/// Duplicates `fd` as a new CLOEXEC fd (for keeping listeners past a handover).
pub fn dup_cloexec(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

/// Wraps a raw fd number inherited from a previous process image.
///
/// # Safety
/// `fd` must be open and owned by nobody else in this process.
pub unsafe fn adopt_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn missing_program_is_a_clear_error() {
        let argv = vec!["/nonexistent/drove-test-binary".to_string()];
        let spec = SpawnSpec {
            argv: &argv,
            env: vec![],
            working_directory: None,
            credentials: None,
            listeners: vec![],
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
}
