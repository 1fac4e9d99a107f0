//! droved's own NOTIFY_SOCKET, where workers send sd_notify(3) datagrams.
//!
//! A datagram socket at a filesystem path, like systemd's own
//! `/run/systemd/notify`, because small client libraries (Ruby's sd_notify
//! gem, under Puma) do not understand an `@` abstract address. It lives in
//! droved's runtime directory: `$RUNTIME_DIRECTORY` when systemd gives one,
//! else `/run/drove/<instance>/` as root, else
//! `$XDG_RUNTIME_DIR/drove/<instance>/`. Directory (0755) and socket (0660)
//! belong to droved's uid and the workers' group, so no other local user can
//! reach it (connecting takes write permission on the socket file): an
//! abstract socket can be flooded by anyone. The directory is open for
//! traversal because droved's control socket (`control_socket`, 0666,
//! checked per caller by droved) lives beside it.
//!
//! The directory is opened without following symlinks and refused unless it
//! is ours and its parent is writable by nobody else; the socket is bound
//! under a private temporary name inside it and renamed into place, so it
//! appears with its final owner and mode, and a stale one left by a crashed
//! droved is replaced atomically. A live one (another droved serving the
//! same instance name) is left alone: this droved then uses a directory of
//! its own, `<dir>.<pid>`. The path and inode survive a binary upgrade (the
//! fd is handed over) and the socket is removed when droved exits. Only when
//! no directory is usable does droved fall back to an abstract socket, and
//! says so.
//!
//! SO_PASSCRED makes the kernel tell us each sender's uid and pid. Datagrams
//! from a uid other than droved's, root's or the workers' are dropped before
//! anything else is looked at, then those from pids that are not workers;
//! both are counted and summarised in one log line at most every
//! [`REPORT_EVERY`], never logged one by one (except at trace level). Any fds a sender attaches
//! (SCM_RIGHTS) are closed at once, never kept, however many: the control
//! buffer holds the most one datagram can carry, and a truncated list is
//! closed too. A failing read is logged at most once per [`REPORT_EVERY`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, sockopt};
use nix::sys::stat::fstat;
use nix::unistd::{Gid, Uid, fchownat};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, trace, warn};

use crate::sys::spawn::Credentials;

pub use super::private_socket::{
    Bound, SocketFile, bind_private, candidate_dirs, path_component, remove_socket,
};
use super::private_socket::{open_dir, sweep_stale_siblings, systemd_runtime_directory};

/// Largest datagram we accept (systemd uses a 4 KiB page too); longer ones
/// are truncated by the kernel and then dropped by us.
pub const MAX_DATAGRAM: usize = 4096;

/// The socket's name inside its directory.
pub const SOCKET_NAME: &str = "notify";

/// At most one summary line about ignored datagrams per this interval.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Datagrams dropped in a row before `recv` lets other work run.
const DROP_BUDGET: u32 = 256;

/// sun_path is 108 bytes with its NUL.
pub(crate) const MAX_SUN_PATH: usize = 107;

pub(crate) const DIR_MODE: u32 = 0o755;
pub(crate) const SOCKET_MODE: u32 = 0o660;

/// One received datagram.
#[derive(Debug)]
pub struct Datagram {
    /// Sender pid from SCM_CREDENTIALS; `None` if the kernel sent none.
    pub pid: Option<i32>,
    pub bytes: Vec<u8>,
    /// The datagram was longer than [`MAX_DATAGRAM`] (it is cut off).
    pub truncated: bool,
    /// How many fds the sender attached (all already closed).
    pub fds_dropped: usize,
}

/// Datagrams dropped before they reached the supervisor, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ignored {
    /// From a uid that is neither droved's, root's nor the workers'.
    pub other_users: u64,
    /// From an accepted uid but a pid that is not a worker (or without
    /// credentials).
    pub not_workers: u64,
}

/// Who may send: droved's own uid, root, and every uid workers were
/// started as (grow-only: workers of an older configuration may still run).
#[derive(Debug)]
struct Filter {
    uids: Vec<u32>,
    ignored: Ignored,
    /// Per kind (not workers, other users): the count at the last summary
    /// line and when it was written.
    reported: [(u64, Option<Instant>); 2],
    /// recvmsg(2) failures: how many, and the count and time at the last
    /// line about them.
    errors: (u64, u64, Option<Instant>),
}

impl Filter {
    fn new(workers: Option<&Credentials>) -> Filter {
        let mut f = Filter {
            uids: vec![0, Uid::effective().as_raw()],
            ignored: Ignored::default(),
            reported: [(0, None); 2],
            errors: (0, 0, None),
        };
        f.admit(workers);
        f
    }

    fn admit(&mut self, workers: Option<&Credentials>) {
        if let Some(c) = workers
            && !self.uids.contains(&c.uid.as_raw())
        {
            self.uids.push(c.uid.as_raw());
        }
    }

    /// Counts a failed recvmsg(2); returns the line to log if one is due
    /// (the first at once, then at most one per [`REPORT_EVERY`]).
    fn error(&mut self, e: &io::Error, now: Instant) -> Option<String> {
        let (total, last_count, last_at) = &mut self.errors;
        *total += 1;
        if last_at.is_some_and(|t| now.duration_since(t) < REPORT_EVERY) {
            return None;
        }
        let n = *total - *last_count;
        (*last_count, *last_at) = (*total, Some(now));
        Some(format!(
            "notify socket: {e} ({n} failed read(s) since the last line, {total} since start; next line in {}s at the earliest)",
            REPORT_EVERY.as_secs()
        ))
    }

    fn uid_ok(&self, uid: u32) -> bool {
        self.uids.contains(&uid)
    }

    /// Counts a dropped datagram, from another user (`foreign`: its uid and
    /// pid) or not; returns the summary line to log if one of its kind is
    /// due (the first at once, then at most one per [`REPORT_EVERY`]), and
    /// whether it concerns other users (a warning).
    fn count(&mut self, foreign: Option<(u32, i32)>, now: Instant) -> Option<(String, bool)> {
        let total = match foreign {
            Some(_) => {
                self.ignored.other_users += 1;
                self.ignored.other_users
            }
            None => {
                self.ignored.not_workers += 1;
                self.ignored.not_workers
            }
        };
        let (last_count, last_at) = &mut self.reported[usize::from(foreign.is_some())];
        if last_at.is_some_and(|t| now.duration_since(t) < REPORT_EVERY) {
            return None;
        }
        let since = last_at
            .map(|t| format!(" in the last {}s", now.duration_since(t).as_secs()))
            .unwrap_or_default();
        let n = total - *last_count;
        (*last_count, *last_at) = (total, Some(now));
        let next = REPORT_EVERY.as_secs();
        Some(match foreign {
            Some((uid, pid)) => (
                format!(
                    "ignored {n} notify datagram(s) from other users{since} (latest uid {uid}, pid {pid}); {total} since start, next summary in {next}s at the earliest"
                ),
                true,
            ),
            None => (
                format!(
                    "ignored {n} notify datagram(s) from processes that are not workers{since}; {total} since start, next summary in {next}s at the earliest"
                ),
                false,
            ),
        })
    }
}

pub struct NotifySocket {
    fd: AsyncFd<OwnedFd>,
    /// Value for NOTIFY_SOCKET: `/run/drove/web/notify`, or `@drove/…` in
    /// the fallback.
    pub address: String,
    file: Option<SocketFile>,
    filter: Mutex<Filter>,
}

impl NotifySocket {
    /// Creates droved's NOTIFY_SOCKET for `instance` in the first usable
    /// runtime directory, reachable by `workers` (their uid and group; droved's
    /// own when `None`); the abstract namespace only when none is usable.
    pub fn open(instance: &str, workers: Option<&Credentials>) -> io::Result<NotifySocket> {
        let runtime = std::env::var_os("RUNTIME_DIRECTORY");
        let xdg = std::env::var_os("XDG_RUNTIME_DIR");
        let dirs = candidate_dirs(
            runtime.as_deref(),
            xdg.as_deref(),
            Uid::effective().is_root(),
            instance,
        );
        let mut tried = Vec::new();
        for dir in &dirs {
            match NotifySocket::bind_in(dir, workers) {
                Ok(sock) => {
                    if tried.is_empty() {
                        info!("notify socket for workers: {}", sock.address);
                    } else {
                        warn!(
                            "notify socket for workers: {}, since {}",
                            sock.address,
                            tried.join("; ")
                        );
                    }
                    return Ok(sock);
                }
                Err(e) => tried.push(format!("{}: {e}", dir.display())),
            }
        }
        let sock = NotifySocket::bind_abstract("notify", workers)?;
        warn!(
            "no runtime directory is usable for the workers' NOTIFY_SOCKET ({}); falling back to the abstract socket {}, which clients that need a path (Ruby's sd_notify) cannot reach and any local user can send to (their datagrams are dropped by uid). Run droved as root, under systemd with RuntimeDirectory=, or with XDG_RUNTIME_DIR set",
            if tried.is_empty() {
                "none to try".to_string()
            } else {
                tried.join("; ")
            },
            sock.address
        );
        Ok(sock)
    }

    /// Creates the socket in `dir` (made if missing; its parent must exist),
    /// or, when a live droved already serves `dir`, in `<dir>.<pid>`.
    pub fn bind_in(dir: &Path, workers: Option<&Credentials>) -> io::Result<NotifySocket> {
        let group = workers.map(|c| c.gid).unwrap_or_else(Gid::effective);
        let remove_dir = Some(dir) != systemd_runtime_directory().as_deref();
        let first = bind_private(dir, SOCKET_NAME, SockType::Datagram, group, remove_dir);
        sweep_stale_siblings(dir);
        let (fd, file) = match first? {
            Bound::Ours(fd, file) => (fd, file),
            Bound::Busy => {
                let mut own = dir.as_os_str().to_owned();
                own.push(format!(".{}", std::process::id()));
                let own = PathBuf::from(own);
                warn!(
                    "{} is in use by another droved with the same instance name; using {}",
                    dir.join(SOCKET_NAME).display(),
                    own.display()
                );
                match bind_private(&own, SOCKET_NAME, SockType::Datagram, group, true)? {
                    Bound::Ours(fd, file) => (fd, file),
                    Bound::Busy => {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{} is in use", own.join(SOCKET_NAME).display()),
                        ));
                    }
                }
            }
        };
        socket::setsockopt(&fd, sockopt::PassCred, &true)?;
        nonblocking(&fd)?;
        Ok(NotifySocket {
            fd: register(fd)?,
            address: file.path.display().to_string(),
            file: Some(file),
            filter: Mutex::new(Filter::new(workers)),
        })
    }

    /// Binds a fresh abstract socket named after droved's pid and `tag` (the
    /// fallback; any local user can reach it).
    pub fn bind_abstract(tag: &str, workers: Option<&Credentials>) -> io::Result<NotifySocket> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("drove/{}/{tag}-{nonce:08x}", std::process::id());
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let addr = UnixAddr::new_abstract(name.as_bytes())?;
        socket::bind(fd.as_raw_fd(), &addr)?;
        socket::setsockopt(&fd, sockopt::PassCred, &true)?;
        Ok(NotifySocket {
            fd: register(fd)?,
            address: format!("@{name}"),
            file: None,
            filter: Mutex::new(Filter::new(workers)),
        })
    }

    /// Re-wraps the socket inherited across a binary upgrade: same fd, same
    /// path, same inode.
    pub fn from_fd(
        fd: OwnedFd,
        address: String,
        workers: Option<&Credentials>,
    ) -> io::Result<NotifySocket> {
        nonblocking(&fd)?;
        socket::setsockopt(&fd, sockopt::PassCred, &true)?;
        let file = match address.starts_with('/') {
            false => None,
            true => match nix::sys::stat::lstat(address.as_str()) {
                Ok(st) => {
                    let path = PathBuf::from(&address);
                    let remove_dir = path.parent() != systemd_runtime_directory().as_deref();
                    Some(SocketFile {
                        id: (st.st_dev, st.st_ino),
                        path,
                        remove_dir,
                    })
                }
                // Keep supervising: the workers already running lost their
                // way to notify, which the watchdog and ready_timeout report.
                Err(e) => {
                    warn!(
                        "the notify socket file {address} handed over by the previous binary is gone ({e}); workers cannot notify until droved restarts"
                    );
                    None
                }
            },
        };
        Ok(NotifySocket {
            fd: register(fd)?,
            address,
            file,
            filter: Mutex::new(Filter::new(workers)),
        })
    }

    /// The directory the socket file is in (droved's runtime directory),
    /// and whether droved removes it when done; `None` for an abstract
    /// socket.
    pub fn directory(&self) -> Option<(&Path, bool)> {
        let file = self.file.as_ref()?;
        Some((file.path.parent()?, file.remove_dir))
    }

    /// Lets workers started as `workers` send (after a reload changed
    /// worker.user/group): their uid is accepted from now on, and the
    /// directory and socket move to their group. Workers of the previous
    /// group cannot reach the socket any more; the rollout replaces them.
    pub fn admit(&self, workers: Option<&Credentials>) {
        self.filter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(workers);
        let Some(file) = &self.file else { return };
        let group = workers.map(|c| c.gid).unwrap_or_else(Gid::effective);
        let Some(dir) = file.path.parent() else {
            return;
        };
        let result = open_dir(dir).and_then(|d| {
            let st = fstat(&d)?;
            if st.st_gid == group.as_raw() {
                return Ok(false);
            }
            nix::unistd::fchown(&d, None, Some(group))?;
            fchownat(
                &d,
                SOCKET_NAME,
                None,
                Some(group),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
            Ok(true)
        });
        match result {
            Ok(false) => {}
            Ok(true) => warn!(
                "notify socket {} now belongs to group {group}: workers still running as another group cannot send to it until they are replaced",
                file.path.display()
            ),
            Err(e) => warn!(
                "cannot give the workers' group {group} access to {}: {e}; new workers may not reach NOTIFY_SOCKET",
                file.path.display()
            ),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }

    pub fn borrowed_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }

    /// Datagrams dropped so far (other users, and pids that are not workers).
    pub fn ignored(&self) -> Ignored {
        self.filter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ignored
    }

    /// Waits for the next datagram from an accepted uid, whatever its pid.
    pub async fn recv(&self) -> io::Result<Datagram> {
        self.recv_from(|_| true).await
    }

    /// Waits for the next datagram from an accepted uid and a pid for which
    /// `is_worker` holds. Others are dropped and counted at the cost of one
    /// recvmsg(2) each, yielding to other work every [`DROP_BUDGET`] of them.
    pub async fn recv_from(&self, mut is_worker: impl FnMut(i32) -> bool) -> io::Result<Datagram> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut dropped = 0u32;
        loop {
            let mut guard = self.fd.readable().await?;
            let got = match guard.try_io(|fd| recv_one(fd.get_ref().as_raw_fd(), &mut buf)) {
                Ok(Ok(got)) => got,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Not one line per datagram, and no spinning on an error
                // that persists.
                Ok(Err(e)) => {
                    drop(guard);
                    let line = self
                        .filter
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .error(&e, Instant::now());
                    if let Some(line) = line {
                        warn!("{line}");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(_would_block) => continue,
            };
            drop(guard);
            let verdict = {
                let mut filter = self.filter.lock().unwrap_or_else(|e| e.into_inner());
                let foreign = match got.cred {
                    Some((uid, pid)) if !filter.uid_ok(uid) => Some(Some((uid, pid))),
                    Some((_, pid)) if is_worker(pid) => None,
                    _ => Some(None),
                };
                // One line each only at trace level, for tests and
                // debugging; a static level check when it is off.
                match (foreign, got.cred) {
                    (Some(Some((uid, pid))), _) => {
                        trace!("notify datagram from another user ignored (uid {uid}, pid {pid})")
                    }
                    (Some(None), Some((uid, pid))) => trace!(
                        "notify datagram from a pid that is not a worker ignored (pid {pid}, uid {uid})"
                    ),
                    (Some(None), None) => trace!("notify datagram without credentials ignored"),
                    (None, _) => {}
                }
                foreign.map(|who| filter.count(who, Instant::now()))
            };
            match verdict {
                None => {
                    buf.truncate(got.len.min(MAX_DATAGRAM));
                    return Ok(Datagram {
                        pid: got.cred.map(|(_, pid)| pid),
                        bytes: buf,
                        truncated: got.truncated,
                        fds_dropped: got.fds_dropped,
                    });
                }
                Some(Some((line, true))) => warn!("{line}"),
                Some(Some((line, false))) => debug!("{line}"),
                Some(None) => {}
            }
            dropped += 1;
            if dropped.is_multiple_of(DROP_BUDGET) {
                tokio::task::yield_now().await;
            }
        }
    }
}

impl Drop for NotifySocket {
    /// Removes the socket file (and a directory of our own), if the path
    /// still names our socket. Not run across an upgrade's exec.
    fn drop(&mut self) {
        if let Some(file) = &self.file
            && let Err(e) = remove_socket(file)
        {
            warn!("cannot remove {}: {e}", file.path.display());
        }
    }
}

fn nonblocking(fd: &OwnedFd) -> io::Result<()> {
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    Ok(())
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and returns the same fd number until the
    // AsyncFd (its only owner) drops it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// What recvmsg(2) told us about one datagram (its bytes are in the buffer).
struct Received {
    /// Sender uid and pid from SCM_CREDENTIALS.
    cred: Option<(u32, i32)>,
    len: usize,
    truncated: bool,
    fds_dropped: usize,
}

/// Most fds one sendmsg(2) can pass (the kernel's SCM_MAX_FD): the control
/// buffer has room for them all, so the kernel never has to cut a list.
const SCM_MAX_FD: usize = 253;

/// The control buffer: credentials and [`SCM_MAX_FD`] fds, as `u64`s so
/// that it is aligned for `cmsghdr`.
type ControlBuffer = [u64; control_words()];

const fn control_words() -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let bytes = unsafe {
        libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32)
            + libc::CMSG_SPACE((SCM_MAX_FD * std::mem::size_of::<libc::c_int>()) as u32)
    } as usize;
    bytes.div_ceil(8)
}

/// Receives one datagram into `buf`, closing every fd the sender attached.
///
/// recvmsg(2) is called directly, not through nix: nix refuses to walk the
/// control messages when the kernel set MSG_CTRUNC, and the fds the kernel
/// did install then stayed open in droved, 16 per datagram (issue 24).
/// Here every SCM_RIGHTS message the kernel wrote is walked and each fd in
/// it closed, truncated or not.
fn recv_one(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<Received> {
    buf.resize(MAX_DATAGRAM, 0);
    let mut control: ControlBuffer = [0; control_words()];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at `iov` (into `buf`, MAX_DATAGRAM bytes) and at
    // `control`, both alive and writable for the call's duration with the
    // lengths given.
    let n = unsafe {
        libc::recvmsg(
            fd,
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_TRUNC | libc::MSG_CMSG_CLOEXEC,
        )
    };
    // Read what the kernel put in the control buffer before anything else
    // can fail: the fds in it are ours to close.
    let (cred, fds_dropped) = if n >= 0 {
        take_control(&msg)
    } else {
        (None, 0)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = n as usize;
    Ok(Received {
        cred,
        len,
        truncated: len > MAX_DATAGRAM || msg.msg_flags & libc::MSG_TRUNC != 0,
        fds_dropped,
    })
}

/// Walks the control messages recvmsg(2) left in `msg`: returns the
/// sender's credentials and closes every fd passed (returning how many).
fn take_control(msg: &libc::msghdr) -> (Option<(u32, i32)>, usize) {
    let start = msg.msg_control as usize;
    let end = start + msg.msg_controllen;
    let mut cred = None;
    let mut closed = 0;
    // SAFETY: `msg` is the header recvmsg(2) filled; msg_control and
    // msg_controllen describe the part of our buffer the kernel wrote.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !c.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return either null or a
        // header that lies within msg_controllen (glibc checks).
        let hdr = unsafe { std::ptr::read_unaligned(c) };
        // SAFETY: as above; CMSG_DATA is pointer arithmetic on `c`.
        let data = unsafe { libc::CMSG_DATA(c) };
        let data_start = data as usize;
        let data_end = (c as usize).saturating_add(hdr.cmsg_len as usize).min(end);
        let data_len = data_end.saturating_sub(data_start);
        match (hdr.cmsg_level, hdr.cmsg_type) {
            (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                for i in 0..data_len / std::mem::size_of::<libc::c_int>() {
                    // SAFETY: within this message's data, inside our buffer.
                    let raw =
                        unsafe { std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i)) };
                    if raw >= 0 {
                        // SAFETY: the kernel just installed this fd in our
                        // table for this message; nobody else knows it.
                        // Dropping closes it.
                        drop(unsafe { OwnedFd::from_raw_fd(raw) });
                        closed += 1;
                    }
                }
            }
            (libc::SOL_SOCKET, libc::SCM_CREDENTIALS)
                if data_len >= std::mem::size_of::<libc::ucred>() =>
            {
                // SAFETY: a whole ucred lies within this message's data.
                let u = unsafe { std::ptr::read_unaligned(data.cast::<libc::ucred>()) };
                cred = Some((u.uid, u.pid));
            }
            _ => {}
        }
        // SAFETY: `c` is a header within the buffer `msg` describes.
        c = unsafe { libc::CMSG_NXTHDR(msg, c) };
    }
    (cred, closed)
}

/// A socket for droved's own messages to systemd's NOTIFY_SOCKET.
///
/// Sends never block: if the receiver's queue is full (a busy or wedged
/// service manager), the message is dropped and the caller told, rather
/// than stalling the supervisor and with it every worker's supervision.
pub struct UpwardSocket {
    fd: OwnedFd,
    addr: UnixAddr,
}

impl UpwardSocket {
    pub fn new(address: &str) -> io::Result<UpwardSocket> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = match address.strip_prefix('@') {
            Some(name) => UnixAddr::new_abstract(name.as_bytes())?,
            None => UnixAddr::new(address)?,
        };
        Ok(UpwardSocket { fd, addr })
    }

    pub fn send(&self, payload: &[u8]) -> io::Result<()> {
        socket::sendto(
            self.fd.as_raw_fd(),
            payload,
            &self.addr,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )?;
        Ok(())
    }
}

/// CLOCK_MONOTONIC in microseconds (for RELOADING=1's MONOTONIC_USEC).
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixDatagram;

    /// A private scratch directory (0755, so it passes the parent check).
    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("drove-ns-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[tokio::test(flavor = "current_thread")]
    async fn receives_with_sender_pid_and_drops_fds() {
        let dir = scratch("recv");
        let sock = NotifySocket::bind_in(&dir.join("rt"), None).unwrap();
        assert_eq!(sock.address, dir.join("rt/notify").display().to_string());
        let tx = UpwardSocket::new(&sock.address).unwrap();
        tx.send(b"READY=1\nSTATUS=hi").unwrap();
        let d = sock.recv().await.unwrap();
        assert_eq!(d.pid, Some(std::process::id() as i32));
        assert_eq!(d.bytes, b"READY=1\nSTATUS=hi");
        assert!(!d.truncated);

        // Oversized datagrams are flagged, not silently accepted.
        tx.send(&vec![b'x'; MAX_DATAGRAM + 100]).unwrap();
        let d = sock.recv().await.unwrap();
        assert!(d.truncated);

        // Attached fds are closed, not leaked.
        let marker = dir.join("fd-marker");
        let file = std::fs::File::create(&marker).unwrap();
        let tx = UnixDatagram::unbound().unwrap();
        let addr = UnixAddr::new(sock.address.as_str()).unwrap();
        let fds = [file.as_raw_fd()];
        let cmsg = [socket::ControlMessage::ScmRights(&fds)];
        let iov = [std::io::IoSlice::new(b"FDSTORE=1")];
        socket::sendmsg(tx.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&addr)).unwrap();
        drop(file);
        let d = sock.recv().await.unwrap();
        assert_eq!(d.fds_dropped, 1);
        let still_open = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .any(|target| target == marker);
        assert!(!still_open, "the passed fd was closed");

        // Datagrams from pids that are not workers are dropped and counted.
        let tx = UpwardSocket::new(&sock.address).unwrap();
        tx.send(b"READY=1").unwrap();
        tx.send(b"STATUS=worker").unwrap();
        let mut n = 0;
        let d = sock
            .recv_from(|_| {
                n += 1;
                n > 1
            })
            .await
            .unwrap();
        assert_eq!(d.bytes, b"STATUS=worker");
        assert_eq!(sock.ignored().not_workers, 1);
        assert_eq!(sock.ignored().other_users, 0);

        // The file goes with the socket.
        let path = PathBuf::from(&sock.address);
        drop(sock);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_fd_is_closed_however_many_are_attached() {
        let dir = scratch("manyfds");
        let sock = NotifySocket::bind_in(&dir.join("rt"), None).unwrap();
        // Count the fds that name this test's own file: other tests of this
        // binary open and close fds at the same time.
        let marker = dir.join("marker");
        let file = std::fs::File::create(&marker).unwrap();
        let count = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| *target == marker)
                .count()
        };
        let tx = UnixDatagram::unbound().unwrap();
        let addr = UnixAddr::new(sock.address.as_str()).unwrap();
        let before = count();
        for per in [1usize, 16, 17, 64, SCM_MAX_FD] {
            let fds = vec![file.as_raw_fd(); per];
            let cmsg = [socket::ControlMessage::ScmRights(&fds)];
            let iov = [std::io::IoSlice::new(b"STATUS=x")];
            socket::sendmsg(tx.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&addr)).unwrap();
            let d = sock.recv().await.unwrap();
            assert_eq!(d.fds_dropped, per);
            assert_eq!(d.bytes, b"STATUS=x");
            assert_eq!(d.pid, Some(std::process::id() as i32));
            assert_eq!(count(), before, "after {per} fds");
        }
        // Two SCM_RIGHTS messages in one datagram: the kernel merges them.
        let (a, b) = (vec![file.as_raw_fd(); 100], vec![file.as_raw_fd(); 100]);
        let cmsg = [
            socket::ControlMessage::ScmRights(&a),
            socket::ControlMessage::ScmRights(&b),
        ];
        let iov = [std::io::IoSlice::new(b"READY=1")];
        socket::sendmsg(tx.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&addr)).unwrap();
        let d = sock.recv().await.unwrap();
        assert_eq!(d.fds_dropped, 200);
        assert_eq!(count(), before);
        drop(sock);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_errors_are_reported_at_most_every_interval() {
        let mut f = Filter::new(None);
        let e = io::Error::from_raw_os_error(libc::ENOBUFS);
        let t = Instant::now();
        let line = f.error(&e, t).unwrap();
        assert!(
            line.contains("1 failed read(s) since the last line, 1 since start"),
            "{line}"
        );
        for i in 0..500 {
            assert!(f.error(&e, t + Duration::from_millis(i)).is_none());
        }
        let line = f.error(&e, t + REPORT_EVERY).unwrap();
        assert!(
            line.contains("501 failed read(s) since the last line, 502 since start"),
            "{line}"
        );
    }

    #[test]
    fn private_socket_file_owner_mode_and_replacement() {
        let dir = scratch("private");
        let rt = dir.join("rt");
        let group = Gid::from_raw(1);
        let Bound::Ours(fd, file) =
            bind_private(&rt, "s", SockType::Datagram, group, false).unwrap()
        else {
            panic!("fresh directory is busy")
        };
        let dm = std::fs::metadata(&rt).unwrap();
        assert_eq!(
            (dm.uid(), dm.gid(), dm.mode() & 0o7777),
            (Uid::effective().as_raw(), 1, 0o755)
        );
        let sm = std::fs::symlink_metadata(&file.path).unwrap();
        assert!(sm.file_type().is_socket());
        assert_eq!((sm.gid(), sm.mode() & 0o7777), (1, 0o660));
        assert_eq!(file.id, (sm.dev(), sm.ino()));

        // Live: left alone.
        assert!(matches!(
            bind_private(&rt, "s", SockType::Datagram, group, false).unwrap(),
            Bound::Busy
        ));
        // Stale: replaced by a new inode.
        drop(fd);
        let Bound::Ours(_fd, again) =
            bind_private(&rt, "s", SockType::Datagram, group, false).unwrap()
        else {
            panic!("stale socket not replaced")
        };
        assert_ne!(again.id, file.id);
        // No temporary names left behind.
        let names: Vec<_> = std::fs::read_dir(&rt)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s")]);

        // A file that is not a socket is not ours to replace.
        std::fs::write(rt.join("f"), b"data").unwrap();
        let err = bind_private(&rt, "f", SockType::Datagram, group, false)
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a socket"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_symlinks_foreign_directories_and_open_parents() {
        let dir = scratch("hostile");
        let target = dir.join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("link")).unwrap();
        let err = bind_private(
            &dir.join("link"),
            "s",
            SockType::Datagram,
            Gid::effective(),
            false,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);

        if Uid::effective().is_root() {
            let foreign = dir.join("foreign");
            std::fs::create_dir(&foreign).unwrap();
            nix::unistd::chown(&foreign, Some(Uid::from_raw(65534)), None).unwrap();
            let err = bind_private(&foreign, "s", SockType::Datagram, Gid::effective(), false)
                .err()
                .unwrap();
            assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        }

        let open = dir.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = bind_private(
            &open.join("rt"),
            "s",
            SockType::Datagram,
            Gid::effective(),
            false,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("other users"), "{err}");
        assert!(!open.join("rt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_second_droved_of_the_same_instance_gets_its_own_directory() {
        let dir = scratch("second");
        let rt = dir.join("rt");
        let first = NotifySocket::bind_in(&rt, None).unwrap();
        let second = NotifySocket::bind_in(&rt, None).unwrap();
        assert_eq!(first.address, rt.join("notify").display().to_string());
        let own = format!("{}.{}/notify", rt.display(), std::process::id());
        assert_eq!(second.address, own);
        drop(second);
        assert!(!Path::new(&own).exists());
        assert!(
            !Path::new(&own).parent().unwrap().exists(),
            "own directory removed"
        );
        drop(first);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn candidate_directories_and_names() {
        let none = candidate_dirs(None, None, false, "web");
        assert!(none.is_empty());
        assert_eq!(
            candidate_dirs(Some(OsStr::new("/run/drove/web:/run/x")), None, true, "web"),
            vec![
                PathBuf::from("/run/drove/web"),
                PathBuf::from("/run/drove/web")
            ]
        );
        assert_eq!(
            candidate_dirs(None, Some(OsStr::new("/run/user/1000")), false, "beta 2/ü"),
            vec![PathBuf::from("/run/user/1000/drove/beta_2__")]
        );
        // Too long for sun_path with "/notify": skipped.
        let long = format!("/{}", "x".repeat(120));
        assert_eq!(
            candidate_dirs(Some(OsStr::new(&long)), None, true, "a"),
            vec![PathBuf::from("/run/drove/a")]
        );
        assert_eq!(path_component(".."), "_..");
        assert_eq!(path_component(""), "_");
        let a = path_component(&"a".repeat(100));
        let b = path_component(&format!("{}b", "a".repeat(99)));
        assert_eq!(a.len(), 32 + 17);
        assert_ne!(a, b);
    }

    #[test]
    fn ignored_datagrams_are_summarised_at_most_every_interval() {
        let mut f = Filter::new(None);
        assert!(f.uid_ok(0) && f.uid_ok(Uid::effective().as_raw()));
        assert!(!f.uid_ok(4242));
        let creds = Credentials {
            uid: Uid::from_raw(4242),
            gid: Gid::from_raw(4242),
            groups: vec![],
        };
        f.admit(Some(&creds));
        assert!(f.uid_ok(4242));
        let t = Instant::now();
        let (line, warn) = f.count(None, t).unwrap();
        assert!(
            !warn
                && line.starts_with(
                    "ignored 1 notify datagram(s) from processes that are not workers;"
                ),
            "{line}"
        );
        // The first of the other kind is not held back by the first.
        let (line, warn) = f.count(Some((777, 12)), t).unwrap();
        assert!(warn && line.starts_with("ignored 1 notify datagram(s) from other users (latest uid 777, pid 12); 1 since start"), "{line}");
        for i in 0..1000 {
            assert!(
                f.count(Some((777, i)), t + Duration::from_millis(i as u64))
                    .is_none()
            );
        }
        assert!(f.count(None, t + REPORT_EVERY / 2).is_none());
        let (line, _) = f.count(Some((778, 5)), t + REPORT_EVERY).unwrap();
        assert!(line.starts_with("ignored 1001 notify datagram(s) from other users in the last 10s (latest uid 778, pid 5); 1002 since start"), "{line}");
        let (line, _) = f.count(None, t + REPORT_EVERY).unwrap();
        assert!(line.starts_with("ignored 2 notify datagram(s) from processes that are not workers in the last 10s; 3 since start"), "{line}");
        assert_eq!(
            f.ignored,
            Ignored {
                other_users: 1002,
                not_workers: 3
            }
        );
    }
}
